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
import random
import re
import secrets
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import unquote

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from lxml import etree

__all__ = [
    "DEFAULT_WRITE_ONLY",
    "POLICY_CONFIG_ROOTS",
    "Drift",
    "EnrollmentResult",
    "ManagementClient",
    "ProtocolError",
    "RenewalSchedule",
    "ServerMessage",
    "WindowsDevice",
]

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

# The status codes the device answers with (OMA-DM RepPro 1.2 section 10;
# Windows lists the ones it uses in "OMA DM protocol support").
OK = 200
ROLLED_BACK = 216
NOT_FOUND = 404
NOT_ALLOWED = 405
ALREADY_EXISTS = 418
FAILED = 500
ATOMIC_FAILED = 507

# The Policy CSP's configuration roots.  A LocURI without ./Device or
# ./User is device scope (Policy CSP, "Policy scope"): the third root is
# the same place as the first on Windows; the emulator keeps each node
# under the LocURI the server wrote.
POLICY_CONFIG_ROOTS = (
    "./Device/Vendor/MSFT/Policy/Config",
    "./User/Vendor/MSFT/Policy/Config",
    "./Vendor/MSFT/Policy/Config",
)
# The interior nodes every Windows PC has whatever the server did: the
# policy roots and their ancestors (Get only).
_BUILTIN_INTERIOR = frozenset(
    root.rsplit("/", n)[0] for root in POLICY_CONFIG_ROOTS for n in range(root.count("/"))
)
# Nodes Windows writes but does not read back: the Accounts CSP's password
# of a new local user ("GET operation is not supported").  A `*` segment
# stands for any one segment (Windows node names are never `*`).
DEFAULT_WRITE_ONLY = frozenset(
    {
        "./Device/Vendor/MSFT/Accounts/Users/*/Password",
        "./Vendor/MSFT/Accounts/Users/*/Password",
    }
)
# The nodes a Windows 10/11 PC executes (Exec) and what each one does;
# every other Exec is 404, as for a node the PC does not have.  Device-scope
# CSPs answer under ./Device/Vendor/MSFT and ./Vendor/MSFT alike.
_EXEC_NODES: dict[str, str] = {
    "Reboot/RebootNow": "restart",
    "RemoteWipe/doWipe": "wipe",
    "RemoteWipe/doWipeProtected": "wipe",
    "RemoteWipe/doWipePersistProvisionedData": "wipe",
    "RemoteWipe/doWipePersistUserData": "wipe",
    "Defender/Scan": "scan",
    "Defender/UpdateSignature": "signature_update",
    "Defender/OfflineScan": "offline_scan",
    "BitLocker/RotateRecoveryPasswords": "rotate",
    "DMClient/Unenroll": "unenroll",  # the old form, still accepted (DMClient CSP)
}
_UNENROLL_RE = re.compile(r"DMClient/Provider/([^/]+)/Unenroll")
#: DevDetail's DNS computer name: Replace sets the name the PC takes at its
#: next restart (Windows 10 2004 and later).
DNS_COMPUTER_NAME = "./DevDetail/Ext/Microsoft/DNSComputerName"
_DEVICE_NAME = "./DevDetail/Ext/Microsoft/DeviceName"
_DNS_NAME_RE = re.compile(r"[A-Za-z0-9-]{1,63}")
# The formats drift() can change and keep valid.
DRIFTABLE_FORMATS = frozenset({"int", "bool", "chr", "float", "b64"})
_INT32_MAX = 2**31 - 1


def _matches(pattern: str, locuri: str) -> bool:
    """Whether *locuri* is *pattern*, a `*` segment standing for any one."""
    if "*" not in pattern:
        return pattern == locuri
    wanted, segments = pattern.split("/"), locuri.split("/")
    return len(wanted) == len(segments) and all(w in ("*", s) for w, s in zip(wanted, segments, strict=True))


def _changed_value(fmt: str, data: str) -> str:
    """Another value of format *fmt* than *data*: what a local administrator
    changing the setting would leave."""
    if fmt == "int":
        try:
            number = int(data)
        except ValueError:
            return "1"
        if number in (0, 1):  # most integer policies are switches
            return str(1 - number)
        return str(number + 1 if number < _INT32_MAX else number - 1)
    if fmt == "bool":
        return "false" if data.strip().lower() == "true" else "true"
    if fmt == "float":
        try:
            return repr(float(data) + 1.0)
        except ValueError:
            return "1.0"
    if fmt == "b64":
        try:
            raw = base64.b64decode(data)
        except ValueError:
            raw = b""
        return base64.b64encode(raw + b"\x00").decode()
    return f"{data}-local" if data else "local"


