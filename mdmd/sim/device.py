"""An emulated Windows device, sans I/O: it builds the requests a Windows PC
with the orbit agent sends, in the shape Windows sends them, and reads the
answers.  Transports (the test suite's blocking HTTPS client, mdmd-sim's
Twisted client) move the bytes.

It deliberately does not reuse the server's parsers: a misreading shared by
both sides would go unnoticed.
"""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from lxml import etree

__all__ = ["EnrollmentResult", "ProtocolError", "WindowsDevice"]

S = "http://www.w3.org/2003/05/soap-envelope"
A = "http://www.w3.org/2005/08/addressing"
WSSE = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd"
WST = "http://docs.oasis-open.org/ws-sx/ws-trust/200512"
XCEP = "http://schemas.microsoft.com/windows/pki/2009/01/enrollmentpolicy"
DISCOVERY = "http://schemas.microsoft.com/windows/management/2012/01/enrollment"
USER_TOKEN = "http://schemas.microsoft.com/5.0.0.0/ConfigurationManager/Enrollment/DeviceEnrollmentUserToken"
PROVISION_DOC = (
    "http://schemas.microsoft.com/5.0.0.0/ConfigurationManager/Enrollment/DeviceEnrollmentProvisionDoc"
)
BASE64 = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd#base64binary"
WSU = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-utility-1.0.xsd"
AC = "http://schemas.xmlsoap.org/ws/2006/12/authorization"
DEVICE_ENROLLMENT_TOKEN = "http://schemas.microsoft.com/5.0.0.0/ConfigurationManager/Enrollment/DeviceEnrollmentToken"
ISSUE = "http://docs.oasis-open.org/ws-sx/ws-trust/200512/Issue"
PKCS10 = "http://schemas.microsoft.com/windows/pki/2009/01/enrollment#PKCS10"
RST_ACTION = "http://schemas.microsoft.com/windows/pki/2009/01/enrollment/RST/wstep"
ANONYMOUS = "http://www.w3.org/2005/08/addressing/anonymous"
_ENVELOPE = (
    f'<s:Envelope xmlns:s="{S}" xmlns:a="{A}" xmlns:u="{WSU}" '
    f'xmlns:wsse="{WSSE}" xmlns:wst="{WST}" xmlns:ac="{AC}">'
)
_CSR_TOKEN = f'<wsse:BinarySecurityToken ValueType="{PKCS10}" EncodingType="{BASE64}">'



class ProtocolError(Exception):
    """The server's answer is not what Windows would accept."""


@dataclass(frozen=True)
class EnrollmentResult:
    certificate: x509.Certificate
    root_certificates: tuple[x509.Certificate, ...]
    management_url: str
    provider_id: str
    provisioning_doc: bytes = field(repr=False)


def _parser() -> etree.XMLParser:
    return etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)


def _parse(data: bytes) -> etree._Element:
    try:
        return etree.fromstring(data, _parser())
    except etree.XMLSyntaxError as e:
        raise ProtocolError(f"answer is not XML: {e}") from None


def _fault(root: etree._Element) -> str | None:
    fault = root.find(f"{{{S}}}Body/{{{S}}}Fault")
    if fault is None:
        return None
    subcode = fault.findtext(f"{{{S}}}Code/{{{S}}}Subcode/{{{S}}}Value") or "?"
    reason = fault.findtext(f"{{{S}}}Reason/{{{S}}}Text") or ""
    return f"{subcode}: {reason}"


def _xml(text: str) -> bytes:
    # Windows sends each message as one line without whitespace between
    # elements (shared/fixtures/windows/SOURCES.md).
    return "".join(line.strip() for line in text.splitlines()).encode()


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


