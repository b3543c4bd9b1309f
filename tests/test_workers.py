"""[mdmd] workers = N: worker processes share the device listeners.

Each test proves that a worker, not the main process, served the requests:
the main process is stopped (SIGSTOP) while the device talks, so only a
worker can accept its connections.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_operations import new_server_certificate, served_certificate

from harness import Daemon, client_tls_context, db_rows, edit_ini, enroll_device, running_daemon, start_daemon
from mdmd import pki
from mdmd.sim.device import EnrollmentResult, ManagementClient, WindowsDevice
from omadm_helpers import Enrolled, post

WORKERS = 2
_SERVING = re.compile(r"worker (\d+) \(pid (\d+)\) serving")


def poll(what: str, check: object, timeout: float = 20.0) -> None:
    """Bounded polling for something another process does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout}s: {what}")


def serving_workers(daemon: Daemon) -> dict[int, int]:
    """index -> pid of the latest 'serving' line of each worker."""
    return {int(i): int(pid) for i, pid in _SERVING.findall(daemon.log_text())}


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@contextmanager
def main_process_stopped(daemon: Daemon) -> Iterator[None]:
    os.kill(daemon.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(daemon.proc.pid, signal.SIGCONT)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory.mktemp("workers"), {"mdmd": {"workers": str(WORKERS)}}) as d:
        poll("every worker serving", lambda: len(serving_workers(d)) == WORKERS - 1)
        yield d


@pytest.fixture(scope="module")
def key() -> object:
    return pki.generate_rsa_key()


def enroll_and_check_in(daemon: Daemon, key: object, tmp_path: Path, name: str) -> str:
    device = WindowsDevice(key=key, hostname=name)  # type: ignore[arg-type]
    result = enroll_device(daemon, device)
    assert isinstance(result, EnrollmentResult)
    enrolled = Enrolled(device, result, client_tls_context(daemon, tmp_path, result.certificate, device.key))
    client = ManagementClient(device)
    status, body = post(daemon, enrolled, client.session_start(result.management_url))
    assert status == 200, body
    assert client.read(body).final
    return device.device_id


def test_a_worker_alone_serves_enrollment_and_management(daemon: Daemon, key: object, tmp_path: Path) -> None:
    with main_process_stopped(daemon):
        device_id = enroll_and_check_in(daemon, key, tmp_path, "PC-W1")
    # The worker's store wrote what it acknowledged, in the shared database.
    rows = db_rows(daemon, "SELECT state, last_seen IS NOT NULL FROM devices WHERE device_id = ?", device_id)
    assert rows == [("enrolled", 1)]
    lines = [line for line in daemon.log_text().splitlines() if device_id in line and " worker 1]" in line]
    assert any("/api/mdm/microsoft/management" in line for line in lines), lines


def test_the_main_process_restarts_a_worker_that_dies(daemon: Daemon, key: object, tmp_path: Path) -> None:
    old = serving_workers(daemon)[1]
    os.kill(old, signal.SIGKILL)
    poll("worker 1 serving again", lambda: serving_workers(daemon)[1] != old)
    assert re.search(rf"worker 1 \(pid {old}\) ended after .*; starting it again", daemon.log_text())
    with main_process_stopped(daemon):
        enroll_and_check_in(daemon, key, tmp_path, "PC-W2")


def test_workers_stop_with_the_main_process(tmp_path: Path) -> None:
    with running_daemon(tmp_path, {"mdmd": {"workers": "3"}}) as d:
        poll("both workers serving", lambda: len(serving_workers(d)) == 2)
        pids = list(serving_workers(d).values())
        assert d.stop() == -signal.SIGTERM  # twistd ends by the signal it was stopped with
    assert not [pid for pid in pids if alive(pid)]
    assert "Traceback" not in d.log_text()


def test_a_worker_stops_when_the_main_process_is_killed(tmp_path: Path) -> None:
    with running_daemon(tmp_path, {"mdmd": {"workers": "2"}}) as d:
        poll("the worker serving", lambda: len(serving_workers(d)) == 1)
        (pid,) = serving_workers(d).values()
        d.proc.kill()
        d.proc.wait()
        poll("the orphaned worker gone", lambda: not alive(pid))


# --------------------------------------------------------------------------
# Supervision under stops and kills
# --------------------------------------------------------------------------

# The silence bound for these daemons (MDMD_WORKER_SILENCE; 30 s in
# production): short, so that a verdict takes seconds, and still three
# heartbeats long.
SILENCE = 3.0


