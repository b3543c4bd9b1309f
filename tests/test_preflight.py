"""Start-up checks and ``twistd mdmd --check`` / ``mdmctl check-config``:
each refusal one line naming the file, section and key."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import LISTENERS, REPO, daemon_env, running_daemon, spawn_twistd, start_daemon, write_config
from mdmd.config import load_config
from mdmd.mdmctl import main as mdmctl
from mdmd.preflight import EX_CANTLISTEN, EX_CONFIG, listen_address, run_check

TCP = "tcp:0:interface=127.0.0.1"


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Key material as ``mdmctl init`` makes it, for host localhost."""
    made = tmp_path_factory.mktemp("material") / "state"
    assert mdmctl(["init", str(made), "--host", "localhost"]) == 0
    return made


def _config(tmp_path: Path, material: Path, **sections: dict[str, str | None]) -> Path:
    """A configuration on tcp listeners (port 0) over a copy of *material*,
    without bootstrap: what production runs."""
    shutil.copytree(material, tmp_path / "state")
    changes: dict[str, dict[str, str | None]] = {name: {"listen": TCP} for name in LISTENERS}
    changes["mdmd"] = {"bootstrap": "no"}
    for section, values in sections.items():
        changes.setdefault(section, {}).update(values)
    return write_config(tmp_path, changes)


def _check(config: Path) -> tuple[int, str]:
    return run_check(load_config(str(config)))


def _refused(config: Path, *needles: str) -> str:
    status, line = _check(config)
    assert status == EX_CONFIG, line
    assert line.startswith(f"mdmd: {config}: ") and "\n" not in line
    for needle in needles:
        assert needle in line, line
    return line


def test_a_good_configuration_passes(tmp_path: Path, material: Path) -> None:
    status, line = _check(_config(tmp_path, material))
    assert status == 0 and line.endswith(f"{tmp_path / 'mdmd.ini'}: OK"), line


def test_a_certificate_that_does_not_cover_the_url_is_refused(tmp_path: Path, material: Path) -> None:
    config = _config(tmp_path, material, enrollment={"url": "https://mdm.example.com"})
    _refused(
        config,
        "[enrollment] url: host mdm.example.com is not covered by the TLS certificate",
        "tls-server.pem (it names localhost)",
    )


def test_an_ip_address_the_certificate_does_not_name_is_refused(tmp_path: Path, material: Path) -> None:
    config = _config(tmp_path, material, management={"url": "https://192.0.2.7:8444/m"})
    _refused(config, "[management] url: host 192.0.2.7 is not covered")


@pytest.mark.parametrize(
    ("name", "where"),
    [
        ("wstep-identity.key", "[wstep] identity_key"),
        ("tls-server.key", "[enrollment] tls_key"),
        ("enroll_secret", "[enrollment] enroll_secret_file"),
        ("admin_token", "[admin] token_file"),
    ],
)
def test_a_private_file_readable_by_others_is_refused(
    tmp_path: Path, material: Path, name: str, where: str
) -> None:
    config = _config(tmp_path, material)
    (tmp_path / "state" / name).chmod(0o640)
    _refused(
        config, where, "readable by group or others (mode 0640)", f"chmod 600 {tmp_path / 'state' / name}"
    )


@pytest.mark.parametrize("listen", ["tcp:0", "tcp:0:interface=0.0.0.0"])
def test_an_admin_listener_off_loopback_is_refused_unless_allowed(
    tmp_path: Path, material: Path, listen: str
) -> None:
    config = _config(tmp_path, material, admin={"listen": listen, "url": "http://127.0.0.1:8445"})
    _refused(config, "[admin] listen", "allow_remote = yes")
    allowed = config.read_text().replace("allow_remote = no", "allow_remote = yes")
    config.write_text(allowed)
    status, line = _check(config)
    assert status == 0, line
    assert "[admin] listen: the admin API listens on every interface over plain HTTP" in line


def test_listen_addresses_are_read_from_endpoints() -> None:
    assert listen_address("tcp:8445:interface=127.0.0.1") == "127.0.0.1"
    assert listen_address("tcp:port=8445") == "0.0.0.0"
    assert listen_address("tcp6:8445:interface=\\:\\:1") == "::1"
    assert listen_address("unix:/run/mdmd/admin.sock") == "unix"
    # Not this process's sockets: cannot be told.
    assert listen_address("systemd:domain=INET:name=admin") is None


