"""mdmd.discovery: MS-MDE2 3.1 Discover parsing, negotiation and response."""

from __future__ import annotations

import copy
from decimal import Decimal
from pathlib import Path

import pytest
from lxml import etree

from mdmd.discovery import (
    DEFAULT_MAX_VERSION,
    DiscoverRequest,
    DiscoverResponse,
    build_discover_response,
    negotiate_discover,
    parse_discover,
)
from mdmd.soap import (
    ACTION_DISCOVER,
    ACTION_DISCOVER_RESPONSE,
    ACTION_GET_POLICIES,
    DIAGNOSTICS,
    DISCOVERY,
    SOAP12,
    WSA,
    XSI,
    ErrorType,
    FaultCode,
    SoapFault,
    parse_soap_request,
)
from mdmd.xmlsafe import parse_untrusted_xml

SERVER_URL = "https://mdm.example.com:8443"
POLICY_URL = "https://mdm.example.com/EnrollmentServer/Policy.svc"
ENROLL_URL = "https://mdm.example.com/EnrollmentServer/Enrollment.svc"


def load(folder: Path, name: str) -> bytes:
    text = (folder / name).read_text(encoding="utf-8").replace("{{SERVER_URL}}", SERVER_URL)
    assert "{{" not in text
    return text.encode("utf-8")


def discover(request_children: str, ns: str = DISCOVERY, action: str = ACTION_DISCOVER) -> bytes:
    return (
        f'<s:Envelope xmlns:s="{SOAP12}" xmlns:a="{WSA}"><s:Header>'
        f'<a:Action s:mustUnderstand="1">{action}</a:Action>'
        "<a:MessageID>urn:uuid:0001</a:MessageID></s:Header><s:Body>"
        f'<Discover xmlns="{ns}"><request xmlns:i="{XSI}">{request_children}</request>'
        "</Discover></s:Body></s:Envelope>"
    ).encode()


BASE_CHILDREN = (
    "<EmailAddress>user@example.com</EmailAddress><RequestVersion>4.0</RequestVersion>"
    "<DeviceType>CIMClient_Windows</DeviceType><ApplicationVersion>10.0.19043.2364"
    "</ApplicationVersion><OSEdition>72</OSEdition>"
    "<AuthPolicies><AuthPolicy>OnPremise</AuthPolicy><AuthPolicy>Federated</AuthPolicy>"
    "</AuthPolicies>"
)


def request(version: str = "4.0", policies: tuple[str, ...] = ("OnPremise",)) -> DiscoverRequest:
    return DiscoverRequest(
        email_address="",
        request_version=Decimal(version),
        device_type="CIMClient_Windows",
        application_version="10.0.26100.1",
        os_edition=48,
        auth_policies=policies,
    )


# ---------------------------------------------------------------- parsing


def test_parse_programmatic_fixture(windows_fixtures: Path) -> None:
    req = parse_discover(parse_soap_request(load(windows_fixtures, "discover-request.xml")))
    assert req == DiscoverRequest(
        email_address="",
        request_version=Decimal("5.0"),
        device_type="CIMClient_Windows",
        application_version="6.2.9200.1",
        os_edition=48,
        auth_policies=("OnPremise", "Federated"),
    )


def test_parse_real_windows_10_fixture(windows_fixtures: Path) -> None:
    data = load(windows_fixtures, "real-w10-19043-discover-request.xml")
    req = parse_discover(parse_soap_request(data))
    assert req.email_address == "demo@fleetdm.ngrok.io"
    assert req.request_version == Decimal("4.0")
    assert req.application_version == "10.0.19043.2364"
    assert req.os_edition == 72
    assert req.auth_policies == ("OnPremise", "Federated")


def test_trailing_slash_namespace_is_accepted() -> None:
    req = parse_discover(parse_soap_request(discover(BASE_CHILDREN, ns=DISCOVERY + "/")))
    assert req.email_address == "user@example.com"


def test_children_in_any_order_with_whitespace() -> None:
    children = (
        "<AuthPolicies>\n <AuthPolicy>\n Federated \n</AuthPolicy></AuthPolicies>"
        "<OSEdition> 4 </OSEdition><RequestVersion>\n 9.0 \n</RequestVersion>"
        "<EmailAddress/><ApplicationVersion>10.0.26200.1</ApplicationVersion>"
        "<DeviceType>CIMClient_Windows</DeviceType>"
    )
    req = parse_discover(parse_soap_request(discover(children)))
    assert req.auth_policies == ("Federated",)
    assert req.os_edition == 4
    assert req.request_version == Decimal("9.0")
    assert req.email_address == ""


def test_missing_or_nil_request_version_means_1_0() -> None:
    without = BASE_CHILDREN.replace("<RequestVersion>4.0</RequestVersion>", "")
    assert parse_discover(parse_soap_request(discover(without))).request_version == Decimal("1.0")
    nil = BASE_CHILDREN.replace("<RequestVersion>4.0</RequestVersion>", '<RequestVersion i:nil="true"/>')
    assert parse_discover(parse_soap_request(discover(nil))).request_version == Decimal("1.0")


