"""The SQLite store: schema, transactions, durability of acknowledged writes."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from twisted.internet.defer import Deferred

from harness import REPO
from mdmd.store import (
    SCHEMA_VERSION,
    AlertRecord,
    CommandResult,
    DeviceEnrollment,
    HostEnrollment,
    ManagementStep,
    SessionConflict,
    SQLiteStore,
    StoreError,
)

T = TypeVar("T")


class ThreadReactor:
    """Just enough reactor for the store outside a running reactor: results
    are delivered on the store thread and awaited with a bounded wait."""

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kw: Any) -> None:
        f(*args, **kw)


def wait(d: Deferred[T], timeout: float = 10.0) -> T:
    done = threading.Event()
    box: list[Any] = []
    d.addBoth(lambda r: (box.append(r), done.set()))
    assert done.wait(timeout), "store call did not complete"
    result = box[0]
    if hasattr(result, "raiseException"):
        result.raiseException()
    return result  # type: ignore[no-any-return]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    s = SQLiteStore(str(tmp_path / "mdmd.sqlite3"), ThreadReactor())  # type: ignore[arg-type]
    s.open()
    s.start()
    yield s
    s.stop()


def _host(n: int, key: bytes | None = None) -> HostEnrollment:
    return HostEnrollment(
        hardware_uuid=f"uuid-{n}",
        node_key_hash=hashlib.sha256(key or f"key-{n}".encode()).digest(),
        platform="windows",
        hostname=f"host{n}",
        hardware_serial=f"serial{n}",
        info={"n": n},
    )


def _enrollment(device_id: str, host_id: int, serial: str, hw: str | None = "hw") -> DeviceEnrollment:
    return DeviceEnrollment(
        device_id=device_id,
        host_id=host_id,
        hw_dev_id=hw,
        enrollment_type="Full",
        device_name="PC",
        os_version="10.0.19045.1",
        context=(("MAC", "a"), ("MAC", "b")),
        cert_serial=serial,
        cert_thumbprint=serial.upper() * 2,
        cert_not_before=1.0,
        cert_not_after=2.0,
    )


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


def test_host_reenrollment_keeps_the_host_and_replaces_the_key(store: SQLiteStore) -> None:
    first = wait(store.enroll_host(_host(1, b"old"), now=10.0))
    again = wait(store.enroll_host(_host(1, b"new"), now=20.0))
    assert again.id == first.id
    assert wait(store.host_by_node_key(hashlib.sha256(b"old").digest())) is None
    found = wait(store.host_by_node_key(hashlib.sha256(b"new").digest()))
    assert found is not None and found.id == first.id and found.enrolled_at == 10.0


def test_device_reenrollment_revokes_the_old_certificate(store: SQLiteStore) -> None:
    host = wait(store.enroll_host(_host(1), now=1.0))
    wait(store.record_device_enrollment(_enrollment("DEV1", host.id, "aa"), now=2.0))
    outcome = wait(store.record_device_enrollment(_enrollment("DEV1", host.id, "bb"), now=3.0))
    assert outcome.revoked_serials == ("aa",)
    old, new = wait(store.certificate("aa")), wait(store.certificate("bb"))
    assert old is not None and old.revoked_at == 3.0
    assert new is not None and new.revoked_at is None


def test_new_device_id_on_the_same_host_replaces_the_old_device(store: SQLiteStore) -> None:
    host = wait(store.enroll_host(_host(1), now=1.0))
    wait(store.record_device_enrollment(_enrollment("DEV1", host.id, "aa"), now=2.0))
    outcome = wait(store.record_device_enrollment(_enrollment("DEV2", host.id, "bb"), now=3.0))
    assert outcome.replaced_device_ids == ("DEV1",) and outcome.revoked_serials == ("aa",)
    old = wait(store.device("DEV1"))
    assert old is not None and old.state == "unenrolled"
    refreshed = wait(store.host_by_node_key(hashlib.sha256(b"key-1").digest()))
    assert refreshed is not None and refreshed.mdm_device_id == "DEV2"


def test_hw_dev_id_collision_is_flagged_not_merged(store: SQLiteStore) -> None:
    a = wait(store.enroll_host(_host(1), now=1.0))
    b = wait(store.enroll_host(_host(2), now=1.0))
    wait(store.record_device_enrollment(_enrollment("DEV-A", a.id, "aa", hw="CLONE"), now=2.0))
    outcome = wait(store.record_device_enrollment(_enrollment("DEV-B", b.id, "bb", hw="CLONE"), now=3.0))
    assert outcome.hw_dev_id_collisions == ("DEV-A",) and outcome.revoked_serials == ()
    first, second = wait(store.device("DEV-A")), wait(store.device("DEV-B"))
    assert first is not None and first.state == "enrolled" and first.hw_dev_id_collision
    assert second is not None and second.hw_dev_id_collision
    cert = wait(store.certificate("aa"))
    assert cert is not None and cert.revoked_at is None


def test_a_failed_transaction_changes_nothing(store: SQLiteStore) -> None:
    host = wait(store.enroll_host(_host(1), now=1.0))
    wait(store.record_device_enrollment(_enrollment("DEV1", host.id, "aa"), now=2.0))
    # Same serial again violates the primary key after the revocation step:
    # the whole transaction, revocation included, must roll back.
    with pytest.raises(sqlite3.IntegrityError):
        wait(store.record_device_enrollment(_enrollment("DEV1", host.id, "aa"), now=3.0))
    cert = wait(store.certificate("aa"))
    assert cert is not None and cert.revoked_at is None


def test_writes_survive_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "mdmd.sqlite3")
    s = SQLiteStore(path, ThreadReactor())  # type: ignore[arg-type]
    s.open()
    s.start()
    wait(s.enroll_host(_host(7), now=1.0))
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
    from mdmd.store import HostEnrollment, SQLiteStore

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


def _enrolled_with_command(store: SQLiteStore, device_id: str, n: int) -> str:
    host = wait(store.enroll_host(_host(n), now=1.0))
    wait(store.record_device_enrollment(_enrollment(device_id, host.id, f"serial{n}", hw=None), now=2.0))
    record = wait(store.queue_command(device_id, f"cmd-{device_id}", "Get", "<Get/>", now=3.0))
    assert record is not None and record.state == "pending"
    return record.uuid


def test_alerts_keep_the_latest_of_each_kind(store: SQLiteStore, tmp_path: Path) -> None:
    _enrolled_with_command(store, "DEV1", 1)
    alert = AlertRecord("1224", "com.microsoft/MDM/LoginStatus", "chr", None, "user")
    for now in (10.0, 20.0):
        wait(store.commit_management_step(ManagementStep("DEV1", session={"sid": "1"}, alerts=(alert,)), now))
    conn = sqlite3.connect(tmp_path / "mdmd.sqlite3")
    try:
        rows = conn.execute("SELECT code, data, received_at, count FROM device_alerts").fetchall()
    finally:
        conn.close()
    assert rows == [("1224", "user", 20.0, 2)]


def test_a_management_step_only_touches_its_own_devices_commands(store: SQLiteStore) -> None:
    mine = _enrolled_with_command(store, "DEV1", 1)
    theirs = _enrolled_with_command(store, "DEV2", 2)
    step = ManagementStep(
        "DEV1",
        session=None,
        answered=((mine, 200), (theirs, 200)),
        results=((theirs, CommandResult("results", "5", "Get", None, "./X", "chr", None, "forged")),),
    )
    wait(store.commit_management_step(step, now=5.0))
    own, other = wait(store.command(mine)), wait(store.command(theirs))
    assert own is not None and own.state == "acknowledged" and own.status == 200
    assert other is not None and other.state == "pending" and other.results == ()


def test_a_read_only_transaction_that_writes_is_rolled_back(store: SQLiteStore) -> None:
    def sneaky(conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT INTO hosts (hardware_uuid, node_key_hash, platform, hostname, hardware_serial,"
            " info, enrolled_at) VALUES ('x', x'00', 'windows', 'h', 's', '{}', 0)"
        )

    with pytest.raises(StoreError, match="read-only"):
        wait(store._run(sneaky, write=False))
    assert wait(store.host_by_node_key(b"\x00")) is None


def test_lookups_by_node_key_write_only_when_recording_last_seen(store: SQLiteStore) -> None:
    host = wait(store.enroll_host(_host(1), now=1.0))
    key = hashlib.sha256(b"key-1").digest()
    seen = wait(store.host_by_node_key(key))
    assert seen is not None and seen.last_seen == 1.0
    seen = wait(store.host_by_node_key(key, seen_at=9.0))
    assert seen is not None and seen.id == host.id and seen.last_seen == 9.0


def test_group_commit_isolates_a_failing_job_from_its_batch(tmp_path: Path) -> None:
    path = str(tmp_path / "mdmd.sqlite3")
    s = SQLiteStore(path, ThreadReactor())  # type: ignore[arg-type]
    s.open()
    # Queued before the store thread starts: they run as one batch, one COMMIT.
    first = s.enroll_host(_host(1), now=1.0)
    broken = s.enroll_host(HostEnrollment("uuid-2", _host(1).node_key_hash, "windows", "h", "s"), now=2.0)
    third = s.enroll_host(_host(3), now=3.0)
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


def test_a_session_step_read_before_another_commits_is_refused_and_changes_nothing(
    store: SQLiteStore,
) -> None:
    # Two worker processes read the same session, each processes a message;
    # only the first step may commit (compare-and-swap on session_seq).
    uuid = _enrolled_with_command(store, "DEV1", 1)
    ctx = wait(store.management_context("serial1"))
    assert ctx is not None
    first = ManagementStep("DEV1", session={"out": 2}, sent=((uuid, "1", 1),))
    second = ManagementStep("DEV1", session={"out": 9}, answered=((uuid, 500),), inventory={"./X": "y"})
    wait(store.commit_management_step(first, now=5.0, expected_seq=ctx.session_seq))
    with pytest.raises(SessionConflict):
        wait(store.commit_management_step(second, now=6.0, expected_seq=ctx.session_seq))
    after = wait(store.management_context("serial1"))
    assert after is not None
    assert after.session == {"out": 2} and after.session_seq == ctx.session_seq + 1
    assert after.device.inventory == {} and after.device.last_seen == 5.0
    command = wait(store.command(uuid))
    assert command is not None and command.state == "sent" and command.status is None
    # Read again, the step commits.
    wait(store.commit_management_step(second, now=6.0, expected_seq=after.session_seq))
    command = wait(store.command(uuid))
    assert command is not None and command.state == "failed" and command.status == 500


def test_re_enrollment_invalidates_a_session_step_read_before_it(store: SQLiteStore) -> None:
    _enrolled_with_command(store, "DEV1", 1)
    ctx = wait(store.management_context("serial1"))
    assert ctx is not None
    host = wait(store.enroll_host(_host(1), now=7.0))
    wait(store.record_device_enrollment(_enrollment("DEV1", host.id, "serial1b", hw=None), now=8.0))
    with pytest.raises(SessionConflict):
        step = ManagementStep("DEV1", session={"out": 2})
        wait(store.commit_management_step(step, 9.0, expected_seq=ctx.session_seq))
    fresh = wait(store.management_context("serial1b"))
    assert fresh is not None and fresh.session is None


def test_a_read_does_not_wait_for_a_write_in_progress(store: SQLiteStore) -> None:
    wait(store.enroll_host(_host(1), now=1.0))
    release = threading.Event()

    def slow_write(conn: sqlite3.Connection) -> None:
        conn.execute("UPDATE hosts SET last_seen = 2.0")
        assert release.wait(10), "never released"

    writing = store._run(slow_write)
    try:
        # Reads its own snapshot beside the open write transaction.
        host = wait(store.host_by_node_key(_host(1).node_key_hash))
        assert host is not None and host.last_seen == 1.0
        assert not writing.called
    finally:
        release.set()
    wait(writing)
    host = wait(store.host_by_node_key(_host(1).node_key_hash))
    assert host is not None and host.last_seen == 2.0
