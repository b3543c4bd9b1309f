"""Tests for mdmd.pki: Windows CSRs, the CAs, key files and bootstrap."""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from asn1crypto import csr as asn1_csr
from asn1crypto import keys as asn1_keys
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mdmd import pki
from mdmd.pki import BootstrapError, BootstrapPlan, CSRError

NOW = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)
DEVICE_ID = "B5B954E81FBCB94EB79BD08BE625F4EE"  # the real W10 DeviceID
POC_THUMBPRINT = "8F2EBD13F3612D7C48C30E24CC73A88492613849"
WINDOWS_CSRS = ["windows-csr.der", "real-w10-19043-csr.der"]


# --------------------------------------------------------------------------
# keys and helpers (RSA generation is slow: once per module)
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca_key() -> rsa.RSAPrivateKey:
    return pki.generate_rsa_key(2048)


@pytest.fixture(scope="module")
def ca_cert(ca_key: rsa.RSAPrivateKey) -> x509.Certificate:
    return pki.create_ca_certificate(ca_key, "test identity CA", days=3650, now=NOW)


@pytest.fixture(scope="module")
def device_key() -> rsa.RSAPrivateKey:
    return pki.generate_rsa_key(2048)


def read_fixture(folder: Path, name: str) -> bytes:
    return (folder / name).read_bytes()


def build_csr(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
    algorithm: hashes.SHA256 | hashes.SHA384 | hashes.SHA512,
) -> bytes:
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test device")]))
        .sign(key, algorithm)
    )
    return request.public_bytes(serialization.Encoding.DER)


def asn1_request(
    spki: asn1_keys.PublicKeyInfo,
    *,
    subject: asn1_x509.Name | None = None,
    signer: rsa.RSAPrivateKey | None = None,
) -> bytes:
    """A PKCS#10 assembled by hand, for what cryptography refuses to build."""
    info = asn1_csr.CertificationRequestInfo(
        {
            "version": "v1",
            "subject": subject or asn1_x509.Name.build({"common_name": "crafted"}),
            "subject_pk_info": spki,
            "attributes": [],
        }
    )
    if signer is None:
        signature = b"\x01" * 256
    else:
        signature = signer.sign(info.dump(), padding.PKCS1v15(), hashes.SHA256())
    request = asn1_csr.CertificationRequest(
        {
            "certification_request_info": info,
            "signature_algorithm": {"algorithm": "sha256_rsa"},
            "signature": signature,
        }
    )
    return bytes(request.dump())


def spki_of(key: rsa.RSAPrivateKey) -> asn1_keys.PublicKeyInfo:
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return asn1_keys.PublicKeyInfo.load(der)


# --------------------------------------------------------------------------
# load_certification_request: real Windows CSRs
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", WINDOWS_CSRS)
def test_windows_csrs_load_and_verify(windows_fixtures: Path, name: str) -> None:
    request = pki.load_certification_request(read_fixture(windows_fixtures, name))
    assert isinstance(request.public_key, rsa.RSAPublicKey)
    assert request.key_bits == 2048
    assert request.public_key.public_numbers().e == 65537


def test_windows_csr_is_sha256(windows_fixtures: Path) -> None:
    request = pki.load_certification_request(read_fixture(windows_fixtures, "windows-csr.der"))
    assert request.signature_hash == "sha256"
    assert request.subject == "CN=0F3B8E6C-A271-4556-9B72-A26CBD!8090C8B484A0E24EB5C56E806CB4EE5B"


def test_real_w10_csr_iso_sha1_and_escaped_nul(windows_fixtures: Path) -> None:
    request = pki.load_certification_request(read_fixture(windows_fixtures, "real-w10-19043-csr.der"))
    assert request.signature_hash == "sha1"
    assert request.subject == ("CN=562A7F9A-6CD8-40B0-9E7E-0DBDD8!B5B954E81FBCB94EB79BD08BE625F4EE\\x00")
    assert "\x00" not in request.subject


