"""Certificate renewal, the pure parts: the PKCS#7 a renewal carries, the
renewal window, where renewals are served and what an administrator sees."""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from asn1crypto import algos, cms
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.padding import PKCS1v15
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7
from cryptography.x509.oid import NameOID

from mdmd import pki
from mdmd.renewal import (
    CLOCK_ALLOWANCE,
    DAY,
    RenewalPolicy,
    not_eligible,
    renewal_problem,
    renewal_server_url,
    renewal_status,
)
from mdmd.soap import ErrorType, FaultCode

NOW = datetime(2030, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def ca() -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    key = pki.generate_rsa_key()
    return pki.create_ca_certificate(key, "mdmd test identity", days=3650, now=NOW), key


def _device(ca: tuple[x509.Certificate, rsa.RSAPrivateKey]) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    key = pki.generate_rsa_key()
    return pki.issue_device_certificate(*ca, key.public_key(), "DEV1", days=365, now=NOW), key


@pytest.fixture(scope="module")
def old(ca: tuple[x509.Certificate, rsa.RSAPrivateKey]) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    return _device(ca)


@pytest.fixture(scope="module")
def new_key() -> rsa.RSAPrivateKey:
    return pki.generate_rsa_key()


def _csr(key: rsa.RSAPrivateKey) -> bytes:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "renewal")])
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subject)
        .sign(key, hashes.SHA256())
        .public_bytes(Encoding.DER)
    )


def signed_data(
    content: bytes,
    cert: x509.Certificate,
    key: rsa.RSAPrivateKey,
    *,
    digest: str = "sha256",
    attributes: bool = True,
    sid: str = "issuer_and_serial_number",
    message_digest: bytes | None = None,
    content_type: str = "data",
    signers: int = 1,
) -> bytes:
    """A CMS SignedData built field by field, so that each test can bend one."""
    hash_algorithm: hashes.HashAlgorithm = {
        "sha1": hashes.SHA1(),
        "sha256": hashes.SHA256(),
        "md5": hashes.MD5(),
    }[digest]
    h = hashes.Hash(hash_algorithm)
    h.update(content)
    attrs = cms.CMSAttributes(
        [
            cms.CMSAttribute({"type": "content_type", "values": [content_type]}),
            cms.CMSAttribute({"type": "message_digest", "values": [message_digest or h.finalize()]}),
        ]
    )
    to_sign = attrs.dump() if attributes else content
    signature = key.sign(to_sign, PKCS1v15(), hash_algorithm)
    parsed = asn1_x509.Certificate.load(cert.public_bytes(Encoding.DER))
    if sid == "issuer_and_serial_number":
        identifier = cms.SignerIdentifier(
            {
                "issuer_and_serial_number": {
                    "issuer": parsed.issuer,
                    "serial_number": parsed.serial_number,
                }
            }
        )
    else:
        identifier = cms.SignerIdentifier({"subject_key_identifier": parsed.key_identifier})
    info: dict[str, Any] = {
        "version": "v1" if sid == "issuer_and_serial_number" else "v3",
        "sid": identifier,
        "digest_algorithm": {"algorithm": digest},
        "signature_algorithm": {"algorithm": "rsassa_pkcs1v15"},
        "signature": signature,
    }
    if attributes:
        info["signed_attrs"] = attrs
    data = cms.SignedData(
        {
            "version": "v1",
            "digest_algorithms": [algos.DigestAlgorithm({"algorithm": digest})],
            "encap_content_info": {"content_type": "data", "content": content},
            "certificates": [parsed],
            "signer_infos": [cms.SignerInfo(info)] * signers,
        }
    )
    return bytes(cms.ContentInfo({"content_type": "signed_data", "content": data}).dump())


# --- the PKCS#7 ---


def test_a_windows_style_renewal_yields_the_new_key(
    old: tuple[x509.Certificate, rsa.RSAPrivateKey], new_key: rsa.RSAPrivateKey
) -> None:
    cert, key = old
    token = (
        pkcs7.PKCS7SignatureBuilder()
        .set_data(_csr(new_key))
        .add_signer(cert, key, hashes.SHA256())
        .sign(Encoding.DER, [pkcs7.PKCS7Options.Binary])
    )
    request = pki.load_renewal_request(token, cert)
    assert request.public_key.public_numbers() == new_key.public_key().public_numbers()


@pytest.mark.parametrize(
    "variant",
    [
        {"digest": "sha1"},
        {"attributes": False},
        {"sid": "subject_key_identifier"},
        {"digest": "sha1", "attributes": False, "sid": "subject_key_identifier"},
    ],
)
def test_signer_identification_digests_and_attributes_windows_may_use(
    old: tuple[x509.Certificate, rsa.RSAPrivateKey], new_key: rsa.RSAPrivateKey, variant: dict[str, Any]
) -> None:
    cert, key = old
    request = pki.load_renewal_request(signed_data(_csr(new_key), cert, key, **variant), cert)
    assert request.public_key.public_numbers() == new_key.public_key().public_numbers()


