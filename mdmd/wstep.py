"""MS-WSTEP RequestSecurityToken as profiled by MS-MDE2 3.4.

Parses the enrollment request (token type, request type, PKCS#10, the
AdditionalContext items) and builds the RequestSecurityTokenResponseCollection
that carries the provisioning document.  Authenticating the header token and
checking the CSR's signature happen elsewhere: this module only exposes them.

A renewal (``.../Renew``, MS-MDE2 3.5) has the same shape with a PKCS#7
(the new PKCS#10 signed with the key being renewed) instead of the PKCS#10;
the caller decides where it is served and checks it (:mod:`mdmd.renewal`).
Recovery (``.../Recovery``, MS-MDE2 3.6) is not served: mdmd never enables it
(``DMClient/.../Recovery``), so such a request gets a fault saying so.
"""

from __future__ import annotations

import base64
import binascii
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from lxml import etree

from mdmd.renewal import not_eligible
from mdmd.soap import (
    ACTION_RST_WSTEP,
    ACTION_RSTRC_WSTEP,
    ENCODING_TYPE_BASE64,
    REQUEST_TYPE_ISSUE,
    REQUEST_TYPE_RECOVERY,
    REQUEST_TYPE_RENEW,
    SOAP12,
    TOKEN_TYPE_DEVICE_ENROLLMENT,
    VALUE_TYPE_PKCS7,
    VALUE_TYPE_PKCS7_WSTEP,
    VALUE_TYPE_PKCS10,
    VALUE_TYPE_PROVISION_DOC,
    WSSE,
    WST,
    WSTEP,
    WSU,
    ErrorType,
    FaultCode,
    SoapFault,
    SoapRequest,
    SoapTemplate,
    child_elements,
    clip,
    default_nsmap,
    find_child,
    local_name,
    namespace_of,
    parse_binary_security_token,
    placeholder,
    require_action,
    text_of,
)

__all__ = [
    "TIMESTAMP_LIFETIME",
    "RequestSecurityToken",
    "build_request_security_token_response",
    "parse_request_security_token",
]

#: u:Created .. u:Expires span of the response's security header (Microsoft's
#: samples, Fleet and the POC all use 5 minutes).
TIMESTAMP_LIFETIME = timedelta(minutes=5)


@dataclass(frozen=True)
class RequestSecurityToken:
    """A request for the device's MDM certificate: Issue (MS-MDE2
    3.4.4.1.1.1) or Renew (MS-MDE2 3.5.4.1.1.1)."""

    token_type: str
    #: :data:`REQUEST_TYPE_ISSUE` or :data:`REQUEST_TYPE_RENEW`.
    request_type: str
    #: The decoded BinarySecurityToken: a PKCS#10 (Issue), or a PKCS#7
    #: SignedData around the PKCS#10 (Renew).
    token_der: bytes = field(repr=False)
    #: AdditionalContext items in document order; names may repeat (one
    #: ``MAC`` item per network adapter).
    context: tuple[tuple[str, str], ...] = ()

    @property
    def is_renewal(self) -> bool:
        return self.request_type == REQUEST_TYPE_RENEW

    @property
    def csr_der(self) -> bytes:
        """The PKCS#10 of an Issue request."""
        if self.is_renewal:
            raise ValueError("a renewal carries a PKCS#7, not a bare PKCS#10")
        return self.token_der

    def context_value(self, name: str) -> str | None:
        """Value of the first context item called ``name``, None if absent."""
        for item_name, value in self.context:
            if item_name == name:
                return value
        return None

    def context_values(self, name: str) -> tuple[str, ...]:
        """Values of every context item called ``name``, in document order."""
        return tuple(value for item_name, value in self.context if item_name == name)

    @property
    def device_id(self) -> str:
        """The ``DeviceID`` item: the id Windows later puts in SyncML's Source LocURI.

        Always non-empty in an Issue request: :func:`parse_request_security_token`
        refuses one without it.  A renewal may leave it out (the certificate
        says which device it is).
        """
        return self.context_value("DeviceID") or ""


def _squash(value: str | None) -> str:
    # The spec prints some URIs with stray spaces ("…/2009/01/ enrollment#PKCS10");
    # the wire has none.  Compare with all whitespace removed.
    return "".join((value or "").split())