def test_real_w10_csr_key_is_the_poc_certificate_key(windows_fixtures: Path) -> None:
    request = pki.load_certification_request(read_fixture(windows_fixtures, "real-w10-19043-csr.der"))
    poc = x509.load_der_x509_certificate(
        read_fixture(windows_fixtures, "poc-issued-device-cert-accepted-by-w10.der")
    )
    assert poc.public_key() == request.public_key


def test_accepts_bytearray_and_memoryview(windows_fixtures: Path) -> None:
    der = read_fixture(windows_fixtures, "windows-csr.der")
    assert pki.load_certification_request(bytearray(der)).key_bits == 2048  # type: ignore[arg-type]
    assert pki.load_certification_request(memoryview(der)).key_bits == 2048  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# load_certification_request: built and broken CSRs
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("algorithm", "name"),
    [
        (hashes.SHA256(), "sha256"),
        (hashes.SHA384(), "sha384"),
        (hashes.SHA512(), "sha512"),
    ],
)
def test_cryptography_built_csr_loads(
    device_key: rsa.RSAPrivateKey,
    algorithm: hashes.SHA256 | hashes.SHA384 | hashes.SHA512,
    name: str,
) -> None:
    request = pki.load_certification_request(build_csr(device_key, algorithm))
    assert request.signature_hash == name
    assert request.subject == "CN=test device"
    assert request.public_key == device_key.public_key()


def test_pkcs1_sha1_oid_is_accepted(device_key: rsa.RSAPrivateKey) -> None:
    info = asn1_csr.CertificationRequestInfo(
        {
            "version": "v1",
            "subject": asn1_x509.Name.build({"common_name": "sha1"}),
            "subject_pk_info": spki_of(device_key),
            "attributes": [],
        }
    )
    der = asn1_csr.CertificationRequest(
        {
            "certification_request_info": info,
            "signature_algorithm": {"algorithm": "1.2.840.113549.1.1.5"},
            "signature": device_key.sign(info.dump(), padding.PKCS1v15(), hashes.SHA1()),
        }
    ).dump()
    assert pki.load_certification_request(der).signature_hash == "sha1"


def test_flipped_signature_fails(device_key: rsa.RSAPrivateKey) -> None:
    der = bytearray(build_csr(device_key, hashes.SHA256()))
    der[-1] ^= 0x01  # the last byte belongs to the signature
    with pytest.raises(CSRError, match=r"^CSR signature does not verify$"):
        pki.load_certification_request(bytes(der))


def test_flipped_signed_data_fails(windows_fixtures: Path) -> None:
    der = bytearray(read_fixture(windows_fixtures, "real-w10-19043-csr.der"))
    index = der.index(b"562A7F9A")
    der[index] ^= 0x01  # inside the subject, which the signature covers
    with pytest.raises(CSRError, match=r"^CSR signature does not verify$"):
        pki.load_certification_request(bytes(der))


def test_non_null_signature_parameters_fail(windows_fixtures: Path) -> None:
    der = bytearray(read_fixture(windows_fixtures, "real-w10-19043-csr.der"))
    index = der.rindex(bytes.fromhex("2b0e03021d0500")) + 5
    der[index] = 0x04  # NULL -> empty OCTET STRING, outside the signed bytes
    with pytest.raises(CSRError, match="parameters must be NULL or absent"):
        pki.load_certification_request(bytes(der))


def test_absent_signature_parameters_are_accepted(windows_fixtures: Path) -> None:
    request = asn1_csr.CertificationRequest.load(read_fixture(windows_fixtures, "windows-csr.der"))
    body = (
        request["certification_request_info"].dump()
        + bytes.fromhex("300b06092a864886f70d01010b")  # sha256WithRSA, no NULL
        + request["signature"].dump()
    )
    der = b"\x30\x82" + len(body).to_bytes(2, "big") + body
    assert pki.load_certification_request(der).signature_hash == "sha256"


