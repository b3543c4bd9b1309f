"""The state store: hosts, MDM devices, issued certificates, the command
queue with its results, and SyncML session state.

:class:`Store` is the interface the protocol handlers use; every method
returns a Deferred and never blocks the reactor.  :class:`SQLiteStore` is the
implementation: one SQLite file in WAL mode with ``synchronous=FULL`` (a
committed transaction survives power loss).  Writes run on one dedicated
thread, so they are serialised without locks, and share commits (group
commit); reads run on a second thread and connection beside them.  The
reactor thread never touches the database.  Each store method is one
transaction, and its Deferred fires only after the commit: a handler that
awaits the store before answering never acknowledges anything that is not
on disk.
"""

from __future__ import annotations

import json
import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.failure import Failure

__all__ = [
    "SCHEMA_VERSION",
    "CertificateRecord",
    "DeviceConflict",
    "DeviceEnrollment",
    "DeviceRecord",
    "EnrollmentOutcome",
    "HostEnrollment",
    "HostRecord",
    "SQLiteStore",
    "SessionConflict",
    "Store",
    "StoreError",
]

R = TypeVar("R")


class StoreError(Exception):
    """The database cannot be used (corrupt, newer schema, unreadable)."""


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


# --- records ---


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


@dataclass(frozen=True, slots=True)
class CertificateRecord:
    serial: str
    device_id: str
    thumbprint: str
    not_before: float
    not_after: float
    issued_at: float
    revoked_at: float | None


@dataclass(frozen=True, slots=True)
class CommandResult:
    """A Status or a Results item a device returned for a queued command
    (for Atomic/Sequence: one per inner command, by CmdID)."""

    kind: str  # "status" | "results"
    cmd_id: str | None
    cmd: str | None
    status: int | None
    loc_uri: str | None = None
    format: str | None = None
    type: str | None = None
    data: str | None = None
    received_at: float = 0.0


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
class AlertRecord:
    code: str
    type: str | None
    format: str | None
    source: str | None
    data: str | None


@dataclass(frozen=True, slots=True)
class ManagementContext:
    """Everything one SyncML message needs, read in one transaction."""

    certificate: CertificateRecord
    device: DeviceRecord
    session: dict[str, Any] | None
    queue: tuple[CommandRecord, ...]  # pending or sent-but-unanswered, in queue order
    # Bumped by every committed step (and by re-enrollment): the step this
    # context leads to commits only if nobody else's did in between.
    session_seq: int = 0


@dataclass(frozen=True, slots=True)
class ManagementStep:
    """What one SyncML message changed; committed before the reply leaves."""

    device_id: str
    session: dict[str, Any] | None  # the session state to keep; None ends it
    inventory: dict[str, str] = field(default_factory=dict)
    alerts: tuple[AlertRecord, ...] = ()
    answered: tuple[tuple[str, int], ...] = ()  # (command uuid, top-level status code)
    results: tuple[tuple[str, CommandResult], ...] = ()
    sent: tuple[tuple[str, str, int], ...] = ()  # (command uuid, SessionID, server MsgID)
    failed: tuple[tuple[str, int], ...] = ()  # (command uuid, status) refused by the server
    unenroll: bool = False


# --- the interface ---


class Store(Protocol):
    """What the protocol handlers need from persistence.  Every Deferred fires
    after the change is durable."""

    def enroll_host(self, enrollment: HostEnrollment, now: float) -> Deferred[HostRecord]: ...

    def host_by_node_key(
        self, node_key_hash: bytes, *, seen_at: float | None = None
    ) -> Deferred[HostRecord | None]: ...

    def request_unenrollment(self, device_id: str) -> Deferred[bool]: ...

    def record_device_enrollment(
        self, enrollment: DeviceEnrollment, now: float
    ) -> Deferred[EnrollmentOutcome]: ...

    def device(self, device_id: str) -> Deferred[DeviceRecord | None]: ...

    def certificate(self, serial: str) -> Deferred[CertificateRecord | None]: ...

    def devices(self) -> Deferred[list[DeviceRecord]]: ...

    def device_certificates(self, device_id: str) -> Deferred[list[CertificateRecord]]: ...

    def management_context(
        self, cert_serial: str, *, queue_limit: int = 100
    ) -> Deferred[ManagementContext | None]: ...

    def commit_management_step(
        self, step: ManagementStep, now: float, *, expected_seq: int | None = None
    ) -> Deferred[None]: ...

    def queue_command(
        self, device_id: str, uuid: str, verb: str, body: str, now: float
    ) -> Deferred[CommandRecord | None]: ...

    def command(self, uuid: str) -> Deferred[CommandRecord | None]: ...

    def device_commands(self, device_id: str, *, limit: int = 100) -> Deferred[list[CommandRecord]]: ...


