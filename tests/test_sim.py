"""mdmd-sim end to end: the simulator, as its own process, against the real
daemon on loopback."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import REPO, Daemon, daemon_env, running_daemon, write_config


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory.mktemp("sim")) as d:
        yield d


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("keys")


def sim(*args: str) -> tuple[int, dict[str, Any], str]:
    done = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-m", "mdmd.sim.cli", "--json", *args],
        env=daemon_env(),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    try:
        summary = json.loads(done.stdout)
    except ValueError:
        pytest.fail(f"no JSON summary (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done.returncode, summary, done.stderr


def test_devices_enroll_and_check_in(daemon: Daemon, keys: Path, tmp_path: Path) -> None:
    saved = tmp_path / "devices.json"
    code, summary, stderr = sim(
        "--config", str(daemon.config), "--devices", "3", "--concurrency", "3", "--duration", "0",
        "--keys-cache", str(keys), "--save-devices", str(saved),
    )  # fmt: skip
    assert code == 0, (summary, stderr)
    assert summary["enrolled"] == 3
    assert summary["checkins"] >= 3
    assert summary["errors"] == {} and summary["error_count"] == 0
    for step in ("orbit_enroll", "orbit_config", "discovery", "policy", "enroll"):
        assert summary["latency_ms"][step]["count"] == 3
    assert summary["latency_ms"]["checkin"]["count"] == summary["checkins"]
    assert summary["enrollments_per_s"] > 0
    # The keys were cached for the next run.
    assert len(list(keys.glob("device-*.pem"))) == 3

    # The server knows them; a queued Get reaches the saved devices at their
    # next check-in and comes back with the value Windows would give.
    ids = [d["device_id"] for d in json.loads(saved.read_text())["devices"]]
    status, listed = daemon.admin("GET", "/api/v1/devices")
    assert status == 200 and isinstance(listed, dict)
    assert set(ids) <= {d["device_id"] for d in listed["devices"]}
    status, queued = daemon.admin(
        "POST",
        f"/api/v1/devices/{ids[0]}/commands",
        {"verb": "Get", "items": [{"target": "./DevDetail/SwV"}]},
    )
    assert status == 201 and isinstance(queued, dict)
    code, summary, stderr = sim(
        "--config", str(daemon.config), "--load-devices", str(saved), "--duration", "0", "--samples"
    )
    assert code == 0, (summary, stderr)
    assert summary["enrolled"] == 0 and summary["checkins"] == 3 and summary["commands"] == 1
    # --samples: every latency, so that bench/run can merge several processes' summaries.
    samples = summary["latency_samples_ms"]["checkin"]
    assert len(samples) == 3
    assert max(samples) == pytest.approx(summary["latency_ms"]["checkin"]["max"], abs=0.01)
    status, command = daemon.admin("GET", f"/api/v1/commands/{queued['command_uuid']}")
    assert status == 200 and isinstance(command, dict) and command["state"] == "acknowledged"
    assert [r["data"] for r in command["results"] if r["kind"] == "results"] == ["10.0.22631.4460"]


def test_a_wrong_enroll_secret_is_counted_by_kind_and_fails_the_run(daemon: Daemon, keys: Path) -> None:
    code, summary, _ = sim(
        "--url", daemon.url("enrollment"), "--secret", "not-the-enroll-secret",
        "--cacert", str(daemon.ca_file),
        "--devices", "3", "--concurrency", "3", "--duration", "0", "--keys-cache", str(keys),
    )  # fmt: skip
    assert code == 1
    assert summary["enrolled"] == 0 and summary["checkins"] == 0
    assert summary["errors"] == {"orbit_enroll: http 401": 3}
    first = summary["first_errors"][0]
    assert first["kind"] == "orbit_enroll: http 401" and first["http_status"] == 401
    assert "Authentication failed" in first["body"]


def _sim_fails(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "mdmd.sim.cli", *args],
        env=daemon_env(),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert done.returncode == 2 and done.stdout == "", (done.stdout, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


def test_a_brought_in_certificate_makes_the_simulator_ask_for_cacert(tmp_path: Path) -> None:
    # Production: mdmctl init --no-tls, no development root in state_dir.
    state = tmp_path / "state"
    from mdmd.mdmctl import main as mdmctl

    assert mdmctl(["init", "--no-tls", str(state)]) == 0
    config = write_config(tmp_path, {"mdmd": {"bootstrap": "no"}})
    line = _sim_fails("--config", str(config), "--devices", "1")
    assert line.startswith("mdmd-sim: the server's TLS certificate is not from mdmd's development root")
    assert "give --cacert" in line
    assert _sim_fails("--config", str(config), "--devices", "1", "--cacert", str(tmp_path / "none.pem")) == (
        f"mdmd-sim: --cacert {tmp_path / 'none.pem'}: no such file"
    )