def test_signature_unused_bits_fail(windows_fixtures: Path) -> None:
    der = bytearray(read_fixture(windows_fixtures, "windows-csr.der"))
    index = der.rindex(bytes.fromhex("0382010100")) + 4
    der[index] = 0x01  # unused-bits count of the signature BIT STRING
    with pytest.raises(CSRError, match="unused bits"):
        pki.load_certification_request(bytes(der))


def test_small_rsa_key_fails_with_size_message() -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    der = build_csr(small, hashes.SHA256())
    with pytest.raises(CSRError, match=r"^RSA key is 1024 bits; at least 2048 required$"):
        pki.load_certification_request(der)
    assert pki.load_certification_request(der, min_key_bits=1024).key_bits == 1024


def test_ec_key_fails() -> None:
    der = build_csr(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())
    with pytest.raises(CSRError, match="only RSA keys are supported") as info:
        pki.load_certification_request(der)
    assert "1.2.840.10045.2.1" in str(info.value)


def test_unsupported_signature_algorithm_names_oid(
    device_key: rsa.RSAPrivateKey,
) -> None:
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pss")]))
        .sign(
            device_key,
            hashes.SHA256(),
            rsa_padding=padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),
        )
    )
    with pytest.raises(
        CSRError,
        match=r"unsupported CSR signature algorithm 1\.2\.840\.113549\.1\.1\.10",
    ):
        pki.load_certification_request(request.public_bytes(serialization.Encoding.DER))


@pytest.mark.parametrize("exponent", [1, 2, 4, 65536])
def test_bad_public_exponent_fails(device_key: rsa.RSAPrivateKey, exponent: int) -> None:
    modulus = device_key.public_key().public_numbers().n
    spki = asn1_keys.PublicKeyInfo(
        {
            "algorithm": {"algorithm": "rsa"},
            "public_key": asn1_keys.RSAPublicKey({"modulus": modulus, "public_exponent": exponent}),
        }
    )
    with pytest.raises(CSRError, match=r"^RSA public exponent is invalid"):
        pki.load_certification_request(asn1_request(spki))


def test_subject_control_characters_are_escaped(device_key: rsa.RSAPrivateKey) -> None:
    subject = asn1_x509.Name.build({"common_name": "a, b+c\\d\x07\u202e\U0001f600", "organization_name": "O"})
    der = asn1_request(spki_of(device_key), subject=subject, signer=device_key)
    request = pki.load_certification_request(der)
    assert request.subject == "CN=a\\, b\\+c\\\\d\\x07\\u202e\U0001f600, O=O"


GARBAGE = [
    pytest.param(b"", id="empty"),
    pytest.param(b"\x00", id="nul"),
    pytest.param(b"0", id="lone-sequence-tag"),
    pytest.param(b"not a certificate request at all", id="text"),
    pytest.param(b"-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n", id="pem"),
    pytest.param(b"\x30\x00", id="empty-sequence"),
    pytest.param(b"\x30\x03\x02\x01\x00", id="sequence-of-integer"),
    pytest.param(b"\x30\x80\x02\x01\x00\x00\x00", id="indefinite-length"),
    pytest.param(b"\x30\x81\x03\x02\x01\x00", id="non-minimal-length"),
    pytest.param(b"\x30\x84\xff\xff\xff\xff", id="huge-length"),
    pytest.param(b"\x30\x89" + b"\x01" * 9, id="overlong-length-field"),
    pytest.param(b"\x30" * 70000, id="oversize"),
    pytest.param(bytes(range(256)) * 3, id="byte-ramp"),
]


@pytest.mark.parametrize("data", GARBAGE)
def test_garbage_fails_with_csr_error(data: bytes) -> None:
    with pytest.raises(CSRError):
        pki.load_certification_request(data)


@pytest.mark.parametrize("name", WINDOWS_CSRS)
def test_trailing_garbage_fails(windows_fixtures: Path, name: str) -> None:
    der = read_fixture(windows_fixtures, name)
    with pytest.raises(CSRError, match="1 bytes of trailing data"):
        pki.load_certification_request(der + b"\x00")


