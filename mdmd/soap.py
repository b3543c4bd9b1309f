"""SOAP 1.2 + WS-Addressing + WS-Security plumbing for the enrollment services.

Shared by discovery (MS-MDE2 3.1), policy (MS-XCEP via MS-MDE2 3.3) and
enrollment (MS-WSTEP via MS-MDE2 3.4).  Pure: bytes in, dataclasses out, and
dataclasses/elements in, bytes out.  Nothing here knows about HTTP.

Wire decisions (MS-MDE2 2.2.10; docs/windows-clients.md):

* SOAP 1.2 only.  MS-MDE2 2.1 says SOAP 1.1, but every example, MS-WSTEP 2.1
  and real Windows use the SOAP 1.2 envelope, so a SOAP 1.1 envelope is
  answered with a ``MessageFormat`` fault that says so.
* Every text value is stripped: Microsoft's examples wrap values in
  newlines and indentation, the real client sends one line.
* Responses use the explicit ``s:``/``a:`` prefixes of Microsoft's samples,
  UTF-8, an XML declaration and no pretty printing.
"""

from __future__ import annotations

import copy
import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

from lxml import etree

from mdmd.xmlsafe import parse_untrusted_xml

__all__ = [
    "AC",
    "ACTION_DISCOVER",
    "ACTION_DISCOVER_RESPONSE",
    "ACTION_FAULT",
    "ACTION_GET_POLICIES",
    "ACTION_GET_POLICIES_RESPONSE",
    "ACTION_RSTRC_WSTEP",
    "ACTION_RST_WSTEP",
    "DIAGNOSTICS",
    "DISCOVERY",
    "DISCOVERY_VARIANTS",
    "ENCODING_TYPE_BASE64",
    "PASSWORD_TEXT",
    "REQUEST_TYPE_ISSUE",
    "REQUEST_TYPE_RECOVERY",
    "REQUEST_TYPE_RENEW",
    "SOAP11",
    "SOAP12",
    "TOKEN_TYPE_DEVICE_ENROLLMENT",
    "VALUE_TYPE_DEVICE_ENROLLMENT_USER_TOKEN",
    "VALUE_TYPE_PKCS7",
    "VALUE_TYPE_PKCS7_WSTEP",
    "VALUE_TYPE_PKCS10",
    "VALUE_TYPE_PROVISION_DOC",
    "VALUE_TYPE_X509V3",
    "WCF_DISPATCHER",
    "WSA",
    "WSSE",
    "WST",
    "WSTEP",
    "WSU",
    "XCEP",
    "XML",
    "XSD",
    "XSI",
    "BinarySecurityToken",
    "ErrorType",
    "FaultCode",
    "SecurityToken",
    "SoapFault",
    "SoapRequest",
    "SoapTemplate",
    "UsernameToken",
    "XMLTemplate",
    "build_soap_fault",
    "build_soap_response",
    "child_elements",
    "clip",
    "default_nsmap",
    "find_child",
    "is_nil",
    "local_name",
    "namespace_of",
    "parse_binary_security_token",
    "parse_soap_request",
    "placeholder",
    "require_action",
    "text_of",
]

# --------------------------------------------------------------------------
# Namespaces (MS-MDE2 2.2.1)
# --------------------------------------------------------------------------
SOAP12 = "http://www.w3.org/2003/05/soap-envelope"
SOAP11 = "http://schemas.xmlsoap.org/soap/envelope/"
WSA = "http://www.w3.org/2005/08/addressing"
WSSE = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd"
WSU = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-utility-1.0.xsd"
WST = "http://docs.oasis-open.org/ws-sx/ws-trust/200512"
# AdditionalContext.  MS-MDE2 2.2.1 maps "ac" to the wstep namespace, but the
# wire and MS-MDE2 3.4.4.1.1.1 use this one.
AC = "http://schemas.xmlsoap.org/ws/2006/12/authorization"
XCEP = "http://schemas.microsoft.com/windows/pki/2009/01/enrollmentpolicy"
WSTEP = "http://schemas.microsoft.com/windows/pki/2009/01/enrollment"
DISCOVERY = "http://schemas.microsoft.com/windows/management/2012/01/enrollment"
# Microsoft's Discover examples put a trailing slash on the namespace; the
# real client does not (docs/windows-clients.md).  Both are accepted.
DISCOVERY_VARIANTS = frozenset({DISCOVERY, DISCOVERY + "/"})
XSI = "http://www.w3.org/2001/XMLSchema-instance"
XSD = "http://www.w3.org/2001/XMLSchema"
XML = "http://www.w3.org/XML/1998/namespace"
DIAGNOSTICS = "http://schemas.microsoft.com/2004/09/ServiceModel/Diagnostics"
# Namespace WCF binds the "a" prefix to for InternalServiceFault.
WCF_DISPATCHER = "http://schemas.microsoft.com/net/2005/12/windowscommunicationfoundation/dispatcher"

