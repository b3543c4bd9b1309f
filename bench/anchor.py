#!/usr/bin/env python3
"""mdmd beside nginx: the same TLS exchanges, the same C clients, alternating
rounds, server CPU from /proc.

    .venv/bin/python bench/anchor.py              # every scenario, 3 rounds each
    .venv/bin/python bench/anchor.py --rounds 5 --workers 2

Needs (benchmark only, not CI): ``apt-get install -y nginx-light
apache2-utils curl``.  mdmd runs as ``twistd -n mdmd`` on loopback with a
temporary configuration (tests/harness.py); nginx runs with mdmd's own
server certificate (ECDSA P-256), the WSTEP identity CA as the client CA,
mdmd's cipher list, no session reuse, and answers with the very bytes mdmd
answers.  A device is enrolled in mdmd through the real endpoints; its
certificate (RSA 2048) is the client certificate in every mutual-TLS round.

Scenarios (each printed with requests/s, server CPU ms per request, and the
ratio mdmd / nginx):

- ``mtls-new-tls1.2``, ``mtls-new-tls1.3``: a new TLS connection per
  request, one SyncML POST each (``ab -c 16``); mdmd serves it as the
  retransmission of the device's last message (one store read, no write).
- ``session-new``: a new TLS 1.3 connection per request, each a new OMA-DM
  session (package 1 with a new SessionID), committed durably by mdmd
  (``curl``, 16 at once, ``Connection: close``).
- ``mtls-keepalive``: messages on kept-alive connections (``ab -k -c 16``).
- ``enroll-chain``: discovery, policy and enroll (CSR check, signing,
  durable store) per device, three requests on one TLS connection
  (``curl``, 16 chains at once); mdmd only, in chains per second.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

try:
    from harness import (
        MANAGEMENT_PATH,
        SOAP,
        SYNCML,
        Daemon,
        client_tls_context,
        enroll_device,
        start_daemon,
        write_config,
    )
    from mdmd import pki
    from mdmd.sim.device import EnrollmentResult, ManagementClient, WindowsDevice
except ImportError as e:  # pragma: no cover - wrong interpreter
    sys.exit(f"bench/anchor: {e}; run it with the venv that has mdmd's dependencies")

CLK_TCK = os.sysconf("SC_CLK_TCK")
CONCURRENCY = 16


def say(text: str) -> None:
    print(f"anchor: {text}", file=sys.stderr, flush=True)


def need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        sys.exit(
            f"bench/anchor needs {', '.join(missing)}: apt-get install -y nginx-light apache2-utils curl "
            "(benchmark only)"
        )


def free_loopback_port() -> int:
    """A port for nginx (benchmark only: the small race does not matter)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def process_tree(pid: int) -> list[int]:
    """*pid* and its children (nginx's workers, mdmd's worker processes)."""
    pids = [pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                pids.append(int(entry.name))
    return pids


def cpu_s(pid: int) -> float:
    total = 0.0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


# --------------------------------------------------------------------------
# nginx with mdmd's certificates and reply bytes
# --------------------------------------------------------------------------


@dataclass
class Nginx:
    proc: subprocess.Popen[bytes]
    port: int

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def start_nginx(workdir: Path, state: Path, port: int, reply: bytes, workers: int) -> Nginx:
    body = workdir / "nginx-reply.xml"
    body.write_bytes(reply)
    conf = workdir / "nginx.conf"
    # As root, nginx's workers would drop to nobody, who cannot read the
    # private work folder: keep them as the caller.
    user = "user root;" if os.geteuid() == 0 else ""
    conf.write_text(
        f"""
{user}
worker_processes {workers};
daemon off;
master_process on;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/nginx-body;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {state}/tls-server.pem;
        ssl_certificate_key {state}/tls-server.key;
        ssl_client_certificate {state}/wstep-identity.pem;
        ssl_verify_client on;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_ciphers ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!SHA1;
        ssl_session_cache off;
        ssl_session_tickets off;
        location = {MANAGEMENT_PATH.split("?")[0]} {{
            # POST to a static file is a 405 in nginx: answer the file's
            # bytes through the error page instead.
            error_page 405 =200 /reply;
            return 405;
        }}
        location = /reply {{
            internal;
            default_type application/vnd.syncml.dm+xml;
            alias {body};
        }}
    }}
}}
"""
    )
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(workdir)], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if subprocess.run(["curl", "-sk", "-o", "/dev/null", f"https://127.0.0.1:{port}/"]).returncode in (
            0,
            56,
            35,
        ):
            return Nginx(proc, port)
        time.sleep(0.05)
    proc.kill()
    sys.exit("anchor: nginx did not start")


# --------------------------------------------------------------------------
# Clients
# --------------------------------------------------------------------------


