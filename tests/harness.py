"""Run the real daemon (``twistd -n mdmd``) on loopback for integration tests.

Tests talk to it over real sockets with stdlib clients, as a device would.

Ports are race-free: the harness binds each listening socket itself (port 0,
loopback) and keeps it open for the rest of the test run, so no other process
can take the port between the moment it is chosen and the moment the daemon
serves it, and the configuration's public URLs carry the real port from the
start.  The daemon receives the sockets the way systemd hands them over
(socket activation, sd_listen_fds(3)): as file descriptors 3, 4 and 5 with
``LISTEN_FDS``, ``LISTEN_FDNAMES`` and ``LISTEN_PID``, and its configuration
names them ``listen = systemd:domain=INET:name=...``.
"""

from __future__ import annotations

import fcntl
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
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.client import HTTPConnection, HTTPResponse, HTTPSConnection
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_CONFIG = REPO / "etc" / "mdmd.ini"
TWISTD = Path(sys.executable).with_name("twistd")

STARTUP_TIMEOUT = 60.0

#: The daemon's listeners, in the order their sockets are handed over.
LISTENERS = ("enrollment", "management", "admin")
# sd_listen_fds(3): the first passed socket is file descriptor 3.
_SD_LISTEN_FDS_START = 3
# What Twisted uses for tcp: endpoints.
_BACKLOG = 50


@dataclass
class Listeners:
    """Listening sockets on loopback, bound and kept by the harness."""

    sockets: dict[str, socket.socket]

    @classmethod
    def bind(cls) -> Listeners:
        sockets = {}
        for name in LISTENERS:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sock.listen(_BACKLOG)
            sockets[name] = sock
        return cls(sockets)

    def port(self, name: str) -> int:
        return int(self.sockets[name].getsockname()[1])


# Each configuration written by write_config, with the sockets its daemon
# gets.  They stay open until the test process ends, so that a daemon
# restarted on the same configuration finds the same ports.
_LISTENERS: dict[Path, Listeners] = {}


def listeners_of(config: Path) -> Listeners:
    try:
        return _LISTENERS[config.resolve()]
    except KeyError:
        raise AssertionError(f"{config} was not written by harness.write_config") from None


