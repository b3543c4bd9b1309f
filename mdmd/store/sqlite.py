"""The SQLite backend of :class:`~mdmd.store.interface.Store`: one file in
WAL mode with ``synchronous=FULL`` (a committed transaction survives power
loss), driven by a :class:`~mdmd.store.engine.TransactionEngine` (one
writer thread with group commit, one reader thread beside it).  The reactor
thread never touches the database.
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import time
import uuid as uuidlib
import zlib
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Final, Literal, TypeVar, cast

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorFromThreads

from mdmd.actions import BLOCKING_STATES, OPEN_STATES, ActionStep, DeviceAction, lifecycle_of
from mdmd.management import CommandResult, ManagementStep, QueuedCommand, decode_session, encode_session
from mdmd.profiles import (
    STATES,
    DeviceProfile,
    DeviceVars,
    Profile,
    ProfileCommand,
    ProfileEvent,
    ProfileStep,
    items_from_json,
    items_json,
)
from mdmd.store.engine import Engine, SQLConnection, SQLRow, TransactionEngine
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
    DeviceConflict,
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
    RenewalRefused,
    SessionConflict,
    StoredAlert,
    StoreError,
)
from mdmd.store.sqlite_devices import device_page
from mdmd.store.sqlite_schema import MIGRATIONS, SCHEMA_VERSION

__all__ = ["SQLStore", "SQLiteStore", "backup_database", "insert_audit", "migrate"]

#: The window of the "certificates expiring soon" count.
EXPIRING_WINDOW = 30 * 86400

R = TypeVar("R")


def _connect(path: str) -> sqlite3.Connection:
    # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE), so
    # a method is exactly one transaction and nothing commits implicitly.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: the WAL is fsynced at every commit, so an acknowledged write
    # survives a crash or power loss, not only a process kill.
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema up to :data:`SCHEMA_VERSION`; return the version found."""
    found = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if found > SCHEMA_VERSION:
        raise StoreError(
            f"the database has schema version {found}, newer than this mdmd "
            f"understands ({SCHEMA_VERSION}); refusing to touch it"
        )
    for version in range(found, SCHEMA_VERSION):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in MIGRATIONS[version]:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version={version + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return found


def backup_database(source: sqlite3.Connection, path: str) -> None:
    """Copy the database behind *source* to a new file *path* (0600) with
    SQLite's online backup API: a consistent copy while others read and
    write.  The copy is checked before it is kept."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    try:
        target = sqlite3.connect(path)
        try:
            source.backup(target)
            result = target.execute("PRAGMA quick_check").fetchone()[0]
            if result != "ok":
                raise StoreError(f"{path}: the copy fails its integrity check: {result}")
        finally:
            target.close()
    except BaseException:
        os.unlink(path)
        raise


def _no_writes(conn: sqlite3.Connection) -> Callable[[], None]:
    before = conn.total_changes

    def check() -> None:
        if conn.total_changes != before:
            raise StoreError("a read-only store method wrote")

    return check


def _many(conn: SQLConnection, sql: str, rows: Sequence[Sequence[Any]]) -> None:
    # Most of a step's lists are empty: skip compiling their statements.
    if rows:
        conn.executemany(sql, rows)


def _last_reply(conn: SQLConnection, device_id: str) -> bytes | None:
    row = conn.execute(
        "SELECT reply, base64 FROM syncml_replies WHERE device_id = ?", (device_id,)
    ).fetchone()
    if row is None:
        return None
    reply = row["reply"]
    if row["base64"]:  # carried over from a version-1 session row
        return base64.b64decode(reply)
    return bytes(reply)


def _profile_context(conn: SQLConnection, device_id: str) -> ProfileContext:
    host = conn.execute(
        """
        SELECT d.device_name, h.hostname, h.hardware_serial FROM devices d
        LEFT JOIN hosts h ON h.id = d.host_id WHERE d.device_id = ?
        """,
        (device_id,),
    ).fetchone()
    rows = conn.execute(
        """
        SELECT name, version, items FROM profiles WHERE deleted_at IS NULL AND name IN (
            SELECT profile_name FROM profile_assignments WHERE group_name = 'all'
            UNION
            SELECT a.profile_name FROM profile_assignments a
            JOIN group_members m ON m.group_name = a.group_name WHERE m.device_id = ?
        ) ORDER BY name
        """,
        (device_id,),
    )
    desired = tuple(Profile(r["name"], r["version"], items_from_json(r["items"])) for r in rows)
    hostname = (host["hostname"] or host["device_name"] or "") if host else ""
    serial = (host["hardware_serial"] or "") if host else ""
    return ProfileContext(DeviceVars(device_id, hostname, serial), desired)


class SQLStore:
    """:class:`~mdmd.store.interface.Store` in SQL that SQLite and PostgreSQL
    both run: every method is one transaction, a function of a connection
    handed to the backend's engine.  The statements are written in SQLite's
    dialect (``?`` parameters); the PostgreSQL backend translates the
    parameters and runs its write transactions serializable, so each
    method behaves there as it does behind SQLite's single writer.

    A transaction function may run more than once (PostgreSQL runs one that
    lost a race again): it must change nothing but the database, and build
    whatever it returns afresh each time."""

    _engine: Engine | None = None
    #: Called on a store thread after each commit with the number of
    #: transactions it committed and its seconds (the metrics).
    on_commit: Callable[[int, float], None] | None = None

    def _on_commit(self, size: int, seconds: float) -> None:
        if self.on_commit is not None:
            self.on_commit(size, seconds)

    @property
    def alive(self) -> bool:
        """The store's threads are running (readiness)."""
        return self._engine is not None and self._engine.alive

    def _run(
        self,
        fn: Callable[[SQLConnection], R],
        *,
        write: bool = True,
        bulk: bool = False,
        lane: str | None = None,
    ) -> Deferred[R]:
        """Run *fn* as one transaction off the reactor; the Deferred fires
        once its effects are committed (a read runs beside the writes, a
        *bulk* read beside the other reads too, a *lane*'s on its own)."""
        if self._engine is None:
            return fail(StoreError("store is not open"))
        return self._engine.write(fn) if write else self._engine.read(fn, bulk=bulk, lane=lane)

    # -- hosts --

    def enroll_host(self, enrollment: HostEnrollment, now: float) -> Deferred[HostRecord]:
        def txn(conn: SQLConnection) -> HostRecord:
            # The same hardware UUID is the same host: keep its row (and its
            # MDM device) and replace the node key, so the old key stops
            # working at once.
            conn.execute(
                """
                INSERT INTO hosts (hardware_uuid, node_key_hash, platform, hostname,
                                   hardware_serial, info, enrolled_at, last_seen)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                ON CONFLICT (hardware_uuid) DO UPDATE SET
                    node_key_hash = excluded.node_key_hash,
                    platform = excluded.platform,
                    hostname = excluded.hostname,
                    hardware_serial = excluded.hardware_serial,
                    info = excluded.info,
                    last_seen = excluded.last_seen
                """,
                (
                    enrollment.hardware_uuid,
                    enrollment.node_key_hash,
                    enrollment.platform,
                    enrollment.hostname,
                    enrollment.hardware_serial,
                    json.dumps(enrollment.info, sort_keys=True),
                    now,
                    now,
                ),
            )
            row = conn.execute(
                _HOST_SELECT + " WHERE h.hardware_uuid = ?", (enrollment.hardware_uuid,)
            ).fetchone()
            return _host(row)

        return self._run(txn)

    def host_by_node_key(
        self, node_key_hash: bytes, *, seen_at: float | None = None
    ) -> Deferred[HostRecord | None]:
        """The host holding this node key; with *seen_at*, also record it as
        last seen (one transaction: agents poll often)."""

        def txn(conn: SQLConnection) -> HostRecord | None:
            if seen_at is not None:
                conn.execute(
                    "UPDATE hosts SET last_seen = ? WHERE node_key_hash = ?", (seen_at, node_key_hash)
                )
            row = conn.execute(_HOST_SELECT + " WHERE h.node_key_hash = ?", (node_key_hash,)).fetchone()
            return None if row is None else _host(row)

        return self._run(txn, write=seen_at is not None)

    def enrolling_host(self, node_key_hash: bytes, device_id: str) -> Deferred[EnrollingHost]:
        def txn(conn: SQLConnection) -> EnrollingHost:
            row = conn.execute(_HOST_SELECT + " WHERE h.node_key_hash = ?", (node_key_hash,)).fetchone()
            # The device :meth:`device` would find (same order), its state
            # and host alone: not its certificate and actions.
            device = conn.execute(
                "SELECT host_id, state FROM devices WHERE device_id = ? COLLATE NOCASE"
                " ORDER BY device_id = ? DESC, state = 'enrolled' DESC, enrolled_at DESC LIMIT 1",
                (device_id, device_id),
            ).fetchone()
            enrolled = device is not None and device["state"] == "enrolled"
            return EnrollingHost(
                host=None if row is None else _host(row),
                device_enrolled=enrolled,
                device_host_id=device["host_id"] if enrolled and device is not None else None,
            )

        return self._run(txn, write=False)

    def request_unenrollment(self, device_id: str, *, audit: AuditEntry | None = None) -> Deferred[bool]:
        """Ask the agent of this device's host to unenroll it from MDM."""

        def txn(conn: SQLConnection) -> bool:
            cursor = conn.execute(
                """
                UPDATE hosts SET unenroll_requested = 1
                WHERE id = (SELECT host_id FROM devices WHERE device_id = ? COLLATE NOCASE
                            AND state = 'enrolled' ORDER BY device_id = ? DESC LIMIT 1)
                """,
                (device_id, device_id),
            )
            if cursor.rowcount > 0 and audit is not None:
                insert_audit(conn, audit)
            return cursor.rowcount > 0

        return self._run(txn)

    # -- MDM devices and certificates --

    def record_device_enrollment(
        self, enrollment: DeviceEnrollment, now: float
    ) -> Deferred[EnrollmentOutcome]:
        def txn(conn: SQLConnection) -> EnrollmentOutcome:
            e = enrollment
            # DeviceIDs are not secrets (certificate CN, SyncML headers): an
            # enrolled device belongs to its host, and another host presenting
            # the same ID must not take it over.
            # In any letter case: the admin API finds devices case-insensitively,
            # so two hosts must not hold IDs that differ only in case.
            owner = conn.execute(
                "SELECT host_id FROM devices WHERE device_id = ? COLLATE NOCASE AND state = 'enrolled'"
                " AND host_id IS NOT NULL AND host_id != ? LIMIT 1",
                (e.device_id, e.host_id),
            ).fetchone()
            if owner is not None and owner["host_id"] not in (None, e.host_id):
                raise DeviceConflict(e.device_id, owner["host_id"])
            # Re-enrollment of the same device, or a new MDM device ID on the
            # same host (Windows reinstalled): the old certificates must stop
            # opening sessions.
            old = conn.execute(_LIVE_SERIALS_OF_DEVICE_OR_HOST, (e.device_id, e.host_id)).fetchall()
            revoked = tuple(r["serial"] for r in old)
            _many(
                conn,
                "UPDATE certificates SET revoked_at = ?, revoke_reason = 'superseded' WHERE serial = ?",
                [(now, s) for s in revoked],
            )
            replaced = tuple(
                r["device_id"]
                for r in conn.execute(
                    "SELECT device_id FROM devices"
                    " WHERE host_id = ? AND device_id != ? AND state = 'enrolled'",
                    (e.host_id, e.device_id),
                )
            )
            _many(
                conn,
                "UPDATE devices SET state = 'unenrolled', unenrolled_at = ? WHERE device_id = ?",
                [(now, d) for d in replaced],
            )
            # Clones made without sysprep share HWDevID: never merge
            # them, flag both so an administrator can see it.
            collisions: tuple[str, ...] = ()
            if e.hw_dev_id:
                collisions = tuple(
                    r["device_id"]
                    for r in conn.execute(
                        "SELECT device_id FROM devices"
                        " WHERE hw_dev_id = ? AND device_id != ? AND state = 'enrolled'",
                        (e.hw_dev_id, e.device_id),
                    )
                )
                _many(
                    conn,
                    "UPDATE devices SET hw_dev_id_collision = 1 WHERE device_id = ?",
                    [(d,) for d in collisions],
                )
            # A fresh enrollment starts a fresh OMA-DM account on the device
            # (and a session step read before it must not commit after it):
            # session_seq moves on here, the session's rows go below.
            conn.execute(
                """
                INSERT INTO devices (device_id, host_id, hw_dev_id, enrollment_type, device_name,
                                     os_version, context, state, hw_dev_id_collision, enrolled_at,
                                     session_seq)
                VALUES (?, ?, ?, ?, ?, ?, ?, 'enrolled', ?, ?, 1)
                ON CONFLICT (device_id) DO UPDATE SET
                    host_id = excluded.host_id,
                    hw_dev_id = excluded.hw_dev_id,
                    enrollment_type = excluded.enrollment_type,
                    device_name = excluded.device_name,
                    os_version = excluded.os_version,
                    context = excluded.context,
                    state = 'enrolled',
                    hw_dev_id_collision = excluded.hw_dev_id_collision,
                    enrolled_at = excluded.enrolled_at,
                    unenrolled_at = NULL,
                    lifecycle = CASE WHEN devices.lifecycle = 'wiped' THEN NULL ELSE devices.lifecycle END,
                    session_seq = devices.session_seq + 1
                """,
                (
                    e.device_id,
                    e.host_id,
                    e.hw_dev_id,
                    e.enrollment_type,
                    e.device_name,
                    e.os_version,
                    json.dumps(list(e.context)),
                    1 if collisions else 0,
                    now,
                ),
            )
            conn.execute(
                """
                INSERT INTO certificates (serial, device_id, thumbprint, not_before, not_after, issued_at)
                VALUES (?, ?, ?, ?, ?, ?)
                """,
                (e.cert_serial, e.device_id, e.cert_thumbprint, e.cert_not_before, e.cert_not_after, now),
            )
            _end_session(conn, e.device_id)
            return EnrollmentOutcome(revoked, replaced, collisions)

        return self._run(txn)

    def device(self, device_id: str) -> Deferred[DeviceRecord | None]:
        def txn(conn: SQLConnection) -> DeviceRecord | None:
            # Any letter case finds the device; the exact ID first, then an
            # enrolled one, then the newest.
            row = conn.execute(
                _DEVICE_SELECT + " WHERE d.device_id = ? COLLATE NOCASE"
                " ORDER BY d.device_id = ? DESC, d.state = 'enrolled' DESC, d.enrolled_at DESC LIMIT 1",
                (device_id, device_id),
            ).fetchone()
            if row is None:
                return None
            pending = conn.execute(
                f"SELECT action FROM device_actions WHERE device_id = ? AND {_OPEN} ORDER BY created_at",
                (row["device_id"],),
            )
            return _device(row, tuple(r["action"] for r in pending))

        return self._run(txn, write=False)

    def certificate(self, serial: str) -> Deferred[CertificateRecord | None]:
        def txn(conn: SQLConnection) -> CertificateRecord | None:
            row = conn.execute("SELECT * FROM certificates WHERE serial = ?", (serial,)).fetchone()
            return None if row is None else _certificate(row)

        return self._run(txn, write=False)

    def devices(self) -> Deferred[list[DeviceRecord]]:
        def txn(conn: SQLConnection) -> list[DeviceRecord]:
            pending: dict[str, list[str]] = {}
            for r in conn.execute(
                f"SELECT device_id, action FROM device_actions WHERE {_OPEN} ORDER BY created_at"
            ):
                pending.setdefault(r["device_id"], []).append(r["action"])
            return [
                _device(r, tuple(pending.get(r["device_id"], ())))
                for r in conn.execute(_DEVICE_SELECT + " ORDER BY d.enrolled_at, d.device_id")
            ]

        return self._run(txn, write=False, bulk=True)

    def device_certificates(self, device_id: str) -> Deferred[list[CertificateRecord]]:
        def txn(conn: SQLConnection) -> list[CertificateRecord]:
            rows = conn.execute(
                "SELECT * FROM certificates WHERE device_id = ? ORDER BY issued_at DESC", (device_id,)
            )
            return [_certificate(r) for r in rows]

        return self._run(txn, write=False)

    # -- certificate renewal --

    def record_renewal(self, renewal: CertificateRenewal, now: float) -> Deferred[RenewalOutcome]:
        def txn(conn: SQLConnection) -> RenewalOutcome:
            r = renewal
            # Checked again where it is written: the request was checked on
            # a read that another process's write may have overtaken.
            row = conn.execute(
                """
                SELECT c.device_id, c.revoked_at, d.state FROM certificates c
                JOIN devices d ON d.device_id = c.device_id WHERE c.serial = ?
                """,
                (r.renewed_serial,),
            ).fetchone()
            if row is None or row["device_id"] != r.device_id:
                raise RenewalRefused(r.renewed_serial, "not a certificate of this device")
            if row["revoked_at"] is not None:
                raise RenewalRefused(r.renewed_serial, "revoked")
            if row["state"] != "enrolled":
                raise RenewalRefused(r.renewed_serial, "device not enrolled")
            superseded = tuple(
                x["serial"]
                for x in conn.execute(
                    "SELECT serial FROM certificates WHERE renewed_from = ? AND revoked_at IS NULL",
                    (r.renewed_serial,),
                )
            )
            conn.executemany(
                "UPDATE certificates SET revoked_at = ?, revoke_reason = 'superseded' WHERE serial = ?",
                [(now, serial) for serial in superseded],
            )
            conn.execute(
                """
                INSERT INTO certificates (serial, device_id, thumbprint, not_before, not_after,
                                          issued_at, renewed_from)
                VALUES (?, ?, ?, ?, ?, ?, ?)
                """,
                (
                    r.cert_serial,
                    r.device_id,
                    r.cert_thumbprint,
                    r.cert_not_before,
                    r.cert_not_after,
                    now,
                    r.renewed_serial,
                ),
            )
            return RenewalOutcome(superseded)

        return self._run(txn)

    def confirm_renewal(self, serial: str, now: float) -> Deferred[tuple[str, ...]]:
        def txn(conn: SQLConnection) -> tuple[str, ...]:
            row = conn.execute(
                "SELECT device_id, renewed_from FROM certificates"
                " WHERE serial = ? AND renewed_from IS NOT NULL AND activated_at IS NULL"
                " AND revoked_at IS NULL",
                (serial,),
            ).fetchone()
            if row is None:
                return ()
            conn.execute("UPDATE certificates SET activated_at = ? WHERE serial = ?", (now, serial))
            others = [
                (x["serial"], "renewed" if x["serial"] == row["renewed_from"] else "superseded")
                for x in conn.execute(
                    "SELECT serial FROM certificates"
                    " WHERE device_id = ? AND revoked_at IS NULL AND serial != ?",
                    (row["device_id"], serial),
                )
            ]
            conn.executemany(
                "UPDATE certificates SET revoked_at = ?, revoke_reason = ? WHERE serial = ?",
                [(now, reason, other) for other, reason in others],
            )
            return tuple(other for other, _ in others)

        return self._run(txn)

    def retire_renewed_certificates(self, now: float, *, limit: int) -> Deferred[int]:
        def txn(conn: SQLConnection) -> int:
            # It stopped working when it ended: that is its revocation time
            # (the one pruning counts from).
            cursor = conn.execute(
                """
                UPDATE certificates SET revoked_at = not_after, revoke_reason = 'renewed'
                WHERE serial IN (
                    SELECT c.serial FROM certificates c
                    WHERE c.revoked_at IS NULL AND c.not_after < ?
                    AND EXISTS (SELECT 1 FROM certificates s WHERE s.renewed_from = c.serial)
                    LIMIT ?)
                """,
                (now, limit),
            )
            return cursor.rowcount

        return self._run(txn)

    def prune_certificates(self, revoked_before: float, *, limit: int) -> Deferred[int]:
        def txn(conn: SQLConnection) -> int:
            cursor = conn.execute(
                """
                DELETE FROM certificates WHERE serial IN (
                    SELECT serial FROM certificates
                    WHERE revoked_at IS NOT NULL AND revoked_at < ?
                    AND revoke_reason IN ('superseded', 'renewed')
                    LIMIT ?)
                """,
                (revoked_before, limit),
            )
            return cursor.rowcount

        return self._run(txn)

    # -- background jobs --

    def claim_lease(self, name: str, holder: str, now: float, until: float) -> Deferred[bool]:
        def txn(conn: SQLConnection) -> bool:
            cursor = conn.execute(
                """
                INSERT INTO job_leases (name, holder, until) VALUES (?, ?, ?)
                ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, until = excluded.until
                WHERE job_leases.until <= ? OR job_leases.holder = excluded.holder
                """,
                (name, holder, until, now),
            )
            return cursor.rowcount > 0

        return self._run(txn)

    # -- OMA-DM management --

    def management_context(
        self,
        cert_serial: str,
        *,
        queue_limit: int = 100,
        request_digest: str | None = None,
        with_profile_context: bool = False,
    ) -> Deferred[ManagementContext | None]:
        def txn(conn: SQLConnection) -> ManagementContext | None:
            # One statement for the certificate, its device, the session and,
            # when the message may be a retransmission, the last reply: each
            # statement hands the interpreter lock to the reactor thread and
            # back, several times, which costs more than the SQL.
            row = conn.execute(_CONTEXT_SELECT, (request_digest, cert_serial)).fetchone()
            if row is None:
                return None
            device_id = row["device_id"]
            session = None if row["k_session"] is None else decode_session(row["k_session"])
            context = ManagementContext(
                certificate=_certificate(row, prefix="k_"),
                device=_device(row),
                session=session,
                queue=(),
                session_seq=row["session_seq"],
            )
            if (
                request_digest is not None
                and session is not None
                and session.request_digest == request_digest
                and row["k_reply"] is not None
            ):
                # The same message again (its reply was lost): the same
                # reply answers it and nothing else is needed.
                reply = row["k_reply"]
                reply = base64.b64decode(reply) if row["k_reply_base64"] else bytes(reply)
                return replace(context, last_reply=reply)
            queue = conn.execute(
                """
                SELECT uuid, body FROM commands WHERE device_id = ? AND state IN ('pending', 'sent')
                ORDER BY seq LIMIT ?
                """,
                (device_id, queue_limit),
            )
            profiles = conn.execute("SELECT * FROM device_profiles WHERE device_id = ?", (device_id,))
            links = conn.execute("SELECT * FROM profile_commands WHERE device_id = ?", (device_id,))
            actions = conn.execute(
                f"SELECT * FROM device_actions WHERE device_id = ? AND {_OPEN} ORDER BY created_at",
                (device_id,),
            )
            return replace(
                context,
                queue=tuple(QueuedCommand(r["uuid"], r["body"]) for r in queue),
                profiles=tuple(_device_profile(r) for r in profiles),
                profile_links=tuple(_profile_command(r) for r in links),
                actions=tuple(_action(r) for r in actions),
                profile_context=_profile_context(conn, device_id) if with_profile_context else None,
            )

        return self._run(txn, write=False)

    def device_alerts(self, device_id: str) -> Deferred[list[StoredAlert]]:
        def txn(conn: SQLConnection) -> list[StoredAlert]:
            rows = conn.execute(
                "SELECT * FROM device_alerts WHERE device_id = ? ORDER BY received_at DESC, code, type",
                (device_id,),
            )
            return [
                StoredAlert(
                    r["code"], r["type"], r["source"], r["format"], r["data"], r["received_at"], r["count"]
                )
                for r in rows
            ]

        return self._run(txn, write=False)

    def last_reply(self, device_id: str) -> Deferred[bytes | None]:
        return self._run(lambda conn: _last_reply(conn, device_id), write=False)

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
        def txn(conn: SQLConnection) -> None:
            device_id = step.device_id
            row = conn.execute(
                "SELECT inventory, session_seq FROM devices WHERE device_id = ?", (device_id,)
            ).fetchone()
            if expected_seq is not None and (row is None or row["session_seq"] != expected_seq):
                raise SessionConflict(device_id)
            if step.inventory:
                inventory = json.loads(row["inventory"]) if row else {}
                inventory.update(step.inventory)
                conn.execute(
                    "UPDATE devices SET inventory = ? WHERE device_id = ?",
                    (json.dumps(inventory, sort_keys=True), device_id),
                )
            conn.execute(
                "UPDATE devices SET last_seen = ?, session_seq = session_seq + 1 WHERE device_id = ?",
                (now, device_id),
            )
            # The latest alert of each kind, with a count: Windows sends a
            # LoginStatus alert in every session, and a row per session would
            # be the largest table for no information.
            _many(
                conn,
                """
                INSERT INTO device_alerts (device_id, code, type, source, format, data, received_at)
                VALUES (?, ?, ?, ?, ?, ?, ?)
                ON CONFLICT (device_id, code, type, source) DO UPDATE SET
                    format = excluded.format, data = excluded.data,
                    received_at = excluded.received_at, count = device_alerts.count + 1
                """,
                [
                    (device_id, a.code, a.type or "", a.source or "", a.format, a.data, now)
                    for a in step.alerts
                ],
            )
            _many(
                conn,
                """
                INSERT INTO commands (uuid, device_id, verb, body, state, created_at)
                VALUES (?, ?, ?, ?, 'pending', ?)
                """,
                [(c.uuid, device_id, c.verb, c.body, now) for c in step.created],
            )
            if profiles:
                _apply_profile_step(conn, device_id, profiles)
            # Every update is scoped to this device: a device can never touch
            # another device's commands, whatever it sends.
            _many(
                conn,
                """
                UPDATE commands SET state = 'sent', sent_at = ?, session_id = ?, msg_id = ?
                WHERE uuid = ? AND device_id = ? AND state IN ('pending', 'sent')
                """,
                [(now, session_id, msg_id, uuid, device_id) for uuid, session_id, msg_id in step.sent],
            )
            _finish_commands(
                conn,
                device_id,
                [
                    (uuid, "acknowledged" if 200 <= code < 300 else "failed", code, None)
                    for uuid, code in step.answered + step.failed
                ],
                now,
            )
            results = list(step.results)
            if step.new_session:
                # Pieces of an object whose session broke off never complete.
                conn.execute("DELETE FROM large_object_chunks WHERE device_id = ?", (device_id,))
            _many(
                conn,
                "DELETE FROM large_object_chunks WHERE device_id = ? AND object_key = ?",
                [(device_id, key) for key in step.dropped],
            )
            _many(
                conn,
                "INSERT INTO large_object_chunks (device_id, object_key, data) VALUES (?, ?, ?)",
                [(device_id, key, piece) for key, piece in step.chunks],
            )
            for done in step.completed:
                pieces = conn.execute(
                    "SELECT data FROM large_object_chunks WHERE device_id = ? AND object_key = ? ORDER BY id",
                    (device_id, done.key),
                )
                whole = "".join(r["data"] for r in pieces) + (done.result.data or "")
                results.append((done.uuid, replace(done.result, data=whole)))
                conn.execute(
                    "DELETE FROM large_object_chunks WHERE device_id = ? AND object_key = ?",
                    (device_id, done.key),
                )
            _insert_results(conn, device_id, results, now)
            if actions:
                _apply_action_step(conn, device_id, actions, now)
            ended = actions.ended if actions and actions.ended else ("unenrolled" if step.unenroll else None)
            if ended is not None:
                # The device leaves management: its certificate opens nothing
                # any more and nothing queued for it will ever be delivered.
                conn.execute(
                    """
                    UPDATE devices SET state = 'unenrolled', unenrolled_at = ?, lifecycle = ?
                    WHERE device_id = ?
                    """,
                    (now, "wiped" if ended == "wiped" else None, device_id),
                )
                conn.execute(
                    """
                    UPDATE certificates SET revoked_at = ?, revoke_reason = ?
                    WHERE device_id = ? AND revoked_at IS NULL
                    """,
                    (now, ended, device_id),
                )
                _cancel_device(conn, device_id, f"cancelled: the device was {ended}", now)
            if messages is not None:
                _log_messages(conn, device_id, messages)
            if step.session is None or ended is not None:
                _end_session(conn, device_id)
            else:
                conn.execute(
                    """
                    INSERT INTO syncml_sessions (device_id, state, updated_at) VALUES (?, ?, ?)
                    ON CONFLICT (device_id) DO UPDATE
                    SET state = excluded.state, updated_at = excluded.updated_at
                    """,
                    (device_id, encode_session(step.session), now),
                )
                conn.execute(
                    """
                    INSERT INTO syncml_replies (device_id, reply, base64) VALUES (?, ?, 0)
                    ON CONFLICT (device_id) DO UPDATE SET reply = excluded.reply, base64 = 0
                    """,
                    (device_id, step.reply),
                )

        return self._run(txn)

    def device_messages(self, device_id: str, *, limit: int = 50) -> Deferred[list[LoggedMessage]]:
        def txn(conn: SQLConnection) -> list[LoggedMessage]:
            rows = conn.execute(
                "SELECT * FROM device_messages WHERE device_id = ? ORDER BY id DESC LIMIT ?",
                (device_id, limit),
            )
            return [
                LoggedMessage(
                    r["direction"],
                    r["at"],
                    r["session_id"],
                    r["msg_id"],
                    r["size"],
                    zlib.decompress(r["body"]),
                    bool(r["truncated"]),
                    r["id"],
                )
                for r in rows
            ]

        return self._run(txn, write=False)

    def profile_context(self, device_id: str) -> Deferred[ProfileContext]:
        return self._run(lambda conn: _profile_context(conn, device_id), write=False)

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
        def txn(conn: SQLConnection) -> CommandRecord | None:
            known = conn.execute(
                "SELECT device_id FROM devices WHERE device_id = ? COLLATE NOCASE AND state = 'enrolled'"
                " ORDER BY device_id = ? DESC LIMIT 1",
                (device_id, device_id),
            ).fetchone()
            if known is None:
                return None
            _insert_command(conn, known["device_id"], uuid, verb, body, now, None)
            if audit is not None:
                insert_audit(conn, audit)
            row = conn.execute("SELECT * FROM commands WHERE uuid = ?", (uuid,)).fetchone()
            return _command(row)

        return self._run(txn)

    # -- device actions and group operations --

    def request_action(self, device_id: str, action: NewAction, now: float) -> Deferred[ActionOutcome]:
        def txn(conn: SQLConnection) -> ActionOutcome:
            row = conn.execute(
                "SELECT device_id, state, lifecycle, host_id FROM devices WHERE device_id = ?", (device_id,)
            ).fetchone()
            if row is None:
                return ActionOutcome("no_device")
            refusal = _action_refusal(conn, row, action.action)
            if refusal is not None:
                return ActionOutcome(refusal)
            return ActionOutcome("queued", _queue_action(conn, row, action, now, None))

        return self._run(txn)

    def device_actions(self, device_id: str, *, limit: int = 20) -> Deferred[list[DeviceAction]]:
        def txn(conn: SQLConnection) -> list[DeviceAction]:
            rows = conn.execute(
                """
                SELECT * FROM device_actions WHERE device_id = ?
                ORDER BY created_at DESC, rowid DESC LIMIT ?
                """,
                (device_id, limit),
            )
            return [_action(r) for r in rows]

        return self._run(txn, write=False)

    def create_operation(self, operation: NewOperation, now: float) -> Deferred[bool]:
        def txn(conn: SQLConnection) -> bool:
            o = operation
            if (
                o.group_name != ALL_GROUP
                and conn.execute("SELECT 1 FROM device_groups WHERE name = ?", (o.group_name,)).fetchone()
                is None
            ):
                return False
            conn.execute(
                """
                INSERT INTO operations (operation_id, kind, group_name, action, options, verb, body, state,
                                        created_at, updated_at)
                VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?)
                """,
                (
                    o.operation_id, o.kind, o.group_name, o.action,
                    None if o.options is None else json.dumps(dict(o.options), sort_keys=True),
                    o.verb, o.body, now, now,
                ),
            )  # fmt: skip
            return True

        return self._run(txn)

    def operations(self, *, limit: int = 100) -> Deferred[list[OperationRecord]]:
        def txn(conn: SQLConnection) -> list[OperationRecord]:
            rows = conn.execute(
                "SELECT * FROM operations ORDER BY created_at DESC, operation_id LIMIT ?", (limit,)
            )
            return [_operation(r) for r in rows]

        return self._run(txn, write=False)

    def operation(self, operation_id: str) -> Deferred[OperationRecord | None]:
        def txn(conn: SQLConnection) -> OperationRecord | None:
            row = conn.execute("SELECT * FROM operations WHERE operation_id = ?", (operation_id,)).fetchone()
            return None if row is None else _operation(row)

        return self._run(txn, write=False)

    def operation_leases(self) -> Deferred[list[OperationRecord]]:
        def txn(conn: SQLConnection) -> list[OperationRecord]:
            rows = conn.execute(
                "SELECT * FROM operations WHERE state IN ('pending', 'queuing') ORDER BY created_at"
            )
            return [_operation(r) for r in rows]

        return self._run(txn, write=False)

    def claim_operation(
        self, owner: str, now: float, lease_until: float, *, takeover: Sequence[str] = ()
    ) -> Deferred[OperationRecord | None]:
        def txn(conn: SQLConnection) -> OperationRecord | None:
            holders = [owner, *takeover]
            marks = ",".join("?" * len(holders))
            free = f"(lease_owner IS NULL OR lease_until <= ? OR lease_owner IN ({marks}))"
            row = conn.execute(
                f"""
                SELECT operation_id FROM operations
                WHERE state IN ('pending', 'queuing') AND {free} ORDER BY created_at LIMIT 1
                """,
                (now, *holders),
            ).fetchone()
            if row is None:
                return None
            cursor = conn.execute(
                f"""
                UPDATE operations SET lease_owner = ?, lease_until = ?, updated_at = ?,
                    state = CASE state WHEN 'pending' THEN 'queuing' ELSE state END
                WHERE operation_id = ? AND state IN ('pending', 'queuing') AND {free}
                """,
                (owner, lease_until, now, row["operation_id"], now, *holders),
            )
            if cursor.rowcount != 1:
                return None
            claimed = conn.execute(
                "SELECT * FROM operations WHERE operation_id = ?", (row["operation_id"],)
            ).fetchone()
            return _operation(claimed)

        return self._run(txn)

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
        def txn(conn: SQLConnection) -> OperationRecord | None:
            op = conn.execute("SELECT * FROM operations WHERE operation_id = ?", (operation_id,)).fetchone()
            if op is None or op["state"] != "queuing" or op["lease_owner"] != owner:
                return None  # the lease was lost: someone else goes on
            if total is not None and op["total"] is None:
                conn.execute("UPDATE operations SET total = ? WHERE operation_id = ?", (total, operation_id))
            after = op["cursor"] or ""
            if op["group_name"] == ALL_GROUP:
                members = conn.execute(
                    """
                    SELECT device_id, state, lifecycle, host_id FROM devices
                    WHERE state = 'enrolled' AND device_id > ? ORDER BY device_id LIMIT ?
                    """,
                    (after, limit),
                ).fetchall()
            else:
                members = conn.execute(
                    """
                    SELECT m.device_id, d.state, d.lifecycle, d.host_id FROM group_members m
                    JOIN devices d ON d.device_id = m.device_id
                    WHERE m.group_name = ? AND m.device_id > ? ORDER BY m.device_id LIMIT ?
                    """,
                    (op["group_name"], after, limit),
                ).fetchall()
            queued, skipped = _queue_batch(conn, op, members, now)
            finished = len(members) < limit
            conn.execute(
                """
                UPDATE operations SET queued = queued + ?, skipped = skipped + ?, cursor = ?, updated_at = ?,
                    lease_until = ?
                WHERE operation_id = ?
                """,
                (
                    queued,
                    skipped,
                    members[-1]["device_id"] if members else op["cursor"],
                    now,
                    lease_until,
                    operation_id,
                ),
            )
            if finished:
                # Exact now: the members that were there when the batches passed.
                conn.execute(
                    """
                    UPDATE operations SET state = 'delivering', total = queued + skipped,
                        lease_owner = NULL, lease_until = NULL
                    WHERE operation_id = ?
                    """,
                    (operation_id,),
                )
                _operations_done(conn, [operation_id], now)
            row = conn.execute("SELECT * FROM operations WHERE operation_id = ?", (operation_id,)).fetchone()
            return _operation(row)

        return self._run(txn)

    def release_operation(self, operation_id: str, owner: str) -> Deferred[None]:
        def txn(conn: SQLConnection) -> None:
            conn.execute(
                """
                UPDATE operations SET lease_owner = NULL, lease_until = NULL
                WHERE operation_id = ? AND lease_owner = ?
                """,
                (operation_id, owner),
            )

        return self._run(txn)

    def command(self, uuid: str) -> Deferred[CommandRecord | None]:
        def txn(conn: SQLConnection) -> CommandRecord | None:
            row = conn.execute("SELECT * FROM commands WHERE uuid = ?", (uuid,)).fetchone()
            if row is None:
                return None
            results = conn.execute(
                "SELECT * FROM command_results WHERE command_uuid = ? ORDER BY id", (uuid,)
            )
            return _command(row, tuple(_result(r) for r in results))

        return self._run(txn, write=False)

    def device_commands(self, device_id: str, *, limit: int = 100) -> Deferred[list[CommandRecord]]:
        def txn(conn: SQLConnection) -> list[CommandRecord]:
            rows = conn.execute(
                "SELECT * FROM commands WHERE device_id = ? ORDER BY seq DESC LIMIT ?", (device_id, limit)
            )
            return [_command(r) for r in rows]

        return self._run(txn, write=False)

    # -- configuration profiles and groups --

    def create_profile(self, profile: Profile, now: float) -> Deferred[bool]:
        def txn(conn: SQLConnection) -> bool:
            cursor = conn.execute(
                """
                INSERT INTO profiles (name, version, items, created_at, updated_at) VALUES (?, ?, ?, ?, ?)
                ON CONFLICT (name) DO NOTHING
                """,
                (profile.name, profile.version, items_json(profile.items), now, now),
            )
            return cursor.rowcount > 0

        return self._run(txn)

    def update_profile(self, profile: Profile, now: float) -> Deferred[bool]:
        def txn(conn: SQLConnection) -> bool:
            cursor = conn.execute(
                """
                UPDATE profiles SET version = ?, items = ?, updated_at = ?
                WHERE name = ? AND deleted_at IS NULL
                """,
                (profile.version, items_json(profile.items), now, profile.name),
            )
            return cursor.rowcount > 0

        return self._run(txn)

    def profiles(self) -> Deferred[list[ProfileRecord]]:
        def txn(conn: SQLConnection) -> list[ProfileRecord]:
            return [_profile(conn, r) for r in conn.execute("SELECT * FROM profiles ORDER BY name")]

        return self._run(txn, write=False)

    def profile(self, name: str) -> Deferred[ProfileRecord | None]:
        def txn(conn: SQLConnection) -> ProfileRecord | None:
            row = conn.execute("SELECT * FROM profiles WHERE name = ?", (name,)).fetchone()
            return None if row is None else _profile(conn, row)

        return self._run(txn, write=False)

    def profile_status(self, name: str) -> Deferred[dict[str, int]]:
        def txn(conn: SQLConnection) -> dict[str, int]:
            states = {
                r["state"]: float(r["n"])
                for r in conn.execute(
                    "SELECT state, COUNT(*) AS n FROM device_profiles WHERE profile_name = ? GROUP BY state",
                    (name,),
                )
            }
            # Devices the profile is meant for that have no record of it yet.
            unseen = _profile_unseen(conn, name, lambda: _enrolled_count(conn), states)
            counts = {state: int(n) for state, n in states.items()}
            if unseen:
                counts["pending"] = counts.get("pending", 0) + int(unseen)
            return counts

        # Its counts walk a profile's records (a million for a profile of
        # the group all): beside the devices' reads, not before them.
        return self._run(txn, write=False, bulk=True)

    def delete_profile(self, name: str, now: float) -> Deferred[bool]:
        def txn(conn: SQLConnection) -> bool:
            cursor = conn.execute(
                "UPDATE profiles SET deleted_at = ? WHERE name = ? AND deleted_at IS NULL", (now, name)
            )
            if cursor.rowcount == 0:
                return False
            conn.execute("DELETE FROM profile_assignments WHERE profile_name = ?", (name,))
            _forget_deleted_profiles(conn, [name])
            return True

        return self._run(txn)

    def assign_profile(self, name: str, groups: Sequence[str], now: float) -> Deferred[AssignmentOutcome]:
        def txn(conn: SQLConnection) -> AssignmentOutcome:
            found = conn.execute(
                "SELECT 1 FROM profiles WHERE name = ? AND deleted_at IS NULL", (name,)
            ).fetchone()
            if found is None:
                return AssignmentOutcome(found=False)
            unknown = tuple(
                g
                for g in dict.fromkeys(groups)
                if g != ALL_GROUP
                and conn.execute("SELECT 1 FROM device_groups WHERE name = ?", (g,)).fetchone() is None
            )
            if unknown:
                return AssignmentOutcome(found=True, unknown_groups=unknown)
            conn.execute("DELETE FROM profile_assignments WHERE profile_name = ?", (name,))
            conn.executemany(
                "INSERT INTO profile_assignments (profile_name, group_name) VALUES (?, ?)",
                [(name, g) for g in dict.fromkeys(groups)],
            )
            conn.execute("UPDATE profiles SET updated_at = ? WHERE name = ?", (now, name))
            return AssignmentOutcome(found=True)

        return self._run(txn)

    def create_group(self, name: str, now: float) -> Deferred[bool]:
        def txn(conn: SQLConnection) -> bool:
            if name == ALL_GROUP:
                return False
            cursor = conn.execute(
                "INSERT INTO device_groups (name, created_at) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
                (name, now),
            )
            return cursor.rowcount > 0

        return self._run(txn)

    def groups(self) -> Deferred[list[GroupRecord]]:
        def txn(conn: SQLConnection) -> list[GroupRecord]:
            out = [_group(conn, ALL_GROUP, None)]
            out += [
                _group(conn, r["name"], r["created_at"])
                for r in conn.execute("SELECT * FROM device_groups ORDER BY name")
            ]
            return out

        # Member counts walk indexes as large as the groups: beside the
        # devices' reads, not before them.
        return self._run(txn, write=False, bulk=True)

    def group_names(self) -> Deferred[list[str]]:
        def txn(conn: SQLConnection) -> list[str]:
            return [ALL_GROUP] + [
                r["name"] for r in conn.execute("SELECT name FROM device_groups ORDER BY name")
            ]

        return self._run(txn, write=False)

    def group(self, name: str) -> Deferred[GroupRecord | None]:
        def txn(conn: SQLConnection) -> GroupRecord | None:
            if name == ALL_GROUP:
                return _group(conn, ALL_GROUP, None)
            row = conn.execute("SELECT * FROM device_groups WHERE name = ?", (name,)).fetchone()
            return None if row is None else _group(conn, name, row["created_at"])

        # Its member count: beside the devices' reads (see groups).
        return self._run(txn, write=False, bulk=True)

    def group_members(self, name: str, *, after: str | None = None, limit: int = 100) -> Deferred[list[str]]:
        def txn(conn: SQLConnection) -> list[str]:
            if name == ALL_GROUP:
                rows = conn.execute(
                    "SELECT device_id FROM devices WHERE state = 'enrolled' AND device_id > ? "
                    "ORDER BY device_id LIMIT ?",
                    (after or "", limit),
                )
            else:
                rows = conn.execute(
                    "SELECT device_id FROM group_members WHERE group_name = ? AND device_id > ? "
                    "ORDER BY device_id LIMIT ?",
                    (name, after or "", limit),
                )
            return [r["device_id"] for r in rows]

        return self._run(txn, write=False)

    def delete_group(self, name: str) -> Deferred[bool]:
        def txn(conn: SQLConnection) -> bool:
            if name == ALL_GROUP:
                return False
            conn.execute("DELETE FROM group_members WHERE group_name = ?", (name,))
            conn.execute("DELETE FROM profile_assignments WHERE group_name = ?", (name,))
            return conn.execute("DELETE FROM device_groups WHERE name = ?", (name,)).rowcount > 0

        return self._run(txn)

    def change_group_members(
        self, name: str, add: Sequence[str], remove: Sequence[str], now: float
    ) -> Deferred[GroupChange | None]:
        def txn(conn: SQLConnection) -> GroupChange | None:
            if conn.execute("SELECT 1 FROM device_groups WHERE name = ?", (name,)).fetchone() is None:
                return None
            wanted = list(dict.fromkeys([*add, *remove]))
            known: set[str] = set()
            for start in range(0, len(wanted), 500):
                chunk = wanted[start : start + 500]
                marks = ",".join("?" * len(chunk))
                known |= {
                    r[0]
                    for r in conn.execute(
                        f"SELECT device_id FROM devices WHERE device_id IN ({marks})", chunk
                    )
                }
            unknown = tuple(d for d in wanted if d not in known)
            if unknown:
                return GroupChange(0, 0, unknown)
            added = sum(
                conn.execute(
                    "INSERT INTO group_members (group_name, device_id, added_at) VALUES (?, ?, ?)"
                    " ON CONFLICT DO NOTHING",
                    (name, d, now),
                ).rowcount
                for d in dict.fromkeys(add)
            )
            removed = sum(
                conn.execute(
                    "DELETE FROM group_members WHERE group_name = ? AND device_id = ?", (name, d)
                ).rowcount
                for d in dict.fromkeys(remove)
            )
            return GroupChange(added, removed)

        return self._run(txn)

    def device_groups(self, device_id: str) -> Deferred[list[str]]:
        def txn(conn: SQLConnection) -> list[str]:
            rows = conn.execute(
                "SELECT group_name FROM group_members WHERE device_id = ? ORDER BY group_name", (device_id,)
            )
            return [r["group_name"] for r in rows]

        return self._run(txn, write=False)

    def profile_devices(
        self, name: str, *, state: str | None = None, after: tuple[str, int] | None = None, limit: int = 100
    ) -> Deferred[list[ProfileDeviceState]]:
        def txn(conn: SQLConnection) -> list[ProfileDeviceState]:
            # Along device_profiles_by_profile (profile_name, state, rowid):
            # a page costs its own rows, however many devices have the profile.
            where: list[str] = ["profile_name = ?"]
            params: list[object] = [name]
            if state is not None:
                where.append("state = ?")
                params.append(state)
            if after is not None:
                where.append("(state, rowid) > (?, ?)")
                params += [after[0], after[1]]
            rows = conn.execute(
                f"SELECT rowid AS pos, device_id, version, state, status, detail, updated_at"
                f" FROM device_profiles WHERE {' AND '.join(where)} ORDER BY state, rowid LIMIT ?",
                (*params, limit),
            )
            return [
                ProfileDeviceState(
                    r["device_id"],
                    r["version"],
                    r["state"],
                    r["status"],
                    r["detail"],
                    r["updated_at"],
                    (r["state"], r["pos"]),
                )
                for r in rows
            ]

        return self._run(txn, write=False, bulk=True)

    def device_profiles(self, device_id: str, *, history: int = 5) -> Deferred[list[DeviceProfileEntry]]:
        def txn(conn: SQLConnection) -> list[DeviceProfileEntry]:
            out = []
            for row in conn.execute(
                "SELECT * FROM device_profiles WHERE device_id = ? ORDER BY profile_name", (device_id,)
            ):
                events = conn.execute(
                    """
                    SELECT * FROM device_profile_events WHERE device_id = ? AND profile_name = ?
                    ORDER BY id DESC LIMIT ?
                    """,
                    (device_id, row["profile_name"], history),
                )
                out.append(DeviceProfileEntry(_device_profile(row), tuple(_profile_event(e) for e in events)))
            return out

        return self._run(txn, write=False)

    # -- administrators --

    def admin_tokens(self) -> Deferred[list[AdminToken]]:
        def txn(conn: SQLConnection) -> list[AdminToken]:
            return [_token(r) for r in conn.execute("SELECT * FROM admin_tokens ORDER BY name")]

        return self._run(txn, write=False)

    def create_admin_token(self, token: AdminToken, *, audit: AuditEntry | None = None) -> Deferred[bool]:
        def txn(conn: SQLConnection) -> bool:
            active = conn.execute(
                "SELECT 1 FROM admin_tokens WHERE name = ? AND revoked_at IS NULL", (token.name,)
            ).fetchone()
            if active is not None:
                return False
            conn.execute(
                """
                INSERT INTO admin_tokens (name, token_hash, created_at, created_by) VALUES (?, ?, ?, ?)
                ON CONFLICT (name) DO UPDATE SET
                    token_hash = excluded.token_hash, created_at = excluded.created_at,
                    created_by = excluded.created_by, revoked_at = NULL, revoked_by = NULL
                """,
                (token.name, token.token_hash, token.created_at, token.created_by),
            )
            if audit is not None:
                insert_audit(conn, audit)
            return True

        return self._run(txn)

    def revoke_admin_token(
        self, name: str, now: float, *, by: str | None = None, audit: AuditEntry | None = None
    ) -> Deferred[Literal["revoked", "unknown", "last"]]:
        def txn(conn: SQLConnection) -> Literal["revoked", "unknown", "last"]:
            active = [
                r["name"] for r in conn.execute("SELECT name FROM admin_tokens WHERE revoked_at IS NULL")
            ]
            if name not in active:
                return "unknown"
            if len(active) == 1:
                return "last"
            conn.execute(
                "UPDATE admin_tokens SET revoked_at = ?, revoked_by = ? WHERE name = ?", (now, by, name)
            )
            if audit is not None:
                insert_audit(conn, audit)
            return "revoked"

        return self._run(txn)

    # -- web console sessions --

    def start_console_session(
        self, session: ConsoleSessionRecord, *, lifetime: float, idle: float, keep: int
    ) -> Deferred[None]:
        def txn(conn: SQLConnection) -> None:
            conn.execute(
                "DELETE FROM console_sessions WHERE created_at <= ? OR used_at <= ?",
                (session.created_at - lifetime, session.created_at - idle),
            )
            (count,) = conn.execute("SELECT count(*) FROM console_sessions").fetchone()
            if count >= keep:
                oldest = [
                    r["id_hash"]
                    for r in conn.execute(
                        "SELECT id_hash FROM console_sessions ORDER BY created_at, id_hash LIMIT ?",
                        (count - keep + 1,),
                    )
                ]
                conn.executemany("DELETE FROM console_sessions WHERE id_hash = ?", [(h,) for h in oldest])
            conn.execute(
                "INSERT INTO console_sessions (id_hash, token_name, token_hash, csrf, created_at, used_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    session.id_hash,
                    session.token_name,
                    session.token_hash,
                    session.csrf,
                    session.created_at,
                    session.used_at,
                ),
            )

        return self._run(txn)

    def use_console_session(
        self, id_hash: bytes, now: float, *, lifetime: float, idle: float
    ) -> Deferred[ConsoleSessionRecord | None]:
        def txn(conn: SQLConnection) -> ConsoleSessionRecord | None:
            row = conn.execute("SELECT * FROM console_sessions WHERE id_hash = ?", (id_hash,)).fetchone()
            if row is None:
                return None
            if now - row["created_at"] >= lifetime or now - row["used_at"] >= idle:
                conn.execute("DELETE FROM console_sessions WHERE id_hash = ?", (id_hash,))
                return None
            conn.execute("UPDATE console_sessions SET used_at = ? WHERE id_hash = ?", (now, id_hash))
            return replace(_console_session(row), used_at=now)

        return self._run(txn)

    def end_console_session(self, id_hash: bytes) -> Deferred[ConsoleSessionRecord | None]:
        def txn(conn: SQLConnection) -> ConsoleSessionRecord | None:
            row = conn.execute("SELECT * FROM console_sessions WHERE id_hash = ?", (id_hash,)).fetchone()
            if row is None:
                return None
            conn.execute("DELETE FROM console_sessions WHERE id_hash = ?", (id_hash,))
            return _console_session(row)

        return self._run(txn)

    def adopt_bootstrap_token(
        self, name: str, token_hash: bytes, now: float
    ) -> Deferred[Literal["created", "updated", "unchanged", "revoked"]]:
        def txn(conn: SQLConnection) -> Literal["created", "updated", "unchanged", "revoked"]:
            row = conn.execute("SELECT * FROM admin_tokens WHERE name = ?", (name,)).fetchone()
            if row is None:
                conn.execute(
                    "INSERT INTO admin_tokens (name, token_hash, created_at, created_by) VALUES (?, ?, ?, ?)",
                    (name, token_hash, now, "token_file"),
                )
                return "created"
            if row["revoked_at"] is not None:
                return "revoked"
            if bytes(row["token_hash"]) == token_hash:
                return "unchanged"
            conn.execute("UPDATE admin_tokens SET token_hash = ? WHERE name = ?", (token_hash, name))
            return "updated"

        return self._run(txn)

    def record_audit(self, entry: AuditEntry) -> Deferred[None]:
        def txn(conn: SQLConnection) -> None:
            insert_audit(conn, entry)

        return self._run(txn)

    def audit_log(self, query: AuditQuery) -> Deferred[list[AuditRecord]]:
        def txn(conn: SQLConnection) -> list[AuditRecord]:
            where: list[str] = []
            params: list[object] = []
            for column, value in (("actor", query.actor), ("action", query.action), ("target", query.target)):
                if value is not None:
                    where.append(f"{column} = ?")
                    params.append(value)
            if query.before_id is not None:
                where.append("id < ?")
                params.append(query.before_id)
            rows = conn.execute(
                f"SELECT * FROM audit_log WHERE {' AND '.join(where) or '1 = 1'} ORDER BY id DESC LIMIT ?",
                (*params, query.limit),
            )
            return [_audit(r) for r in rows]

        return self._run(txn, write=False, bulk=True)

    # -- operations --

    def fleet_counts(self, now: float) -> Deferred[FleetCounts]:
        def txn(conn: SQLConnection) -> FleetCounts:
            (total,) = conn.execute("SELECT count(*) FROM devices").fetchone()
            (unenrolled,) = conn.execute("SELECT count(*) FROM devices WHERE state = 'unenrolled'").fetchone()
            devices = {"enrolled": float(total - unenrolled), "unenrolled": float(unenrolled)}
            commands = dict.fromkeys(("pending", "sent", "acknowledged", "failed"), 0.0)
            for row in conn.execute("SELECT state, count(*) AS n FROM commands GROUP BY state"):
                commands[row["state"]] = float(row["n"])
            (expiring,) = conn.execute(
                "SELECT count(*) FROM certificates"
                " WHERE revoked_at IS NULL AND not_after >= ? AND not_after < ?",
                (now, now + EXPIRING_WINDOW),
            ).fetchone()
            profiles = {state: 0.0 for state in STATES}
            per_profile: dict[str, dict[str, float]] = {}
            # One walk of device_profiles_by_profile answers both.
            for row in conn.execute(
                "SELECT profile_name, state, count(*) AS n FROM device_profiles GROUP BY profile_name, state"
            ):
                profiles[row["state"]] += float(row["n"])
                per_profile.setdefault(row["profile_name"], {})[row["state"]] = float(row["n"])
            enrolled = total - unenrolled
            counts: FleetCounts = {
                "devices": devices,
                "commands": commands,
                "certificates_expiring": {"": float(expiring)},
                "profiles": profiles,
                "checkins": _checkin_recency(conn, now, enrolled),
                "enrollments": _enrollments_by_day(conn, now),
            }
            for name in [
                r["name"] for r in conn.execute("SELECT name FROM profiles WHERE deleted_at IS NULL")
            ]:
                states = per_profile.get(name, {})
                unseen = _profile_unseen(conn, name, lambda: enrolled, states)
                if unseen:
                    states["pending"] = states.get("pending", 0.0) + unseen
                counts[f"profile:{name}"] = states
            return counts

        return self._run(txn, write=False, lane="counts")

    def check_writable(self, now: float) -> Deferred[None]:
        def txn(conn: SQLConnection) -> None:
            conn.execute(
                "INSERT INTO store_health (id, checked_at) VALUES (1, ?)"
                " ON CONFLICT (id) DO UPDATE SET checked_at = excluded.checked_at",
                (now,),
            )

        return self._run(txn)