def test_the_user_triggered_form_carries_the_pkcs10_in_base64(
    old: tuple[x509.Certificate, rsa.RSAPrivateKey], new_key: rsa.RSAPrivateKey
) -> None:
    cert, key = old
    encoded = base64.encodebytes(_csr(new_key))  # with line breaks, as base64 tools write it
    request = pki.load_renewal_request(signed_data(encoded, cert, key), cert)
    assert request.public_key.public_numbers() == new_key.public_key().public_numbers()


def test_a_signature_by_another_certificate_is_refused(
    ca: tuple[x509.Certificate, rsa.RSAPrivateKey],
    old: tuple[x509.Certificate, rsa.RSAPrivateKey],
    new_key: rsa.RSAPrivateKey,
) -> None:
    other_cert, other_key = _device(ca)
    cert, _ = old
    token = signed_data(_csr(new_key), other_cert, other_key)
    with pytest.raises(pki.RenewalRequestError, match="not signed by the certificate presented"):
        pki.load_renewal_request(token, cert)


def test_a_forged_signature_naming_the_right_certificate_is_refused(
    ca: tuple[x509.Certificate, rsa.RSAPrivateKey],
    old: tuple[x509.Certificate, rsa.RSAPrivateKey],
    new_key: rsa.RSAPrivateKey,
) -> None:
    # Someone with the certificate (public) but not its key.
    cert, _ = old
    token = signed_data(_csr(new_key), cert, pki.generate_rsa_key())
    with pytest.raises(pki.RenewalRequestError, match="signature does not verify"):
        pki.load_renewal_request(token, cert)


def test_content_swapped_after_signing_is_refused(
    old: tuple[x509.Certificate, rsa.RSAPrivateKey], new_key: rsa.RSAPrivateKey
) -> None:
    cert, key = old
    genuine = _csr(new_key)
    other = _csr(pki.generate_rsa_key())
    token = signed_data(other, cert, key, message_digest=hashlib.sha256(genuine).digest())
    with pytest.raises(pki.RenewalRequestError, match="message digest does not match"):
        pki.load_renewal_request(token, cert)


@pytest.mark.parametrize(
    ("token", "message"),
    [
        (b"", "empty"),
        (b"\x30\x03\x02\x01\x01", "not a PKCS#7"),
        (b"x" * (128 * 1024 + 1), "too large"),
        (cms.ContentInfo({"content_type": "data", "content": b"abc"}).dump(), "not signed data"),
    ],
)
def test_what_is_not_a_signed_pkcs7_is_refused(
    old: tuple[x509.Certificate, rsa.RSAPrivateKey], token: bytes, message: str
) -> None:
    with pytest.raises(pki.RenewalRequestError, match=message):
        pki.load_renewal_request(token, old[0])


@pytest.mark.parametrize(
    ("variant", "message"),
    [
        ({"digest": "md5"}, "unsupported PKCS#7 digest"),
        ({"content_type": "signed_data"}, "content type data"),
        ({"signers": 2}, "exactly one is required"),
    ],
)
def test_odd_signed_data_is_refused(
    old: tuple[x509.Certificate, rsa.RSAPrivateKey],
    new_key: rsa.RSAPrivateKey,
    variant: dict[str, Any],
    message: str,
) -> None:
    cert, key = old
    with pytest.raises(pki.RenewalRequestError, match=message):
        pki.load_renewal_request(signed_data(_csr(new_key), cert, key, **variant), cert)


def test_a_signed_content_that_is_no_pkcs10_is_refused(
    old: tuple[x509.Certificate, rsa.RSAPrivateKey],
) -> None:
    cert, key = old
    with pytest.raises(pki.RenewalRequestError, match="neither a DER nor a base64"):
        pki.load_renewal_request(signed_data(b"hello!", cert, key), cert)
    with pytest.raises(pki.CSRError):
        pki.load_renewal_request(signed_data(b"\x30\x00", cert, key), cert)


def test_garbage_never_escapes_as_another_exception(old: tuple[x509.Certificate, rsa.RSAPrivateKey]) -> None:
    cert, key = old
    genuine = signed_data(b"\x30\x00", cert, key)
    for cut in range(1, len(genuine), 37):
        with pytest.raises((pki.RenewalRequestError, pki.CSRError)):
            pki.load_renewal_request(genuine[:cut], cert)
    flipped = bytearray(genuine)
    for i in range(0, len(flipped), 53):
        flipped[i] ^= 0xFF
        with pytest.raises((pki.RenewalRequestError, pki.CSRError)):
            pki.load_renewal_request(bytes(flipped), cert)
        flipped[i] ^= 0xFF


