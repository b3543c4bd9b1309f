"""The one interface every store backend implements."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from twisted.internet.defer import Deferred

from mdmd.management import ManagementStep
from mdmd.profiles import Profile, ProfileStep
from mdmd.store.records import (
    AssignmentOutcome,
    CertificateRecord,
    CertificateRenewal,
    CommandRecord,
    DeviceEnrollment,
    DeviceProfileEntry,
    DeviceRecord,
    EnrollmentOutcome,
    GroupChange,
    GroupRecord,
    HostEnrollment,
    HostRecord,
    ManagementContext,
    ProfileContext,
    ProfileRecord,
    RenewalOutcome,
    StoredAlert,
)

__all__ = ["Store"]


class Store(Protocol):
    """What the protocol handlers need from persistence.

    Every method is one transaction and returns a Deferred that fires on the
    reactor thread; one that changes anything fires only once the change is
    durable, so a handler that awaits it before answering never acknowledges
    what is not on disk.  ``now`` arguments are seconds since the epoch (the
    caller's clock, so tests can move time).
    """

    # -- life cycle (synchronous: before the reactor runs / after it stops) --

    def open(self, *, check: bool = True) -> int:
        """Open, check and migrate (``check=False``: only verify the schema
        version, for worker processes); return the schema version found."""
        ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    # -- orbit agents --

    def enroll_host(self, enrollment: HostEnrollment, now: float) -> Deferred[HostRecord]: ...

    def host_by_node_key(
        self, node_key_hash: bytes, *, seen_at: float | None = None
    ) -> Deferred[HostRecord | None]: ...

    def request_unenrollment(self, device_id: str) -> Deferred[bool]: ...

    # -- MDM devices and certificates --

    def record_device_enrollment(
        self, enrollment: DeviceEnrollment, now: float
    ) -> Deferred[EnrollmentOutcome]: ...

    def device(self, device_id: str) -> Deferred[DeviceRecord | None]: ...

    def certificate(self, serial: str) -> Deferred[CertificateRecord | None]: ...

    def devices(self) -> Deferred[list[DeviceRecord]]: ...

    def device_certificates(self, device_id: str) -> Deferred[list[CertificateRecord]]: ...

    # -- certificate renewal (MS-MDE2 3.5) --

    def record_renewal(self, renewal: CertificateRenewal, now: float) -> Deferred[RenewalOutcome]:
        """Store a certificate issued by renewal.  The renewed certificate
        stays valid (the answer may be lost on its way); certificates issued
        by an earlier renewal of it are revoked as superseded.
        ``RenewalRefused``, and nothing written, if the renewed certificate
        is unknown, revoked or not its device's, or the device unenrolled."""
        ...

    def confirm_renewal(self, serial: str, now: float) -> Deferred[tuple[str, ...]]:
        """The renewed certificate *serial* opened a management session: its
        device's other live certificates stop working (the one it renewed:
        ``renewed``, any other: ``superseded``).  Returns their serials;
        nothing happens (and ``()``) for a certificate that is not a renewed
        one waiting for its first session."""
        ...

    def retire_renewed_certificates(self, now: float, *, limit: int) -> Deferred[int]:
        """Revoke (reason ``renewed``) up to *limit* certificates that ended
        before *now* while a renewal of them exists; how many."""
        ...

    def prune_certificates(self, revoked_before: float, *, limit: int) -> Deferred[int]:
        """Delete up to *limit* certificates revoked as ``superseded`` or
        ``renewed`` before *revoked_before*; how many."""
        ...

    # -- background jobs shared by several nodes --

    def claim_lease(self, name: str, holder: str, now: float, until: float) -> Deferred[bool]:
        """Claim the background job *name* for *holder* until *until*: True
        when it was free (never claimed, or its lease ended by *now*) or
        already *holder*'s, and it is now *holder*'s until *until*; False
        while another holder's lease runs.  With several nodes on one
        database, a job run only under its lease runs on one at a time."""
        ...

    # -- OMA-DM sessions --

    def management_context(
        self, cert_serial: str, *, queue_limit: int = 100
    ) -> Deferred[ManagementContext | None]: ...

    def commit_management_step(
        self,
        step: ManagementStep,
        now: float,
        *,
        expected_seq: int | None = None,
        profiles: ProfileStep | None = None,
    ) -> Deferred[None]:
        """Commit one message's step (and what it changed of the device's
        profiles, in the same transaction).  With *expected_seq* (the
        context's ``session_seq``) it is a compare-and-swap:
        ``SessionConflict``, and nothing written, if another step committed
        since.  Commands the step created are queued before its ``sent``
        marks apply."""
        ...

    def profile_context(self, device_id: str) -> Deferred[ProfileContext]:
        """The device's variables and the profiles its groups want."""
        ...

    def device_alerts(self, device_id: str) -> Deferred[list[StoredAlert]]:
        """The latest alert of each kind the device sent, newest first."""
        ...

    def last_reply(self, device_id: str) -> Deferred[bytes | None]:
        """The reply to the device's last message (for a retransmission)."""
        ...

    # -- the command queue --

    def queue_command(
        self, device_id: str, uuid: str, verb: str, body: str, now: float
    ) -> Deferred[CommandRecord | None]: ...

    def command(self, uuid: str) -> Deferred[CommandRecord | None]: ...

    def device_commands(self, device_id: str, *, limit: int = 100) -> Deferred[list[CommandRecord]]: ...

    # -- configuration profiles and groups --

    def create_profile(self, profile: Profile, now: float) -> Deferred[bool]:
        """False (nothing stored) when the name is taken."""
        ...

    def update_profile(self, profile: Profile, now: float) -> Deferred[bool]:
        """False when there is no such profile (or it is being deleted)."""
        ...

    def profiles(self) -> Deferred[list[ProfileRecord]]: ...

    def profile(self, name: str) -> Deferred[ProfileRecord | None]: ...

    def profile_status(self, name: str) -> Deferred[dict[str, int]]:
        """How many devices are in each state for this profile; devices of
        its groups that have not had it yet count as ``pending``."""
        ...

    def delete_profile(self, name: str, now: float) -> Deferred[bool]:
        """Unassign it everywhere: every device removes it at its next
        session, then the profile is gone.  False when unknown."""
        ...

    def assign_profile(self, name: str, groups: Sequence[str], now: float) -> Deferred[AssignmentOutcome]:
        """Make *groups* (``all`` included) the profile's groups."""
        ...

    def create_group(self, name: str, now: float) -> Deferred[bool]:
        """False when the name is taken."""
        ...

    def groups(self) -> Deferred[list[GroupRecord]]:
        """Every group, the built-in ``all`` first."""
        ...

    def group(self, name: str) -> Deferred[GroupRecord | None]: ...

    def group_members(self, name: str, *, after: str | None = None, limit: int = 100) -> Deferred[list[str]]:
        """Member device IDs in order, the first *limit* after *after*."""
        ...

    def delete_group(self, name: str) -> Deferred[bool]: ...

    def change_group_members(
        self, name: str, add: Sequence[str], remove: Sequence[str], now: float
    ) -> Deferred[GroupChange | None]:
        """None when there is no such group."""
        ...

    def device_profiles(self, device_id: str, *, history: int = 5) -> Deferred[list[DeviceProfileEntry]]:
        """The device's records of its profiles, each with its latest
        *history* events."""
        ...