def _log_messages(conn: SQLConnection, device_id: str, log: MessageLogWrite) -> None:
    """Append a step's messages to the device's log and drop what is past
    ``log.keep`` (along device_messages_by_device: the device's own rows)."""
    conn.executemany(
        "INSERT INTO device_messages (device_id, direction, at, session_id, msg_id, size, truncated, body)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                device_id,
                m.direction,
                m.at,
                m.session_id,
                m.msg_id,
                m.size,
                int(m.truncated),
                zlib.compress(m.body),
            )
            for m in log.messages
        ],
    )
    conn.execute(
        """
        DELETE FROM device_messages WHERE device_id = ? AND id <= (
            SELECT id FROM device_messages WHERE device_id = ? ORDER BY id DESC LIMIT 1 OFFSET ?)
        """,
        (device_id, device_id, log.keep),
    )


#: The check-in recency buckets of the fleet counts: (name, seconds).
_RECENCY: Final = (("1h", 3600), ("24h", 86400), ("7d", 7 * 86400))


def _checkin_recency(conn: SQLConnection, now: float, enrolled: int) -> dict[str, float]:
    """Enrolled devices by how long ago they last checked in, each bucket
    counted on devices_by_last_seen (its state column included)."""
    out: dict[str, float] = {}
    within_before = 0
    for name, seconds in _RECENCY:
        (within,) = conn.execute(
            "SELECT count(*) FROM devices INDEXED BY devices_by_last_seen"
            " WHERE coalesce(last_seen, 0) >= ? AND state = 'enrolled'",
            (now - seconds,),
        ).fetchone()
        out[name] = float(within - within_before)
        within_before = within
    (never,) = conn.execute(
        "SELECT count(*) FROM devices INDEXED BY devices_by_last_seen"
        " WHERE coalesce(last_seen, 0) = ? AND state = 'enrolled'",
        (0,),
    ).fetchone()
    out["older"] = float(max(0, enrolled - within_before - never))
    out["never"] = float(never)
    return out