@dataclass
class Round:
    server: str
    scenario: str
    requests: int
    wall_s: float
    cpu_s: float

    @property
    def rate(self) -> float:
        return self.requests / self.wall_s

    @property
    def cpu_ms(self) -> float:
        return self.cpu_s * 1000 / self.requests


def run_ab(url: str, body: Path, pem: Path, count: int, tls: str, keepalive: bool) -> int:
    args = ["ab", "-q", "-n", str(count), "-c", str(CONCURRENCY), "-f", tls, "-E", str(pem)]
    args += ["-p", str(body), "-T", SYNCML["Content-Type"]]
    if keepalive:
        args.append("-k")
    out = subprocess.run([*args, url], capture_output=True, text=True)
    complete = re.search(r"Complete requests:\s+(\d+)", out.stdout)
    failed = re.search(r"Failed requests:\s+(\d+)", out.stdout)
    non2xx = re.search(r"Non-2xx responses:\s+(\d+)", out.stdout)
    if complete is None:
        sys.exit(f"anchor: ab failed: {out.stdout[-800:]}{out.stderr[-800:]}")
    bad = (int(failed.group(1)) if failed else 0) + (int(non2xx.group(1)) if non2xx else 0)
    if bad:
        say(f"ab: {bad} failed or non-2xx responses of {complete.group(1)} ({url})")
    return int(complete.group(1)) - bad


def run_curls(requests: Sequence[Sequence[tuple[str, str, Path]]], pem: Path | None, ca: Path) -> int:
    """One curl process per request list (each list one connection when the
    server keeps it alive), CONCURRENCY at a time; returns the 2xx count."""

    def one(batch: Sequence[tuple[str, str, Path]]) -> int:
        args = ["curl", "-s", "--cacert", str(ca), "-o", "/dev/null", "-w", "%{http_code}\\n"]
        if pem is not None:
            args += ["--cert", str(pem)]
        for i, (url, content_type, body) in enumerate(batch):
            if i:
                args.append("--next")
                args += ["--cacert", str(ca), "-o", "/dev/null", "-w", "%{http_code}\\n"]
                if pem is not None:
                    args += ["--cert", str(pem)]
            args += ["-H", f"Content-Type: {content_type}", "--data-binary", f"@{body}", url]
        out = subprocess.run(args, capture_output=True, text=True)
        return sum(1 for line in out.stdout.split() if line.startswith("2"))

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        return sum(pool.map(one, requests))


