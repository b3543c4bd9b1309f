"""PKI for mdmd: PKCS#10 verification, the certificate authorities, key files.

Pure module: no Twisted and no I/O, except the file helpers and
``bootstrap`` at the bottom, which touch the disk and must be called from a
thread, never from the reactor.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import ipaddress
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from asn1crypto import cms as asn1_cms
from asn1crypto import core as asn1_core
from asn1crypto import csr as asn1_csr
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.padding import PKCS1v15
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    PrivateKeyTypes,
    PublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "BootstrapError",
    "BootstrapPlan",
    "CSRError",
    "CertificationRequest",
    "RenewalRequestError",
    "bootstrap",
    "cert_to_pem",
    "create_ca_certificate",
    "create_file_exclusive",
    "create_server_certificate",
    "generate_rsa_key",
    "issue_device_certificate",
    "key_matches_certificate",
    "key_to_pem",
    "load_certification_request",
    "load_pem_certificates",
    "load_pem_private_key",
    "load_renewal_request",
    "serial_hex",
    "thumbprint",
    "write_file_atomic",
]


# ---------------------------------------------------------------------------
# PKCS#10
# ---------------------------------------------------------------------------


class CSRError(ValueError):
    """A CSR was rejected; the message is short and safe to show a client."""


@dataclass(frozen=True, slots=True)
class CertificationRequest:
    """A PKCS#10 whose self-signature verified (proof of key possession)."""

    public_key: rsa.RSAPublicKey
    # UNTRUSTED and for logs only: Windows puts "<GUID>!<hex>\0" here, not the
    # device ID (docs/windows-clients.md), so nothing may be derived from it.
    subject: str
    signature_hash: str
    key_bits: int


# A Windows CSR is under 1 KiB and a 16384-bit one under 5 KiB; the cap keeps
# hostile input from making the pure-Python parser work hard.
_MAX_CSR_BYTES = 64 * 1024
# Beyond these OpenSSL refuses to verify anyway (OPENSSL_RSA_MAX_MODULUS_BITS,
# RSA_MAX_PUBEXP_BITS); checking first gives the client a clear message and
# bounds the CPU one request can cost.
_MAX_KEY_BITS = 16384
_MAX_EXPONENT_BITS = 64
_MAX_SUBJECT_CHARS = 512

_RSA_ENCRYPTION_OID = "1.2.840.113549.1.1.1"
_SIGNATURE_HASHES: dict[str, tuple[str, type[hashes.HashAlgorithm]]] = {
    "1.2.840.113549.1.1.5": ("sha1", hashes.SHA1),
    # ISO/OIW sha1WithRSASignature: what Windows 10 19043 signs its CSR with
    # (docs/windows-clients.md, "The certificate request").
    "1.3.14.3.2.29": ("sha1", hashes.SHA1),
    "1.2.840.113549.1.1.11": ("sha256", hashes.SHA256),
    "1.2.840.113549.1.1.12": ("sha384", hashes.SHA384),
    "1.2.840.113549.1.1.13": ("sha512", hashes.SHA512),
}

_ATTRIBUTE_SHORT_NAMES = {
    "2.5.4.3": "CN",
    "2.5.4.5": "serialNumber",
    "2.5.4.6": "C",
    "2.5.4.7": "L",
    "2.5.4.8": "ST",
    "2.5.4.9": "street",
    "2.5.4.10": "O",
    "2.5.4.11": "OU",
    "1.2.840.113549.1.9.1": "emailAddress",
    "0.9.2342.19200300.100.1.1": "UID",
    "0.9.2342.19200300.100.1.25": "DC",
}