def _enrollments_by_day(conn: SQLConnection, now: float) -> dict[str, float]:
    """Devices enrolled on each of the last 30 UTC days (on devices_by_enrolled_at)."""
    today = int(now // 86400)
    first = today - 29
    days = {time.strftime("%Y-%m-%d", time.gmtime((first + i) * 86400)): 0.0 for i in range(30)}
    for row in conn.execute(
        # Whole seconds divided as integers: the day, in SQLite and PostgreSQL alike.
        "SELECT CAST(enrolled_at AS INTEGER) / 86400 AS day, count(*) AS n FROM devices"
        " INDEXED BY devices_by_enrolled_at WHERE enrolled_at >= ? GROUP BY day",
        (first * 86400.0,),
    ):
        key = time.strftime("%Y-%m-%d", time.gmtime(row["day"] * 86400))
        if key in days:
            days[key] += float(row["n"])
    return days


def _profile_unseen(
    conn: SQLConnection, name: str, enrolled: Callable[[], int], states: dict[str, float]
) -> float:
    """The enrolled devices of the profile's groups that have no record of
    it yet.  For the group all: the enrolled devices less the records of
    enrolled devices, these found as all records less those of unenrolled
    devices (a walk of the small devices_unenrolled index), so that no
    query visits every device."""
    groups = [
        r["group_name"]
        for r in conn.execute("SELECT group_name FROM profile_assignments WHERE profile_name = ?", (name,))
    ]
    if not groups:
        return 0.0
    if ALL_GROUP in groups:
        # The unenrolled devices, each probing for its record (a correlated
        # EXISTS keeps that order): as a join, SQLite's planner walked every
        # record of the profile, 3-5 s at a million devices instead of 30 ms.
        (gone,) = conn.execute(
            """
            SELECT count(*) FROM devices d INDEXED BY devices_unenrolled
            WHERE d.state = 'unenrolled' AND EXISTS (
                SELECT 1 FROM device_profiles p WHERE p.device_id = d.device_id AND p.profile_name = ?)
            """,
            (name,),
        ).fetchone()
        return float(max(0, enrolled() - (sum(states.values()) - gone)))
    (unseen,) = conn.execute(
        """
        SELECT COUNT(DISTINCT m.device_id) FROM group_members m
        JOIN profile_assignments a ON a.group_name = m.group_name AND a.profile_name = ?
        JOIN devices d ON d.device_id = m.device_id AND d.state = 'enrolled'
        WHERE NOT EXISTS (
            SELECT 1 FROM device_profiles p WHERE p.device_id = m.device_id AND p.profile_name = ?)
        """,
        (name, name),
    ).fetchone()
    return float(unseen)


# The live certificates of a device and of the host's other devices, read
# through certificates_live: the device's live certificates only, however
# many it had before.
_LIVE_SERIALS_OF_DEVICE_OR_HOST = """
    SELECT serial FROM certificates
    WHERE revoked_at IS NULL AND device_id IN (
        SELECT device_id FROM devices WHERE device_id = ? OR host_id = ?)
"""

# A device with its current certificate (the newest live one), found through
# the certificates_live index: the same cost whatever the device's history.
_DEVICE_SELECT = """
    SELECT d.*, c.serial AS c_serial, c.thumbprint AS c_thumbprint, c.not_before AS c_not_before,
           c.not_after AS c_not_after, c.issued_at AS c_issued_at, c.renewed_from AS c_renewed_from,
           c.activated_at AS c_activated_at
    FROM devices d
    LEFT JOIN certificates c ON c.serial = (
        SELECT serial FROM certificates
        WHERE device_id = d.device_id AND revoked_at IS NULL
        ORDER BY issued_at DESC, serial DESC LIMIT 1)
"""


# A device's check-in context, by the serial of the certificate it
# presented: that certificate (k_*), its device with the device's newest
# live certificate (as _DEVICE_SELECT), its session, and its last reply
# when the request's digest (the first parameter) is in the session: only a
# retransmission needs it (the session is decoded and compared exactly in
# Python; the text match only spares reading the reply otherwise).
_CONTEXT_SELECT = """
    SELECT d.*, c.serial AS c_serial, c.thumbprint AS c_thumbprint, c.not_before AS c_not_before,
           c.not_after AS c_not_after, c.issued_at AS c_issued_at, c.renewed_from AS c_renewed_from,
           c.activated_at AS c_activated_at,
           k.serial AS k_serial, k.device_id AS k_device_id, k.thumbprint AS k_thumbprint,
           k.not_before AS k_not_before,
           k.not_after AS k_not_after, k.issued_at AS k_issued_at, k.revoked_at AS k_revoked_at,
           k.revoke_reason AS k_revoke_reason, k.renewed_from AS k_renewed_from,
           k.activated_at AS k_activated_at,
           s.state AS k_session,
           CASE WHEN s.state LIKE '%' || ? || '%' THEN r.reply END AS k_reply,
           r.base64 AS k_reply_base64
    FROM certificates k
    JOIN devices d ON d.device_id = k.device_id
    LEFT JOIN certificates c ON c.serial = (
        SELECT serial FROM certificates
        WHERE device_id = d.device_id AND revoked_at IS NULL
        ORDER BY issued_at DESC, serial DESC LIMIT 1)
    LEFT JOIN syncml_sessions s ON s.device_id = d.device_id
    LEFT JOIN syncml_replies r ON r.device_id = d.device_id
    WHERE k.serial = ?
"""


def insert_audit(conn: SQLConnection, entry: AuditEntry) -> None:
    """Record *entry* in the transaction of the write it describes (for store
    methods that take an ``audit`` argument)."""
    conn.execute(
        "INSERT INTO audit_log (at, actor, action, target, detail, client, request_id)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            entry.at,
            entry.actor,
            entry.action,
            entry.target,
            json.dumps(entry.detail, sort_keys=True),
            entry.client,
            entry.request_id,
        ),
    )


