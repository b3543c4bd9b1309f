"""Building MS-MDE2 enrollment requests and reading mdmd's answers, for the
enrollment tests (test_orbit, test_enrollment_e2e, test_enrollment_bad_input).

Deliberately independent of mdmd's own parsers and builders: every namespace
is spelled out here and every answer is read with lxml by explicit
(namespace, local name) pairs, so that a misreading shared by server and
tests cannot go unnoticed.
"""

from __future__ import annotations

import base64
import json
import re
import ssl
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from http.client import HTTPResponse
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from lxml import etree

import harness
from harness import Daemon

# --- namespaces and URIs (MS-MDE2 2.2.1, MS-XCEP, MS-WSTEP) ---
S12 = "http://www.w3.org/2003/05/soap-envelope"
S11 = "http://schemas.xmlsoap.org/soap/envelope/"
WSA = "http://www.w3.org/2005/08/addressing"
WSSE = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd"
WSU = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-utility-1.0.xsd"
WST = "http://docs.oasis-open.org/ws-sx/ws-trust/200512"
AC = "http://schemas.xmlsoap.org/ws/2006/12/authorization"
XCEP = "http://schemas.microsoft.com/windows/pki/2009/01/enrollmentpolicy"
WSTEP = "http://schemas.microsoft.com/windows/pki/2009/01/enrollment"
DISCOVERY = "http://schemas.microsoft.com/windows/management/2012/01/enrollment"
DIAGNOSTICS = "http://schemas.microsoft.com/2004/09/ServiceModel/Diagnostics"
XSI = "http://www.w3.org/2001/XMLSchema-instance"

ACTION_DISCOVER = DISCOVERY + "/IDiscoveryService/Discover"
ACTION_DISCOVER_RESPONSE = DISCOVERY + "/IDiscoveryService/DiscoverResponse"
ACTION_GET_POLICIES = XCEP + "/IPolicy/GetPolicies"
ACTION_GET_POLICIES_RESPONSE = XCEP + "/IPolicy/GetPoliciesResponse"
ACTION_RST = WSTEP + "/RST/wstep"
ACTION_RSTRC = WSTEP + "/RSTRC/wstep"

USER_TOKEN = "http://schemas.microsoft.com/5.0.0.0/ConfigurationManager/Enrollment/DeviceEnrollmentUserToken"
DEVICE_ENROLLMENT_TOKEN = (
    "http://schemas.microsoft.com/5.0.0.0/ConfigurationManager/Enrollment/DeviceEnrollmentToken"
)
PROVISION_DOC = (
    "http://schemas.microsoft.com/5.0.0.0/ConfigurationManager/Enrollment/DeviceEnrollmentProvisionDoc"
)
PKCS10 = WSTEP + "#PKCS10"
PKCS7 = WSSE + "#PKCS7"
BASE64_ENCODING = WSSE + "#base64binary"
ISSUE = WST + "/Issue"
RENEW = WST + "/Renew"
PASSWORD_TEXT = (
    "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-username-token-profile-1.0#PasswordText"
)
ANONYMOUS = WSA + "/anonymous"

SOAP_CONTENT_TYPE = "application/soap+xml; charset=utf-8"
SYNCML_CONTENT_TYPE = "application/vnd.syncml.dm+xml"

ORBIT_ENROLL = "/api/fleet/orbit/enroll"
ORBIT_CONFIG = "/api/fleet/orbit/config"
DISCOVERY_PATH = "/api/mdm/microsoft/discovery"
POLICY_PATH = "/api/mdm/microsoft/policy"
ENROLL_PATH = "/api/mdm/microsoft/enroll"


# --- XML ---


def parse_xml(data: bytes) -> etree._Element:
    """Parse an answer without ever expanding entities or fetching anything."""
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)
    return etree.fromstring(data, parser)


def q(namespace: str, local: str) -> str:
    return f"{{{namespace}}}{local}"


