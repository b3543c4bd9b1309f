"""Windows MDM enrollment end to end, over real TLS against the real daemon:
orbit enroll -> config -> discovery -> policy -> enroll -> mutual TLS to the
management listener with the issued certificate -> config again.  Also
re-enrollment, a new MDM device ID on the same host, and the captured Windows
requests of tests/data/windows posted as they are."""

from __future__ import annotations

import base64
import json
import re
import ssl
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from lxml import etree

from enrollment_helpers import (
    ACTION_DISCOVER_RESPONSE,
    ACTION_GET_POLICIES_RESPONSE,
    ACTION_RSTRC,
    BASE64_ENCODING,
    DEVICE_ENROLLMENT_TOKEN,
    DIAGNOSTICS,
    DISCOVERY,
    DISCOVERY_PATH,
    ENROLL_PATH,
    POLICY_PATH,
    PROVISION_DOC,
    S12,
    SYNCML_CONTENT_TYPE,
    WSSE,
    WST,
    WSTEP,
    WSU,
    XCEP,
    XSI,
    Answer,
    LogWatch,
    access_line,
    bst_security,
    characteristic,
    characteristics,
    client_context,
    db_rows,
    enrollment_token,
    fixture_request,
    host_id,
    message_id_of,
    orbit_config,
    orbit_enroll,
    parm_datatypes,
    parms,
    parse_xml,
    post_soap,
    provisioning_doc,
    q,
    request,
    row_counts,
)
from harness import Daemon, running_daemon
from mdmd import pki
from mdmd.sim.device import WindowsDevice

PROVIDER_ID = "mdmd-e2e"
CERT_DAYS = 30
POLL = {
    "IntervalForFirstSetOfRetries": "10",
    "NumberOfFirstRetries": "3",
    "IntervalForSecondSetOfRetries": "120",
    "NumberOfSecondRetries": "4",
    "IntervalForRemainingScheduledRetries": "2880",
    "NumberOfRemainingScheduledRetries": "0",
    "PollOnLogin": "false",
}
REAL_W10_DEVICE_ID = "B5B954E81FBCB94EB79BD08BE625F4EE"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, store_backend: str) -> Iterator[Daemon]:
    overrides = {
        "management": {
            "poll_schedule": "10x3 120x4 2880x0",
            "poll_on_login": "no",
            "provider_id": PROVIDER_ID,
            "provider_name": "mdmd e2e",
        },
        "wstep": {"device_cert_days": str(CERT_DAYS), "renew_period_days": "10", "renew_retry_days": "3"},
    }
    with running_daemon(tmp_path_factory.mktemp("e2e"), overrides, store=store_backend) as d:
        yield d


@pytest.fixture(scope="module")
def device_key() -> rsa.RSAPrivateKey:
    # Generated once for the module: RSA key generation is slow.
    return pki.generate_rsa_key()


@pytest.fixture(scope="module")
def identity_ca(daemon: Daemon) -> x509.Certificate:
    return x509.load_pem_x509_certificate((daemon.state / "wstep-identity.pem").read_bytes())


# ---------------------------------------------------------------------------
# checks shared by the tests
# ---------------------------------------------------------------------------


def sha1_hex(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA1()).hex().upper()


def check_soap_answer(answer: Answer, action: str, message_id: str) -> None:
    assert answer.status == 200, answer.body
    assert answer.media_type == "application/soap+xml"
    # One message with Content-Length, never chunked (docs/windows-clients.md).
    assert answer.transfer_encoding is None and answer.content_length == str(len(answer.body))
    assert answer.fault is None, answer.fault
    assert answer.action == action
    assert answer.relates_to == message_id
    activity = answer.header(DIAGNOSTICS, "ActivityId")
    assert activity is not None and activity.get("CorrelationId")