# --------------------------------------------------------------------------
# Actions (MS-MDE2 3.1.4.1.1, 3.3.4.1.1, 3.4.4.1.1)
# --------------------------------------------------------------------------
ACTION_DISCOVER = DISCOVERY + "/IDiscoveryService/Discover"
ACTION_DISCOVER_RESPONSE = DISCOVERY + "/IDiscoveryService/DiscoverResponse"
ACTION_GET_POLICIES = XCEP + "/IPolicy/GetPolicies"
ACTION_GET_POLICIES_RESPONSE = XCEP + "/IPolicy/GetPoliciesResponse"
ACTION_RST_WSTEP = WSTEP + "/RST/wstep"
ACTION_RSTRC_WSTEP = WSTEP + "/RSTRC/wstep"
# Fault action: the one MS-WSTEP 4.1.4.2 shows, i.e. what Microsoft's own
# (WCF based) enrollment services send.  MS-MDE2 2.2.10's sample reuses the
# RSTRC action, which would be wrong for discovery and policy faults; plain
# WS-Addressing would use http://www.w3.org/2005/08/addressing/soap/fault.
# Windows is not known to look at the fault action at all.
ACTION_FAULT = WCF_DISPATCHER + "/fault"

# --------------------------------------------------------------------------
# Token, value and encoding types
# --------------------------------------------------------------------------
TOKEN_TYPE_DEVICE_ENROLLMENT = (
    "http://schemas.microsoft.com/5.0.0.0/ConfigurationManager/Enrollment/DeviceEnrollmentToken"
)
REQUEST_TYPE_ISSUE = WST + "/Issue"
REQUEST_TYPE_RENEW = WST + "/Renew"  # MS-MDE2 3.5.4.1.1.1
REQUEST_TYPE_RECOVERY = WST + "/Recovery"  # MS-MDE2 3.6.4.1.1.1
VALUE_TYPE_DEVICE_ENROLLMENT_USER_TOKEN = (
    "http://schemas.microsoft.com/5.0.0.0/ConfigurationManager/Enrollment/DeviceEnrollmentUserToken"
)
VALUE_TYPE_PKCS10 = WSTEP + "#PKCS10"
# A renewal's PKCS#7: MS-MDE2 3.5.4.1.1.1 and Microsoft Learn's sample use
# the WS-Security namespace, the older MS-MDE the enrollment one.
VALUE_TYPE_PKCS7 = WSSE + "#PKCS7"
VALUE_TYPE_PKCS7_WSTEP = WSTEP + "#PKCS7"
VALUE_TYPE_X509V3 = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-x509-token-profile-1.0#X509v3"
VALUE_TYPE_PROVISION_DOC = (
    "http://schemas.microsoft.com/5.0.0.0/ConfigurationManager/Enrollment/DeviceEnrollmentProvisionDoc"
)
ENCODING_TYPE_BASE64 = WSSE + "#base64binary"
PASSWORD_TEXT = (
    "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-username-token-profile-1.0#PasswordText"
)

_XML_DECLARATION = b'<?xml version="1.0" encoding="utf-8"?>'


