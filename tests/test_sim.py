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
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet.task import Clock

from harness import REPO, Daemon, daemon_env, db_rows, running_daemon, start_daemon, write_config
from mdmd.sim.cli import Fleet, SimDevice, parse_args
from mdmd.sim.device import DEFAULT_WRITE_ONLY, ManagementClient, WindowsDevice

DAY = 86400.0


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


CAMERA = "./Device/Vendor/MSFT/Policy/Config/Camera/AllowCamera"
COOKIES = "./Device/Vendor/MSFT/Policy/Config/Browser/AllowCookies"


def _replace(daemon: Daemon, device_id: str, target: str, data: str) -> str:
    status, queued = daemon.admin(
        "POST",
        f"/api/v1/devices/{device_id}/commands",
        {"verb": "Replace", "items": [{"target": target, "format": "int", "data": data}]},
    )
    assert status == 201 and isinstance(queued, dict)
    return str(queued["command_uuid"])


def _command(daemon: Daemon, uuid: str) -> dict[str, Any]:
    status, command = daemon.admin("GET", f"/api/v1/commands/{uuid}")
    assert status == 200 and isinstance(command, dict)
    return command


def test_refused_locuris_and_drift_reach_the_devices(daemon: Daemon, keys: Path, tmp_path: Path) -> None:
    saved = str(tmp_path / "devices.json")
    code, summary, stderr = sim(
        "--config", str(daemon.config), "--devices", "2", "--duration", "0",
        "--keys-cache", str(keys), "--save-devices", saved,
    )  # fmt: skip
    assert code == 0 and summary["enrolled"] == 2, (summary, stderr)
    ids = [d["device_id"] for d in json.loads(Path(saved).read_text())["devices"]]

    # --refuse: the device answers a write of a refused node (or under it) with the code.
    camera = {i: _replace(daemon, i, CAMERA, "0") for i in ids}
    cookies = {i: _replace(daemon, i, COOKIES, "1") for i in ids}
    code, summary, stderr = sim(
        "--config", str(daemon.config), "--load-devices", saved, "--save-devices", saved, "--duration", "0",
        "--refuse", "./Device/Vendor/MSFT/Policy/Config/Browser=404",
    )  # fmt: skip
    assert code == 0 and summary["commands"] == 4 and summary["drifts"] == 0, (summary, stderr)
    for i in ids:
        assert _command(daemon, camera[i])["status"] == 200
        assert _command(daemon, cookies[i])["status"] == 404

    # --drift-rate 1: at the start of its next session each device has the
    # one node the server set (kept in the devices file) changed locally.
    status, queued = daemon.admin(
        "POST", f"/api/v1/devices/{ids[0]}/commands", {"verb": "Get", "items": [{"target": CAMERA}]}
    )
    assert status == 201 and isinstance(queued, dict)
    code, summary, stderr = sim(
        "--config", str(daemon.config), "--load-devices", saved, "--duration", "0",
        "--drift-rate", "1", "--seed", "3",
    )  # fmt: skip
    assert code == 0 and summary["drifts"] == 2, (summary, stderr)
    results = _command(daemon, str(queued["command_uuid"]))["results"]
    assert [(r["target"], r["format"], r["data"]) for r in results if r["kind"] == "results"] == [
        (CAMERA, "int", "1")
    ]


def test_tree_options_parse_and_configure_every_device() -> None:
    options = parse_args(
        [
            "--url", "https://localhost:8443", "--secret", "s", "--devices", "2",
            "--drift-rate", "0.25", "--seed", "9",
            "--refuse", f"{CAMERA}=404", "--refuse", "./Device/Vendor/MSFT/BitLocker",
            "--write-only", "./Device/Vendor/MSFT/Policy/Config/Secret/*",
        ]
    )  # fmt: skip
    assert options.drift_rate == 0.25 and options.seed == 9
    assert options.refuse == ((CAMERA, 404), ("./Device/Vendor/MSFT/BitLocker", 500))
    assert options.write_only == ("./Device/Vendor/MSFT/Policy/Config/Secret/*",)
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    device = WindowsDevice(key=key)

    def fleet() -> Fleet:
        # Device 1 comes from a devices file (--load-devices): its client exists already.
        return Fleet(Clock(), options, [SimDevice(0, device), SimDevice(1, device, ManagementClient(device))])

    fleets = [fleet(), fleet()]
    clients = [[f.new_client(f.devices[0]), f.devices[1].client] for f in fleets]
    for client in clients[0]:
        assert client is not None and client.drift_rate == 0.25
        assert client.refused == {CAMERA: 404, "./Device/Vendor/MSFT/BitLocker": 500}
        assert "./Device/Vendor/MSFT/Policy/Config/Secret/*" in client.write_only
        assert client.write_only >= DEFAULT_WRITE_ONLY
    # Seeded: each device draws the same numbers in every run, and its own.
    draws = [[c.rng.random() for c in cs if c is not None] for cs in clients]
    assert draws[0] == draws[1] and draws[0][0] != draws[0][1]


