"""MS-XCEP GetPolicies as profiled by MS-MDE2 3.3: parse the request, build the response.

Windows only applies ``minimalKeyLength``, ``hashAlgorithmOIDReference`` and
``cryptoProviders`` from the policy (Microsoft Learn, "Federated
authentication device enrollment"); everything else is sent because the XCEP
schema requires it, in the schema's sequence order (XCEP 3.1.4.1.3.1).

No client-authentication EKU in ``oIDs``: an OID there only matters when
something references it (``policyOIDReference``, ``hashAlgorithmOIDReference``,
``extensions``, RA requirements), Windows ignores template extensions, and
the issued certificate's EKU is decided by mdmd's CA, never taken from the
CSR.  Listing it would advertise something that has no effect.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from lxml import etree

from mdmd.soap import (
    ACTION_GET_POLICIES,
    ACTION_GET_POLICIES_RESPONSE,
    XCEP,
    XSI,
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
    "HASH_OID_SHA256",
    "CertificatePolicy",
    "GetPoliciesRequest",
    "build_get_policies_response",
    "parse_get_policies",
]

#: SHA-256 (NIST) — the hash Windows is told to sign its CSR with.
HASH_OID_SHA256 = "2.16.840.1.101.3.4.2.1"
_HASH_OID_NAME = "szOID_NIST_sha256"
# XCEP 3.1.4.1.3.16 OID groups: 1 = hash algorithm (MS-MDE2 3.3.4.1.1.2 uses
# 1 for the hash OID "for example").
_OID_GROUP_HASH = 1
_OID_REFERENCE_ID = 0
# MS-MDE2 3.3.4.1.1.2: policySchema MUST be 3 (needed for
# hashAlgorithmOIDReference).
_POLICY_SCHEMA = 3

_CLIENT_FIELDS = ("lastUpdate", "preferredLanguage")


@dataclass(frozen=True)
class GetPoliciesRequest:
    """Content of ``GetPolicies`` (XCEP 3.1.4.1.2.1).

    MDE2 clients send ``lastUpdate`` and ``preferredLanguage`` as nil and a
    nil ``requestFilter`` (MS-MDE2 3.3.4.1.1.1); newer Windows adds elements
    such as ``TPMManufacturer`` inside ``client`` (XCEP's ``xs:any``), kept in
    ``client_extras`` as (local name, text) pairs for logging.
    """

    last_update: str | None
    preferred_language: str | None
    client_extras: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class CertificatePolicy:
    """The one certificate template offered to enrolling devices."""

    template_name: str
    min_key_bits: int = 2048
    validity_seconds: int = 365 * 24 * 3600
    renewal_seconds: int = 42 * 24 * 3600
    #: Key storage providers in preference order; empty = let Windows choose
    #: (sent as xsi:nil).  E.g. "Microsoft Platform Crypto Provider" (TPM).
    crypto_providers: tuple[str, ...] = ()
    policy_id: str = ""
    major_revision: int = 101
    minor_revision: int = 0

    def __post_init__(self) -> None:
        if not self.template_name:
            raise ValueError("template_name must not be empty")
        if self.min_key_bits < 1:
            raise ValueError("min_key_bits must be positive")
        # XCEP 3.1.4.1.3.8: both periods are unsignedLong greater than 0.
        if self.validity_seconds <= 0 or self.renewal_seconds <= 0:
            raise ValueError("validity_seconds and renewal_seconds must be positive")
        # XCEP 3.1.4.1.3.24: majorRevision > 0, minorRevision >= 0.
        if self.major_revision <= 0 or self.minor_revision < 0:
            raise ValueError("major_revision must be > 0 and minor_revision >= 0")


def _optional_value(element: etree._Element | None) -> str | None:
    if element is None or is_nil(element):
        return None
    return text_of(element) or None


def parse_get_policies(req: SoapRequest) -> GetPoliciesRequest:
    """Read a ``GetPolicies`` request.

    :raises SoapFault: ``MessageFormat`` for a wrong action or body element,
        or a missing/nil ``client`` (XCEP 3.1.4.1.2.1: the server MUST fault).
    """
    require_action(req, ACTION_GET_POLICIES)
    body = req.body
    if local_name(body) != "GetPolicies" or namespace_of(body) != XCEP:
        raise SoapFault(
            FaultCode.MESSAGE_FORMAT,
            f"received body element {clip(local_name(body))} in namespace "
            f"{clip(namespace_of(body))}; expected GetPolicies in namespace {XCEP}",
        )
    client = find_child(body, "client")
    if client is None or is_nil(client):
        raise SoapFault(
            FaultCode.MESSAGE_FORMAT,
            "received GetPolicies without a client element; MS-XCEP requires it",
        )
    extras = tuple(
        (local_name(child), text_of(child))
        for child in child_elements(client)
        if local_name(child) not in _CLIENT_FIELDS
    )
    return GetPoliciesRequest(
        last_update=_optional_value(find_child(client, "lastUpdate")),
        preferred_language=_optional_value(find_child(client, "preferredLanguage")),
        client_extras=extras,
    )


def _add(parent: etree._Element, name: str, text: str | None = None) -> etree._Element:
    element = etree.SubElement(parent, f"{{{XCEP}}}{name}")
    if text is not None:
        element.text = text
    return element


def _nil(parent: etree._Element, name: str) -> etree._Element:
    # xsi is declared once on s:Body by build_soap_response: Microsoft's
    # samples repeat it on every nil element, but one declaration in scope is
    # all XML namespaces need.
    element = etree.SubElement(parent, f"{{{XCEP}}}{name}")
    element.set(f"{{{XSI}}}nil", "true")
    return element


def _build_attributes(parent: etree._Element, policy: CertificatePolicy) -> None:
    add, nil = _add, _nil
    attributes = add(parent, "attributes")
    # Order is XCEP 3.1.4.1.3.1's xs:sequence; do not reorder.
    add(attributes, "commonName", policy.template_name)
    add(attributes, "policySchema", str(_POLICY_SCHEMA))
    validity = add(attributes, "certificateValidity")
    add(validity, "validityPeriodSeconds", str(policy.validity_seconds))
    add(validity, "renewalPeriodSeconds", str(policy.renewal_seconds))
    permission = add(attributes, "permission")
    add(permission, "enroll", "true")
    add(permission, "autoEnroll", "false")
    key = add(attributes, "privateKeyAttributes")
    add(key, "minimalKeyLength", str(policy.min_key_bits))
    nil(key, "keySpec")
    nil(key, "keyUsageProperty")
    nil(key, "permissions")
    nil(key, "algorithmOIDReference")
    if policy.crypto_providers:
        providers = add(key, "cryptoProviders")
        for name in policy.crypto_providers:
            add(providers, "provider", name)
    else:
        nil(key, "cryptoProviders")
    revision = add(attributes, "revision")
    add(revision, "majorRevision", str(policy.major_revision))
    add(revision, "minorRevision", str(policy.minor_revision))
    nil(attributes, "supersededPolicies")
    nil(attributes, "privateKeyFlags")
    nil(attributes, "subjectNameFlags")
    nil(attributes, "enrollmentFlags")
    nil(attributes, "generalFlags")
    # MS-MDE2 3.3.4.1.1.2: the referenced OID MUST be in the response.
    add(attributes, "hashAlgorithmOIDReference", str(_OID_REFERENCE_ID))
    nil(attributes, "rARequirements")
    nil(attributes, "keyArchivalAttributes")
    nil(attributes, "extensions")


def build_get_policies_response(
    policy: CertificatePolicy, relates_to: str | None, *, activity_id: str
) -> bytes:
    """Serialize ``GetPoliciesResponse`` (MS-XCEP 3.1.4.1.2.2, as profiled by MS-MDE2 3.3).

    Sequence ``response``, ``cAs`` (nil: MDE2 has no CA list), ``oIDs`` (the
    SHA-256 OID, referenced by both ``policyOIDReference`` and
    ``hashAlgorithmOIDReference`` as in Microsoft's samples).  The same for
    every device: built once per policy, then only the ActivityId and
    RelatesTo change.
    """
    return _get_policies_template(policy).render(relates_to, activity_id=activity_id)


@functools.lru_cache(maxsize=8)
def _get_policies_template(policy: CertificatePolicy) -> SoapTemplate:
    add, nil = _add, _nil
    root = etree.Element(f"{{{XCEP}}}GetPoliciesResponse", nsmap=default_nsmap(XCEP))

    response = add(root, "response")
    add(response, "policyID", policy.policy_id)
    nil(response, "policyFriendlyName")
    nil(response, "nextUpdateHours")
    nil(response, "policiesNotChanged")
    policies = add(response, "policies")
    certificate_policy = add(policies, "policy")
    # XCEP 3.1.4.1.3.7: MUST equal an oIDReferenceID of this response.
    add(certificate_policy, "policyOIDReference", str(_OID_REFERENCE_ID))
    nil(certificate_policy, "cAs")
    _build_attributes(certificate_policy, policy)

    nil(root, "cAs")
    oids = add(root, "oIDs")
    oid = add(oids, "oID")
    add(oid, "value", HASH_OID_SHA256)
    add(oid, "group", str(_OID_GROUP_HASH))
    add(oid, "oIDReferenceID", str(_OID_REFERENCE_ID))
    add(oid, "defaultName", _HASH_OID_NAME)

    return SoapTemplate(ACTION_GET_POLICIES_RESPONSE, root)