def _parse_context(element: etree._Element | None) -> tuple[tuple[str, str], ...]:
    if element is None:
        return ()
    items: list[tuple[str, str]] = []
    for item in child_elements(element):
        if local_name(item) != "ContextItem":
            continue
        name = (item.get("Name") or "").strip()
        if name:
            items.append((name, text_of(find_child(item, "Value"))))
    return tuple(items)


def _decode_token(value: str, what: str, refuse: Callable[[str], SoapFault]) -> bytes:
    # Windows may wrap the base64 at 64 columns (enroll-request.xml): drop all
    # whitespace, then decode strictly.
    compact = "".join(value.split())
    if not compact:
        raise refuse(f"received an empty {what} BinarySecurityToken; a base64 DER {what} is required")
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise refuse(
            f"received a {what} BinarySecurityToken that is not valid base64; a base64 DER {what} is required"
        ) from None


def _certificate_request(reason: str) -> SoapFault:
    return SoapFault(FaultCode.CERTIFICATE_REQUEST, reason)


def parse_request_security_token(req: SoapRequest) -> RequestSecurityToken:
    """Read a ``wst:RequestSecurityToken``: Issue or Renew.

    :raises SoapFault:
        ``MessageFormat`` for a wrong action, body, TokenType or RequestType
        and an Issue without a ``DeviceID`` context item;
        ``CertificateRequest`` with errortype ``NotSupported`` for Recovery;
        for a missing, mistyped or undecodable token, ``CertificateRequest``
        (Issue) or the ``NotEligibleToRenew`` fault (Renew).
    """
    require_action(req, ACTION_RST_WSTEP)
    body = req.body
    if local_name(body) != "RequestSecurityToken" or namespace_of(body) != WST:
        raise SoapFault(
            FaultCode.MESSAGE_FORMAT,
            f"received body element {clip(local_name(body))} in namespace "
            f"{clip(namespace_of(body))}; expected RequestSecurityToken in namespace {WST}",
        )

    token_type = text_of(find_child(body, "TokenType"))
    if _squash(token_type) != TOKEN_TYPE_DEVICE_ENROLLMENT:
        raise SoapFault(
            FaultCode.MESSAGE_FORMAT,
            f"received TokenType {clip(token_type)}; this server issues only {TOKEN_TYPE_DEVICE_ENROLLMENT}",
        )

    request_type = text_of(find_child(body, "RequestType"))
    squashed_type = _squash(request_type)
    if squashed_type == REQUEST_TYPE_RECOVERY:
        raise SoapFault(
            FaultCode.CERTIFICATE_REQUEST,
            f"received RequestType {squashed_type}; certificate recovery is not served "
            f"by this server, only {REQUEST_TYPE_ISSUE} and {REQUEST_TYPE_RENEW} "
            "(re-enroll the device instead)",
            ErrorType.NOT_SUPPORTED,
        )
    if squashed_type not in (REQUEST_TYPE_ISSUE, REQUEST_TYPE_RENEW):
        raise SoapFault(
            FaultCode.MESSAGE_FORMAT,
            f"received RequestType {clip(request_type)}; this server accepts "
            f"{REQUEST_TYPE_ISSUE} and {REQUEST_TYPE_RENEW}",
        )
    renewal = squashed_type == REQUEST_TYPE_RENEW
    # MS-MDE2 3.5.4.1.1.1 names the WS-Security namespace for the renewal's
    # PKCS#7 ValueType, the older MS-MDE the enrollment one: accept both.
    accepted = (VALUE_TYPE_PKCS7, VALUE_TYPE_PKCS7_WSTEP) if renewal else (VALUE_TYPE_PKCS10,)
    what = "PKCS#7" if renewal else "PKCS#10"
    refuse = not_eligible if renewal else _certificate_request

    bst_element = find_child(body, "BinarySecurityToken")
    if bst_element is None or namespace_of(bst_element) != WSSE:
        raise refuse(
            "received no wsse:BinarySecurityToken in RequestSecurityToken; "
            f"a {what} (ValueType {accepted[0]}) is required"
        )
    bst = parse_binary_security_token(bst_element)
    if _squash(bst.value_type) not in accepted:
        raise refuse(
            f"received a BinarySecurityToken of ValueType {clip(bst.value_type)}; "
            f"this server accepts {' or '.join(accepted)} in a {squashed_type.rpartition('/')[2]} request"
        )
    # WSTEP allows EncodingType to be omitted; when present it must be base64.
    if bst.encoding_type is not None and _squash(bst.encoding_type) != ENCODING_TYPE_BASE64:
        raise refuse(
            f"received a BinarySecurityToken of EncodingType {clip(bst.encoding_type)}; "
            f"this server accepts {ENCODING_TYPE_BASE64}"
        )
    token_der = _decode_token(bst.value, what, refuse)

    # MS-MDE2 2.2.1 binds "ac" to the wstep namespace while the wire uses the
    # authorization one: match AdditionalContext by local name.
    context = _parse_context(find_child(body, "AdditionalContext"))
    rst = RequestSecurityToken(
        token_type=TOKEN_TYPE_DEVICE_ENROLLMENT,
        request_type=squashed_type,
        token_der=token_der,
        context=context,
    )
    if not renewal and not rst.context_value("DeviceID"):
        raise SoapFault(
            FaultCode.MESSAGE_FORMAT,
            "received no DeviceID item in AdditionalContext; MS-MDE2 3.4.4.1.1.1 requires it",
        )
    return rst