@dataclass(frozen=True)
class Drift:
    """A node changed on the device behind the server's back."""

    locuri: str
    format: str
    before: str
    after: str


@dataclass
class ServerMessage:
    """What the device read from one server reply."""

    msg_id: int
    hdr_status: int | None  # the server's verdict on our SyncHdr
    commands: list[etree._Element]
    final: bool
    statuses: list[tuple[str, str, int]]  # (MsgRef, CmdRef, code) the server sent us


def _verb(cmd: etree._Element) -> str:
    return etree.QName(cmd).localname


def _commands(parent: etree._Element) -> list[etree._Element]:
    return [child for child in parent if _verb(child) in _SERVER_VERBS]


class _Reply:
    """The device's answer to one server message, CmdIDs in order."""

    def __init__(self, msg_ref: int) -> None:
        self.msg_ref = msg_ref
        self.parts = [
            f"<Status><CmdID>1</CmdID><MsgRef>{msg_ref}</MsgRef><CmdRef>0</CmdRef>"
            f"<Cmd>SyncHdr</Cmd><Data>200</Data></Status>"
        ]
        self.next_id = 2

    def status(self, cmd_ref: str, verb: str, code: int) -> None:
        self.parts.append(
            f"<Status><CmdID>{self.next_id}</CmdID><MsgRef>{self.msg_ref}</MsgRef>"
            f"<CmdRef>{_escape(cmd_ref)}</CmdRef><Cmd>{verb}</Cmd><Data>{code}</Data></Status>"
        )
        self.next_id += 1

    def results(self, cmd_ref: str, found: list[tuple[str, str, str | None, str]]) -> None:
        items = "".join(
            f"<Item><Source><LocURI>{_escape(uri)}</LocURI></Source><Meta>"
            f'<Format xmlns="{METINF}">{_escape(fmt)}</Format>'
            + (f'<Type xmlns="{METINF}">{_escape(kind)}</Type>' if kind else "")
            + f"</Meta><Data>{_escape(data)}</Data></Item>"
            for uri, fmt, kind, data in found
        )
        self.parts.append(
            f"<Results><CmdID>{self.next_id}</CmdID><MsgRef>{self.msg_ref}</MsgRef>"
            f"<CmdRef>{_escape(cmd_ref)}</CmdRef><Cmd>Get</Cmd>{items}</Results>"
        )
        self.next_id += 1

    def next_message_alert(self) -> None:
        self.parts.append(f"<Alert><CmdID>{self.next_id}</CmdID><Data>1222</Data></Alert>")
        self.next_id += 1