# --------------------------------------------------------------------------
# Faults (MS-MDE2 2.2.10)
# --------------------------------------------------------------------------
class FaultCode(enum.Enum):
    """SOAP fault subcodes Windows maps one to one onto MENROLL error codes.

    Each member carries the prefix Microsoft writes, the subcode, the
    namespace that prefix is bound to on the wire, and the HRESULT the user
    sees.  ``s:`` codes live in the SOAP 1.2 namespace.  The two ``a:`` codes
    are WCF's own: WCF binds ``a`` to its dispatcher namespace for
    ``InternalServiceFault`` and to the WS-Security namespace for
    ``InvalidSecurity``, declared on the ``s:Value`` element itself, so the
    text stays ``a:<Subcode>`` exactly as in the MS-MDE2 table while the
    QName resolves to the namespace that defines it.
    """

    prefix: str
    subcode: str
    namespace: str
    hresult: int

    MESSAGE_FORMAT = ("s", "MessageFormat", SOAP12, 0x80180001)
    AUTHENTICATION = ("s", "Authentication", SOAP12, 0x80180002)
    AUTHORIZATION = ("s", "Authorization", SOAP12, 0x80180003)
    CERTIFICATE_REQUEST = ("s", "CertificateRequest", SOAP12, 0x80180004)
    ENROLLMENT_SERVER = ("s", "EnrollmentServer", SOAP12, 0x80180005)
    INTERNAL_SERVICE_FAULT = ("a", "InternalServiceFault", WCF_DISPATCHER, 0x80180006)
    INVALID_SECURITY = ("a", "InvalidSecurity", WSSE, 0x80180007)

    def __init__(self, prefix: str, subcode: str, namespace: str, hresult: int) -> None:
        self.prefix = prefix
        self.subcode = subcode
        self.namespace = namespace
        self.hresult = hresult

    @property
    def qname(self) -> str:
        """The subcode as written on the wire, e.g. ``s:MessageFormat``."""
        return f"{self.prefix}:{self.subcode}"


class ErrorType(enum.StrEnum):
    """``deviceenrollmentserviceerror/errortype`` values (MS-MDE2 2.2.10).

    When present, Windows reports the matching MENROLL code instead of the
    subcode's (HRESULT in the comment).
    """

    DEVICE_CAP_REACHED = "DeviceCapReached"  # 0x80180013
    DEVICE_NOT_SUPPORTED = "DeviceNotSupported"  # 0x80180014
    NOT_SUPPORTED = "NotSupported"  # 0x80180015
    NOT_ELIGIBLE_TO_RENEW = "NotEligibleToRenew"  # 0x80180016
    IN_MAINTENANCE = "InMaintenance"  # 0x80180017
    USER_LICENSE = "UserLicense"  # 0x80180018
    INVALID_ENROLLMENT_DATA = "InvalidEnrollmentData"  # 0x80180019
    # Win10 20H2+/Win11 show s:Reason/s:Text to the user (MS-MDE2 <19>).
    CUSTOM_SERVER_ERROR = "CustomServerError"  # 0x80180032


class SoapFault(Exception):
    """A protocol error to be answered with :func:`build_soap_fault`.

    ``reason`` goes on the wire and into logs: it says what was received and
    what is supported, and never contains secrets.
    """

    def __init__(self, code: FaultCode, reason: str, errortype: str | None = None) -> None:
        super().__init__(code, reason, errortype)
        self.code = code
        self.reason = reason
        self.errortype = errortype

    def __str__(self) -> str:
        suffix = f" [{self.errortype}]" if self.errortype else ""
        return f"{self.code.qname}{suffix}: {self.reason}"


# --------------------------------------------------------------------------
# Security tokens (WS-Security header content, MS-MDE2 3.3 and 3.4)
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class UsernameToken:
    """``wsse:UsernameToken`` (OnPremise AuthPolicy, MS-MDE2 3.3.4.1.1.1.3)."""

    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class BinarySecurityToken:
    """``wsse:BinarySecurityToken`` from the security header.

    ``value`` is the stripped element text, still encoded (normally base64 of
    the opaque DeviceEnrollmentUserToken).  It is a credential: kept out of
    ``repr`` so it cannot end up in a log line by accident.
    """

    value_type: str | None
    encoding_type: str | None
    value: str = field(repr=False)


