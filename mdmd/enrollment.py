"""twisted.web adapters for Windows MDM enrollment (enrollment listener):
MS-MDE2 discovery, MS-XCEP policy and MS-WSTEP enrollment.

The messages themselves are parsed and built by :mod:`mdmd.discovery`,
:mod:`mdmd.policy`, :mod:`mdmd.wstep` and :mod:`mdmd.provisioning`; this
module authenticates the caller, issues the certificate off the reactor
thread, stores the enrollment and answers.

Errors (docs/windows-clients.md, "Faults"): a body that is not XML (or carries a DTD) gets a plain
400, an oversize body 413 (see :mod:`mdmd.web`), and every other client
mistake the MS-MDE2 SOAP fault whose subcode says what went wrong, with HTTP
200 (the status Windows is known to read faults with).
"""

from __future__ import annotations

import re
import secrets
import uuid
from base64 import b64encode
from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from mdmd import metrics, pki
from mdmd.app import Mdmd
from mdmd.discovery import build_discover_response, negotiate_discover, parse_discover
from mdmd.orbit import EnrollmentTokenError, hash_node_key, parse_enrollment_token
from mdmd.policy import CertificatePolicy, build_get_policies_response, parse_get_policies
from mdmd.provisioning import ProvisioningDocParams, RenewalSettings, build_provisioning_doc
from mdmd.renewal import not_eligible, renewal_server_url
from mdmd.soap import (
    VALUE_TYPE_DEVICE_ENROLLMENT_USER_TOKEN,
    BinarySecurityToken,
    ErrorType,
    FaultCode,
    SoapFault,
    SoapRequest,
    UsernameToken,
    build_soap_fault,
    parse_soap_request,
)
from mdmd.store import DeviceConflict, DeviceEnrollment, HostRecord
from mdmd.web import EndpointResource, HTTPError, HTTPResponse, MdmdRequest, request_body
from mdmd.wstep import (
    RequestSecurityToken,
    build_request_security_token_response,
    parse_request_security_token,
)
from mdmd.xmlsafe import XMLInputError

__all__ = [
    "DISCOVERY_PATH",
    "ENROLLMENT_PATH",
    "POLICY_PATH",
    "DiscoveryResource",
    "EnrollmentResource",
    "PolicyResource",
    "SoapResource",
    "certificate_policy",
]

log = Logger(namespace=__name__)

SOAP_CONTENT_TYPE = "application/soap+xml; charset=utf-8"
DISCOVERY_PATH = "/api/mdm/microsoft/discovery"
POLICY_PATH = "/api/mdm/microsoft/policy"
ENROLLMENT_PATH = "/api/mdm/microsoft/enroll"

# What a DeviceID may look like: Windows sends 32 hex digits (or a GUID);
# it becomes a certificate CN and an OMA-DM LocURI, so nothing that needs
# escaping in either is accepted.
_DEVICE_ID = re.compile(r"^[A-Za-z0-9{}._-]{1,128}$")
_ENROLLMENT_STORES = {"Full": "User", "Device": "System"}


def _soap(body: bytes) -> HTTPResponse:
    return HTTPResponse(200, body, content_type=SOAP_CONTENT_TYPE)


def _squash(value: str | None) -> str:
    return "".join((value or "").split())


def _conflict(device_id: str, host_id: int) -> SoapFault:
    return SoapFault(
        FaultCode.AUTHORIZATION,
        f"device {device_id} is enrolled for another host; host {host_id} cannot enroll it",
    )


