"""What the store keeps and hands out: records, and the errors it raises.

The types the OMA-DM session exchanges with the store (its state, the
step one message commits, queued commands and their results) belong to the
protocol and live in :mod:`mdmd.management`; the records here only refer
to them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mdmd.actions import DeviceAction
from mdmd.management import CommandResult, QueuedCommand, SessionState
from mdmd.profiles import DeviceProfile, DeviceVars, Profile, ProfileCommand, ProfileEvent, ProfileItem

__all__ = [
    "DEVICE_SORTS",
    "ActionOutcome",
    "AdminToken",
    "AssignmentOutcome",
    "AuditEntry",
    "AuditQuery",
    "AuditRecord",
    "CertificateRecord",
    "CertificateRenewal",
    "CommandRecord",
    "ConsoleSessionRecord",
    "DeviceConflict",
    "DeviceEnrollment",
    "DevicePage",
    "DeviceProfileEntry",
    "DeviceQuery",
    "DeviceRecord",
    "EnrollingHost",
    "EnrollmentOutcome",
    "FleetCounts",
    "GroupChange",
    "GroupRecord",
    "HostEnrollment",
    "HostRecord",
    "LoggedMessage",
    "ManagementContext",
    "MessageLogWrite",
    "NewAction",
    "NewOperation",
    "OperationRecord",
    "ProfileContext",
    "ProfileDeviceState",
    "ProfileRecord",
    "RenewalOutcome",
    "RenewalRefused",
    "SessionConflict",
    "StoreError",
    "StoreUnavailable",
    "StoredAlert",
]


class StoreError(Exception):
    """The database cannot be used (corrupt, newer schema, unreadable)."""


class StoreUnavailable(StoreError):
    """The database cannot be reached (down, refused, timed out, or the
    credentials are refused): worth trying again later, unlike a
    configuration mistake.  Nothing of the failed call was committed,
    except possibly a COMMIT whose answer was lost."""


class DeviceConflict(Exception):
    """The device ID is enrolled for another host: refused, nothing changed."""

    def __init__(self, device_id: str, host_id: int) -> None:
        super().__init__(f"device {device_id} is enrolled for host {host_id}")
        self.device_id = device_id
        self.host_id = host_id


class SessionConflict(Exception):
    """Another process advanced this device's SyncML session since it was
    read: the step is refused, nothing changed; read again and redo it."""

    def __init__(self, device_id: str) -> None:
        super().__init__(f"device {device_id}: SyncML session changed since it was read")
        self.device_id = device_id


class RenewalRefused(Exception):
    """The certificate being renewed is no longer one that may be renewed
    (revoked, unknown, its device unenrolled) by the time the renewal is
    written: refused, nothing changed."""

    def __init__(self, serial: str, reason: str) -> None:
        super().__init__(f"certificate {serial}: {reason}")
        self.serial = serial
        self.reason = reason


@dataclass(frozen=True, slots=True)
class HostEnrollment:
    """What ``POST /api/fleet/orbit/enroll`` stores about a host."""

    hardware_uuid: str
    node_key_hash: bytes
    platform: str
    hostname: str
    hardware_serial: str
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class HostRecord:
    id: int
    hardware_uuid: str
    platform: str
    hostname: str
    hardware_serial: str
    enrolled_at: float
    last_seen: float | None
    unenroll_requested: bool
    mdm_device_id: str | None  # the enrolled MDM device of this host, if any


@dataclass(frozen=True, slots=True)
class EnrollingHost:
    """What an MS-WSTEP enrollment checks before its certificate is signed,
    read in one transaction (:meth:`Store.enrolling_host`)."""

    #: The host holding the node key; None for an unknown or replaced key.
    host: HostRecord | None
    #: The DeviceID (any case; the exact spelling first) is enrolled...
    device_enrolled: bool
    #: ...for this host (None: for no host).
    device_host_id: int | None


@dataclass(frozen=True, slots=True)
class DeviceEnrollment:
    """A successful MS-WSTEP enrollment, stored before the response leaves."""

    device_id: str
    host_id: int
    hw_dev_id: str | None
    enrollment_type: str
    device_name: str | None
    os_version: str | None
    context: Sequence[tuple[str, str]]
    cert_serial: str
    cert_thumbprint: str
    cert_not_before: float
    cert_not_after: float


@dataclass(frozen=True, slots=True)
class EnrollmentOutcome:
    revoked_serials: tuple[str, ...]
    replaced_device_ids: tuple[str, ...]  # other devices of the same host, now unenrolled
    hw_dev_id_collisions: tuple[str, ...]  # other enrolled devices with the same HWDevID


@dataclass(frozen=True, slots=True)
class CertificateRenewal:
    """A certificate issued by renewal (MS-MDE2 3.5), stored before the
    response leaves: the new certificate of the device of *renewed_serial*."""

    device_id: str
    renewed_serial: str
    cert_serial: str
    cert_thumbprint: str
    cert_not_before: float
    cert_not_after: float


@dataclass(frozen=True, slots=True)
class RenewalOutcome:
    # Certificates issued by an earlier renewal of the same certificate
    # whose answer never reached the device: revoked as superseded.
    superseded_serials: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    device_id: str
    host_id: int | None
    hw_dev_id: str | None
    enrollment_type: str
    device_name: str | None
    os_version: str | None
    state: str  # "enrolled" | "unenrolled"
    hw_dev_id_collision: bool
    enrolled_at: float
    unenrolled_at: float | None
    last_seen: float | None
    inventory: dict[str, str]
    #: The device's current certificate: the newest one not revoked (None:
    #: it has none, e.g. unenrolled).
    certificate: CertificateRecord | None = None
    # What a wipe or an unenrollment made of it (mdmd.actions.shown_state),
    # and the names of its actions not finished yet.
    lifecycle: str | None = None
    pending_actions: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class CertificateRecord:
    serial: str
    device_id: str
    thumbprint: str
    not_before: float
    not_after: float
    issued_at: float
    revoked_at: float | None
    # superseded | renewed | unenrolled when revoked
    revoke_reason: str | None = None
    #: The certificate this one renewed (None: issued at enrollment).
    renewed_from: str | None = None
    #: When a renewed certificate opened its first management session (the
    #: moment its predecessor stopped working).
    activated_at: float | None = None


@dataclass(frozen=True, slots=True)
class StoredAlert:
    """The latest alert of one kind from a device, and how often it came."""

    code: str
    type: str
    source: str
    format: str | None
    data: str | None
    received_at: float
    count: int


@dataclass(frozen=True, slots=True)
class CommandRecord:
    uuid: str
    device_id: str
    verb: str
    body: str  # the command as SyncML, without CmdIDs
    state: str  # pending | sent | acknowledged | failed
    status: int | None
    created_at: float
    sent_at: float | None
    acked_at: float | None
    results: tuple[CommandResult, ...] = ()
    detail: str | None = None  # why it was cancelled, or how it was confirmed
    operation_id: str | None = None


@dataclass(frozen=True, slots=True)
class ManagementContext:
    """Everything one SyncML message needs, read in one transaction."""

    certificate: CertificateRecord
    device: DeviceRecord
    session: SessionState | None
    queue: tuple[QueuedCommand, ...]  # pending or sent-but-unanswered, in queue order
    # Bumped by every committed step (and by re-enrollment): the step this
    # context leads to commits only if nobody else's did in between.
    session_seq: int = 0
    # The device's records of its profiles, and the queued commands that
    # work for them.
    profiles: tuple[DeviceProfile, ...] = ()
    profile_links: tuple[ProfileCommand, ...] = ()
    actions: tuple[DeviceAction, ...] = ()  # its actions not finished yet
    # The reply to the device's last message, read when the message is that
    # one again, byte for byte (a retransmission); then the queue, profiles
    # and actions are not read.
    last_reply: bytes | None = None
    # The device's desired profiles, read with the rest when asked for (the
    # message looks like the first of a session), else None.
    profile_context: ProfileContext | None = None


@dataclass(frozen=True, slots=True)
class ProfileContext:
    """What planning a device's profiles at the start of a session needs."""

    device: DeviceVars
    desired: tuple[Profile, ...]  # the profiles of the device's groups


