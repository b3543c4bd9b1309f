"""Run the real daemon (``twistd -n mdmd``) on loopback for integration tests.

Tests talk to it over real sockets with stdlib clients, as a device would.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.client import HTTPConnection, HTTPResponse, HTTPSConnection
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_CONFIG = REPO / "etc" / "mdmd.ini"
TWISTD = Path(sys.executable).with_name("twistd")

STARTUP_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def daemon_env() -> dict[str, str]:
    env = dict(os.environ)
    # Run the checkout's code (and its twisted/plugins dropin) whatever is
    # installed; warnings are errors so deprecations surface in CI.
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("NOTIFY_SOCKET", None)
    env.pop("WATCHDOG_USEC", None)
    return env


def write_config(directory: Path, overrides: Mapping[str, Mapping[str, str | None]] | None = None) -> Path:
    """The example config with fresh loopback ports, state in *directory*/state,
    and *overrides* applied (a value of None deletes the key)."""
    enrollment, management, admin = free_port(), free_port(), free_port()
    base: dict[str, dict[str, str | None]] = {
        "mdmd": {"state_dir": "state"},
        "enrollment": {
            "listen": f"tcp:{enrollment}:interface=127.0.0.1",
            "url": f"https://localhost:{enrollment}",
        },
        "management": {
            "listen": f"tcp:{management}:interface=127.0.0.1",
            "url": f"https://localhost:{management}/api/mdm/microsoft/management",
        },
        "admin": {"listen": f"tcp:{admin}:interface=127.0.0.1"},
    }
    for section, values in (overrides or {}).items():
        base.setdefault(section, {}).update(values)
    text = edit_ini(EXAMPLE_CONFIG.read_text(), base)
    path = directory / "mdmd.ini"
    path.write_text(text)
    return path


def edit_ini(text: str, changes: Mapping[str, Mapping[str, str | None]]) -> str:
    """Set keys in an INI text, keeping its comments and layout."""
    lines = text.splitlines()
    out: list[str] = []
    section = None
    pending = {s: dict(v) for s, v in changes.items()}

    def flush(sec: str | None) -> None:
        if sec is not None:
            for key, value in pending.pop(sec, {}).items():
                if value is not None:
                    out.append(f"{key} = {value}")

    for line in lines:
        header = re.match(r"^\[(.+)\]\s*$", line)
        if header:
            flush(section)
            section = header.group(1)
            out.append(line)
            continue
        keyline = re.match(r"^#?\s*([A-Za-z_]+)\s*=", line)
        if section is not None and keyline and keyline.group(1) in pending.get(section, {}):
            value = pending[section].pop(keyline.group(1))
            if value is not None:
                out.append(f"{keyline.group(1)} = {value}")
            continue
        out.append(line)
    flush(section)
    for sec, values in pending.items():
        out.append(f"[{sec}]")
        out.extend(f"{k} = {v}" for k, v in values.items() if v is not None)
    return "\n".join(out) + "\n"


def run_twistd(config: Path, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run the daemon expecting it to exit (a start-up failure)."""
    return subprocess.run(
        [str(TWISTD), "-n", "--pidfile=", "mdmd", "--config", str(config)],
        env=daemon_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=config.parent,
    )


@dataclass
class Daemon:
    config: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    ini: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def state(self) -> Path:
        return self.config.parent / "state"

    def url(self, section: str) -> str:
        return self.ini[section]["url"]

    def port(self, section: str) -> int:
        return int(self.ini[section]["listen"].split(":")[1])

    @property
    def ca_file(self) -> Path:
        return self.state / "tls-root.pem"

    @property
    def admin_token(self) -> str:
        return (self.state / "admin_token").read_text().strip()

    @property
    def enroll_secret(self) -> str:
        return (self.state / "enroll_secret").read_text().strip()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        return ctx

    def https(self, section: str = "enrollment", context: ssl.SSLContext | None = None) -> HTTPSConnection:
        return HTTPSConnection(
            "localhost", self.port(section), context=context or self.server_context(), timeout=30
        )

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        *,
        section: str = "enrollment",
        context: ssl.SSLContext | None = None,
    ) -> tuple[HTTPResponse, bytes]:
        conn = (
            self.https(section, context)
            if section != "admin"
            else HTTPConnection("127.0.0.1", self.port("admin"), timeout=30)
        )
        try:
            conn.request(method, path, body=body, headers=dict(headers or {}))
            response = conn.getresponse()
            return response, response.read()
        finally:
            conn.close()

    def post_json(self, path: str, obj: object) -> tuple[int, dict[str, object]]:
        response, body = self.request(
            "POST", path, json.dumps(obj).encode(), {"Content-Type": "application/json"}
        )
        return response.status, json.loads(body)

    def admin(
        self, method: str, path: str, obj: object | None = None, token: str | None = "default"
    ) -> tuple[int, object]:
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {self.admin_token if token == 'default' else token}"
        body = None if obj is None else json.dumps(obj).encode()
        response, data = self.request(method, path, body, headers, section="admin")
        return response.status, json.loads(data) if data else None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)


