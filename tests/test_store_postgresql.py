"""What is particular to the PostgreSQL store: its schema matches
SQLite's, migrations run once when nodes start together, write
transactions that lose a race are run again, reads cannot write, the
database's absence and refusals are StoreUnavailable, connections the
server dropped are replaced, and nothing acknowledged is lost when a
process is killed.  (The behaviours both backends share are in
test_store_contract.py.)"""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pg_cluster import PASSWORD_ROLE, Cluster, cluster_or_skip

from mdmd.store import StoreError
from mdmd.store.engine import SQLConnection
from mdmd.store.postgresql import PostgreSQLStore, StoreUnavailable, qmark_to_format
from mdmd.store.postgresql_schema import SCHEMA_VERSION
from mdmd.store.sqlite import migrate as migrate_sqlite
from store_helpers import ThreadReactor, host, postgresql_dsn, wait

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster() -> Cluster:
    return cluster_or_skip()


@pytest.fixture
def dsn(cluster: Cluster, tmp_path: Path) -> str:
    return postgresql_dsn(tmp_path)


def _open(dsn: str, **kw: Any) -> PostgreSQLStore:
    return PostgreSQLStore(dsn, ThreadReactor(), **kw)  # type: ignore[arg-type]


@pytest.fixture
def store(dsn: str) -> Iterator[PostgreSQLStore]:
    s = _open(dsn, pool_size=2)
    s.open()
    s.start()
    yield s
    s.stop()


def _rows(dsn: str, sql: str, *args: object) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(sql, args or None).fetchall()


def test_the_schema_has_sqlites_tables_columns_and_indexes(dsn: str, tmp_path: Path) -> None:
    # The stores share their SQL, and `mdmctl store copy` moves rows
    # column by column: the two schemas must not drift apart.
    s = _open(dsn)
    assert s.open() == 0
    s.stop()
    conn = sqlite3.connect(tmp_path / "mdmd.sqlite3")
    migrate_sqlite(conn)
    tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    sqlite_columns = {
        table: [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
        for table in tables
        if table != "sqlite_sequence"
    }
    sqlite_indexes = {
        r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")
    }
    conn.close()
    pg_columns: dict[str, list[str]] = {}
    for table, column in _rows(
        dsn,
        "SELECT table_name, column_name FROM information_schema.columns"
        " WHERE table_schema = current_schema() AND table_name <> 'mdmd_schema'"
        " ORDER BY table_name, ordinal_position",
    ):
        # SQLite's implicit rowid is a column of its own where the shared
        # SQL sorts by it (device_actions).
        if column != "rowid":
            pg_columns.setdefault(table, []).append(column)
    assert pg_columns == sqlite_columns
    pg_indexes = {
        r[0]
        for r in _rows(
            dsn,
            "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()"
            " AND indexname NOT LIKE '%%_pkey' AND indexname NOT LIKE '%%_key'",
        )
    }
    assert pg_indexes == sqlite_indexes
    assert _rows(dsn, "SELECT version FROM mdmd_schema") == [(SCHEMA_VERSION,)]
    again = _open(dsn)
    assert again.open() == SCHEMA_VERSION
    again.stop()


def test_a_newer_schema_is_refused(dsn: str) -> None:
    s = _open(dsn)
    s.open()
    s.stop()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE mdmd_schema SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(StoreError, match="newer"):
        _open(dsn).open()


def test_a_worker_process_refuses_a_database_not_migrated(dsn: str) -> None:
    with pytest.raises(StoreError, match=f"schema version 0, expected {SCHEMA_VERSION}"):
        _open(dsn).open(check=False)


def test_nodes_starting_together_migrate_once(dsn: str) -> None:
    found: list[int] = []
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def node() -> None:
        try:
            s = _open(dsn)
            start.wait()
            found.append(s.open())
            s.stop()
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=node) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    # One found an empty database and migrated it; the others waited on
    # the advisory lock and found it done.
    assert sorted(found) == [0] + [SCHEMA_VERSION] * 5
    assert _rows(dsn, "SELECT version FROM mdmd_schema") == [(SCHEMA_VERSION,)]


