"""The one interface every store backend implements."""

from __future__ import annotations

from typing import Literal, Protocol

from twisted.internet.defer import Deferred

from mdmd.management import ManagementStep
from mdmd.store.records import (
    AdminToken,
    AuditEntry,
    AuditQuery,
    AuditRecord,
    CertificateRecord,
    CommandRecord,
    DeviceEnrollment,
    DevicePage,
    DeviceQuery,
    DeviceRecord,
    EnrollmentOutcome,
    FleetCounts,
    HostEnrollment,
    HostRecord,
    ManagementContext,
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

    # -- OMA-DM sessions --

    def management_context(
        self, cert_serial: str, *, queue_limit: int = 100
    ) -> Deferred[ManagementContext | None]: ...

    def commit_management_step(
        self, step: ManagementStep, now: float, *, expected_seq: int | None = None
    ) -> Deferred[None]:
        """Commit one message's step.  With *expected_seq* (the context's
        ``session_seq``) it is a compare-and-swap: ``SessionConflict``, and
        nothing written, if another step committed since."""
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
        """Counts over the whole fleet for the metrics (devices by state,
        commands by state, certificates expiring within 30 days); read
        beside devices' requests, never on the reactor."""
        ...

    def check_writable(self, now: float) -> Deferred[None]:
        """Commit a small write (readiness): fails when the store cannot."""
        ...
