"""What an operator installs: the twistd plugin, mdmctl init, the systemd unit."""

from __future__ import annotations

import configparser
import os
import stat
import subprocess
import sys
from pathlib import Path

from harness import REPO, TWISTD, daemon_env
from mdmd.mdmctl import main as mdmctl


def test_twistd_lists_the_mdmd_plugin() -> None:
    result = subprocess.run(
        [str(TWISTD), "--help"], env=daemon_env(), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    assert any(line.split()[:1] == ["mdmd"] for line in result.stdout.splitlines()), result.stdout


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


def test_mdmctl_is_a_console_script() -> None:
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    assert "mdmctl = mdmd.mdmctl:main" in parser["options.entry_points"]["console_scripts"]
    result = subprocess.run(
        [sys.executable, "-m", "mdmd.mdmctl", "--help"], env=daemon_env(), capture_output=True, text=True
    )
    assert result.returncode == 0 and "init" in result.stdout


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(REPO / "systemd" / "mdmd.service")
    return parser


def test_systemd_unit_runs_twistd_hardened() -> None:
    service = _unit()["Service"]
    assert service["ExecStart"].endswith("twistd --nodaemon --pidfile= mdmd --config /etc/mdmd/mdmd.ini")
    assert service["User"] == "mdmd" and service["StateDirectory"] == "mdmd"
    assert service["UMask"] == "0077"
    assert service["Restart"] == "on-failure"
    for key, value in {
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "ProtectHome": "yes",
        "PrivateDevices": "yes",
    }.items():
        assert service[key] == value, key
    # Under it Twisted cannot build a TLS context (pyOpenSSL's cffi callbacks
    # need memory that is both writable and executable).
    assert "MemoryDenyWriteExecute" not in service


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
    import socket

    from harness import spawn_twistd, write_config

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