def _timestamp(moment: datetime) -> str:
    # Microsoft's samples: UTC, millisecond precision, "Z" suffix.
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{moment.microsecond // 1000:03d}Z"


def _security_header() -> etree._Element:
    security = etree.Element(f"{{{WSSE}}}Security", nsmap={"o": WSSE, "u": WSU})
    security.set(f"{{{SOAP12}}}mustUnderstand", "1")
    stamp = etree.SubElement(security, f"{{{WSU}}}Timestamp")
    stamp.set(f"{{{WSU}}}Id", "_0")
    etree.SubElement(stamp, f"{{{WSU}}}Created").text = placeholder("created")
    etree.SubElement(stamp, f"{{{WSU}}}Expires").text = placeholder("expires")
    return security


@functools.cache
def _rstrc_template() -> SoapTemplate:
    collection = etree.Element(f"{{{WST}}}RequestSecurityTokenResponseCollection", nsmap=default_nsmap(WST))
    response = etree.SubElement(collection, f"{{{WST}}}RequestSecurityTokenResponse")
    etree.SubElement(response, f"{{{WST}}}TokenType").text = TOKEN_TYPE_DEVICE_ENROLLMENT
    etree.SubElement(response, f"{{{WSTEP}}}DispositionMessage", nsmap=default_nsmap(WSTEP))
    requested = etree.SubElement(response, f"{{{WST}}}RequestedSecurityToken")
    token = etree.SubElement(requested, f"{{{WSSE}}}BinarySecurityToken", nsmap=default_nsmap(WSSE))
    token.set("ValueType", VALUE_TYPE_PROVISION_DOC)
    token.set("EncodingType", ENCODING_TYPE_BASE64)
    token.text = placeholder("provisioning_doc")
    request_id = etree.SubElement(response, f"{{{WSTEP}}}RequestID", nsmap=default_nsmap(WSTEP))
    request_id.text = "0"
    return SoapTemplate(ACTION_RSTRC_WSTEP, collection, extra_header=(_security_header(),))


def build_request_security_token_response(
    provisioning_doc: bytes,
    relates_to: str | None,
    *,
    activity_id: str,
    now: datetime,
) -> bytes:
    """Serialize the RSTRC carrying ``provisioning_doc`` (MS-MDE2 3.4.4.1.1.2).

    Exactly one RequestSecurityTokenResponse; children in the order Microsoft
    and Fleet use (TokenType, DispositionMessage, RequestedSecurityToken,
    RequestID); the document as single-line standard base64 with ValueType
    DeviceEnrollmentProvisionDoc.  ``now`` must be timezone-aware.
    """
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")
    created = now.astimezone(UTC)
    return _rstrc_template().render(
        relates_to,
        activity_id=activity_id,
        created=_timestamp(created),
        expires=_timestamp(created + TIMESTAMP_LIFETIME),
        provisioning_doc=base64.b64encode(provisioning_doc).decode("ascii"),
    )
