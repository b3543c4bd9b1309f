"""The SQLite backend: its file, schema and migrations, group commit,
its reader beside the writer, and durability of acknowledged writes under
kill -9.  Behaviour every backend shares is in test_store_contract.py."""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import re
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from test_store_contract import LIST_QUERIES

from harness import REPO
from mdmd.management import LargeObject, ManagementStep
from mdmd.profiles import Profile, ProfileItem, profile_version
from mdmd.store import (
    DeviceQuery,
    HostEnrollment,
    LoggedMessage,
    MessageLogWrite,
    StoreError,
    sqlite_devices,
)
from mdmd.store import sqlite as sqlite_module
from mdmd.store.engine import SQLConnection, TransactionEngine
from mdmd.store.sqlite import _DEVICE_SELECT, _LIVE_SERIALS_OF_DEVICE_OR_HOST, SQLiteStore, migrate
from mdmd.store.sqlite_schema import MIGRATIONS, SCHEMA_VERSION
from store_helpers import (
    ListFleet,
    ThreadReactor,
    build_list_fleet,
    enrollment,
    expected_devices,
    host,
    read_all_pages,
    wait,
)


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


# --- the device list on indexes ---


@pytest.fixture(scope="module")
def listed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SQLiteStore, ListFleet]]:
    path = tmp_path_factory.mktemp("list") / "mdmd.sqlite3"
    s = SQLiteStore(str(path), ThreadReactor())  # type: ignore[arg-type]
    s.open()
    s.start()
    try:
        yield s, build_list_fleet(s)
    finally:
        s.stop()