SecurityToken = UsernameToken | BinarySecurityToken


@dataclass(frozen=True)
class SoapRequest:
    """A parsed SOAP 1.2 request: addressing headers, security tokens, body."""

    action: str
    message_id: str | None
    to: str | None
    security: tuple[SecurityToken, ...]
    body: etree._Element  # the single element child of s:Body


# --------------------------------------------------------------------------
# Element helpers shared by the protocol modules
# --------------------------------------------------------------------------
def local_name(element: etree._Element) -> str:
    """Local part of an element's tag ('' for non-elements)."""
    tag = element.tag
    if not isinstance(tag, str):
        return ""
    return tag.rpartition("}")[2]


def namespace_of(element: etree._Element) -> str | None:
    """Namespace URI of an element's tag, None when it has none."""
    tag = element.tag
    if not isinstance(tag, str) or not tag.startswith("{"):
        return None
    return tag[1:].partition("}")[0]


def child_elements(element: etree._Element) -> list[etree._Element]:
    """Element children only (no text, comments or processing instructions)."""
    return [child for child in element if isinstance(child.tag, str)]


def find_child(element: etree._Element, name: str) -> etree._Element | None:
    """First element child whose local name is ``name``, any namespace."""
    for child in child_elements(element):
        if local_name(child) == name:
            return child
    return None


def text_of(element: etree._Element | None) -> str:
    """Stripped text of a leaf element ('' when absent or empty)."""
    if element is None or element.text is None:
        return ""
    return element.text.strip()


def is_nil(element: etree._Element) -> bool:
    """True when ``xsi:nil`` is set to true on the element."""
    return (element.get(f"{{{XSI}}}nil") or "").strip() in ("true", "1")


def default_nsmap(namespace: str) -> dict[str, str]:
    """``nsmap`` making ``namespace`` the default one (``xmlns="..."``).

    lxml accepts a None key for the default namespace; lxml-stubs types nsmap
    keys as str only, hence the cast.
    """
    return cast("dict[str, str]", {None: namespace})


def clip(value: str | None, limit: int = 120) -> str:
    """Quote a received value for a fault reason or log line, bounded in length."""
    if value is None:
        return "nothing"
    text = value if len(value) <= limit else value[:limit] + "..."
    return repr(text)


def _describe_tag(element: etree._Element) -> str:
    ns = namespace_of(element)
    name = local_name(element)
    return f"{{{ns}}}{name}" if ns else name


# --------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------
def _parse_security(header: etree._Element) -> tuple[SecurityToken, ...]:
    tokens: list[SecurityToken] = []
    for security in header.iterchildren(f"{{{WSSE}}}Security"):
        for item in child_elements(security):
            if item.tag == f"{{{WSSE}}}UsernameToken":
                tokens.append(
                    UsernameToken(
                        username=text_of(item.find(f"{{{WSSE}}}Username")),
                        password=text_of(item.find(f"{{{WSSE}}}Password")),
                    )
                )
            elif item.tag == f"{{{WSSE}}}BinarySecurityToken":
                tokens.append(_parse_binary_security_token(item))
    return tuple(tokens)


def _bst_attribute(element: etree._Element, name: str) -> str | None:
    # Learn's samples write ValueType/EncodingType unprefixed; one RST sample
    # writes wsse:ValueType/wsse:EncodingType.  Accept both.
    value = element.get(name)
    if value is None:
        value = element.get(f"{{{WSSE}}}{name}")
    return value.strip() if value is not None else None


def _parse_binary_security_token(element: etree._Element) -> BinarySecurityToken:
    return BinarySecurityToken(
        value_type=_bst_attribute(element, "ValueType"),
        encoding_type=_bst_attribute(element, "EncodingType"),
        value=text_of(element),
    )


def parse_binary_security_token(element: etree._Element) -> BinarySecurityToken:
    """Parse a ``wsse:BinarySecurityToken`` element found anywhere (e.g. RST body)."""
    return _parse_binary_security_token(element)