def test_a_read_that_writes_fails_and_writes_nothing(store: PostgreSQLStore) -> None:
    def sneaky(conn: SQLConnection) -> None:
        conn.execute(
            "INSERT INTO hosts (hardware_uuid, node_key_hash, platform, hostname, hardware_serial,"
            " info, enrolled_at) VALUES ('x', ?, 'windows', 'h', 's', '{}', 0)",
            (b"\x00",),
        )

    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        wait(store._run(sneaky, write=False))
    assert wait(store.host_by_node_key(b"\x00")) is None


def test_a_write_that_loses_a_race_is_run_again_from_the_start(store: PostgreSQLStore, dsn: str) -> None:
    h = wait(store.enroll_host(host(1), now=1.0))
    read = threading.Event()
    attempts: list[float] = []

    def bump(conn: SQLConnection) -> float:
        seen = float(conn.execute("SELECT last_seen FROM hosts WHERE id = ?", (h.id,)).fetchone()[0])
        attempts.append(seen)
        if len(attempts) == 1:
            read.set()
            # Another node changes the row now, between our read and write.
            time.sleep(0.2)
        conn.execute("UPDATE hosts SET last_seen = ? WHERE id = ?", (seen + 1, h.id))
        return seen + 1

    running = store._run(bump)
    assert read.wait(10)
    with psycopg.connect(dsn, autocommit=True) as other:
        other.execute("UPDATE hosts SET last_seen = 100 WHERE id = %s", (h.id,))
    # The first run saw 1.0 and could not commit 2.0 over the other node's
    # 100: it was run again, saw 100, and committed 101.
    assert wait(running) == 101.0
    assert attempts == [1.0, 100.0]
    assert _rows(dsn, "SELECT last_seen FROM hosts WHERE id = %s", h.id) == [(101.0,)]


def test_connections_the_server_dropped_are_replaced_without_failing_a_request(
    store: PostgreSQLStore, cluster: Cluster
) -> None:
    wait(store.enroll_host(host(1), now=1.0))
    # Warm the pool, then drop every one of its connections (a server
    # restart, an idle timeout, a failover).
    for _ in range(4):
        assert wait(store.host_by_node_key(hashlib.sha256(b"key-1").digest())) is not None
    dropped = cluster.sql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE application_name = 'mdmd' AND pid <> pg_backend_pid()",
        "mdmd_tests",
    )
    assert dropped
    assert wait(store.host_by_node_key(hashlib.sha256(b"key-1").digest(), seen_at=5.0)) is not None
    found = wait(store.host_by_node_key(hashlib.sha256(b"key-1").digest()))
    assert found is not None and found.last_seen == 5.0


def test_an_unreachable_database_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable, match="connection"):
        _open(f"host={tmp_path} dbname=mdmd user=mdmd").open()


def test_the_password_is_used_and_a_wrong_one_is_unavailable(cluster: Cluster, dsn: str) -> None:
    as_role = dsn.replace("user=postgres", f"user={PASSWORD_ROLE}")
    with pytest.raises(StoreUnavailable, match="password authentication failed"):
        _open(as_role, password="wrong").open()
    with pytest.raises(StoreUnavailable, match="password"):
        _open(as_role).open()
    s = _open(as_role, password="correct horse")
    assert s.open() == 0
    s.start()
    try:
        assert wait(s.enroll_host(host(1), now=1.0)).hardware_uuid == "uuid-1"
    finally:
        s.stop()


def test_question_marks_become_parameters_outside_quotes_only() -> None:
    assert qmark_to_format("SELECT ? WHERE a = '?' AND b LIKE 'x%' AND c = ?") == (
        "SELECT %s WHERE a = '?' AND b LIKE 'x%%' AND c = %s"
    )
    assert qmark_to_format('SELECT "odd?name" FROM t WHERE x % 2 = ?') == (
        'SELECT "odd?name" FROM t WHERE x %% 2 = %s'
    )