def _parse_ini(path: Path) -> dict[str, dict[str, str]]:
    import configparser

    parser = configparser.ConfigParser(interpolation=None)
    parser.read(path)
    return {s: dict(parser[s]) for s in parser.sections()}


def start_daemon(config: Path) -> Daemon:
    log_path = config.parent / "mdmd.log"
    log_file = open(log_path, "wb")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        [str(TWISTD), "-n", "--pidfile=", "mdmd", "--config", str(config)],
        env=daemon_env(),
        stdout=log_file,
        stderr=subprocess.STDOUT,
        cwd=config.parent,
    )
    log_file.close()
    daemon = Daemon(config=config, proc=proc, log_path=log_path, ini=_parse_ini(config))
    deadline = time.monotonic() + STARTUP_TIMEOUT
    # Bounded polling on the daemon's own log: ready when all three
    # listeners have said where they listen.
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited with {proc.returncode}:\n{daemon.log_text()}")
        if daemon.log_text().count(" listener (") >= 3:
            return daemon
        time.sleep(0.05)
    daemon.stop()
    raise AssertionError(f"daemon not ready within {STARTUP_TIMEOUT}s:\n{daemon.log_text()}")


@contextmanager
def running_daemon(
    directory: Path, overrides: Mapping[str, Mapping[str, str | None]] | None = None
) -> Iterator[Daemon]:
    daemon = start_daemon(write_config(directory, overrides))
    try:
        yield daemon
    finally:
        daemon.stop()


def copy_state(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst)


SOAP = {"Content-Type": "application/soap+xml; charset=utf-8"}
SYNCML = {"Content-Type": "application/vnd.syncml.dm+xml"}
MANAGEMENT_PATH = "/api/mdm/microsoft/management?mode=Maintenance&Platform=WoA"


def enroll_device(daemon: Daemon, device: object) -> object:
    """Run the whole enrollment flow for *device* (a WindowsDevice) over real
    TLS, as the agent and Windows do; return its EnrollmentResult."""
    from mdmd.sim.device import WindowsDevice

    assert isinstance(device, WindowsDevice)
    status, answer = daemon.post_json(
        "/api/fleet/orbit/enroll", device.orbit_enroll_request(daemon.enroll_secret)
    )
    assert status == 200, answer
    device.orbit_enrolled(answer)
    status, config = daemon.post_json("/api/fleet/orbit/config", device.orbit_config_request())
    assert status == 200, config
    discovery = device.discovery_endpoint(config)
    assert discovery is not None
    _, body = daemon.request("POST", "/api/mdm/microsoft/discovery", device.discover_request(discovery), SOAP)
    policy_url, enrollment_url = device.discover_result(body)
    _, body = daemon.request(
        "POST", "/api/mdm/microsoft/policy", device.get_policies_request(policy_url), SOAP
    )
    device.policy_min_key_bits(body)
    _, body = daemon.request("POST", "/api/mdm/microsoft/enroll", device.enroll_request(enrollment_url), SOAP)
    return device.enrolled(body)


def client_tls_context(daemon: Daemon, directory: Path, cert: object, key: object) -> ssl.SSLContext:
    """A TLS client context presenting *cert* and *key* (cryptography objects)."""
    from mdmd import pki

    ctx = daemon.server_context()
    cert_path = directory / f"client-{id(cert)}.pem"
    key_path = directory / f"client-{id(cert)}.key"
    cert_path.write_bytes(pki.cert_to_pem(cert))  # type: ignore[arg-type]
    key_path.write_bytes(pki.key_to_pem(key))  # type: ignore[arg-type]
    ctx.load_cert_chain(str(cert_path), str(key_path))
    return ctx


def db_rows(daemon: Daemon, sql: str, *args: object) -> list[tuple[object, ...]]:
    """Read the daemon's store (read-only) the way an auditor would."""
    import sqlite3

    conn = sqlite3.connect(f"file:{daemon.state / 'mdmd.sqlite3'}?mode=ro", uri=True)
    try:
        return list(conn.execute(sql, args))
    finally:
        conn.close()