def load_certification_request(der: bytes, *, min_key_bits: int = 2048) -> CertificationRequest:
    """Parse a PKCS#10 leniently and verify its self-signature.

    ``cryptography`` refuses the CSR Windows 10 sends (a NUL in a
    PrintableString; docs/windows-clients.md), so the structure is read with asn1crypto and
    only the public-key operations go to ``cryptography``.  Only
    :class:`CSRError` ever leaves this function, whatever the bytes.
    """
    try:
        return _load_certification_request(bytes(der), min_key_bits)
    except CSRError:
        raise
    except Exception as exc:
        # Hostile input must get a 4xx fault, never a 5xx: Windows would
        # show the HTTP status instead of the reason (docs/windows-clients.md).
        raise CSRError("CSR could not be processed") from exc


def _load_certification_request(der: bytes, min_key_bits: int) -> CertificationRequest:
    _check_outer_der(der)
    try:
        request = asn1_csr.CertificationRequest.load(der, strict=True)
        # asn1crypto parses lazily: walk everything now so that a malformed
        # inner field fails here and not later in some log line.
        _ = request.native
        info = request["certification_request_info"]
        version = info["version"].native
        spki = info["subject_pk_info"]
        key_oid = spki["algorithm"]["algorithm"].dotted
        key_name = spki["algorithm"]["algorithm"].native
        sig_oid = request["signature_algorithm"]["algorithm"].dotted
        sig_params = request["signature_algorithm"]["parameters"].dump()
        signature = request["signature"].native
        signature_unused_bits = request["signature"].contents[:1]
        # .dump() without force returns the bytes as received; the signature
        # covers those, not a re-encoding of them.
        signed_data = info.dump()
        spki_der = spki.dump()
    except Exception as exc:
        # asn1crypto raises ValueError, TypeError, KeyError, OverflowError...
        raise CSRError("CSR is not a valid PKCS#10 structure") from exc

    if version != "v1":
        raise CSRError("unsupported PKCS#10 version (only version 1 exists)")
    if not isinstance(signature, bytes) or not signature:
        raise CSRError("CSR signature is missing")
    # Not covered by the signature; pinned to its only legal value so that
    # one CSR has one accepted encoding.
    if signature_unused_bits != b"\x00":
        raise CSRError("CSR signature BIT STRING has unused bits")

    if key_oid != _RSA_ENCRYPTION_OID:
        raise CSRError(
            f"CSR key is {_for_message(key_name)} ({_for_message(key_oid)}); only RSA keys are supported"
        )
    try:
        numbers = spki["public_key"].parsed
        modulus = numbers["modulus"].native
        exponent = numbers["public_exponent"].native
    except Exception as exc:
        raise CSRError("CSR RSA public key is malformed") from exc
    if not isinstance(modulus, int) or not isinstance(exponent, int) or modulus <= 0:
        raise CSRError("CSR RSA public key is malformed")
    bits = modulus.bit_length()
    if bits < min_key_bits:
        raise CSRError(f"RSA key is {bits} bits; at least {min_key_bits} required")
    if bits > _MAX_KEY_BITS:
        raise CSRError(f"RSA key is {bits} bits; at most {_MAX_KEY_BITS} supported")
    if exponent < 3 or exponent % 2 == 0:
        raise CSRError("RSA public exponent is invalid (must be odd and at least 3)")
    if exponent.bit_length() > _MAX_EXPONENT_BITS:
        raise CSRError(f"RSA public exponent is too large (at most {_MAX_EXPONENT_BITS} bits)")

    try:
        public_key = serialization.load_der_public_key(spki_der)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CSRError("CSR RSA public key is malformed") from exc
    if not isinstance(public_key, rsa.RSAPublicKey):
        raise CSRError("CSR key is not an RSA key")

    try:
        hash_name, hash_type = _SIGNATURE_HASHES[sig_oid]
    except KeyError:
        raise CSRError(
            f"unsupported CSR signature algorithm {_for_message(sig_oid)}; "
            "expected RSA PKCS#1 v1.5 with SHA-1, SHA-256, SHA-384 or SHA-512"
        ) from None
    # Unsigned too; PKCS#1 (RFC 8017) allows NULL, and absent is common.
    if sig_params not in (b"", b"\x05\x00"):
        raise CSRError("CSR signature algorithm parameters must be NULL or absent")
    try:
        # SHA-1 is accepted on purpose: Windows signs with it, and the CSR
        # only proves possession of the key.
        public_key.verify(signature, signed_data, PKCS1v15(), hash_type())
    except (InvalidSignature, ValueError) as exc:
        raise CSRError("CSR signature does not verify") from exc

    return CertificationRequest(
        public_key=public_key,
        subject=_subject_for_log(info["subject"]),
        signature_hash=hash_name,
        key_bits=public_key.key_size,
    )