_WRITER = textwrap.dedent(
    """
    import hashlib, sys
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred
    from mdmd.store import HostEnrollment
    from mdmd.store.postgresql import PostgreSQLStore

    store = PostgreSQLStore(sys.argv[1], reactor, pool_size=4)
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
            n += 8

    for lane in range(8):
        Deferred.fromCoroutine(writer(lane))
    reactor.run()
    """
)


def test_sigkill_during_a_stream_of_writes_loses_nothing_acknowledged(dsn: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, dsn],
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
    # Killed in the middle of the stream: transactions are in flight.
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(acked) >= 400, "writer did not acknowledge enough writes"
    stored = {row[0] for row in _rows(dsn, "SELECT hardware_uuid FROM hosts")}
    assert [n for n in acked if f"uuid-{n}" not in stored] == []


def test_a_daemon_answers_503_while_the_database_is_down_and_serves_again_once_it_is_back(
    tmp_path: Path, cluster: Cluster
) -> None:
    from harness import running_daemon
    from mdmd import pki
    from mdmd.sim.device import ManagementClient, WindowsDevice
    from omadm_helpers import enroll, post, run_session

    # A cluster of its own, to stop and start.
    own = Cluster.start(cluster.bindir)
    try:
        store = {"backend": "postgresql", "dsn": own.dsn(own.create_database()), "pool_size": "2"}
        (tmp_path / "d").mkdir()
        with running_daemon(tmp_path / "d", {"store": store}) as daemon:
            enrolled = enroll(daemon, WindowsDevice(key=pki.generate_rsa_key()), tmp_path)
            client = ManagementClient(enrolled.device)
            run_session(daemon, enrolled, client)
            own.pause()
            status, body = post(daemon, enrolled, client.session_start(enrolled.enrollment.management_url))
            assert status == 503 and b"try again later" in body
            code, _ = daemon.post_json("/api/fleet/orbit/config", enrolled.device.orbit_config_request())
            assert code == 503
            own.resume()
            # The same process, no restart: once the pool has connected
            # again (a moment; Windows would retry on its schedule), it
            # serves.
            deadline = time.monotonic() + 30
            while True:
                status, body = post(
                    daemon, enrolled, client.session_start(enrolled.enrollment.management_url)
                )
                if status == 200:
                    break
                assert status == 503 and time.monotonic() < deadline
                time.sleep(0.2)
            assert [m.commands for m in run_session(daemon, enrolled, client)] == [[]]
            lines = daemon.log_text().splitlines()
            assert len([line for line in lines if "store unavailable, answered 503" in line]) >= 2
            assert not [line for line in lines if "Traceback" in line or "[stderr#" in line]
            assert len([line for line in lines if "PostgreSQL connection pool" in line]) <= 4
    finally:
        own.stop()


@pytest.mark.parametrize("search", ["desktop-0", "0A", "sn3", "1AAB-U", "pc-2", "nothing-like-this"])
def test_a_search_with_many_candidates_tests_each_row_and_lists_the_same(
    dsn: str, search: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The reference fleet is small, so a search reads its candidates; with
    # no candidate limit each row along the sort order is tested instead.
    from mdmd.store import DeviceQuery, postgresql_devices
    from store_helpers import build_list_fleet, expected_devices, read_all_pages

    s = _open(dsn, pool_size=2)
    s.open()
    s.start()
    try:
        fleet = build_list_fleet(s)
        for query in (
            DeviceQuery(search=search),
            DeviceQuery(search=search, sort="last_seen", descending=True),
        ):
            expected = expected_devices(s, fleet, query)
            monkeypatch.setattr(postgresql_devices, "SEARCH_CANDIDATE_LIMIT", -1)
            walked = read_all_pages(s, query, 3)
            monkeypatch.setattr(postgresql_devices, "SEARCH_CANDIDATE_LIMIT", 10_000)
            assert walked == read_all_pages(s, query, 3) == expected
    finally:
        s.stop()
