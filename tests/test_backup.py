"""Backup and restore as the README says to do them: ``mdmctl backup`` while
the daemon runs, the state lost, the files put back, the daemon started
again; enrolled devices carry on with their certificates and queue."""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

from harness import (
    MANAGEMENT_PATH,
    SYNCML,
    Daemon,
    client_tls_context,
    daemon_env,
    enroll_device,
    start_daemon,
    write_config,
)
from mdmd import pki
from mdmd.sim.device import EnrollmentResult, ManagementClient, WindowsDevice


def _mdmctl(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mdmd.mdmctl", "--config", str(config), *args],
        env=daemon_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def _session(daemon: Daemon, client: ManagementClient, result: EnrollmentResult, tls_dir: Path) -> list[str]:
    """One whole OMA-DM session; the LocURIs the server asked for."""
    tls = client_tls_context(daemon, tls_dir, result.certificate, client.device.key)
    asked: list[str] = []
    message: bytes | None = client.session_start(result.management_url)
    while message is not None:
        response, body = daemon.request(
            "POST", MANAGEMENT_PATH, message, SYNCML, section="management", context=tls
        )
        assert response.status == 200, body
        reply = client.read(body)
        asked += [
            str(el.text) for cmd in reply.commands for el in cmd.iter() if str(el.tag).endswith("}LocURI")
        ]
        message = client.respond(reply)
    return asked


def test_a_backup_taken_while_serving_restores_the_node(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    daemon = start_daemon(config)
    device = WindowsDevice(key=pki.generate_rsa_key(), hostname="DESKTOP-BACKUP")
    try:
        result = enroll_device(daemon, device)
        assert isinstance(result, EnrollmentResult)
        client = ManagementClient(device)
        _session(daemon, client, result, tmp_path)
        status, queued = daemon.admin(
            "POST",
            f"/api/v1/devices/{device.device_id}/commands",
            {"verb": "Get", "items": [{"target": "./DevDetail/SwV"}]},
        )
        assert status == 201 and isinstance(queued, dict)
        token = daemon.admin_token

        # The backup, online.
        copy = tmp_path / "mdmd-backup.sqlite3"
        done = _mdmctl(config, "backup", str(copy))
        assert done.returncode == 0, done.stderr
    finally:
        daemon.stop()
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"backed up {daemon.state / 'mdmd.sqlite3'} to {copy} (schema version ")
    named = {Path(line.split()[0]): line for line in lines[2:]}
    state = daemon.state
    assert "IRREPLACEABLE" in named[state / "wstep-identity.key"]
    for needed in ("wstep-identity.pem", "tls-server.pem", "tls-server.key", "enroll_secret", "admin_token"):
        assert state / needed in named, needed
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600

    # The state is lost.
    lost = tmp_path / "lost"
    state.rename(lost)

    # README, "Backup and restore": put the named files back, the copy as
    # mdmd.sqlite3 (no -wal or -shm beside it), check, start.
    state.mkdir(mode=0o700)
    for path in named:
        if path.is_relative_to(state):
            shutil.copy2(lost / path.relative_to(state), path)
    shutil.copy2(copy, state / "mdmd.sqlite3")
    assert not list(state.glob("mdmd.sqlite3-*"))
    check = _mdmctl(config, "check-config")
    assert check.returncode == 0, check.stderr

    daemon = start_daemon(config)
    try:
        assert "bootstrap created" not in daemon.log_text().split("mdmd 0.1.0 starting")[-1]
        assert daemon.admin_token == token
        status, answer = daemon.admin("GET", f"/api/v1/devices/{device.device_id}")
        assert status == 200 and isinstance(answer, dict) and answer["state"] == "enrolled"
        # The device's certificate still opens sessions, and what was
        # queued before the backup is delivered.
        assert "./DevDetail/SwV" in _session(daemon, client, result, tmp_path)
        status, command = daemon.admin("GET", f"/api/v1/commands/{queued['command_uuid']}")
        assert status == 200 and isinstance(command, dict) and command["state"] == "acknowledged"
    finally:
        daemon.stop()


def test_a_backup_never_overwrites_and_names_a_missing_database(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    (tmp_path / "state").mkdir()
    done = _mdmctl(config, "backup", str(tmp_path / "copy"))
    assert done.returncode == 1 and done.stderr.startswith("mdmctl: no database at ")
    conn = sqlite3.connect(tmp_path / "state" / "mdmd.sqlite3")
    conn.execute("CREATE TABLE t (x)")
    conn.close()
    (tmp_path / "copy").write_text("keep me")
    done = _mdmctl(config, "backup", str(tmp_path / "copy"))
    assert done.returncode == 1 and "exists" in done.stderr
    assert (tmp_path / "copy").read_text() == "keep me"
    assert os.path.exists(tmp_path / "state" / "mdmd.sqlite3")


def test_a_backup_of_a_postgresql_store_points_at_the_databases_own_tools(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"store": {"backend": "postgresql", "dsn": "dbname=mdmd"}})
    done = _mdmctl(config, "backup", str(tmp_path / "copy"))
    assert done.returncode == 1 and "pg_dump" in done.stderr and len(done.stderr.splitlines()) == 1
    assert not (tmp_path / "copy").exists()


def test_an_upgrade_copies_the_database_before_migrating_it(tmp_path: Path) -> None:
    from mdmd.store.sqlite_schema import MIGRATIONS, SCHEMA_VERSION

    config = write_config(tmp_path)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    old = SCHEMA_VERSION - 1
    conn = sqlite3.connect(state / "mdmd.sqlite3", isolation_level=None)
    for migration in MIGRATIONS[:old]:
        for statement in migration:
            conn.execute(statement)
    conn.execute(f"PRAGMA user_version={old}")
    conn.execute(
        "INSERT INTO hosts (hardware_uuid, node_key_hash, platform, hostname, hardware_serial, info,"
        " enrolled_at) VALUES ('U1', x'01', 'windows', 'OLD-PC', 'S1', '{}', 1)"
    )
    conn.close()
    daemon = start_daemon(config)
    try:
        (copy,) = state.glob(f"mdmd.sqlite3.v{old}-backup-*")
        assert f"migrating the database from schema version {old}; a copy of it as it was is in {copy}" in (
            daemon.log_text()
        )
    finally:
        daemon.stop()
    conn = sqlite3.connect(copy)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == old
        assert conn.execute("SELECT hostname FROM hosts").fetchall() == [("OLD-PC",)]
    finally:
        conn.close()