@contextmanager
def refused_port() -> Iterator[int]:
    """A loopback port that refuses connections while the block runs: it is
    bound, so nothing else can listen on it, but nothing listens."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


def daemon_env() -> dict[str, str]:
    env = dict(os.environ)
    # Run the checkout's code (and its twisted/plugins dropin) whatever is
    # installed; warnings are errors so deprecations surface in CI.
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("NOTIFY_SOCKET", None)
    env.pop("WATCHDOG_USEC", None)
    return env


def postgresql_store() -> dict[str, str]:
    """The ``[store]`` settings of a new, empty database in the session's
    throwaway PostgreSQL cluster (see pg_cluster.py); the test is skipped
    when PostgreSQL is not installed and not required."""
    from pg_cluster import cluster_or_skip

    cluster = cluster_or_skip()
    return {"backend": "postgresql", "dsn": cluster.dsn(cluster.create_database()), "pool_size": "3"}


def write_config(
    directory: Path,
    overrides: Mapping[str, Mapping[str, str | None]] | None = None,
    *,
    store: str = "sqlite",
) -> Path:
    """The example config with listening sockets of its own (see the module's
    docstring), state in *directory*/state, and *overrides* applied (a value of
    None deletes the key).  *store* ``postgresql``: a new database of the
    test cluster (:func:`postgresql_store`)."""
    if store == "postgresql":
        overrides = {
            **(overrides or {}),
            "store": {**postgresql_store(), **(overrides or {}).get("store", {})},
        }
    listeners = Listeners.bind()
    enrollment, management, admin = (listeners.port(name) for name in LISTENERS)
    base: dict[str, dict[str, str | None]] = {
        "mdmd": {"state_dir": "state"},
        "enrollment": {
            "listen": "systemd:domain=INET:name=enrollment",
            "url": f"https://localhost:{enrollment}",
        },
        "management": {
            "listen": "systemd:domain=INET:name=management",
            "url": f"https://localhost:{management}/api/mdm/microsoft/management",
        },
        "admin": {"listen": "systemd:domain=INET:name=admin", "url": f"http://127.0.0.1:{admin}"},
    }
    for section, values in (overrides or {}).items():
        base.setdefault(section, {}).update(values)
    text = edit_ini(EXAMPLE_CONFIG.read_text(), base)
    path = directory / "mdmd.ini"
    path.write_text(text)
    _LISTENERS[path.resolve()] = listeners
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


def spawn_twistd(
    config: Path, *, env: Mapping[str, str] | None = None, prefix: Sequence[str] = (), **popen: Any
) -> subprocess.Popen[Any]:
    """Start ``twistd -n mdmd --config CONFIG`` (after the command *prefix*,
    such as ``taskset``) with the listening sockets of *config*, if it has
    any, passed the way systemd socket activation passes them.  *popen* goes
    to :class:`subprocess.Popen`."""
    argv = [str(TWISTD), "-n", "--pidfile=", "mdmd", "--config", str(config)]
    child_env = dict(daemon_env() if env is None else env)
    listeners = _LISTENERS.get(config.resolve())
    if listeners is None:
        return subprocess.Popen([*prefix, *argv], env=child_env, cwd=config.parent, **popen)
    # Twisted reads LISTEN_PID/LISTEN_FDS when it is imported and takes the
    # sockets only if LISTEN_PID is its own process ID, which is known once
    # the process exists: bash moves the sockets to fds 3, 4, 5 and execs
    # twistd (same pid) with LISTEN_PID=$$.  The sockets are first copied
    # above that range, so that moving one cannot overwrite another.
    above = _SD_LISTEN_FDS_START + len(LISTENERS)
    passed = [
        fcntl.fcntl(listeners.sockets[name].fileno(), fcntl.F_DUPFD_CLOEXEC, above) for name in LISTENERS
    ]
    moves = " ".join(f"{_SD_LISTEN_FDS_START + n}<&{fd} {fd}<&-" for n, fd in enumerate(passed))
    child_env.update(LISTEN_FDS=str(len(LISTENERS)), LISTEN_FDNAMES=":".join(LISTENERS))
    child_env.pop("LISTEN_PID", None)
    try:
        return subprocess.Popen(
            [*prefix, "bash", "-c", f'exec {moves}; LISTEN_PID=$$ exec "$0" "$@"', *argv],
            env=child_env,
            pass_fds=passed,
            cwd=config.parent,
            **popen,
        )
    finally:
        for fd in passed:
            os.close(fd)


def run_twistd(config: Path, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run the daemon expecting it to exit (a start-up failure)."""
    proc = spawn_twistd(config, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@dataclass
class Daemon:
    config: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    ini: dict[str, dict[str, str]] = field(default_factory=dict)
    #: Where requests go, when not to this daemon's own listeners (the
    #: load balancer in front of several nodes).
    ports: dict[str, int] | None = None

    @property
    def state(self) -> Path:
        return (self.config.parent / self.ini.get("mdmd", {}).get("state_dir", "state")).resolve()

    def url(self, section: str) -> str:
        return self.ini[section]["url"]

    def port(self, section: str) -> int:
        if self.ports is not None and section in self.ports:
            return self.ports[section]
        return listeners_of(self.config).port(section)

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


def start_daemon(config: Path, *, clock_offset: float = 0.0) -> Daemon:
    """Start the daemon on *config*; *clock_offset* seconds move its clock
    (the test-only ``MDMD_TEST_CLOCK_OFFSET``, see :mod:`mdmd.app`)."""
    from mdmd.app import TEST_CLOCK_OFFSET_VARIABLE

    log_path = config.parent / "mdmd.log"
    env = daemon_env()
    env.pop(TEST_CLOCK_OFFSET_VARIABLE, None)
    if clock_offset:
        env[TEST_CLOCK_OFFSET_VARIABLE] = repr(float(clock_offset))
    log_file = open(log_path, "wb")  # noqa: SIM115 - handed to the child
    proc = spawn_twistd(config, env=env, stdout=log_file, stderr=subprocess.STDOUT)
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
    directory: Path,
    overrides: Mapping[str, Mapping[str, str | None]] | None = None,
    *,
    clock_offset: float = 0.0,
    store: str = "sqlite",
) -> Iterator[Daemon]:
    daemon = start_daemon(write_config(directory, overrides, store=store), clock_offset=clock_offset)
    try:
        yield daemon
    finally:
        daemon.stop()


# --------------------------------------------------------------------------
# Several nodes on one PostgreSQL database, behind haproxy
# --------------------------------------------------------------------------

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
#: The listeners haproxy balances (the admin API stays per node).
BALANCED = ("enrollment", "management")


