"""What an operator watches: /healthz, /readyz and /metrics on the admin
listener without the token, and JSON log lines (a daemon with
``log_format = json``); readiness and the fleet counts' cache in process."""

from __future__ import annotations

import json
import os
import signal
import ssl
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from harness import (
    MANAGEMENT_PATH,
    SYNCML,
    Daemon,
    client_tls_context,
    enroll_device,
    running_daemon,
)
from mdmd import pki
from mdmd.health import FleetCountsCache, Readiness, store_check
from mdmd.sim.device import EnrollmentResult, ManagementClient, WindowsDevice
from mdmd.store import FleetCounts, Store


@dataclass
class Synced:
    device: WindowsDevice
    enrollment: EnrollmentResult


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, store_backend: str) -> Iterator[Daemon]:
    overrides = {"mdmd": {"log_format": "json"}, "admin": {"metrics_cache_seconds": "0"}}
    with running_daemon(tmp_path_factory.mktemp("operations"), overrides, store=store_backend) as d:
        yield d


@pytest.fixture(scope="module")
def synced(daemon: Daemon, tmp_path_factory: pytest.TempPathFactory) -> Synced:
    """One device enrolled that had one whole OMA-DM session."""
    device = WindowsDevice(key=pki.generate_rsa_key(), hostname="DESKTOP-OPS")
    result = enroll_device(daemon, device)
    assert isinstance(result, EnrollmentResult)
    tls = client_tls_context(daemon, tmp_path_factory.mktemp("ops-tls"), result.certificate, device.key)
    client = ManagementClient(device)
    message: bytes | None = client.session_start(result.management_url)
    while message is not None:
        response, body = daemon.request(
            "POST", MANAGEMENT_PATH, message, SYNCML, section="management", context=tls
        )
        assert response.status == 200, body
        message = client.respond(client.read(body))
    return Synced(device, result)


# --- health and readiness ---


def test_health_and_readiness_answer_without_a_token(daemon: Daemon) -> None:
    assert daemon.admin("GET", "/healthz", token=None) == (200, {"status": "ok"})
    assert daemon.admin("GET", "/readyz", token=None) == (200, {"status": "ready"})


def _run(d: Deferred[Any]) -> Any:
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "did not complete"
    return box[0]


def test_readiness_names_every_problem() -> None:
    readiness = Readiness()

    async def fine() -> str | None:
        return None

    async def down() -> str | None:
        return "not listening"

    async def broken() -> str | None:
        raise OSError("disk full")

    readiness.add("admin listener", fine)
    readiness.add("enrollment listener", down)
    readiness.add("store", broken)
    problems = _run(Deferred.fromCoroutine(readiness.problems()))
    assert problems == ["enrollment listener: not listening", "store: OSError: disk full"]


class _Store:
    """The two store calls readiness and the metrics make, answered by hand."""

    def __init__(self) -> None:
        self.writes: list[Deferred[None]] = []
        self.counts: list[Deferred[FleetCounts]] = []

    def check_writable(self, now: float) -> Deferred[None]:
        self.writes.append(Deferred())
        return self.writes[-1]

    def fleet_counts(self, now: float) -> Deferred[FleetCounts]:
        self.counts.append(Deferred())
        return self.counts[-1]


def test_a_store_that_does_not_commit_in_time_is_not_ready() -> None:
    store, clock = _Store(), Clock()
    check = store_check(cast(Store, store), clock, timeout=5.0)
    waiting = Deferred.fromCoroutine(check())
    clock.advance(4.9)
    assert not waiting.called
    clock.advance(0.2)
    assert _run(waiting) == "no commit within 5 s"
    store.writes[0].callback(None)  # the late answer is ignored
    answered = Deferred.fromCoroutine(check())
    store.writes[1].callback(None)
    assert _run(answered) is None and clock.getDelayedCalls() == []


