"""What the store keeps and hands out: records, and the errors it raises.

The types the OMA-DM session exchanges with the store (its state, the
step one message commits, queued commands and their results) belong to the
protocol and live in :mod:`mdmd.management`; the records here only refer
to them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mdmd.management import CommandResult, QueuedCommand, SessionState
from mdmd.profiles import DeviceProfile, DeviceVars, Profile, ProfileCommand, ProfileEvent, ProfileItem

__all__ = [
    "AssignmentOutcome",
    "CertificateRecord",
    "CertificateRenewal",
    "CommandRecord",
    "DeviceConflict",
    "DeviceEnrollment",
    "DeviceProfileEntry",
    "DeviceRecord",
    "EnrollmentOutcome",
    "GroupChange",
    "GroupRecord",
    "HostEnrollment",
    "HostRecord",
    "ManagementContext",
    "ProfileContext",
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