def _audit(row: SQLRow) -> AuditRecord:
    return AuditRecord(
        row["id"],
        AuditEntry(
            at=row["at"],
            actor=row["actor"],
            action=row["action"],
            target=row["target"],
            detail=json.loads(row["detail"]),
            client=row["client"],
            request_id=row["request_id"],
        ),
    )


def _console_session(row: SQLRow) -> ConsoleSessionRecord:
    return ConsoleSessionRecord(
        id_hash=bytes(row["id_hash"]),
        token_name=row["token_name"],
        token_hash=bytes(row["token_hash"]),
        csrf=row["csrf"],
        created_at=row["created_at"],
        used_at=row["used_at"],
    )


def _token(row: SQLRow) -> AdminToken:
    return AdminToken(
        name=row["name"],
        token_hash=bytes(row["token_hash"]),
        created_at=row["created_at"],
        created_by=row["created_by"],
        revoked_at=row["revoked_at"],
        revoked_by=row["revoked_by"],
    )


_HOST_SELECT = """
    SELECT h.*, (SELECT d.device_id FROM devices d
                 WHERE d.host_id = h.id AND d.state = 'enrolled'
                 ORDER BY d.enrolled_at DESC LIMIT 1) AS mdm_device_id
    FROM hosts h
"""


def _host(row: SQLRow) -> HostRecord:
    return HostRecord(
        id=row["id"],
        hardware_uuid=row["hardware_uuid"],
        platform=row["platform"],
        hostname=row["hostname"],
        hardware_serial=row["hardware_serial"],
        enrolled_at=row["enrolled_at"],
        last_seen=row["last_seen"],
        unenroll_requested=bool(row["unenroll_requested"]),
        mdm_device_id=row["mdm_device_id"],
    )