class SoapResource(EndpointResource):
    """One MS-MDE2 service: SOAP in, SOAP (or a SOAP fault) out."""

    service = "?"

    def __init__(self, app: Mdmd) -> None:
        super().__init__()
        self.app = app

    async def handle_POST(self, request: MdmdRequest) -> HTTPResponse:
        activity_id = str(uuid.uuid4())
        relates_to: str | None = None
        try:
            try:
                soap = parse_soap_request(request_body(request))
            except XMLInputError as e:
                raise HTTPError(
                    HTTPResponse(400, f"not an acceptable XML document: {e}\n".encode(), "text/plain"),
                    f"{self.service}: body is not acceptable XML ({e})",
                ) from None
            relates_to = soap.message_id
            content_type = (request.getHeader(b"Content-Type") or b"").decode("latin-1")
            if content_type.split(";")[0].strip().lower() != "application/soap+xml":
                raise SoapFault(
                    FaultCode.MESSAGE_FORMAT,
                    f"Content-Type {content_type or '(none)'!r} received; "
                    "application/soap+xml (SOAP 1.2) is required",
                )
            return _soap(await self.answer(request, soap, activity_id))
        except SoapFault as fault:
            # Logged once here, with what the client will be told.
            log.warn(
                "{service} fault {code}: {reason} (activity {activity_id})",
                service=self.service,
                code=fault.code.qname + (f"/{fault.errortype}" if fault.errortype else ""),
                reason=fault.reason,
                activity_id=activity_id,
                device_id=request.device_id,
            )
            return _soap(build_soap_fault(fault, relates_to, activity_id=activity_id, trace_id=activity_id))

    async def answer(self, request: MdmdRequest, soap: SoapRequest, activity_id: str) -> bytes:
        raise NotImplementedError

    def _check_enrollment_open(self) -> None:
        if not self.app.config.enrollment.windows_mdm:
            raise SoapFault(
                FaultCode.AUTHORIZATION,
                "new Windows MDM enrollments are switched off on this server",
                ErrorType.NOT_SUPPORTED,
            )

    async def authenticate(self, soap: SoapRequest) -> HostRecord:
        """The orbit host whose node key is in the DeviceEnrollmentUserToken."""
        # A read: the agent's config poll records last-seen, and a durable
        # write here would cost an fsync per MS-MDE2 request.
        return self._check_host(await self.app.store.host_by_node_key(self._node_key_hash(soap)))

    @staticmethod
    def _node_key_hash(soap: SoapRequest) -> bytes:
        """The hash of the orbit node key the DeviceEnrollmentUserToken carries."""
        tokens = [
            t
            for t in soap.security
            if isinstance(t, BinarySecurityToken)
            and _squash(t.value_type) == VALUE_TYPE_DEVICE_ENROLLMENT_USER_TOKEN
        ]
        if not tokens:
            if any(isinstance(t, UsernameToken) for t in soap.security):
                # OnPremise clients may send a username token
                # (docs/windows-clients.md); say plainly that it is not how this server enrolls devices.
                raise SoapFault(
                    FaultCode.AUTHENTICATION,
                    "username/password (wsse:UsernameToken) authentication is not supported; "
                    "enroll this PC through the mdmd agent (DeviceEnrollmentUserToken)",
                )
            raise SoapFault(
                FaultCode.AUTHENTICATION,
                "no wsse:BinarySecurityToken of ValueType DeviceEnrollmentUserToken in the "
                "WS-Security header",
            )
        try:
            node_key = parse_enrollment_token(tokens[0].value)
        except EnrollmentTokenError as e:
            raise SoapFault(FaultCode.AUTHENTICATION, f"DeviceEnrollmentUserToken rejected: {e}") from None
        return hash_node_key(node_key)

    @staticmethod
    def _check_host(host: HostRecord | None) -> HostRecord:
        if host is None:
            raise SoapFault(
                FaultCode.AUTHENTICATION,
                "the enrollment token names no enrolled agent (unknown or replaced node key)",
            )
        if host.platform != "windows":
            raise SoapFault(
                FaultCode.AUTHORIZATION,
                f"the agent's host reports platform {host.platform!r}; only windows hosts enroll",
                ErrorType.DEVICE_NOT_SUPPORTED,
            )
        if host.unenroll_requested:
            raise SoapFault(FaultCode.AUTHORIZATION, "an administrator asked to keep this host out of MDM")
        return host