def _check_outer_der(der: bytes) -> None:
    """Reject what is plainly not one DER SEQUENCE, with a specific message.

    asn1crypto also accepts BER; the outer header is checked by hand so that
    trailing garbage, truncation and indefinite lengths are named as such.
    """
    if not der:
        raise CSRError("CSR is empty")
    if len(der) > _MAX_CSR_BYTES:
        raise CSRError(f"CSR is too large ({len(der)} bytes; at most {_MAX_CSR_BYTES})")
    if der[0] != 0x30:
        raise CSRError("CSR is not DER: it does not start with a SEQUENCE")
    if len(der) < 2:
        raise CSRError("CSR is truncated")
    first = der[1]
    if first == 0x80:
        raise CSRError("CSR is not DER: indefinite length encoding")
    if first < 0x80:
        header, length = 2, first
    else:
        count = first & 0x7F
        if count > 4:
            raise CSRError("CSR is not DER: length field too long")
        if len(der) < 2 + count:
            raise CSRError("CSR is truncated")
        length = int.from_bytes(der[2 : 2 + count], "big")
        if der[2] == 0 or length < 0x80:
            raise CSRError("CSR is not DER: non-minimal length encoding")
        header = 2 + count
    total = header + length
    if total > len(der):
        raise CSRError("CSR is truncated")
    if total < len(der):
        raise CSRError(f"CSR is not DER: {len(der) - total} bytes of trailing data")


def _subject_for_log(name: Any) -> str:
    """Render an asn1crypto Name in RFC 4514 order, every odd byte escaped."""
    try:
        rdns = list(name.chosen)
        parts = []
        for rdn in reversed(rdns):
            values = []
            for pair in rdn:
                oid = pair["type"].dotted
                label = _ATTRIBUTE_SHORT_NAMES.get(oid, oid)
                value = pair["value"].native
                text = "#" + value.hex() if isinstance(value, bytes) else _escape_for_log(str(value))
                values.append(f"{label}={text}")
            parts.append("+".join(values))
        rendered = ", ".join(parts)
    except Exception:
        # A log string must never fail an enrollment.
        return "<unreadable subject>"
    if len(rendered) > _MAX_SUBJECT_CHARS:
        rendered = rendered[:_MAX_SUBJECT_CHARS] + "..."
    return rendered


def _escape_for_log(text: str) -> str:
    # Escape the separators too, so a hostile CN cannot pose as extra fields.
    out = []
    for ch in text:
        if ch in "\\,+":
            out.append("\\" + ch)
        elif ch.isprintable():
            out.append(ch)
        else:
            code = ord(ch)
            if code < 0x100:
                out.append(f"\\x{code:02x}")
            elif code < 0x10000:
                out.append(f"\\u{code:04x}")
            else:
                out.append(f"\\U{code:08x}")
    return "".join(out)


def _for_message(value: object, limit: int = 64) -> str:
    text = _escape_for_log(str(value))
    return text if len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------------------
# PKCS#7 renewal requests (MS-MDE2 3.5)
# ---------------------------------------------------------------------------


class RenewalRequestError(ValueError):
    """A renewal's PKCS#7 was rejected; the message is short and safe to show."""


# The signer's certificate and a PKCS#10 are a few KiB; the cap bounds what
# hostile input can make the pure-Python parser do.
_MAX_PKCS7_BYTES = 128 * 1024
_CMS_DIGESTS: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}