def _device(row: SQLRow, pending_actions: tuple[str, ...] = ()) -> DeviceRecord:
    return DeviceRecord(
        device_id=row["device_id"],
        host_id=row["host_id"],
        hw_dev_id=row["hw_dev_id"],
        enrollment_type=row["enrollment_type"],
        device_name=row["device_name"],
        os_version=row["os_version"],
        state=row["state"],
        hw_dev_id_collision=bool(row["hw_dev_id_collision"]),
        enrolled_at=row["enrolled_at"],
        unenrolled_at=row["unenrolled_at"],
        last_seen=row["last_seen"],
        inventory=json.loads(row["inventory"]),
        certificate=None
        if row["c_serial"] is None
        else CertificateRecord(
            serial=row["c_serial"],
            device_id=row["device_id"],
            thumbprint=row["c_thumbprint"],
            not_before=row["c_not_before"],
            not_after=row["c_not_after"],
            issued_at=row["c_issued_at"],
            revoked_at=None,
            renewed_from=row["c_renewed_from"],
            activated_at=row["c_activated_at"],
        ),
        lifecycle=row["lifecycle"],
        pending_actions=pending_actions,
    )


def _certificate(row: SQLRow, prefix: str = "") -> CertificateRecord:
    """A certificates row; *prefix*: its columns' names in a joined row."""
    return CertificateRecord(
        serial=row[prefix + "serial"],
        device_id=row[prefix + "device_id"],
        thumbprint=row[prefix + "thumbprint"],
        not_before=row[prefix + "not_before"],
        not_after=row[prefix + "not_after"],
        issued_at=row[prefix + "issued_at"],
        revoked_at=row[prefix + "revoked_at"],
        revoke_reason=row[prefix + "revoke_reason"],
        renewed_from=row[prefix + "renewed_from"],
        activated_at=row[prefix + "activated_at"],
    )