class ManagementClient:
    """The Windows MDM client side of OMA-DM sessions for one device, with
    the device's management tree.

    ``nodes`` maps each LocURI to its ``(format, data)``, data kept as the
    server wrote it; ``types`` holds the Meta/Type of the nodes that have
    one.  DevInfo and DevDetail are built in and read-only; every other node
    exists because the server added or replaced it (``server_set``), or a
    test put it there.  The commands are answered with Windows' statuses:

    - Get: 200 and the node's value with its Format (and Type), 404 for an
      unknown node, 405 for a write-only node (``write_only``: LocURI
      patterns, a ``*`` segment matching any one segment).  An interior
      node answers with its children's names, ``/``-separated, Format node.
    - Add: 418 for an existing node, else the node is created (Windows'
      implicit Add: missing parents need not be added first).
    - Replace: applied to an existing node; a policy under one of
      ``POLICY_CONFIG_ROOTS`` that is not set yet is created (the Policy
      CSP accepts Replace of an unset policy); elsewhere an unknown node is
      404.  A built-in node or an interior node is 405.
    - Delete: the node and its subtree are removed (for a policy this is the
      Policy CSP restoring its default: a later Get is 404); 404 for an
      unknown node, 405 for a built-in one.
    - Exec: 200 for the nodes a PC executes (Reboot, RemoteWipe, DMClient's
      Unenroll of its own provider, Defender Scan with 1 or 2,
      UpdateSignature...), recorded in ``executed``; 404 for any other.
      What they do happens as on Windows: after ``RebootNow`` the PC
      restarts when the session ends, and its next session starts over
      (SessionID from 0, a renamed PC has its new name); after a wipe it
      answers and is gone (``gone``: no more sessions); after ``Unenroll``
      it ends the session without answering and reports the unenrollment
      with Alert 1226 in a new session, then is gone.
    - Replace of ``./DevDetail/Ext/Microsoft/DNSComputerName``: the name the
      PC takes at its next restart (a Get reads the current one).
    - Atomic: all or nothing.  A Get or an Atomic inside fails it (500);
      on a failure everything the Atomic did is undone, the failing command
      keeps its code, every other inner command gets 216 and the Atomic 507.
    - ``refused`` (LocURI pattern to status code, see :meth:`refuse`):
      Add, Replace, Delete and Exec of that node or anything under it fail
      with the code, as when a CSP rejects a value (500) or is missing on an
      edition (404).

    ``drift_rate`` is the probability that, at the start of a session, one
    node the server set has been changed locally (:meth:`drift`), chosen
    with ``rng``.
    """

    def __init__(
        self,
        device: WindowsDevice,
        *,
        max_msg_size: int | None = None,
        write_only: Iterable[str] = DEFAULT_WRITE_ONLY,
        refused: Mapping[str, int] | None = None,
        drift_rate: float = 0.0,
        rng: random.Random | None = None,
    ) -> None:
        if not 0.0 <= drift_rate <= 1.0:
            raise ValueError(f"drift_rate must be between 0 and 1, got {drift_rate}")
        self.device = device
        self.max_msg_size = max_msg_size
        # Windows numbers its sessions; start anywhere so that two emulator
        # instances for one device do not reuse each other's SessionIDs.
        self.session_id = secrets.randbelow(0x8000)
        self.msg_id = 0
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
            _DEVICE_NAME: ("chr", device.hostname),
            "./DevDetail/Ext/Microsoft/OSPlatform": ("chr", "Windows 11 Pro"),
            "./DevDetail/Ext/Microsoft/ProcessorArchitecture": ("int", "9"),
            "./DevDetail/Ext/Microsoft/TotalRAM": ("int", "8192"),
        }
        # DevInfo and DevDetail: "Supported operation is Get" (their CSP
        # pages), but for the DNS computer name (Get and Replace).
        self.read_only = frozenset(self.nodes)
        self.nodes[DNS_COMPUTER_NAME] = ("chr", device.hostname)
        self.types: dict[str, str] = {}
        self.server_set: set[str] = set()
        self.write_only: set[str] = set(write_only)
        self.refused: dict[str, int] = dict(refused or {})
        self.drift_rate = drift_rate
        self.rng = rng if rng is not None else random.Random()
        self.drifts: list[Drift] = []
        self.executed: list[str] = []
        self.server_url = ""
        # What the server's actions did to the PC.
        self.pending_name: str | None = None  # takes effect at the next restart
        self.restart_pending = False
        self.restarts = 0
        self.scans: list[str] = []  # "1" quick, "2" full
        self.wiped = False
        self.unenrolling = False  # its next session reports the unenrollment
        self.unenrolled = False

    @property
    def gone(self) -> bool:
        """Wiped or unenrolled: the PC has no MDM account any more and opens
        no session."""
        return self.wiped or self.unenrolled

    # -- the tree, for tests and mdmd-sim --

    def refuse(self, locuri: str, code: int = FAILED) -> None:
        """Make writes (Add, Replace, Delete, Exec) of *locuri* and of every
        node under it fail with *code*; a ``*`` segment matches any one."""
        self.refused[locuri] = code

    def drift(self, locuri: str | None = None) -> Drift | None:
        """Change *locuri*, or a node the server set chosen with ``rng``, to
        another value of its format, as a local administrator would; None
        when the server has set no node that can drift (write-only nodes
        cannot: nobody could see it)."""
        if locuri is None:
            candidates = sorted(
                uri
                for uri in self.server_set
                if self.nodes[uri][0] in DRIFTABLE_FORMATS and not self._write_only(uri)
            )
            if not candidates:
                return None
            locuri = self.rng.choice(candidates)
        elif locuri not in self.nodes or locuri in self.read_only:
            raise ValueError(f"{locuri} is not a node the server can have set")
        fmt, before = self.nodes[locuri]
        if fmt not in DRIFTABLE_FORMATS:
            raise ValueError(f"{locuri} has format {fmt}, which drift does not change")
        change = Drift(locuri, fmt, before, _changed_value(fmt, before))
        self.nodes[locuri] = (fmt, change.after)
        self.drifts.append(change)
        return change

    def tree_state(self) -> dict[str, dict[str, Any]]:
        """Every node that is not built in, JSON-ready (for saving a device)."""
        return {
            uri: {
                "format": fmt,
                "data": data,
                "type": self.types.get(uri),
                "server_set": uri in self.server_set,
            }
            for uri, (fmt, data) in self.nodes.items()
            if uri not in self.read_only
        }

    def restore_tree(self, state: Mapping[str, Mapping[str, Any]]) -> None:
        """Put back the nodes :meth:`tree_state` gave."""
        for uri, node in state.items():
            self.nodes[uri] = (str(node["format"]), str(node["data"]))
            if node.get("type"):
                self.types[uri] = str(node["type"])
            if node.get("server_set"):
                self.server_set.add(uri)

    def _write_only(self, locuri: str) -> bool:
        return any(_matches(pattern, locuri) for pattern in self.write_only)

    def _refusal(self, locuri: str) -> int | None:
        segments = locuri.split("/")
        for n in range(len(segments), 1, -1):
            node = "/".join(segments[:n])
            for pattern, code in self.refused.items():
                if _matches(pattern, node):
                    return code
        return None

    def _children(self, locuri: str) -> list[str]:
        prefix = locuri + "/"
        names = {
            uri[len(prefix) :].split("/", 1)[0]
            for uri in (*self.nodes, *_BUILTIN_INTERIOR)
            if uri.startswith(prefix)
        }
        return sorted(names)

    def _interior(self, locuri: str) -> bool:
        if locuri in _BUILTIN_INTERIOR:
            return True
        node = self.nodes.get(locuri)
        if node is not None:
            return node[0] == "node"
        prefix = locuri + "/"
        return any(uri.startswith(prefix) for uri in self.nodes)

    def _exists(self, locuri: str) -> bool:
        return locuri in self.nodes or self._interior(locuri)

    @staticmethod
    def _policy(locuri: str) -> bool:
        """Whether *locuri* names a policy: Policy/Config/Area/Policy."""
        for root in POLICY_CONFIG_ROOTS:
            if locuri.startswith(root + "/"):
                return locuri[len(root) + 1 :].count("/") == 1
        return False

    def _set(self, locuri: str, fmt: str, kind: str | None, data: str) -> None:
        self.nodes[locuri] = (fmt, "" if fmt == "node" else data)
        if kind:
            self.types[locuri] = kind
        else:
            self.types.pop(locuri, None)
        if fmt == "node":
            self.server_set.discard(locuri)
        else:
            self.server_set.add(locuri)

    def _get(self, locuri: str) -> tuple[int, tuple[str, str, str | None, str] | None]:
        # Windows checks the operation against the node's description before
        # looking the node up: a write-only node is 405 whether set or not.
        if self._write_only(locuri):
            return NOT_ALLOWED, None
        if not self._exists(locuri):
            return NOT_FOUND, None
        if self._interior(locuri):
            return OK, (locuri, "node", None, "/".join(self._children(locuri)))
        fmt, data = self.nodes[locuri]
        return OK, (locuri, fmt, self.types.get(locuri), data)

    def _add(self, locuri: str, fmt: str, kind: str | None, data: str) -> int:
        if self._exists(locuri):
            return ALREADY_EXISTS
        self._set(locuri, fmt, kind, data)
        return OK

    def _replace(self, locuri: str, fmt: str, kind: str | None, data: str) -> int:
        if not self._exists(locuri):
            if not self._policy(locuri):
                return NOT_FOUND
        elif locuri in self.read_only or self._interior(locuri):
            return NOT_ALLOWED
        self._set(locuri, fmt, kind, data)
        return OK

    def _delete(self, locuri: str) -> int:
        if not self._exists(locuri):
            return NOT_FOUND
        prefix = locuri + "/"
        subtree = [uri for uri in self.nodes if uri == locuri or uri.startswith(prefix)]
        if locuri in _BUILTIN_INTERIOR or any(uri in self.read_only for uri in subtree):
            return NOT_ALLOWED
        for uri in subtree:
            del self.nodes[uri]
            self.types.pop(uri, None)
            self.server_set.discard(uri)
        return OK

    def _write(self, cmd: etree._Element) -> int:
        """Add, Replace, Delete or Exec: the command's status code.  Items
        are applied in order; the first that fails stops the command."""
        ns = f"{{{SYNCML}}}"
        verb = _verb(cmd)
        meta_format = cmd.findtext(f"{ns}Meta/{{{METINF}}}Format")
        meta_type = cmd.findtext(f"{ns}Meta/{{{METINF}}}Type")
        for item in cmd.findall(f"{ns}Item"):
            locuri = item.findtext(f"{ns}Target/{ns}LocURI") or ""
            refusal = self._refusal(locuri)
            if refusal is not None:
                return refusal
            # OMA-DM: an Item's Meta overrides the command's; chr by default.
            fmt = item.findtext(f"{ns}Meta/{{{METINF}}}Format") or meta_format or "chr"
            kind = item.findtext(f"{ns}Meta/{{{METINF}}}Type") or meta_type
            data = item.findtext(f"{ns}Data") or ""
            if verb == "Replace" and locuri == DNS_COMPUTER_NAME:
                code = self._rename(data)
            elif verb == "Add":
                code = self._add(locuri, fmt, kind, data)
            elif verb == "Replace":
                code = self._replace(locuri, fmt, kind, data)
            elif verb == "Delete":
                code = self._delete(locuri)
            else:
                code = self._exec(locuri, data)
                if code == OK:
                    self.executed.append(locuri)
            if code != OK:
                return code
        return OK

    def _executes(self, locuri: str) -> str | None:
        """What an Exec of *locuri* does, or None (no such node)."""
        for root in ("./Device/Vendor/MSFT/", "./Vendor/MSFT/"):
            if locuri.startswith(root):
                node = locuri[len(root) :]
                match = _UNENROLL_RE.fullmatch(node)
                if match is not None:
                    enrollment = self.device.enrollment
                    mine = enrollment.provider_id if enrollment is not None else None
                    return "unenroll" if unquote(match.group(1)) == mine else None
                return _EXEC_NODES.get(node)
        return None

    def _exec(self, locuri: str, data: str) -> int:
        effect = self._executes(locuri)
        if effect is None:
            return NOT_FOUND
        if effect == "scan":
            if data not in ("1", "2"):
                return FAILED  # the CSP refuses any other scan type
            self.scans.append(data)
        return OK

    def _rename(self, name: str) -> int:
        if not _DNS_NAME_RE.fullmatch(name) or name.isdigit():
            return FAILED
        self.pending_name = name
        return OK

    def _atomic(self, atomic: etree._Element) -> list[tuple[str, str, int]]:
        """Run an Atomic: (CmdRef, verb, code) for it and then for every
        command inside, in document order."""
        ns = f"{{{SYNCML}}}"
        inner: list[etree._Element] = []

        def flatten(parent: etree._Element) -> None:
            for cmd in _commands(parent):
                inner.append(cmd)
                if _verb(cmd) in ("Atomic", "Sequence"):
                    flatten(cmd)

        flatten(atomic)
        saved = (
            dict(self.nodes),
            dict(self.types),
            set(self.server_set),
            len(self.executed),
            len(self.scans),
            self.pending_name,
        )
        codes: list[int] = []
        failed: int | None = None
        for i, cmd in enumerate(inner):
            verb = _verb(cmd)
            if failed is not None:
                code = ROLLED_BACK  # not run: nothing to undo
            elif verb in ("Get", "Atomic"):
                code = FAILED  # "OMA DM protocol support": not allowed in an Atomic
            elif verb in ("Sequence", "Alert"):
                code = OK
            else:
                code = self._write(cmd)
            codes.append(code)
            if failed is None and not 200 <= code < 300:
                failed = i
        ref = atomic.findtext(f"{ns}CmdID") or ""
        if failed is None:
            outcome = [(ref, "Atomic", OK)]
        else:
            nodes, types, server_set, executed, scans, self.pending_name = saved
            del self.scans[scans:]
            self.nodes.clear()
            self.nodes.update(nodes)
            self.types.clear()
            self.types.update(types)
            self.server_set.clear()
            self.server_set.update(server_set)
            del self.executed[executed:]
            codes = [code if i == failed else ROLLED_BACK for i, code in enumerate(codes)]
            outcome = [(ref, "Atomic", ATOMIC_FAILED)]
        return outcome + [
            (cmd.findtext(f"{ns}CmdID") or "", _verb(cmd), code)
            for cmd, code in zip(inner, codes, strict=True)
        ]

    def _execute(self, cmd: etree._Element, reply: _Reply) -> None:
        ns = f"{{{SYNCML}}}"
        verb = _verb(cmd)
        cmd_ref = cmd.findtext(f"{ns}CmdID") or ""
        if verb == "Atomic":
            for ref, inner_verb, code in self._atomic(cmd):
                reply.status(ref, inner_verb, code)
        elif verb == "Sequence":
            reply.status(cmd_ref, verb, OK)
            for inner in _commands(cmd):
                self._execute(inner, reply)
        elif verb == "Alert":
            reply.status(cmd_ref, verb, OK)
        elif verb == "Get":
            found = []
            for item in cmd.findall(f"{ns}Item"):
                code, node = self._get(item.findtext(f"{ns}Target/{ns}LocURI") or "")
                if node is None:
                    reply.status(cmd_ref, verb, code)
                    return
                found.append(node)
            reply.status(cmd_ref, verb, OK)
            reply.results(cmd_ref, found)
        else:
            reply.status(cmd_ref, verb, self._write(cmd))

    # -- the session --

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
        """Package 1 of a new session, as Windows sends it (fixtures).
        Raises :class:`ProtocolError` for a PC that is ``gone``."""
        if self.gone:
            raise ProtocolError(
                f"device {self.device.device_id} was {'wiped' if self.wiped else 'unenrolled'}: "
                "it has no MDM account any more"
            )
        if self.restart_pending:
            self._restart()
        if self.unenrolling:
            # The server's Unenroll: reported in a new session, then gone.
            unenroll = True
            self.unenrolling = False
            self.unenrolled = True
        self.session_id = (self.session_id + 1) & 0xFFFF
        self.msg_id = 1
        self.server_url = server_url
        if self.drift_rate and self.rng.random() < self.drift_rate:
            self.drift()
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

    def _restart(self) -> None:
        """The PC restarted: its sessions are numbered anew (Windows sends
        SessionID 0 first) and a new name is in effect."""
        self.restart_pending = False
        self.restarts += 1
        self.session_id = -1  # the next session is 0
        if self.pending_name is not None:
            self.device.hostname = self.pending_name
            self.nodes[DNS_COMPUTER_NAME] = ("chr", self.pending_name)
            self.nodes[_DEVICE_NAME] = ("chr", self.pending_name)
            self.pending_name = None

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
        if message.hdr_status not in (200, 212):
            raise ProtocolError(f"server refused our SyncHdr with status {message.hdr_status}")
        if not message.commands and message.final:
            return None  # statuses only: the session ends (MS-MDM 2.2.6.1)
        self.msg_id += 1
        reply = _Reply(message.msg_id)
        before = len(self.executed)
        for cmd in message.commands:
            self._execute(cmd, reply)
        effects = {self._executes(uri) for uri in self.executed[before:]}
        if "unenroll" in effects:
            # Windows aborts the session at once and does not answer the
            # Exec; the unenrollment is reported in a new session (Learn,
            # "Disconnecting from the management infrastructure").
            self.unenrolling = True
            return None
        if "wipe" in effects:
            self.wiped = True  # it answers, then the reset starts
        if "restart" in effects:
            self.restart_pending = True  # at the end of this session
        if not message.final:
            # The server's package continues: ask for its next message, and
            # do not send Final while the server's package is open (OMA-DM
            # 1.2, multiple messages in package), as Windows does.
            reply.next_message_alert()
        final = "<Final/>" if message.final else ""
        return (
            f'<SyncML xmlns="{SYNCML}">{self._hdr(self.server_url)}<SyncBody>{"".join(reply.parts)}'
            f"{final}</SyncBody></SyncML>"
        ).encode()
