"""Fleet "orbit" agent API messages (pure: no HTTP, no storage).

The agent enrolls with ``POST /api/fleet/orbit/enroll`` and then polls
``POST /api/fleet/orbit/config``; for Windows MDM it hands Windows a
programmatic-enrollment token built from its node key, which comes back to
mdmd inside the MS-MDE2 ``DeviceEnrollmentUserToken``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import secrets
from dataclasses import dataclass
from typing import Any

from mdmd.jsonsafe import JSONInputError, parse_untrusted_json

__all__ = [
    "EnrollmentTokenError",
    "OrbitEnrollRequest",
    "OrbitRequestError",
    "hash_node_key",
    "new_node_key",
    "orbit_config",
    "parse_enrollment_token",
    "parse_json_object",
    "parse_node_key",
    "parse_orbit_enroll",
]

# Fleet's enroll request fields besides the secret; anything else is ignored.
_HOST_FIELDS = (
    "hardware_uuid",
    "hardware_serial",
    "hostname",
    "platform",
    "platform_like",
    "osquery_identifier",
    "computer_name",
    "hardware_model",
)
_MAX_FIELD = 1024
# An agent request is a few hundred bytes; the enrollment listener's own
# body limit (a megabyte, for MS-MDE2) is far more than JSON from an
# unauthenticated client needs.
_MAX_JSON_BYTES = 64 * 1024


class OrbitRequestError(ValueError):
    """A malformed agent request; *field* names the offending JSON field."""

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True, slots=True)
class OrbitEnrollRequest:
    enroll_secret: str
    hardware_uuid: str
    hardware_serial: str
    hostname: str
    platform: str
    extra: dict[str, str]  # the other known host fields, as sent


def parse_json_object(body: bytes) -> dict[str, Any]:
    try:
        return parse_untrusted_json(body, max_bytes=_MAX_JSON_BYTES)
    except JSONInputError as e:
        raise OrbitRequestError(e.field, f"request body is {e}") from None


def _string(obj: dict[str, Any], name: str, *, required: bool) -> str:
    value = obj.get(name)
    if value is None:
        if required:
            raise OrbitRequestError(name, f"{name} is required")
        return ""
    if not isinstance(value, str):
        raise OrbitRequestError(name, f"{name} must be a string")
    if len(value) > _MAX_FIELD:
        raise OrbitRequestError(name, f"{name} is longer than {_MAX_FIELD} characters")
    return value


def parse_orbit_enroll(body: bytes) -> OrbitEnrollRequest:
    obj = parse_json_object(body)
    secret = _string(obj, "enroll_secret", required=False)
    uuid = _string(obj, "hardware_uuid", required=True).strip()
    if not uuid:
        raise OrbitRequestError("hardware_uuid", "hardware_uuid must not be empty")
    return OrbitEnrollRequest(
        enroll_secret=secret,
        hardware_uuid=uuid,
        hardware_serial=_string(obj, "hardware_serial", required=False),
        hostname=_string(obj, "hostname", required=False),
        platform=_string(obj, "platform", required=False).strip().lower(),
        extra={
            name: _string(obj, name, required=False)
            for name in _HOST_FIELDS[4:]
            if isinstance(obj.get(name), str)
        },
    )


def parse_node_key(body: bytes) -> str:
    """The ``orbit_node_key`` of an authenticated agent request ("" if absent)."""
    obj = parse_json_object(body)
    return _string(obj, "orbit_node_key", required=False)


def new_node_key() -> str:
    # 256 bits, URL-safe: the agent stores it in a file and sends it in JSON.
    return secrets.token_urlsafe(32)


def hash_node_key(node_key: str) -> bytes:
    """What the store keeps instead of the key.  The key is random with 256
    bits of entropy, so a plain SHA-256 suffices (no salt or stretching):
    a stolen database yields no usable key, and lookups stay indexed."""
    return hashlib.sha256(node_key.encode("utf-8")).digest()


def orbit_config(
    *,
    needs_windows_mdm_enrollment: bool,
    discovery_endpoint: str,
    needs_windows_mdm_unenrollment: bool,
) -> dict[str, Any]:
    """The body of a successful ``/api/fleet/orbit/config`` answer.

    Fleet's agent decodes it into its ``OrbitConfig``; every field is
    optional there, and false notifications are omitted as Fleet does.
    """
    notifications: dict[str, Any] = {}
    if needs_windows_mdm_enrollment:
        notifications["needs_programmatic_windows_mdm_enrollment"] = True
        notifications["windows_mdm_discovery_endpoint"] = discovery_endpoint
    if needs_windows_mdm_unenrollment:
        notifications["needs_programmatic_windows_mdm_unenrollment"] = True
    return {"notifications": notifications}


class EnrollmentTokenError(ValueError):
    """The DeviceEnrollmentUserToken is not a usable orbit token."""


PROGRAMMATIC_ENROLLMENT = 1  # payload.orbit_node_key (the agent's own enrollment)
AUTOMATIC_ENROLLMENT = 2  # payload.auth_token (Fleet's Azure/STS flow)


def parse_enrollment_token(value: str) -> str:
    """The orbit node key inside a ``DeviceEnrollmentUserToken``.

    The agent gives Windows the JSON ``{"type": 1, "payload":
    {"orbit_node_key": ...}}``; Windows base64-encodes it into the WS-Security
    BinarySecurityToken.  Both base64 alphabets are accepted (Fleet's own
    tooling uses the URL-safe one), with or without padding.
    """
    compact = "".join(value.split())
    if not compact:
        raise EnrollmentTokenError("the enrollment token is empty")
    padded = compact + "=" * (-len(compact) % 4)
    try:
        raw = (
            base64.urlsafe_b64decode(padded)
            if "-" in compact or "_" in compact
            else base64.b64decode(padded, validate=True)
        )
    except (binascii.Error, ValueError):
        raise EnrollmentTokenError("the enrollment token is not base64") from None
    try:
        token = parse_untrusted_json(raw, max_bytes=_MAX_JSON_BYTES)
    except JSONInputError as e:
        raise EnrollmentTokenError(f"the enrollment token is {e}") from None
    if not isinstance(token.get("payload"), dict):
        raise EnrollmentTokenError("the enrollment token has no payload object")
    kind = token.get("type")
    # JSON true and 1.0 compare equal to 1 in Python; only the integer counts.
    if type(kind) is not int:
        raise EnrollmentTokenError(f"unknown enrollment token type {kind!r}; supported: 1")
    if kind == AUTOMATIC_ENROLLMENT:
        raise EnrollmentTokenError(
            "automatic enrollment tokens (type 2) are not supported; enroll through the agent (type 1)"
        )
    if kind != PROGRAMMATIC_ENROLLMENT:
        raise EnrollmentTokenError(f"unknown enrollment token type {kind!r}; supported: 1")
    node_key = token["payload"].get("orbit_node_key")
    if not isinstance(node_key, str) or not node_key or len(node_key) > _MAX_FIELD:
        raise EnrollmentTokenError("the enrollment token carries no orbit_node_key")
    return node_key