def _command(row: SQLRow, results: tuple[CommandResult, ...] = ()) -> CommandRecord:
    return CommandRecord(
        uuid=row["uuid"],
        device_id=row["device_id"],
        verb=row["verb"],
        body=row["body"],
        state=row["state"],
        status=row["status"],
        created_at=row["created_at"],
        sent_at=row["sent_at"],
        acked_at=row["acked_at"],
        results=results,
        detail=row["detail"],
        operation_id=row["operation_id"],
    )


def _result(row: SQLRow) -> CommandResult:
    return CommandResult(
        kind=row["kind"],
        cmd_id=row["cmd_id"],
        cmd=row["cmd"],
        status=row["status"],
        loc_uri=row["loc_uri"],
        format=row["format"],
        type=row["type"],
        data=row["data"],
        received_at=row["received_at"],
    )


def _insert_results(
    conn: SQLConnection, device_id: str, results: list[tuple[str, CommandResult]], now: float
) -> None:
    _many(
        conn,
        """
        INSERT INTO command_results (command_uuid, kind, cmd_id, cmd, status, loc_uri, format,
                                     type, data, received_at)
        SELECT uuid, ?, ?, ?, ?, ?, ?, ?, ?, ? FROM commands WHERE uuid = ? AND device_id = ?
        """,
        [
            (r.kind, r.cmd_id, r.cmd, r.status, r.loc_uri, r.format, r.type, r.data, now, uuid, device_id)
            for uuid, r in results
        ],
    )


