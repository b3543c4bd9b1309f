"""mdmd.policy: MS-XCEP GetPolicies as profiled by MS-MDE2 3.3."""

from __future__ import annotations

import base64
import copy
from pathlib import Path

import pytest
from lxml import etree

from mdmd.policy import (
    HASH_OID_SHA256,
    CertificatePolicy,
    GetPoliciesRequest,
    build_get_policies_response,
    parse_get_policies,
)
from mdmd.soap import (
    ACTION_DISCOVER,
    ACTION_GET_POLICIES,
    ACTION_GET_POLICIES_RESPONSE,
    SOAP12,
    WSA,
    XCEP,
    XSI,
    FaultCode,
    SoapFault,
    UsernameToken,
    parse_soap_request,
)
from mdmd.xmlsafe import parse_untrusted_xml

SERVER_URL = "https://mdm.example.com:8443"
TOKEN = base64.b64encode(b'{"type":1,"payload":{"orbit_node_key":"k"}}').decode()

# MS-XCEP 3.1.4.1.3.1, xs:sequence of Attributes.
XCEP_ATTRIBUTES_ORDER = [
    "commonName",
    "policySchema",
    "certificateValidity",
    "permission",
    "privateKeyAttributes",
    "revision",
    "supersededPolicies",
    "privateKeyFlags",
    "subjectNameFlags",
    "enrollmentFlags",
    "generalFlags",
    "hashAlgorithmOIDReference",
    "rARequirements",
    "keyArchivalAttributes",
    "extensions",
]


def load(folder: Path, name: str) -> bytes:
    text = (folder / name).read_text(encoding="utf-8")
    text = text.replace("{{SERVER_URL}}", SERVER_URL).replace("{{TOKEN}}", TOKEN)
    assert "{{" not in text
    return text.encode("utf-8")


def get_policies(inner: str, action: str = ACTION_GET_POLICIES, ns: str = XCEP) -> bytes:
    return (
        f'<s:Envelope xmlns:s="{SOAP12}" xmlns:a="{WSA}"><s:Header>'
        f'<a:Action s:mustUnderstand="1">{action}</a:Action>'
        "<a:MessageID>urn:uuid:p-1</a:MessageID></s:Header>"
        f'<s:Body xmlns:xsi="{XSI}"><GetPolicies xmlns="{ns}">{inner}</GetPolicies>'
        "</s:Body></s:Envelope>"
    ).encode()


def x(name: str) -> str:
    return f"{{{XCEP}}}{name}"


def local(element: etree._Element) -> str:
    return etree.QName(element).localname


# ---------------------------------------------------------------- parsing


def test_parse_fixture_with_tpm_extras(windows_fixtures: Path) -> None:
    req = parse_get_policies(parse_soap_request(load(windows_fixtures, "getpolicies-request.xml")))
    assert req == GetPoliciesRequest(
        last_update=None,
        preferred_language=None,
        client_extras=(("TPMManufacturer", "IBM"), ("TPMFirmwareVersion", "8217.4131.22.13878")),
    )


def test_parse_real_username_token_fixture(windows_fixtures: Path) -> None:
    soap = parse_soap_request(load(windows_fixtures, "real-w10-19043-getpolicies-usernametoken-request.xml"))
    assert parse_get_policies(soap) == GetPoliciesRequest(None, None, ())
    assert soap.security == (UsernameToken("demio", "demo"),)


def test_non_nil_client_values_are_kept() -> None:
    inner = (
        "<client><lastUpdate>2024-01-01T00:00:00Z</lastUpdate>"
        "<preferredLanguage> en-US </preferredLanguage></client>"
    )
    req = parse_get_policies(parse_soap_request(get_policies(inner)))
    assert req.last_update == "2024-01-01T00:00:00Z"
    assert req.preferred_language == "en-US"


@pytest.mark.parametrize(
    "inner", ['<requestFilter xsi:nil="true"/>', '<client xsi:nil="true"/><requestFilter/>']
)
def test_missing_or_nil_client_is_message_format(inner: str) -> None:
    with pytest.raises(SoapFault) as excinfo:
        parse_get_policies(parse_soap_request(get_policies(inner)))
    assert excinfo.value.code is FaultCode.MESSAGE_FORMAT
    assert "client" in excinfo.value.reason


def test_wrong_action_is_message_format() -> None:
    with pytest.raises(SoapFault) as excinfo:
        parse_get_policies(parse_soap_request(get_policies("<client/>", action=ACTION_DISCOVER)))
    assert excinfo.value.code is FaultCode.MESSAGE_FORMAT


def test_wrong_body_namespace_is_message_format() -> None:
    with pytest.raises(SoapFault) as excinfo:
        parse_get_policies(parse_soap_request(get_policies("<client/>", ns="urn:other")))
    assert excinfo.value.code is FaultCode.MESSAGE_FORMAT
    assert XCEP in excinfo.value.reason


# ---------------------------------------------------------------- response


def _response(policy: CertificatePolicy) -> etree._Element:
    root = parse_untrusted_xml(build_get_policies_response(policy, "urn:uuid:p-1", activity_id="act-7"))
    assert root.findtext(f"{{{SOAP12}}}Header/{{{WSA}}}Action") == ACTION_GET_POLICIES_RESPONSE
    assert root.findtext(f"{{{SOAP12}}}Header/{{{WSA}}}RelatesTo") == "urn:uuid:p-1"
    body = root.find(f"{{{SOAP12}}}Body")
    assert body is not None and body.nsmap.get("xsi") == XSI
    response = body.find(x("GetPoliciesResponse"))
    assert response is not None
    return response