def haproxy_config(
    frontends: Mapping[str, str], backends: Mapping[str, Sequence[int]], *, proxy_protocol: bool = False
) -> str:
    """A TCP-mode haproxy configuration: each listener's *frontends* bind
    (``fd@N`` for an inherited socket, or ``ADDR:PORT``) balanced over the
    nodes' ports of that listener.  TLS passes through untouched, so mutual
    TLS stays between the device and the node (etc/haproxy.cfg is the
    documented sample)."""
    lines = [
        "global",
        "    log stderr format raw local0 info",
        "    maxconn 4096",
        "defaults",
        "    mode tcp",
        "    log global",
        "    option tcplog",
        "    timeout connect 2s",
        "    timeout client 120s",
        "    timeout server 120s",
        # A connection to a dead node is refused: try again, on another.
        "    retries 3",
        "    option redispatch 1",
    ]
    for name in BALANCED:
        lines += [
            f"frontend {name}",
            f"    bind {frontends[name]}",
            f"    default_backend {name}_nodes",
            f"backend {name}_nodes",
            "    balance roundrobin",
        ]
        lines += [
            f"    server node{n} 127.0.0.1:{port}{' send-proxy-v2' if proxy_protocol else ''}"
            " check inter 500ms fall 1 rise 2"
            for n, port in enumerate(backends[name], 1)
        ]
    return "\n".join(lines) + "\n"


@dataclass
class Nodes:
    """Several mdmd nodes on one database and key material, and haproxy in
    front of their enrollment and management listeners.  ``front`` is a
    Daemon whose requests go through haproxy (its admin API is node 1's)."""

    nodes: list[Daemon]
    front: Daemon
    haproxy: subprocess.Popen[bytes]
    haproxy_log: Path

    def kill(self, node: Daemon) -> None:
        """kill -9 of *node*, and its listening sockets gone with it, as
        with a real process (the harness keeps its own copies so that a
        restarted daemon finds its ports; these would go on accepting
        connections nobody serves)."""
        node.proc.send_signal(signal.SIGKILL)
        node.proc.wait()
        for sock in listeners_of(node.config).sockets.values():
            sock.close()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        if self.haproxy.poll() is None:
            self.haproxy.terminate()
            try:
                self.haproxy.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.haproxy.kill()
                self.haproxy.wait()


def start_nodes(
    directory: Path,
    count: int = 2,
    overrides: Mapping[str, Mapping[str, str | None]] | None = None,
    *,
    proxy_protocol: bool = False,
) -> Nodes:
    """*count* nodes (``node1``, ``node2``, ... under *directory*) sharing a
    new database of the test cluster and node 1's state folder (the key
    material), each with its own listeners, and haproxy on two more
    loopback sockets of the harness, which are the public URLs.  With
    *proxy_protocol*, haproxy sends the PROXY protocol header and the
    nodes' device listeners expect it."""
    front = Listeners.bind()
    public = {
        "enrollment": {"url": f"https://localhost:{front.port('enrollment')}"},
        "management": {"url": f"https://localhost:{front.port('management')}/api/mdm/microsoft/management"},
        "store": postgresql_store(),
    }
    if proxy_protocol:
        for section in BALANCED:
            public[section]["proxy_protocol"] = "yes"
    settings: dict[str, dict[str, str | None]] = {s: dict(v) for s, v in (overrides or {}).items()}
    for section, values in public.items():
        settings.setdefault(section, {}).update(values)
    nodes: list[Daemon] = []
    haproxy: subprocess.Popen[bytes] | None = None
    try:
        for n in range(1, count + 1):
            folder = directory / f"node{n}"
            folder.mkdir()
            if n > 1:
                # The same key material, which node 1 created (bootstrap),
                # in a state folder of its own (a node locks its folder).
                shutil.copytree(nodes[0].state, folder / "state", ignore=shutil.ignore_patterns("mdmd.lock"))
            nodes.append(start_daemon(write_config(folder, settings)))
        log_path = directory / "haproxy.log"
        fds = {name: front.sockets[name].fileno() for name in BALANCED}
        config = directory / "haproxy.cfg"
        config.write_text(
            haproxy_config(
                {name: f"fd@{fd}" for name, fd in fds.items()},
                {name: [node.port(name) for node in nodes] for name in BALANCED},
                proxy_protocol=proxy_protocol,
            )
        )
        with open(log_path, "wb") as log:
            haproxy = subprocess.Popen(
                [HAPROXY, "-f", str(config), "-db"],
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=list(fds.values()),
            )
        ports = {name: front.port(name) for name in BALANCED}
        entry = Daemon(nodes[0].config, nodes[0].proc, nodes[0].log_path, nodes[0].ini, ports=ports)
        # The harness's sockets queue connections until haproxy accepts
        # them; a first connection through proves it serves.
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if haproxy.poll() is not None:
                raise AssertionError(f"haproxy exited with {haproxy.returncode}:\n{log_path.read_text()}")
            try:
                entry.request("GET", "/api/mdm/microsoft/discovery")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        # Keep the front sockets open as long as the test process lives.
        _LISTENERS[(directory / "haproxy.cfg").resolve()] = front
        return Nodes(nodes, entry, haproxy, log_path)
    except BaseException:
        for node in nodes:
            node.stop()
        if haproxy is not None and haproxy.poll() is None:
            haproxy.kill()
            haproxy.wait()
        raise