def test_scrapes_share_one_read_of_the_fleet_counts() -> None:
    from mdmd import metrics

    store = _Store()
    cache = FleetCountsCache(cast(Store, store), Clock(), max_age=60)
    metrics.FLEET.updated_at = None
    first = Deferred.fromCoroutine(cache.refresh())
    second = Deferred.fromCoroutine(cache.refresh())
    assert len(store.counts) == 1 and not first.called and not second.called
    store.counts[0].callback({"devices": {"enrolled": 3.0}})
    assert _run(first) is None and _run(second) is None
    assert metrics.FLEET.counts == {"devices": {"enrolled": 3.0}}
    # Fresh enough: no read at all.
    assert _run(Deferred.fromCoroutine(cache.refresh())) is None and len(store.counts) == 1


def test_a_page_never_waits_for_a_long_count_of_the_fleet(monkeypatch: pytest.MonkeyPatch) -> None:
    from mdmd import metrics

    store, clock = _Store(), Clock()
    cache = FleetCountsCache(cast(Store, store), clock, max_age=10)
    monkeypatch.setattr(metrics.FLEET, "counts", None)
    monkeypatch.setattr(metrics.FLEET, "updated_at", None)
    # The first count is waited for a moment only: then the page has none.
    page = Deferred.fromCoroutine(cache.current(first_wait=0.1))
    assert not page.called and len(store.counts) == 1
    clock.advance(0.1)
    assert _run(page) == (None, None)
    store.counts[0].callback({"devices": {"enrolled": 3.0}})
    counts, at = _run(Deferred.fromCoroutine(cache.current()))
    assert counts == {"devices": {"enrolled": 3.0}} and at is not None and len(store.counts) == 1
    # Older than max_age: shown as they are while one fresh read runs beside.
    monkeypatch.setattr(metrics.FLEET, "updated_at", at - 11)
    assert _run(Deferred.fromCoroutine(cache.current()))[0] == {"devices": {"enrolled": 3.0}}
    assert _run(Deferred.fromCoroutine(cache.current()))[0] == {"devices": {"enrolled": 3.0}}
    assert len(store.counts) == 2
    store.counts[1].callback({"devices": {"enrolled": 4.0}})
    assert _run(Deferred.fromCoroutine(cache.current()))[0] == {"devices": {"enrolled": 4.0}}
    assert clock.getDelayedCalls() == []


# --- metrics ---


def _scrape(daemon: Daemon) -> dict[str, Any]:
    response, body = daemon.request("GET", "/metrics", section="admin")
    assert response.status == 200
    assert response.getheader("Content-Type", "").startswith("text/plain; version=")
    return {family.name: family for family in text_string_to_metric_families(body.decode())}


def _value(family: Any, **labels: str) -> float:
    values = [
        s.value
        for s in family.samples
        if all(s.labels.get(k) == v for k, v in labels.items()) and not s.name.endswith("_created")
    ]
    assert values, (family.name, labels, family.samples)
    return float(sum(values))


def test_metrics_are_scraped_without_a_token_in_prometheus_format(daemon: Daemon, synced: Synced) -> None:
    families = _scrape(daemon)
    # prometheus_client's parser names a counter without its _total suffix.
    for name, kind in {
        "mdmd_http_requests": "counter",
        "mdmd_http_request_duration_seconds": "histogram",
        "mdmd_agent_enrollments": "counter",
        "mdmd_enrollments": "counter",
        "mdmd_checkin_sessions": "counter",
        "mdmd_commands_queued": "counter",
        "mdmd_commands": "gauge",
        "mdmd_devices": "gauge",
        "mdmd_certificates_expiring_30d": "gauge",
        "mdmd_store_commit_seconds": "histogram",
        "mdmd_store_commit_batch_size": "histogram",
    }.items():
        assert name in families and families[name].type == kind, name
    requests = families["mdmd_http_requests"]
    assert _value(requests, listener="enrollment", endpoint="/api/mdm/microsoft/enroll", status="200") == 1
    session = {"listener": "management", "endpoint": "/api/mdm/microsoft/management", "status": "200"}
    assert _value(requests, **session) >= 1
    duration = families["mdmd_http_request_duration_seconds"]
    assert _value(duration, listener="enrollment", endpoint="/api/fleet/orbit/enroll", le="+Inf") == 1
    assert _value(families["mdmd_enrollments"]) == 1 and _value(families["mdmd_agent_enrollments"]) == 1
    assert _value(families["mdmd_checkin_sessions"]) == 1
    assert _value(families["mdmd_devices"], state="enrolled") == 1
    assert _value(families["mdmd_devices"], state="unenrolled") == 0
    assert _value(families["mdmd_commands"], state="pending") == 0
    assert _value(families["mdmd_certificates_expiring_30d"]) == 0
    commits = families["mdmd_store_commit_seconds"]
    assert _value(commits, le="+Inf") >= 3  # the host, the device, the session's step
    assert _value(families["mdmd_store_commit_batch_size"], le="+Inf") == _value(commits, le="+Inf")