def xml_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def resolve_qname_text(element: etree._Element) -> tuple[str | None, str]:
    """(namespace, local name) of a QName written as element text, e.g. ``s:MessageFormat``."""
    text = (element.text or "").strip()
    prefix, _, local = text.rpartition(":")
    return element.nsmap.get(prefix or None), local


# --- SOAP answers ---


@dataclass(frozen=True)
class Fault:
    value: tuple[str | None, str]  # s:Code/s:Value, resolved
    subcode: tuple[str | None, str]  # s:Code/s:Subcode/s:Value, resolved
    subcode_text: str  # as written, e.g. "s:MessageFormat"
    reason: str
    reason_lang: str | None
    errortype: str | None
    detail_message: str | None
    traceid: str | None


@dataclass(frozen=True)
class Answer:
    status: int
    content_type: str
    body: bytes
    content_length: str | None = None
    transfer_encoding: str | None = None

    @property
    def media_type(self) -> str:
        return self.content_type.split(";")[0].strip().lower()

    @property
    def root(self) -> etree._Element:
        return parse_xml(self.body)

    def header(self, namespace: str, local: str) -> etree._Element | None:
        root = self.root
        assert root.tag == q(S12, "Envelope"), root.tag
        header = root.find(q(S12, "Header"))
        assert header is not None, "answer has no s:Header"
        return header.find(q(namespace, local))

    @property
    def action(self) -> str | None:
        element = self.header(WSA, "Action")
        return None if element is None else (element.text or "").strip()

    @property
    def relates_to(self) -> str | None:
        element = self.header(WSA, "RelatesTo")
        return None if element is None else (element.text or "").strip()

    @property
    def activity_id(self) -> str | None:
        element = self.header(DIAGNOSTICS, "ActivityId")
        return None if element is None else element.get("CorrelationId")

    def body_child(self) -> etree._Element:
        body = self.root.find(q(S12, "Body"))
        assert body is not None, "answer has no s:Body"
        children = [c for c in body if isinstance(c.tag, str)]
        assert len(children) == 1, [c.tag for c in children]
        return children[0]

    @property
    def fault(self) -> Fault | None:
        child = self.body_child()
        if child.tag != q(S12, "Fault"):
            return None
        value = child.find(f"{q(S12, 'Code')}/{q(S12, 'Value')}")
        subcode = child.find(f"{q(S12, 'Code')}/{q(S12, 'Subcode')}/{q(S12, 'Value')}")
        text = child.find(f"{q(S12, 'Reason')}/{q(S12, 'Text')}")
        assert value is not None and subcode is not None and text is not None, self.body
        error = child.find(f"{q(S12, 'Detail')}/{q(WSTEP, 'deviceenrollmentserviceerror')}")
        return Fault(
            value=resolve_qname_text(value),
            subcode=resolve_qname_text(subcode),
            subcode_text=(subcode.text or "").strip(),
            reason=text.text or "",
            reason_lang=text.get("{http://www.w3.org/XML/1998/namespace}lang"),
            errortype=None if error is None else error.findtext(q(WSTEP, "errortype")),
            detail_message=None if error is None else error.findtext(q(WSTEP, "message")),
            traceid=None if error is None else error.findtext(q(WSTEP, "traceid")),
        )


def request(
    daemon: Daemon,
    method: str,
    path: str,
    body: bytes | None,
    content_type: str | None = SOAP_CONTENT_TYPE,
) -> tuple[HTTPResponse, bytes]:
    headers = {"User-Agent": "ENROLLClient"}
    if content_type is not None:
        headers["Content-Type"] = content_type
    return daemon.request(method, path, body, headers)


def post_soap(daemon: Daemon, path: str, body: bytes, content_type: str | None = SOAP_CONTENT_TYPE) -> Answer:
    response, data = request(daemon, "POST", path, body, content_type)
    return Answer(
        response.status,
        response.getheader("Content-Type") or "",
        data,
        response.getheader("Content-Length"),
        response.getheader("Transfer-Encoding"),
    )


# --- orbit agent ---