def check_discover_response(daemon: Daemon, answer: Answer, message_id: str, version: str) -> None:
    check_soap_answer(answer, ACTION_DISCOVER_RESPONSE, message_id)
    response = answer.body_child()
    assert response.tag == q(DISCOVERY, "DiscoverResponse")
    result = response.find(q(DISCOVERY, "DiscoverResult"))
    assert result is not None
    values = {child.tag: (child.text or "").strip() for child in result}
    base = daemon.url("enrollment")
    assert values == {
        q(DISCOVERY, "AuthPolicy"): "OnPremise",
        q(DISCOVERY, "EnrollmentVersion"): version,
        q(DISCOVERY, "EnrollmentPolicyServiceUrl"): base + POLICY_PATH,
        q(DISCOVERY, "EnrollmentServiceUrl"): base + ENROLL_PATH,
    }
    # Both services on this server, same host name (docs/windows-clients.md).
    for url in (base + POLICY_PATH, base + ENROLL_PATH):
        assert urlsplit(url).scheme == "https"
        assert urlsplit(url).netloc == urlsplit(base).netloc


def check_policy_response(answer: Answer, message_id: str) -> None:
    check_soap_answer(answer, ACTION_GET_POLICIES_RESPONSE, message_id)
    response = answer.body_child()
    assert response.tag == q(XCEP, "GetPoliciesResponse")
    assert [c.tag for c in response] == [q(XCEP, "response"), q(XCEP, "cAs"), q(XCEP, "oIDs")]
    policies = response.findall(f"{q(XCEP, 'response')}/{q(XCEP, 'policies')}/{q(XCEP, 'policy')}")
    assert len(policies) == 1
    attributes = policies[0].find(q(XCEP, "attributes"))
    assert attributes is not None
    assert attributes.findtext(f"{q(XCEP, 'privateKeyAttributes')}/{q(XCEP, 'minimalKeyLength')}") == "2048"
    assert attributes.findtext(q(XCEP, "policySchema")) == "3"
    assert attributes.findtext(f"{q(XCEP, 'certificateValidity')}/{q(XCEP, 'validityPeriodSeconds')}") == str(
        CERT_DAYS * 86400
    )
    # The hash and policy OID references point at an oID of this response.
    oids = {
        oid.findtext(q(XCEP, "oIDReferenceID")): oid
        for oid in response.iterfind(f"{q(XCEP, 'oIDs')}/{q(XCEP, 'oID')}")
    }
    hash_oid = oids[attributes.findtext(q(XCEP, "hashAlgorithmOIDReference"))]
    assert hash_oid.findtext(q(XCEP, "value")) == "2.16.840.1.101.3.4.2.1"
    assert policies[0].findtext(q(XCEP, "policyOIDReference")) in oids
    cas = response.find(q(XCEP, "cAs"))
    assert cas is not None and cas.get(q(XSI, "nil")) == "true"


