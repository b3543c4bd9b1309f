"""The one interface every store backend implements."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from twisted.internet.defer import Deferred

from mdmd.actions import ActionStep, DeviceAction
from mdmd.management import ManagementStep
from mdmd.profiles import Profile, ProfileStep
from mdmd.store.records import (
    ActionOutcome,
    AssignmentOutcome,
    CertificateRecord,
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
    NewAction,
    NewOperation,
    OperationRecord,
    ProfileContext,
    ProfileRecord,
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
        actions: ActionStep | None = None,
    ) -> Deferred[None]:
        """Commit one message's step (and what it changed of the device's
        profiles and actions, in the same transaction).  With
        *expected_seq* (the context's ``session_seq``) it is a
        compare-and-swap: ``SessionConflict``, and nothing written, if
        another step committed since.  Commands the step created are queued
        before its ``sent`` marks apply.  Answers count in their group
        operation's progress.  When the device leaves (its Alert 1226, or
        ``actions.ended``: wiped or unenrolled) it is unenrolled, its
        certificates revoked, and every command and action still open for it
        cancelled (failed, with the reason in ``detail``)."""
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

    # -- device actions and group operations --

    def request_action(self, device_id: str, action: NewAction, now: float) -> Deferred[ActionOutcome]:
        """Queue *action* for the device, unless it is not enrolled (or was
        wiped) or the same action is queued or sent already.  A wipe or an
        unenrollment sets the device's lifecycle; an unenrollment also asks
        the device's agent, when there is one; a rename replaces a rename
        still waiting for a restart."""
        ...

    def device_actions(self, device_id: str, *, limit: int = 20) -> Deferred[list[DeviceAction]]:
        """The device's actions, newest first."""
        ...

    def create_operation(self, operation: NewOperation, now: float) -> Deferred[bool]:
        """Record a group operation (``pending``); False, and nothing
        stored, when the group does not exist (``all`` always does)."""
        ...

    def operation(self, operation_id: str) -> Deferred[OperationRecord | None]: ...

    def operation_leases(self) -> Deferred[list[OperationRecord]]:
        """The operations still to fan out (``pending``, ``queuing``), with
        their leases."""
        ...

    def claim_operation(
        self, owner: str, now: float, lease_until: float, *, takeover: Sequence[str] = ()
    ) -> Deferred[OperationRecord | None]:
        """Lease the oldest operation still to fan out whose lease is free,
        expired, *owner*'s own, or held by one of *takeover* (owners known
        to be dead); None when there is none.  Compare-and-swap: two
        claimants never both get one operation."""
        ...

    def fan_out(
        self,
        operation_id: str,
        owner: str,
        now: float,
        lease_until: float,
        *,
        limit: int,
        total: int | None = None,
    ) -> Deferred[OperationRecord | None]:
        """One batch, one transaction: the next *limit* members of the
        operation's group get its command (or action), the cursor moves past
        them and the lease is renewed; after the last member the operation
        is ``delivering`` (or ``done``) and the lease released.  None, and
        nothing done, when *owner* no longer holds the lease.  *total*, if
        given, is recorded when none is yet."""
        ...

    def release_operation(self, operation_id: str, owner: str) -> Deferred[None]:
        """Give up *owner*'s lease (stopping), so that another process can
        continue at once."""
        ...
