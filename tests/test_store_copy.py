"""``mdmctl store copy``: a fleet enrolled and managed on SQLite is copied
into PostgreSQL, every table row for row, and the same devices go on
checking in, with the same certificates, without enrolling again."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pg_cluster import Cluster, cluster_or_skip

from harness import edit_ini, running_daemon, start_daemon
from mdmd import mdmctl, pki
from mdmd.management import ManagementStep, SessionState
from mdmd.sim.device import ManagementClient, WindowsDevice
from mdmd.store import ConsoleSessionRecord
from mdmd.store.sqlite import SQLiteStore
from omadm_helpers import enroll, post, queue, run_session
from store_helpers import ThreadReactor, enrollment, host, wait

CAMERA = "./Device/Vendor/MSFT/Policy/Config/Camera/AllowCamera"


@pytest.fixture(scope="module")
def cluster() -> Cluster:
    return cluster_or_skip()


@pytest.fixture(scope="module")
def keys() -> list[object]:
    return [pki.generate_rsa_key() for _ in range(3)]


def copy(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = mdmctl.main(["store", "copy", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _normal(value: Any) -> Any:
    return bytes(value) if isinstance(value, memoryview) else value


def every_row(sqlite_path: Path, dsn: str) -> Iterator[tuple[str, list[Any], list[Any]]]:
    """Each table's rows in SQLite and in PostgreSQL, sorted alike."""
    source = sqlite3.connect(sqlite_path)
    tables = [
        r[0]
        for r in source.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        )
    ]
    with psycopg.connect(dsn) as target:
        for table in tables:
            columns = [r[1] for r in source.execute(f"PRAGMA table_info({table})")]
            listed = ", ".join(columns)
            select = f"SELECT {listed} FROM {table}"
            mine = sorted((tuple(map(_normal, r)) for r in source.execute(select)), key=repr)
            theirs = sorted((tuple(map(_normal, r)) for r in target.execute(select)), key=repr)
            yield table, mine, theirs
    source.close()


def test_a_fleet_copied_from_sqlite_goes_on_checking_in_on_postgresql(
    tmp_path: Path, keys: list[object], cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "d").mkdir()
    with running_daemon(tmp_path / "d") as old:
        config = old.config
        state = old.state
        managed = enroll(old, WindowsDevice(key=keys[0], hostname="MOVED-1"), tmp_path)  # type: ignore[arg-type]
        paused = enroll(old, WindowsDevice(key=keys[1], hostname="MOVED-2"), tmp_path)  # type: ignore[arg-type]
        client = ManagementClient(managed.device)
        # Commands and results, a profile verified through a group.
        queue(old, managed.id, {"verb": "Get", "items": [{"target": "./DevDetail/SwV"}]})
        old.admin("POST", "/api/v1/groups", {"name": "moved"})
        old.admin("POST", "/api/v1/groups/moved/devices", {"add": [managed.id, paused.id]})
        items = [{"verb": "Replace", "target": CAMERA, "format": "int", "data": "0"}]
        old.admin("POST", "/api/v1/profiles", {"name": "moved", "items": items})
        old.admin("PUT", "/api/v1/profiles/moved/groups", {"groups": ["moved"]})
        run_session(old, managed, client)
        assert client.nodes[CAMERA] == ("int", "0")
        # A session under way when mdmd stops: the device has the reply to
        # its first message (the profile's Atomic) and has not answered.
        paused_client = ManagementClient(paused.device)
        status, body = post(old, paused, paused_client.session_start(paused.enrollment.management_url))
        assert status == 200
        paused_reply = paused_client.read(body)
        pending = queue(
            old, paused.id, {"verb": "Exec", "items": [{"target": "./Vendor/MSFT/Reboot/RebootNow"}]}
        )
        # A device action, a group operation (to a group with no members),
        # a named admin token and what the audit log says of them, and the
        # readiness check's row.
        status, _ = old.admin("POST", f"/api/v1/devices/{managed.id}/actions", {"action": "restart"})
        assert status == 201, _
        old.admin("POST", "/api/v1/groups", {"name": "nobody"})
        status, _ = old.admin("POST", "/api/v1/groups/nobody/actions", {"action": "defender_update"})
        assert status == 202, _
        status, _ = old.admin("POST", "/api/v1/tokens", {"name": "ops"})
        assert status == 201, _
        response, _ = old.request("GET", "/readyz", section="admin")
        assert response.status == 200
    # Pieces of a large object in flight (the emulator does not upload in
    # pieces): written through the store, as the daemon would.
    store = SQLiteStore(str(state / "mdmd.sqlite3"), ThreadReactor())  # type: ignore[arg-type]
    store.open()
    store.start()
    h = wait(store.enroll_host(host(99), now=1.0))
    wait(store.record_device_enrollment(enrollment("CHUNKY", h.id, "chunky-serial", hw=None), now=2.0))
    session = SessionState(session_id="5", last_msg_id=2, next_msg_id=3, max_msg_size=65536)
    wait(
        store.commit_management_step(
            ManagementStep("CHUNKY", session, reply=b"r", chunks=(("k", "abc"),)), 3.0
        )
    )
    # A console session (signed in through a browser, as the daemon would keep it).
    signed_in = ConsoleSessionRecord(b"\x07" * 32, "admin", b"\x08" * 32, "csrf", 4.0, 4.0)
    wait(store.start_console_session(signed_in, lifetime=3600.0, idle=3600.0, keep=10))
    store.stop()

    dsn = cluster.dsn(cluster.create_database())
    sqlite_path = state / "mdmd.sqlite3"
    code, out, err = copy(capsys, "--from", f"sqlite:{sqlite_path}", "--to", f"postgresql:{dsn}")
    assert code == 0, err
    assert "devices" in out and "the counts match" in out
    assert "mdmctl: copying" in err and "mdmctl: devices: 3 rows copied" in err
    copied = {}
    for table, mine, theirs in every_row(sqlite_path, dsn):
        assert theirs == mine, table
        copied[table] = len(mine)
    # Every kind of row there is, was there to copy.
    assert [table for table, count in copied.items() if count == 0] == []

    # The same daemon, its store now PostgreSQL.
    config.write_text(edit_ini(config.read_text(), {"store": {"backend": "postgresql", "dsn": dsn}}))
    new = start_daemon(config)
    try:
        assert "store PostgreSQL" in new.log_text()
        # The session under way goes on where it was: the Atomic's status,
        # then the read-back, then the command queued before the move.
        message = paused_client.respond(paused_reply)
        while message is not None:
            status, body = post(new, paused, message)
            assert status == 200
            message = paused_client.respond(paused_client.read(body))
        assert paused_client.executed == ["./Vendor/MSFT/Reboot/RebootNow"]
        status, command = new.admin("GET", f"/api/v1/commands/{pending}")
        assert status == 200 and isinstance(command, dict) and command["state"] == "acknowledged"
        status, profiles = new.admin("GET", f"/api/v1/devices/{paused.id}/profiles")
        assert isinstance(profiles, dict) and profiles["profiles"][0]["state"] == "verified"
        # The other device checks in with the certificate it has, and gets
        # the action asked for it before the move.
        run_session(new, managed, client)
        assert client.executed == ["./Device/Vendor/MSFT/Reboot/RebootNow"]
        status, actions = new.admin("GET", f"/api/v1/devices/{managed.id}/actions")
        assert isinstance(actions, dict), actions
        assert [(a["action"], a["state"]) for a in actions["actions"]] == [("restart", "acknowledged")]
        # New enrollments continue the copied identity columns.
        late = enroll(new, WindowsDevice(key=keys[2], hostname="LATE"), tmp_path)  # type: ignore[arg-type]
        run_session(new, late, ManagementClient(late.device))
        status, devices = new.admin("GET", "/api/v1/devices")
        assert isinstance(devices, dict) and len(devices["devices"]) == 4
    finally:
        new.stop()