def _end_session(conn: SQLConnection, device_id: str) -> None:
    for table in ("syncml_sessions", "syncml_replies", "large_object_chunks"):
        conn.execute(f"DELETE FROM {table} WHERE device_id = ?", (device_id,))


#: The built-in group of every enrolled device (not stored).
ALL_GROUP = "all"
# Events kept per device and profile.
_HISTORY = 20


def _profile(conn: SQLConnection, row: SQLRow) -> ProfileRecord:
    groups = conn.execute(
        "SELECT group_name FROM profile_assignments WHERE profile_name = ? ORDER BY group_name",
        (row["name"],),
    )
    return ProfileRecord(
        name=row["name"],
        version=row["version"],
        items=items_from_json(row["items"]),
        groups=tuple(g["group_name"] for g in groups),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        deleted_at=row["deleted_at"],
    )


def _enrolled_count(conn: SQLConnection) -> int:
    # Every device less the unenrolled (a small partial index): no walk of
    # the devices table, which state = 'enrolled' alone would be.
    (total,) = conn.execute("SELECT count(*) FROM devices").fetchone()
    (unenrolled,) = conn.execute("SELECT count(*) FROM devices WHERE state = 'unenrolled'").fetchone()
    return int(total) - int(unenrolled)


def _group(conn: SQLConnection, name: str, created_at: float | None) -> GroupRecord:
    if name == ALL_GROUP:
        members = _enrolled_count(conn)
    else:
        members = conn.execute("SELECT COUNT(*) FROM group_members WHERE group_name = ?", (name,)).fetchone()[
            0
        ]
    profiles = conn.execute(
        "SELECT profile_name FROM profile_assignments WHERE group_name = ? ORDER BY profile_name", (name,)
    )
    return GroupRecord(name, members, created_at, tuple(p["profile_name"] for p in profiles))


def _device_profile(row: SQLRow) -> DeviceProfile:
    return DeviceProfile.stored(
        profile=row["profile_name"],
        version=row["version"],
        state=row["state"],
        status=row["status"],
        detail=row["detail"],
        attempts=row["attempts"],
        verified_at=row["verified_at"],
        updated_at=row["updated_at"],
        record=row["record"],
    )


def _profile_command(row: SQLRow) -> ProfileCommand:
    return ProfileCommand(
        row["command_uuid"], row["profile_name"], row["version"], row["purpose"], row["loc_uri"]
    )


def _profile_event(row: SQLRow) -> ProfileEvent:
    return ProfileEvent(
        row["profile_name"], row["version"], row["state"], row["status"], row["detail"], row["at"]
    )


def _apply_profile_step(conn: SQLConnection, device_id: str, step: ProfileStep) -> None:
    conn.executemany(
        """
        INSERT INTO device_profiles (device_id, profile_name, version, state, status, detail, attempts,
                                     verified_at, updated_at, record)
        VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
        ON CONFLICT (device_id, profile_name) DO UPDATE SET
            version = excluded.version, state = excluded.state, status = excluded.status,
            detail = excluded.detail, attempts = excluded.attempts, verified_at = excluded.verified_at,
            updated_at = excluded.updated_at, record = excluded.record
        """,
        [
            (
                device_id, r.profile, r.version, r.state, r.status, r.detail, r.attempts,
                r.verified_at, r.updated_at, r.record_json(),
            )
            for r in step.records
        ],
    )  # fmt: skip
    conn.executemany(
        """
        INSERT INTO profile_commands (command_uuid, device_id, profile_name, version, purpose, loc_uri)
        SELECT ?, ?, ?, ?, ?, ? FROM commands WHERE uuid = ? AND device_id = ?
        """,
        [
            (link.command_uuid, device_id, link.profile, link.version, link.purpose, link.loc_uri,
             link.command_uuid, device_id)
            for link in step.links
        ],
    )  # fmt: skip
    conn.executemany(
        "DELETE FROM profile_commands WHERE command_uuid = ? AND device_id = ?",
        [(uuid, device_id) for uuid in step.done],
    )
    conn.executemany(
        """
        INSERT INTO device_profile_events (device_id, profile_name, version, state, status, detail, at)
        VALUES (?, ?, ?, ?, ?, ?, ?)
        """,
        [(device_id, e.profile, e.version, e.state, e.status, e.detail, e.at) for e in step.events],
    )
    for name in {e.profile for e in step.events}:
        conn.execute(
            """
            DELETE FROM device_profile_events WHERE device_id = ? AND profile_name = ? AND id <= (
                SELECT id FROM device_profile_events WHERE device_id = ? AND profile_name = ?
                ORDER BY id DESC LIMIT 1 OFFSET ?)
            """,
            (device_id, name, device_id, name, _HISTORY),
        )
    _forget_deleted_profiles(conn, [r.profile for r in step.records if r.state in ("removed", "failed")])


def _forget_deleted_profiles(conn: SQLConnection, names: Sequence[str]) -> None:
    """A deleted profile is gone once no device still has it (every record
    removed, or failed: the removal gave up)."""
    for name in dict.fromkeys(names):
        conn.execute(
            """
            DELETE FROM profiles WHERE name = ? AND deleted_at IS NOT NULL AND NOT EXISTS (
                SELECT 1 FROM device_profiles WHERE profile_name = ? AND state NOT IN ('removed', 'failed'))
            """,
            (name, name),
        )


# -- device actions and group operations --

# The condition the partial index device_actions_open is built on.
_OPEN = "state IN ({})".format(", ".join(f"'{state}'" for state in OPEN_STATES))
_BLOCKING = "state IN ({})".format(", ".join(f"'{state}'" for state in BLOCKING_STATES))


def _insert_command(
    conn: SQLConnection,
    device_id: str,
    uuid: str,
    verb: str,
    body: str,
    now: float,
    operation_id: str | None,
) -> None:
    conn.execute(
        """
        INSERT INTO commands (uuid, device_id, verb, body, state, created_at, operation_id)
        VALUES (?, ?, ?, ?, 'pending', ?, ?)
        """,
        (uuid, device_id, verb, body, now, operation_id),
    )


