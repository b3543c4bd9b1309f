"""The one interface every store backend implements."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

from twisted.internet.defer import Deferred

from mdmd.actions import ActionStep, DeviceAction
from mdmd.management import ManagementStep
from mdmd.profiles import Profile, ProfileStep
from mdmd.store.records import (
    ActionOutcome,
    AdminToken,
    AssignmentOutcome,
    AuditEntry,
    AuditQuery,
    AuditRecord,
    CertificateRecord,
    CertificateRenewal,
    CommandRecord,
    ConsoleSessionRecord,
    DeviceEnrollment,
    DevicePage,
    DeviceProfileEntry,
    DeviceQuery,
    DeviceRecord,
    EnrollingHost,
    EnrollmentOutcome,
    FleetCounts,
    GroupChange,
    GroupRecord,
    HostEnrollment,
    HostRecord,
    LoggedMessage,
    ManagementContext,
    MessageLogWrite,
    NewAction,
    NewOperation,
    OperationRecord,
    ProfileContext,
    ProfileDeviceState,
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

    @property
    def schema_version(self) -> int:
        """The schema version this store's data has (once open)."""
        ...

    def stop(self) -> None: ...

    # -- orbit agents --

    def enroll_host(self, enrollment: HostEnrollment, now: float) -> Deferred[HostRecord]: ...

    def host_by_node_key(
        self, node_key_hash: bytes, *, seen_at: float | None = None
    ) -> Deferred[HostRecord | None]: ...

    def enrolling_host(self, node_key_hash: bytes, device_id: str) -> Deferred[EnrollingHost]:
        """The host holding this node key and whom the device *device_id*
        (any case, the exact spelling first, as :meth:`device`) is enrolled
        for: an MS-WSTEP enrollment's checks before signing, in one read."""
        ...

    def request_unenrollment(self, device_id: str, *, audit: AuditEntry | None = None) -> Deferred[bool]:
        """Ask the agent of the enrolled device *device_id* (any case) to
        unenroll it; False when there is no such device or host.  *audit*
        is recorded in the same transaction when it succeeds."""
        ...

    # -- MDM devices and certificates --

    def record_device_enrollment(
        self, enrollment: DeviceEnrollment, now: float
    ) -> Deferred[EnrollmentOutcome]: ...

    def device(self, device_id: str) -> Deferred[DeviceRecord | None]:
        """The device with this ID in any letter case (the exact spelling
        first, then an enrolled one)."""
        ...

    def certificate(self, serial: str) -> Deferred[CertificateRecord | None]: ...

    def devices(self) -> Deferred[list[DeviceRecord]]:
        """Every device (small fleets and tests; the admin API pages with
        :meth:`device_page`)."""
        ...

    def device_page(
        self, query: DeviceQuery, *, limit: int, after: tuple[float, str] | None = None
    ) -> Deferred[DevicePage]:
        """Up to *limit* devices matching *query* in its order, starting
        after the position *after* (a previous page's ``after``).  Runs on
        indexes (keyset pagination, no OFFSET) and beside, never before, the
        reads of devices' own requests."""
        ...

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
        self,
        cert_serial: str,
        *,
        queue_limit: int = 100,
        request_digest: str | None = None,
        with_profile_context: bool = False,
    ) -> Deferred[ManagementContext | None]:
        """Everything a SyncML message from the holder of certificate
        *cert_serial* needs, in one read.  A message whose *request_digest*
        is that of the session's last message is a retransmission: its
        stored reply is read instead of the queue, profiles and actions.
        *with_profile_context*: the device's :meth:`profile_context` too, in
        the same read (a session's first message needs it)."""
        ...

    def commit_management_step(
        self,
        step: ManagementStep,
        now: float,
        *,
        expected_seq: int | None = None,
        profiles: ProfileStep | None = None,
        actions: ActionStep | None = None,
        messages: MessageLogWrite | None = None,
    ) -> Deferred[None]:
        """Commit one message's step (and what it changed of the device's
        profiles and actions, and its *messages* for the device's message
        log, trimmed to the latest ``messages.keep``, in the same
        transaction).  With
        *expected_seq* (the context's ``session_seq``) it is a
        compare-and-swap: ``SessionConflict``, and nothing written, if
        another step committed since.  Commands the step created are queued
        before its ``sent`` marks apply.  Answers count in their group
        operation's progress.  When the device leaves (its Alert 1226, or
        ``actions.ended``: wiped or unenrolled) it is unenrolled, its
        certificates revoked, and every command and action still open for it
        cancelled (failed, with the reason in ``detail``)."""
        ...

    def device_messages(self, device_id: str, *, limit: int = 50) -> Deferred[list[LoggedMessage]]:
        """The device's message log (the exact device ID), newest first:
        the messages :meth:`commit_management_step` logged, bodies whole as
        they were given."""
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
        self,
        device_id: str,
        uuid: str,
        verb: str,
        body: str,
        now: float,
        *,
        audit: AuditEntry | None = None,
    ) -> Deferred[CommandRecord | None]:
        """Queue a command for the enrolled device *device_id* (any case;
        the record carries its stored spelling); None when there is none.
        *audit* is recorded in the same transaction."""
        ...

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

    def group_names(self) -> Deferred[list[str]]:
        """The groups' names, ``all`` first (without counting members)."""
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

    def device_groups(self, device_id: str) -> Deferred[list[str]]:
        """The groups the device (exact ID) is a member of, by name (``all``
        not included)."""
        ...

    def profile_devices(
        self, name: str, *, state: str | None = None, after: tuple[str, int] | None = None, limit: int = 100
    ) -> Deferred[list[ProfileDeviceState]]:
        """The devices' records of the profile *name* (only those in *state*
        when given), a page of *limit* starting after the ``position`` of
        a previous page's last record; ordered by state, then as stored."""
        ...

    def device_profiles(self, device_id: str, *, history: int = 5) -> Deferred[list[DeviceProfileEntry]]:
        """The device's records of its profiles, each with its latest
        *history* events."""
        ...

    # -- administrators: named tokens and the audit log --

    def admin_tokens(self) -> Deferred[list[AdminToken]]:
        """Every token, revoked ones too, by name."""
        ...

    def create_admin_token(self, token: AdminToken, *, audit: AuditEntry | None = None) -> Deferred[bool]:
        """Store a new token; False (and nothing written) when an active
        token has that name.  A revoked token's name can be used again."""
        ...

    def revoke_admin_token(
        self, name: str, now: float, *, by: str | None = None, audit: AuditEntry | None = None
    ) -> Deferred[Literal["revoked", "unknown", "last"]]:
        """Revoke the active token *name*: "unknown" when there is none,
        "last" (and nothing written) when it is the only active one, so that
        nobody locks every administrator out."""
        ...

    def start_console_session(
        self, session: ConsoleSessionRecord, *, lifetime: float, idle: float, keep: int
    ) -> Deferred[None]:
        """Store a new console session.  Sessions that ended (*lifetime*
        seconds after they started, *idle* seconds after they were last
        used, both as of the new session's start) go first, then the
        oldest, so that at most *keep* are kept."""
        ...

    def use_console_session(
        self, id_hash: bytes, now: float, *, lifetime: float, idle: float
    ) -> Deferred[ConsoleSessionRecord | None]:
        """The live session *id_hash*, its last use set to *now*; None (and
        the session deleted) when it has ended (see
        :meth:`start_console_session`), or when there is none."""
        ...

    def end_console_session(self, id_hash: bytes) -> Deferred[ConsoleSessionRecord | None]:
        """Delete the session; what it was, or None when there was none."""
        ...

    def adopt_bootstrap_token(
        self, name: str, token_hash: bytes, now: float
    ) -> Deferred[Literal["created", "updated", "unchanged", "revoked"]]:
        """Make the bootstrap token file's token the token *name*: created
        when there is none, its hash updated when the file changed, left
        alone ("revoked") when an administrator revoked it."""
        ...

    def record_audit(self, entry: AuditEntry) -> Deferred[None]:
        """Record an administrator's write that is not itself a store call
        (or is one without an ``audit`` parameter): right after it."""
        ...

    def audit_log(self, query: AuditQuery) -> Deferred[list[AuditRecord]]: ...

    # -- operations --

    def fleet_counts(self, now: float) -> Deferred[FleetCounts]:
        """Counts over the whole fleet for the metrics and the console's
        fleet page, read beside devices' requests, never on the reactor, on
        indexes: ``devices`` by state, ``commands`` by state,
        ``certificates_expiring`` (valid certificates ending within 30
        days), ``profiles`` (device profile records by state),
        ``checkins`` (enrolled devices last seen within ``1h``, ``24h``,
        ``7d``, ``older``, ``never``; each bucket excludes the ones before
        it), ``enrollments`` (devices enrolled on each of the last 30 UTC
        days, by ``YYYY-MM-DD``), and ``profile:NAME`` for each profile not
        being deleted (its devices by state, the devices of its groups that
        have no record of it yet as ``pending``)."""
        ...

    def check_writable(self, now: float) -> Deferred[None]:
        """Commit a small write (readiness): fails when the store cannot."""
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

    def operations(self, *, limit: int = 100) -> Deferred[list[OperationRecord]]:
        """The latest *limit* group operations, newest first."""
        ...

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