def test_certificate_is_not_a_csr(windows_fixtures: Path) -> None:
    with pytest.raises(CSRError, match="not a valid PKCS#10"):
        pki.load_certification_request(
            read_fixture(windows_fixtures, "poc-issued-device-cert-accepted-by-w10.der")
        )


@pytest.mark.parametrize("name", WINDOWS_CSRS)
def test_every_truncation_fails(windows_fixtures: Path, name: str) -> None:
    der = read_fixture(windows_fixtures, name)
    for length in range(len(der)):
        with pytest.raises(CSRError):
            pki.load_certification_request(der[:length])


@pytest.mark.parametrize("name", WINDOWS_CSRS)
def test_bit_flips_raise_only_csr_error(windows_fixtures: Path, name: str) -> None:
    der = read_fixture(windows_fixtures, name)
    outcomes = {"ok": 0, "rejected": 0}
    for index in range(0, len(der), 7):
        for bit in range(8):
            mutated = bytearray(der)
            mutated[index] ^= 1 << bit
            try:
                pki.load_certification_request(bytes(mutated))
            except CSRError as exc:
                assert str(exc)
                assert "Traceback" not in str(exc)
                outcomes["rejected"] += 1
            else:
                outcomes["ok"] += 1
    # Almost every flip lands in signed bytes or structure and must fail.
    assert outcomes["rejected"] > 0.9 * (outcomes["ok"] + outcomes["rejected"])


# --------------------------------------------------------------------------
# certificate authorities
# --------------------------------------------------------------------------


def test_ca_certificate(ca_cert: x509.Certificate, ca_key: rsa.RSAPrivateKey) -> None:
    ca_cert.verify_directly_issued_by(ca_cert)
    assert ca_cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "test identity CA"
    assert ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "mdmd"
    assert ca_cert.issuer == ca_cert.subject
    constraints = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    usage = ca_cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.key_cert_sign and usage.value.crl_sign and usage.value.digital_signature
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = ca_cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert isinstance(ca_cert.signature_hash_algorithm, hashes.SHA256)
    assert 0 < ca_cert.serial_number < 2**159
    assert ca_cert.not_valid_before_utc == NOW
    assert ca_cert.not_valid_after_utc == NOW + timedelta(days=3650)
    assert pki.key_matches_certificate(ca_key, ca_cert)


def test_server_certificate(
    ca_cert: x509.Certificate, ca_key: rsa.RSAPrivateKey, device_key: rsa.RSAPrivateKey
) -> None:
    hosts = ["mdm.example.com", "127.0.0.1", "::1", "localhost"]
    cert = pki.create_server_certificate(ca_cert, ca_key, device_key, hosts, days=825, now=NOW)
    cert.verify_directly_issued_by(ca_cert)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "mdm.example.com"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mdm.example.com", "localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == [
        "127.0.0.1",
        "::1",
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_encipherment and not usage.key_cert_sign
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    with pytest.raises(ValueError, match="at least one host"):
        pki.create_server_certificate(ca_cert, ca_key, device_key, [], days=825, now=NOW)


@pytest.fixture(scope="module")
def device_cert(
    windows_fixtures: Path, ca_cert: x509.Certificate, ca_key: rsa.RSAPrivateKey
) -> tuple[x509.Certificate, rsa.RSAPublicKey]:
    request = pki.load_certification_request(read_fixture(windows_fixtures, "real-w10-19043-csr.der"))
    cert = pki.issue_device_certificate(ca_cert, ca_key, request.public_key, DEVICE_ID, days=365, now=NOW)
    return cert, request.public_key


def test_device_certificate_chains_to_ca(
    device_cert: tuple[x509.Certificate, rsa.RSAPublicKey],
    ca_cert: x509.Certificate,
    ca_key: rsa.RSAPrivateKey,
) -> None:
    cert, _ = device_cert
    assert cert.signature_hash_algorithm is not None
    ca_key.public_key().verify(
        cert.signature,
        cert.tbs_certificate_bytes,
        padding.PKCS1v15(),
        cert.signature_hash_algorithm,
    )
    cert.verify_directly_issued_by(ca_cert)
    assert cert.issuer == ca_cert.subject
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)