def _action(row: SQLRow) -> DeviceAction:
    return DeviceAction(
        action_id=row["action_id"],
        device_id=row["device_id"],
        action=row["action"],
        options=json.loads(row["options"]),
        command_uuid=row["command_uuid"],
        state=row["state"],
        status=row["status"],
        detail=row["detail"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        operation_id=row["operation_id"],
    )


def _operation(row: SQLRow) -> OperationRecord:
    return OperationRecord(
        operation_id=row["operation_id"],
        kind=row["kind"],
        group_name=row["group_name"],
        action=row["action"],
        options=json.loads(row["options"]) if row["options"] else None,
        verb=row["verb"],
        body=row["body"],
        state=row["state"],
        total=row["total"],
        queued=row["queued"],
        skipped=row["skipped"],
        acknowledged=row["acknowledged"],
        failed=row["failed"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        finished_at=row["finished_at"],
        lease_owner=row["lease_owner"],
        lease_until=row["lease_until"],
        cursor=row["cursor"],
    )


def _action_refusal(conn: SQLConnection, device: SQLRow, action: str) -> str | None:
    """Why *action* cannot be queued for *device* (a row with its state and
    lifecycle), or None."""
    if device["state"] != "enrolled":
        return "wiped" if device["lifecycle"] == "wiped" else "unenrolled"
    same = conn.execute(
        f"SELECT 1 FROM device_actions WHERE device_id = ? AND action = ? AND {_BLOCKING}",
        (device["device_id"], action),
    ).fetchone()
    return None if same is None else "pending"


def _queue_action(
    conn: SQLConnection, device: SQLRow, new: NewAction, now: float, operation_id: str | None
) -> DeviceAction:
    device_id = device["device_id"]
    if new.action == "rename":
        # A newer name replaces one the device has not restarted into yet.
        conn.execute(
            """
            UPDATE device_actions SET state = 'cancelled', detail = 'replaced by a newer rename',
                updated_at = ?
            WHERE device_id = ? AND action = 'rename' AND state = 'awaiting_restart'
            """,
            (now, device_id),
        )
    _insert_command(conn, device_id, new.command_uuid, new.verb, new.body, now, operation_id)
    record = DeviceAction(
        new.action_id, device_id, new.action, dict(new.options), new.command_uuid, "pending", None, None,
        now, now, operation_id,
    )  # fmt: skip
    conn.execute(
        """
        INSERT INTO device_actions (action_id, device_id, action, options, command_uuid, operation_id, state,
                                    status, detail, created_at, updated_at)
        VALUES (?, ?, ?, ?, ?, ?, 'pending', NULL, NULL, ?, ?)
        """,
        (record.action_id, device_id, record.action, record.options_json(), record.command_uuid,
         operation_id, now, now),
    )  # fmt: skip
    if new.action in ("wipe", "unenroll"):
        _set_lifecycle(conn, device_id)
    if new.action == "unenroll" and device["host_id"] is not None:
        # The agent path as well: whichever comes first unenrolls it.
        conn.execute("UPDATE hosts SET unenroll_requested = 1 WHERE id = ?", (device["host_id"],))
    return record


def _queue_batch(conn: SQLConnection, op: SQLRow, members: Sequence[SQLRow], now: float) -> tuple[int, int]:
    """Give a batch of the operation's members their command (or action),
    with one statement per kind of row; (queued, skipped)."""
    eligible = [m for m in members if m["state"] == "enrolled"]
    action = op["action"] if op["kind"] == "action" else None
    if action is not None and eligible:
        marks = ",".join("?" * len(eligible))
        busy = {
            r["device_id"]
            for r in conn.execute(
                f"""
                SELECT device_id FROM device_actions
                WHERE action = ? AND {_BLOCKING} AND device_id IN ({marks})
                """,
                (action, *(m["device_id"] for m in eligible)),
            )
        }
        eligible = [m for m in eligible if m["device_id"] not in busy]
    operation_id = op["operation_id"]
    uuids = [str(uuidlib.uuid4()) for _ in eligible]
    conn.executemany(
        """
        INSERT INTO commands (uuid, device_id, verb, body, state, created_at, operation_id)
        VALUES (?, ?, ?, ?, 'pending', ?, ?)
        """,
        [
            (u, m["device_id"], op["verb"], op["body"], now, operation_id)
            for u, m in zip(uuids, eligible, strict=True)
        ],
    )
    if action is not None:
        options = op["options"] or "{}"
        conn.executemany(
            """
            INSERT INTO device_actions (action_id, device_id, action, options, command_uuid, operation_id,
                                        state, created_at, updated_at)
            VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, ?)
            """,
            [
                (str(uuidlib.uuid4()), m["device_id"], action, options, u, operation_id, now, now)
                for u, m in zip(uuids, eligible, strict=True)
            ],
        )
        if action in ("wipe", "unenroll"):
            # What lifecycle_of gives: a wipe outranks an unenrollment.
            conn.executemany(
                """
                UPDATE devices SET lifecycle = CASE WHEN ? = 'wipe' OR lifecycle IS NOT 'wipe_pending'
                    THEN ? ELSE lifecycle END
                WHERE device_id = ? AND state = 'enrolled'
                """,
                [(action, lifecycle_of([action]), m["device_id"]) for m in eligible],
            )
        if action == "unenroll":
            conn.executemany(
                "UPDATE hosts SET unenroll_requested = 1 WHERE id = ?",
                [(m["host_id"],) for m in eligible if m["host_id"] is not None],
            )
    return len(eligible), len(members) - len(eligible)


def _set_lifecycle(conn: SQLConnection, device_id: str) -> None:
    """The lifecycle the device's queued or sent actions give it."""
    names = [
        r["action"]
        for r in conn.execute(
            f"SELECT action FROM device_actions WHERE device_id = ? AND {_BLOCKING}", (device_id,)
        )
    ]
    conn.execute(
        "UPDATE devices SET lifecycle = ? WHERE device_id = ? AND state = 'enrolled'",
        (lifecycle_of(names), device_id),
    )


def _finish_commands(
    conn: SQLConnection,
    device_id: str,
    outcomes: Sequence[tuple[str, str, int | None, str | None]],
    now: float,
) -> None:
    """Mark the device's open commands (uuid, state, status, detail) answered,
    failed or cancelled, once each, and count them in their operations."""
    counted: dict[str, list[int]] = {}
    for uuid, state, status, detail in outcomes:
        row = conn.execute(
            """
            SELECT operation_id FROM commands
            WHERE uuid = ? AND device_id = ? AND state IN ('pending', 'sent')
            """,
            (uuid, device_id),
        ).fetchone()
        if row is None:
            continue  # another device's, or answered already
        conn.execute(
            "UPDATE commands SET state = ?, status = ?, acked_at = ?, detail = ? WHERE uuid = ?",
            (state, status, now, detail, uuid),
        )
        if row["operation_id"] is not None:
            counts = counted.setdefault(row["operation_id"], [0, 0])
            counts[0 if state == "acknowledged" else 1] += 1
    for operation_id, (acknowledged, failed) in counted.items():
        conn.execute(
            """
            UPDATE operations SET acknowledged = acknowledged + ?, failed = failed + ?, updated_at = ?
            WHERE operation_id = ?
            """,
            (acknowledged, failed, now, operation_id),
        )
    _operations_done(conn, list(counted), now)


def _operations_done(conn: SQLConnection, operation_ids: Sequence[str], now: float) -> None:
    conn.executemany(
        """
        UPDATE operations SET state = 'done', finished_at = ?
        WHERE operation_id = ? AND state = 'delivering' AND acknowledged + failed >= queued
        """,
        [(now, o) for o in operation_ids],
    )


def _apply_action_step(conn: SQLConnection, device_id: str, step: ActionStep, now: float) -> None:
    conn.executemany(
        """
        UPDATE device_actions SET state = ?, status = ?, detail = ?, updated_at = ?
        WHERE action_id = ? AND device_id = ?
        """,
        [(u.state, u.status, u.detail, now, u.action_id, device_id) for u in step.updates],
    )
    _finish_commands(
        conn,
        device_id,
        [(uuid, "acknowledged", None, "confirmed by the device's Alert 1226") for uuid in step.confirmed],
        now,
    )
    if step.lifecycle_changed and step.ended is None:
        conn.execute(
            "UPDATE devices SET lifecycle = ? WHERE device_id = ? AND state = 'enrolled'",
            (step.lifecycle, device_id),
        )


def _cancel_device(conn: SQLConnection, device_id: str, reason: str, now: float) -> None:
    """Everything still open for a device that left: its commands fail and
    its actions are cancelled, with *reason*."""
    open_commands = conn.execute(
        "SELECT uuid FROM commands WHERE device_id = ? AND state IN ('pending', 'sent')", (device_id,)
    ).fetchall()
    _finish_commands(conn, device_id, [(r["uuid"], "failed", None, reason) for r in open_commands], now)
    conn.execute(
        f"""
        UPDATE device_actions SET state = 'cancelled', detail = ?, updated_at = ?
        WHERE device_id = ? AND {_OPEN}
        """,
        (reason, now, device_id),
    )


class SQLiteStore(SQLStore):
    """:class:`~mdmd.store.interface.Store` on one SQLite file."""

    def __init__(self, path: str, reactor: IReactorFromThreads) -> None:
        self.path = path
        self._reactor = reactor
        self._engine = None
        self.migration_backup: str | None = None

    @property
    def schema_version(self) -> int:
        return SCHEMA_VERSION

    # -- life cycle (synchronous: called before the reactor runs / after it stops) --

    def open(self, *, check: bool = True, before_migration: Callable[[int, str], None] | None = None) -> int:
        """Open (creating if needed), check and migrate; return the schema
        version found.  ``check=False`` is for worker processes: the main
        process has checked and migrated the file, so only the version is
        verified.

        Before migrating a database that holds data, a copy of it is written
        beside it (``mdmd.sqlite3.v3-backup-<time>``); *before_migration* is
        called with the version found and the copy's path once it exists."""
        directory = os.path.dirname(self.path) or "."
        if not os.path.isdir(directory):
            raise StoreError(f"{directory}: state directory does not exist")
        try:
            conn = _connect(self.path)
            if check:
                result = conn.execute("PRAGMA quick_check").fetchone()[0]
                if result != "ok":
                    raise StoreError(f"{self.path}: database integrity check failed: {result}")
                version = int(conn.execute("PRAGMA user_version").fetchone()[0])
                if 0 < version < SCHEMA_VERSION:
                    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
                    copy = f"{self.path}.v{version}-backup-{stamp}"
                    try:
                        backup_database(conn, copy)
                    except (OSError, sqlite3.Error) as e:
                        raise StoreError(
                            f"cannot write a backup to {copy} before migrating from schema version "
                            f"{version}: {e}; nothing was changed"
                        ) from None
                    self.migration_backup = copy
                    if before_migration is not None:
                        before_migration(version, copy)
                found = migrate(conn)
            else:
                found = int(conn.execute("PRAGMA user_version").fetchone()[0])
                if found != SCHEMA_VERSION:
                    raise StoreError(f"{self.path}: schema version {found}, expected {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path}: {e}") from None
        # The database holds node-key hashes and device inventory: owner only.
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(self.path + suffix):
                os.chmod(self.path + suffix, 0o600)
        self._engine = TransactionEngine(
            self._reactor,
            conn,
            _connect(self.path),
            begin_write="BEGIN IMMEDIATE",
            begin_read="BEGIN DEFERRED",
            read_guard=_no_writes,
            bulk_reader=_connect(self.path),
            on_commit=self._on_commit,
            # The fleet-wide counts (seconds at a million devices) beside
            # the device list's pages, not before them.
            lanes={"counts": _connect(self.path)},
        )
        return found

    def start(self) -> None:
        if self._engine is None:
            raise StoreError("store is not open")
        self._engine.start()

    def stop(self) -> None:
        if self._engine is not None:
            self._engine.stop()
            self._engine = None

    def device_page(
        self, query: DeviceQuery, *, limit: int, after: tuple[float, str] | None = None
    ) -> Deferred[DevicePage]:
        def txn(conn: SQLConnection) -> DevicePage:
            # SQLite's own SQL (rowids, INDEXED BY): the engine's connection
            # is a sqlite3 one here.
            return device_page(cast(sqlite3.Connection, conn), query, limit, after)

        return self._run(txn, write=False, bulk=True)
