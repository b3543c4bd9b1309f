"""twisted.web adapters for certificate renewal (MS-MDE2 3.5) on the
management listener.

Windows renews its MDM certificate by itself ("ROBO") when the certificate
enters its renewal period.  It goes to the provisioned
``CertificateStore/My/WSTEP/Renew/ServerURL`` and runs the enrollment
services again, discovery, then policy, then RequestSecurityToken, over TLS
authenticated by the certificate being renewed (MS-MDE2 3.5, CertificateStore
CSP).  mdmd points ServerURL at discovery on the management listener, which
already requires a client certificate from the WSTEP identity CA; the
enrollment listener's TLS stays as it is.  These services answer there:

- discovery: the policy and enrollment URLs on this listener (a renewal
  posted straight to the discovery URL is served too);
- policy: the certificate template (nothing secret; the TLS layer has checked
  the client's certificate);
- enrollment: ``.../Renew`` only.  The certificate of the TLS connection must
  be one mdmd issued and did not revoke, its device enrolled, and the request
  inside its renewal window; the PKCS#7 must be signed by that certificate's
  key.  Then a new certificate for the same device and the new key is issued
  and stored before the answer leaves.  Anything else gets the
  ``NotEligibleToRenew`` fault and one log line naming the check that failed
  (the fault's own line), and changes nothing.

New enrollments being switched off (``windows_mdm = no``) does not stop
renewals: enrolled devices must stay manageable.
"""

from __future__ import annotations

from datetime import UTC, datetime
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from mdmd import metrics, pki
from mdmd.app import Mdmd
from mdmd.discovery import build_discover_response, negotiate_discover, parse_discover
from mdmd.enrollment import (
    ENROLLMENT_PATH,
    POLICY_PATH,
    SoapResource,
    certificate_policy,
)
from mdmd.policy import build_get_policies_response, parse_get_policies
from mdmd.provisioning import build_renewal_provisioning_doc
from mdmd.renewal import not_eligible, renewal_policy, renewal_problem
from mdmd.soap import ACTION_RST_WSTEP, FaultCode, SoapFault, SoapRequest
from mdmd.store import CertificateRenewal, RenewalRefused
from mdmd.tls import peer_identity
from mdmd.web import HTTPResponse, MdmdRequest
from mdmd.wstep import build_request_security_token_response, parse_request_security_token

__all__ = ["RenewalDiscoveryResource", "RenewalPolicyResource", "RenewalResource", "renew"]

log = Logger(namespace=__name__)


def _base(app: Mdmd) -> str:
    parts = urlsplit(app.config.management.url)
    return f"{parts.scheme}://{parts.netloc}"