@dataclass(frozen=True, slots=True)
class ProfileRecord:
    name: str
    version: str
    items: tuple[ProfileItem, ...]
    groups: tuple[str, ...]
    created_at: float
    updated_at: float
    deleted_at: float | None  # being removed from devices, then gone


@dataclass(frozen=True, slots=True)
class ConsoleSessionRecord:
    """A web console session, kept in the store so that every node of a
    fleet (and a restarted one) knows it; only the SHA-256 of its ID and of
    its admin token are kept."""

    id_hash: bytes
    token_name: str
    token_hash: bytes
    csrf: str
    created_at: float
    used_at: float


@dataclass(frozen=True, slots=True)
class GroupRecord:
    name: str
    members: int
    created_at: float | None  # None: the built-in group "all"
    profiles: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class GroupChange:
    """The outcome of adding and removing group members: nothing changes
    when *unknown* names devices mdmd does not know."""

    added: int
    removed: int
    unknown: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AssignmentOutcome:
    """Assigning a profile to groups: nothing changes when the profile or a
    group is unknown."""

    found: bool
    unknown_groups: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class DeviceProfileEntry:
    """A device's record of a profile as the admin API shows it."""

    record: DeviceProfile
    history: tuple[ProfileEvent, ...] = ()


# --------------------------------------------------------------------------
# The device list
# --------------------------------------------------------------------------

#: The orders the device list can be read in (each with the device ID as
#: tie-breaker, so that a position in the list is one (value, ID) pair).
DEVICE_SORTS: tuple[str, ...] = ("enrolled_at", "last_seen")