def test_a_target_that_is_not_empty_is_refused_and_left_alone(
    tmp_path: Path, cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "mdmd.sqlite3"
    store = SQLiteStore(str(path), ThreadReactor())  # type: ignore[arg-type]
    store.open()
    store.start()
    wait(store.enroll_host(host(1), now=1.0))
    store.stop()
    dsn = cluster.dsn(cluster.create_database())
    assert copy(capsys, "--from", f"sqlite:{path}", "--to", f"postgresql:{dsn}")[0] == 0
    code, out, err = copy(capsys, "--from", f"sqlite:{path}", "--to", f"postgresql:{dsn}")
    assert code == 1 and out == ""
    assert err.splitlines()[-1] == (
        "mdmctl: store copy: the PostgreSQL database is not empty (hosts hold rows): refusing to copy into it"
    )
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT COUNT(*) FROM hosts").fetchone() == (1,)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--from", "x.sqlite3", "--to", "postgresql:dbname=x"], "expected sqlite:PATH"),
        (["--from", "sqlite:x", "--to", "mysql:db"], "expected postgresql:DSN"),
    ],
)
def test_store_locations_are_checked(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        mdmctl.main(["store", "copy", *argv])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_mistakes_are_one_line_and_write_nothing(
    tmp_path: Path, cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    dsn = cluster.dsn(cluster.create_database())
    missing = tmp_path / "absent.sqlite3"
    assert copy(capsys, "--from", f"sqlite:{missing}", "--to", f"postgresql:{dsn}")[2] == (
        f"mdmctl: store copy: {missing}: no such file\n"
    )
    not_mdmd = tmp_path / "other.sqlite3"
    sqlite3.connect(not_mdmd).execute("CREATE TABLE t (x)").connection.close()
    code, _, err = copy(capsys, "--from", f"sqlite:{not_mdmd}", "--to", f"postgresql:{dsn}")
    assert code == 1 and err.endswith("not an mdmd store (no schema)\n")
    code, _, err = copy(capsys, "--from", f"sqlite:{not_mdmd}", "--to", f"postgresql:{dsn} password=x")
    assert code == 1 and "must not hold the password" in err
    path = tmp_path / "mdmd.sqlite3"
    SQLiteStore(str(path), ThreadReactor()).open()  # type: ignore[arg-type]
    code, _, err = copy(capsys, "--from", f"sqlite:{path}", "--to", f"postgresql:host={tmp_path} dbname=x")
    assert code == 1 and "cannot use the PostgreSQL database" in err and len(err.splitlines()) == 2
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT to_regclass('hosts')").fetchone() == (None,)
