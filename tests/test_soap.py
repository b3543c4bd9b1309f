"""mdmd.soap: SOAP 1.2 / WS-Addressing / WS-Security parsing and building."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from lxml import etree

from mdmd.soap import (
    ACTION_DISCOVER,
    ACTION_FAULT,
    ACTION_GET_POLICIES,
    ACTION_GET_POLICIES_RESPONSE,
    ACTION_RST_WSTEP,
    DIAGNOSTICS,
    DISCOVERY,
    ENCODING_TYPE_BASE64,
    PASSWORD_TEXT,
    SOAP11,
    SOAP12,
    VALUE_TYPE_DEVICE_ENROLLMENT_USER_TOKEN,
    WCF_DISPATCHER,
    WSA,
    WSSE,
    WST,
    WSTEP,
    XCEP,
    XML,
    XSI,
    BinarySecurityToken,
    ErrorType,
    FaultCode,
    SoapFault,
    SoapTemplate,
    UsernameToken,
    build_soap_fault,
    build_soap_response,
    parse_soap_request,
    placeholder,
)
from mdmd.xmlsafe import XMLInputError, parse_untrusted_xml

SERVER_URL = "https://mdm.example.com:8443"
TOKEN = base64.b64encode(b'{"type":1,"payload":{"orbit_node_key":"node-key-1"}}').decode()
DEVICE_ID = "5E1C4B8A-3F0D-4B5A-9C2E-7A1B2C3D4E5F"
HW_DEV_ID = "A" * 64


def load(folder: Path, name: str) -> bytes:
    text = (folder / name).read_text(encoding="utf-8")
    for key, value in {
        "{{SERVER_URL}}": SERVER_URL,
        "{{TOKEN}}": TOKEN,
        "{{DEVICE_ID}}": DEVICE_ID,
        "{{HW_DEV_ID}}": HW_DEV_ID,
    }.items():
        text = text.replace(key, value)
    assert "{{" not in text
    return text.encode("utf-8")


def envelope(header: str, body: str, ns: str = SOAP12) -> bytes:
    return (
        f'<s:Envelope xmlns:s="{ns}" xmlns:a="{WSA}" xmlns:wsse="{WSSE}">'
        f"<s:Header>{header}</s:Header><s:Body>{body}</s:Body></s:Envelope>"
    ).encode()


ACTION = f'<a:Action s:mustUnderstand="1">{ACTION_DISCOVER}</a:Action>'


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("name", "action", "message_id", "to", "body_tag"),
    [
        (
            "discover-request.xml",
            ACTION_DISCOVER,
            "urn:uuid:748132ec-a575-4329-b01b-6171a9cf8478",
            f"{SERVER_URL}/api/mdm/microsoft/discovery",
            f"{{{DISCOVERY}}}Discover",
        ),
        (
            "real-w10-19043-discover-request.xml",
            ACTION_DISCOVER,
            "urn:uuid:748132ec-a575-4329-b01b-6171a9cf8478",
            "https://EnterpriseEnrollment.fleetdm.ngrok.io:443/EnrollmentServer/Discovery.svc",
            f"{{{DISCOVERY}}}Discover",
        ),
        (
            "getpolicies-request.xml",
            ACTION_GET_POLICIES,
            "urn:uuid:72048B64-0F19-448F-8C2E-B4C661860AA0",
            f"{SERVER_URL}/api/mdm/microsoft/policy",
            f"{{{XCEP}}}GetPolicies",
        ),
        (
            "real-w10-19043-getpolicies-usernametoken-request.xml",
            ACTION_GET_POLICIES,
            "urn:uuid:72048B64-0F19-448F-8C2E-B4C661860AA0",
            "https://windows.fleetdm.ngrok.io/EnrollmentServer/Policy.svc",
            f"{{{XCEP}}}GetPolicies",
        ),
        (
            "enroll-request.xml",
            ACTION_RST_WSTEP,
            "urn:uuid:0d5a1441-5891-453b-becf-a2e5f6ea3749",
            f"{SERVER_URL}/api/mdm/microsoft/enroll",
            f"{{{WST}}}RequestSecurityToken",
        ),
        (
            "real-w10-19043-enroll-rst-pkcs10-request.xml",
            ACTION_RST_WSTEP,
            "urn:uuid:0d5a1441-5891-453b-becf-a2e5f6ea3749",
            "https://windows.fleetdm.ngrok.io/EnrollmentServer/Enrollment.svc",
            f"{{{WST}}}RequestSecurityToken",
        ),
    ],
)
def test_fixture_requests_parse(
    windows_fixtures: Path, name: str, action: str, message_id: str, to: str, body_tag: str
) -> None:
    req = parse_soap_request(load(windows_fixtures, name))
    assert req.action == action  # stripped, exact
    assert req.message_id == message_id
    assert req.to == to
    assert req.body.tag == body_tag


def test_discover_has_no_security_tokens(windows_fixtures: Path) -> None:
    req = parse_soap_request(load(windows_fixtures, "discover-request.xml"))
    assert req.security == ()


@pytest.mark.parametrize("name", ["getpolicies-request.xml", "enroll-request.xml"])
def test_device_enrollment_user_token_is_exposed(windows_fixtures: Path, name: str) -> None:
    req = parse_soap_request(load(windows_fixtures, name))
    assert req.security == (
        BinarySecurityToken(
            value_type=VALUE_TYPE_DEVICE_ENROLLMENT_USER_TOKEN,
            encoding_type=ENCODING_TYPE_BASE64,
            value=TOKEN,
        ),
    )


@pytest.mark.parametrize(
    "name",
    [
        "real-w10-19043-getpolicies-usernametoken-request.xml",
        "real-w10-19043-enroll-rst-pkcs10-request.xml",
    ],
)
def test_username_token_is_exposed(windows_fixtures: Path, name: str) -> None:
    req = parse_soap_request(load(windows_fixtures, name))
    assert req.security == (UsernameToken(username="demio", password="demo"),)


def test_secrets_stay_out_of_repr() -> None:
    assert "s3cret" not in repr(UsernameToken("user", "s3cret"))
    assert "TOKENVALUE" not in repr(BinarySecurityToken("vt", "et", "TOKENVALUE"))


def test_prefixed_bst_attributes_and_whitespace_are_accepted() -> None:
    header = (
        ACTION + '<wsse:Security s:mustUnderstand="1"><wsse:BinarySecurityToken '
        f'wsse:ValueType=" {VALUE_TYPE_DEVICE_ENROLLMENT_USER_TOKEN} " '
        f'wsse:EncodingType="{ENCODING_TYPE_BASE64}">\n   {TOKEN}\n  '
        "</wsse:BinarySecurityToken></wsse:Security>"
        "<a:MessageID>\n  urn:uuid:1  \n</a:MessageID>"
    )
    req = parse_soap_request(envelope(header, "<x/>"))
    assert req.security == (
        BinarySecurityToken(VALUE_TYPE_DEVICE_ENROLLMENT_USER_TOKEN, ENCODING_TYPE_BASE64, TOKEN),
    )
    assert req.message_id == "urn:uuid:1"
    assert req.to is None


def test_action_text_is_stripped() -> None:
    header = f'<a:Action s:mustUnderstand="1">\n   {ACTION_DISCOVER}\n </a:Action>'
    assert parse_soap_request(envelope(header, "<x/>")).action == ACTION_DISCOVER


def test_soap11_envelope_is_a_message_format_fault() -> None:
    with pytest.raises(SoapFault) as excinfo:
        parse_soap_request(envelope(ACTION, "<x/>", ns=SOAP11))
    fault = excinfo.value
    assert fault.code is FaultCode.MESSAGE_FORMAT
    assert SOAP11 in fault.reason
    assert SOAP12 in fault.reason
    assert "1.1" in fault.reason and "1.2" in fault.reason


def test_other_root_element_is_a_message_format_fault() -> None:
    with pytest.raises(SoapFault) as excinfo:
        parse_soap_request(b'<SyncML xmlns="SYNCML:SYNCML1.2"/>')
    assert excinfo.value.code is FaultCode.MESSAGE_FORMAT
    assert "SyncML" in excinfo.value.reason


def test_missing_action_is_a_message_format_fault() -> None:
    with pytest.raises(SoapFault) as excinfo:
        parse_soap_request(envelope("<a:MessageID>urn:uuid:1</a:MessageID>", "<x/>"))
    assert excinfo.value.code is FaultCode.MESSAGE_FORMAT
    assert "Action" in excinfo.value.reason


def test_missing_header_is_a_message_format_fault() -> None:
    data = f'<s:Envelope xmlns:s="{SOAP12}"><s:Body><x/></s:Body></s:Envelope>'.encode()
    with pytest.raises(SoapFault) as excinfo:
        parse_soap_request(data)
    assert excinfo.value.code is FaultCode.MESSAGE_FORMAT


def test_duplicate_action_is_a_message_format_fault() -> None:
    with pytest.raises(SoapFault) as excinfo:
        parse_soap_request(envelope(ACTION + ACTION, "<x/>"))
    assert excinfo.value.code is FaultCode.MESSAGE_FORMAT


@pytest.mark.parametrize("body", ["", "  text only  ", "<x/><y/>"])
def test_body_needs_exactly_one_element(body: str) -> None:
    with pytest.raises(SoapFault) as excinfo:
        parse_soap_request(envelope(ACTION, body))
    assert excinfo.value.code is FaultCode.MESSAGE_FORMAT


def test_not_xml_propagates_xml_input_error() -> None:
    with pytest.raises(XMLInputError):
        parse_soap_request(b"GET / HTTP/1.1")


def test_dtd_propagates_xml_input_error() -> None:
    data = b'<!DOCTYPE s [<!ENTITY e "x">]>' + envelope(ACTION, "<x>&e;</x>")
    with pytest.raises(XMLInputError):
        parse_soap_request(data)


# ---------------------------------------------------------------- building


def _header_child(root: etree._Element, tag: str) -> etree._Element:
    element = root.find(f"{{{SOAP12}}}Header/{tag}")
    assert element is not None, tag
    return element


def test_build_soap_response_shape() -> None:
    body = etree.Element(f"{{{DISCOVERY}}}Thing")
    body.text = "payload"
    data = build_soap_response(
        "urn:action:x", "urn:uuid:req-1", body, activity_id="11111111-2222-3333-4444-555555555555"
    )
    assert data.startswith(b'<?xml version="1.0" encoding="utf-8"?><s:Envelope ')
    assert b"\n" not in data
    assert b"<s:Header>" in data and b"<a:Action " in data  # explicit prefixes
    root = parse_untrusted_xml(data)
    assert root.tag == f"{{{SOAP12}}}Envelope"
    header = root.find(f"{{{SOAP12}}}Header")
    assert header is not None
    assert [child.tag for child in header] == [
        f"{{{WSA}}}Action",
        f"{{{DIAGNOSTICS}}}ActivityId",
        f"{{{WSA}}}RelatesTo",
    ]
    action = _header_child(root, f"{{{WSA}}}Action")
    assert action.text == "urn:action:x"
    assert action.get(f"{{{SOAP12}}}mustUnderstand") == "1"
    assert _header_child(root, f"{{{WSA}}}RelatesTo").text == "urn:uuid:req-1"
    activity = _header_child(root, f"{{{DIAGNOSTICS}}}ActivityId")
    assert activity.get("CorrelationId") == "11111111-2222-3333-4444-555555555555"
    assert activity.text == "11111111-2222-3333-4444-555555555555"
    soap_body = root.find(f"{{{SOAP12}}}Body")
    assert soap_body is not None
    assert soap_body.nsmap.get("xsi") == XSI
    assert [child.tag for child in soap_body] == [f"{{{DISCOVERY}}}Thing"]
    assert soap_body[0].text == "payload"
    # The caller's element is copied, not moved into the envelope.
    assert body.getparent() is None


def test_build_soap_response_without_relates_to_and_with_extra_header() -> None:
    extra = etree.Element(f"{{{WSSE}}}Security", nsmap={"o": WSSE})
    data = build_soap_response("urn:a", None, etree.Element("x"), activity_id="act", extra_header=[extra])
    root = parse_untrusted_xml(data)
    header = root.find(f"{{{SOAP12}}}Header")
    assert header is not None
    assert header.find(f"{{{WSA}}}RelatesTo") is None
    assert header[-1].tag == f"{{{WSSE}}}Security"


def _fault_parts(data: bytes) -> dict[str, etree._Element]:
    root = parse_untrusted_xml(data)
    fault = root.find(f"{{{SOAP12}}}Body/{{{SOAP12}}}Fault")
    assert fault is not None
    parts: dict[str, etree._Element] = {}
    for path in (
        "Code/Value",
        "Code/Subcode/Value",
        "Reason/Text",
        "Detail",
    ):
        element = fault.find("/".join(f"{{{SOAP12}}}{p}" for p in path.split("/")))
        if element is not None:
            parts[path] = element
    parts["root"] = root
    return parts


@pytest.mark.parametrize("code", list(FaultCode))
def test_build_soap_fault_codes(code: FaultCode) -> None:
    fault = SoapFault(code, "received X; this server supports Y")
    data = build_soap_fault(fault, "urn:uuid:req-2", activity_id="act-1", trace_id="trace-1")
    parts = _fault_parts(data)
    root = parts["root"]
    assert _header_child(root, f"{{{WSA}}}Action").text == ACTION_FAULT
    assert _header_child(root, f"{{{WSA}}}RelatesTo").text == "urn:uuid:req-2"
    assert _header_child(root, f"{{{DIAGNOSTICS}}}ActivityId").get("CorrelationId") == "act-1"
    assert parts["Code/Value"].text == "s:Receiver"
    subcode = parts["Code/Subcode/Value"]
    assert subcode.text == f"{code.prefix}:{code.subcode}"
    # The QName resolves to the namespace that defines the subcode.
    assert subcode.nsmap[code.prefix] == code.namespace
    reason = parts["Reason/Text"]
    assert reason.text == "received X; this server supports Y"
    assert reason.get(f"{{{XML}}}lang") == "en-us"
    assert "Detail" not in parts


def test_fault_code_table() -> None:
    assert FaultCode.MESSAGE_FORMAT.qname == "s:MessageFormat"
    assert FaultCode.MESSAGE_FORMAT.hresult == 0x80180001
    assert FaultCode.INTERNAL_SERVICE_FAULT.qname == "a:InternalServiceFault"
    assert FaultCode.INTERNAL_SERVICE_FAULT.namespace == WCF_DISPATCHER
    assert FaultCode.INVALID_SECURITY.namespace == WSSE
    assert FaultCode.INVALID_SECURITY.hresult == 0x80180007
    assert [c.hresult for c in FaultCode] == list(range(0x80180001, 0x80180008))


def test_build_soap_fault_with_errortype_has_detail() -> None:
    fault = SoapFault(FaultCode.AUTHORIZATION, "device cap reached", ErrorType.DEVICE_CAP_REACHED)
    parts = _fault_parts(build_soap_fault(fault, None, activity_id="act", trace_id="req-42"))
    assert parts["Code/Subcode/Value"].text == "s:Authorization"
    detail = parts["Detail"]
    error = detail.find(f"{{{WSTEP}}}deviceenrollmentserviceerror")
    assert error is not None
    assert [child.tag for child in error] == [
        f"{{{WSTEP}}}errortype",
        f"{{{WSTEP}}}message",
        f"{{{WSTEP}}}traceid",
    ]
    assert error.findtext(f"{{{WSTEP}}}errortype") == "DeviceCapReached"
    assert error.findtext(f"{{{WSTEP}}}message") == "device cap reached"
    assert error.findtext(f"{{{WSTEP}}}traceid") == "req-42"
    assert parts["root"].find(f"{{{SOAP12}}}Header/{{{WSA}}}RelatesTo") is None


def test_soap_fault_str_and_attributes() -> None:
    fault = SoapFault(FaultCode.CERTIFICATE_REQUEST, "bad CSR", "NotSupported")
    assert fault.code is FaultCode.CERTIFICATE_REQUEST
    assert fault.reason == "bad CSR"
    assert fault.errortype == "NotSupported"
    assert str(fault) == "s:CertificateRequest [NotSupported]: bad CSR"


def test_password_text_constant() -> None:
    assert PASSWORD_TEXT.endswith("username-token-profile-1.0#PasswordText")


# --------------------------------------------------------------------------
# SoapTemplate: the bytes build_soap_response would write
# --------------------------------------------------------------------------

ODD_VALUES = [
    "urn:uuid:0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0",
    "",
    "a&b<c>d\"e'f",
    "line\r\nbreak\ttab",
    "]]> &amp; &#13;",
    "caf\u00e9 \U0001f600 \ue000marker\ue000",
]


def _template_body(value: str | None = None) -> etree._Element:
    body = etree.Element(f"{{{XCEP}}}Thing", nsmap={None: XCEP})  # type: ignore[dict-item]
    etree.SubElement(body, f"{{{XCEP}}}text").text = value if value is not None else placeholder("text")
    etree.SubElement(body, f"{{{XCEP}}}attr").set(
        "value", value if value is not None else placeholder("attr")
    )
    etree.SubElement(body, f"{{{XCEP}}}nil").set(f"{{{XSI}}}nil", "true")
    return body


@pytest.mark.parametrize("value", ODD_VALUES)
@pytest.mark.parametrize("relates_to", [None, "urn:uuid:1", 'x"<&>\r\n\t'])
def test_template_renders_the_bytes_lxml_builds(value: str, relates_to: str | None) -> None:
    template = SoapTemplate(ACTION_GET_POLICIES_RESPONSE, _template_body())
    built = build_soap_response(
        ACTION_GET_POLICIES_RESPONSE, relates_to, _template_body(value), activity_id=value
    )
    assert template.render(relates_to, activity_id=value, text=value, attr=value) == built


def test_template_with_extra_header() -> None:
    header = etree.Element(f"{{{WSSE}}}Security", nsmap={"o": WSSE})
    etree.SubElement(header, f"{{{WSSE}}}Stamp").text = placeholder("stamp")
    template = SoapTemplate(ACTION_GET_POLICIES_RESPONSE, _template_body(), extra_header=(header,))
    filled = etree.Element(f"{{{WSSE}}}Security", nsmap={"o": WSSE})
    etree.SubElement(filled, f"{{{WSSE}}}Stamp").text = "2024-05-06T07:08:09.123Z"
    assert template.render(
        "m", activity_id="a", text="t", attr="t", stamp="2024-05-06T07:08:09.123Z"
    ) == build_soap_response(
        ACTION_GET_POLICIES_RESPONSE, "m", _template_body("t"), activity_id="a", extra_header=(filled,)
    )


@pytest.mark.parametrize("bad", ["\x00", "\x1f", "\ud800", "\ufffe"])
def test_template_refuses_what_xml_cannot_hold(bad: str) -> None:
    template = SoapTemplate(ACTION_GET_POLICIES_RESPONSE, _template_body())
    with pytest.raises(ValueError, match="relates_to"):
        template.render(f"m{bad}", activity_id="a", text="t", attr="v")
    with pytest.raises(ValueError, match="text"):
        template.render("m", activity_id="a", text=bad, attr="v")


def test_template_needs_every_field() -> None:
    template = SoapTemplate(ACTION_GET_POLICIES_RESPONSE, _template_body())
    with pytest.raises(KeyError):
        template.render("m", activity_id="a", text="t")


def test_placeholder_names_are_plain() -> None:
    with pytest.raises(ValueError):
        placeholder("Not-Plain")