def _optional_header_text(header: etree._Element, name: str) -> str | None:
    element = header.find(f"{{{WSA}}}{name}")
    value = text_of(element)
    return value or None


def parse_soap_request(data: bytes) -> SoapRequest:
    """Parse a SOAP 1.2 request body.

    :raises mdmd.xmlsafe.XMLInputError: not XML, DTD, too deep (plain 400).
    :raises SoapFault: XML but not an acceptable SOAP 1.2 request
        (``MessageFormat``).
    """
    root = parse_untrusted_xml(data)
    if root.tag != f"{{{SOAP12}}}Envelope":
        ns = namespace_of(root)
        if ns == SOAP11:
            reason = (
                f"received a SOAP 1.1 envelope (namespace {SOAP11}); "
                f"only SOAP 1.2 (namespace {SOAP12}) is supported"
            )
        elif local_name(root) == "Envelope":
            reason = (
                f"received an Envelope in namespace {clip(ns)}; "
                f"a SOAP 1.2 envelope (namespace {SOAP12}) is required"
            )
        else:
            reason = (
                f"received root element {clip(_describe_tag(root))}; "
                f"a SOAP 1.2 Envelope (namespace {SOAP12}) is required"
            )
        raise SoapFault(FaultCode.MESSAGE_FORMAT, reason)

    headers = root.findall(f"{{{SOAP12}}}Header")
    bodies = root.findall(f"{{{SOAP12}}}Body")
    if len(headers) > 1 or len(bodies) != 1:
        raise SoapFault(
            FaultCode.MESSAGE_FORMAT,
            f"received {len(headers)} s:Header and {len(bodies)} s:Body elements; "
            "a SOAP 1.2 envelope has at most one s:Header and exactly one s:Body",
        )
    if not headers:
        raise SoapFault(
            FaultCode.MESSAGE_FORMAT,
            "received no s:Header; the request needs a WS-Addressing a:Action header",
        )
    header = headers[0]

    actions = header.findall(f"{{{WSA}}}Action")
    if len(actions) != 1 or not text_of(actions[0]):
        raise SoapFault(
            FaultCode.MESSAGE_FORMAT,
            f"received {len(actions)} a:Action header(s) "
            f"(namespace {WSA}); exactly one non-empty a:Action is required",
        )
    action = text_of(actions[0])

    body_children = child_elements(bodies[0])
    if len(body_children) != 1:
        raise SoapFault(
            FaultCode.MESSAGE_FORMAT,
            f"received {len(body_children)} elements in s:Body; exactly one is required",
        )

    return SoapRequest(
        action=action,
        message_id=_optional_header_text(header, "MessageID"),
        to=_optional_header_text(header, "To"),
        security=_parse_security(header),
        body=body_children[0],
    )


def require_action(request: SoapRequest, expected: str) -> None:
    """Raise a ``MessageFormat`` fault unless the request's action is ``expected``."""
    if request.action != expected:
        raise SoapFault(
            FaultCode.MESSAGE_FORMAT,
            f"received action {clip(request.action)}; this service accepts {expected}",
        )


# --------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------
def _envelope(action: str, relates_to: str | None, activity_id: str) -> etree._Element:
    envelope = etree.Element(f"{{{SOAP12}}}Envelope", nsmap={"s": SOAP12, "a": WSA})
    header = etree.SubElement(envelope, f"{{{SOAP12}}}Header")
    action_el = etree.SubElement(header, f"{{{WSA}}}Action")
    action_el.set(f"{{{SOAP12}}}mustUnderstand", "1")
    action_el.text = action
    # MS-MDE2 samples: <ActivityId CorrelationId="..." xmlns="...Diagnostics">
    activity = etree.SubElement(header, f"{{{DIAGNOSTICS}}}ActivityId", nsmap=default_nsmap(DIAGNOSTICS))
    activity.set("CorrelationId", activity_id)
    activity.text = activity_id
    if relates_to is not None:
        etree.SubElement(header, f"{{{WSA}}}RelatesTo").text = relates_to
    return envelope


def _serialize(envelope: etree._Element) -> bytes:
    return _XML_DECLARATION + etree.tostring(envelope, encoding="utf-8", xml_declaration=False)