# --- schema ---

# Each entry migrates from version i to i + 1; the file's PRAGMA user_version
# says how far it has come.  Never edit a released step: append a new one.
_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE hosts (
        id INTEGER PRIMARY KEY,
        hardware_uuid TEXT NOT NULL UNIQUE,
        node_key_hash BLOB NOT NULL UNIQUE,
        platform TEXT NOT NULL,
        hostname TEXT NOT NULL,
        hardware_serial TEXT NOT NULL,
        info TEXT NOT NULL,
        enrolled_at REAL NOT NULL,
        last_seen REAL,
        unenroll_requested INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE devices (
        device_id TEXT PRIMARY KEY,
        host_id INTEGER REFERENCES hosts(id),
        hw_dev_id TEXT,
        enrollment_type TEXT NOT NULL,
        device_name TEXT,
        os_version TEXT,
        context TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('enrolled', 'unenrolled')),
        hw_dev_id_collision INTEGER NOT NULL DEFAULT 0,
        enrolled_at REAL NOT NULL,
        unenrolled_at REAL,
        last_seen REAL,
        inventory TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX devices_by_host ON devices(host_id);
    CREATE INDEX devices_by_hw_dev_id ON devices(hw_dev_id);
    CREATE TABLE certificates (
        serial TEXT PRIMARY KEY,
        device_id TEXT NOT NULL REFERENCES devices(device_id),
        thumbprint TEXT NOT NULL UNIQUE,
        not_before REAL NOT NULL,
        not_after REAL NOT NULL,
        issued_at REAL NOT NULL,
        revoked_at REAL,
        revoke_reason TEXT
    );
    CREATE INDEX certificates_by_device ON certificates(device_id);
    CREATE TABLE commands (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        uuid TEXT NOT NULL UNIQUE,
        device_id TEXT NOT NULL REFERENCES devices(device_id),
        verb TEXT NOT NULL,
        body TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('pending', 'sent', 'acknowledged', 'failed')),
        status INTEGER,
        created_at REAL NOT NULL,
        sent_at REAL,
        acked_at REAL,
        session_id TEXT,
        msg_id INTEGER
    );
    CREATE INDEX commands_queue ON commands(device_id, state, seq);
    CREATE TABLE command_results (
        id INTEGER PRIMARY KEY,
        command_uuid TEXT NOT NULL REFERENCES commands(uuid),
        kind TEXT NOT NULL CHECK (kind IN ('status', 'results')),
        cmd_id TEXT,
        cmd TEXT,
        status INTEGER,
        loc_uri TEXT,
        format TEXT,
        type TEXT,
        data TEXT,
        received_at REAL NOT NULL
    );
    CREATE INDEX command_results_by_command ON command_results(command_uuid, id);
    CREATE TABLE syncml_sessions (
        device_id TEXT PRIMARY KEY REFERENCES devices(device_id),
        state TEXT NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE device_alerts (
        device_id TEXT NOT NULL REFERENCES devices(device_id),
        code TEXT NOT NULL,
        type TEXT NOT NULL,
        source TEXT NOT NULL,
        format TEXT,
        data TEXT,
        received_at REAL NOT NULL,
        count INTEGER NOT NULL DEFAULT 1,
        PRIMARY KEY (device_id, code, type, source)
    );
    """,
    # 2: with several worker processes, two messages of one device can be
    # processed at once in different processes; the session step is a
    # compare-and-swap on this counter.
    """
    ALTER TABLE devices ADD COLUMN session_seq INTEGER NOT NULL DEFAULT 0;
    """,
)

SCHEMA_VERSION = len(_MIGRATIONS)


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
            for statement in _MIGRATIONS[version].split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version={version + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return found


class SQLiteStore:
    """:class:`Store` on one SQLite file, driven from one dedicated thread."""

    def __init__(self, path: str, reactor: IReactorFromThreads) -> None:
        self.path = path
        self._reactor = reactor
        # One thread owns the writing connection: SQLite serialises writers
        # anyway, and a single owner means no lock contention and writes in
        # the order the reactor asked for them.  Reads run on a second
        # connection and thread (WAL lets them run beside a commit), so a
        # lookup never waits for another request's fsync; a read sees every
        # write whose Deferred has fired.
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._read_jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._conn: sqlite3.Connection | None = None
        self._read_conn: sqlite3.Connection | None = None

    # -- life cycle (synchronous: called before the reactor runs / after it stops) --

    def open(self, *, check: bool = True) -> int:
        """Open (creating if needed), check and migrate; return the schema
        version found.  ``check=False`` is for worker processes: the main
        process has checked and migrated the file, so only the version is
        verified."""
        directory = os.path.dirname(self.path) or "."
        if not os.path.isdir(directory):
            raise StoreError(f"{directory}: state directory does not exist")
        try:
            conn = _connect(self.path)
            if check:
                result = conn.execute("PRAGMA quick_check").fetchone()[0]
                if result != "ok":
                    raise StoreError(f"{self.path}: database integrity check failed: {result}")
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
        self._conn = conn
        self._read_conn = _connect(self.path)
        return found

    def start(self) -> None:
        self._threads = [
            threading.Thread(target=self._work, name="mdmd-store", daemon=True),
            threading.Thread(target=self._read_work, name="mdmd-store-read", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        if self._threads:
            self._jobs.put(None)
            self._read_jobs.put(None)
            for thread in self._threads:
                thread.join()
            self._threads = []
        for conn in (self._conn, self._read_conn):
            if conn is not None:
                conn.close()
        self._conn = self._read_conn = None

    # -- plumbing --

    def _run(self, fn: Callable[[sqlite3.Connection], R], *, write: bool = True) -> Deferred[R]:
        """Run *fn* as one transaction on the store thread; the Deferred fires
        once its effects are committed (a read-only one takes no write lock)."""
        d: Deferred[R] = Deferred()
        (self._jobs if write else self._read_jobs).put(_Job(fn, d))
        return d

    def _read_work(self) -> None:
        """The reading thread: one read transaction per job, always rolled
        back, so not even a buggy reader can commit anything."""
        while True:
            job = self._read_jobs.get()
            if job is None:
                return
            conn = self._read_conn
            outcome: object
            try:
                if conn is None:
                    raise StoreError("store is not open")
                conn.execute("BEGIN DEFERRED")
                changes = conn.total_changes
                try:
                    outcome = job.fn(conn)
                    if conn.total_changes != changes:
                        # A method declared read-only wrote: a programming
                        # error, reported (and rolled back below).
                        raise StoreError(
                            f"{getattr(job.fn, '__qualname__', job.fn)} wrote in a read-only transaction"
                        )
                finally:
                    conn.execute("ROLLBACK")
                ok = True
            except Exception:
                outcome, ok = Failure(), False
            fire = job.deferred.callback if ok else job.deferred.errback
            self._reactor.callFromThread(fire, outcome)

    def _work(self) -> None:
        """The store thread: group commit.  Jobs that queued up while the
        previous commit was syncing run as savepoints of one transaction
        and share one COMMIT (one fsync); each Deferred fires only after
        that COMMIT, so nothing is acknowledged before it is durable."""
        while True:
            job = self._jobs.get()
            if job is None:
                return
            batch = [job]
            stop = False
            while len(batch) < _MAX_BATCH:
                try:
                    more = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            self._run_batch(batch)
            if stop:
                return

    def _run_batch(self, batch: list[_Job]) -> None:
        conn = self._conn
        outcomes: list[tuple[Deferred[Any], object, bool]] = []
        try:
            if conn is None:
                raise StoreError("store is not open")
            # Only writes come here: reads have their own thread (_read_work).
            conn.execute("BEGIN IMMEDIATE")
            for job in batch:
                conn.execute("SAVEPOINT job")
                try:
                    result = job.fn(conn)
                except Exception:
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    outcomes.append((job.deferred, Failure(), False))
                else:
                    conn.execute("RELEASE job")
                    outcomes.append((job.deferred, result, True))
            conn.execute("COMMIT")
        except Exception:
            # The commit itself failed (disk full, I/O error): nothing of
            # the batch is durable, so every job fails.
            failure = Failure()
            if conn is not None and conn.in_transaction:
                conn.execute("ROLLBACK")
            outcomes = [(job.deferred, failure, False) for job in batch]
        for deferred, value, ok in outcomes:
            fire = deferred.callback if ok else deferred.errback
            self._reactor.callFromThread(fire, value)

    # -- hosts --

    def enroll_host(self, enrollment: HostEnrollment, now: float) -> Deferred[HostRecord]:
        def txn(conn: sqlite3.Connection) -> HostRecord:
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

        def txn(conn: sqlite3.Connection) -> HostRecord | None:
            if seen_at is not None:
                conn.execute(
                    "UPDATE hosts SET last_seen = ? WHERE node_key_hash = ?", (seen_at, node_key_hash)
                )
            row = conn.execute(_HOST_SELECT + " WHERE h.node_key_hash = ?", (node_key_hash,)).fetchone()
            return None if row is None else _host(row)

        return self._run(txn, write=seen_at is not None)

    def request_unenrollment(self, device_id: str) -> Deferred[bool]:
        """Ask the agent of this device's host to unenroll it from MDM."""

        def txn(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                """
                UPDATE hosts SET unenroll_requested = 1
                WHERE id = (SELECT host_id FROM devices WHERE device_id = ? AND state = 'enrolled')
                """,
                (device_id,),
            )
            return cursor.rowcount > 0

        return self._run(txn)

    # -- MDM devices and certificates --

    def record_device_enrollment(
        self, enrollment: DeviceEnrollment, now: float
    ) -> Deferred[EnrollmentOutcome]:
        def txn(conn: sqlite3.Connection) -> EnrollmentOutcome:
            e = enrollment
            # DeviceIDs are not secrets (certificate CN, SyncML headers): an
            # enrolled device belongs to its host, and another host presenting
            # the same ID must not take it over.
            owner = conn.execute(
                "SELECT host_id FROM devices WHERE device_id = ? AND state = 'enrolled'", (e.device_id,)
            ).fetchone()
            if owner is not None and owner["host_id"] not in (None, e.host_id):
                raise DeviceConflict(e.device_id, owner["host_id"])
            # Re-enrollment of the same device, or a new MDM device ID on the
            # same host (Windows reinstalled): the old certificates must stop
            # opening sessions.
            old = conn.execute(
                """
                SELECT serial FROM certificates
                WHERE revoked_at IS NULL AND device_id IN (
                    SELECT device_id FROM devices WHERE device_id = ? OR host_id = ?)
                """,
                (e.device_id, e.host_id),
            ).fetchall()
            revoked = tuple(r["serial"] for r in old)
            conn.executemany(
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
            conn.executemany(
                "UPDATE devices SET state = 'unenrolled', unenrolled_at = ? WHERE device_id = ?",
                [(now, d) for d in replaced],
            )
            # Clones made without sysprep share HWDevID (LESSONS): never merge
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
                conn.executemany(
                    "UPDATE devices SET hw_dev_id_collision = 1 WHERE device_id = ?",
                    [(d,) for d in collisions],
                )
            conn.execute(
                """
                INSERT INTO devices (device_id, host_id, hw_dev_id, enrollment_type, device_name,
                                     os_version, context, state, hw_dev_id_collision, enrolled_at)
                VALUES (?, ?, ?, ?, ?, ?, ?, 'enrolled', ?, ?)
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
                    unenrolled_at = NULL
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
            # A fresh enrollment starts a fresh OMA-DM account on the device
            # (and a session step read before it must not commit after it).
            conn.execute("DELETE FROM syncml_sessions WHERE device_id = ?", (e.device_id,))
            conn.execute(
                "UPDATE devices SET session_seq = session_seq + 1 WHERE device_id = ?", (e.device_id,)
            )
            return EnrollmentOutcome(revoked, replaced, collisions)

        return self._run(txn)

    def device(self, device_id: str) -> Deferred[DeviceRecord | None]:
        def txn(conn: sqlite3.Connection) -> DeviceRecord | None:
            row = conn.execute("SELECT * FROM devices WHERE device_id = ?", (device_id,)).fetchone()
            return None if row is None else _device(row)

        return self._run(txn, write=False)

    def certificate(self, serial: str) -> Deferred[CertificateRecord | None]:
        def txn(conn: sqlite3.Connection) -> CertificateRecord | None:
            row = conn.execute("SELECT * FROM certificates WHERE serial = ?", (serial,)).fetchone()
            return None if row is None else _certificate(row)

        return self._run(txn, write=False)

    def devices(self) -> Deferred[list[DeviceRecord]]:
        def txn(conn: sqlite3.Connection) -> list[DeviceRecord]:
            return [_device(r) for r in conn.execute("SELECT * FROM devices ORDER BY enrolled_at, device_id")]

        return self._run(txn, write=False)

    def device_certificates(self, device_id: str) -> Deferred[list[CertificateRecord]]:
        def txn(conn: sqlite3.Connection) -> list[CertificateRecord]:
            rows = conn.execute(
                "SELECT * FROM certificates WHERE device_id = ? ORDER BY issued_at DESC", (device_id,)
            )
            return [_certificate(r) for r in rows]

        return self._run(txn, write=False)

    # -- OMA-DM management --

    def management_context(
        self, cert_serial: str, *, queue_limit: int = 100
    ) -> Deferred[ManagementContext | None]:
        def txn(conn: sqlite3.Connection) -> ManagementContext | None:
            cert_row = conn.execute("SELECT * FROM certificates WHERE serial = ?", (cert_serial,)).fetchone()
            if cert_row is None:
                return None
            device_row = conn.execute(
                "SELECT * FROM devices WHERE device_id = ?", (cert_row["device_id"],)
            ).fetchone()
            session_row = conn.execute(
                "SELECT state FROM syncml_sessions WHERE device_id = ?", (cert_row["device_id"],)
            ).fetchone()
            queue = conn.execute(
                """
                SELECT * FROM commands WHERE device_id = ? AND state IN ('pending', 'sent')
                ORDER BY seq LIMIT ?
                """,
                (cert_row["device_id"], queue_limit),
            )
            return ManagementContext(
                certificate=_certificate(cert_row),
                device=_device(device_row),
                session=None if session_row is None else json.loads(session_row["state"]),
                queue=tuple(_command(r) for r in queue),
                session_seq=device_row["session_seq"],
            )

        return self._run(txn, write=False)

    def commit_management_step(
        self, step: ManagementStep, now: float, *, expected_seq: int | None = None
    ) -> Deferred[None]:
        """Commit one message's step.  With *expected_seq* (the context's
        ``session_seq``) it is a compare-and-swap: :class:`SessionConflict`,
        and nothing written, if another step committed since."""

        def txn(conn: sqlite3.Connection) -> None:
            device_id = step.device_id
            row = conn.execute(
                "SELECT inventory, session_seq FROM devices WHERE device_id = ?", (device_id,)
            ).fetchone()
            if expected_seq is not None and (row is None or row["session_seq"] != expected_seq):
                raise SessionConflict(device_id)
            inventory = json.loads(row["inventory"]) if row else {}
            inventory.update(step.inventory)
            conn.execute(
                """
                UPDATE devices SET inventory = ?, last_seen = ?, session_seq = session_seq + 1
                WHERE device_id = ?
                """,
                (json.dumps(inventory, sort_keys=True), now, device_id),
            )
            # The latest alert of each kind, with a count: Windows sends a
            # LoginStatus alert in every session, and a row per session would
            # be the largest table for no information (LESSONS: store compactly).
            conn.executemany(
                """
                INSERT INTO device_alerts (device_id, code, type, source, format, data, received_at)
                VALUES (?, ?, ?, ?, ?, ?, ?)
                ON CONFLICT (device_id, code, type, source) DO UPDATE SET
                    format = excluded.format, data = excluded.data,
                    received_at = excluded.received_at, count = count + 1
                """,
                [
                    (device_id, a.code, a.type or "", a.source or "", a.format, a.data, now)
                    for a in step.alerts
                ],
            )
            # Every update is scoped to this device: a device can never touch
            # another device's commands, whatever it sends.
            conn.executemany(
                """
                UPDATE commands SET state = 'sent', sent_at = ?, session_id = ?, msg_id = ?
                WHERE uuid = ? AND device_id = ? AND state IN ('pending', 'sent')
                """,
                [(now, session_id, msg_id, uuid, device_id) for uuid, session_id, msg_id in step.sent],
            )
            conn.executemany(
                """
                UPDATE commands SET state = ?, status = ?, acked_at = ?
                WHERE uuid = ? AND device_id = ? AND state IN ('pending', 'sent')
                """,
                [
                    ("acknowledged" if 200 <= code < 300 else "failed", code, now, uuid, device_id)
                    for uuid, code in step.answered + step.failed
                ],
            )
            conn.executemany(
                """
                INSERT INTO command_results (command_uuid, kind, cmd_id, cmd, status, loc_uri, format,
                                             type, data, received_at)
                SELECT uuid, ?, ?, ?, ?, ?, ?, ?, ?, ? FROM commands WHERE uuid = ? AND device_id = ?
                """,
                [
                    (
                        r.kind,
                        r.cmd_id,
                        r.cmd,
                        r.status,
                        r.loc_uri,
                        r.format,
                        r.type,
                        r.data,
                        now,
                        uuid,
                        device_id,
                    )
                    for uuid, r in step.results
                ],
            )
            if step.unenroll:
                conn.execute(
                    "UPDATE devices SET state = 'unenrolled', unenrolled_at = ? WHERE device_id = ?",
                    (now, device_id),
                )
                conn.execute(
                    """
                    UPDATE certificates SET revoked_at = ?, revoke_reason = 'unenrolled'
                    WHERE device_id = ? AND revoked_at IS NULL
                    """,
                    (now, device_id),
                )
            if step.session is None or step.unenroll:
                conn.execute("DELETE FROM syncml_sessions WHERE device_id = ?", (device_id,))
            else:
                conn.execute(
                    """
                    INSERT INTO syncml_sessions (device_id, state, updated_at) VALUES (?, ?, ?)
                    ON CONFLICT (device_id) DO UPDATE
                    SET state = excluded.state, updated_at = excluded.updated_at
                    """,
                    (device_id, json.dumps(step.session, separators=(",", ":")), now),
                )

        return self._run(txn)

    # -- the command queue --

    def queue_command(
        self, device_id: str, uuid: str, verb: str, body: str, now: float
    ) -> Deferred[CommandRecord | None]:
        def txn(conn: sqlite3.Connection) -> CommandRecord | None:
            known = conn.execute(
                "SELECT 1 FROM devices WHERE device_id = ? AND state = 'enrolled'", (device_id,)
            ).fetchone()
            if known is None:
                return None
            conn.execute(
                """
                INSERT INTO commands (uuid, device_id, verb, body, state, created_at)
                VALUES (?, ?, ?, ?, 'pending', ?)
                """,
                (uuid, device_id, verb, body, now),
            )
            row = conn.execute("SELECT * FROM commands WHERE uuid = ?", (uuid,)).fetchone()
            return _command(row)

        return self._run(txn)

    def command(self, uuid: str) -> Deferred[CommandRecord | None]:
        def txn(conn: sqlite3.Connection) -> CommandRecord | None:
            row = conn.execute("SELECT * FROM commands WHERE uuid = ?", (uuid,)).fetchone()
            if row is None:
                return None
            results = conn.execute(
                "SELECT * FROM command_results WHERE command_uuid = ? ORDER BY id", (uuid,)
            )
            return _command(row, tuple(_result(r) for r in results))

        return self._run(txn, write=False)

    def device_commands(self, device_id: str, *, limit: int = 100) -> Deferred[list[CommandRecord]]:
        def txn(conn: sqlite3.Connection) -> list[CommandRecord]:
            rows = conn.execute(
                "SELECT * FROM commands WHERE device_id = ? ORDER BY seq DESC LIMIT ?", (device_id, limit)
            )
            return [_command(r) for r in rows]

        return self._run(txn, write=False)


_MAX_BATCH = 64


@dataclass(slots=True)
class _Job:
    fn: Callable[[sqlite3.Connection], Any]
    deferred: Deferred[Any]


_HOST_SELECT = """
    SELECT h.*, (SELECT d.device_id FROM devices d
                 WHERE d.host_id = h.id AND d.state = 'enrolled'
                 ORDER BY d.enrolled_at DESC LIMIT 1) AS mdm_device_id
    FROM hosts h
"""


def _host(row: sqlite3.Row) -> HostRecord:
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


def _device(row: sqlite3.Row) -> DeviceRecord:
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
    )


def _certificate(row: sqlite3.Row) -> CertificateRecord:
    return CertificateRecord(
        serial=row["serial"],
        device_id=row["device_id"],
        thumbprint=row["thumbprint"],
        not_before=row["not_before"],
        not_after=row["not_after"],
        issued_at=row["issued_at"],
        revoked_at=row["revoked_at"],
    )


def _command(row: sqlite3.Row, results: tuple[CommandResult, ...] = ()) -> CommandRecord:
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
    )


def _result(row: sqlite3.Row) -> CommandResult:
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
