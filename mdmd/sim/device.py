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
import secrets
import uuid
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from lxml import etree

__all__ = ["EnrollmentResult", "ProtocolError", "RenewalSchedule", "WindowsDevice"]

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
DEVICE_ENROLLMENT_TOKEN = (
    "http://schemas.microsoft.com/5.0.0.0/ConfigurationManager/Enrollment/DeviceEnrollmentToken"
)
ISSUE = "http://docs.oasis-open.org/ws-sx/ws-trust/200512/Issue"
RENEW = "http://docs.oasis-open.org/ws-sx/ws-trust/200512/Renew"
PKCS10 = "http://schemas.microsoft.com/windows/pki/2009/01/enrollment#PKCS10"
PKCS7 = WSSE + "#PKCS7"
PASSWORD_TEXT = (
    "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-username-token-profile-1.0#PasswordText"
)
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
class RenewalSchedule:
    """``CertificateStore/My/WSTEP/Renew`` as provisioned: Windows renews by
    itself (ROBO) from *renew_period_days* before the certificate's end,
    every *retry_interval_days* while that fails, at *server_url*."""

    renew_period_days: int
    retry_interval_days: int
    server_url: str


@dataclass(frozen=True)
class EnrollmentResult:
    certificate: x509.Certificate
    root_certificates: tuple[x509.Certificate, ...]
    management_url: str
    provider_id: str
    provisioning_doc: bytes = field(repr=False)
    renewal: RenewalSchedule | None = None


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
    # elements (the captures in tests/data/windows, see SOURCES.md there).
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
        renewal = None
        for cs in wap.findall("characteristic[@type='CertificateStore']"):
            my = characteristic(cs, "My")
            wstep = characteristic(my, "WSTEP") if my is not None else None
            renew = characteristic(wstep, "Renew") if wstep is not None else None
            if renew is not None:
                renewal = _renewal_schedule(renew)
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
            renewal=renewal,
        )
        self.enrollment = result
        return result

    # -- certificate renewal (MS-MDE2 3.5, "ROBO") --

    def renewal_due(self, now: float) -> bool:
        """Whether Windows would renew now: the certificate is inside its
        renewal period and has not ended (an ended one is never renewed)."""
        e = self.enrollment
        if e is None or e.renewal is None:
            return False
        end = e.certificate.not_valid_after_utc.timestamp()
        return end - e.renewal.renew_period_days * 86400 <= now < end

    def _renewal_security_header(self) -> str:
        # Microsoft Learn's ROBO sample: a timestamp and a UsernameToken
        # with an empty password; the TLS client certificate authenticates.
        created = datetime.now(UTC)
        expires = created + timedelta(minutes=5)
        stamp = "%Y-%m-%dT%H:%M:%S.000Z"
        return (
            f'<wsse:Security s:mustUnderstand="1"><u:Timestamp u:Id="_0">'
            f"<u:Created>{created.strftime(stamp)}</u:Created><u:Expires>{expires.strftime(stamp)}</u:Expires>"
            f'</u:Timestamp><wsse:UsernameToken u:Id="uuid-{uuid.uuid4()}-5"><wsse:Username></wsse:Username>'
            f'<wsse:Password Type="{PASSWORD_TEXT}"></wsse:Password></wsse:UsernameToken></wsse:Security>'
        )

    def renewal_policies_request(self, policy_url: str) -> bytes:
        """GetPolicies during a renewal: no enrollment token, the TLS client
        certificate speaks for the device."""
        return self.get_policies_request(policy_url).replace(
            self._security_header().encode(), self._renewal_security_header().encode()
        )

    def renew_request(
        self, enrollment_url: str, new_key: rsa.RSAPrivateKey, *, signer_key: Any = None
    ) -> bytes:
        """The ROBO RequestSecurityToken: a PKCS#7 SignedData (raw DER
        content) around a PKCS#10 for *new_key*, signed with the current
        certificate's key (*signer_key* stands in for it in tests)."""
        e = self.enrollment
        if e is None:
            raise ProtocolError("the device is not enrolled")
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(
                x509.Name(
                    [x509.NameAttribute(NameOID.COMMON_NAME, f"{uuid.uuid4()}!{self.device_id}".upper()[:64])]
                )
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(new_key, hashes.SHA256())
            .public_bytes(Encoding.DER)
        )
        token = (
            pkcs7.PKCS7SignatureBuilder()
            .set_data(csr)
            .add_signer(e.certificate, signer_key or self.key, hashes.SHA256())
            .sign(Encoding.DER, [pkcs7.PKCS7Options.Binary])
        )
        bst = (
            f'<wsse:BinarySecurityToken ValueType="{PKCS7}" EncodingType="{BASE64}">'
            f"{base64.b64encode(token).decode()}</wsse:BinarySecurityToken>"
        )
        context = [
            ("OSEdition", "48"),
            ("OSVersion", self.os_version),
            ("DeviceName", self.hostname),
            ("EnrollmentType", self.enrollment_type),
            ("DeviceType", "CIMClient_Windows"),
            ("ApplicationVersion", self.os_version),
            ("DeviceID", self.device_id),
            ("HWDevID", self.hw_dev_id),
            ("Locale", "en-US"),
        ]
        items = "".join(
            f'<ac:ContextItem Name="{name}"><ac:Value>{_escape(value)}</ac:Value></ac:ContextItem>'
            for name, value in context
        )
        return _xml(f"""
            {_ENVELOPE}
            <s:Header>
            <a:Action s:mustUnderstand="1">{RST_ACTION}</a:Action>
            <a:MessageID>urn:uuid:{uuid.uuid4()}</a:MessageID>
            <a:ReplyTo><a:Address>{ANONYMOUS}</a:Address></a:ReplyTo>
            <a:To s:mustUnderstand="1">{_escape(enrollment_url)}</a:To>
            {self._renewal_security_header()}
            </s:Header>
            <s:Body>
            <wst:RequestSecurityToken>
            <wst:TokenType>{DEVICE_ENROLLMENT_TOKEN}</wst:TokenType>
            <wst:RequestType>{RENEW}</wst:RequestType>
            {bst}
            <ac:AdditionalContext xmlns="{AC}">{items}</ac:AdditionalContext>
            </wst:RequestSecurityToken>
            </s:Body>
            </s:Envelope>""")

    def renewed(self, answer: bytes, new_key: rsa.RSAPrivateKey) -> EnrollmentResult:
        """Install the renewal's certificate (MS-MDE2 3.5.4.1.1.2) and its key,
        as Windows does: from now on the device uses them."""
        e = self.enrollment
        if e is None:
            raise ProtocolError("the device is not enrolled")
        root = _parse(answer)
        fault = _fault(root)
        if fault:
            raise ProtocolError(f"renewal fault {fault}")
        bst = root.find(
            f"{{{S}}}Body/{{{WST}}}RequestSecurityTokenResponseCollection/"
            f"{{{WST}}}RequestSecurityTokenResponse/{{{WST}}}RequestedSecurityToken/"
            f"{{{WSSE}}}BinarySecurityToken"
        )
        if bst is None or bst.get("ValueType") != PROVISION_DOC:
            raise ProtocolError("renewal RSTRC without a DeviceEnrollmentProvisionDoc token")
        wap = _parse(base64.b64decode(bst.text or "", validate=True))
        store = "User" if self.enrollment_type == "Full" else "System"
        nodes = wap.findall(
            f"characteristic[@type='CertificateStore']/characteristic[@type='My']/characteristic[@type='{store}']/characteristic"
        )
        certs = []
        for node in nodes:
            value = node.find("parm[@name='EncodedCertificate']")
            if value is None:
                continue
            cert = x509.load_der_x509_certificate(base64.b64decode(value.get("value", "")))
            if cert.fingerprint(hashes.SHA1()).hex().upper() != node.get("type"):
                raise ProtocolError(f"thumbprint path {node.get('type')} does not match its certificate")
            if node.find("characteristic[@type='PrivateKeyContainer']") is None:
                raise ProtocolError("the renewed certificate has no PrivateKeyContainer")
            certs.append(cert)
        if len(certs) != 1:
            raise ProtocolError(f"{len(certs)} certificates in the renewal's CertificateStore/My/{store}")
        (cert,) = certs
        if cert.public_key().public_numbers() != new_key.public_key().public_numbers():  # type: ignore[union-attr]
            raise ProtocolError("the renewed certificate is not for the new key")
        self.key = new_key
        self.enrollment = replace(e, certificate=cert)
        return self.enrollment