# --- the window ---

POLICY = RenewalPolicy(renew_period_days=42, retry_days=7, grace_days=0)
END = NOW.timestamp() + 365 * DAY


def _problem(now: float, **changes: Any) -> str | None:
    values: dict[str, Any] = {
        "issued_by_mdmd": True,
        "revoked": None,
        "device_enrolled": True,
        "not_after": END,
        "now": now,
        "policy": POLICY,
    }
    values.update(changes)
    return renewal_problem(**values)


def test_the_window_opens_renew_period_days_before_the_end_and_closes_at_it() -> None:
    opens, closes = POLICY.window(END)
    assert opens == END - 42 * DAY - CLOCK_ALLOWANCE
    assert closes == END
    assert _problem(END - 42 * DAY) is None
    assert _problem(END - 42 * DAY - CLOCK_ALLOWANCE) is None  # a device clock running ahead
    assert _problem(END) is None
    assert _problem(END - 1) is None
    early = _problem(END - 42 * DAY - CLOCK_ALLOWANCE - 1)
    assert early is not None and early.startswith("outside the renewal window: it opens 2030-")
    late = _problem(END + 1)
    assert late is not None and "certificate ended 2031-01-01T00:00:00Z" in late


def test_the_grace_keeps_the_window_open_after_the_end() -> None:
    graced = RenewalPolicy(renew_period_days=42, retry_days=7, grace_days=3)
    assert graced.window(END)[1] == END + 3 * DAY
    assert _problem(END + 3 * DAY, policy=graced) is None
    late = _problem(END + 3 * DAY + 1, policy=graced)
    assert late is not None and "3-day grace closed" in late


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"issued_by_mdmd": False}, "not a certificate mdmd issued"),
        ({"revoked": "superseded"}, "certificate revoked (superseded)"),
        ({"device_enrolled": False}, "device not enrolled"),
        # The first failing check is the one named.
        ({"revoked": "renewed", "device_enrolled": False}, "certificate revoked (renewed)"),
    ],
)
def test_each_refusal_names_the_check_that_failed(changes: dict[str, Any], reason: str) -> None:
    assert _problem(END - DAY, **changes) == reason


def test_a_refusal_is_the_not_eligible_to_renew_fault() -> None:
    fault = not_eligible("device not enrolled")
    assert fault.errortype == ErrorType.NOT_ELIGIBLE_TO_RENEW
    assert str(fault.errortype) == "NotEligibleToRenew"
    assert fault.code is FaultCode.AUTHORIZATION
    assert "device not enrolled" in fault.reason


def test_renewals_are_served_by_discovery_on_the_management_listener() -> None:
    url = "https://mdm.example.com:8444/api/mdm/microsoft/management"
    assert renewal_server_url(url) == "https://mdm.example.com:8444/api/mdm/microsoft/discovery"


# --- what an administrator sees ---


def test_renewal_status_over_a_certificates_life() -> None:
    issued = END - 365 * DAY
    assert renewal_status(not_after=None, renewed_at=None, now=issued, policy=POLICY).state == "none"
    assert renewal_status(not_after=END, renewed_at=None, now=issued, policy=POLICY).state == "none"
    renewed = renewal_status(not_after=END, renewed_at=issued, now=issued + DAY, policy=POLICY)
    assert (renewed.state, renewed.renewed_at, renewed.reason) == ("renewed", issued, None)
    # Inside the window, within the first retry interval: Windows may still be at it.
    assert renewal_status(not_after=END, renewed_at=None, now=END - 40 * DAY, policy=POLICY).state == "none"
    overdue = renewal_status(not_after=END, renewed_at=None, now=END - 34 * DAY, policy=POLICY)
    assert overdue.state == "failed" and overdue.reason is not None
    assert "in its renewal window since 2030-11-20" in overdue.reason and "every 7 days" in overdue.reason
    ended = renewal_status(not_after=END, renewed_at=issued, now=END + 1, policy=POLICY)
    assert (
        ended.state == "failed" and ended.reason == "certificate ended 2031-01-01T00:00:00Z without renewal"
    )
    assert ended.renewed_at == issued


def test_certificate_dates_come_from_the_callers_clock(
    ca: tuple[x509.Certificate, rsa.RSAPrivateKey],
) -> None:
    later = NOW + timedelta(days=400)
    cert = pki.issue_device_certificate(*ca, pki.generate_rsa_key().public_key(), "D", days=10, now=later)
    assert cert.not_valid_before_utc == later - timedelta(minutes=5)
    assert cert.not_valid_after_utc == later - timedelta(minutes=5) + timedelta(days=10)