class WindowsDevice:
    """One PC: its agent identity, its MDM device identity and its key."""

    def __init__(
        self,
        *,
        key: rsa.RSAPrivateKey,
        hardware_uuid: str | None = None,
        device_id: str | None = None,
        hw_dev_id: str | None = None,
        hostname: str = "DESKTOP-SIM0001",
        enrollment_type: str = "Full",
        os_version: str = "10.0.22631.4460",
    ) -> None:
        self.key = key
        self.hardware_uuid = hardware_uuid or str(uuid.uuid4()).upper()
        # Windows' MDM DeviceID: 32 upper-case hex digits.
        self.device_id = device_id or uuid.uuid4().hex.upper()
        self.hw_dev_id = hw_dev_id or (uuid.uuid4().hex + uuid.uuid4().hex).upper()
        self.hostname = hostname
        self.enrollment_type = enrollment_type
        self.os_version = os_version
        self.node_key: str | None = None
        self.enrollment: EnrollmentResult | None = None

    # -- orbit agent --

    def orbit_enroll_request(self, enroll_secret: str) -> dict[str, Any]:
        return {
            "enroll_secret": enroll_secret,
            "hardware_uuid": self.hardware_uuid,
            "hardware_serial": "SIM-" + self.hardware_uuid[:8],
            "hostname": self.hostname,
            "platform": "windows",
            "platform_like": "windows",
            "osquery_identifier": self.hardware_uuid,
            "computer_name": self.hostname,
            "hardware_model": "Virtual Machine",
        }

    def orbit_enrolled(self, answer: dict[str, Any]) -> None:
        key = answer.get("orbit_node_key")
        if not isinstance(key, str) or not key:
            raise ProtocolError(f"orbit enroll answer has no orbit_node_key: {answer!r}")
        self.node_key = key

    def orbit_config_request(self) -> dict[str, Any]:
        return {"orbit_node_key": self._node_key()}

    @staticmethod
    def discovery_endpoint(config: dict[str, Any]) -> str | None:
        """The discovery URL if the config asks for programmatic MDM enrollment."""
        notifications = config.get("notifications")
        if not isinstance(notifications, dict):
            raise ProtocolError(f"orbit config has no notifications object: {config!r}")
        if not notifications.get("needs_programmatic_windows_mdm_enrollment"):
            return None
        endpoint = notifications.get("windows_mdm_discovery_endpoint")
        if not isinstance(endpoint, str) or not endpoint.startswith("https://"):
            raise ProtocolError(f"enrollment requested without a usable discovery endpoint: {endpoint!r}")
        return endpoint

    def _node_key(self) -> str:
        if self.node_key is None:
            raise ProtocolError("the agent has not enrolled yet")
        return self.node_key

    def enrollment_token(self) -> str:
        # The agent hands Windows this JSON; Windows base64s it into the BST.
        token = {"type": 1, "payload": {"orbit_node_key": self._node_key(), "auth_token": ""}}
        return base64.b64encode(json.dumps(token, separators=(",", ":")).encode()).decode()

    # -- MS-MDE2 --

    def discover_request(self, discovery_url: str) -> bytes:
        return _xml(f"""
            <s:Envelope xmlns:a="{A}" xmlns:s="{S}">
            <s:Header>
            <a:Action s:mustUnderstand="1">{DISCOVERY}/IDiscoveryService/Discover</a:Action>
            <a:MessageID>urn:uuid:{uuid.uuid4()}</a:MessageID>
            <a:ReplyTo><a:Address>{ANONYMOUS}</a:Address></a:ReplyTo>
            <a:To s:mustUnderstand="1">{_escape(discovery_url)}</a:To>
            </s:Header>
            <s:Body>
            <Discover xmlns="{DISCOVERY}">
            <request xmlns:i="http://www.w3.org/2001/XMLSchema-instance">
            <EmailAddress></EmailAddress>
            <RequestVersion>5.0</RequestVersion>
            <DeviceType>CIMClient_Windows</DeviceType>
            <ApplicationVersion>{self.os_version}</ApplicationVersion>
            <OSEdition>48</OSEdition>
            <AuthPolicies><AuthPolicy>OnPremise</AuthPolicy><AuthPolicy>Federated</AuthPolicy></AuthPolicies>
            </request>
            </Discover>
            </s:Body>
            </s:Envelope>""")

    @staticmethod
    def discover_result(answer: bytes) -> tuple[str, str]:
        """(policy URL, enrollment URL) from a DiscoverResponse."""
        root = _parse(answer)
        fault = _fault(root)
        if fault:
            raise ProtocolError(f"discovery fault {fault}")
        result = root.find(f"{{{S}}}Body/{{{DISCOVERY}}}DiscoverResponse/{{{DISCOVERY}}}DiscoverResult")
        if result is None:
            raise ProtocolError("no DiscoverResponse/DiscoverResult")
        enrollment = result.findtext(f"{{{DISCOVERY}}}EnrollmentServiceUrl")
        policy = result.findtext(f"{{{DISCOVERY}}}EnrollmentPolicyServiceUrl")
        if not enrollment or not policy:
            raise ProtocolError("DiscoverResult lacks the service URLs")
        return policy, enrollment

    def _security_header(self) -> str:
        return (
            f'<wsse:Security s:mustUnderstand="1">'
            f'<wsse:BinarySecurityToken ValueType="{USER_TOKEN}" EncodingType="{BASE64}">'
            f"{self.enrollment_token()}</wsse:BinarySecurityToken></wsse:Security>"
        )

    def get_policies_request(self, policy_url: str) -> bytes:
        return _xml(f"""
            {_ENVELOPE}
            <s:Header>
            <a:Action s:mustUnderstand="1">{XCEP}/IPolicy/GetPolicies</a:Action>
            <a:MessageID>urn:uuid:{uuid.uuid4()}</a:MessageID>
            <a:ReplyTo><a:Address>{ANONYMOUS}</a:Address></a:ReplyTo>
            <a:To s:mustUnderstand="1">{_escape(policy_url)}</a:To>
            {self._security_header()}
            </s:Header>
            <s:Body xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xmlns:xsd="http://www.w3.org/2001/XMLSchema">
            <GetPolicies xmlns="{XCEP}">
            <client><lastUpdate xsi:nil="true"/><preferredLanguage xsi:nil="true"/></client>
            <requestFilter xsi:nil="true"/>
            </GetPolicies>
            </s:Body>
            </s:Envelope>""")

    @staticmethod
    def policy_min_key_bits(answer: bytes) -> int:
        root = _parse(answer)
        fault = _fault(root)
        if fault:
            raise ProtocolError(f"policy fault {fault}")
        bits = root.findtext(f".//{{{XCEP}}}privateKeyAttributes/{{{XCEP}}}minimalKeyLength")
        if bits is None or not bits.strip().isdigit():
            raise ProtocolError("GetPoliciesResponse has no minimalKeyLength")
        return int(bits)

    def certification_request(self) -> bytes:
        """A PKCS#10 like Windows': an opaque subject, client-auth EKU, SHA-256."""
        subject = x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, f"{uuid.uuid4()}!{self.device_id}".upper()[:64])]
        )
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(subject)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        from cryptography.hazmat.primitives.serialization import Encoding

        return csr.public_bytes(Encoding.DER)

    def enroll_request(self, enrollment_url: str, csr_der: bytes | None = None) -> bytes:
        csr = base64.b64encode(csr_der if csr_der is not None else self.certification_request()).decode()
        # Windows wraps the CSR base64 at 64 columns.
        wrapped = "\n".join(csr[i : i + 64] for i in range(0, len(csr), 64))
        context = [
            ("UXInitiated", "false"),
            ("HWDevID", self.hw_dev_id),
            ("Locale", "en-US"),
            ("TargetedUserLoggedIn", "true"),
            ("OSEdition", "48"),
            ("DeviceName", self.hostname),
            ("MAC", "00-15-5D-01-02-03"),
            ("MAC", "00-15-5D-01-02-04"),
            ("DeviceID", self.device_id),
            ("EnrollmentType", self.enrollment_type),
            ("DeviceType", "CIMClient_Windows"),
            ("OSVersion", self.os_version),
            ("ApplicationVersion", self.os_version),
            ("NotInOobe", "false"),
            ("RequestVersion", "5.0"),
        ]
        items = "".join(
            f'<ac:ContextItem Name="{name}"><ac:Value>{_escape(value)}</ac:Value></ac:ContextItem>'
            for name, value in context
        )
        envelope = _xml(f"""
            {_ENVELOPE}
            <s:Header>
            <a:Action s:mustUnderstand="1">{RST_ACTION}</a:Action>
            <a:MessageID>urn:uuid:{uuid.uuid4()}</a:MessageID>
            <a:ReplyTo><a:Address>{ANONYMOUS}</a:Address></a:ReplyTo>
            <a:To s:mustUnderstand="1">{_escape(enrollment_url)}</a:To>
            {self._security_header()}
            </s:Header>
            <s:Body>
            <wst:RequestSecurityToken>
            <wst:TokenType>{DEVICE_ENROLLMENT_TOKEN}</wst:TokenType>
            <wst:RequestType>{ISSUE}</wst:RequestType>
            {_CSR_TOKEN}@CSR@</wsse:BinarySecurityToken>
            <ac:AdditionalContext xmlns="{AC}">{items}</ac:AdditionalContext>
            </wst:RequestSecurityToken>
            </s:Body>
            </s:Envelope>""")
        return envelope.replace(b"@CSR@", wrapped.encode())

    def enrolled(self, answer: bytes) -> EnrollmentResult:
        """Install the provisioning document, as Windows would: check it."""
        root = _parse(answer)
        fault = _fault(root)
        if fault:
            raise ProtocolError(f"enrollment fault {fault}")
        bst = root.find(
            f"{{{S}}}Body/{{{WST}}}RequestSecurityTokenResponseCollection/"
            f"{{{WST}}}RequestSecurityTokenResponse/{{{WST}}}RequestedSecurityToken/"
            f"{{{WSSE}}}BinarySecurityToken"
        )
        if bst is None or bst.get("ValueType") != PROVISION_DOC:
            raise ProtocolError("RSTRC without a DeviceEnrollmentProvisionDoc token")
        doc = base64.b64decode(bst.text or "", validate=True)
        wap = _parse(doc)
        if wap.tag != "wap-provisioningdoc":
            raise ProtocolError("provisioning document is not a wap-provisioningdoc")

        def characteristic(parent: etree._Element, kind: str) -> etree._Element | None:
            for child in parent:
                if child.tag == "characteristic" and child.get("type") == kind:
                    return child
            return None

        roots: list[x509.Certificate] = []
        mine: x509.Certificate | None = None
        store = "User" if self.enrollment_type == "Full" else "System"
        for cs in wap.findall("characteristic[@type='CertificateStore']"):
            for path, sink in ((("Root", "System"), "root"), (("My", store), "my")):
                node: etree._Element | None = cs
                for kind in path:
                    node = characteristic(node, kind) if node is not None else None
                if node is None:
                    continue
                for thumb in node:
                    if thumb.get("type") == "PrivateKeyContainer":
                        continue
                    value = thumb.find("parm[@name='EncodedCertificate']")
                    if value is None:
                        continue
                    cert = x509.load_der_x509_certificate(base64.b64decode(value.get("value", "")))
                    # Windows names each certificate by its SHA-1 thumbprint.
                    if cert.fingerprint(hashes.SHA1()).hex().upper() != thumb.get("type"):
                        raise ProtocolError(
                            f"thumbprint path {thumb.get('type')} does not match its certificate"
                        )
                    if sink == "root":
                        roots.append(cert)
                    else:
                        mine = cert
        if mine is None:
            raise ProtocolError(f"no certificate in CertificateStore/My/{store}")
        if mine.public_key().public_numbers() != self.key.public_key().public_numbers():  # type: ignore[union-attr]
            raise ProtocolError("the issued certificate is not for this device's key")
        app = wap.find("characteristic[@type='APPLICATION']")
        if app is None:
            raise ProtocolError("no w7 APPLICATION characteristic")
        params = {p.get("name"): p.get("value") for p in app.findall("parm")}
        if params.get("APPID") != "w7" or not params.get("ADDR"):
            raise ProtocolError("APPLICATION is not a w7 account with an ADDR")
        result = EnrollmentResult(
            certificate=mine,
            root_certificates=tuple(roots),
            management_url=str(params["ADDR"]),
            provider_id=str(params.get("PROVIDER-ID") or ""),
            provisioning_doc=doc,
        )
        self.enrollment = result
        return result