def _renewal_schedule(renew: etree._Element) -> RenewalSchedule | None:
    params = {p.get("name"): (p.get("value"), p.get("datatype")) for p in renew if p.tag == "parm"}
    if params.get("ROBOSupport") != ("true", "boolean"):
        return None
    try:
        period, retry = int(params["RenewPeriod"][0] or ""), int(params["RetryInterval"][0] or "")
    except (KeyError, ValueError):
        raise ProtocolError("WSTEP/Renew without integer RenewPeriod and RetryInterval") from None
    # The CertificateStore CSP refuses anything else.
    if not (1 <= retry <= period <= 1000):
        raise ProtocolError(f"WSTEP/Renew RenewPeriod {period} / RetryInterval {retry} out of range")
    if params.get("RenewPeriod", (None, None))[1] != "integer" or params["RetryInterval"][1] != "integer":
        raise ProtocolError("WSTEP/Renew values must carry datatype integer")
    url = params.get("ServerURL", (None, None))[0] or ""
    if not url.startswith("https://"):
        raise ProtocolError(f"WSTEP/Renew ServerURL {url!r} is not an https URL")
    return RenewalSchedule(period, retry, url)


# -- OMA-DM (MS-MDM) --

SYNCML = "SYNCML:SYNCML1.2"
METINF = "syncml:metinf"
_SERVER_VERBS = ("Get", "Add", "Replace", "Delete", "Exec", "Atomic", "Sequence", "Alert")