def check_enrollment_answer(
    daemon: Daemon,
    answer: Answer,
    message_id: str,
    *,
    device_id: str,
    public_key: rsa.RSAPublicKey,
    identity_ca: x509.Certificate,
    store: str = "User",
) -> x509.Certificate:
    """The RSTRC and its provisioning document; the issued certificate."""
    check_soap_answer(answer, ACTION_RSTRC, message_id)
    security = answer.header(WSSE, "Security")
    assert security is not None
    assert security.find(f"{q(WSU, 'Timestamp')}/{q(WSU, 'Created')}") is not None

    rstr = answer.body_child().find(q(WST, "RequestSecurityTokenResponse"))
    assert rstr is not None
    assert rstr.findtext(q(WST, "TokenType")) == DEVICE_ENROLLMENT_TOKEN
    assert rstr.findtext(q(WSTEP, "RequestID")) == "0"
    bst, wap = provisioning_doc(answer)
    assert bst.get("ValueType") == PROVISION_DOC
    assert bst.get("EncodingType") == BASE64_ENCODING
    assert wap.tag == "wap-provisioningdoc"

    # -- certificates, each under its SHA-1 thumbprint --
    stores = [c for c in characteristics(wap) if c.get("type") == "CertificateStore"]
    root_node = next(n for n in (characteristic(s, "Root", "System") for s in stores) if n is not None)
    my_node = next(n for n in (characteristic(s, "My", store) for s in stores) if n is not None)

    def certs(node: etree._Element) -> dict[str, x509.Certificate]:
        out = {}
        for child in characteristics(node):
            if child.get("type") == "PrivateKeyContainer":
                continue
            value = parms(child)["EncodedCertificate"]
            assert value is not None and "\n" not in value
            out[child.get("type") or ""] = x509.load_der_x509_certificate(
                base64.b64decode(value, validate=True)
            )
        return out

    roots = certs(root_node)
    assert list(roots.values()) == [identity_ca]
    for thumb, cert in roots.items():
        assert thumb == sha1_hex(cert)
    mine = certs(my_node)
    assert len(mine) == 1
    thumb, cert = next(iter(mine.items()))
    assert thumb == sha1_hex(cert)
    assert characteristic(my_node, "PrivateKeyContainer") is not None

    # -- the device certificate --
    cert.verify_directly_issued_by(identity_ca)
    assert cert.public_key().public_numbers() == public_key.public_numbers()  # type: ignore[union-attr]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == device_id
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(days=CERT_DAYS)
    assert cert.not_valid_before_utc <= datetime.now(UTC)

    # -- the w7 account --
    application = characteristic(wap, "APPLICATION")
    assert application is not None
    app = parms(application)
    assert app["APPID"] == "w7"
    assert app["PROVIDER-ID"] == PROVIDER_ID
    assert app["ADDR"] == daemon.url("management")
    assert app["DEFAULTENCODING"] == "application/vnd.syncml.dm+xml"

    # -- DMClient --
    provider = characteristic(wap, "DMClient", "Provider", PROVIDER_ID)
    assert provider is not None
    assert parms(provider)["EntDMID"]
    poll = characteristic(provider, "Poll")
    assert poll is not None
    assert parms(poll) == POLL
    types = parm_datatypes(poll)
    assert types["PollOnLogin"] == "boolean"
    assert {types[name] for name in POLL if name != "PollOnLogin"} == {"integer"}

    # -- automatic renewal, at discovery on the management listener --
    management_base = daemon.url("management").removesuffix("/api/mdm/microsoft/management")
    renew = next(n for n in (characteristic(s, "My", "WSTEP", "Renew") for s in stores) if n is not None)
    assert renew is not None
    assert parms(renew) == {
        "ROBOSupport": "true",
        "RenewPeriod": "10",
        "RetryInterval": "3",
        "ServerURL": management_base + "/api/mdm/microsoft/discovery",
    }
    return cert


def check_stored(daemon: Daemon, cert: x509.Certificate, device_id: str, host: int) -> None:
    devices = db_rows(daemon, "SELECT * FROM devices WHERE device_id = ?", device_id)
    assert len(devices) == 1
    assert devices[0]["state"] == "enrolled" and devices[0]["host_id"] == host
    certs = db_rows(daemon, "SELECT * FROM certificates WHERE serial = ?", f"{cert.serial_number:x}")
    assert len(certs) == 1
    assert certs[0]["device_id"] == device_id
    assert certs[0]["thumbprint"] == sha1_hex(cert)
    assert certs[0]["revoked_at"] is None
    assert certs[0]["not_after"] == cert.not_valid_after_utc.timestamp()


def serial(cert: x509.Certificate) -> str:
    return f"{cert.serial_number:x}"


# ---------------------------------------------------------------------------
# the whole flow
# ---------------------------------------------------------------------------