def orbit_enroll(
    daemon: Daemon,
    hardware_uuid: str | None = None,
    *,
    platform: str = "windows",
    hostname: str = "DESKTOP-TEST",
) -> tuple[str, str]:
    """Enroll a host with the agent API; (hardware_uuid, node key)."""
    hardware_uuid = hardware_uuid or str(uuid.uuid4()).upper()
    status, answer = daemon.post_json(
        ORBIT_ENROLL,
        {
            "enroll_secret": daemon.enroll_secret,
            "hardware_uuid": hardware_uuid,
            "hardware_serial": "SER-" + hardware_uuid[:8],
            "hostname": hostname,
            "platform": platform,
        },
    )
    assert status == 200, answer
    node_key = answer["orbit_node_key"]
    assert isinstance(node_key, str) and node_key
    return hardware_uuid, node_key


def orbit_config(daemon: Daemon, node_key: str) -> tuple[int, dict[str, object]]:
    return daemon.post_json(ORBIT_CONFIG, {"orbit_node_key": node_key})


def enrollment_token(
    node_key: str | None = None,
    *,
    token_type: object = 1,
    urlsafe: bool = False,
    padded: bool = True,
    payload: dict[str, object] | None = None,
) -> str:
    """The DeviceEnrollmentUserToken the agent hands Windows (base64 of JSON)."""
    if payload is None:
        payload = {"orbit_node_key": node_key}
    raw = json.dumps({"type": token_type, "payload": payload}, separators=(",", ":")).encode()
    text = (base64.urlsafe_b64encode(raw) if urlsafe else base64.b64encode(raw)).decode()
    return text if padded else text.rstrip("=")


# --- requests ---


@dataclass(frozen=True)
class Built:
    body: bytes
    message_id: str


def bst_security(token: str) -> str:
    return (
        f'<wsse:Security s:mustUnderstand="1"><wsse:BinarySecurityToken ValueType="{USER_TOKEN}" '
        f'EncodingType="{BASE64_ENCODING}">{xml_escape(token)}</wsse:BinarySecurityToken></wsse:Security>'
    )


def username_security(user: str = "demo", password: str = "demo") -> str:
    return (
        '<wsse:Security s:mustUnderstand="1"><wsse:UsernameToken u:Id="uuid-1">'
        f"<wsse:Username>{xml_escape(user)}</wsse:Username>"
        f'<wsse:Password wsse:Type="{PASSWORD_TEXT}">{xml_escape(password)}</wsse:Password>'
        "</wsse:UsernameToken></wsse:Security>"
    )


def envelope(
    action: str,
    to: str,
    body: str,
    *,
    security: str = "",
    envelope_ns: str = S12,
) -> Built:
    """One SOAP request as Windows sends it: one line, no whitespace between elements."""
    message_id = f"urn:uuid:{uuid.uuid4()}"
    text = (
        f'<s:Envelope xmlns:s="{envelope_ns}" xmlns:a="{WSA}" xmlns:u="{WSU}" xmlns:wsse="{WSSE}" '
        f'xmlns:wst="{WST}" xmlns:ac="{AC}">'
        "<s:Header>"
        f'<a:Action s:mustUnderstand="1">{xml_escape(action)}</a:Action>'
        f"<a:MessageID>{message_id}</a:MessageID>"
        f"<a:ReplyTo><a:Address>{ANONYMOUS}</a:Address></a:ReplyTo>"
        f'<a:To s:mustUnderstand="1">{xml_escape(to)}</a:To>'
        f"{security}"
        "</s:Header>"
        f"<s:Body>{body}</s:Body>"
        "</s:Envelope>"
    )
    return Built(text.encode(), message_id)


def discover_body(*, namespace: str = DISCOVERY, version: str = "5.0") -> str:
    return (
        f'<Discover xmlns="{namespace}"><request xmlns:i="{XSI}">'
        f"<EmailAddress></EmailAddress><RequestVersion>{version}</RequestVersion>"
        "<DeviceType>CIMClient_Windows</DeviceType><ApplicationVersion>10.0.22631.4460</ApplicationVersion>"
        "<OSEdition>48</OSEdition>"
        "<AuthPolicies><AuthPolicy>OnPremise</AuthPolicy><AuthPolicy>Federated</AuthPolicy></AuthPolicies>"
        "</request></Discover>"
    )