@dataclass
class ServerMessage:
    """What the device read from one server reply."""

    msg_id: int
    hdr_status: int | None  # the server's verdict on our SyncHdr
    commands: list[etree._Element]
    final: bool
    statuses: list[tuple[str, str, int]]  # (MsgRef, CmdRef, code) the server sent us


class ManagementClient:
    """The Windows MDM client side of OMA-DM sessions for one device."""

    def __init__(self, device: WindowsDevice, *, max_msg_size: int | None = None) -> None:
        self.device = device
        self.max_msg_size = max_msg_size
        # Windows numbers its sessions; start anywhere so that two emulator
        # instances for one device do not reuse each other's SessionIDs.
        self.session_id = secrets.randbelow(0x8000)
        self.msg_id = 0
        # The device's management tree, as far as this emulator knows it.
        self.nodes: dict[str, tuple[str, str]] = {
            "./DevInfo/DevId": ("chr", device.device_id),
            "./DevInfo/Man": ("chr", "Microsoft Corporation"),
            "./DevInfo/Mod": ("chr", "Virtual Machine"),
            "./DevInfo/DmV": ("chr", "1.3"),
            "./DevInfo/Lang": ("chr", "en-US"),
            "./DevDetail/SwV": ("chr", device.os_version),
            "./DevDetail/OEM": ("chr", "Microsoft Corporation"),
            "./DevDetail/DevTyp": ("chr", "Virtual Machine"),
            "./DevDetail/FwV": ("chr", "Hyper-V UEFI Release v4.1"),
            "./DevDetail/HwV": ("chr", "Hyper-V UEFI Release v4.1"),
            "./DevDetail/Ext/Microsoft/DeviceName": ("chr", device.hostname),
            "./DevDetail/Ext/Microsoft/OSPlatform": ("chr", "Windows 11 Pro"),
            "./DevDetail/Ext/Microsoft/ProcessorArchitecture": ("int", "9"),
            "./DevDetail/Ext/Microsoft/TotalRAM": ("int", "8192"),
        }
        self.executed: list[str] = []
        self.server_url = ""

    def _hdr(self, server_url: str) -> str:
        meta = (
            f'<Meta><MaxMsgSize xmlns="{METINF}">{self.max_msg_size}</MaxMsgSize></Meta>'
            if self.max_msg_size
            else ""
        )
        return (
            f"<SyncHdr><VerDTD>1.2</VerDTD><VerProto>DM/1.2</VerProto>"
            f"<SessionID>{self.session_id:X}</SessionID><MsgID>{self.msg_id}</MsgID>"
            f"<Target><LocURI>{_escape(server_url)}</LocURI></Target>"
            f"<Source><LocURI>{_escape(self.device.device_id)}</LocURI></Source>{meta}</SyncHdr>"
        )

    def session_start(self, server_url: str, *, unenroll: bool = False, source: str | None = None) -> bytes:
        """Package 1 of a new session, as Windows sends it (fixtures)."""
        self.session_id = (self.session_id + 1) & 0xFFFF
        self.msg_id = 1
        self.server_url = server_url
        alerts = [
            "<Alert><CmdID>2</CmdID><Data>1201</Data></Alert>",
            "<Alert><CmdID>3</CmdID><Data>1224</Data><Item><Meta>"
            f'<Type xmlns="{METINF}">com.microsoft/MDM/LoginStatus</Type></Meta>'
            "<Data>user</Data></Item></Alert>",
        ]
        cmd_id = 4
        if unenroll:
            alerts.append(
                f"<Alert><CmdID>{cmd_id}</CmdID><Data>1226</Data><Item><Meta>"
                f'<Type xmlns="{METINF}">com.microsoft:mdm.unenrollment.userrequest</Type>'
                f'<Format xmlns="{METINF}">int</Format></Meta><Data>1</Data></Item></Alert>'
            )
            cmd_id += 1
        items = "".join(
            f"<Item><Source><LocURI>{uri}</LocURI></Source><Data>{_escape(self.nodes[uri][1])}</Data></Item>"
            for uri in (
                "./DevInfo/DevId",
                "./DevInfo/Man",
                "./DevInfo/Mod",
                "./DevInfo/DmV",
                "./DevInfo/Lang",
            )
        )
        hdr = self._hdr(server_url)
        if source is not None:
            hdr = hdr.replace(
                f"<Source><LocURI>{_escape(self.device.device_id)}</LocURI></Source>",
                f"<Source><LocURI>{_escape(source)}</LocURI></Source>",
            )
        return (
            f'<SyncML xmlns="{SYNCML}">{hdr}<SyncBody>{"".join(alerts)}'
            f"<Replace><CmdID>{cmd_id}</CmdID>{items}</Replace><Final/></SyncBody></SyncML>"
        ).encode()

    def read(self, reply: bytes) -> ServerMessage:
        root = _parse(reply)
        ns = f"{{{SYNCML}}}"
        if root.tag != f"{ns}SyncML":
            raise ProtocolError(f"reply root is {root.tag}, not SyncML 1.2")
        hdr = root.find(f"{ns}SyncHdr")
        body = root.find(f"{ns}SyncBody")
        if hdr is None or body is None:
            raise ProtocolError("reply lacks SyncHdr or SyncBody")
        if hdr.findtext(f"{ns}SessionID") != f"{self.session_id:X}":
            raise ProtocolError(f"reply SessionID {hdr.findtext(f'{ns}SessionID')} is not ours")
        if hdr.findtext(f"{ns}Target/{ns}LocURI") != self.device.device_id:
            raise ProtocolError("reply Target is not this device")
        statuses: list[tuple[str, str, int]] = []
        hdr_status = None
        commands: list[etree._Element] = []
        ids: set[str] = set()
        for child in body:
            name = etree.QName(child).localname
            cmd_id = child.findtext(f"{ns}CmdID") or ""
            if name != "Final":
                if cmd_id in ids:
                    raise ProtocolError(f"CmdID {cmd_id} repeated in one message")
                ids.add(cmd_id)
            if name == "Status":
                code = int(child.findtext(f"{ns}Data") or 0)
                ref = child.findtext(f"{ns}CmdRef") or ""
                statuses.append((child.findtext(f"{ns}MsgRef") or "", ref, code))
                if ref == "0":
                    hdr_status = code
            elif name in _SERVER_VERBS:
                commands.append(child)
            elif name != "Final":
                raise ProtocolError(f"unexpected {name} in the server's SyncBody")
        if statuses and statuses[0][1] != "0":
            raise ProtocolError("the first Status is not the SyncHdr's (MS-MDM 2.2.6.1)")
        return ServerMessage(
            msg_id=int(hdr.findtext(f"{ns}MsgID") or 0),
            hdr_status=hdr_status,
            commands=commands,
            final=body.find(f"{ns}Final") is not None,
            statuses=statuses,
        )

    def respond(self, message: ServerMessage) -> bytes | None:
        """The device's next message, or None when the session is over."""
        ns = f"{{{SYNCML}}}"
        if message.hdr_status not in (200, 212):
            raise ProtocolError(f"server refused our SyncHdr with status {message.hdr_status}")
        if not message.commands and message.final:
            return None  # statuses only: the session ends (MS-MDM 2.2.6.1)
        self.msg_id += 1
        out: list[str] = [
            f"<Status><CmdID>1</CmdID><MsgRef>{message.msg_id}</MsgRef><CmdRef>0</CmdRef>"
            f"<Cmd>SyncHdr</Cmd><Data>200</Data></Status>"
        ]
        next_id = 2

        def status(cmd_ref: str, verb: str, code: int) -> None:
            nonlocal next_id
            out.append(
                f"<Status><CmdID>{next_id}</CmdID><MsgRef>{message.msg_id}</MsgRef>"
                f"<CmdRef>{_escape(cmd_ref)}</CmdRef><Cmd>{verb}</Cmd><Data>{code}</Data></Status>"
            )
            next_id += 1

        def execute(cmd: etree._Element) -> None:
            nonlocal next_id
            verb = etree.QName(cmd).localname
            cmd_ref = cmd.findtext(f"{ns}CmdID") or ""
            if verb in ("Atomic", "Sequence"):
                status(cmd_ref, verb, 200)
                for inner in cmd:
                    if etree.QName(inner).localname in _SERVER_VERBS:
                        execute(inner)
                return
            if verb == "Alert":
                status(cmd_ref, verb, 200)
                return
            items = cmd.findall(f"{ns}Item")
            uris = [i.findtext(f"{ns}Target/{ns}LocURI") or "" for i in items]
            if verb == "Get":
                found = [u for u in uris if u in self.nodes]
                if len(found) != len(uris):
                    status(cmd_ref, verb, 404)
                    return
                status(cmd_ref, verb, 200)
                results = "".join(
                    f"<Item><Source><LocURI>{_escape(u)}</LocURI></Source><Meta>"
                    f'<Format xmlns="{METINF}">{self.nodes[u][0]}</Format></Meta>'
                    f"<Data>{_escape(self.nodes[u][1])}</Data></Item>"
                    for u in found
                )
                out.append(
                    f"<Results><CmdID>{next_id}</CmdID><MsgRef>{message.msg_id}</MsgRef>"
                    f"<CmdRef>{_escape(cmd_ref)}</CmdRef><Cmd>Get</Cmd>{results}</Results>"
                )
                next_id += 1
                return
            if verb in ("Add", "Replace"):
                for item, uri in zip(items, uris, strict=True):
                    fmt = item.findtext(f"{ns}Meta/{{{METINF}}}Format") or "chr"
                    self.nodes[uri] = (fmt, item.findtext(f"{ns}Data") or "")
            elif verb == "Delete":
                if any(u not in self.nodes for u in uris):
                    status(cmd_ref, verb, 404)
                    return
                for uri in uris:
                    del self.nodes[uri]
            elif verb == "Exec":
                self.executed.extend(uris)
            status(cmd_ref, verb, 200)

        for cmd in message.commands:
            execute(cmd)
        if not message.final:
            # The server's package continues: ask for its next message, and
            # do not send Final while the server's package is open (OMA-DM
            # 1.2, multiple messages in package), as Windows does.
            out.append(f"<Alert><CmdID>{next_id}</CmdID><Data>1222</Data></Alert>")
        final = "<Final/>" if message.final else ""
        return (
            f'<SyncML xmlns="{SYNCML}">{self._hdr(self.server_url)}<SyncBody>{"".join(out)}'
            f"{final}</SyncBody></SyncML>"
        ).encode()