def test_device_certificate_contents(
    device_cert: tuple[x509.Certificate, rsa.RSAPublicKey], ca_cert: x509.Certificate
) -> None:
    cert, public_key = device_cert
    assert cert.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DEVICE_ID)])
    assert cert.public_key() == public_key
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert list(eku.value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature and usage.value.key_encipherment
    assert not (usage.value.key_cert_sign or usage.value.crl_sign or usage.value.content_commitment)
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and not constraints.value.ca
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(public_key)
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest


def test_device_certificate_honest_dates(
    device_cert: tuple[x509.Certificate, rsa.RSAPublicKey],
) -> None:
    cert, _ = device_cert
    assert cert.not_valid_before_utc == NOW - timedelta(minutes=5)
    assert cert.not_valid_after_utc == cert.not_valid_before_utc + timedelta(days=365)


def test_device_certificate_custom_skew(
    ca_cert: x509.Certificate, ca_key: rsa.RSAPrivateKey, device_key: rsa.RSAPrivateKey
) -> None:
    cert = pki.issue_device_certificate(
        ca_cert,
        ca_key,
        device_key.public_key(),
        "dev",
        days=30,
        now=NOW,
        clock_skew=timedelta(0),
    )
    assert cert.not_valid_before_utc == NOW
    assert cert.not_valid_after_utc == NOW + timedelta(days=30)


def test_device_certificate_serials_are_large_and_random(
    ca_cert: x509.Certificate, ca_key: rsa.RSAPrivateKey, device_key: rsa.RSAPrivateKey
) -> None:
    serials = set()
    for _ in range(20):
        cert = pki.issue_device_certificate(
            ca_cert, ca_key, device_key.public_key(), DEVICE_ID, days=1, now=NOW
        )
        assert 2**64 < cert.serial_number < 2**159
        assert pki.serial_hex(cert) == f"{cert.serial_number:x}"
        serials.add(cert.serial_number)
    assert len(serials) == 20


def test_device_certificate_keeps_device_id_verbatim(
    ca_cert: x509.Certificate, ca_key: rsa.RSAPrivateKey, device_key: rsa.RSAPrivateKey
) -> None:
    device_id = "0f3b8e6c-A271-4556-9b72-a26cbd"
    cert = pki.issue_device_certificate(ca_cert, ca_key, device_key.public_key(), device_id, days=1, now=NOW)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == device_id


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"device_id": ""}, "empty"),
        ({"device_id": "abc\x00"}, "non-printable"),
        ({"now": datetime(2025, 1, 1)}, "timezone-aware"),
        ({"days": 0}, "positive"),
    ],
)
def test_device_certificate_rejects_bad_arguments(
    ca_cert: x509.Certificate,
    ca_key: rsa.RSAPrivateKey,
    device_key: rsa.RSAPrivateKey,
    kwargs: dict[str, Any],
    message: str,
) -> None:
    arguments: dict[str, Any] = {
        "device_id": DEVICE_ID,
        "days": 1,
        "now": NOW,
        **kwargs,
    }
    with pytest.raises(ValueError, match=message):
        pki.issue_device_certificate(ca_cert, ca_key, device_key.public_key(), **arguments)


def test_device_certificate_refuses_mismatched_issuer_key(
    ca_cert: x509.Certificate, device_key: rsa.RSAPrivateKey
) -> None:
    with pytest.raises(ValueError, match="does not match"):
        pki.issue_device_certificate(ca_cert, device_key, device_key.public_key(), DEVICE_ID, days=1, now=NOW)


# --------------------------------------------------------------------------
# naming and PEM
# --------------------------------------------------------------------------


def test_thumbprint_and_serial_of_poc_certificate(windows_fixtures: Path) -> None:
    poc = x509.load_der_x509_certificate(
        read_fixture(windows_fixtures, "poc-issued-device-cert-accepted-by-w10.der")
    )
    assert pki.thumbprint(poc) == POC_THUMBPRINT
    assert pki.serial_hex(poc) == "2"