def test_windows_device_enrolls_end_to_end(
    daemon: Daemon,
    device_key: rsa.RSAPrivateKey,
    identity_ca: x509.Certificate,
    tmp_path: Path,
    windows_fixtures: Path,
) -> None:
    device = WindowsDevice(key=device_key)

    # 1. the agent enrolls
    status, answer = daemon.post_json(
        "/api/fleet/orbit/enroll", device.orbit_enroll_request(daemon.enroll_secret)
    )
    assert status == 200, answer
    device.orbit_enrolled(answer)
    host = host_id(daemon, device.hardware_uuid)

    # 2. its config says: enroll in MDM, here
    status, config = daemon.post_json("/api/fleet/orbit/config", device.orbit_config_request())
    assert status == 200
    discovery_url = device.discovery_endpoint(config)
    assert discovery_url == daemon.url("enrollment") + DISCOVERY_PATH
    path = urlsplit(discovery_url).path

    # 3. Windows probes discovery with a GET, then posts Discover
    response, body = request(daemon, "GET", path, None, None)
    assert response.status == 200 and body == b""
    assert response.getheader("Content-Length") == "0"
    discover = device.discover_request(discovery_url)
    answer_d = post_soap(daemon, path, discover)
    check_discover_response(daemon, answer_d, message_id_of(discover), "4.0")
    policy_url, enrollment_url = device.discover_result(answer_d.body)

    # 4. policy
    get_policies = device.get_policies_request(policy_url)
    answer_p = post_soap(daemon, urlsplit(policy_url).path, get_policies)
    check_policy_response(answer_p, message_id_of(get_policies))

    # 5. enrollment with the device's fresh key; stored before the answer
    before = row_counts(daemon)
    rst = device.enroll_request(enrollment_url)
    answer_e = post_soap(daemon, urlsplit(enrollment_url).path, rst)
    cert = check_enrollment_answer(
        daemon,
        answer_e,
        message_id_of(rst),
        device_id=device.device_id,
        public_key=device_key.public_key(),
        identity_ca=identity_ca,
    )
    after = row_counts(daemon)
    assert after == dict(before, devices=before["devices"] + 1, certificates=before["certificates"] + 1)
    check_stored(daemon, cert, device.device_id, host)
    stored = db_rows(daemon, "SELECT * FROM devices WHERE device_id = ?", device.device_id)[0]
    assert stored["hw_dev_id"] == device.hw_dev_id
    assert stored["enrollment_type"] == "Full"
    assert stored["device_name"] == device.hostname
    # The simulator's own reading of the answer agrees.
    result = device.enrolled(answer_e.body)
    assert result.certificate == cert and result.provider_id == PROVIDER_ID

    # 6. mutual TLS to the management listener with the issued certificate
    management = urlsplit(result.management_url)
    body = fixture_request(
        windows_fixtures,
        "syncml-session-start.xml",
        SERVER_URL=f"{management.scheme}://{management.netloc}",
        DEVICE_ID=device.device_id,
    )
    conn = daemon.https("management", client_context(daemon, tmp_path, cert, device_key))
    try:
        conn.connect()
        tls = conn.sock
        assert isinstance(tls, ssl.SSLSocket)
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
        assert tls.getpeercert() is not None
        conn.request(
            "POST",
            management.path + "?mode=Maintenance&Platform=WoA",
            body,
            {"Content-Type": SYNCML_CONTENT_TYPE, "User-Agent": "MSFT OMA DM Client/1.2.0.1"},
        )
        response = conn.getresponse()
        reply = response.read()
    finally:
        conn.close()
    # The server read the request and answered: the handshake with the
    # issued certificate succeeded.  (501 while the OMA-DM endpoint was not
    # served yet; once it is, the answer is SyncML.)
    assert response.status in (200, 501), (response.status, reply)
    if response.status == 200:
        assert response.getheader("Content-Type", "").startswith(SYNCML_CONTENT_TYPE)
        assert parse_xml(reply).tag == "{SYNCML:SYNCML1.2}SyncML"

    # 7. the config no longer asks for enrollment
    status, config = daemon.post_json("/api/fleet/orbit/config", device.orbit_config_request())
    assert status == 200
    assert config == {"notifications": {}}


def _agent_enrolled(daemon: Daemon, device: WindowsDevice) -> None:
    status, answer = daemon.post_json(
        "/api/fleet/orbit/enroll", device.orbit_enroll_request(daemon.enroll_secret)
    )
    assert status == 200
    device.orbit_enrolled(answer)


def _enroll(daemon: Daemon, device: WindowsDevice) -> tuple[Answer, bytes]:
    rst = device.enroll_request(daemon.url("enrollment") + ENROLL_PATH)
    return post_soap(daemon, ENROLL_PATH, rst), rst


def _enroll_checked(daemon: Daemon, device: WindowsDevice, identity_ca: x509.Certificate) -> x509.Certificate:
    """Enroll *device* and check the answer completely; the issued certificate."""
    answer, rst = _enroll(daemon, device)
    return check_enrollment_answer(
        daemon,
        answer,
        message_id_of(rst),
        device_id=device.device_id,
        public_key=device.key.public_key(),
        identity_ca=identity_ca,
    )