def load_renewal_request(
    token: bytes, signer: x509.Certificate, *, min_key_bits: int = 2048
) -> CertificationRequest:
    """The PKCS#10 inside a renewal's PKCS#7 SignedData, once the signature
    is verified as made by *signer*'s key (the certificate being renewed,
    the one that authenticated the TLS connection).

    The signed content is the PKCS#10 as DER (automatic renewal) or as
    base64 of the DER (the user-triggered form, Microsoft Learn's
    "Certificate Renewal").  The CMS structure is read with asn1crypto, the
    signature checked with ``cryptography``.  Only :class:`RenewalRequestError`
    and :class:`CSRError` (about the inner PKCS#10) leave this function.
    """
    try:
        csr_der = _signed_content(bytes(token), signer)
    except RenewalRequestError:
        raise
    except Exception as exc:
        raise RenewalRequestError("PKCS#7 could not be processed") from exc
    return load_certification_request(csr_der, min_key_bits=min_key_bits)


def _signed_content(token: bytes, signer: x509.Certificate) -> bytes:
    if not token:
        raise RenewalRequestError("PKCS#7 is empty")
    if len(token) > _MAX_PKCS7_BYTES:
        raise RenewalRequestError(f"PKCS#7 is too large ({len(token)} bytes; at most {_MAX_PKCS7_BYTES})")
    try:
        info = asn1_cms.ContentInfo.load(token, strict=True)
        _ = info.native  # parse everything now (asn1crypto is lazy)
        content_type = info["content_type"].native
        signed = info["content"]
    except Exception as exc:
        raise RenewalRequestError("not a PKCS#7 (CMS ContentInfo) structure") from exc
    if content_type != "signed_data":
        raise RenewalRequestError(f"PKCS#7 holds {_for_message(content_type)}, not signed data")
    encap = signed["encap_content_info"]
    content = encap["content"].native
    if encap["content_type"].native != "data" or not isinstance(content, bytes) or not content:
        raise RenewalRequestError("PKCS#7 does not carry the PKCS#10 as its signed content")
    signer_infos = list(signed["signer_infos"])
    if len(signer_infos) != 1:
        raise RenewalRequestError(f"PKCS#7 has {len(signer_infos)} signers; exactly one is required")
    signer_info = signer_infos[0]
    if not _is_signer(signer_info["sid"], signer):
        raise RenewalRequestError("PKCS#7 is not signed by the certificate presented for the connection")
    digest_name = signer_info["digest_algorithm"]["algorithm"].native
    hash_type = _CMS_DIGESTS.get(digest_name)
    if hash_type is None:
        raise RenewalRequestError(f"unsupported PKCS#7 digest algorithm {_for_message(digest_name)}")
    if signer_info["signature_algorithm"].signature_algo != "rsassa_pkcs1v15":
        raise RenewalRequestError("PKCS#7 signature is not RSA PKCS#1 v1.5")
    signed_attrs = signer_info["signed_attrs"]
    if isinstance(signed_attrs, asn1_core.Void):
        signed_bytes = content
    else:
        _check_signed_attributes(signed_attrs, content, hash_type)
        # RFC 5652 5.4: the signature covers the attributes with their
        # universal SET OF tag, not the [0] they are sent with.
        signed_bytes = signed_attrs.untag().dump()
    public_key = signer.public_key()
    if not isinstance(public_key, rsa.RSAPublicKey):
        raise RenewalRequestError("the certificate presented does not hold an RSA key")
    try:
        public_key.verify(signer_info["signature"].native, signed_bytes, PKCS1v15(), hash_type())
    except (InvalidSignature, ValueError) as exc:
        raise RenewalRequestError("PKCS#7 signature does not verify") from exc
    if content[:1] == b"\x30":
        return content
    try:
        # The user-triggered form: the PKCS#10 base64-encoded once more.
        return base64.b64decode(b"".join(content.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RenewalRequestError("PKCS#7 content is neither a DER nor a base64 PKCS#10") from exc


def _is_signer(sid: Any, cert: x509.Certificate) -> bool:
    if sid.name == "issuer_and_serial_number":
        chosen = sid.chosen
        return bool(
            chosen["serial_number"].native == cert.serial_number
            and chosen["issuer"] == asn1_x509.Name.load(cert.issuer.public_bytes())
        )
    if sid.name == "subject_key_identifier":
        try:
            ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
        except x509.ExtensionNotFound:
            return False
        return bool(sid.chosen.native == ski)
    return False


def _check_signed_attributes(attrs: Any, content: bytes, hash_type: type[hashes.HashAlgorithm]) -> None:
    values: dict[str, list[Any]] = {}
    for attr in attrs:
        values.setdefault(attr["type"].native, []).extend(attr["values"])
    content_types = values.get("content_type", [])
    digests = values.get("message_digest", [])
    if len(content_types) != 1 or content_types[0].native != "data":
        raise RenewalRequestError("PKCS#7 signed attributes must name the content type data once")
    if len(digests) != 1:
        raise RenewalRequestError("PKCS#7 signed attributes must carry one message digest")
    digest = hashes.Hash(hash_type())
    digest.update(content)
    if digests[0].native != digest.finalize():
        raise RenewalRequestError("PKCS#7 message digest does not match its content")


# ---------------------------------------------------------------------------
# Certificate authorities
# ---------------------------------------------------------------------------


def generate_rsa_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    if bits < 2048:
        raise ValueError(f"RSA key size {bits} is too small; at least 2048 required")
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def _random_serial() -> int:
    # 127 random bits under a set top bit: always positive, always 32 hex
    # digits, 17 DER octets (RFC 5280 allows 20), far above CA/B's 64 bits.
    return secrets.randbits(128) | (1 << 127)


def _utc(now: datetime) -> datetime:
    # X.509 times have one-second resolution; naive datetimes are refused so
    # that local time cannot slip into a certificate.
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime")
    return now.astimezone(UTC).replace(microsecond=0)


def _check_days(days: int) -> None:
    if days <= 0:
        raise ValueError(f"certificate lifetime must be positive, got {days} days")


def _authority_key_identifier(
    issuer_cert: x509.Certificate,
) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer_cert.public_key()  # type: ignore[arg-type]
        )
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _check_issuer(issuer_cert: x509.Certificate, issuer_key: CertificateIssuerPrivateKeyTypes) -> None:
    # A mismatched pair would sign certificates that chain to nothing; Windows
    # would only say the enrollment failed.
    if not key_matches_certificate(issuer_key, issuer_cert):
        raise ValueError("issuer key does not match the issuer certificate")


def create_ca_certificate(
    key: rsa.RSAPrivateKey, common_name: str, *, days: int, now: datetime
) -> x509.Certificate:
    """Self-signed CA that signs end-entity certificates directly."""
    _check_days(days)
    start = _utc(now)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mdmd"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    public_key = key.public_key()
    ski = x509.SubjectKeyIdentifier.from_public_key(public_key)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(_random_serial())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=days))
        # path_length 0: these CAs sign leaves only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )


def _leaf_key_usage(*, key_encipherment: bool = True) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def create_server_certificate(
    issuer_cert: x509.Certificate,
    issuer_key: rsa.RSAPrivateKey,
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
    hosts: Sequence[str],
    *,
    days: int,
    now: datetime,
) -> x509.Certificate:
    """TLS server certificate for ``hosts`` (names and IP literals)."""
    if isinstance(hosts, str):
        raise TypeError("hosts must be a sequence of host names, not a string")
    if not hosts:
        raise ValueError("at least one host name is required for a server certificate")
    _check_days(days)
    _check_issuer(issuer_cert, issuer_key)
    start = _utc(now)
    alt_names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt_names.append(x509.DNSName(host))
    public_key = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(issuer_cert.subject)
        .public_key(public_key)
        .serial_number(_random_serial())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        # An EC key signs (ECDHE_ECDSA); only an RSA key can encipher.
        .add_extension(_leaf_key_usage(key_encipherment=isinstance(key, rsa.RSAPrivateKey)), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(_authority_key_identifier(issuer_cert), critical=False)
        .sign(issuer_key, hashes.SHA256())
    )


def issue_device_certificate(
    issuer_cert: x509.Certificate,
    issuer_key: rsa.RSAPrivateKey,
    public_key: rsa.RSAPublicKey,
    device_id: str,
    *,
    days: int,
    now: datetime,
    clock_skew: timedelta = timedelta(minutes=5),
) -> x509.Certificate:
    """MS-WSTEP enrollment certificate for one device.

    The subject CN is the DeviceID, never the CSR's subject.  NotBefore is
    backdated by ``clock_skew`` only, and NotAfter counts from NotBefore, so
    the device gets the whole configured lifetime (docs/windows-clients.md,
    "Device certificates").
    """
    if not device_id:
        raise ValueError("device_id is empty")
    if not device_id.isprintable():
        raise ValueError("device_id contains non-printable characters")
    if clock_skew < timedelta(0):
        raise ValueError("clock_skew must not be negative")
    _check_days(days)
    _check_issuer(issuer_cert, issuer_key)
    start = _utc(now) - clock_skew
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .issuer_name(issuer_cert.subject)
        .public_key(public_key)
        .serial_number(_random_serial())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_leaf_key_usage(), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(_authority_key_identifier(issuer_cert), critical=False)
        .sign(issuer_key, hashes.SHA256())
    )