def test_missing_request_version_is_refused_by_negotiation() -> None:
    without = BASE_CHILDREN.replace("<RequestVersion>4.0</RequestVersion>", "")
    req = parse_discover(parse_soap_request(discover(without)))
    with pytest.raises(SoapFault) as excinfo:
        negotiate_discover(req, policy_url=POLICY_URL, enrollment_url=ENROLL_URL)
    assert excinfo.value.errortype == ErrorType.DEVICE_NOT_SUPPORTED


@pytest.mark.parametrize("value", ["abc", "NaN", "Infinity", "-1.0", "4.0.1"])
def test_non_decimal_request_version_is_message_format(value: str) -> None:
    children = BASE_CHILDREN.replace("4.0</RequestVersion>", f"{value}</RequestVersion>")
    with pytest.raises(SoapFault) as excinfo:
        parse_discover(parse_soap_request(discover(children)))
    assert excinfo.value.code is FaultCode.MESSAGE_FORMAT
    assert "RequestVersion" in excinfo.value.reason


def test_garbled_os_edition_is_tolerated() -> None:
    children = BASE_CHILDREN.replace("<OSEdition>72</OSEdition>", "<OSEdition>x</OSEdition>")
    assert parse_discover(parse_soap_request(discover(children))).os_edition is None


def test_wrong_namespace_is_message_format() -> None:
    with pytest.raises(SoapFault) as excinfo:
        parse_discover(parse_soap_request(discover(BASE_CHILDREN, ns="urn:wrong")))
    assert excinfo.value.code is FaultCode.MESSAGE_FORMAT
    assert "urn:wrong" in excinfo.value.reason
    assert DISCOVERY in excinfo.value.reason


def test_wrong_body_element_is_message_format() -> None:
    data = (
        discover(BASE_CHILDREN)
        .replace(b"Discover xmlns", b"Discovery xmlns")
        .replace(b"</Discover>", b"</Discovery>")
    )
    with pytest.raises(SoapFault) as excinfo:
        parse_discover(parse_soap_request(data))
    assert excinfo.value.code is FaultCode.MESSAGE_FORMAT


def test_missing_request_element_is_message_format() -> None:
    data = (
        f'<s:Envelope xmlns:s="{SOAP12}" xmlns:a="{WSA}"><s:Header>'
        f"<a:Action>{ACTION_DISCOVER}</a:Action></s:Header><s:Body>"
        f'<Discover xmlns="{DISCOVERY}"/></s:Body></s:Envelope>'
    ).encode()
    with pytest.raises(SoapFault) as excinfo:
        parse_discover(parse_soap_request(data))
    assert excinfo.value.code is FaultCode.MESSAGE_FORMAT


def test_wrong_action_is_message_format() -> None:
    with pytest.raises(SoapFault) as excinfo:
        parse_discover(parse_soap_request(discover(BASE_CHILDREN, action=ACTION_GET_POLICIES)))
    assert excinfo.value.code is FaultCode.MESSAGE_FORMAT
    assert ACTION_DISCOVER in excinfo.value.reason


# ---------------------------------------------------------------- negotiation


@pytest.mark.parametrize(
    ("offered", "answered"),
    [("3.0", "3.0"), ("4.0", "4.0"), ("5.0", "4.0"), ("9.0", "4.0"), ("4", "4.0"), ("12.5", "4.0")],
)
def test_version_negotiation_defaults(offered: str, answered: str) -> None:
    resp = negotiate_discover(request(offered), policy_url=POLICY_URL, enrollment_url=ENROLL_URL)
    assert resp.enrollment_version == answered
    assert Decimal(resp.enrollment_version) == min(Decimal(offered), DEFAULT_MAX_VERSION)


def test_version_negotiation_with_higher_maximum() -> None:
    def answer(offered: str) -> str:
        return negotiate_discover(
            request(offered),
            policy_url=POLICY_URL,
            enrollment_url=ENROLL_URL,
            max_version=Decimal("7.0"),
        ).enrollment_version

    assert answer("5.0") == "5.0"
    assert answer("9.0") == "7.0"


@pytest.mark.parametrize("offered", ["1.0", "2.0", "2.9"])
def test_version_below_minimum_is_refused(offered: str) -> None:
    with pytest.raises(SoapFault) as excinfo:
        negotiate_discover(request(offered), policy_url=POLICY_URL, enrollment_url=ENROLL_URL)
    fault = excinfo.value
    assert fault.code is FaultCode.AUTHORIZATION
    assert fault.errortype == ErrorType.DEVICE_NOT_SUPPORTED
    assert offered in fault.reason and "3.0" in fault.reason


def test_default_answer_is_onpremise_without_authentication_url() -> None:
    resp = negotiate_discover(
        request("4.0", ("OnPremise", "Federated")), policy_url=POLICY_URL, enrollment_url=ENROLL_URL
    )
    assert resp == DiscoverResponse(
        auth_policy="OnPremise",
        enrollment_version="4.0",
        enrollment_policy_service_url=POLICY_URL,
        enrollment_service_url=ENROLL_URL,
        authentication_service_url=None,
    )


