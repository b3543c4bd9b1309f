"""mdmd.provisioning: the wap-provisioningdoc returned by enrollment (MS-MDE2 2.2.9)."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from lxml import etree

from mdmd.provisioning import (
    DEFAULT_ENCODING,
    PollSchedule,
    ProvisioningDocParams,
    RenewalSettings,
    build_provisioning_doc,
    build_renewal_provisioning_doc,
    cert_thumbprint,
)
from mdmd.xmlsafe import parse_untrusted_xml

MANAGEMENT_URL = "https://mdm.example.com/ManagementServer/MDM.svc"
NONCE = base64.b64encode(b"0123456789abcdef").decode()
DEVICE_ID = "B5B954E81FBCB94EB79BD08BE625F4EE"
# tests/data/windows/SOURCES.md: SHA-1 of the POC certificate that a real Windows 10 accepted.
POC_THUMBPRINT = "8F2EBD13F3612D7C48C30E24CC73A88492613849"


def _self_signed(common_name: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="module")
def root_der() -> bytes:
    return _self_signed("mdmd test root")


@pytest.fixture(scope="module")
def intermediate_der() -> bytes:
    return _self_signed("mdmd test intermediate")


@pytest.fixture(scope="module")
def device_der(windows_fixtures: Path) -> bytes:
    return (windows_fixtures / "poc-issued-device-cert-accepted-by-w10.der").read_bytes()


@pytest.fixture
def params(root_der: bytes, device_der: bytes) -> ProvisioningDocParams:
    return ProvisioningDocParams(
        ca_certs_der=[root_der],
        device_cert_der=device_der,
        enrollment_type="Full",
        management_url=MANAGEMENT_URL,
        provider_id="mdmd",
        provider_name="mdmd MDM",
        device_id=DEVICE_ID,
        ent_dmid="0f3c2a10-6a3e-4c55-9d4e-1b2c3d4e5f60",
        ent_device_name="DESKTOP-28FGAI6",
        client_secret="client-secret-1",
        server_name="srv-name",
        server_secret="server-secret-2",
        nonce=NONCE,
    )


def char(parent: etree._Element, *path: str) -> etree._Element:
    node = parent
    for type_ in path:
        found = [c for c in node if c.tag == "characteristic" and c.get("type") == type_]
        assert len(found) == 1, (path, type_)
        node = found[0]
    return node


def stores(doc: etree._Element) -> list[etree._Element]:
    return [c for c in doc if c.tag == "characteristic" and c.get("type") == "CertificateStore"]


def parms(node: etree._Element) -> list[tuple[str | None, str | None, str | None]]:
    return [(p.get("name"), p.get("value"), p.get("datatype")) for p in node if p.tag == "parm"]


def parm_value(node: etree._Element, name: str) -> str | None:
    values = [p.get("value") for p in node if p.tag == "parm" and p.get("name") == name]
    assert len(values) == 1, name
    return values[0]


def build(params: ProvisioningDocParams) -> tuple[bytes, etree._Element]:
    data = build_provisioning_doc(params)
    return data, parse_untrusted_xml(data)


def test_thumbprint_is_upper_hex_sha1(device_der: bytes) -> None:
    assert cert_thumbprint(device_der) == POC_THUMBPRINT
    assert cert_thumbprint(b"abc") == hashlib.sha1(b"abc").hexdigest().upper()


def test_document_shape(params: ProvisioningDocParams) -> None:
    data, doc = build(params)
    assert not data.startswith(b"<?xml")
    assert b"\n" not in data
    assert doc.tag == "wap-provisioningdoc" and doc.get("version") == "1.1"
    assert [c.get("type") for c in doc] == [
        "CertificateStore",
        "CertificateStore",
        "APPLICATION",
        "DMClient",
    ]


def test_certificate_stores_full_enrollment(
    params: ProvisioningDocParams, root_der: bytes, device_der: bytes
) -> None:
    _, doc = build(params)
    root_store, my_store = stores(doc)
    root_node = char(root_store, "Root", "System")
    root_thumb = hashlib.sha1(root_der).hexdigest().upper()
    assert parms(char(root_node, root_thumb)) == [
        ("EncodedCertificate", base64.b64encode(root_der).decode(), None)
    ]
    user = char(my_store, "My", "User")
    assert [c.get("type") for c in user] == [POC_THUMBPRINT, "PrivateKeyContainer"]
    encoded = parm_value(char(user, POC_THUMBPRINT), "EncodedCertificate")
    assert encoded is not None and base64.b64decode(encoded, validate=True) == device_der
    assert len(char(user, "PrivateKeyContainer")) == 0
    assert [c.get("type") for c in char(my_store, "My")] == ["User"]  # no WSTEP


def test_device_enrollment_uses_my_system(params: ProvisioningDocParams) -> None:
    _, doc = build(dataclasses.replace(params, enrollment_type="Device"))
    my = char(stores(doc)[1], "My")
    assert [c.get("type") for c in my] == ["System"]
    assert [c.get("type") for c in char(my, "System")] == [POC_THUMBPRINT, "PrivateKeyContainer"]
    criteria = parm_value(char(doc, "APPLICATION"), "SSLCLIENTCERTSEARCHCRITERIA")
    assert criteria == f"Subject=CN%3D{DEVICE_ID}&Stores=My%5CSystem"


def test_intermediate_goes_to_ca_store(
    params: ProvisioningDocParams, root_der: bytes, intermediate_der: bytes
) -> None:
    _, doc = build(dataclasses.replace(params, ca_certs_der=[root_der, intermediate_der]))
    root_store, ca_store, _my = stores(doc)
    assert [c.get("type") for c in char(root_store, "Root", "System")] == [cert_thumbprint(root_der)]
    ca_system = char(ca_store, "CA", "System")
    assert [c.get("type") for c in ca_system] == [cert_thumbprint(intermediate_der)]


def test_no_renewal_is_advertised_without_settings(params: ProvisioningDocParams) -> None:
    data, doc = build(params)
    assert b"WSTEP" not in data and b"ROBOSupport" not in data and b"RenewPeriod" not in data
    assert not [c for c in doc.iter("characteristic") if c.get("type") == "WSTEP"]


RENEW_URL = "https://mdm.example.com:8444/api/mdm/microsoft/discovery"


@pytest.mark.parametrize("enrollment_type", ["Full", "Device"])
def test_renewal_is_advertised_under_my_wstep_renew(
    params: ProvisioningDocParams, enrollment_type: Any
) -> None:
    renewal = RenewalSettings(renew_period_days=42, retry_interval_days=7, server_url=RENEW_URL)
    _, doc = build(dataclasses.replace(params, renewal=renewal, enrollment_type=enrollment_type))
    my = char(stores(doc)[1], "My")
    store = "User" if enrollment_type == "Full" else "System"
    assert [c.get("type") for c in my] == [store, "WSTEP"]
    assert parms(char(my, "WSTEP", "Renew")) == [
        ("ROBOSupport", "true", "boolean"),
        ("RenewPeriod", "42", "integer"),
        ("RetryInterval", "7", "integer"),
        ("ServerURL", RENEW_URL, "string"),
    ]
    # Renewal needs EntDMID set by the enrollment (MS-MDE2 2.2.9.3).
    assert parm_value(char(doc, "DMClient", "Provider", "mdmd"), "EntDMID")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"renew_period_days": 0},
        {"renew_period_days": 1001},
        {"retry_interval_days": 0},
        {"renew_period_days": 5, "retry_interval_days": 6},
        {"renew_period_days": True},
        {"server_url": "http://mdm.example.com/discovery"},
    ],
)
def test_renewal_settings_stay_within_the_csp_limits(kwargs: dict[str, Any]) -> None:
    values: dict[str, Any] = {"renew_period_days": 42, "retry_interval_days": 7, "server_url": RENEW_URL}
    with pytest.raises(ValueError):
        RenewalSettings(**{**values, **kwargs})


@pytest.mark.parametrize(("enrollment_type", "store"), [("Full", "User"), ("Device", "System")])
def test_renewal_document_carries_the_new_certificate_only(
    device_der: bytes, enrollment_type: Any, store: str
) -> None:
    data = build_renewal_provisioning_doc(device_der, enrollment_type)
    doc = parse_untrusted_xml(data)
    assert doc.tag == "wap-provisioningdoc" and doc.get("version") == "1.1"
    assert [c.get("type") for c in doc] == ["CertificateStore"]
    assert [c.get("type") for c in char(doc, "CertificateStore")] == ["My"]
    assert [c.get("type") for c in char(doc, "CertificateStore", "My")] == [store]
    node = char(doc, "CertificateStore", "My", store, POC_THUMBPRINT)
    assert parms(node) == [("EncodedCertificate", base64.b64encode(device_der).decode(), None)]
    # MS-MDE2 3.5.4.1.1.2: PrivateKeyContainer inside the certificate's node.
    assert [c.get("type") for c in node if c.tag == "characteristic"] == ["PrivateKeyContainer"]
    with pytest.raises(ValueError):
        build_renewal_provisioning_doc(b"", "Full")
    with pytest.raises(ValueError):
        build_renewal_provisioning_doc(device_der, "User")  # type: ignore[arg-type]


def test_w7_application(params: ProvisioningDocParams) -> None:
    _, doc = build(params)
    application = char(doc, "APPLICATION")
    assert parms(application) == [
        ("APPID", "w7", None),
        ("PROVIDER-ID", "mdmd", None),
        ("NAME", "mdmd MDM", None),
        ("ADDR", MANAGEMENT_URL, None),
        ("CONNRETRYFREQ", "6", None),
        ("INITIALBACKOFFTIME", "30000", None),
        ("MAXBACKOFFTIME", "120000", None),
        ("BACKCOMPATRETRYDISABLED", None, None),
        ("DEFAULTENCODING", "application/vnd.syncml.dm+xml", None),
        ("SSLCLIENTCERTSEARCHCRITERIA", f"Subject=CN%3D{DEVICE_ID}&Stores=My%5CUser", None),
        ("ROLE", "32", None),
    ]
    assert DEFAULT_ENCODING == "application/vnd.syncml.dm+xml"
    backcompat = next(p for p in application if p.get("name") == "BACKCOMPATRETRYDISABLED")
    assert "value" not in backcompat.attrib
    auths = [c for c in application if c.tag == "characteristic"]
    assert [c.get("type") for c in auths] == ["APPAUTH", "APPAUTH"]
    assert parms(auths[0]) == [
        ("AAUTHLEVEL", "CLIENT", None),
        ("AAUTHTYPE", "DIGEST", None),
        ("AAUTHSECRET", "client-secret-1", None),
        ("AAUTHDATA", NONCE, None),
    ]
    assert parms(auths[1]) == [
        ("AAUTHLEVEL", "APPSRV", None),
        ("AAUTHTYPE", "DIGEST", None),
        ("AAUTHNAME", "srv-name", None),
        ("AAUTHSECRET", "server-secret-2", None),
        ("AAUTHDATA", NONCE, None),
    ]


def test_role_can_be_left_out(params: ProvisioningDocParams) -> None:
    _, doc = build(dataclasses.replace(params, role=None))
    assert "ROLE" not in [p.get("name") for p in char(doc, "APPLICATION")]


def test_dmclient_provider_and_poll(params: ProvisioningDocParams) -> None:
    _, doc = build(params)
    provider = char(doc, "DMClient", "Provider", "mdmd")
    assert parms(provider) == [
        ("EntDMID", "0f3c2a10-6a3e-4c55-9d4e-1b2c3d4e5f60", "string"),
        ("EntDeviceName", "DESKTOP-28FGAI6", "string"),
    ]
    assert parms(char(provider, "Poll")) == [
        ("IntervalForFirstSetOfRetries", "15", "integer"),
        ("NumberOfFirstRetries", "5", "integer"),
        ("IntervalForSecondSetOfRetries", "60", "integer"),
        ("NumberOfSecondRetries", "10", "integer"),
        ("IntervalForRemainingScheduledRetries", "1440", "integer"),
        ("NumberOfRemainingScheduledRetries", "0", "integer"),
        ("PollOnLogin", "true", "boolean"),
    ]


def test_custom_poll_and_no_device_name(params: ProvisioningDocParams) -> None:
    poll = PollSchedule(
        first_interval=5,
        first_retries=3,
        second_interval=0,
        second_retries=0,
        remaining_interval=2880,
        remaining_retries=0,
        poll_on_login=False,
    )
    _, doc = build(dataclasses.replace(params, poll=poll, ent_device_name=None))
    provider = char(doc, "DMClient", "Provider", "mdmd")
    assert [p.get("name") for p in provider if p.tag == "parm"] == ["EntDMID"]
    values = {name: value for name, value, _ in parms(char(provider, "Poll"))}
    assert values["IntervalForFirstSetOfRetries"] == "5"
    assert values["IntervalForRemainingScheduledRetries"] == "2880"
    assert values["PollOnLogin"] == "false"


def test_ampersand_in_url_is_escaped(params: ProvisioningDocParams) -> None:
    url = "https://mdm.example.com/mdm?a=1&b=<2>"
    data, doc = build(dataclasses.replace(params, management_url=url))
    assert b'value="https://mdm.example.com/mdm?a=1&amp;b=&lt;2&gt;"' in data
    assert parm_value(char(doc, "APPLICATION"), "ADDR") == url


def test_search_criteria_escapes_subject(params: ProvisioningDocParams) -> None:
    _, doc = build(dataclasses.replace(params, device_id="dev id/1,x"))
    criteria = parm_value(char(doc, "APPLICATION"), "SSLCLIENTCERTSEARCHCRITERIA")
    assert criteria == "Subject=CN%3Ddev%20id%2F1%2Cx&Stores=My%5CUser"


@pytest.mark.parametrize(
    "name", ['Kim\'s "PC" & <lab>', "tab\there\r\nnewline", "caf\u00e9 \U0001f600", "\ue000x\ue000"]
)
def test_each_devices_values_are_escaped_like_any_attribute(params: ProvisioningDocParams, name: str) -> None:
    # The document is built once per configuration and each device's values
    # joined in: they must read back exactly, whatever they hold.
    changed = dataclasses.replace(params, ent_device_name=name, client_secret=name, server_name=name)
    _, doc = build(changed)
    assert parm_value(char(doc, "DMClient", "Provider", "mdmd"), "EntDeviceName") == name
    auth = [c for c in char(doc, "APPLICATION") if c.get("type") == "APPAUTH"]
    assert [parm_value(a, "AAUTHSECRET") for a in auth] == [name, params.server_secret]
    assert parm_value(auth[1], "AAUTHNAME") == name
    # The configuration's parts are the same as for any other device.
    _, plain = build(params)
    assert parm_value(char(plain, "DMClient", "Provider", "mdmd"), "EntDeviceName") == params.ent_device_name
    assert [etree.tostring(s) for s in stores(doc)] == [etree.tostring(s) for s in stores(plain)]


def test_a_device_name_xml_cannot_hold_is_refused(params: ProvisioningDocParams) -> None:
    with pytest.raises(ValueError):
        build_provisioning_doc(dataclasses.replace(params, ent_device_name="bad\x01name"))


# ---------------------------------------------------------------- validation


def test_default_poll_schedule_is_valid() -> None:
    PollSchedule().validate()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"first_retries": 0},
        {"remaining_interval": 60},
        {"remaining_interval": 1439},
        {"first_interval": -1},
        {"second_retries": True},
        {
            "first_interval": 0,
            "first_retries": 0,
            "second_interval": 0,
            "second_retries": 0,
            "remaining_interval": 0,
            "remaining_retries": 0,
        },
    ],
)
def test_invalid_poll_schedules(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        PollSchedule(**kwargs)


def test_remaining_interval_may_be_disabled() -> None:
    PollSchedule(remaining_interval=0, remaining_retries=0).validate()


@pytest.mark.parametrize(
    "changes",
    [
        {"enrollment_type": "User"},
        {"ca_certs_der": []},
        {"ca_certs_der": [b""]},
        {"device_cert_der": b""},
        {"provider_id": ""},
        {"provider_id": "a/b"},
        {"management_url": ""},
        {"ent_dmid": ""},
        {"client_secret": ""},
        {"nonce": "not base64!"},
    ],
)
def test_invalid_params(params: ProvisioningDocParams, changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        dataclasses.replace(params, **changes)


def test_params_repr_hides_secrets(params: ProvisioningDocParams) -> None:
    text = repr(params)
    assert "client-secret-1" not in text and "server-secret-2" not in text