@pytest.mark.parametrize(
    "bad",
    [
        ["--drift-rate", "1.5"],
        ["--drift-rate", "-0.1"],
        ["--refuse", f"{CAMERA}=200"],
        ["--refuse", f"{CAMERA}=abc"],
        ["--refuse", "Device/Vendor/MSFT/X"],
        ["--write-only", "/X"],
    ],
)
def test_bad_tree_options_are_usage_errors(bad: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        parse_args(["--url", "https://localhost:8443", "--secret", "s", "--devices", "1", *bad])
    assert exit.value.code == 2
    assert bad[0] in capsys.readouterr().err


def test_devices_renew_when_their_certificate_enters_its_renewal_period(
    keys: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    directory = tmp_path_factory.mktemp("sim-renewal")
    saved = directory / "devices.json"
    config = write_config(directory)
    # Enrolled with the daemon's (and the devices') clock 326 days back: by
    # the real clock their one-year certificates have 39 days left.
    daemon = start_daemon(config, clock_offset=-326 * DAY)
    try:
        code, summary, stderr = sim(
            "--config", str(config), "--devices", "2", "--concurrency", "2", "--duration", "0",
            "--keys-cache", str(keys), "--save-devices", str(saved), "--clock-offset", "-326",
        )  # fmt: skip
        assert code == 0 and summary["enrolled"] == 2 and summary["renewed"] == 0, (summary, stderr)
    finally:
        daemon.stop()
    before = {d["device_id"]: d["certificate"] for d in json.loads(saved.read_text())["devices"]}
    daemon = start_daemon(config)
    try:
        # Ten days earlier the renewal period (42 days) has not begun.
        code, summary, stderr = sim(
            "--config", str(config), "--load-devices", str(saved), "--duration", "0", "--clock-offset", "-10"
        )
        assert code == 0 and summary["renewed"] == 0 and summary["checkins"] == 2, (summary, stderr)
        # Now it has: each device renews, then checks in with its new certificate.
        code, summary, stderr = sim(
            "--config", str(config), "--load-devices", str(saved), "--save-devices", str(saved),
            "--duration", "0",
        )  # fmt: skip
        assert code == 0, (summary, stderr)
        assert summary["renewed"] == 2 and summary["checkins"] == 2 and summary["error_count"] == 0
        assert summary["latency_ms"]["renew"]["count"] == 2
        after = {d["device_id"]: d["certificate"] for d in json.loads(saved.read_text())["devices"]}
        assert after.keys() == before.keys() and all(after[i] != before[i] for i in after)
        for device_id in after:
            status, shown = daemon.admin("GET", f"/api/v1/devices/{device_id}")
            assert status == 200 and isinstance(shown, dict)
            assert shown["renewal"]["state"] == "renewed" and shown["certificate"]["renewed_from"]
        # The old certificates retired at the first session with the new ones.
        retired = db_rows(daemon, "SELECT count(*) FROM certificates WHERE revoke_reason = 'renewed'")
        assert retired == [(2,)]
        # With their new certificates they are not due again.
        code, summary, stderr = sim("--config", str(config), "--load-devices", str(saved), "--duration", "0")
        assert code == 0 and summary["renewed"] == 0 and summary["checkins"] == 2, (summary, stderr)
    finally:
        daemon.stop()


def test_a_refused_renewal_is_counted_and_the_device_keeps_checking_in(
    daemon: Daemon, keys: Path, tmp_path: Path
) -> None:
    saved = tmp_path / "devices.json"
    code, summary, _ = sim(
        "--config", str(daemon.config), "--devices", "1", "--duration", "0",
        "--keys-cache", str(keys), "--save-devices", str(saved),
    )  # fmt: skip
    assert code == 0
    # The device believes it is 330 days later; the server knows better.
    code, summary, _ = sim(
        "--config",
        str(daemon.config),
        "--load-devices",
        str(saved),
        "--duration",
        "0",
        "--clock-offset",
        "330",
    )
    assert code == 1
    assert summary["errors"] == {"renew: fault s:Authorization": 1}
    assert "NotEligibleToRenew" in summary["first_errors"][0]["body"]
    assert summary["renewed"] == 0 and summary["checkins"] == 1


def test_the_clock_offset_is_days(capsys: pytest.CaptureFixture[str]) -> None:
    from mdmd.sim.cli import parse_args

    base = ["--url", "https://localhost:8443", "--secret", "s", "--devices", "1"]
    assert parse_args(base).clock_offset == 0.0
    assert parse_args([*base, "--clock-offset", "1.5"]).clock_offset == 1.5 * DAY
    assert parse_args([*base, "--clock-offset", "-326"]).clock_offset == -326 * DAY
    for bad in ("soon", "nan", "inf"):
        with pytest.raises(SystemExit):
            parse_args([*base, "--clock-offset", bad])
    assert "number of days" in capsys.readouterr().err


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