def test_reenrollment_revokes_the_old_certificate(
    daemon: Daemon, device_key: rsa.RSAPrivateKey, identity_ca: x509.Certificate
) -> None:
    device = WindowsDevice(key=device_key)
    _agent_enrolled(daemon, device)
    host = host_id(daemon, device.hardware_uuid)

    first = _enroll_checked(daemon, device, identity_ca)
    before = row_counts(daemon)

    # Same DeviceID again (Windows re-enrolls after a reset of its MDM state).
    second = _enroll_checked(daemon, device, identity_ca)
    assert serial(second) != serial(first)
    assert row_counts(daemon) == dict(before, certificates=before["certificates"] + 1)
    old = db_rows(daemon, "SELECT * FROM certificates WHERE serial = ?", serial(first))[0]
    assert old["revoked_at"] is not None and old["revoke_reason"] == "superseded"
    check_stored(daemon, second, device.device_id, host)


def test_new_device_id_on_the_same_host_unenrolls_the_first(
    daemon: Daemon, device_key: rsa.RSAPrivateKey, identity_ca: x509.Certificate
) -> None:
    device = WindowsDevice(key=device_key)
    _agent_enrolled(daemon, device)
    host = host_id(daemon, device.hardware_uuid)
    first_answer, _ = _enroll(daemon, device)
    assert first_answer.fault is None
    first_id = device.device_id
    first_serials = provisioning_cert_serials(daemon, first_id)
    assert len(first_serials) == 1

    # Windows reinstalled: same agent (same node key), a new MDM DeviceID.
    second_key = pki.generate_rsa_key()
    device.key = second_key
    device.device_id = uuid.uuid4().hex.upper()
    second = _enroll_checked(daemon, device, identity_ca)
    old = db_rows(daemon, "SELECT * FROM devices WHERE device_id = ?", first_id)[0]
    assert old["state"] == "unenrolled" and old["unenrolled_at"] is not None
    for row in db_rows(daemon, "SELECT * FROM certificates WHERE device_id = ?", first_id):
        assert row["revoked_at"] is not None, row["serial"]
    check_stored(daemon, second, device.device_id, host)
    enrolled = db_rows(daemon, "SELECT device_id FROM devices WHERE host_id = ? AND state = 'enrolled'", host)
    assert [r["device_id"] for r in enrolled] == [device.device_id]
    status, config = orbit_config(daemon, device.node_key or "")
    assert status == 200 and config == {"notifications": {}}


def provisioning_cert_serials(daemon: Daemon, device_id: str) -> list[str]:
    return [
        r["serial"] for r in db_rows(daemon, "SELECT serial FROM certificates WHERE device_id = ?", device_id)
    ]


# ---------------------------------------------------------------------------
# captured Windows requests, posted as they are
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "version"),
    [("discover-request.xml", "4.0"), ("real-w10-19043-discover-request.xml", "4.0")],
)
def test_fixture_discover_requests_are_answered(
    daemon: Daemon, windows_fixtures: Path, name: str, version: str
) -> None:
    body = fixture_request(windows_fixtures, name, SERVER_URL=daemon.url("enrollment"))
    answer = post_soap(daemon, DISCOVERY_PATH, body)
    check_discover_response(daemon, answer, message_id_of(body), version)


def test_fixture_getpolicies_request_is_answered(daemon: Daemon, windows_fixtures: Path) -> None:
    _, key = orbit_enroll(daemon)
    body = fixture_request(
        windows_fixtures,
        "getpolicies-request.xml",
        SERVER_URL=daemon.url("enrollment"),
        TOKEN=enrollment_token(key),
    )
    answer = post_soap(daemon, POLICY_PATH, body)
    check_policy_response(answer, message_id_of(body))