@contextmanager
def short_silence_daemon(directory: Path) -> Iterator[Daemon]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MDMD_WORKER_SILENCE", str(SILENCE))
        with running_daemon(directory, {"mdmd": {"workers": "2"}}) as d:
            poll("the worker serving", lambda: len(serving_workers(d)) == 1)
            yield d


def orbit_enroll_and_poll(daemon: Daemon, n: int) -> None:
    uuid = f"5EED0000-0000-0000-0000-{n:012d}"
    status, answer = daemon.post_json(
        "/api/fleet/orbit/enroll",
        {"enroll_secret": daemon.enroll_secret, "hardware_uuid": uuid, "platform": "windows"},
    )
    assert status == 200, answer
    status, answer = daemon.post_json("/api/fleet/orbit/config", {"orbit_node_key": answer["orbit_node_key"]})
    assert status == 200, answer


def test_a_main_process_that_stalls_keeps_its_healthy_worker(tmp_path: Path) -> None:
    with short_silence_daemon(tmp_path) as d:
        (pid,) = serving_workers(d).values()
        served = 0
        with main_process_stopped(d):
            # The worker serves on alone for longer than the silence bound;
            # its heartbeats wait in the pipe of the stopped main process.
            started = time.monotonic()
            while time.monotonic() - started < SILENCE + 2:
                orbit_enroll_and_poll(d, served)
                served += 1
        # An answer from the main process's own listener: by then its
        # reactor has run the overdue silence check.
        status, _ = d.admin("GET", "/api/v1/devices")
        assert status == 200
        assert "killing it" not in d.log_text()
        assert alive(pid) and serving_workers(d) == {1: pid}
        assert db_rows(d, "SELECT COUNT(*) FROM hosts") == [(served,)]
        with main_process_stopped(d):
            orbit_enroll_and_poll(d, served)  # the same worker, still serving


