"""What an operator installs: the package (twistd plugin and commands), mdmctl
init, the systemd unit."""

from __future__ import annotations

import configparser
import json
import os
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import LISTENERS, REPO, TWISTD, daemon_env, spawn_twistd, write_config
from mdmd.mdmctl import main as mdmctl

# What the README's install does not need from a checkout.
_NOT_SHIPPED = (".git", ".venv", "build", "*.egg-info", "state", "__pycache__", ".*_cache", "dropin.cache")


@pytest.mark.timeout(600)
def test_the_readme_install_provides_the_plugin_and_the_commands(tmp_path: Path) -> None:
    # README, Quickstart: python3 -m venv .venv && .venv/bin/pip install .
    # From a copy of the checkout, into a new venv, and run from elsewhere so
    # that nothing is imported from the checkout.
    source = tmp_path / "mdmd"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*_NOT_SHIPPED))
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=env, timeout=120)
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "."], check=True, env=env, cwd=source, timeout=540
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def run(*argv: str) -> str:
        done = subprocess.run(argv, env=env, cwd=elsewhere, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (argv, done.stdout, done.stderr)
        return done.stdout

    where = run(str(venv / "bin" / "python"), "-c", "import mdmd; print(mdmd.__file__)")
    assert Path(where.strip()).is_relative_to(venv)
    plugins = run(str(venv / "bin" / "twistd"), "--help")
    assert any(line.split()[:1] == ["mdmd"] for line in plugins.splitlines()), plugins
    assert "--config" in run(str(venv / "bin" / "twistd"), "mdmd", "--help")
    assert "init" in run(str(venv / "bin" / "mdmctl"), "--help")
    assert "--devices" in run(str(venv / "bin" / "mdmd-sim"), "--help")


def test_mdmctl_init_creates_material_once(tmp_path: Path, capsys: object) -> None:
    target = tmp_path / "state"
    assert mdmctl(["init", str(target), "--host", "mdm.example.com"]) == 0
    names = sorted(p.name for p in target.iterdir())
    assert names == sorted(
        [
            "admin_token",
            "enroll_secret",
            "tls-root.key",
            "tls-root.pem",
            "tls-server.key",
            "tls-server.pem",
            "wstep-identity.key",
            "wstep-identity.pem",
        ]
    )
    for name in ("admin_token", "enroll_secret", "tls-root.key", "tls-server.key", "wstep-identity.key"):
        assert stat.S_IMODE(os.stat(target / name).st_mode) == 0o600, name
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    assert mdmctl(["init", str(target)]) == 0
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before


def test_mdmctl_init_without_tls_leaves_the_server_certificate_to_the_operator(tmp_path: Path) -> None:
    target = tmp_path / "state"
    assert mdmctl(["init", "--no-tls", str(target)]) == 0
    assert not (target / "tls-server.pem").exists()
    assert (target / "wstep-identity.pem").exists()


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(REPO / "systemd" / "mdmd.service")
    return parser


def _systemd_analyze(*args: str, unit: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.fail("systemd-analyze not found: install the systemd package (.ci/run does)", pytrace=False)
    return subprocess.run(
        [exe, *args, "--no-pager", str(unit)], capture_output=True, text=True, timeout=60, cwd=unit.parent
    )


def _installable_unit(tmp_path: Path) -> Path:
    """The unit as shipped, but with ExecStart's twistd the one of this
    environment: systemd-analyze verify checks that the program exists."""
    shipped = (REPO / "systemd" / "mdmd.service").read_text()
    program = shlex.split(_unit()["Service"]["ExecStart"])[0]
    unit = tmp_path / "mdmd.service"
    unit.write_text(shipped.replace(program, str(TWISTD)))
    return unit


def test_systemd_accepts_the_unit_without_a_warning(tmp_path: Path) -> None:
    # systemd ignores what it cannot parse (a misspelt key, a bad value) with
    # only a warning; any warning about the unit fails here.
    unit = _installable_unit(tmp_path)
    done = _systemd_analyze("verify", "--man=no", unit=unit)
    assert done.returncode == 0, done.stderr
    assert [line for line in done.stderr.splitlines() if unit.name in line] == []


def test_systemd_rates_the_unit_hardened(tmp_path: Path) -> None:
    unit = _installable_unit(tmp_path)
    done = _systemd_analyze("security", "--offline=true", "--json=short", unit=unit)
    assert done.returncode == 0, done.stderr
    in_effect = {check["json_field"]: check["set"] for check in json.loads(done.stdout)}
    for setting in (
        "UserOrDynamicUser",
        "UMask",
        "NoNewPrivileges",
        "ProtectSystem",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "SystemCallFilter_privileged",
        "CapabilityBoundingSet_CAP_SYS_ADMIN",
        "AmbientCapabilities",
    ):
        assert in_effect[setting] is True, setting
    # Left out on purpose: under it Twisted cannot build a TLS context
    # (pyOpenSSL's cffi callbacks need memory both writable and executable).
    assert in_effect["MemoryDenyWriteExecute"] is False
    # systemd's overall exposure score, 0.0 (best) to 10.0: at most 1.5.
    done = _systemd_analyze("security", "--offline=true", "--threshold=15", unit=unit)
    assert done.returncode == 0, done.stdout + done.stderr


def _wait_for_ready(listener: socket.socket, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Bounded wait for READY=1 on the notify socket; a daemon that exits
    fails at once."""
    listener.settimeout(0.5)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the daemon exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if b"READY=1" in listener.recv(4096):
                return
        except TimeoutError:
            pass
    raise AssertionError(f"no READY=1 within 60 s:\n{log.read_text()}")


def test_the_unit_command_line_starts_the_daemon_as_systemd_would(tmp_path: Path) -> None:
    service = _unit()["Service"]
    argv = shlex.split(service["ExecStart"])
    config = write_config(tmp_path, {name: {"listen": "tcp:0:interface=127.0.0.1"} for name in LISTENERS})
    argv[0] = str(TWISTD)
    argv[argv.index("--config") + 1] = str(config)
    assert service["Type"] == "notify"
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(address)
        with open(tmp_path / "mdmd.log", "wb") as log:
            proc = subprocess.Popen(
                argv,
                env=dict(daemon_env(), NOTIFY_SOCKET=address),
                umask=int(service["UMask"], 8),
                cwd=tmp_path,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            _wait_for_ready(listener, proc, tmp_path / "mdmd.log")
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    state = tmp_path / "state"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for path in state.iterdir():
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o077 == 0 or path.suffix == ".pem", (path.name, oct(mode))

    # A bad configuration exits with a status systemd does not restart on.
    bad = tmp_path / "bad.ini"
    bad.write_text(config.read_text().replace("[admin]", "[admin]\nno_such_key = 1", 1))
    argv[argv.index("--config") + 1] = str(bad)
    done = subprocess.run(
        argv, env=daemon_env(), umask=int(service["UMask"], 8), cwd=tmp_path, capture_output=True, timeout=60
    )
    assert str(done.returncode) in service["RestartPreventExitStatus"].split(), done.stderr


def test_bootstrapped_server_certificate_is_ecdsa_p256_for_cheap_handshakes(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    target = tmp_path / "state"
    assert mdmctl(["init", str(target)]) == 0
    server = x509.load_pem_x509_certificate((target / "tls-server.pem").read_bytes())
    key = server.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    usage = server.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_encipherment
    # The CAs stay RSA (Windows' certificate stores and the device chain).
    root = x509.load_pem_x509_certificate((target / "tls-root.pem").read_bytes())
    identity = x509.load_pem_x509_certificate((target / "wstep-identity.pem").read_bytes())
    assert isinstance(root.public_key(), rsa.RSAPublicKey)
    assert isinstance(identity.public_key(), rsa.RSAPublicKey)
    server.verify_directly_issued_by(root)


def test_systemd_readiness_and_watchdog_notifications(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    address = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(address)
    listener.settimeout(60)
    env = dict(daemon_env(), NOTIFY_SOCKET=address, WATCHDOG_USEC="200000")
    proc = spawn_twistd(config, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        messages = [listener.recv(4096) for _ in range(3)]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        listener.close()
    # READY once all three listeners are up, then watchdog pings from the reactor.
    assert b"READY=1" in b"".join(messages)
    assert any(m == b"WATCHDOG=1" for m in messages)
