"""The enrollment provisioning document (``wap-provisioningdoc``, MS-MDE2 2.2.9).

Windows applies this document after enrollment: it installs the CA and the
device certificate (CertificateStore CSP, MS-MDE2 2.2.9.2), learns when and
where to renew that certificate (``CertificateStore/My/WSTEP/Renew``), creates
the OMA-DM account (w7 APPLICATION, MS-MDE2 2.2.9.5) and sets the DMClient
options (MS-MDE2 2.2.9.3).  After a certificate renewal (MS-MDE2 3.5.4.1.1.2)
the document carries the new certificate only
(:func:`build_renewal_provisioning_doc`).  The bytes returned here are
base64-encoded into the RSTRC by :mod:`mdmd.wstep`.

Deliberately absent: ``INIT`` (mobile operators only, fails for MDM) and
``USEHWDEVID`` (the DeviceID of the RST must stay the SyncML Source LocURI).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import quote

from lxml import etree

from mdmd.poll import PollSchedule
from mdmd.soap import XMLTemplate, placeholder

__all__ = [
    "DEFAULT_ENCODING",
    "EnrollmentType",
    "PollSchedule",
    "ProvisioningDocParams",
    "RenewalSettings",
    "build_provisioning_doc",
    "build_renewal_provisioning_doc",
    "cert_thumbprint",
]

#: OMA-DM encoding mdmd speaks.  Microsoft's sample document sets WBXML; the
#: spec default (MS-MDE2 2.2.9.5) is XML, and it is set explicitly.
DEFAULT_ENCODING = "application/vnd.syncml.dm+xml"

EnrollmentType = Literal["Full", "Device"]

# RFC 2396 "unreserved" = alphanumerics and these marks; everything else in
# SSLCLIENTCERTSEARCHCRITERIA names and values is URI-escaped (MS-MDE2 2.2.9.5).
_RFC2396_MARKS = "-_.!~*'()"


def cert_thumbprint(der: bytes) -> str:
    """SHA-1 of a DER certificate as upper-case hex: the CertificateStore node name.

    SHA-1 here is Windows' certificate-hash naming (MS-MDE2 2.2.9.2), not a
    security decision.
    """
    return hashlib.sha1(der, usedforsecurity=False).hexdigest().upper()


def _default_poll() -> PollSchedule:
    return PollSchedule()


@dataclass(frozen=True, kw_only=True)
class RenewalSettings:
    """``CertificateStore/My/WSTEP/Renew``: when and where Windows renews its
    MDM certificate by itself (ROBO, MS-MDE2 2.2.9.2 and 3.5)."""

    #: RenewPeriod: days before the certificate's end when renewal starts.
    renew_period_days: int
    #: RetryInterval: days between attempts after a failed one.
    retry_interval_days: int
    #: ServerURL: where the renewal goes (an https URL).
    server_url: str

    def __post_init__(self) -> None:
        # The CSP's own limits: anything else fails the whole document on
        # the device.
        for name in ("renew_period_days", "retry_interval_days"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1000:
                raise ValueError(f"{name} must be a whole number of days from 1 to 1000, got {value!r}")
        if self.retry_interval_days > self.renew_period_days:
            raise ValueError("retry_interval_days must not exceed renew_period_days")
        if not self.server_url.startswith("https://"):
            raise ValueError("server_url must be an https:// URL")


@dataclass(frozen=True, kw_only=True)
class ProvisioningDocParams:
    """Everything the provisioning document says about one enrollment."""

    #: CA certificates, DER, root first (then at most one intermediate).
    ca_certs_der: Sequence[bytes]
    #: The certificate just issued to the device, DER.
    device_cert_der: bytes
    #: RST context item EnrollmentType: "Full" (user) -> My/User,
    #: "Device" -> My/System.
    enrollment_type: EnrollmentType
    #: w7 ADDR: HTTPS URL of the OMA-DM endpoint (Windows appends a query).
    management_url: str
    #: w7 PROVIDER-ID = DMClient/Provider/<id>; keep it free of characters
    #: that need URI or XML escaping (it becomes a LocURI segment).
    provider_id: str
    #: w7 NAME (display / registry name).
    provider_name: str
    #: The RST DeviceID; the issued certificate's subject is CN=<device_id>.
    device_id: str
    #: DMClient EntDMID: mdmd's own id for the device (it must be set before
    #: the first renewal, MS-MDE2 2.2.9.3).
    ent_dmid: str
    #: Automatic certificate renewal; None leaves ``My/WSTEP`` out.
    renewal: RenewalSettings | None = None
    ent_device_name: str | None = None
    poll: PollSchedule = field(default_factory=_default_poll)
    #: APPAUTH AAUTHLEVEL=CLIENT (server authenticates itself to the device):
    #: AAUTHSECRET.
    client_secret: str = field(repr=False)
    #: APPAUTH AAUTHLEVEL=APPSRV (device authenticates itself to the server):
    #: AAUTHNAME and AAUTHSECRET.
    server_name: str
    server_secret: str = field(repr=False)
    #: AAUTHDATA of both blocks: base64 nonce for DIGEST (syncml:auth-md5).
    nonce: str
    #: w7 ROLE: 32 = enterprise (MS-MDE2 2.2.9.5); None leaves it out.
    role: int | None = 32
    conn_retry_freq: int = 6
    initial_backoff_ms: int = 30000
    max_backoff_ms: int = 120000

    def __post_init__(self) -> None:
        object.__setattr__(self, "ca_certs_der", tuple(bytes(c) for c in self.ca_certs_der))
        if not self.ca_certs_der or not all(self.ca_certs_der):
            raise ValueError("ca_certs_der must hold at least the root certificate")
        if not self.device_cert_der:
            raise ValueError("device_cert_der must not be empty")
        if self.enrollment_type not in ("Full", "Device"):
            raise ValueError(f"enrollment_type must be Full or Device, got {self.enrollment_type!r}")
        for name in (
            "management_url",
            "provider_id",
            "provider_name",
            "device_id",
            "ent_dmid",
            "client_secret",
            "server_name",
            "server_secret",
            "nonce",
        ):
            if not getattr(self, name):
                raise ValueError(f"{name} must not be empty")
        if "/" in self.provider_id or any(ord(ch) < 0x20 for ch in self.provider_id):
            raise ValueError("provider_id must not contain '/' or control characters")
        try:
            base64.b64decode(self.nonce, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("nonce must be base64") from None
        for name in ("conn_retry_freq", "initial_backoff_ms", "max_backoff_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")


def _characteristic(parent: etree._Element, type_: str) -> etree._Element:
    return etree.SubElement(parent, "characteristic", {"type": type_})


def _parm(
    parent: etree._Element, name: str, value: str | None = None, datatype: str | None = None
) -> etree._Element:
    element = etree.SubElement(parent, "parm", {"name": name})
    if value is not None:
        element.set("value", value)
    if datatype is not None:
        element.set("datatype", datatype)
    return element


def _certificate(store: etree._Element, der: bytes) -> None:
    node = _characteristic(store, cert_thumbprint(der))
    # MS-MDE2 2.2.9.4: base64 "cannot include extra formatting characters
    # such as embedded linefeeds".
    _parm(node, "EncodedCertificate", base64.b64encode(der).decode("ascii"))


def _store_path(root: etree._Element, *path: str) -> etree._Element:
    node = _characteristic(root, "CertificateStore")
    for part in path:
        node = _characteristic(node, part)
    return node


def _search_criteria(device_id: str, store: str) -> str:
    # MS-MDE2 2.2.9.5: "Subject=<escaped subject>&Stores=<escaped store>";
    # the store's backslash is %5C.
    subject = quote(f"CN={device_id}", safe=_RFC2396_MARKS)
    stores = quote(f"My\\{store}", safe=_RFC2396_MARKS)
    return f"Subject={subject}&Stores={stores}"


def _appauth(
    application: etree._Element, level: str, secret: str, nonce: str, name: str | None = None
) -> None:
    auth = _characteristic(application, "APPAUTH")
    _parm(auth, "AAUTHLEVEL", level)
    # MS-MDE2 2.2.9.5: for CLIENT, AAUTHTYPE MUST be DIGEST.
    _parm(auth, "AAUTHTYPE", "DIGEST")
    if name is not None:
        _parm(auth, "AAUTHNAME", name)
    _parm(auth, "AAUTHSECRET", secret)
    _parm(auth, "AAUTHDATA", nonce)


def _poll(provider: etree._Element, poll: PollSchedule) -> None:
    node = _characteristic(provider, "Poll")
    for name, value in (
        ("IntervalForFirstSetOfRetries", poll.first_interval),
        ("NumberOfFirstRetries", poll.first_retries),
        ("IntervalForSecondSetOfRetries", poll.second_interval),
        ("NumberOfSecondRetries", poll.second_retries),
        ("IntervalForRemainingScheduledRetries", poll.remaining_interval),
        ("NumberOfRemainingScheduledRetries", poll.remaining_retries),
    ):
        _parm(node, name, str(value), "integer")
    _parm(node, "PollOnLogin", "true" if poll.poll_on_login else "false", "boolean")


def _my_store_name(enrollment_type: str) -> str:
    return "User" if enrollment_type == "Full" else "System"


def _renewal(my: etree._Element, renewal: RenewalSettings) -> None:
    # MS-MDE2 2.2.9.2's device sample: WSTEP/Renew beside the certificate's
    # store inside My, the three schedule values with explicit datatypes.
    # ROBOSupport matters to OnPremise enrollments (mdmd's): without it
    # Windows would ask its user to renew by hand.
    renew = _characteristic(_characteristic(my, "WSTEP"), "Renew")
    _parm(renew, "ROBOSupport", "true", "boolean")
    _parm(renew, "RenewPeriod", str(renewal.renew_period_days), "integer")
    _parm(renew, "RetryInterval", str(renewal.retry_interval_days), "integer")
    _parm(renew, "ServerURL", renewal.server_url, "string")


def build_renewal_provisioning_doc(device_cert_der: bytes, enrollment_type: EnrollmentType) -> bytes:
    """The document answering a certificate renewal (MS-MDE2 3.5.4.1.1.2):
    the new certificate in the device's ``My`` store and nothing else (the
    root is already on the device, the account and its settings stay).
    ``PrivateKeyContainer`` sits inside the certificate's node, as in the
    renewal samples of MS-MDE2 and Microsoft Learn."""
    if not device_cert_der:
        raise ValueError("device_cert_der must not be empty")
    if enrollment_type not in ("Full", "Device"):
        raise ValueError(f"enrollment_type must be Full or Device, got {enrollment_type!r}")
    doc = etree.Element("wap-provisioningdoc", {"version": "1.1"})
    node = _characteristic(
        _store_path(doc, "My", _my_store_name(enrollment_type)), cert_thumbprint(device_cert_der)
    )
    _parm(node, "EncodedCertificate", base64.b64encode(device_cert_der).decode("ascii"))
    _characteristic(node, "PrivateKeyContainer")
    return etree.tostring(doc, encoding="utf-8", xml_declaration=False)


@dataclass(frozen=True)
class _Static:
    """What a provisioning document takes from the server's configuration:
    the same for every device, so the document is built once for it."""

    ca_certs_der: tuple[bytes, ...]
    enrollment_type: str
    management_url: str
    provider_id: str
    provider_name: str
    renewal: RenewalSettings | None
    poll: PollSchedule
    role: int | None
    conn_retry_freq: int
    initial_backoff_ms: int
    max_backoff_ms: int
    with_device_name: bool

    @classmethod
    def of(cls, params: ProvisioningDocParams) -> _Static:
        return cls(
            ca_certs_der=tuple(params.ca_certs_der),
            enrollment_type=params.enrollment_type,
            management_url=params.management_url,
            provider_id=params.provider_id,
            provider_name=params.provider_name,
            renewal=params.renewal,
            poll=params.poll,
            role=params.role,
            conn_retry_freq=params.conn_retry_freq,
            initial_backoff_ms=params.initial_backoff_ms,
            max_backoff_ms=params.max_backoff_ms,
            with_device_name=bool(params.ent_device_name),
        )


def build_provisioning_doc(params: ProvisioningDocParams) -> bytes:
    """Build the UTF-8 ``wap-provisioningdoc`` (MS-MDE2 2.2.9.1 to 2.2.9.5).

    No XML declaration (optional; UTF-8 is the default), no pretty printing.
    Attribute values are escaped as lxml escapes them (``&`` becomes
    ``&amp;``): the document is built by lxml once per configuration, with
    placeholders where each device's values go.
    """
    params.poll.validate()
    device_der = params.device_cert_der
    values = {
        "device_thumbprint": cert_thumbprint(device_der),
        # MS-MDE2 2.2.9.4: base64 "cannot include extra formatting
        # characters such as embedded linefeeds".
        "device_certificate": base64.b64encode(device_der).decode("ascii"),
        "search_criteria": _search_criteria(params.device_id, _my_store_name(params.enrollment_type)),
        "ent_dmid": params.ent_dmid,
        "client_secret": params.client_secret,
        "server_name": params.server_name,
        "server_secret": params.server_secret,
        "nonce": params.nonce,
    }
    if params.ent_device_name:
        values["ent_device_name"] = params.ent_device_name
    return _template(_Static.of(params)).fill(values)


@functools.lru_cache(maxsize=8)
def _template(static: _Static) -> XMLTemplate:
    doc = etree.Element("wap-provisioningdoc", {"version": "1.1"})

    # Root CA into the machine root store; an intermediate (if any) into the
    # machine intermediate store.  Learn puts enrollment intermediates in
    # My/User, which is the wrong store for a CA and unused by mdmd's
    # root-signed device certificates.
    root_der, *intermediates = static.ca_certs_der
    _certificate(_store_path(doc, "Root", "System"), root_der)
    if intermediates:
        ca_store = _store_path(doc, "CA", "System")
        for der in intermediates:
            _certificate(ca_store, der)

    # Device certificate: My/User for a user (Full) enrollment, My/System for
    # a Device enrollment.  PrivateKeyContainer is required; Microsoft's
    # enrollment sample makes it a sibling of the thumbprint node (its renewal
    # sample nests it inside; docs/windows-clients.md).
    my = _store_path(doc, "My")
    my_store = _characteristic(my, _my_store_name(static.enrollment_type))
    device = _characteristic(my_store, placeholder("device_thumbprint"))
    _parm(device, "EncodedCertificate", placeholder("device_certificate"))
    _characteristic(my_store, "PrivateKeyContainer")
    if static.renewal is not None:
        _renewal(my, static.renewal)

    application = _characteristic(doc, "APPLICATION")
    _parm(application, "APPID", "w7")
    _parm(application, "PROVIDER-ID", static.provider_id)
    _parm(application, "NAME", static.provider_name)
    _parm(application, "ADDR", static.management_url)
    _parm(application, "CONNRETRYFREQ", str(static.conn_retry_freq))
    _parm(application, "INITIALBACKOFFTIME", str(static.initial_backoff_ms))
    _parm(application, "MAXBACKOFFTIME", str(static.max_backoff_ms))
    # Presence alone disables retrying with an older protocol version.
    _parm(application, "BACKCOMPATRETRYDISABLED")
    _parm(application, "DEFAULTENCODING", DEFAULT_ENCODING)
    _parm(application, "SSLCLIENTCERTSEARCHCRITERIA", placeholder("search_criteria"))
    if static.role is not None:
        _parm(application, "ROLE", str(static.role))
    # "Both APPSRV and CLIENT credentials MUST be provided" (MS-MDE2 2.2.9.5).
    _appauth(application, "CLIENT", placeholder("client_secret"), placeholder("nonce"))
    _appauth(
        application,
        "APPSRV",
        placeholder("server_secret"),
        placeholder("nonce"),
        name=placeholder("server_name"),
    )

    dmclient = _characteristic(doc, "DMClient")
    provider = _characteristic(_characteristic(dmclient, "Provider"), static.provider_id)
    _parm(provider, "EntDMID", placeholder("ent_dmid"), "string")
    if static.with_device_name:
        _parm(provider, "EntDeviceName", placeholder("ent_device_name"), "string")
    _poll(provider, static.poll)

    return XMLTemplate(etree.tostring(doc, encoding="utf-8", xml_declaration=False))