def test_fixture_enroll_request_enrolls(
    daemon: Daemon, windows_fixtures: Path, identity_ca: x509.Certificate
) -> None:
    hardware_uuid, key = orbit_enroll(daemon)
    device_id = "5E1C4B8A3F0D4B5A9C2E7A1B2C3D4E5F"
    hw_dev_id = "3B3ED6D0EA88CBFCF37D36F90F22FE61172348C0162FC3840D6703149870CE76"
    body = fixture_request(
        windows_fixtures,
        "enroll-request.xml",
        SERVER_URL=daemon.url("enrollment"),
        TOKEN=enrollment_token(key),
        DEVICE_ID=device_id,
        HW_DEV_ID=hw_dev_id,
    )
    csr = x509.load_der_x509_csr((windows_fixtures / "windows-csr.der").read_bytes())
    answer = post_soap(daemon, ENROLL_PATH, body)
    cert = check_enrollment_answer(
        daemon,
        answer,
        message_id_of(body),
        device_id=device_id,
        public_key=csr.public_key(),  # type: ignore[arg-type]
        identity_ca=identity_ca,
    )
    check_stored(daemon, cert, device_id, host_id(daemon, hardware_uuid))
    row = db_rows(daemon, "SELECT * FROM devices WHERE device_id = ?", device_id)[0]
    assert row["hw_dev_id"] == hw_dev_id and row["device_name"] == "DESKTOP-H1T20J1"
    assert row["os_version"] == "10.0.22598.1"


_USERNAME_TOKEN = re.compile(r"<wsse:UsernameToken\b.*?</wsse:UsernameToken>", re.S)


def test_real_w10_enroll_request_as_captured_gets_an_authentication_fault(
    daemon: Daemon, windows_fixtures: Path
) -> None:
    # Captured from an OnPremise (user name + password) enrollment: no
    # DeviceEnrollmentUserToken at all.
    body = fixture_request(windows_fixtures, "real-w10-19043-enroll-rst-pkcs10-request.xml")
    assert _USERNAME_TOKEN.search(body.decode()) and b"DeviceEnrollmentUserToken" not in body
    before = row_counts(daemon)
    watch = LogWatch(daemon)
    answer = post_soap(daemon, ENROLL_PATH, body)
    assert answer.status == 200 and answer.media_type == "application/soap+xml"
    fault = answer.fault
    assert fault is not None
    assert fault.subcode == (S12, "Authentication")
    assert "UsernameToken" in fault.reason and "not supported" in fault.reason
    assert answer.relates_to == message_id_of(body)
    assert row_counts(daemon) == before
    watch.wait_for(access_line(ENROLL_PATH, 200))
    warns = watch.warn_lines()
    assert len(warns) == 1 and "s:Authentication" in warns[0]
    # The user's password never reaches the log.
    assert "demo<" not in watch.text() and "Password" not in warns[0]


def test_real_w10_enroll_request_with_a_token_enrolls(
    daemon: Daemon, windows_fixtures: Path, identity_ca: x509.Certificate
) -> None:
    # Windows 10 19043's CSR: PrintableString CN with '!' and NUL, signed
    # with the ISO sha1WithRSA OID.  With the agent's token in place of the
    # username token it must enroll.
    hardware_uuid, key = orbit_enroll(daemon)
    text = fixture_request(windows_fixtures, "real-w10-19043-enroll-rst-pkcs10-request.xml").decode()
    header = bst_security(enrollment_token(key))
    inner = header.removeprefix('<wsse:Security s:mustUnderstand="1">').removesuffix("</wsse:Security>")
    body, count = _USERNAME_TOKEN.subn(inner, text)
    assert count == 1
    poc = x509.load_der_x509_certificate(
        (windows_fixtures / "poc-issued-device-cert-accepted-by-w10.der").read_bytes()
    )
    answer = post_soap(daemon, ENROLL_PATH, body.encode())
    cert = check_enrollment_answer(
        daemon,
        answer,
        message_id_of(body.encode()),
        device_id=REAL_W10_DEVICE_ID,
        # The POC certificate Windows accepted carries the CSR's key.
        public_key=poc.public_key(),  # type: ignore[arg-type]
        identity_ca=identity_ca,
    )
    check_stored(daemon, cert, REAL_W10_DEVICE_ID, host_id(daemon, hardware_uuid))
    row = db_rows(daemon, "SELECT * FROM devices WHERE device_id = ?", REAL_W10_DEVICE_ID)[0]
    context = json.loads(row["context"])
    # All six MAC items kept, in order; no RequestVersion item was sent.
    assert [v for n, v in context if n == "MAC"] == [
        "00-0C-29-51-60-9D",
        "1A-77-20-52-41-53",
        "1A-77-20-52-41-53",
        "00-0C-29-51-60-A7",
        "18-14-20-52-41-53",
        "00-0C-29-51-60-93",
    ]
    assert row["hw_dev_id"] == "3B3ED6D0EA88CBFCF37D36F90F22FE61172348C0162FC3840D6703149870CE76"