@contextmanager
def running_nodes(
    directory: Path,
    count: int = 2,
    overrides: Mapping[str, Mapping[str, str | None]] | None = None,
    *,
    proxy_protocol: bool = False,
) -> Iterator[Nodes]:
    nodes = start_nodes(directory, count, overrides, proxy_protocol=proxy_protocol)
    try:
        yield nodes
    finally:
        nodes.stop()


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
    return mdm_enroll(daemon, device, discovery)


def mdm_enroll(daemon: Daemon, device: object, discovery: str | None = None) -> object:
    """The MS-MDE2 part of :func:`enroll_device` (discovery, policy,
    enrollment) for a device whose agent has enrolled; also what Windows
    does when it enrolls again by itself."""
    from mdmd.sim.device import WindowsDevice

    assert isinstance(device, WindowsDevice)
    discovery = discovery or daemon.url("enrollment") + "/api/mdm/microsoft/discovery"
    _, body = daemon.request("POST", "/api/mdm/microsoft/discovery", device.discover_request(discovery), SOAP)
    policy_url, enrollment_url = device.discover_result(body)
    _, body = daemon.request(
        "POST", "/api/mdm/microsoft/policy", device.get_policies_request(policy_url), SOAP
    )
    device.policy_min_key_bits(body)
    _, body = daemon.request("POST", "/api/mdm/microsoft/enroll", device.enroll_request(enrollment_url), SOAP)
    return device.enrolled(body)


def renewal_exchange(
    daemon: Daemon, device: object, context: ssl.SSLContext, new_key: object, *, signer_key: object = None
) -> bytes:
    """Windows' automatic renewal over real TLS: discovery at the provisioned
    ``Renew/ServerURL`` (GET probe, then Discover), GetPolicies, then the
    Renew RequestSecurityToken, each on the management listener over TLS
    authenticated by *context* (the device's current certificate).  Returns
    the last answer; the device installs it with ``device.renewed``."""
    from urllib.parse import urlsplit

    from mdmd.sim.device import WindowsDevice

    assert isinstance(device, WindowsDevice) and device.enrollment is not None
    schedule = device.enrollment.renewal
    assert schedule is not None, "the enrollment advertised no renewal"
    assert urlsplit(schedule.server_url).port == daemon.port("management")

    def post(url: str, body: bytes) -> bytes:
        response, answer = daemon.request(
            "POST", urlsplit(url).path, body, SOAP, section="management", context=context
        )
        assert response.status == 200, (response.status, answer)
        return answer

    probe, _ = daemon.request(
        "GET", urlsplit(schedule.server_url).path, section="management", context=context
    )
    assert probe.status == 200
    policy_url, enrollment_url = device.discover_result(
        post(schedule.server_url, device.discover_request(schedule.server_url))
    )
    device.policy_min_key_bits(post(policy_url, device.renewal_policies_request(policy_url)))
    return post(enrollment_url, device.renew_request(enrollment_url, new_key, signer_key=signer_key))  # type: ignore[arg-type]


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


def store_dsn(daemon: Daemon) -> str | None:
    """The daemon's PostgreSQL connection string (None: it runs on SQLite)."""
    store = daemon.ini.get("store", {})
    return store.get("dsn") if store.get("backend", "sqlite").lower() == "postgresql" else None


def db_rows(daemon: Daemon, sql: str, *args: object) -> list[Any]:
    """Read the daemon's store (read-only) the way an auditor would: *sql*
    with ``?`` parameters, rows by position and by column name."""
    dsn = store_dsn(daemon)
    if dsn is not None:
        return postgresql_rows(dsn, sql, *args)
    import sqlite3

    conn = sqlite3.connect(f"file:{daemon.state / 'mdmd.sqlite3'}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return [_SQLiteRow(row) for row in conn.execute(sql, args)]
    finally:
        conn.close()


def postgresql_rows(dsn: str, sql: str, *args: object) -> list[Any]:
    import psycopg

    from mdmd.store.postgresql import PgConnection

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.read_only = True
        return [_SQLiteRow(row) for row in PgConnection(conn).execute(sql, args)]


class _SQLiteRow(tuple):  # type: ignore[type-arg]
    """A row that is a tuple (compares equal to one) and also answers to
    column names, from either backend."""

    _names: dict[str, int]

    def __new__(cls, row: Any) -> _SQLiteRow:
        made = super().__new__(cls, tuple(row[i] for i in range(len(row))))
        made._names = {name: i for i, name in enumerate(row.keys())}
        return made

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return super().__getitem__(self._names[key])
        return super().__getitem__(key)

    def keys(self) -> list[str]:
        return list(self._names)