def build_soap_response(
    action: str,
    relates_to: str | None,
    body: etree._Element,
    *,
    activity_id: str,
    extra_header: Sequence[etree._Element] = (),
) -> bytes:
    """Serialize a SOAP 1.2 response around ``body``.

    Header order: ``a:Action`` (mustUnderstand), ``ActivityId``,
    ``a:RelatesTo`` (omitted when the request had no MessageID), then
    ``extra_header``.  ``s:Body`` declares ``xsi`` and ``xsd`` like
    Microsoft's samples, so ``xsi:nil`` in the body needs no further
    declaration.  ``body`` and ``extra_header`` are copied, never moved.
    """
    envelope = _envelope(action, relates_to, activity_id)
    header = envelope[0]
    for element in extra_header:
        header.append(copy.deepcopy(element))
    soap_body = etree.SubElement(envelope, f"{{{SOAP12}}}Body", nsmap={"xsi": XSI, "xsd": XSD})
    soap_body.append(copy.deepcopy(body))
    return _serialize(envelope)


def build_soap_fault(
    fault: SoapFault,
    relates_to: str | None,
    *,
    activity_id: str,
    trace_id: str,
) -> bytes:
    """Serialize ``fault`` as a SOAP 1.2 fault (MS-MDE2 2.2.10).

    ``s:Code/s:Value`` is ``s:Receiver`` as in Microsoft's samples; Windows
    keys on the subcode.  ``s:Detail/deviceenrollmentserviceerror`` is sent
    only when the fault has an ``errortype``: that element exists to carry
    one, Microsoft's plain faults have no detail, and how Windows treats a
    detail without errortype is unknown.  When present it carries
    ``errortype``, ``message`` (the reason) and ``traceid`` (``trace_id``,
    logged by the client for support).
    """
    envelope = _envelope(ACTION_FAULT, relates_to, activity_id)
    soap_body = etree.SubElement(envelope, f"{{{SOAP12}}}Body")
    fault_el = etree.SubElement(soap_body, f"{{{SOAP12}}}Fault")

    code = etree.SubElement(fault_el, f"{{{SOAP12}}}Code")
    etree.SubElement(code, f"{{{SOAP12}}}Value").text = "s:Receiver"
    subcode = etree.SubElement(code, f"{{{SOAP12}}}Subcode")
    nsmap = {} if fault.code.namespace == SOAP12 else {fault.code.prefix: fault.code.namespace}
    subcode_value = etree.SubElement(subcode, f"{{{SOAP12}}}Value", nsmap=nsmap)
    subcode_value.text = fault.code.qname

    reason = etree.SubElement(fault_el, f"{{{SOAP12}}}Reason")
    text = etree.SubElement(reason, f"{{{SOAP12}}}Text")
    text.set(f"{{{XML}}}lang", "en-us")
    text.text = fault.reason

    if fault.errortype is not None:
        detail = etree.SubElement(fault_el, f"{{{SOAP12}}}Detail")
        error = etree.SubElement(
            detail, f"{{{WSTEP}}}deviceenrollmentserviceerror", nsmap=default_nsmap(WSTEP)
        )
        etree.SubElement(error, f"{{{WSTEP}}}errortype").text = str(fault.errortype)
        etree.SubElement(error, f"{{{WSTEP}}}message").text = fault.reason
        etree.SubElement(error, f"{{{WSTEP}}}traceid").text = trace_id
    return _serialize(envelope)


