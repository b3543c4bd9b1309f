"""The README's production steps ("Deployment with systemd"), carried out
without sudo: mdmctl init --no-tls, a brought-in certificate where the
configuration points, bootstrap = no, check-config, start."""

from __future__ import annotations

import os
import re
import socket
import ssl
import stat
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from http.client import HTTPSConnection
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from harness import REPO, daemon_env, start_daemon, write_config
from mdmd import pki
from mdmd.mdmctl import main as mdmctl

HOST = "mdm.example.com"


def _readme_deployment() -> str:
    text = (REPO / "README.md").read_text()
    return text[text.index("## Deployment with systemd") : text.index("## Administration")]


class _Connection(HTTPSConnection):
    """HTTPS to loopback, verifying the server as HOST (no DNS here)."""

    def connect(self) -> None:
        raw = socket.create_connection((self.host, self.port), self.timeout)
        self.sock = self._context.wrap_socket(raw, server_hostname=HOST)  # type: ignore[attr-defined]


def _ca(
    name: str, key: rsa.RSAPrivateKey, issuer: tuple[x509.Certificate, rsa.RSAPrivateKey] | None
) -> x509.Certificate:
    now = datetime.now(UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(
            x509.BasicConstraints(ca=True, path_length=None if issuer is None else 0), critical=True
        )
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(ski, critical=False)
    )
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


def _brought_in_certificate(directory: Path) -> Path:
    """A public root, an issuing CA and a server certificate for HOST, as a
    certificate vendor hands them out: fullchain.pem (server certificate,
    then the issuing CA) and privkey.pem; the root, which clients trust."""
    root_key, issuing_key = pki.generate_rsa_key(2048), pki.generate_rsa_key(2048)
    root = _ca("Example Public Root", root_key, None)
    issuing = _ca("Example Issuing CA", issuing_key, (root, root_key))
    key = ec.generate_private_key(ec.SECP256R1())
    server = pki.create_server_certificate(issuing, issuing_key, key, [HOST], days=30, now=datetime.now(UTC))
    (directory / "fullchain.pem").write_bytes(pki.cert_to_pem(server) + pki.cert_to_pem(issuing))
    (directory / "privkey.pem").write_bytes(pki.key_to_pem(key))
    (directory / "root.pem").write_bytes(pki.cert_to_pem(root))
    return directory / "root.pem"


def test_the_readme_production_steps_serve_a_brought_in_certificate(tmp_path: Path) -> None:
    steps = _readme_deployment()
    for step in ("mdmctl init --no-tls /var/lib/mdmd", "bootstrap = no", "tls-server.pem", "check-config"):
        assert step in steps, step

    # sudo -u mdmd mdmctl init --no-tls /var/lib/mdmd
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    assert mdmctl(["init", "--no-tls", str(state)]) == 0
    # install -m 0644 fullchain.pem .../tls-server.pem; install -m 0600 privkey.pem .../tls-server.key
    root = _brought_in_certificate(tmp_path)
    (state / "tls-server.pem").write_bytes((tmp_path / "fullchain.pem").read_bytes())
    (state / "tls-server.pem").chmod(0o644)
    key = state / "tls-server.key"
    key.touch(mode=0o600)
    key.write_bytes((tmp_path / "privkey.pem").read_bytes())

    # The configuration the README's comments describe.
    config = write_config(tmp_path, {"mdmd": {"bootstrap": "no"}})
    text = config.read_text()
    text = re.sub(r"https://localhost:(\d+)", rf"https://{HOST}:\1", text)
    config.write_text(text)

    check = subprocess.run(
        [sys.executable, "-m", "mdmd.mdmctl", "--config", str(config), "check-config"],
        env=daemon_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0 and check.stdout.strip().endswith(f"{config}: OK"), check

    daemon = start_daemon(config)
    try:
        # Nothing of the development root was made: the daemon serves what was brought in.
        assert not (state / "tls-root.pem").exists() and "bootstrap created" not in daemon.log_text()
        context = ssl.create_default_context(cafile=str(root))
        conn = _Connection("127.0.0.1", daemon.port("enrollment"), context=context, timeout=30)
        try:
            conn.request("GET", "/api/mdm/microsoft/discovery")
            response = conn.getresponse()
            response.read()
            assert response.status == 200
            assert isinstance(conn.sock, ssl.SSLSocket)
            served = x509.load_der_x509_certificate(conn.sock.getpeercert(binary_form=True) or b"")
            assert (
                served.subject
                == x509.load_pem_x509_certificate((tmp_path / "fullchain.pem").read_bytes()).subject
            )
        finally:
            conn.close()
        assert daemon.admin("GET", "/readyz", token=None) == (200, {"status": "ready"})
    finally:
        daemon.stop()
    for private in ("wstep-identity.key", "tls-server.key", "enroll_secret", "admin_token"):
        assert stat.S_IMODE(os.stat(state / private).st_mode) == 0o600, private


def test_a_backup_refuses_to_run_as_another_user(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give the database another owner")
    config = write_config(tmp_path)
    (tmp_path / "state").mkdir()
    database = tmp_path / "state" / "mdmd.sqlite3"
    database.write_bytes(b"")
    os.chown(database, 4242, 4242)
    done = subprocess.run(
        [sys.executable, "-m", "mdmd.mdmctl", "--config", str(config), "backup", str(tmp_path / "copy")],
        env=daemon_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and "run mdmctl backup as the user that owns" in done.stderr
    assert not (tmp_path / "copy").exists()