# --------------------------------------------------------------------------
# The scenarios
# --------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/anchor", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per scenario (3)")
    p.add_argument("--requests", type=int, default=2000, help="requests per ab round (2000)")
    p.add_argument("--sessions", type=int, default=400, help="new sessions per curl round (400)")
    p.add_argument("--chains", type=int, default=200, help="enrollment chains per round (200)")
    p.add_argument(
        "--workers", type=int, default=1, help="mdmd [mdmd] workers and nginx worker_processes (1)"
    )
    p.add_argument("--only", action="append", help="run only these scenarios (repeatable)")
    a = p.parse_args(argv)
    need("nginx", "ab", "curl")

    workdir = Path(tempfile.mkdtemp(prefix="mdmd-anchor-"))
    config = write_config(workdir, {"mdmd": {"workers": str(a.workers)}})
    daemon: Daemon = start_daemon(config)
    nginx: Nginx | None = None
    try:
        state = daemon.state
        ca = daemon.ca_file
        # One device, enrolled through the real endpoints.
        key = pki.generate_rsa_key()
        device = WindowsDevice(key=key, hostname="ANCHOR")
        enrolled = enroll_device(daemon, device)
        assert isinstance(enrolled, EnrollmentResult)
        pem = workdir / "device.pem"
        pem.write_bytes(pki.cert_to_pem(enrolled.certificate) + pki.key_to_pem(key))
        os.chmod(pem, 0o600)
        client = ManagementClient(device)
        start = client.session_start(enrolled.management_url)
        ctx = client_tls_context(daemon, workdir, enrolled.certificate, key)
        response, reply = daemon.request(
            "POST", MANAGEMENT_PATH, start, SYNCML, section="management", context=ctx
        )
        assert response.status == 200
        body = workdir / "retransmission.xml"
        body.write_bytes(start)
        nginx_port = free_loopback_port()
        nginx = start_nginx(workdir, state, nginx_port, reply, a.workers)
        mdmd_url = f"https://localhost:{daemon.port('management')}{MANAGEMENT_PATH}"
        nginx_url = f"https://localhost:{nginx_port}{MANAGEMENT_PATH}"
        servers = {"mdmd": (daemon.proc.pid, mdmd_url), "nginx": (nginx.proc.pid, nginx_url)}
        rounds: list[Round] = []
        wanted = set(
            a.only or ["mtls-new-tls1.2", "mtls-new-tls1.3", "session-new", "mtls-keepalive", "enroll-chain"]
        )

        def measure(server: str, scenario: str, work: Any) -> None:
            pid = servers[server][0]
            before, started = cpu_s(pid), time.monotonic()
            done = work()
            wall, cpu = time.monotonic() - started, cpu_s(pid) - before
            rounds.append(Round(server, scenario, done, wall, cpu))
            say(f"{scenario} {server}: {done} in {wall:.2f}s, {cpu * 1000 / max(done, 1):.3f} ms CPU each")

        for scenario, tls, keepalive in (
            ("mtls-new-tls1.2", "TLS1.2", False),
            ("mtls-new-tls1.3", "TLS1.3", False),
            ("mtls-keepalive", "TLS1.3", True),
        ):
            if scenario not in wanted:
                continue
            count = a.requests * (5 if keepalive else 1)
            for _ in range(a.rounds):
                for server in ("mdmd", "nginx"):
                    url = servers[server][1]
                    measure(
                        server,
                        scenario,
                        lambda url=url, count=count, tls=tls, keepalive=keepalive: run_ab(
                            url, body, pem, count, tls, keepalive
                        ),
                    )

        if "session-new" in wanted:
            for _ in range(a.rounds):
                for server in ("mdmd", "nginx"):
                    files = []
                    for n in range(a.sessions):
                        f = workdir / f"session-{server}-{n}.xml"
                        f.write_bytes(client.session_start(enrolled.management_url))
                        files.append(f)
                    url = servers[server][1]
                    batches = [[(url, SYNCML["Content-Type"], f)] for f in files]
                    measure(server, "session-new", lambda b=batches: run_curls(b, pem, ca))

        if "enroll-chain" in wanted:
            for r in range(a.rounds):
                chains = _enrollment_chains(daemon, workdir, a.chains, r)
                measure("mdmd", "enroll-chain", lambda c=chains: run_curls(c, None, ca) // 3)
        print_table(rounds, a)
    finally:
        if nginx is not None:
            nginx.stop()
        daemon.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _enrollment_chains(
    daemon: Daemon, workdir: Path, count: int, round_: int
) -> list[list[tuple[str, str, Path]]]:
    """*count* devices whose agents enrolled (orbit), each with its discovery,
    policy and enroll requests written out for curl."""
    base = daemon.url("enrollment")
    key = pki.generate_rsa_key()
    csr = None
    chains = []
    for n in range(count):
        device = WindowsDevice(key=key, hostname=f"CHAIN-{round_}-{n}")
        status, answer = daemon.post_json(
            "/api/fleet/orbit/enroll", device.orbit_enroll_request(daemon.enroll_secret)
        )
        assert status == 200, answer
        device.orbit_enrolled(answer)
        discovery_url = f"{base}/api/mdm/microsoft/discovery"
        files = []
        for name, data in (
            ("discovery", device.discover_request(discovery_url)),
            ("policy", device.get_policies_request(f"{base}/api/mdm/microsoft/policy")),
            ("enroll", device.enroll_request(f"{base}/api/mdm/microsoft/enroll", csr_der=csr)),
        ):
            f = workdir / f"chain-{round_}-{n}-{name}.xml"
            f.write_bytes(data)
            files.append((f"{base}/api/mdm/microsoft/{name}", SOAP["Content-Type"], f))
        if csr is None:
            csr = device.certification_request()
        chains.append(files)
    return chains


def print_table(rounds: Sequence[Round], a: argparse.Namespace) -> None:
    print(
        f"\nmdmd beside nginx: {a.rounds} alternating rounds per scenario, median; workers {a.workers}; "
        f"{os.cpu_count()} CPUs"
    )
    print("| scenario | mdmd req/s | mdmd CPU ms/req | nginx req/s | nginx CPU ms/req | CPU ratio |")
    print("|---|---|---|---|---|---|")
    for scenario in dict.fromkeys(r.scenario for r in rounds):
        mine = [r for r in rounds if r.scenario == scenario and r.server == "mdmd"]
        theirs = [r for r in rounds if r.scenario == scenario and r.server == "nginx"]
        m_rate = statistics.median(r.rate for r in mine)
        m_cpu = statistics.median(r.cpu_ms for r in mine)
        if theirs:
            n_rate = statistics.median(r.rate for r in theirs)
            n_cpu = statistics.median(r.cpu_ms for r in theirs)
            ratio = m_cpu / n_cpu
            print(f"| {scenario} | {m_rate:.0f} | {m_cpu:.3f} | {n_rate:.0f} | {n_cpu:.3f} | {ratio:.2f} |")
        else:
            print(f"| {scenario} | {m_rate:.0f} | {m_cpu:.3f} | - | - | - |")


if __name__ == "__main__":
    sys.exit(main())