def thumbprint(cert: x509.Certificate) -> str:
    """SHA-1 of the DER, upper-case hex: how Windows names it in its store."""
    return cert.fingerprint(hashes.SHA1()).hex().upper()


def serial_hex(cert: x509.Certificate) -> str:
    return f"{cert.serial_number:x}"


def cert_to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_to_pem(key: PrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_pem_certificates(data: bytes, source: str) -> list[x509.Certificate]:
    """Every certificate of a PEM chain file, leaf first as written."""
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ValueError(f"{source}: no valid PEM certificate found") from exc
    if not certs:
        raise ValueError(f"{source}: no PEM certificate found")
    return certs


def load_pem_private_key(data: bytes, source: str) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:
        # Raised for an encrypted key: the daemon has no passphrase to offer.
        raise ValueError(f"{source}: private key is encrypted; an unencrypted PEM key is required") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"{source}: not a valid unencrypted PEM private key") from exc


def _spki_der(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def key_matches_certificate(key: PrivateKeyTypes, cert: x509.Certificate) -> bool:
    try:
        return _spki_der(key.public_key()) == _spki_der(cert.public_key())
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return False


# ---------------------------------------------------------------------------
# Files (blocking: call from a thread)
# ---------------------------------------------------------------------------


def _write_temp(directory: str, base: str, data: bytes, mode: int) -> str:
    """Create, fill and fsync a temp file next to the target; return its path."""
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    while True:
        tmp = os.path.join(directory, f".{base}.{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(tmp, flags, mode)
        except FileExistsError:
            continue
        break
    try:
        try:
            # The umask may have cleared bits from ``mode``; set it exactly
            # before any byte is written.
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return tmp


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _fsync_directory(directory: str) -> None:
    # The file's own fsync does not cover its directory entry: the
    # rename/link is durable only once the folder is synced too.
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _split(path: str) -> tuple[str, str]:
    directory, base = os.path.split(os.path.abspath(path))
    if not base:
        raise ValueError(f"{path}: not a file path")
    return directory, base


def write_file_atomic(path: str, data: bytes, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so that readers see old or new, never half."""
    directory, base = _split(path)
    tmp = _write_temp(directory, base, data, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    _fsync_directory(directory)


def create_file_exclusive(path: str, data: bytes, *, mode: int = 0o600) -> bool:
    """Create ``path`` with ``data`` unless it exists; True if this call created it.

    ``os.link`` fails when the name exists, so of two racing processes exactly
    one wins, and the file appears complete, never half written.
    """
    if os.path.lexists(path):
        return False
    directory, base = _split(path)
    tmp = _write_temp(directory, base, data, mode)
    try:
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (
                errno.EPERM,
                errno.EOPNOTSUPP,
                errno.ENOSYS,
                errno.EMLINK,
            ):
                raise
            # A file system without hard links: fall back to O_EXCL on the
            # name itself, which is still exclusive, though not atomic.
            if not _create_in_place(path, data, mode):
                return False
    finally:
        _unlink_quietly(tmp)
    _fsync_directory(directory)
    return True


def _create_in_place(path: str, data: bytes, mode: int) -> bool:
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        return False
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        _unlink_quietly(path)
        raise
    return True


# ---------------------------------------------------------------------------
# Bootstrap
# ---------------------------------------------------------------------------


class BootstrapError(ValueError):
    """The existing files are inconsistent; bootstrap refuses to guess."""


@dataclass(frozen=True, slots=True)
class BootstrapPlan:
    identity_cert: str
    identity_key: str
    tls_cert: str | None
    tls_key: str | None
    tls_root_cert: str
    tls_root_key: str
    tls_hosts: Sequence[str]
    enroll_secret_file: str
    admin_token_file: str
    identity_common_name: str = "mdmd WSTEP identity CA"
    ca_days: int = 3650
    server_days: int = 825
    key_bits: int = 2048


_DEV_ROOT_COMMON_NAME = "mdmd local development root"
_SECRET_MODE = 0o600
_CERT_MODE = 0o644
_DIR_MODE = 0o700


def _pair_state(cert_path: str, key_path: str, what: str) -> bool:
    """True if both files exist, False if neither; half a pair is an error."""
    cert_exists = os.path.lexists(cert_path)
    key_exists = os.path.lexists(key_path)
    if cert_exists != key_exists:
        present, missing = (cert_path, key_path) if cert_exists else (key_path, cert_path)
        raise BootstrapError(
            f"{what}: {present} exists but {missing} does not; restore the missing file "
            f"or remove both to have a new pair created"
        )
    return cert_exists


def _make_parents(path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    missing: list[str] = []
    while not os.path.isdir(directory):
        missing.append(directory)
        parent = os.path.dirname(directory)
        if parent == directory:
            break
        directory = parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, _DIR_MODE)
        except FileExistsError:
            continue
        # Keys live here: exactly 0700, whatever the umask.
        os.chmod(folder, _DIR_MODE)


def bootstrap(plan: BootstrapPlan, *, now: datetime) -> list[str]:
    """Create whatever of the plan is missing; never touch an existing file.

    Every consistency check runs before the first file is written, so a
    refused bootstrap leaves the disk as it was.  Returns the files created,
    in creation order (folders created on the way are not listed).
    """
    if (plan.tls_cert is None) != (plan.tls_key is None):
        raise BootstrapError("tls_cert and tls_key must both be set, or both be unset to bring your own")
    if plan.key_bits < 2048:
        raise BootstrapError(f"key_bits is {plan.key_bits}; at least 2048 required")
    paths = [
        plan.identity_cert,
        plan.identity_key,
        plan.tls_root_cert,
        plan.tls_root_key,
        plan.enroll_secret_file,
        plan.admin_token_file,
    ]
    if plan.tls_cert is not None and plan.tls_key is not None:
        paths += [plan.tls_cert, plan.tls_key]
    resolved = [os.path.abspath(p) for p in paths]
    if len(set(resolved)) != len(resolved):
        raise BootstrapError("bootstrap paths must all be different files: " + ", ".join(paths))

    have_identity = _pair_state(plan.identity_cert, plan.identity_key, "identity CA")
    have_root = _pair_state(plan.tls_root_cert, plan.tls_root_key, "TLS development root")
    need_server = False
    if plan.tls_cert is not None and plan.tls_key is not None:
        need_server = not _pair_state(plan.tls_cert, plan.tls_key, "TLS server certificate")
    if need_server and not plan.tls_hosts:
        raise BootstrapError("tls_hosts is empty; the server certificate needs at least one host name")

    root: tuple[x509.Certificate, rsa.RSAPrivateKey] | None = None
    if need_server and have_root:
        root = _load_root(plan.tls_root_cert, plan.tls_root_key)

    # Everything is generated before the first write, so that a refused
    # name or lifetime leaves the disk as it was.
    try:
        pending = _bootstrap_material(plan, now, have_identity, need_server, root)
    except ValueError as exc:
        raise BootstrapError(f"cannot create the bootstrap certificates: {exc}") from exc

    created: list[str] = []
    for path, data, mode in pending:
        _make_parents(path)
        if not create_file_exclusive(path, data, mode=mode):
            raise BootstrapError(f"{path} appeared while bootstrapping; is another mdmd running?")
        created.append(path)
    return created


def _bootstrap_material(
    plan: BootstrapPlan,
    now: datetime,
    have_identity: bool,
    need_server: bool,
    root: tuple[x509.Certificate, rsa.RSAPrivateKey] | None,
) -> list[tuple[str, bytes, int]]:
    """The files bootstrap must create, as (path, content, mode), in order."""
    pending: list[tuple[str, bytes, int]] = []
    if not have_identity:
        key = generate_rsa_key(plan.key_bits)
        cert = create_ca_certificate(key, plan.identity_common_name, days=plan.ca_days, now=now)
        # Key first: a crash in between leaves a key without its certificate,
        # which the half-pair check reports, rather than an orphan certificate.
        pending.append((plan.identity_key, key_to_pem(key), _SECRET_MODE))
        pending.append((plan.identity_cert, cert_to_pem(cert), _CERT_MODE))

    if need_server and plan.tls_cert is not None and plan.tls_key is not None:
        if root is None:
            root_key = generate_rsa_key(plan.key_bits)
            root_cert = create_ca_certificate(root_key, _DEV_ROOT_COMMON_NAME, days=plan.ca_days, now=now)
            pending.append((plan.tls_root_key, key_to_pem(root_key), _SECRET_MODE))
            pending.append((plan.tls_root_cert, cert_to_pem(root_cert), _CERT_MODE))
            root = (root_cert, root_key)
        # ECDSA P-256 for the server's own TLS key: its handshake signature
        # costs the server ~0.03 ms against ~0.9 ms for RSA-2048, a fifth of
        # the CPU of a management check-in (bench/RESULTS.md).  Windows
        # negotiates ECDHE-ECDSA with AES-GCM.  The CAs stay RSA.
        server_key = ec.generate_private_key(ec.SECP256R1())
        server_cert = create_server_certificate(
            root[0], root[1], server_key, plan.tls_hosts, days=plan.server_days, now=now
        )
        pending.append((plan.tls_key, key_to_pem(server_key), _SECRET_MODE))
        pending.append((plan.tls_cert, cert_to_pem(server_cert), _CERT_MODE))

    for secret_path in (plan.enroll_secret_file, plan.admin_token_file):
        if not os.path.lexists(secret_path):
            token = secrets.token_urlsafe(32) + "\n"
            pending.append((secret_path, token.encode("ascii"), _SECRET_MODE))
    return pending


def _load_root(cert_path: str, key_path: str) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    try:
        with open(cert_path, "rb") as handle:
            cert = load_pem_certificates(handle.read(), cert_path)[0]
        with open(key_path, "rb") as handle:
            key = load_pem_private_key(handle.read(), key_path)
    except OSError as exc:
        raise BootstrapError(f"cannot read the TLS development root: {exc}") from exc
    except ValueError as exc:
        raise BootstrapError(str(exc)) from exc
    if not isinstance(key, rsa.RSAPrivateKey):
        raise BootstrapError(f"{key_path}: the TLS development root key must be an RSA key")
    if not key_matches_certificate(key, cert):
        raise BootstrapError(f"{key_path} does not match {cert_path}")
    return cert, key