def test_real_w10_getpolicies_with_a_username_token_gets_an_authentication_fault(
    daemon: Daemon, windows_fixtures: Path
) -> None:
    body = fixture_request(windows_fixtures, "real-w10-19043-getpolicies-usernametoken-request.xml")
    before = row_counts(daemon)
    answer = post_soap(daemon, POLICY_PATH, body)
    assert answer.status == 200 and answer.media_type == "application/soap+xml"
    fault = answer.fault
    assert fault is not None
    assert fault.subcode == (S12, "Authentication")
    assert fault.value == (S12, "Receiver")
    assert "username" in fault.reason.lower() and "UsernameToken" in fault.reason
    assert answer.relates_to == message_id_of(body) == "urn:uuid:72048B64-0F19-448F-8C2E-B4C661860AA0"
    assert row_counts(daemon) == before


def test_clones_sharing_hwdevid_are_both_kept_and_flagged(
    daemon: Daemon, device_key: rsa.RSAPrivateKey, identity_ca: x509.Certificate
) -> None:
    # Two PCs cloned without sysprep share HWDevID (docs/windows-clients.md) but have
    # their own agents and DeviceIDs; neither may take over the other.
    hw_dev_id = (uuid.uuid4().hex + uuid.uuid4().hex).upper()
    devices = [WindowsDevice(key=device_key, hw_dev_id=hw_dev_id) for _ in range(2)]
    watch = LogWatch(daemon)
    for device in devices:
        _agent_enrolled(daemon, device)
        enrolled, rst = _enroll(daemon, device)
        check_enrollment_answer(
            daemon,
            enrolled,
            message_id_of(rst),
            device_id=device.device_id,
            public_key=device_key.public_key(),
            identity_ca=identity_ca,
        )
    for device in devices:
        row = db_rows(daemon, "SELECT * FROM devices WHERE device_id = ?", device.device_id)[0]
        assert row["state"] == "enrolled" and row["hw_dev_id"] == hw_dev_id
        assert row["hw_dev_id_collision"] == 1
        active = db_rows(
            daemon,
            "SELECT serial FROM certificates WHERE device_id = ? AND revoked_at IS NULL",
            device.device_id,
        )
        assert len(active) == 1
    watch.wait_for("shares HWDevID")
    warns = [line for line in watch.warn_lines() if "HWDevID" in line]
    assert len(warns) == 1
    assert devices[0].device_id in warns[0] and devices[1].device_id in warns[0]


def test_device_id_enrolled_by_another_host_is_not_taken_over(
    daemon: Daemon, device_key: rsa.RSAPrivateKey
) -> None:
    victim, attacker = WindowsDevice(key=device_key), WindowsDevice(key=device_key)
    for device in (victim, attacker):
        _agent_enrolled(daemon, device)
    first, _ = _enroll(daemon, victim)
    assert first.fault is None
    victim_host = host_id(daemon, victim.hardware_uuid)
    attacker.device_id = victim.device_id
    second, _ = _enroll(daemon, attacker)
    # The victim keeps its enrollment and its certificate...
    row = db_rows(daemon, "SELECT * FROM devices WHERE device_id = ?", victim.device_id)[0]
    assert row["host_id"] == victim_host and row["state"] == "enrolled"
    active = db_rows(
        daemon, "SELECT serial FROM certificates WHERE device_id = ? AND revoked_at IS NULL", victim.device_id
    )
    assert len(active) == 1
    # ...and the other host is refused.
    assert second.fault is not None and second.fault.subcode == (S12, "Authorization")
