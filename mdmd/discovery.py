"""MS-MDE2 3.1 discovery: parse ``Discover``, negotiate, build ``DiscoverResponse``.

Authentication policy answered by mdmd
--------------------------------------
mdmd enrolls devices programmatically: its agent calls
``RegisterDeviceWithManagement`` with an access token, and Windows then sends
that token as a ``wsse:BinarySecurityToken`` of ValueType
``DeviceEnrollmentUserToken`` in GetPolicies and RequestSecurityToken,
whatever AuthPolicy discovery answered (docs/windows-clients.md,
"Programmatic enrollment").  Hence the default policy is
``OnPremise``:

* ``Federated`` requires an ``AuthenticationServiceUrl`` (an STS page for the
  Web Authentication Broker); mdmd has none, and a user-driven client would
  open it and fail there with no useful message.
* With ``OnPremise`` a user-driven client ("Access work or school") asks for
  a user name and password and sends a ``wsse:UsernameToken``; the policy and
  enrollment handlers reject it with an ``Authentication`` fault saying that
  enrollment is started by the mdmd agent (docs/windows-clients.md,
  "User-driven enrollment sends a password").

``Federated`` can still be configured (with ``authentication_url``) should an
STS ever be added.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from lxml import etree

from mdmd.soap import (
    ACTION_DISCOVER,
    ACTION_DISCOVER_RESPONSE,
    DISCOVERY,
    DISCOVERY_VARIANTS,
    ErrorType,
    FaultCode,
    SoapFault,
    SoapRequest,
    SoapTemplate,
    child_elements,
    clip,
    default_nsmap,
    find_child,
    is_nil,
    local_name,
    namespace_of,
    require_action,
    text_of,
)

__all__ = [
    "AUTH_POLICIES",
    "DEFAULT_MAX_VERSION",
    "DEFAULT_MIN_VERSION",
    "DiscoverRequest",
    "DiscoverResponse",
    "build_discover_response",
    "negotiate_discover",
    "parse_discover",
]

#: AuthPolicy values defined by MS-MDE2 3.1.4.1.3.1.
AUTH_POLICIES = ("OnPremise", "Federated", "Certificate")

#: Lowest enrollment version served: 3.0 is Windows 10's (MS-MDE2 <21>).
DEFAULT_MIN_VERSION = Decimal("3.0")
#: Highest enrollment version whose features mdmd serves.  5.0 turns on TPM
#: attestation (AttestationFailureBehavior in the policy, AIK context items),
#: 6.0 Azure attestation, 7.0 attestation status; mdmd implements none of
#: them.  4.0 is what Fleet answers to every client in production.
DEFAULT_MAX_VERSION = Decimal("4.0")

# MS-MDE2 3.1.4.1.3.1: the first MDE2 revision required RequestVersion to be
# nil; current ones require 1.0 ... 7.0.  A client that sends none (or nil)
# therefore speaks the original protocol, version 1.0.
_VERSION_WHEN_ABSENT = Decimal("1.0")


@dataclass(frozen=True)
class DiscoverRequest:
    """Content of ``Discover/request`` (MS-MDE2 3.1.4.1.3.1)."""

    email_address: str  # empty in programmatic enrollment; never validated
    request_version: Decimal
    device_type: str  # CIMClient_Windows, WindowsPhone (not enforced)
    application_version: str  # dotted quad (not enforced)
    os_edition: int | None  # PRODUCT_* SKU (MS-MDE2 2.2.9.6); None if absent/garbled
    auth_policies: tuple[str, ...]  # in the client's order


@dataclass(frozen=True)
class DiscoverResponse:
    """Content of ``DiscoverResponse/DiscoverResult`` (MS-MDE2 3.1.4.1.3.2)."""

    auth_policy: str
    enrollment_version: str
    enrollment_policy_service_url: str
    enrollment_service_url: str
    authentication_service_url: str | None = None


def _parse_version(element: etree._Element | None) -> Decimal:
    if element is None or is_nil(element) or not text_of(element):
        return _VERSION_WHEN_ABSENT
    raw = text_of(element)
    try:
        version = Decimal(raw)
    except InvalidOperation:
        version = Decimal("NaN")
    if not version.is_finite() or version < 0:
        raise SoapFault(
            FaultCode.MESSAGE_FORMAT,
            f"received RequestVersion {clip(raw)}; a decimal version such as 4.0 is required",
        )
    return version


def _parse_os_edition(element: etree._Element | None) -> int | None:
    raw = text_of(element)
    # OSEdition is informational; a garbled value must not stop enrollment.
    if raw.isascii() and raw.isdigit():
        return int(raw)
    return None


def parse_discover(req: SoapRequest) -> DiscoverRequest:
    """Read a ``Discover`` request.

    Children of ``request`` are matched by local name in any order (the XSD
    uses ``xsd:all``); absent optional values become empty strings.

    :raises SoapFault: ``MessageFormat`` for a wrong action, body element,
        namespace or a RequestVersion that is not a decimal.
    """
    require_action(req, ACTION_DISCOVER)
    body = req.body
    if local_name(body) != "Discover" or namespace_of(body) not in DISCOVERY_VARIANTS:
        raise SoapFault(
            FaultCode.MESSAGE_FORMAT,
            f"received body element {clip(local_name(body))} in namespace "
            f"{clip(namespace_of(body))}; expected Discover in namespace {DISCOVERY}",
        )
    request = find_child(body, "request")
    if request is None:
        raise SoapFault(FaultCode.MESSAGE_FORMAT, "received a Discover without its request element")

    policies_el = find_child(request, "AuthPolicies")
    policies: tuple[str, ...] = ()
    if policies_el is not None:
        policies = tuple(
            text_of(item)
            for item in child_elements(policies_el)
            if local_name(item) == "AuthPolicy" and text_of(item)
        )

    return DiscoverRequest(
        email_address=text_of(find_child(request, "EmailAddress")),
        request_version=_parse_version(find_child(request, "RequestVersion")),
        device_type=text_of(find_child(request, "DeviceType")),
        application_version=text_of(find_child(request, "ApplicationVersion")),
        os_edition=_parse_os_edition(find_child(request, "OSEdition")),
        auth_policies=policies,
    )


def _format_version(version: Decimal) -> str:
    # Decimal("4") would print as "4"; the wire always shows "4.0".
    if version == version.to_integral_value():
        return f"{int(version)}.0"
    return format(version.normalize(), "f")


def negotiate_discover(
    req: DiscoverRequest,
    *,
    policy_url: str,
    enrollment_url: str,
    supported_auth: Sequence[str] = ("OnPremise",),
    min_version: Decimal = DEFAULT_MIN_VERSION,
    max_version: Decimal = DEFAULT_MAX_VERSION,
    authentication_url: str | None = None,
) -> DiscoverResponse:
    """Choose the AuthPolicy and EnrollmentVersion to answer.

    Versions are never whitelisted (Windows 11 25H2 sends 9.0;
    docs/windows-clients.md, "Version numbers"): any RequestVersion at or above
    ``min_version`` is accepted and answered with
    ``min(RequestVersion, max_version)``.

    The AuthPolicy is the first of ``supported_auth`` (server preference) that
    the client offered.

    :raises ValueError: server misconfiguration (Federated without
        ``authentication_url``, empty ``supported_auth``, min > max).
    :raises SoapFault: ``Authorization``/``DeviceNotSupported`` when the
        client is older than ``min_version``; ``Authentication`` when it
        offered none of ``supported_auth``.
    """
    if not supported_auth:
        raise ValueError("supported_auth must name at least one AuthPolicy")
    if "Federated" in supported_auth and not authentication_url:
        raise ValueError("the Federated AuthPolicy needs an authentication_url (MS-MDE2 3.2)")
    if min_version > max_version:
        raise ValueError(f"min_version {min_version} is above max_version {max_version}")

    if req.request_version < min_version:
        raise SoapFault(
            FaultCode.AUTHORIZATION,
            f"received RequestVersion {_format_version(req.request_version)}; this server "
            f"supports enrollment versions {_format_version(min_version)} and later "
            "(Windows 10 or later)",
            ErrorType.DEVICE_NOT_SUPPORTED,
        )

    offered = set(req.auth_policies)
    chosen = next((policy for policy in supported_auth if policy in offered), None)
    if chosen is None:
        offered_text = ", ".join(clip(p, 40) for p in req.auth_policies) or "none"
        raise SoapFault(
            FaultCode.AUTHENTICATION,
            f"client offered AuthPolicy {offered_text}; this server supports {', '.join(supported_auth)}",
        )

    version = min(req.request_version, max_version)
    return DiscoverResponse(
        auth_policy=chosen,
        enrollment_version=_format_version(version),
        enrollment_policy_service_url=policy_url,
        enrollment_service_url=enrollment_url,
        # Only meaningful (and required) for Federated (MS-MDE2 3.1.4.1.3.2).
        authentication_service_url=authentication_url if chosen == "Federated" else None,
    )


def build_discover_response(resp: DiscoverResponse, relates_to: str | None, *, activity_id: str) -> bytes:
    """Serialize ``DiscoverResponse`` (MS-MDE2 3.1.4.1.2.2, sample 4.1.2).

    Children in the order of Microsoft's samples (the XSD uses ``xsd:all``).
    """
    return _discover_template(resp).render(relates_to, activity_id=activity_id)


# A server answers few distinct responses (its URLs, an AuthPolicy, the
# versions clients ask for); the bound keeps odd versions from growing it.
@functools.lru_cache(maxsize=32)
def _discover_template(resp: DiscoverResponse) -> SoapTemplate:
    response = etree.Element(f"{{{DISCOVERY}}}DiscoverResponse", nsmap=default_nsmap(DISCOVERY))
    result = etree.SubElement(response, f"{{{DISCOVERY}}}DiscoverResult")

    def add(name: str, value: str) -> None:
        etree.SubElement(result, f"{{{DISCOVERY}}}{name}").text = value

    add("AuthPolicy", resp.auth_policy)
    add("EnrollmentVersion", resp.enrollment_version)
    add("EnrollmentPolicyServiceUrl", resp.enrollment_policy_service_url)
    add("EnrollmentServiceUrl", resp.enrollment_service_url)
    if resp.authentication_service_url is not None:
        add("AuthenticationServiceUrl", resp.authentication_service_url)
    return SoapTemplate(ACTION_DISCOVER_RESPONSE, response)