def test_the_fleet_counts_follow_the_store(daemon: Daemon, synced: Synced) -> None:
    status, _ = daemon.admin(
        "POST",
        f"/api/v1/devices/{synced.device.device_id}/commands",
        {"verb": "Get", "items": [{"target": "./DevDetail/SwV"}]},
    )
    assert status == 201
    families = _scrape(daemon)
    assert _value(families["mdmd_commands"], state="pending") == 1
    assert _value(families["mdmd_commands_queued"]) == 1


# --- JSON logs ---


def _log_objects(daemon: Daemon) -> list[dict[str, Any]]:
    lines = [line for line in daemon.log_text().splitlines() if line.strip()]
    # Every line is one JSON object, twistd's own included.
    return [json.loads(line) for line in lines]


def test_every_log_line_is_a_json_object_with_the_common_fields(daemon: Daemon, synced: Synced) -> None:
    objects = _log_objects(daemon)
    assert len(objects) > 10
    for obj in objects:
        assert {"time", "level", "namespace", "message"} <= set(obj), obj
    assert any(o["message"].startswith("mdmd ") and "starting" in o["message"] for o in objects)


def test_a_json_request_line_names_client_request_device_session_and_message(
    daemon: Daemon, synced: Synced
) -> None:
    management = [
        o for o in _log_objects(daemon) if o.get("listener") == "management" and o.get("status") == 200
    ]
    assert management
    line = management[0]
    assert line["device_id"] == synced.device.device_id
    assert line["session"] and isinstance(line["msgid"], int)
    assert line["client"] == "127.0.0.1" and len(line["request_id"]) == 16
    assert isinstance(line["duration_ms"], float) and line["level"] == "info"


def test_a_request_id_given_by_a_proxy_is_in_the_answer_and_the_log(daemon: Daemon) -> None:
    response, _ = daemon.request("GET", "/healthz", headers={"X-Request-ID": "lb-4711"}, section="admin")
    assert response.getheader("X-Request-ID") == "lb-4711"
    (line,) = [o for o in _log_objects(daemon) if o.get("request_id") == "lb-4711"]
    assert line["path"] == "/healthz" and line["status"] == 200


# --- systemctl reload: new TLS certificates without dropping a connection ---