# --------------------------------------------------------------------------
# Templates: a response serialized once, its per-request values joined in
# --------------------------------------------------------------------------
# A placeholder is a field name between two U+E000: a legal XML character
# (private use) that lxml writes as itself in UTF-8 and that nothing mdmd
# sends contains.
_MARK = "\ue000"
_PLACEHOLDER = re.compile(("\ue000([a-z_]+)\ue000").encode())
# What XML 1.0 (2.2) does not allow in a document at all; lxml refuses to
# set such text, and so does a template.
_ASCII_NOT_XML = bytes(set(range(0x20)) - {0x09, 0x0A, 0x0D})
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
# The escapes libxml2 writes (xmlEscapeContent, xmlAttrSerializeTxtContent),
# so that a filled template is the very bytes lxml would have written.
_TEXT_ESCAPES = ("&<>\r", str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", "\r": "&#13;"}))
_ATTRIBUTE_ESCAPES = (
    '&<>"\r\n\t',
    str.maketrans(
        {
            "&": "&amp;",
            "<": "&lt;",
            ">": "&gt;",
            '"': "&quot;",
            "\r": "&#13;",
            "\n": "&#10;",
            "\t": "&#9;",
        }
    ),
)


def placeholder(name: str) -> str:
    """The text to put where a :class:`SoapTemplate` field goes (``[a-z_]+``)."""
    if not re.fullmatch("[a-z_]+", name):
        raise ValueError(f"placeholder names are lower-case letters and '_', got {name!r}")
    return f"{_MARK}{name}{_MARK}"


class XMLTemplate:
    """Serialized XML cut at its :func:`placeholder` marks; :meth:`fill`
    joins values in, escaped as libxml2 escapes text and attribute values,
    so that the result is the bytes lxml would have written for a tree with
    those values."""

    __slots__ = ("_fields", "_pieces")

    def __init__(self, serialized: bytes) -> None:
        parts = _PLACEHOLDER.split(serialized)
        self._pieces = parts[0::2]
        fields: list[tuple[str, bool]] = []
        for before, name in zip(parts[0::2], parts[1::2], strict=False):
            # Inside a start tag (an attribute value) when the last '<' before
            # the placeholder comes after the last '>'.
            in_attribute = before.rfind(b"<") > before.rfind(b">")
            fields.append((name.decode("ascii"), in_attribute))
        self._fields = tuple(fields)
        if _MARK.encode() in b"".join(self._pieces):
            raise ValueError("a placeholder mark is left in the template")

    def fill(self, values: Mapping[str, str]) -> bytes:
        pieces = self._pieces
        out = [pieces[0]]
        for n, (name, in_attribute) in enumerate(self._fields, 1):
            value = values[name]
            # ASCII (a base64 document, a time, a UUID) is checked as bytes,
            # at C speed; the regular expression is for the rest.
            if value.isascii():
                raw = value.encode("ascii")
                illegal = len(raw.translate(None, _ASCII_NOT_XML)) != len(raw)
            else:
                illegal = _NOT_XML.search(value) is not None
            if illegal:
                raise ValueError(f"{name}: not a legal XML character")
            specials, table = _ATTRIBUTE_ESCAPES if in_attribute else _TEXT_ESCAPES
            for special in specials:
                if special in value:
                    value = value.translate(table)
                    break
            out.append(value.encode("utf-8"))
            out.append(pieces[n])
        return b"".join(out)


class SoapTemplate:
    """What :func:`build_soap_response` returns for *body* and *extra_header*,
    built and serialized by lxml once; each response then only joins its
    values in (the ActivityId, the RelatesTo, and the fields whose
    :func:`placeholder` *body* or *extra_header* hold), escaped as lxml
    escapes them, so the bytes are the same as building it anew.  A response
    that is the same for every device (policy, discovery) costs a few
    microseconds instead of a tree build and a serialization."""

    __slots__ = ("_with_relates_to", "_without_relates_to")

    def __init__(
        self, action: str, body: etree._Element, *, extra_header: Sequence[etree._Element] = ()
    ) -> None:
        activity = placeholder("activity_id")
        self._with_relates_to = XMLTemplate(
            build_soap_response(
                action, placeholder("relates_to"), body, activity_id=activity, extra_header=extra_header
            )
        )
        self._without_relates_to = XMLTemplate(
            build_soap_response(action, None, body, activity_id=activity, extra_header=extra_header)
        )

    def render(self, relates_to: str | None, *, activity_id: str, **fields: str) -> bytes:
        if relates_to is None:
            return self._without_relates_to.fill({"activity_id": activity_id, **fields})
        return self._with_relates_to.fill({"activity_id": activity_id, "relates_to": relates_to, **fields})