def _nil(element: etree._Element | None) -> bool:
    return element is not None and element.get(f"{{{XSI}}}nil") == "true" and len(element) == 0


def test_response_structure_in_xcep_order() -> None:
    policy = CertificatePolicy(
        template_name="mdmd-device", validity_seconds=31536000, renewal_seconds=3628800
    )
    root = _response(policy)
    assert [child.tag for child in root] == [x("response"), x("cAs"), x("oIDs")]
    assert _nil(root.find(x("cAs")))

    response = root.find(x("response"))
    assert response is not None
    assert [local(c) for c in response] == [
        "policyID",
        "policyFriendlyName",
        "nextUpdateHours",
        "policiesNotChanged",
        "policies",
    ]
    for name in ("policyFriendlyName", "nextUpdateHours", "policiesNotChanged"):
        assert _nil(response.find(x(name))), name

    policies = response.findall(f"{x('policies')}/{x('policy')}")
    assert len(policies) == 1
    cert_policy = policies[0]
    assert [local(c) for c in cert_policy] == ["policyOIDReference", "cAs", "attributes"]
    assert _nil(cert_policy.find(x("cAs")))

    attributes = cert_policy.find(x("attributes"))
    assert attributes is not None
    assert [local(c) for c in attributes] == XCEP_ATTRIBUTES_ORDER
    assert attributes.findtext(x("commonName")) == "mdmd-device"
    assert attributes.findtext(x("policySchema")) == "3"
    assert attributes.findtext(f"{x('certificateValidity')}/{x('validityPeriodSeconds')}") == "31536000"
    assert attributes.findtext(f"{x('certificateValidity')}/{x('renewalPeriodSeconds')}") == "3628800"
    assert attributes.findtext(f"{x('permission')}/{x('enroll')}") == "true"
    assert attributes.findtext(f"{x('permission')}/{x('autoEnroll')}") == "false"
    key = attributes.find(x("privateKeyAttributes"))
    assert key is not None
    assert [local(c) for c in key] == [
        "minimalKeyLength",
        "keySpec",
        "keyUsageProperty",
        "permissions",
        "algorithmOIDReference",
        "cryptoProviders",
    ]
    assert key.findtext(x("minimalKeyLength")) == "2048"
    assert _nil(key.find(x("cryptoProviders")))
    assert attributes.findtext(f"{x('revision')}/{x('majorRevision')}") == "101"
    assert attributes.findtext(f"{x('revision')}/{x('minorRevision')}") == "0"
    for name in XCEP_ATTRIBUTES_ORDER[6:11] + XCEP_ATTRIBUTES_ORDER[12:]:
        assert _nil(attributes.find(x(name))), name

    # Both references resolve to the SHA-256 OID listed in oIDs, and the EKU
    # is not advertised there.
    oids = {o.findtext(x("oIDReferenceID")): o for o in root.findall(f"{x('oIDs')}/{x('oID')}")}
    assert len(oids) == 1
    hash_oid = oids[attributes.findtext(x("hashAlgorithmOIDReference"))]
    assert [local(c) for c in hash_oid] == ["value", "group", "oIDReferenceID", "defaultName"]
    assert hash_oid.findtext(x("value")) == HASH_OID_SHA256 == "2.16.840.1.101.3.4.2.1"
    assert hash_oid.findtext(x("group")) == "1"
    assert hash_oid.findtext(x("defaultName")) == "szOID_NIST_sha256"
    assert cert_policy.findtext(x("policyOIDReference")) in oids


def test_response_with_crypto_providers_and_key_size() -> None:
    policy = CertificatePolicy(
        template_name="t",
        min_key_bits=4096,
        crypto_providers=(
            "Microsoft Platform Crypto Provider",
            "Microsoft Software Key Storage Provider",
        ),
    )
    key = _response(policy).find(
        f"{x('response')}/{x('policies')}/{x('policy')}/{x('attributes')}/{x('privateKeyAttributes')}"
    )
    assert key is not None
    assert key.findtext(x("minimalKeyLength")) == "4096"
    assert [p.text for p in key.findall(f"{x('cryptoProviders')}/{x('provider')}")] == [
        "Microsoft Platform Crypto Provider",
        "Microsoft Software Key Storage Provider",
    ]


@pytest.mark.parametrize("providers", [(), ("Microsoft Software Key Storage Provider",)])
def test_response_validates_against_xcep_schema(providers: tuple[str, ...], schemas: Path) -> None:
    schema = etree.XMLSchema(etree.parse(str(schemas / "MS-XCEP_6.2_xcep.xsd")))
    element = _response(CertificatePolicy(template_name="t", crypto_providers=providers))
    assert schema.validate(etree.ElementTree(copy.deepcopy(element))), schema.error_log


@pytest.mark.parametrize(
    "kwargs",
    [
        {"template_name": ""},
        {"template_name": "t", "validity_seconds": 0},
        {"template_name": "t", "renewal_seconds": -1},
        {"template_name": "t", "min_key_bits": 0},
        {"template_name": "t", "major_revision": 0},
    ],
)
def test_invalid_certificate_policy(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        CertificatePolicy(**kwargs)  # type: ignore[arg-type]