def get_policies_body() -> str:
    return (
        f'<GetPolicies xmlns="{XCEP}" xmlns:xsi="{XSI}"><client><lastUpdate xsi:nil="true"/>'
        '<preferredLanguage xsi:nil="true"/></client><requestFilter xsi:nil="true"/></GetPolicies>'
    )


def default_context(device_id: str | None, hw_dev_id: str | None = None) -> list[tuple[str, str]]:
    items = [
        ("UXInitiated", "false"),
        ("HWDevID", hw_dev_id or (uuid.uuid4().hex + uuid.uuid4().hex).upper()),
        ("Locale", "en-US"),
        ("OSEdition", "48"),
        ("DeviceName", "DESKTOP-TEST"),
        ("MAC", "00-15-5D-01-02-03"),
        ("EnrollmentType", "Full"),
        ("DeviceType", "CIMClient_Windows"),
        ("OSVersion", "10.0.22631.4460"),
        ("ApplicationVersion", "10.0.22631.4460"),
    ]
    if device_id is not None:
        items.append(("DeviceID", device_id))
    return items


def rst_body(
    csr_base64: str,
    context: Iterable[tuple[str, str]],
    *,
    request_type: str = ISSUE,
    escape_csr: bool = True,
    value_type: str = PKCS10,
) -> str:
    items = "".join(
        f'<ac:ContextItem Name="{xml_escape(name)}"><ac:Value>{xml_escape(value)}</ac:Value></ac:ContextItem>'
        for name, value in context
    )
    csr = xml_escape(csr_base64) if escape_csr else csr_base64
    return (
        "<wst:RequestSecurityToken>"
        f"<wst:TokenType>{DEVICE_ENROLLMENT_TOKEN}</wst:TokenType>"
        f"<wst:RequestType>{xml_escape(request_type)}</wst:RequestType>"
        f'<wsse:BinarySecurityToken ValueType="{value_type}" EncodingType="{BASE64_ENCODING}">'
        f"{csr}</wsse:BinarySecurityToken>"
        f'<ac:AdditionalContext xmlns="{AC}">{items}</ac:AdditionalContext>'
        "</wst:RequestSecurityToken>"
    )


def discover_request(daemon: Daemon, **kw: str) -> Built:
    return envelope(ACTION_DISCOVER, daemon.url("enrollment") + DISCOVERY_PATH, discover_body(**kw))


def policy_request(daemon: Daemon, security: str) -> Built:
    return envelope(
        ACTION_GET_POLICIES, daemon.url("enrollment") + POLICY_PATH, get_policies_body(), security=security
    )


def enroll_request(
    daemon: Daemon,
    security: str,
    csr_der: bytes,
    context: Iterable[tuple[str, str]],
    *,
    request_type: str = ISSUE,
    value_type: str = PKCS10,
) -> Built:
    csr = base64.b64encode(csr_der).decode()
    return envelope(
        ACTION_RST,
        daemon.url("enrollment") + ENROLL_PATH,
        rst_body(csr, context, request_type=request_type, value_type=value_type),
        security=security,
    )


def fixture_request(folder: Path, name: str, **values: str) -> bytes:
    """A fixture request with its ``{{PLACEHOLDERS}}`` substituted."""
    text = (folder / name).read_text(encoding="utf-8")
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    leftover = re.findall(r"\{\{[A-Z_]+\}\}", text)
    assert not leftover, f"{name}: placeholders left: {leftover}"
    return text.encode("utf-8")


def message_id_of(request_body: bytes) -> str:
    root = parse_xml(request_body)
    value = root.findtext(f"{q(S12, 'Header')}/{q(WSA, 'MessageID')}")
    assert value, "request has no a:MessageID"
    return value.strip()


# --- CSRs ---


def make_csr(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, cn: str = "TEST!DEVICE") -> bytes:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.DER)