def certificate_policy(app: Mdmd) -> CertificatePolicy:
    """The one certificate template mdmd offers (MS-XCEP GetPolicies).
    Advisory for Windows; the same lifetime and renewal period as the
    certificate and the provisioning document, so that nothing the device is
    told disagrees."""
    wstep = app.config.wstep
    return CertificatePolicy(
        template_name="mdmd-device",
        min_key_bits=2048,
        validity_seconds=wstep.device_cert_days * 86400,
        renewal_seconds=wstep.renew_period_days * 86400,
    )


class DiscoveryResource(SoapResource):
    """``/api/mdm/microsoft/discovery`` (MS-MDE2 3.1)."""

    service = "discovery"

    async def handle_GET(self, request: MdmdRequest) -> HTTPResponse:
        # MS-MDE2 1.3: the client probes the endpoint with a body-less GET
        # before posting; anything but 200 stops enrollment.
        return HTTPResponse(
            200, b"", "text/html", headers=(("Cache-Control", "no-cache"), ("Pragma", "no-cache"))
        )

    async def answer(self, request: MdmdRequest, soap: SoapRequest, activity_id: str) -> bytes:
        discover = parse_discover(soap)
        self._check_enrollment_open()
        base = self.app.config.enrollment.url
        response = negotiate_discover(
            discover, policy_url=base + POLICY_PATH, enrollment_url=base + ENROLLMENT_PATH
        )
        # On the request's own log line: a line of its own would cost as much
        # as building the answer.
        request.note = (
            f"RequestVersion {discover.request_version}, answered {response.enrollment_version} "
            f"with {response.auth_policy}"
        )
        return build_discover_response(response, soap.message_id, activity_id=activity_id)


class PolicyResource(SoapResource):
    """``/api/mdm/microsoft/policy`` (MS-XCEP GetPolicies, MS-MDE2 3.3)."""

    service = "policy"

    async def answer(self, request: MdmdRequest, soap: SoapRequest, activity_id: str) -> bytes:
        parse_get_policies(soap)
        self._check_enrollment_open()
        host = await self.authenticate(soap)
        request.note = f"certificate policy sent to host {host.id}"
        return build_get_policies_response(
            certificate_policy(self.app), soap.message_id, activity_id=activity_id
        )