def test_pem_round_trip(
    ca_cert: x509.Certificate, ca_key: rsa.RSAPrivateKey, device_key: rsa.RSAPrivateKey
) -> None:
    leaf = pki.issue_device_certificate(ca_cert, ca_key, device_key.public_key(), "leaf", days=1, now=NOW)
    chain = pki.cert_to_pem(leaf) + pki.cert_to_pem(ca_cert)
    assert pki.load_pem_certificates(chain, "chain.pem") == [leaf, ca_cert]
    pem = pki.key_to_pem(device_key)
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    loaded = pki.load_pem_private_key(pem, "device.key")
    assert pki.key_matches_certificate(loaded, leaf)
    assert not pki.key_matches_certificate(loaded, ca_cert)


@pytest.mark.parametrize(
    "data",
    [b"", b"junk", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"],
)
def test_load_pem_certificates_names_source(data: bytes) -> None:
    with pytest.raises(ValueError, match=r"^/etc/mdmd/chain\.pem: "):
        pki.load_pem_certificates(data, "/etc/mdmd/chain.pem")


def test_load_pem_private_key_names_source(device_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(ValueError, match=r"^/etc/mdmd/x\.key: not a valid"):
        pki.load_pem_private_key(b"junk", "/etc/mdmd/x.key")
    encrypted = device_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    with pytest.raises(ValueError, match=r"^/etc/mdmd/x\.key: private key is encrypted"):
        pki.load_pem_private_key(encrypted, "/etc/mdmd/x.key")


# --------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------


@pytest.fixture
def umask() -> Iterator[Callable[[int], None]]:
    original = os.umask(0o022)
    os.umask(original)

    def set_umask(value: int) -> None:
        os.umask(value)

    try:
        yield set_umask
    finally:
        os.umask(original)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_write_file_atomic_mode_with_umask_zero(tmp_path: Path, umask: Callable[[int], None]) -> None:
    umask(0)
    target = tmp_path / "secret"
    pki.write_file_atomic(str(target), b"one")
    assert target.read_bytes() == b"one"
    assert mode_of(target) == 0o600
    pki.write_file_atomic(str(target), b"two")
    assert target.read_bytes() == b"two"
    assert mode_of(target) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret"]


def test_write_file_atomic_mode_beats_restrictive_umask(tmp_path: Path, umask: Callable[[int], None]) -> None:
    umask(0o077)
    target = tmp_path / "cert.pem"
    pki.write_file_atomic(str(target), b"cert", mode=0o644)
    assert mode_of(target) == 0o644


def test_write_file_atomic_failure_leaves_no_temp(tmp_path: Path) -> None:
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "inside").write_bytes(b"x")
    with pytest.raises(OSError):
        pki.write_file_atomic(str(tmp_path / "folder"), b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]


def test_create_file_exclusive_never_overwrites(tmp_path: Path, umask: Callable[[int], None]) -> None:
    umask(0)
    target = tmp_path / "token"
    assert pki.create_file_exclusive(str(target), b"first") is True
    assert mode_of(target) == 0o600
    assert pki.create_file_exclusive(str(target), b"second") is False
    assert target.read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["token"]


def test_create_file_exclusive_dangling_symlink_counts_as_existing(
    tmp_path: Path,
) -> None:
    target = tmp_path / "link"
    target.symlink_to(tmp_path / "nowhere")
    assert pki.create_file_exclusive(str(target), b"data") is False
    assert not (tmp_path / "nowhere").exists()


def test_create_file_exclusive_race_has_one_winner(tmp_path: Path) -> None:
    target = tmp_path / "raced"
    contenders = 8
    barrier = threading.Barrier(contenders)
    results: list[bool] = []
    lock = threading.Lock()

    def contend(number: int) -> None:
        barrier.wait()
        won = pki.create_file_exclusive(str(target), f"writer {number}".encode())
        with lock:
            results.append(won)

    threads = [threading.Thread(target=contend, args=(n,)) for n in range(contenders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False] * (contenders - 1) + [True]
    assert target.read_bytes().startswith(b"writer ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raced"]


# --------------------------------------------------------------------------
# bootstrap
# --------------------------------------------------------------------------


def make_plan(base: Path, *, tls: bool = True) -> BootstrapPlan:
    etc = base / "etc" / "mdmd"
    return BootstrapPlan(
        identity_cert=str(etc / "identity.crt"),
        identity_key=str(etc / "identity.key"),
        tls_cert=str(etc / "tls" / "server.crt") if tls else None,
        tls_key=str(etc / "tls" / "server.key") if tls else None,
        tls_root_cert=str(etc / "root.crt"),
        tls_root_key=str(etc / "root.key"),
        tls_hosts=["mdm.example.test", "192.0.2.10"],
        enroll_secret_file=str(etc / "enroll-secret"),
        admin_token_file=str(etc / "admin-token"),
    )


def snapshot(base: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(path): (path.read_bytes(), mode_of(path)) for path in sorted(base.rglob("*")) if path.is_file()
    }


def test_bootstrap_creates_everything_once(tmp_path: Path, umask: Callable[[int], None]) -> None:
    umask(0)  # the modes must not depend on the caller's umask
    plan = make_plan(tmp_path)
    created = pki.bootstrap(plan, now=NOW)
    assert created == [
        plan.identity_key,
        plan.identity_cert,
        plan.tls_root_key,
        plan.tls_root_cert,
        plan.tls_key,
        plan.tls_cert,
        plan.enroll_secret_file,
        plan.admin_token_file,
    ]
    files = snapshot(tmp_path)
    assert sorted(files) == sorted(created)
    certificates = {plan.identity_cert, plan.tls_root_cert, plan.tls_cert}
    for path, (_, mode) in files.items():
        assert mode == (0o644 if path in certificates else 0o600), path
    assert mode_of(tmp_path / "etc") == 0o700
    assert mode_of(tmp_path / "etc" / "mdmd" / "tls") == 0o700

    for path in (plan.enroll_secret_file, plan.admin_token_file):
        text = Path(path).read_text("ascii")
        assert text.endswith("\n") and len(text.strip()) >= 43 and text.count("\n") == 1
    assert Path(plan.enroll_secret_file).read_bytes() != Path(plan.admin_token_file).read_bytes()

    assert plan.tls_cert is not None and plan.tls_key is not None
    identity = pki.load_pem_certificates(Path(plan.identity_cert).read_bytes(), plan.identity_cert)[0]
    identity_key = pki.load_pem_private_key(Path(plan.identity_key).read_bytes(), plan.identity_key)
    assert pki.key_matches_certificate(identity_key, identity)
    assert isinstance(identity_key, rsa.RSAPrivateKey) and identity_key.key_size >= 2048
    assert identity.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert identity.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert identity.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "mdmd WSTEP identity CA"
    assert identity.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "mdmd"

    root = pki.load_pem_certificates(Path(plan.tls_root_cert).read_bytes(), plan.tls_root_cert)[0]
    assert root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "mdmd local development root"
    server = pki.load_pem_certificates(Path(plan.tls_cert).read_bytes(), plan.tls_cert)[0]
    server.verify_directly_issued_by(root)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mdm.example.test"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["192.0.2.10"]
    server_key = pki.load_pem_private_key(Path(plan.tls_key).read_bytes(), plan.tls_key)
    assert pki.key_matches_certificate(server_key, server)

    # Second run: nothing created, not one byte or mode changed.
    assert pki.bootstrap(plan, now=NOW + timedelta(days=1)) == []
    assert snapshot(tmp_path) == files


def test_bootstrap_without_tls_pair(tmp_path: Path) -> None:
    plan = make_plan(tmp_path, tls=False)
    created = pki.bootstrap(plan, now=NOW)
    assert created == [
        plan.identity_key,
        plan.identity_cert,
        plan.enroll_secret_file,
        plan.admin_token_file,
    ]
    assert sorted(snapshot(tmp_path)) == sorted(created)


def test_bootstrap_reuses_existing_root(tmp_path: Path) -> None:
    plan = make_plan(tmp_path)
    pki.bootstrap(plan, now=NOW)
    assert plan.tls_cert is not None and plan.tls_key is not None
    root_before = Path(plan.tls_root_cert).read_bytes()
    os.unlink(plan.tls_cert)
    os.unlink(plan.tls_key)
    assert pki.bootstrap(plan, now=NOW) == [plan.tls_key, plan.tls_cert]
    assert Path(plan.tls_root_cert).read_bytes() == root_before
    root = pki.load_pem_certificates(root_before, plan.tls_root_cert)[0]
    server = pki.load_pem_certificates(Path(plan.tls_cert).read_bytes(), plan.tls_cert)[0]
    server.verify_directly_issued_by(root)


def test_bootstrap_recreates_missing_secret_only(tmp_path: Path) -> None:
    plan = make_plan(tmp_path)
    pki.bootstrap(plan, now=NOW)
    os.unlink(plan.admin_token_file)
    assert pki.bootstrap(plan, now=NOW) == [plan.admin_token_file]


@pytest.mark.parametrize(
    "present",
    [
        "identity_cert",
        "identity_key",
        "tls_cert",
        "tls_key",
        "tls_root_cert",
        "tls_root_key",
    ],
)
def test_bootstrap_refuses_half_a_pair(tmp_path: Path, present: str) -> None:
    plan = make_plan(tmp_path)
    partner = {
        "identity_cert": "identity_key",
        "identity_key": "identity_cert",
        "tls_cert": "tls_key",
        "tls_key": "tls_cert",
        "tls_root_cert": "tls_root_key",
        "tls_root_key": "tls_root_cert",
    }[present]
    path = Path(getattr(plan, present))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"operator's file\n")
    before = snapshot(tmp_path)
    with pytest.raises(BootstrapError) as info:
        pki.bootstrap(plan, now=NOW)
    assert str(path) in str(info.value)
    assert getattr(plan, partner) in str(info.value)
    assert snapshot(tmp_path) == before


def test_bootstrap_rejects_mismatched_tls_paths(tmp_path: Path) -> None:
    plan = make_plan(tmp_path)
    broken = BootstrapPlan(
        identity_cert=plan.identity_cert,
        identity_key=plan.identity_key,
        tls_cert=plan.tls_cert,
        tls_key=None,
        tls_root_cert=plan.tls_root_cert,
        tls_root_key=plan.tls_root_key,
        tls_hosts=plan.tls_hosts,
        enroll_secret_file=plan.enroll_secret_file,
        admin_token_file=plan.admin_token_file,
    )
    with pytest.raises(BootstrapError, match="tls_cert and tls_key"):
        pki.bootstrap(broken, now=NOW)
    assert not (tmp_path / "etc").exists()


@pytest.mark.parametrize("hosts", [["b\u00fccher.example"], ["x" * 70 + ".example"], ["", "mdm.example"]])
def test_bootstrap_bad_host_is_a_bootstrap_error_and_writes_nothing(tmp_path: Path, hosts: list[str]) -> None:
    plan = make_plan(tmp_path)
    bad = BootstrapPlan(
        identity_cert=plan.identity_cert,
        identity_key=plan.identity_key,
        tls_cert=plan.tls_cert,
        tls_key=plan.tls_key,
        tls_root_cert=plan.tls_root_cert,
        tls_root_key=plan.tls_root_key,
        tls_hosts=hosts,
        enroll_secret_file=plan.enroll_secret_file,
        admin_token_file=plan.admin_token_file,
    )
    with pytest.raises(BootstrapError, match="cannot create the bootstrap certificates"):
        pki.bootstrap(bad, now=NOW)
    assert not (tmp_path / "etc").exists()