@dataclass(frozen=True, slots=True)
class DeviceQuery:
    """Which devices ``GET /api/v1/devices`` lists, and in what order.

    Every filter given must hold (AND); ``None`` is no filter.  Times are
    absolute (seconds since the epoch), so that every page of one listing
    asks the same question.  A device that never checked in counts as last
    seen at 0 (it is "last seen before" any time).
    """

    state: str | None = None  # "enrolled" | "unenrolled"
    last_seen_before: float | None = None  # last_seen < this
    last_seen_after: float | None = None  # last_seen >= this
    # This version or any revision of it: "10.0.22631" matches "10.0.22631.4460".
    os_version: str | None = None
    # The device's latest-expiring valid (unrevoked) certificate ends before this.
    cert_expiring_before: float | None = None
    hw_dev_id_collision: bool | None = None
    # Case-insensitive prefix of the device ID, the device name, or its
    # agent host's hostname, hardware serial or hardware UUID.
    search: str | None = None
    # Members of this device group ("all": every enrolled device).
    group: str | None = None
    sort: str = "enrolled_at"  # one of DEVICE_SORTS
    descending: bool = False


@dataclass(frozen=True, slots=True)
class DevicePage:
    """One page of the device list.  *after* is the position of its last
    device ((sort value, device ID)) when more may follow, else None."""

    devices: tuple[DeviceRecord, ...]
    after: tuple[float, str] | None


# --------------------------------------------------------------------------
# Administrators: named tokens and the audit log
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AdminToken:
    """A named admin API token; only its SHA-256 hash is stored."""

    name: str
    token_hash: bytes
    created_at: float
    created_by: str | None = None
    revoked_at: float | None = None
    revoked_by: str | None = None


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One administrator's write: who (the token's name), what, on what."""

    at: float
    actor: str
    action: str  # e.g. "command.queue", "device.unenroll", "token.create"
    target: str | None
    detail: dict[str, Any] = field(default_factory=dict)
    client: str | None = None  # the client's address
    request_id: str | None = None


@dataclass(frozen=True, slots=True)
class AuditRecord:
    id: int
    entry: AuditEntry


@dataclass(frozen=True, slots=True)
class AuditQuery:
    """Newest first; *before_id* continues a listing after its last record."""

    limit: int = 100
    before_id: int | None = None
    actor: str | None = None
    action: str | None = None
    target: str | None = None


# --------------------------------------------------------------------------
# Fleet-wide counts (metrics)
# --------------------------------------------------------------------------

#: metric key -> label value -> count, e.g. {"devices": {"enrolled": 9}}.
FleetCounts = dict[str, dict[str, float]]


@dataclass(frozen=True, slots=True)
class NewAction:
    """An action to queue for one device: its record and its command."""

    action_id: str
    command_uuid: str
    action: str
    options: Mapping[str, Any]
    verb: str
    body: str


@dataclass(frozen=True, slots=True)
class ActionOutcome:
    """Queueing an action: ``queued`` (with the record), or why not:
    ``no_device``, ``unenrolled``, ``wiped``, ``pending`` (the same action
    is queued or sent already)."""

    result: str
    action: DeviceAction | None = None


@dataclass(frozen=True, slots=True)
class NewOperation:
    """One action or command for every member of a group."""

    operation_id: str
    kind: str  # "action" | "command"
    group_name: str
    verb: str
    body: str
    action: str | None = None
    options: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class OperationRecord:
    """A group operation and its progress.  ``state``: ``pending`` (not
    started), ``queuing`` (the members are being given their commands, in
    batches), ``delivering`` (every member has its command), ``done`` (every
    command answered, failed or cancelled).  ``total`` is the group's size
    when the fan-out started, then, once it is over, exactly ``queued`` +
    ``skipped`` (members not enrolled, or with the same action pending)."""

    operation_id: str
    kind: str
    group_name: str
    action: str | None
    options: Mapping[str, Any] | None
    verb: str
    body: str
    state: str
    total: int | None
    queued: int
    skipped: int
    acknowledged: int
    failed: int
    created_at: float
    updated_at: float
    finished_at: float | None
    lease_owner: str | None = None
    lease_until: float | None = None
    cursor: str | None = None


# --------------------------------------------------------------------------
# The SyncML message log (issue 17)
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoggedMessage:
    """One SyncML message in (from the device) or out (mdmd's reply), as the
    message log keeps it: *body* holds at most the first bytes of the
    message (*truncated* says when it was longer); *size* is its whole size."""

    direction: str  # "in" | "out"
    at: float
    session_id: str | None
    msg_id: int | None
    size: int
    body: bytes
    truncated: bool = False
    id: int = 0  # given by the store


@dataclass(frozen=True, slots=True)
class MessageLogWrite:
    """The messages one step logs for its device, and how many of the
    device's latest messages the log keeps (older ones are deleted in the
    same transaction)."""

    messages: tuple[LoggedMessage, ...]
    keep: int


@dataclass(frozen=True, slots=True)
class ProfileDeviceState:
    """One device's record of a profile (the console's per-device status)."""

    device_id: str
    version: str
    state: str
    status: int | None
    detail: str | None
    updated_at: float
    #: Where the next page starts (opaque to callers).
    position: tuple[str, int] = ("", 0)