class EnrollmentResource(SoapResource):
    """``/api/mdm/microsoft/enroll`` (MS-WSTEP RequestSecurityToken, MS-MDE2 3.4)."""

    service = "enroll"

    async def answer(self, request: MdmdRequest, soap: SoapRequest, activity_id: str) -> bytes:
        rst = parse_request_security_token(soap)
        if rst.is_renewal:
            # This listener does not ask for client certificates, so it
            # cannot know which certificate is being renewed.
            raise not_eligible(
                "renewals are served at "
                f"{renewal_server_url(self.app.config.management.url)}, over TLS with the "
                "certificate being renewed (the provisioned CertificateStore/My/WSTEP/Renew/ServerURL)"
            )
        self._check_enrollment_open()
        node_key_hash = self._node_key_hash(soap)
        try:
            device_id, enrollment_type = self._device(rst)
        except SoapFault:
            # An unauthenticated caller hears about its token first.
            self._check_host(await self.app.store.host_by_node_key(node_key_hash))
            raise
        # The host and the device's owner in one read.
        looked_up = await self.app.store.enrolling_host(node_key_hash, device_id)
        host = self._check_host(looked_up.host)
        request.device_id = device_id
        # Refused before a certificate is signed; the write checks again.
        if looked_up.device_enrolled and looked_up.device_host_id != host.id:
            raise _conflict(device_id, host.id)
        try:
            csr = pki.load_certification_request(rst.csr_der)
        except pki.CSRError as e:
            raise SoapFault(FaultCode.CERTIFICATE_REQUEST, str(e)) from None

        app = self.app
        now = datetime.fromtimestamp(app.now(), UTC)
        material = app.material
        # RSA signing is CPU work: never on the reactor thread.
        cert: x509.Certificate = await deferToThreadPool(
            app.reactor,  # type: ignore[arg-type]
            app.reactor.getThreadPool(),  # type: ignore[attr-defined]
            pki.issue_device_certificate,
            material.identity_cert,
            material.identity_key,
            csr.public_key,
            device_id,
            days=app.config.wstep.device_cert_days,
            now=now,
        )
        serial = pki.serial_hex(cert)
        thumbprint = pki.thumbprint(cert)
        management = app.config.management
        doc = build_provisioning_doc(
            ProvisioningDocParams(
                ca_certs_der=[material.identity_cert.public_bytes(Encoding.DER)],
                device_cert_der=cert.public_bytes(Encoding.DER),
                enrollment_type=enrollment_type,  # type: ignore[arg-type]
                management_url=management.url,
                provider_id=management.provider_id,
                provider_name=management.provider_name,
                device_id=device_id,
                ent_dmid=device_id,
                ent_device_name=rst.context_value("DeviceName"),
                renewal=RenewalSettings(
                    renew_period_days=app.config.wstep.renew_period_days,
                    retry_interval_days=app.config.wstep.renew_retry_days,
                    server_url=renewal_server_url(management.url),
                ),
                poll=management.poll,
                # mdmd authenticates devices by their TLS client certificate;
                # MS-MDE2 still requires both APPAUTH blocks, so each device
                # gets fresh random secrets that nothing else relies on.
                client_secret=secrets.token_urlsafe(24),
                server_name=management.provider_id,
                server_secret=secrets.token_urlsafe(24),
                nonce=b64encode(secrets.token_bytes(16)).decode(),
            )
        )
        answer = build_request_security_token_response(doc, soap.message_id, activity_id=activity_id, now=now)
        # Stored before answering (and after everything that could fail): a
        # device holding a certificate mdmd does not know could never be managed.
        try:
            outcome = await app.store.record_device_enrollment(
                DeviceEnrollment(
                    device_id=device_id,
                    host_id=host.id,
                    hw_dev_id=rst.context_value("HWDevID"),
                    enrollment_type=enrollment_type,
                    device_name=rst.context_value("DeviceName"),
                    os_version=rst.context_value("OSVersion"),
                    context=rst.context,
                    cert_serial=serial,
                    cert_thumbprint=thumbprint,
                    cert_not_before=cert.not_valid_before_utc.timestamp(),
                    cert_not_after=cert.not_valid_after_utc.timestamp(),
                ),
                now=app.now(),
            )
        except DeviceConflict:
            raise _conflict(device_id, host.id) from None
        metrics.ENROLLMENTS.inc()
        log.info(
            "enrolled device {device_id} (host {host_id}, {enrollment_type}), certificate serial "
            "{serial} thumbprint {thumbprint}, CSR signed with {csr_hash}; revoked {revoked}",
            device_id=device_id,
            host_id=host.id,
            enrollment_type=enrollment_type,
            serial=serial,
            thumbprint=thumbprint,
            csr_hash=csr.signature_hash,
            revoked=list(outcome.revoked_serials) or "none",
        )
        if outcome.hw_dev_id_collisions:
            log.warn(
                "device {device_id} shares HWDevID with enrolled device(s) {others}: a clone made "
                "without sysprep? Both are kept and flagged",
                device_id=device_id,
                others=list(outcome.hw_dev_id_collisions),
            )
        return answer

    @staticmethod
    def _device(rst: RequestSecurityToken) -> tuple[str, str]:
        device_id = rst.context_value("DeviceID") or ""
        if not _DEVICE_ID.match(device_id):
            raise SoapFault(
                FaultCode.MESSAGE_FORMAT,
                f"DeviceID {device_id[:64]!r} is not acceptable (1-128 letters, digits, '{{}}._-')",
                ErrorType.INVALID_ENROLLMENT_DATA,
            )
        enrollment_type = rst.context_value("EnrollmentType") or "Full"
        if enrollment_type not in _ENROLLMENT_STORES:
            raise SoapFault(
                FaultCode.MESSAGE_FORMAT,
                f"EnrollmentType {enrollment_type[:32]!r} is not supported (Full or Device)",
                ErrorType.INVALID_ENROLLMENT_DATA,
            )
        return device_id, enrollment_type