async def renew(app: Mdmd, request: MdmdRequest, soap: SoapRequest, activity_id: str) -> bytes:
    """Answer a RequestSecurityToken posted to the management listener."""
    rst = parse_request_security_token(soap)
    if not rst.is_renewal:
        raise SoapFault(
            FaultCode.MESSAGE_FORMAT,
            f"this URL renews certificates (RequestType .../Renew); enroll at {app.config.enrollment.url}",
        )
    peer = peer_identity(request)
    if peer is None:  # the mutual-TLS context makes this unreachable
        raise not_eligible("no client certificate")
    cert, serial = peer.certificate, peer.serial
    record = await app.store.certificate(serial)
    issued = record is not None and record.thumbprint == peer.thumbprint
    device = await app.store.device(record.device_id) if record is not None and issued else None
    if device is not None:
        request.device_id = device.device_id
    now = app.now()
    problem = renewal_problem(
        issued_by_mdmd=issued,
        revoked=None if record is None or record.revoked_at is None else (record.revoke_reason or "revoked"),
        device_enrolled=device is not None and device.state == "enrolled",
        not_after=cert.not_valid_after_utc.timestamp() if record is None else record.not_after,
        now=now,
        policy=renewal_policy(app.config.wstep),
    )
    if problem is None and rst.device_id and device is not None and rst.device_id != device.device_id:
        problem = f"DeviceID {rst.device_id[:64]!r} is not the certificate's device {device.device_id}"
    if problem is None:
        try:
            csr = pki.load_renewal_request(rst.token_der, cert)
        except (pki.RenewalRequestError, pki.CSRError) as e:
            problem = f"bad PKCS#7: {e}"
    if problem is not None:
        raise not_eligible(f"certificate {serial}: {problem}")
    assert record is not None and device is not None

    material = app.material
    when = datetime.fromtimestamp(now, UTC)
    # RSA signing is CPU work: never on the reactor thread.
    new: x509.Certificate = await deferToThreadPool(
        app.reactor,  # type: ignore[arg-type]
        app.reactor.getThreadPool(),  # type: ignore[attr-defined]
        pki.issue_device_certificate,
        material.identity_cert,
        material.identity_key,
        csr.public_key,
        device.device_id,
        days=app.config.wstep.device_cert_days,
        now=when,
    )
    doc = build_renewal_provisioning_doc(
        new.public_bytes(Encoding.DER),
        "Device" if device.enrollment_type == "Device" else "Full",
    )
    answer = build_request_security_token_response(doc, soap.message_id, activity_id=activity_id, now=when)
    new_serial = pki.serial_hex(new)
    # Stored before answering.  The old certificate keeps working until the
    # new one is used, so an answer lost on the way strands nothing.
    try:
        outcome = await app.store.record_renewal(
            CertificateRenewal(
                device_id=device.device_id,
                renewed_serial=serial,
                cert_serial=new_serial,
                cert_thumbprint=pki.thumbprint(new),
                cert_not_before=new.not_valid_before_utc.timestamp(),
                cert_not_after=new.not_valid_after_utc.timestamp(),
            ),
            now=now,
        )
    except RenewalRefused as e:
        raise not_eligible(f"certificate {serial}: {e.reason}") from None
    metrics.RENEWALS.inc()
    log.info(
        "renewed certificate {renewed} of device {device_id}: new certificate serial {serial} "
        "thumbprint {thumbprint}, ends {not_after}, CSR signed with {csr_hash}; superseded {superseded}",
        renewed=serial,
        device_id=device.device_id,
        serial=new_serial,
        thumbprint=pki.thumbprint(new),
        not_after=new.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        csr_hash=csr.signature_hash,
        superseded=list(outcome.superseded_serials) or "none",
    )
    return answer


class RenewalDiscoveryResource(SoapResource):
    """``/api/mdm/microsoft/discovery`` on the management listener: where
    ``Renew/ServerURL`` points."""

    service = "renewal discovery"

    async def handle_GET(self, request: MdmdRequest) -> HTTPResponse:
        # The same probe Windows sends before an enrollment's Discover.
        return HTTPResponse(
            200, b"", "text/html", headers=(("Cache-Control", "no-cache"), ("Pragma", "no-cache"))
        )

    async def answer(self, request: MdmdRequest, soap: SoapRequest, activity_id: str) -> bytes:
        if soap.action == ACTION_RST_WSTEP:
            # Should Windows post the renewal itself to ServerURL.
            return await renew(self.app, request, soap, activity_id)
        discover = parse_discover(soap)
        base = _base(self.app)
        response = negotiate_discover(
            discover, policy_url=base + POLICY_PATH, enrollment_url=base + ENROLLMENT_PATH
        )
        return build_discover_response(response, soap.message_id, activity_id=activity_id)


class RenewalPolicyResource(SoapResource):
    """``/api/mdm/microsoft/policy`` on the management listener."""

    service = "renewal policy"

    async def answer(self, request: MdmdRequest, soap: SoapRequest, activity_id: str) -> bytes:
        parse_get_policies(soap)
        return build_get_policies_response(
            certificate_policy(self.app), soap.message_id, activity_id=activity_id
        )


class RenewalResource(SoapResource):
    """``/api/mdm/microsoft/enroll`` on the management listener: renewals."""

    service = "renew"

    async def answer(self, request: MdmdRequest, soap: SoapRequest, activity_id: str) -> bytes:
        return await renew(self.app, request, soap, activity_id)