def test_a_blocked_worker_is_killed_at_the_silence_bound(tmp_path: Path) -> None:
    with short_silence_daemon(tmp_path) as d:
        (pid,) = serving_workers(d).values()
        os.kill(pid, signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            poll("the blocked worker killed", lambda: not alive(pid), timeout=SILENCE * 4)
            gone = time.monotonic() - stopped
        finally:
            if alive(pid):  # whatever happened, no stopped orphan
                os.kill(pid, signal.SIGKILL)
        # Its last heartbeat came at most one heartbeat before the stop.
        silent = re.search(
            rf"worker 1 \(pid {pid}\) silent for ([\d.]+)s, its reactor is blocked", d.log_text()
        )
        assert silent, d.log_text()
        assert SILENCE <= float(silent.group(1)) < SILENCE + 0.5
        assert gone < SILENCE + 1.0, f"killed {gone:.1f}s after it stopped"
        poll("a new worker serving", lambda: serving_workers(d)[1] != pid)


def test_an_orphaned_worker_that_is_stopped_dies_with_the_main_process(tmp_path: Path) -> None:
    with running_daemon(tmp_path, {"mdmd": {"workers": "2"}}) as d:
        poll("the worker serving", lambda: len(serving_workers(d)) == 1)
        (pid,) = serving_workers(d).values()
        os.kill(pid, signal.SIGSTOP)  # its reactor will never read the pipe
        try:
            d.proc.kill()
            d.proc.wait()
            poll("the stopped orphan gone", lambda: not alive(pid), timeout=10)
        finally:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        # Nothing holds the listening sockets: a new daemon starts on them.
        again = start_daemon(d.config)
        try:
            poll("the new daemon's worker serving", lambda: len(serving_workers(again)) == 1)
            orbit_enroll_and_poll(again, 1)
        finally:
            again.stop()


def restart_delays(daemon: Daemon, index: int = 1) -> list[float]:
    pattern = rf"worker {index} \(pid \d+\) ended after .*; starting it again in ([\d.]+)s"
    return [float(x) for x in re.findall(pattern, daemon.log_text())]


def test_restart_delay_doubles_until_a_worker_serves_and_is_reset_when_it_does(tmp_path: Path) -> None:
    with running_daemon(tmp_path, {"mdmd": {"workers": "2"}}) as d:
        poll("the worker serving", lambda: len(serving_workers(d)) == 1)
        # A worker killed after it served is no crash loop: 0.5 s each time.
        for _ in range(4):
            (pid,) = serving_workers(d).values()
            os.kill(pid, signal.SIGKILL)
            poll("a new worker serving", lambda old=pid: serving_workers(d)[1] != old)
        assert restart_delays(d) == [0.5] * 4

        # A worker that cannot start (its configuration went bad) is
        # started again later and later...
        good = d.config.read_text()
        d.config.write_text(edit_ini(good, {"mdmd": {"no_such_key": "1"}}))
        (pid,) = serving_workers(d).values()
        os.kill(pid, signal.SIGKILL)
        poll("two failed starts", lambda: restart_delays(d)[4:] == [0.5, 1.0, 2.0])
        # ...until one serves; then the next restart is prompt again.
        d.config.write_text(good)
        poll("a new worker serving", lambda: serving_workers(d)[1] != pid)
        (pid,) = serving_workers(d).values()
        os.kill(pid, signal.SIGKILL)
        poll("a new worker serving", lambda: serving_workers(d)[1] != pid)
        assert restart_delays(d)[4:] == [0.5, 1.0, 2.0, 0.5]
        assert "cannot start" in d.log_text()


def _requests_served(daemon: Daemon, endpoint: str) -> float:
    response, body = daemon.request("GET", "/metrics", section="admin")
    assert response.status == 200
    total = 0.0
    for family in text_string_to_metric_families(body.decode()):
        if family.name == "mdmd_http_requests":
            total += sum(
                s.value
                for s in family.samples
                if s.name.endswith("_total") and s.labels["endpoint"] == endpoint
            )
    return total


def test_metrics_sum_every_process(daemon: Daemon, key: object, tmp_path: Path) -> None:
    enrollments = _requests_served(daemon, "/api/mdm/microsoft/enroll")
    with main_process_stopped(daemon):
        enroll_and_check_in(daemon, key, tmp_path, "PC-W3")
    # Only a worker served that enrollment; the main process's /metrics counts it.
    assert _requests_served(daemon, "/api/mdm/microsoft/enroll") == enrollments + 1
    assert daemon.admin("GET", "/readyz", token=None) == (200, {"status": "ready"})


def test_a_reload_reaches_the_workers(daemon: Daemon) -> None:
    worker_reloads = daemon.log_text().count("reload: TLS certificates reloaded")
    renewed = new_server_certificate(daemon.state)
    os.kill(daemon.proc.pid, signal.SIGHUP)
    # The main process and each worker read the certificate again.
    poll(
        "every process reloaded",
        lambda: daemon.log_text().count("reload: TLS certificates reloaded") >= worker_reloads + WORKERS,
    )
    assert any(
        "reload: TLS certificates reloaded" in line and " worker 1]" in line
        for line in daemon.log_text().splitlines()
    )
    with main_process_stopped(daemon):
        assert served_certificate(daemon).serial_number == renewed.serial_number


def test_concurrent_sessions_of_one_device_in_both_processes_are_all_answered(
    daemon: Daemon, key: object, tmp_path: Path
) -> None:
    # Sixteen connections of one device at once, each a new session, spread
    # by the kernel over both processes: the process whose step loses the
    # race in the store reads again and retries (management_endpoint), so
    # every one is answered, none with a 503, and each one is committed.
    from concurrent.futures import ThreadPoolExecutor

    device = WindowsDevice(key=key, hostname="PC-RACE")  # type: ignore[arg-type]
    result = enroll_device(daemon, device)
    assert isinstance(result, EnrollmentResult)
    tls = client_tls_context(daemon, tmp_path, result.certificate, device.key)
    enrolled = Enrolled(device, result, tls)
    (before,) = db_rows(daemon, "SELECT session_seq FROM devices WHERE device_id = ?", device.device_id)[0]
    streams, sessions = 16, 6

    def stream(n: int) -> list[tuple[int, int | None]]:
        client = ManagementClient(device)
        client.session_id = n * 0x100  # SessionIDs of their own: no stream's message is another's
        answers = []
        for _ in range(sessions):
            status, body = post(daemon, enrolled, client.session_start(result.management_url))
            answers.append((status, client.read(body).hdr_status if status == 200 else 0))
        return answers

    with ThreadPoolExecutor(streams) as pool:
        answers = [a for part in pool.map(stream, range(streams)) for a in part]
    assert answers == [(200, 200)] * (streams * sessions)
    (after,) = db_rows(daemon, "SELECT session_seq FROM devices WHERE device_id = ?", device.device_id)[0]
    assert after - before == streams * sessions