def poll(what: str, check: Callable[[], bool], timeout: float = 20.0) -> None:
    """Bounded polling for something the daemon does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout}s: {what}")


def new_server_certificate(state: Path, hosts: Sequence[str] = ("localhost",)) -> x509.Certificate:
    """A fresh server certificate and key from the daemon's development
    root, written where [enrollment] tls_cert and tls_key point."""
    root = x509.load_pem_x509_certificate((state / "tls-root.pem").read_bytes())
    root_key = load_pem_private_key((state / "tls-root.key").read_bytes(), None)
    assert isinstance(root_key, rsa.RSAPrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = pki.create_server_certificate(root, root_key, key, hosts, days=30, now=datetime.now(UTC))
    pki.write_file_atomic(str(state / "tls-server.key"), pki.key_to_pem(key), mode=0o600)
    pki.write_file_atomic(str(state / "tls-server.pem"), pki.cert_to_pem(cert), mode=0o644)
    return cert


def served_certificate(daemon: Daemon, section: str = "enrollment") -> x509.Certificate:
    conn = daemon.https(section)
    try:
        conn.connect()
        assert isinstance(conn.sock, ssl.SSLSocket)
        der = conn.sock.getpeercert(binary_form=True)
    finally:
        conn.close()
    assert der is not None
    return x509.load_der_x509_certificate(der)


def reloads(daemon: Daemon, outcome: str) -> int:
    return daemon.log_text().count(f"reload: TLS certificates {outcome}")


def test_a_reload_serves_the_new_certificate_and_keeps_open_connections(daemon: Daemon) -> None:
    before = served_certificate(daemon)
    kept = daemon.https()
    kept.request("GET", "/api/fleet/orbit/ping")
    assert kept.getresponse().read() is not None
    done = reloads(daemon, "reloaded")
    renewed = new_server_certificate(daemon.state)
    os.kill(daemon.proc.pid, signal.SIGHUP)
    poll("the reload", lambda: reloads(daemon, "reloaded") > done)
    assert served_certificate(daemon).serial_number == renewed.serial_number != before.serial_number
    # The mutual-TLS listener serves the same certificate (configured so).
    assert served_certificate(daemon, "management").serial_number == renewed.serial_number
    # The connection made before the reload still answers, on the old certificate.
    sock = kept.sock
    kept.request("GET", "/api/fleet/orbit/ping")
    assert kept.getresponse().status == 200 and kept.sock is sock
    assert isinstance(sock, ssl.SSLSocket)
    old_der = sock.getpeercert(binary_form=True)
    assert (
        old_der is not None and x509.load_der_x509_certificate(old_der).serial_number == before.serial_number
    )
    kept.close()


def test_a_reload_that_finds_a_bad_certificate_keeps_serving_the_old_one(daemon: Daemon) -> None:
    serving = served_certificate(daemon)
    refused = reloads(daemon, "NOT reloaded")
    new_server_certificate(daemon.state, hosts=["somewhere.example"])
    os.kill(daemon.proc.pid, signal.SIGHUP)
    poll("the refusal", lambda: reloads(daemon, "NOT reloaded") > refused)
    assert served_certificate(daemon).serial_number == serving.serial_number
    assert "host localhost is not covered by the TLS certificate" in daemon.log_text()
    # Fixed, and reloaded again.
    fixed = new_server_certificate(daemon.state)
    done = reloads(daemon, "reloaded")
    os.kill(daemon.proc.pid, signal.SIGHUP)
    poll("the reload", lambda: reloads(daemon, "reloaded") > done)
    assert served_certificate(daemon).serial_number == fixed.serial_number


def test_the_units_reload_command_reloads(daemon: Daemon) -> None:
    import configparser
    import shlex
    import subprocess

    from harness import REPO

    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(REPO / "systemd" / "mdmd.service")
    argv = [a.replace("$MAINPID", str(daemon.proc.pid)) for a in shlex.split(unit["Service"]["ExecReload"])]
    done = reloads(daemon, "reloaded")
    subprocess.run(argv, check=True, timeout=30)
    poll("the reload", lambda: reloads(daemon, "reloaded") > done)


def test_a_reload_gives_the_admin_listener_its_new_certificate_too(tmp_path: Path) -> None:
    """[admin] tls_cert: the API's certificate is renewed by a reload like
    the devices' listeners' (here all three share one), and a refused
    reload leaves every listener on the old one."""
    tls = {"tls_cert": "tls-server.pem", "tls_key": "tls-server.key"}
    with running_daemon(tmp_path, {"admin": tls}) as daemon:
        before = served_certificate(daemon, "admin")
        refused = reloads(daemon, "NOT reloaded")
        new_server_certificate(daemon.state, hosts=["somewhere.example"])
        os.kill(daemon.proc.pid, signal.SIGHUP)
        poll("the refusal", lambda: reloads(daemon, "NOT reloaded") > refused)
        assert served_certificate(daemon, "admin").serial_number == before.serial_number
        renewed = new_server_certificate(daemon.state)
        os.kill(daemon.proc.pid, signal.SIGHUP)
        poll("the reload", lambda: reloads(daemon, "reloaded:") > 0)
        assert served_certificate(daemon, "admin").serial_number == renewed.serial_number
        assert served_certificate(daemon).serial_number == renewed.serial_number
        assert f"admin {renewed.subject.rfc4514_string()} until" in daemon.log_text()