def test_no_common_auth_policy_is_authentication_fault() -> None:
    with pytest.raises(SoapFault) as excinfo:
        negotiate_discover(request("4.0", ("Certificate",)), policy_url=POLICY_URL, enrollment_url=ENROLL_URL)
    fault = excinfo.value
    assert fault.code is FaultCode.AUTHENTICATION
    assert "Certificate" in fault.reason and "OnPremise" in fault.reason


def test_no_auth_policy_offered_is_authentication_fault() -> None:
    with pytest.raises(SoapFault) as excinfo:
        negotiate_discover(request("4.0", ()), policy_url=POLICY_URL, enrollment_url=ENROLL_URL)
    assert excinfo.value.code is FaultCode.AUTHENTICATION


def test_federated_needs_an_authentication_url() -> None:
    with pytest.raises(ValueError, match="authentication_url"):
        negotiate_discover(
            request(), policy_url=POLICY_URL, enrollment_url=ENROLL_URL, supported_auth=("Federated",)
        )


def test_federated_answer_carries_authentication_url() -> None:
    resp = negotiate_discover(
        request("5.0", ("OnPremise", "Federated")),
        policy_url=POLICY_URL,
        enrollment_url=ENROLL_URL,
        supported_auth=("Federated", "OnPremise"),
        authentication_url="https://mdm.example.com/sts",
    )
    assert resp.auth_policy == "Federated"
    assert resp.authentication_service_url == "https://mdm.example.com/sts"


def test_bad_server_configuration_is_value_error() -> None:
    with pytest.raises(ValueError):
        negotiate_discover(request(), policy_url=POLICY_URL, enrollment_url=ENROLL_URL, supported_auth=())
    with pytest.raises(ValueError):
        negotiate_discover(
            request(),
            policy_url=POLICY_URL,
            enrollment_url=ENROLL_URL,
            min_version=Decimal("5.0"),
            max_version=Decimal("4.0"),
        )


# ---------------------------------------------------------------- response


def _result_children(data: bytes) -> tuple[etree._Element, list[tuple[str, str | None]]]:
    root = parse_untrusted_xml(data)
    result = root.find(f"{{{SOAP12}}}Body/{{{DISCOVERY}}}DiscoverResponse/{{{DISCOVERY}}}DiscoverResult")
    assert result is not None
    return root, [(child.tag, child.text) for child in result]


def test_build_discover_response(windows_fixtures: Path) -> None:
    req = parse_soap_request(load(windows_fixtures, "real-w10-19043-discover-request.xml"))
    resp = negotiate_discover(parse_discover(req), policy_url=POLICY_URL, enrollment_url=ENROLL_URL)
    data = build_discover_response(resp, req.message_id, activity_id="aaaa-bbbb")
    assert b"\n" not in data
    root, children = _result_children(data)
    assert root.findtext(f"{{{SOAP12}}}Header/{{{WSA}}}Action") == ACTION_DISCOVER_RESPONSE
    assert (
        root.find(f"{{{SOAP12}}}Header/{{{WSA}}}Action").get(  # type: ignore[union-attr]
            f"{{{SOAP12}}}mustUnderstand"
        )
        == "1"
    )
    assert root.findtext(f"{{{SOAP12}}}Header/{{{WSA}}}RelatesTo") == req.message_id
    activity = root.find(f"{{{SOAP12}}}Header/{{{DIAGNOSTICS}}}ActivityId")
    assert activity is not None and activity.get("CorrelationId") == "aaaa-bbbb"
    body = root.find(f"{{{SOAP12}}}Body")
    assert body is not None and body.nsmap.get("xsi") == XSI
    assert children == [
        (f"{{{DISCOVERY}}}AuthPolicy", "OnPremise"),
        (f"{{{DISCOVERY}}}EnrollmentVersion", "4.0"),
        (f"{{{DISCOVERY}}}EnrollmentPolicyServiceUrl", POLICY_URL),
        (f"{{{DISCOVERY}}}EnrollmentServiceUrl", ENROLL_URL),
    ]


def test_build_discover_response_federated_has_authentication_url() -> None:
    resp = DiscoverResponse("Federated", "5.0", POLICY_URL, ENROLL_URL, "https://sts.example/a?b=1&c=2")
    _, children = _result_children(build_discover_response(resp, None, activity_id="x"))
    assert children[-1] == (f"{{{DISCOVERY}}}AuthenticationServiceUrl", "https://sts.example/a?b=1&c=2")


def test_discover_response_validates_against_mde2_schema(schemas: Path) -> None:
    schema = etree.XMLSchema(etree.parse(str(schemas / "MS-MDE2_6_enrollment-discovery.xsd")))
    resp = DiscoverResponse("Federated", "5.0", POLICY_URL, ENROLL_URL, "https://sts.example/")
    root = parse_untrusted_xml(build_discover_response(resp, "urn:uuid:1", activity_id="x"))
    element = root.find(f"{{{SOAP12}}}Body/{{{DISCOVERY}}}DiscoverResponse")
    assert element is not None
    document = etree.ElementTree(copy.deepcopy(element))
    assert schema.validate(document), schema.error_log