@pytest.mark.parametrize("query", LIST_QUERIES, ids=repr)
def test_walking_the_sort_index_lists_what_reading_candidates_does(
    listed: tuple[SQLiteStore, ListFleet], query: DeviceQuery, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The contract suite's fleet is small, so filters are read by their
    # candidates; with no candidate limit every page walks the sort index.
    store, fleet = listed
    monkeypatch.setattr(sqlite_devices, "CANDIDATE_LIMIT", -1)
    monkeypatch.setattr(sqlite_devices, "SEARCH_CANDIDATE_LIMIT", -1)
    expected = expected_devices(store, fleet, query)
    for limit in (1, 3, 100):
        assert read_all_pages(store, query, limit) == expected, limit


def _plan(conn: sqlite3.Connection, sql: str, params: Sequence[object]) -> list[str]:
    return [str(row[3]) for row in conn.execute("EXPLAIN QUERY PLAN " + sql, params)]


@pytest.mark.parametrize("candidate_limit", [-1, 5000])
def test_every_device_list_query_runs_on_indexes(
    listed: tuple[SQLiteStore, ListFleet], candidate_limit: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, _ = listed
    monkeypatch.setattr(sqlite_devices, "CANDIDATE_LIMIT", candidate_limit)
    monkeypatch.setattr(sqlite_devices, "SEARCH_CANDIDATE_LIMIT", candidate_limit)
    conn = sqlite3.connect(store.path)
    try:
        for query in LIST_QUERIES:
            for after in (None, (10.0, "0Adevice")):
                sql, params = sqlite_devices.page_sql(conn, query, 100, after)
                plan = _plan(conn, sql, params)
                # No table is read whole: every scan walks an index, every
                # search uses one (or the rowid).
                tables = [
                    line for line in plan if line.startswith(("SCAN", "SEARCH")) and "subquery" not in line
                ]
                assert tables and all("USING" in line for line in tables), (query, after, plan)
                if candidate_limit < 0 and after is None:
                    # Walking the sort order's index: nothing to sort.
                    assert not any("TEMP B-TREE" in line for line in plan), (query, plan)
    finally:
        conn.close()


def test_a_bulk_read_does_not_delay_a_devices_read(store: SQLiteStore) -> None:
    wait(store.enroll_host(host(1), now=1.0))
    release = threading.Event()

    def long_listing(conn: SQLConnection) -> None:
        assert release.wait(10), "never released"

    listing = store._run(long_listing, write=False, bulk=True)
    try:
        assert wait(store.host_by_node_key(host(1).node_key_hash)) is not None
        assert not listing.called
    finally:
        release.set()
    wait(listing)


def test_the_admin_reads_that_count_a_group_are_not_queued_with_the_devices_reads(store: SQLiteStore) -> None:
    """A group's member count and a profile's status walk indexes as large
    as the fleet (seconds at a million devices): they run beside the
    devices' reads, so a check-in's read never waits behind them (and they
    answer while the devices' reader is busy)."""
    wait(store.enroll_host(host(1), now=1.0))
    wait(store.record_device_enrollment(enrollment("DEV1", 1, "s1"), now=2.0))
    items = (ProfileItem("Replace", "./Device/Vendor/MSFT/Policy/Config/A/B", "int", None, "1"),)
    wait(store.create_profile(Profile("p1", profile_version(items), items), 3.0))
    wait(store.assign_profile("p1", ["all"], 3.0))
    release = threading.Event()

    def devices_read(conn: SQLConnection) -> None:
        assert release.wait(10), "never released"

    busy = store._run(devices_read, write=False)
    try:
        assert wait(store.profile_status("p1")) == {"pending": 1}
        (everyone, *_) = wait(store.groups())
        assert everyone.name == "all" and everyone.members == 1
        found = wait(store.group("all"))
        assert found is not None and found.members == 1
        assert not busy.called
    finally:
        release.set()
    wait(busy)


def test_a_count_of_the_fleet_does_not_delay_a_page_of_the_device_list(store: SQLiteStore) -> None:
    wait(store.enroll_host(host(1), now=1.0))
    release = threading.Event()

    def long_count(conn: SQLConnection) -> None:
        assert release.wait(10), "never released"

    counting = store._run(long_count, write=False, lane="counts")
    try:
        page = wait(store.device_page(DeviceQuery(), limit=10))
        assert page.devices == () and not counting.called
    finally:
        release.set()
    wait(counting)


def test_the_message_log_keeps_bodies_compressed(store: SQLiteStore, tmp_path: Path) -> None:
    wait(store.enroll_host(host(1), now=1.0))
    wait(store.record_device_enrollment(enrollment("DEV1", 1, "s1"), now=2.0))
    body = b"<SyncML>" + b"<Status><CmdID>1</CmdID><Data>200</Data></Status>" * 200 + b"</SyncML>"
    messages = MessageLogWrite((LoggedMessage("in", 3.0, "1", 1, len(body), body),), 50)
    wait(store.commit_management_step(ManagementStep("DEV1", None), 3.0, messages=messages))
    conn = sqlite3.connect(f"file:{tmp_path / 'mdmd.sqlite3'}?mode=ro", uri=True)
    try:
        ((stored,),) = conn.execute("SELECT length(body) FROM device_messages").fetchall()
    finally:
        conn.close()
    assert stored < len(body) / 10
    assert wait(store.device_messages("DEV1"))[0].body == body


def _old_database(path: Path, version: int) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    for migration in MIGRATIONS[:version]:
        for statement in migration:
            conn.execute(statement)
    conn.execute(f"PRAGMA user_version={version}")
    h = host(1)
    conn.execute(
        "INSERT INTO hosts (id, hardware_uuid, node_key_hash, platform, hostname, hardware_serial, info,"
        " enrolled_at) VALUES (1, ?, ?, 'windows', 'h', 's', '{}', 1)",
        (h.hardware_uuid, h.node_key_hash),
    )
    conn.close()


def test_a_backup_is_written_before_a_migration(tmp_path: Path) -> None:
    path = tmp_path / "mdmd.sqlite3"
    _old_database(path, SCHEMA_VERSION - 1)
    told: list[tuple[int, str]] = []
    s = SQLiteStore(str(path), ThreadReactor())  # type: ignore[arg-type]
    assert s.open(before_migration=lambda version, copy: told.append((version, copy))) == SCHEMA_VERSION - 1
    s.stop()
    (copy,) = tmp_path.glob(f"mdmd.sqlite3.v{SCHEMA_VERSION - 1}-backup-*")
    assert told == [(SCHEMA_VERSION - 1, str(copy))] and s.migration_backup == str(copy)
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    conn = sqlite3.connect(copy)
    try:
        # The copy is the database as it was: the old version, the old rows.
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION - 1
        assert conn.execute("SELECT hardware_uuid FROM hosts").fetchall() == [("uuid-1",)]
    finally:
        conn.close()
    # Up to date now: no second copy.
    s = SQLiteStore(str(path), ThreadReactor())  # type: ignore[arg-type]
    s.open()
    s.stop()
    assert len(list(tmp_path.glob("mdmd.sqlite3.v*"))) == 1


def test_a_migration_without_room_for_its_backup_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "mdmd.sqlite3"
    _old_database(path, SCHEMA_VERSION - 1)

    def disk_full(source: sqlite3.Connection, copy: str) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(sqlite_module, "backup_database", disk_full)
    s = SQLiteStore(str(path), ThreadReactor())  # type: ignore[arg-type]
    with pytest.raises(StoreError, match=r"cannot write a backup .*No space left.* nothing was changed"):
        s.open()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION - 1
    finally:
        conn.close()


def test_a_new_database_needs_no_backup(tmp_path: Path) -> None:
    s = SQLiteStore(str(tmp_path / "mdmd.sqlite3"), ThreadReactor())  # type: ignore[arg-type]
    s.open()
    s.stop()
    assert s.migration_backup is None and not list(tmp_path.glob("*backup*"))


def _fill(path: Path, count: int) -> None:
    """*count* enrolled devices with their hosts and certificates, inserted
    directly: the fleet the next test's requests must not walk."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO hosts (id, hardware_uuid, node_key_hash, platform, hostname, hardware_serial, info,"
            " enrolled_at) VALUES (?, ?, ?, 'windows', ?, ?, '{}', 1)",
            [
                (1000 + i, f"fill-{i}", hashlib.sha256(b"fill%d" % i).digest(), f"FILL-{i}", f"FS{i}")
                for i in range(count)
            ],
        )
        conn.execute(
            "INSERT INTO devices (device_id, host_id, hw_dev_id, enrollment_type, context, state,"
            " enrolled_at) SELECT 'FILL' || id, id, 'hw' || id, 'Full', '[]', 'enrolled', 1"
            " FROM hosts WHERE id >= 1000"
        )
        conn.execute(
            "INSERT INTO certificates (serial, device_id, thumbprint, not_before, not_after, issued_at)"
            " SELECT 'f' || host_id, device_id, 'T' || host_id, 1, 9e9, 1 FROM devices WHERE host_id >= 1000"
        )
        conn.execute("COMMIT")
    finally:
        conn.close()


def _work_of_device_requests(path: Path, fleet: int) -> tuple[int, list[str]]:
    """SQLite VM steps (in hundreds) of what devices, agents and the admin
    API's single-device calls ask of a store holding *fleet* other devices,
    and the statements run."""
    s = SQLiteStore(str(path), ThreadReactor())  # type: ignore[arg-type]
    s.open()
    _fill(path, fleet)
    engine = s._engine
    assert isinstance(engine, TransactionEngine)
    steps: list[int] = []
    statements: list[str] = []

    def count() -> int:
        steps.append(1)
        return 0  # go on

    for conn in (engine._writer, *engine._readers.values()):
        assert conn is not None
        conn.set_trace_callback(statements.append)
        conn.set_progress_handler(count, 100)
    s.start()
    try:
        a = wait(s.enroll_host(host(1), now=1.0))
        b = wait(s.enroll_host(host(2), now=1.0))
        wait(s.host_by_node_key(host(1).node_key_hash, seen_at=2.0))
        wait(s.record_device_enrollment(enrollment("DEV1", a.id, "s1", hw="clone"), now=2.0))
        wait(s.record_device_enrollment(enrollment("DEV2", b.id, "s2", hw="clone"), now=2.0))
        wait(s.record_device_enrollment(enrollment("DEV3", b.id, "s3", hw="other"), now=3.0))
        assert wait(s.queue_command("dev1", "u1", "Get", "<Get/>", now=4.0)) is not None
        context = wait(s.management_context("s1"))
        assert context is not None
        wait(s.management_context("s1", request_digest="ab" * 32))
        wait(s.profile_context("DEV1"))
        step = ManagementStep(
            "DEV1",
            session=None,
            sent=(("u1", "1", 1),),
            answered=(("u1", 200),),
            inventory={"./DevInfo/Mod": "VM"},
        )
        wait(s.commit_management_step(step, now=5.0, expected_seq=context.session_seq))
        for device_id in ("dev1", "DEV1"):
            wait(s.device(device_id))
        wait(s.device_commands("DEV1"))
        wait(s.device_certificates("DEV1"))
        wait(s.command("u1"))
        wait(s.last_reply("DEV1"))
        wait(s.device_alerts("DEV1"))
        assert wait(s.request_unenrollment("dev3")) is True
        wait(s.certificate("s1"))
        wait(s.host_by_node_key(host(2).node_key_hash))
    finally:
        s.stop()
    return len(steps), statements


def test_what_devices_and_agents_ask_does_not_grow_with_the_fleet(tmp_path: Path) -> None:
    # The planner has no statistics: an index on a column with few values
    # (state, say) looks as selective as a device's own and can lure a
    # query into walking every enrolled device.  The same requests must cost
    # the same against 50 and 3,000 other devices.
    (tmp_path / "small").mkdir()
    (tmp_path / "large").mkdir()
    small, statements = _work_of_device_requests(tmp_path / "small" / "mdmd.sqlite3", 50)
    large, _ = _work_of_device_requests(tmp_path / "large" / "mdmd.sqlite3", 3000)
    assert large < small * 1.5, (small, large)
    # And none of their statements reads a fleet table whole.
    conn = sqlite3.connect(tmp_path / "large" / "mdmd.sqlite3")
    try:
        checked = 0
        for sql in dict.fromkeys(statements):
            if not sql.lstrip().upper().startswith(("SELECT", "UPDATE", "DELETE", "INSERT")):
                continue
            checked += 1
            for line in (str(row[3]) for row in conn.execute("EXPLAIN QUERY PLAN " + sql)):
                assert not re.match(r"SCAN (\w+ )?(devices|hosts|certificates|commands|d|h|c)\b", line), sql
    finally:
        conn.close()
    assert checked >= 20


def test_schema_version_6_devices_and_commands_carry_over_to_actions(tmp_path: Path) -> None:
    """Migration 7 adds columns and tables beside the data: enrolled
    devices keep their state (no lifecycle), queued commands stay queued
    (no operation), and the new partial indexes are the ones queries use."""
    path = tmp_path / "mdmd.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    for migration in MIGRATIONS[:6]:
        for statement in migration:
            conn.execute(statement)
    conn.execute("PRAGMA user_version=6")
    conn.execute(
        "INSERT INTO devices (device_id, enrollment_type, context, state, enrolled_at)"
        " VALUES ('DEV1', 'Full', '[]', 'enrolled', 1)"
    )
    conn.execute(
        "INSERT INTO commands (uuid, device_id, verb, body, state, created_at)"
        " VALUES ('c1', 'DEV1', 'Get', '<Get/>', 'pending', 1)"
    )
    conn.close()
    s = SQLiteStore(str(path), ThreadReactor())  # type: ignore[arg-type]
    assert s.open() == 6
    s.start()
    try:
        device = wait(s.device("DEV1"))
        assert device is not None and (device.state, device.lifecycle, device.pending_actions) == (
            "enrolled",
            None,
            (),
        )
        command = wait(s.command("c1"))
        assert command is not None and (command.state, command.operation_id, command.detail) == (
            "pending",
            None,
            None,
        )
    finally:
        s.stop()
    conn = sqlite3.connect(path)
    plan = " ".join(
        str(r[3])
        for r in conn.execute(
            # The device list's query: the open actions of the whole fleet.
            "EXPLAIN QUERY PLAN SELECT device_id, action FROM device_actions"
            " WHERE state IN ('pending', 'sent', 'awaiting_restart')"
        )
    )
    conn.close()
    assert "device_actions_open" in plan
