"""The SQLite backend: its file, schema and migrations, group commit,
its reader beside the writer, and durability of acknowledged writes under
kill -9.  Behaviour every backend shares is in test_store_contract.py."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import REPO
from mdmd.management import LargeObject
from mdmd.store import HostEnrollment, StoreError
from mdmd.store.engine import SQLConnection
from mdmd.store.sqlite import _DEVICE_SELECT, _LIVE_SERIALS_OF_DEVICE_OR_HOST, SQLiteStore, migrate
from mdmd.store.sqlite_schema import MIGRATIONS, SCHEMA_VERSION
from store_helpers import ThreadReactor, host, wait


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    s = SQLiteStore(str(tmp_path / "mdmd.sqlite3"), ThreadReactor())  # type: ignore[arg-type]
    s.open()
    s.start()
    yield s
    s.stop()


def test_new_database_is_migrated_wal_and_private(tmp_path: Path) -> None:
    path = tmp_path / "mdmd.sqlite3"
    s = SQLiteStore(str(path), ThreadReactor())  # type: ignore[arg-type]
    assert s.open() == 0
    s.stop()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    s2 = SQLiteStore(str(path), ThreadReactor())  # type: ignore[arg-type]
    assert s2.open() == SCHEMA_VERSION
    s2.stop()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "mdmd.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        SQLiteStore(str(path), ThreadReactor()).open()  # type: ignore[arg-type]


def test_garbage_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "mdmd.sqlite3"
    path.write_bytes(b"not a database" * 100)
    with pytest.raises(StoreError):
        SQLiteStore(str(path), ThreadReactor()).open()  # type: ignore[arg-type]


def test_writes_survive_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "mdmd.sqlite3")
    s = SQLiteStore(path, ThreadReactor())  # type: ignore[arg-type]
    s.open()
    s.start()
    wait(s.enroll_host(host(7), now=1.0))
    s.stop()
    s = SQLiteStore(path, ThreadReactor())  # type: ignore[arg-type]
    s.open()
    s.start()
    try:
        found = wait(s.host_by_node_key(hashlib.sha256(b"key-7").digest()))
        assert found is not None and found.hostname == "host7"
    finally:
        s.stop()


_WRITER = textwrap.dedent(
    """
    import hashlib, sys
    from twisted.internet import reactor, task
    from twisted.internet.defer import Deferred
    from mdmd.store import HostEnrollment
    from mdmd.store.sqlite import _DEVICE_SELECT, _LIVE_SERIALS_OF_DEVICE_OR_HOST, SQLiteStore, migrate

    store = SQLiteStore(sys.argv[1], reactor)
    store.open()
    store.start()

    async def writer(lane: int) -> None:
        n = lane
        while True:
            await store.enroll_host(
                HostEnrollment(f"uuid-{n}", hashlib.sha256(b"%d" % n).digest(), "windows",
                               f"h{n}", "s", {}), now=float(n))
            # The acknowledgement: printed only after the commit.
            sys.stdout.write(f"ack {n}\\n")
            sys.stdout.flush()
            n += 4

    for lane in range(4):
        Deferred.fromCoroutine(writer(lane))
    reactor.run()
    """
)


_WRITER = textwrap.dedent(
    """
    import hashlib, sys
    from twisted.internet import reactor, task
    from twisted.internet.defer import Deferred
    from mdmd.store import HostEnrollment
    from mdmd.store.sqlite import _DEVICE_SELECT, _LIVE_SERIALS_OF_DEVICE_OR_HOST, SQLiteStore, migrate

    store = SQLiteStore(sys.argv[1], reactor)
    store.open()
    store.start()

    async def writer(lane: int) -> None:
        n = lane
        while True:
            await store.enroll_host(
                HostEnrollment(f"uuid-{n}", hashlib.sha256(b"%d" % n).digest(), "windows",
                               f"h{n}", "s", {}), now=float(n))
            # The acknowledgement: printed only after the commit.
            sys.stdout.write(f"ack {n}\\n")
            sys.stdout.flush()
            n += 4

    for lane in range(4):
        Deferred.fromCoroutine(writer(lane))
    reactor.run()
    """
)


def test_sigkill_during_a_stream_of_writes_loses_nothing_acknowledged(tmp_path: Path) -> None:
    db = tmp_path / "mdmd.sqlite3"
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(db)],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    acked: list[int] = []
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    while len(acked) < 400 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        acked.append(int(line.split()[1]))
    # Kill in the middle of the stream: writes are still in flight.
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(acked) >= 400, "writer did not acknowledge enough writes"
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        stored = {row[0] for row in conn.execute("SELECT hardware_uuid FROM hosts")}
    finally:
        conn.close()
    missing = [n for n in acked if f"uuid-{n}" not in stored]
    assert missing == []


def test_a_read_only_transaction_that_writes_is_rolled_back(store: SQLiteStore) -> None:
    def sneaky(conn: SQLConnection) -> None:
        conn.execute(
            "INSERT INTO hosts (hardware_uuid, node_key_hash, platform, hostname, hardware_serial,"
            " info, enrolled_at) VALUES ('x', x'00', 'windows', 'h', 's', '{}', 0)"
        )

    with pytest.raises(StoreError, match="read-only"):
        wait(store._run(sneaky, write=False))
    assert wait(store.host_by_node_key(b"\x00")) is None


def test_group_commit_isolates_a_failing_job_from_its_batch(tmp_path: Path) -> None:
    path = str(tmp_path / "mdmd.sqlite3")
    s = SQLiteStore(path, ThreadReactor())  # type: ignore[arg-type]
    s.open()
    # Queued before the store thread starts: they run as one batch, one COMMIT.
    first = s.enroll_host(host(1), now=1.0)
    broken = s.enroll_host(HostEnrollment("uuid-2", host(1).node_key_hash, "windows", "h", "s"), now=2.0)
    third = s.enroll_host(host(3), now=3.0)
    s.start()
    try:
        assert wait(first).hardware_uuid == "uuid-1"
        with pytest.raises(sqlite3.IntegrityError):  # same node key hash as host 1
            wait(broken)
        assert wait(third).hardware_uuid == "uuid-3"
    finally:
        s.stop()
    conn = sqlite3.connect(path)
    try:
        stored = sorted(r[0] for r in conn.execute("SELECT hardware_uuid FROM hosts"))
    finally:
        conn.close()
    assert stored == ["uuid-1", "uuid-3"]


def test_a_read_does_not_wait_for_a_write_in_progress(store: SQLiteStore) -> None:
    wait(store.enroll_host(host(1), now=1.0))
    release = threading.Event()

    def slow_write(conn: SQLConnection) -> None:
        conn.execute("UPDATE hosts SET last_seen = 2.0")
        assert release.wait(10), "never released"

    writing = store._run(slow_write)
    try:
        # Reads its own snapshot beside the open write transaction.
        found = wait(store.host_by_node_key(host(1).node_key_hash))
        assert found is not None and found.last_seen == 1.0
        assert not writing.called
    finally:
        release.set()
    wait(writing)
    found = wait(store.host_by_node_key(host(1).node_key_hash))
    assert found is not None and found.last_seen == 2.0


def test_schema_version_2_sessions_are_carried_over(tmp_path: Path) -> None:
    # A database as mdmd left it before schema 3: the session row held the
    # last reply (base64) and each large object's pieces inline.
    path = tmp_path / "mdmd.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    for migration in MIGRATIONS[:2]:
        for statement in migration:
            conn.execute(statement)
    conn.execute("PRAGMA user_version=2")
    h = host(1)
    conn.execute(
        "INSERT INTO hosts (id, hardware_uuid, node_key_hash, platform, hostname, hardware_serial, info,"
        " enrolled_at) VALUES (1, ?, ?, 'windows', 'h', 's', '{}', 1)",
        (h.hardware_uuid, h.node_key_hash),
    )
    conn.execute(
        "INSERT INTO devices (device_id, host_id, enrollment_type, context, state, enrolled_at)"
        " VALUES ('DEV1', 1, 'Full', '[]', 'enrolled', 1)"
    )
    conn.execute(
        "INSERT INTO certificates (serial, device_id, thumbprint, not_before, not_after, issued_at)"
        " VALUES ('aa', 'DEV1', 'T', 1, 2, 1)"
    )
    old_state = {
        "sid": "1",
        "last": 2,
        "out": 3,
        "max": 65536,
        "refs": {"1:4": ["u1", "Get", True]},
        "sent": ["u1"],
        "done": [],
        "req": "cd" * 32,
        "rep": base64.b64encode(b"<SyncML>reply</SyncML>").decode(),
        "end": False,
        "chunks": {"1:4:0": {"data": "h\u00e9llo", "size": 12, "format": "chr", "type": None}},
    }
    conn.execute(
        "INSERT INTO syncml_sessions (device_id, state, updated_at) VALUES ('DEV1', ?, 1)",
        (json.dumps(old_state),),
    )
    conn.close()

    s = SQLiteStore(str(path), ThreadReactor())  # type: ignore[arg-type]
    assert s.open() == 2
    s.start()
    try:
        ctx = wait(s.management_context("aa"))
        assert ctx is not None and ctx.session is not None
        session = ctx.session
        assert (session.session_id, session.last_msg_id, session.next_msg_id) == ("1", 2, 3)
        assert session.sent == {"u1"} and session.refs["1:4"].uuid == "u1"
        assert session.request_digest == "cd" * 32
        assert dict(session.objects) == {"1:4:0": LargeObject("u1", 6, 12, "chr", None)}
        assert wait(s.last_reply("DEV1")) == b"<SyncML>reply</SyncML>"
        # Schema 4 (renewal): an older certificate renewed nothing.
        assert ctx.certificate.renewed_from is None and ctx.certificate.activated_at is None
    finally:
        s.stop()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        pieces = conn.execute("SELECT object_key, data FROM large_object_chunks").fetchall()
    finally:
        conn.close()
    assert pieces == [("1:4:0", "h\u00e9llo")]


def _steps(conn: sqlite3.Connection, sql: str, args: tuple[object, ...]) -> int:
    """SQLite virtual-machine steps one query takes: a deterministic measure
    of the rows it touches (no timing)."""
    count = [0]

    def tick() -> int:
        count[0] += 1
        return 0

    conn.set_progress_handler(tick, 1)
    try:
        conn.execute(sql, args).fetchall()
    finally:
        conn.set_progress_handler(None, 1)
    return count[0]


def test_finding_a_devices_live_certificates_does_not_grow_with_its_history() -> None:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    migrate(conn)
    conn.execute(
        "INSERT INTO hosts (id, hardware_uuid, node_key_hash, platform, hostname, hardware_serial, info,"
        " enrolled_at) VALUES (1, 'u', x'00', 'windows', 'h', 's', '{}', 1)"
    )
    conn.execute(
        "INSERT INTO devices (device_id, host_id, enrollment_type, context, state, enrolled_at)"
        " VALUES ('DEV1', 1, 'Full', '[]', 'enrolled', 1)"
    )

    def certificate(n: int, revoked: bool) -> None:
        conn.execute(
            "INSERT INTO certificates (serial, device_id, thumbprint, not_before, not_after, issued_at,"
            " revoked_at, revoke_reason) VALUES (?, 'DEV1', ?, 0, 1, ?, ?, ?)",
            (f"s{n}", f"t{n}", n, n if revoked else None, "superseded" if revoked else None),
        )

    certificate(0, revoked=False)
    queries = [
        (_LIVE_SERIALS_OF_DEVICE_OR_HOST, ("DEV1", 1)),
        (_DEVICE_SELECT + " WHERE d.device_id = ?", ("DEV1",)),
    ]
    fresh = [_steps(conn, sql, args) for sql, args in queries]
    for n in range(1, 5001):
        certificate(n, revoked=True)
    assert [_steps(conn, sql, args) for sql, args in queries] == fresh
    # Without the partial index the same lookups walk the whole history.
    conn.execute("DROP INDEX certificates_live")
    assert all(
        _steps(conn, sql, args) > 100 * steps for (sql, args), steps in zip(queries, fresh, strict=True)
    )