def flip_signature_byte(csr_der: bytes) -> bytes:
    """The same CSR with one bit of its signature (the last DER bytes) flipped."""
    return csr_der[:-1] + bytes([csr_der[-1] ^ 0x01])


# --- the provisioning document ---


def provisioning_doc(answer: Answer) -> tuple[etree._Element, etree._Element]:
    """(the RSTR's BinarySecurityToken element, the decoded wap-provisioningdoc root)."""
    collection = answer.body_child()
    assert collection.tag == q(WST, "RequestSecurityTokenResponseCollection"), collection.tag
    responses = collection.findall(q(WST, "RequestSecurityTokenResponse"))
    assert len(responses) == 1
    bst = responses[0].find(f"{q(WST, 'RequestedSecurityToken')}/{q(WSSE, 'BinarySecurityToken')}")
    assert bst is not None, "RSTR without RequestedSecurityToken/wsse:BinarySecurityToken"
    raw = base64.b64decode((bst.text or "").strip(), validate=True)
    return bst, parse_xml(raw)


def characteristic(parent: etree._Element, *path: str) -> etree._Element | None:
    node: etree._Element | None = parent
    for kind in path:
        if node is None:
            return None
        matches = [c for c in node if c.tag == "characteristic" and c.get("type") == kind]
        assert len(matches) <= 1, f"{len(matches)} characteristics of type {kind}"
        node = matches[0] if matches else None
    return node


def characteristics(parent: etree._Element) -> list[etree._Element]:
    return [c for c in parent if c.tag == "characteristic"]


def parms(node: etree._Element) -> dict[str, str | None]:
    """Direct ``parm`` children, name -> value (None for a parm without value)."""
    out: dict[str, str | None] = {}
    for parm in node:
        if parm.tag == "parm":
            name = parm.get("name")
            assert name is not None and name not in out, f"duplicate or unnamed parm {name!r}"
            out[name] = parm.get("value")
    return out


def parm_datatypes(node: etree._Element) -> dict[str, str | None]:
    return {p.get("name") or "": p.get("datatype") for p in node if p.tag == "parm"}


# --- the store (read-only, as an auditor would) ---


def db_rows(daemon: Daemon, sql: str, *args: object) -> list[Any]:
    return harness.db_rows(daemon, sql, *args)


def row_counts(daemon: Daemon) -> dict[str, int]:
    return {
        table: int(db_rows(daemon, f"SELECT COUNT(*) FROM {table}")[0][0])
        for table in ("hosts", "devices", "certificates")
    }


def host_id(daemon: Daemon, hardware_uuid: str) -> int:
    rows = db_rows(daemon, "SELECT id FROM hosts WHERE hardware_uuid = ?", hardware_uuid)
    assert len(rows) == 1, rows
    return int(rows[0]["id"])


# --- the daemon's log ---


class LogWatch:
    """What the daemon logged since this object was made."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.offset = daemon.log_path.stat().st_size

    def text(self) -> str:
        with open(self.daemon.log_path, "rb") as f:
            f.seek(self.offset)
            return f.read().decode("utf-8", "replace")

    def wait_for(self, needle: str, timeout: float = 15.0) -> str:
        """Bounded polling until *needle* has been logged; the new text."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            if needle in text:
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} not logged within {timeout}s; new log text:\n{text}")
            time.sleep(0.02)

    def warn_lines(self) -> list[str]:
        return [line for line in self.text().splitlines() if "#warn]" in line]


def access_line(path: str, status: int) -> str:
    """The per-request info line the enrollment listener logs when a request ends."""
    return f"enrollment POST {path} {status} "


# --- TLS ---


def client_context(
    daemon: Daemon,
    directory: Path,
    cert: x509.Certificate,
    key: rsa.RSAPrivateKey,
) -> ssl.SSLContext:
    ctx = daemon.server_context()
    cert_path, key_path = directory / "device.pem", directory / "device.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    ctx.load_cert_chain(str(cert_path), str(key_path))
    return ctx
