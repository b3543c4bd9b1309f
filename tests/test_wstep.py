"""mdmd.wstep: MS-WSTEP RequestSecurityToken as profiled by MS-MDE2 3.4."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from lxml import etree

from mdmd.soap import (
    ACTION_DISCOVER,
    ACTION_RST_WSTEP,
    ACTION_RSTRC_WSTEP,
    DIAGNOSTICS,
    ENCODING_TYPE_BASE64,
    REQUEST_TYPE_ISSUE,
    REQUEST_TYPE_RENEW,
    SOAP12,
    TOKEN_TYPE_DEVICE_ENROLLMENT,
    VALUE_TYPE_DEVICE_ENROLLMENT_USER_TOKEN,
    VALUE_TYPE_PKCS7,
    VALUE_TYPE_PKCS7_WSTEP,
    VALUE_TYPE_PKCS10,
    VALUE_TYPE_PROVISION_DOC,
    WSA,
    WSSE,
    WST,
    WSTEP,
    WSU,
    BinarySecurityToken,
    ErrorType,
    FaultCode,
    SoapFault,
    UsernameToken,
    parse_soap_request,
)
from mdmd.wstep import (
    RequestSecurityToken,
    build_request_security_token_response,
    parse_request_security_token,
)
from mdmd.xmlsafe import parse_untrusted_xml

SERVER_URL = "https://mdm.example.com:8443"
TOKEN = base64.b64encode(b'{"type":1,"payload":{"orbit_node_key":"node-key-2"}}').decode()
DEVICE_ID = "5E1C4B8A-3F0D-4B5A-9C2E-7A1B2C3D4E5F"
HW_DEV_ID = "3B3ED6D0EA88CBFCF37D36F90F22FE61172348C0162FC3840D6703149870CE76"
REAL_MACS = (
    "00-0C-29-51-60-9D",
    "1A-77-20-52-41-53",
    "1A-77-20-52-41-53",
    "00-0C-29-51-60-A7",
    "18-14-20-52-41-53",
    "00-0C-29-51-60-93",
)


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


CSR_B64 = base64.b64encode(b"\x30\x03\x02\x01\x00").decode()


def rst(
    *,
    token_type: str = TOKEN_TYPE_DEVICE_ENROLLMENT,
    request_type: str = REQUEST_TYPE_ISSUE,
    bst: str | None = None,
    context: str = '<ac:ContextItem Name="DeviceID"><ac:Value>DEV-1</ac:Value></ac:ContextItem>',
    action: str = ACTION_RST_WSTEP,
) -> bytes:
    if bst is None:
        bst = (
            f'<wsse:BinarySecurityToken ValueType="{VALUE_TYPE_PKCS10}" '
            f'EncodingType="{ENCODING_TYPE_BASE64}">{CSR_B64}</wsse:BinarySecurityToken>'
        )
    return (
        f'<s:Envelope xmlns:s="{SOAP12}" xmlns:a="{WSA}" xmlns:wsse="{WSSE}" xmlns:wst="{WST}" '
        'xmlns:ac="http://schemas.xmlsoap.org/ws/2006/12/authorization"><s:Header>'
        f'<a:Action s:mustUnderstand="1">{action}</a:Action>'
        "<a:MessageID>urn:uuid:r-1</a:MessageID></s:Header><s:Body><wst:RequestSecurityToken>"
        f"<wst:TokenType>{token_type}</wst:TokenType>"
        f"<wst:RequestType>{request_type}</wst:RequestType>{bst}"
        f"<ac:AdditionalContext>{context}</ac:AdditionalContext>"
        "</wst:RequestSecurityToken></s:Body></s:Envelope>"
    ).encode()


def fault_of(data: bytes) -> SoapFault:
    with pytest.raises(SoapFault) as excinfo:
        parse_request_security_token(parse_soap_request(data))
    return excinfo.value


# ---------------------------------------------------------------- parsing


def test_parse_emulator_fixture(windows_fixtures: Path) -> None:
    soap = parse_soap_request(load(windows_fixtures, "enroll-request.xml"))
    token = parse_request_security_token(soap)
    # The CSR is base64 with line breaks; it decodes to exactly the DER file.
    assert token.csr_der == (windows_fixtures / "windows-csr.der").read_bytes()
    assert token.token_type == TOKEN_TYPE_DEVICE_ENROLLMENT
    assert token.request_type == REQUEST_TYPE_ISSUE
    assert token.device_id == DEVICE_ID
    assert token.context_value("EnrollmentType") == "Full"
    assert token.context_value("HWDevID") == HW_DEV_ID
    assert token.context_value("RequestVersion") == "5.0"
    assert token.context_values("MAC") == ("A2-19-7D-41-B3-9C",)
    assert token.context[0] == ("UXInitiated", "false")
    assert soap.security == (
        BinarySecurityToken(VALUE_TYPE_DEVICE_ENROLLMENT_USER_TOKEN, ENCODING_TYPE_BASE64, TOKEN),
    )


def test_parse_real_windows_10_fixture(windows_fixtures: Path) -> None:
    soap = parse_soap_request(load(windows_fixtures, "real-w10-19043-enroll-rst-pkcs10-request.xml"))
    token = parse_request_security_token(soap)
    assert token.csr_der == (windows_fixtures / "real-w10-19043-csr.der").read_bytes()
    assert token.device_id == "B5B954E81FBCB94EB79BD08BE625F4EE"
    assert token.context_values("MAC") == REAL_MACS
    assert token.context_value("MAC") == REAL_MACS[0]
    assert token.context_value("RequestVersion") is None
    assert token.context_values("RequestVersion") == ()
    assert token.context_value("OSVersion") == "10.0.19043.2364"
    assert token.context_value("EnrollmentType") == "Full"
    assert len(token.context) == 18
    assert soap.security == (UsernameToken("demio", "demo"),)


def test_csr_stays_out_of_repr(windows_fixtures: Path) -> None:
    token = RequestSecurityToken(
        TOKEN_TYPE_DEVICE_ENROLLMENT, REQUEST_TYPE_ISSUE, b"\x30secret", (("DeviceID", "d"),)
    )
    assert "secret" not in repr(token)


def test_prefixed_bst_attributes_and_wrapped_base64() -> None:
    wrapped = "\n".join(CSR_B64[i : i + 4] for i in range(0, len(CSR_B64), 4))
    bst = (
        f'<wsse:BinarySecurityToken wsse:ValueType="{VALUE_TYPE_PKCS10}" '
        f'wsse:EncodingType="{ENCODING_TYPE_BASE64}">\r\n {wrapped} \n</wsse:BinarySecurityToken>'
    )
    token = parse_request_security_token(parse_soap_request(rst(bst=bst)))
    assert token.csr_der == b"\x30\x03\x02\x01\x00"
    assert token.device_id == "DEV-1"


def test_missing_bst_is_certificate_request_fault() -> None:
    fault = fault_of(rst(bst=""))
    assert fault.code is FaultCode.CERTIFICATE_REQUEST
    assert VALUE_TYPE_PKCS10 in fault.reason


@pytest.mark.parametrize("value", ["not base64 at all!", "QUJD=Q", "QQ", "   "])
def test_csr_not_base64_is_certificate_request_fault(value: str) -> None:
    bst = (
        f'<wsse:BinarySecurityToken ValueType="{VALUE_TYPE_PKCS10}" '
        f'EncodingType="{ENCODING_TYPE_BASE64}">{value}</wsse:BinarySecurityToken>'
    )
    fault = fault_of(rst(bst=bst))
    assert fault.code is FaultCode.CERTIFICATE_REQUEST
    assert "base64" in fault.reason


def test_wrong_value_type_is_certificate_request_fault() -> None:
    bst = (
        f'<wsse:BinarySecurityToken ValueType="{VALUE_TYPE_PKCS7}" '
        f'EncodingType="{ENCODING_TYPE_BASE64}">{CSR_B64}</wsse:BinarySecurityToken>'
    )
    fault = fault_of(rst(bst=bst))
    assert fault.code is FaultCode.CERTIFICATE_REQUEST
    assert VALUE_TYPE_PKCS7 in fault.reason and VALUE_TYPE_PKCS10 in fault.reason


def test_wrong_encoding_type_is_certificate_request_fault() -> None:
    bst = (
        f'<wsse:BinarySecurityToken ValueType="{VALUE_TYPE_PKCS10}" '
        f'EncodingType="urn:hex">{CSR_B64}</wsse:BinarySecurityToken>'
    )
    assert fault_of(rst(bst=bst)).code is FaultCode.CERTIFICATE_REQUEST


def test_recovery_is_not_supported() -> None:
    fault = fault_of(rst(request_type=f"{WST}/Recovery"))
    assert fault.code is FaultCode.CERTIFICATE_REQUEST
    assert fault.errortype == ErrorType.NOT_SUPPORTED
    assert "not served" in fault.reason and REQUEST_TYPE_ISSUE in fault.reason


def _pkcs7_bst(value_type: str = VALUE_TYPE_PKCS7, value: str = CSR_B64) -> str:
    return (
        f'<wsse:BinarySecurityToken ValueType="{value_type}" '
        f'EncodingType="{ENCODING_TYPE_BASE64}">{value}</wsse:BinarySecurityToken>'
    )


@pytest.mark.parametrize("value_type", [VALUE_TYPE_PKCS7, VALUE_TYPE_PKCS7_WSTEP])
def test_a_renewal_carries_a_pkcs7_and_needs_no_device_id(value_type: str) -> None:
    # Microsoft Learn's ROBO sample has only DeviceType and ApplicationVersion.
    context = '<ac:ContextItem Name="DeviceType"><ac:Value>CIMClient_Windows</ac:Value></ac:ContextItem>'
    token = parse_request_security_token(
        parse_soap_request(rst(request_type=REQUEST_TYPE_RENEW, bst=_pkcs7_bst(value_type), context=context))
    )
    assert token.is_renewal and token.request_type == REQUEST_TYPE_RENEW
    assert token.token_der == b"\x30\x03\x02\x01\x00"
    assert token.device_id == "" and token.context_value("DeviceType") == "CIMClient_Windows"
    with pytest.raises(ValueError):
        _ = token.csr_der


@pytest.mark.parametrize(
    "bst",
    [
        "",
        f'<wsse:BinarySecurityToken ValueType="{VALUE_TYPE_PKCS10}">{CSR_B64}</wsse:BinarySecurityToken>',
        _pkcs7_bst(value="not base64!"),
        _pkcs7_bst(value="  "),
    ],
)
def test_a_renewal_without_a_usable_pkcs7_is_not_eligible_to_renew(bst: str) -> None:
    fault = fault_of(rst(request_type=REQUEST_TYPE_RENEW, bst=bst))
    assert fault.code is FaultCode.AUTHORIZATION
    assert fault.errortype == ErrorType.NOT_ELIGIBLE_TO_RENEW
    assert "PKCS#7" in fault.reason or "#PKCS7" in fault.reason


def test_unknown_request_type_is_message_format() -> None:
    fault = fault_of(rst(request_type=f"{WST}/KET"))
    assert fault.code is FaultCode.MESSAGE_FORMAT
    assert fault.errortype is None


def test_wrong_token_type_is_message_format() -> None:
    fault = fault_of(
        rst(
            token_type="http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-x509-token-profile-1.0#X509v3"
        )
    )
    assert fault.code is FaultCode.MESSAGE_FORMAT
    assert TOKEN_TYPE_DEVICE_ENROLLMENT in fault.reason


@pytest.mark.parametrize(
    "context",
    [
        "",
        '<ac:ContextItem Name="EnrollmentType"><ac:Value>Full</ac:Value></ac:ContextItem>',
        '<ac:ContextItem Name="DeviceID"><ac:Value> </ac:Value></ac:ContextItem>',
    ],
)
def test_missing_device_id_is_message_format(context: str) -> None:
    fault = fault_of(rst(context=context))
    assert fault.code is FaultCode.MESSAGE_FORMAT
    assert "DeviceID" in fault.reason


def test_wrong_action_is_message_format() -> None:
    assert fault_of(rst(action=ACTION_DISCOVER)).code is FaultCode.MESSAGE_FORMAT


def test_wrong_body_element_is_message_format() -> None:
    data = rst().replace(b"wst:RequestSecurityToken>", b"wst:RequestSecurityTokenX>")
    assert fault_of(data).code is FaultCode.MESSAGE_FORMAT


# ---------------------------------------------------------------- response


NOW = datetime(2026, 11, 25, 6, 30, 15, 123456, tzinfo=UTC)
DOC = b'<wap-provisioningdoc version="1.1"><characteristic type="APPLICATION"/></wap-provisioningdoc>'


def _parse_response(data: bytes) -> etree._Element:
    assert data.startswith(b'<?xml version="1.0" encoding="utf-8"?>')
    assert b"\n" not in data
    return parse_untrusted_xml(data)


def test_rstrc_header() -> None:
    root = _parse_response(
        build_request_security_token_response(DOC, "urn:uuid:r-1", activity_id="act-9", now=NOW)
    )
    header = root.find(f"{{{SOAP12}}}Header")
    assert header is not None
    assert header.findtext(f"{{{WSA}}}Action") == ACTION_RSTRC_WSTEP
    assert header.findtext(f"{{{WSA}}}RelatesTo") == "urn:uuid:r-1"
    assert header.find(f"{{{DIAGNOSTICS}}}ActivityId") is not None
    security = header.find(f"{{{WSSE}}}Security")
    assert security is not None
    assert security.get(f"{{{SOAP12}}}mustUnderstand") == "1"
    stamp = security.find(f"{{{WSU}}}Timestamp")
    assert stamp is not None
    assert stamp.get(f"{{{WSU}}}Id") == "_0"
    assert [child.tag for child in stamp] == [f"{{{WSU}}}Created", f"{{{WSU}}}Expires"]
    assert stamp.findtext(f"{{{WSU}}}Created") == "2026-11-25T06:30:15.123Z"
    assert stamp.findtext(f"{{{WSU}}}Expires") == "2026-11-25T06:35:15.123Z"


def test_rstrc_timestamp_is_utc_for_other_timezones() -> None:
    local_now = NOW.astimezone(timezone(timedelta(hours=2)))
    root = _parse_response(build_request_security_token_response(DOC, None, activity_id="a", now=local_now))
    created = root.findtext(f".//{{{WSU}}}Created")
    assert created == "2026-11-25T06:30:15.123Z"
    assert root.find(f"{{{SOAP12}}}Header/{{{WSA}}}RelatesTo") is None


def test_rstrc_needs_aware_datetime() -> None:
    with pytest.raises(ValueError):
        build_request_security_token_response(DOC, None, activity_id="a", now=datetime(2026, 1, 1))


def test_rstrc_body_structure() -> None:
    root = _parse_response(
        build_request_security_token_response(DOC, "urn:uuid:r-1", activity_id="act", now=NOW)
    )
    body = root.find(f"{{{SOAP12}}}Body")
    assert body is not None and len(body) == 1
    collection = body[0]
    assert collection.tag == f"{{{WST}}}RequestSecurityTokenResponseCollection"
    assert [child.tag for child in collection] == [f"{{{WST}}}RequestSecurityTokenResponse"]
    response = collection[0]
    assert [child.tag for child in response] == [
        f"{{{WST}}}TokenType",
        f"{{{WSTEP}}}DispositionMessage",
        f"{{{WST}}}RequestedSecurityToken",
        f"{{{WSTEP}}}RequestID",
    ]
    assert response.findtext(f"{{{WST}}}TokenType") == TOKEN_TYPE_DEVICE_ENROLLMENT
    assert response.findtext(f"{{{WSTEP}}}RequestID") == "0"
    tokens = response.findall(f"{{{WST}}}RequestedSecurityToken/{{{WSSE}}}BinarySecurityToken")
    assert len(tokens) == 1
    token = tokens[0]
    assert token.get("ValueType") == VALUE_TYPE_PROVISION_DOC
    assert token.get("EncodingType") == ENCODING_TYPE_BASE64
    assert token.text is not None
    assert token.text == base64.b64encode(DOC).decode()  # standard, single line
    assert base64.b64decode(token.text, validate=True) == DOC


def test_large_document_is_single_line_base64() -> None:
    doc = b"<wap-provisioningdoc>" + b"x" * 5000 + b"</wap-provisioningdoc>"
    data = build_request_security_token_response(doc, None, activity_id="a", now=NOW)
    assert b"\n" not in data
    token = parse_untrusted_xml(data).find(f".//{{{WSSE}}}BinarySecurityToken")
    assert token is not None and token.text is not None
    assert base64.b64decode(token.text, validate=True) == doc


def test_enrollment_round_trip_with_provisioning_doc(windows_fixtures: Path) -> None:
    from mdmd.provisioning import ProvisioningDocParams, build_provisioning_doc

    soap = parse_soap_request(load(windows_fixtures, "real-w10-19043-enroll-rst-pkcs10-request.xml"))
    token = parse_request_security_token(soap)
    device_der = (windows_fixtures / "poc-issued-device-cert-accepted-by-w10.der").read_bytes()
    doc = build_provisioning_doc(
        ProvisioningDocParams(
            ca_certs_der=[b"root-der-placeholder"],
            device_cert_der=device_der,
            enrollment_type="Full" if token.context_value("EnrollmentType") == "Full" else "Device",
            management_url="https://mdm.example.com/ManagementServer/MDM.svc",
            provider_id="mdmd",
            provider_name="mdmd",
            device_id=token.device_id,
            ent_dmid="ent-1",
            client_secret="c",
            server_name="n",
            server_secret="s",
            nonce=base64.b64encode(b"nonce").decode(),
        )
    )
    data = build_request_security_token_response(doc, soap.message_id, activity_id="act", now=NOW)
    root = parse_untrusted_xml(data)
    assert root.findtext(f"{{{SOAP12}}}Header/{{{WSA}}}RelatesTo") == soap.message_id
    token_text = root.findtext(f".//{{{WSSE}}}BinarySecurityToken")
    assert token_text is not None
    decoded = parse_untrusted_xml(base64.b64decode(token_text, validate=True))
    assert decoded.tag == "wap-provisioningdoc"
    assert b"Subject=CN%3DB5B954E81FBCB94EB79BD08BE625F4EE&amp;Stores=My%5CUser" in (
        base64.b64decode(token_text)
    )