def test_a_state_dir_another_mdmd_holds_is_refused(tmp_path: Path) -> None:
    with running_daemon(tmp_path) as daemon:
        line = _refused(
            daemon.config, "[mdmd] state_dir", f"in use by another mdmd process (pid {daemon.proc.pid})"
        )
        # A second daemon on it does not start either.
        second = spawn_twistd(daemon.config, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _, stderr = second.communicate(timeout=60)
        assert second.returncode == EX_CONFIG and stderr.strip() == line, stderr
        assert daemon.proc.poll() is None


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield int(sock.getsockname()[1])


def test_a_port_in_use_is_refused_by_the_check(tmp_path: Path, material: Path, taken_port: int) -> None:
    listen = f"tcp:{taken_port}:interface=127.0.0.1"
    config = _config(tmp_path, material, management={"listen": listen})
    _refused(config, f"[management] listen: cannot listen on {listen}: Address already in use")


# --- through the commands an operator runs ---


def _twistd(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    argv = [
        str(Path(sys.executable).with_name("twistd")),
        "-n",
        "--pidfile=",
        "mdmd",
        "--config",
        str(config),
    ]
    return subprocess.run(
        [*argv, *extra], env=daemon_env(), cwd=config.parent, capture_output=True, text=True, timeout=60
    )


def _one_line(output: str) -> str:
    lines = output.splitlines()
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


def test_twistd_check_answers_in_one_line_and_exits_0_or_78(tmp_path: Path, material: Path) -> None:
    good = _config(tmp_path / "good", material)
    done = _twistd(good, "--check")
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert _one_line(done.stdout).endswith(f"{good}: OK")
    assert not (good.parent / "state" / "mdmd.sqlite3").exists()  # nothing was created
    bad = _config(tmp_path / "bad", material, enrollment={"url": "https://mdm.example.com"})
    done = _twistd(bad, "--check")
    assert done.returncode == EX_CONFIG and done.stdout == ""
    assert "[enrollment] url: host mdm.example.com is not covered" in _one_line(done.stderr)


def test_start_up_refuses_what_the_check_refuses(tmp_path: Path, material: Path) -> None:
    config = _config(tmp_path, material, enrollment={"url": "https://mdm.example.com"})
    done = _twistd(config)
    assert done.returncode == EX_CONFIG
    line = _one_line(done.stderr)
    assert line == _check(config)[1]


def test_a_listener_that_cannot_listen_stops_start_up_in_one_line(
    tmp_path: Path, material: Path, taken_port: int
) -> None:
    listen = f"tcp:{taken_port}:interface=127.0.0.1"
    config = _config(tmp_path, material, enrollment={"listen": listen})
    done = _twistd(config)
    # Not EX_CONFIG, and not a status systemd restarts on (see the unit).
    assert done.returncode == EX_CANTLISTEN, (done.stdout, done.stderr)
    line = _one_line(done.stderr)
    assert line == f"mdmd: {config}: [enrollment] listen: cannot listen on {listen}: Address already in use"
    assert "Traceback" not in done.stdout


def test_mdmctl_check_config_is_the_same_check(tmp_path: Path, material: Path) -> None:
    good = _config(tmp_path / "good", material)
    done = subprocess.run(
        [sys.executable, "-m", "mdmd.mdmctl", "--config", str(good), "check-config"],
        env=daemon_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and _one_line(done.stdout) == _check(good)[1]
    bad = _config(tmp_path / "bad", material, enrollment={"url": "https://mdm.example.com"})
    done = subprocess.run(
        [sys.executable, "-m", "mdmd.mdmctl", "--config", str(bad), "check-config"],
        env=daemon_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == EX_CONFIG and _one_line(done.stderr) == _check(bad)[1]


def test_the_unit_does_not_restart_on_a_refusal(tmp_path: Path) -> None:
    import configparser

    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.read(REPO / "systemd" / "mdmd.service")
    prevented = parser["Service"]["RestartPreventExitStatus"].split()
    assert str(EX_CONFIG) in prevented and str(EX_CANTLISTEN) in prevented


def test_bootstrap_makes_a_missing_state_dir_no_refusal(tmp_path: Path) -> None:
    config = write_config(tmp_path, {name: {"listen": TCP} for name in LISTENERS})
    status, line = _check(config)
    assert status == 0 and "bootstrap = yes will create" in line, line
    assert not os.path.exists(tmp_path / "state")


def test_start_up_with_a_remote_admin_listener_allowed_warns(tmp_path: Path, material: Path) -> None:
    config = _config(tmp_path, material, admin={"listen": "tcp:0", "allow_remote": "yes"})
    daemon = start_daemon(config)
    try:
        warnings = [line for line in daemon.log_text().splitlines() if "#warn]" in line]
        assert any("[admin] listen: the admin API listens on every interface" in line for line in warnings)
    finally:
        daemon.stop()
