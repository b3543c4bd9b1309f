#!/usr/bin/env python3
"""mdmd beside nginx: the same TLS exchanges, the same C clients, alternating
rounds, server CPU from /proc.

    bench/run --anchor nginx                      # every scenario, 3 rounds each
    bench/run --anchor nginx --rounds 5 --workers 2
    bench/run --anchor nginx --only session-new   # one scenario (to profile it)
    bench/run --anchor nginx --scaling            # workers 1, then 2: the scaling factor
    .venv/bin/python bench/anchor.py ...          # the same, directly

Needs (benchmark only, not CI): ``apt-get install -y nginx-light
apache2-utils curl``.  mdmd runs as ``twistd -n mdmd`` on loopback with a
temporary configuration (tests/harness.py); nginx runs with mdmd's own
server certificate, the WSTEP identity CA as the client CA, mdmd's cipher
list, no session reuse (no cache, no tickets, as mdmd), and answers with the
very bytes mdmd answers.  Devices are enrolled in mdmd through the real
endpoints; their certificates are the client certificates in every
mutual-TLS round.  No client resumes a TLS session (ab never does; curl runs
with ``--no-sessionid``), so every new connection is a full handshake.

Scenarios (requests/s, server CPU ms per request from /proc with every
worker process, the client's CPU, each answer's status):

- ``mtls-new-tls1.2``, ``mtls-new-tls1.3``: a new TLS connection per
  check-in, one SyncML POST each (``ab -c 16``); mdmd serves it as the
  retransmission of the device's last message (one store read, no write).
- ``mtls-new-curl``: the same retransmission on a new TLS 1.3 connection
  per request, sent the way ``session-new`` sends its sessions (16 ``curl``
  processes, ``Connection: close``): the difference between the two is
  what a new session costs beyond the connection.
- ``session-new``: a new TLS 1.3 connection per request, each a new OMA-DM
  session: package 1 with a new SessionID, which mdmd commits durably before
  it answers.  16 devices, one long-lived ``curl`` each sending that
  device's sessions in order (``--next``, ``Connection: close``: curl's own
  count of new connections is checked to be one per request).  mdmd's
  answers are checked: HTTP 200, SyncHdr status 200 for that SessionID, and
  the devices' session counter in the store moved once per answer.
- ``mtls-keepalive-http1.0``: messages on kept-alive connections with
  ``ab -k -c 16`` (HTTP/1.0 keep-alive); the column of new connections per
  request shows whether the server kept them alive.
- ``mtls-keepalive-http1.1``: the same with 16 ``curl`` processes, each
  sending its share on one HTTP/1.1 connection (``--next``).
- ``enroll-chain``: discovery, policy and enroll (CSR check, signing,
  durable store) per device, three requests on one new TLS connection
  (16 ``curl`` processes, chain after chain); mdmd only, in chains per
  second and CPU ms per chain; the store's count of enrolled devices is
  checked to grow by one per chain.

Each scenario runs ``--rounds`` alternating round pairs (mdmd, then nginx);
the ratios are computed per pair and their median printed beside the
median of each side.  Non-2xx answers are counted by status code (a 503 is
printed, not dropped) and left out of requests/s.  ``--scaling`` runs
``mtls-new-tls1.3``, ``session-new`` and ``enroll-chain`` with 1 worker
and then 2 (mdmd's ``[mdmd] workers``, nginx's ``worker_processes``) and
prints req/s at 2 / req/s at 1; on a 2-CPU machine the clients share the
CPUs, so read it beside the "other %" column.

``--floor`` adds two more servers to the new-connection and kept-alive
rounds, both bench/floor.py with mdmd's own TLS options and certificates:
``floor-tls`` (Twisted's TLS and pyOpenSSL in front of a bare protocol
answering the same bytes) and ``floor-web`` (the same in front of mdmd's
twisted.web Site); what mdmd costs above ``floor-web`` is its own work.

The clients' own CPU per request is printed for every round.  On a new
connection with a client certificate (RSA 2048) ab spends about 2.5 ms and
curl about 7 ms (curl 7.88 builds a new OpenSSL context per connection,
loading the certificate and key again); beside nginx's 1-1.5 ms that makes
req/s client-bound on a small machine.  Server CPU ms per request is the
figure to compare.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

try:
    from harness import (
        MANAGEMENT_PATH,
        SOAP,
        SYNCML,
        Daemon,
        client_tls_context,
        db_rows,
        enroll_device,
        start_daemon,
        write_config,
    )
    from mdmd import pki
    from mdmd.sim.device import EnrollmentResult, ManagementClient, WindowsDevice
    from mdmd.syncml import Status, parse_message
except ImportError as e:  # pragma: no cover - wrong interpreter
    sys.exit(f"bench/anchor: {e}; run it with the venv that has mdmd's dependencies")

CLK_TCK = os.sysconf("SC_CLK_TCK")
CONCURRENCY = 16
SCENARIOS = (
    "mtls-new-tls1.2",
    "mtls-new-tls1.3",
    "mtls-new-curl",
    "session-new",
    "mtls-keepalive-http1.0",
    "mtls-keepalive-http1.1",
    "enroll-chain",
)
SCALING = ("mtls-new-tls1.3", "session-new", "enroll-chain")
# ab's -v 2 prints this for every answer that is not 2xx (and nothing else
# per answer but its headers).
AB_NOT_2XX = re.compile(r"WARNING: Response code not 2xx \((\d+)\)")


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


def clients_cpu_s() -> float:
    """CPU of the clients (ab, curl) this process waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy (every process, /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / CLK_TCK


def run_text(*args: str) -> str:
    try:
        out = subprocess.run(args, capture_output=True, text=True, cwd=REPO)
    except OSError:
        return "?"
    return (out.stdout + out.stderr).strip()


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
        # 35/56: the handshake or the read failed for want of a client
        # certificate, so nginx listens.
        probe = subprocess.run(["curl", "-sk", "-o", "/dev/null", f"https://127.0.0.1:{port}/"])
        if probe.returncode in (0, 56, 35):
            return Nginx(proc, port)
        time.sleep(0.05)
    proc.kill()
    sys.exit("anchor: nginx did not start")


# --------------------------------------------------------------------------
# Clients
# --------------------------------------------------------------------------


@dataclass
class Outcome:
    """What the client saw: answers by status, new connections, TLS."""

    statuses: Counter[str] = field(default_factory=Counter)
    connections: int = 0
    tls: set[str] = field(default_factory=set)

    @property
    def ok(self) -> int:
        return sum(n for code, n in self.statuses.items() if code.startswith("2"))

    @property
    def answers(self) -> int:
        return sum(self.statuses.values())

    def add(self, other: Outcome) -> None:
        self.statuses.update(other.statuses)
        self.connections += other.connections
        self.tls |= other.tls


def run_ab(
    url: str, body: Path, pem: Path, count: int, tls: str, keepalive: bool, concurrency: int = CONCURRENCY
) -> Outcome:
    args = ["ab", "-v", "2", "-n", str(count), "-c", str(concurrency), "-f", tls, "-E", str(pem)]
    args += ["-p", str(body), "-T", SYNCML["Content-Type"]]
    if keepalive:
        args.append("-k")
    out = subprocess.run([*args, url], capture_output=True, text=True)
    complete = re.search(r"Complete requests:\s+(\d+)", out.stdout)
    if complete is None:
        sys.exit(f"anchor: ab failed: {out.stdout[-800:]}{out.stderr[-800:]}")
    done = int(complete.group(1))
    failed = re.search(r"Failed requests:\s+(\d+)", out.stdout)
    bad = Counter(AB_NOT_2XX.findall(out.stdout))
    outcome = Outcome(statuses=Counter({"2xx": done - sum(bad.values())}))
    outcome.statuses.update(bad)
    if failed and int(failed.group(1)):
        # Connection errors, or a length unlike the first answer's.
        outcome.statuses["ab-failed"] = int(failed.group(1))
    kept = re.search(r"Keep-Alive requests:\s+(\d+)", out.stdout)
    # An answer with keep-alive lets ab send its next request on the same
    # connection; the last one on each of the concurrent connections does not.
    outcome.connections = (
        min(done, done - int(kept.group(1)) + concurrency) if keepalive and kept is not None else done
    )
    protocol = re.search(r"SSL/TLS Protocol:\s+(\S+)", out.stdout)
    temp_key = re.search(r"Server Temp Key:\s+(.+)", out.stdout)
    if protocol:
        version, cipher = protocol.group(1).split(",")[:2]
        outcome.tls.add(f"{version} {cipher}" + (f" {temp_key.group(1).split()[0]}" if temp_key else ""))
    return outcome


@dataclass(frozen=True)
class Req:
    url: str
    content_type: str
    body: Path
    close: bool = False  # Connection: close, so that the next request opens a new connection
    output: Path | None = None


def curl_config(requests: Sequence[Req], pem: Path | None, ca: Path) -> str:
    """One curl config file: every request after ``next``, each with its own
    options (curl resets them at ``next``)."""
    blocks = []
    for r in requests:
        lines = [
            f'url = "{r.url}"',
            f'cacert = "{ca}"',
            "http1.1",
            # Every new connection a full handshake, as with ab and nginx's
            # configuration.
            "no-sessionid",
            "silent",
            f'header = "Content-Type: {r.content_type}"',
            # No 100-continue wait for a body over 1 KiB (an enroll request).
            'header = "Expect:"',
            f'data-binary = "@{r.body}"',
            f'output = "{r.output or "/dev/null"}"',
            'write-out = "%{http_code} %{num_connects}\\n"',
        ]
        if pem is not None:
            lines.append(f'cert = "{pem}"')
        if r.close:
            lines.append('header = "Connection: close"')
        blocks.append("\n".join(lines))
    return "\nnext\n".join(blocks) + "\n"


def run_curls(streams: Sequence[tuple[Sequence[Req], Path | None]], ca: Path, workdir: Path) -> Outcome:
    """One long-lived curl process per stream (its requests in order, on one
    connection unless a request says ``close``), all at once."""
    configs = []
    for n, (requests, pem) in enumerate(streams):
        path = workdir / f"curl-{n}.conf"
        path.write_text(curl_config(requests, pem, ca))
        configs.append(path)

    def one(config: Path) -> Outcome:
        out = subprocess.run(["curl", "--config", str(config)], capture_output=True, text=True)
        outcome = Outcome()
        for line in out.stdout.splitlines():
            code, connects = line.split()
            # 000: no answer (connection refused or reset, TLS failure).
            outcome.statuses["2xx" if code.startswith("2") else code] += 1
            outcome.connections += int(connects)
        if out.returncode not in (0, 52, 56):
            outcome.statuses[f"curl-exit-{out.returncode}"] += 1
        return outcome

    total = Outcome()
    with ThreadPoolExecutor(len(configs)) as pool:
        for outcome in pool.map(one, configs):
            total.add(outcome)
    return total


def tls_probe(url: str, body: Path, pem: Path, version: str) -> set[str]:
    """The protocol, cipher and key exchange group the server negotiates
    (ab prints them; curl 7.88 does not name the group)."""
    return run_ab(url, body, pem, 1, f"TLS{version}", keepalive=False, concurrency=1).tls


# --------------------------------------------------------------------------
# Rounds
# --------------------------------------------------------------------------


@dataclass
class Round:
    server: str
    scenario: str
    pair: int
    workers: int
    outcome: Outcome
    wall_s: float
    cpu_s: float
    client_cpu_s: float
    other_cpu_s: float  # the machine's busy time that was neither server nor clients
    unit: int = 1  # requests per counted unit (3: an enrollment chain)
    # What the server was asked to do and what it is seen to have done (the
    # answers' contents, the store), summed over rounds in the table.
    checks: Counter[str] = field(default_factory=Counter)

    @property
    def done(self) -> int:
        return self.outcome.ok // self.unit

    @property
    def rate(self) -> float:
        return self.done / self.wall_s

    @property
    def cpu_ms(self) -> float:
        return self.cpu_s * 1000 / max(self.done, 1)

    @property
    def client_cpu_ms(self) -> float:
        return self.client_cpu_s * 1000 / max(self.done, 1)

    @property
    def other_pct(self) -> float:
        return 100 * self.other_cpu_s / (self.wall_s * len(os.sched_getaffinity(0)))

    @property
    def connections_per_request(self) -> float:
        return self.outcome.connections / max(self.outcome.answers, 1)

    @property
    def bad(self) -> str:
        codes = {c: n for c, n in sorted(self.outcome.statuses.items()) if c != "2xx"}
        return " ".join(f"{c}x{n}" for c, n in codes.items()) or "-"


@dataclass
class Suite:
    """One mdmd and one nginx, with the devices the scenarios use."""

    workers: int
    workdir: Path
    daemon: Daemon
    nginx: Nginx
    pem: Path  # the retransmitting device's certificate and key
    body: Path  # its retransmitted message
    session_devices: list[tuple[ManagementClient, str, Path]]
    urls: dict[str, str]
    rounds: list[Round] = field(default_factory=list)
    tls: dict[str, set[str]] = field(default_factory=dict)
    floors: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def ca(self) -> Path:
        return self.daemon.ca_file

    def pid(self, server: str) -> int:
        if server in self.floors:
            return self.floors[server].pid
        return self.daemon.proc.pid if server == "mdmd" else self.nginx.proc.pid

    def stop(self) -> None:
        for proc in self.floors.values():
            proc.terminate()
            proc.wait(timeout=30)
        self.nginx.stop()
        self.daemon.stop()

    def measure(
        self,
        server: str,
        scenario: str,
        pair: int,
        work: Callable[[], Outcome],
        unit: int = 1,
    ) -> Round:
        pid = self.pid(server)
        before, client_before, busy_before = cpu_s(pid), clients_cpu_s(), machine_busy_s()
        started = time.monotonic()
        outcome = work()
        wall = time.monotonic() - started
        cpu, client = cpu_s(pid) - before, clients_cpu_s() - client_before
        other = max(0.0, machine_busy_s() - busy_before - cpu - client)
        r = Round(server, scenario, pair, self.workers, outcome, wall, cpu, client, other, unit)
        self.rounds.append(r)
        self.tls.setdefault(server, set()).update(outcome.tls)
        say(
            f"{scenario} {server} w{self.workers} #{pair + 1}: {r.done} in {wall:.2f}s, {r.rate:.0f}/s, "
            f"{r.cpu_ms:.3f} ms CPU each, client {r.client_cpu_ms:.3f} ms, "
            f"{r.connections_per_request:.2f} connections/request, other load {r.other_pct:.0f}%, "
            f"not 2xx: {r.bad}"
        )
        return r


def start_floor(workdir: Path, state: Path, layer: str, reply: bytes) -> tuple[subprocess.Popen[bytes], str]:
    """bench/floor.py serving *layer* with the daemon's certificates."""
    port = free_loopback_port()
    body = workdir / "floor-reply.xml"
    body.write_bytes(reply)
    args = ["serve", "--state", str(state), "--port", str(port), "--layer", layer, "--reply", str(body)]
    proc = subprocess.Popen([sys.executable, str(REPO / "bench" / "floor.py"), *args])
    url = f"https://localhost:{port}{MANAGEMENT_PATH}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, url
        time.sleep(0.05)
    proc.kill()
    sys.exit(f"anchor: bench/floor.py ({layer}) did not start")


def start_suite(root: Path, workers: int, session_devices: bool, floor: bool = False) -> Suite:
    workdir = root / f"workers-{workers}"
    workdir.mkdir()
    config = write_config(workdir, {"mdmd": {"workers": str(workers)}})
    daemon = start_daemon(config)
    try:
        device, enrolled, key, pem = _enroll(daemon, workdir, "ANCHOR")
        client = ManagementClient(device)
        start = client.session_start(enrolled.management_url)
        ctx = client_tls_context(daemon, workdir, enrolled.certificate, key)
        response, reply = daemon.request(
            "POST", MANAGEMENT_PATH, start, SYNCML, section="management", context=ctx
        )
        assert response.status == 200
        body = workdir / "retransmission.xml"
        body.write_bytes(start)
        devices = []
        if session_devices:
            for n in range(CONCURRENCY):
                d, e, _, p = _enroll(daemon, workdir, f"SESSION-{n}")
                devices.append((ManagementClient(d), e.management_url, p))
        nginx_port = free_loopback_port()
        nginx = start_nginx(workdir, daemon.state, nginx_port, reply, workers)
    except BaseException:
        daemon.stop()
        raise
    urls = {
        "mdmd": f"https://localhost:{daemon.port('management')}{MANAGEMENT_PATH}",
        "nginx": f"https://localhost:{nginx_port}{MANAGEMENT_PATH}",
    }
    suite = Suite(workers, workdir, daemon, nginx, pem, body, devices, urls)
    if floor:
        for layer in ("tls", "web"):
            proc, url = start_floor(workdir, daemon.state, layer, reply)
            suite.floors[f"floor-{layer}"] = proc
            suite.urls[f"floor-{layer}"] = url
    return suite


def _enroll(daemon: Daemon, workdir: Path, name: str) -> tuple[WindowsDevice, EnrollmentResult, object, Path]:
    key = pki.generate_rsa_key()
    device = WindowsDevice(key=key, hostname=name)
    enrolled = enroll_device(daemon, device)
    assert isinstance(enrolled, EnrollmentResult)
    pem = workdir / f"{name}.pem"
    pem.write_bytes(pki.cert_to_pem(enrolled.certificate) + pki.key_to_pem(key))
    os.chmod(pem, 0o600)
    return device, enrolled, key, pem


def run_suite(suite: Suite, scenarios: Sequence[str], a: argparse.Namespace) -> None:
    for scenario in scenarios:
        for pair in range(a.rounds):
            if scenario == "enroll-chain":
                streams = _enrollment_chains(suite, a.chains, pair)
                enrolled_before = _enrolled_count(suite.daemon)
                r = suite.measure(
                    "mdmd", scenario, pair, partial(run_curls, streams, suite.ca, suite.workdir), unit=3
                )
                stored = _enrolled_count(suite.daemon) - enrolled_before
                r.checks.update({"chains": a.chains, "enrolled in the store": stored})
                if stored != r.done:
                    say(f"enroll-chain: {r.done} chains answered 2xx but {stored} devices enrolled")
                continue
            servers = ["mdmd", "nginx"]
            if scenario != "session-new":
                servers += list(suite.floors)
            for server in servers:
                url = suite.urls[server]
                if scenario.startswith("mtls-new-") or scenario == "mtls-keepalive-http1.0":
                    keepalive = scenario.startswith("mtls-keepalive")
                    tls = "TLS1.2" if scenario.endswith("tls1.2") else "TLS1.3"
                    count = a.requests * (5 if keepalive else 1)
                    suite.measure(
                        server,
                        scenario,
                        pair,
                        partial(run_ab, url, suite.body, suite.pem, count, tls, keepalive),
                    )
                elif scenario == "mtls-new-curl":
                    per_stream = math.ceil(a.sessions / CONCURRENCY)
                    closing = [Req(url, SYNCML["Content-Type"], suite.body, close=True)] * per_stream
                    fresh: list[tuple[Sequence[Req], Path | None]] = [(closing, suite.pem)] * CONCURRENCY
                    suite.measure(server, scenario, pair, partial(run_curls, fresh, suite.ca, suite.workdir))
                elif scenario == "mtls-keepalive-http1.1":
                    per_stream = math.ceil(a.requests * 5 / CONCURRENCY)
                    reqs = [Req(url, SYNCML["Content-Type"], suite.body)] * per_stream
                    kept: list[tuple[Sequence[Req], Path | None]] = [(reqs, suite.pem)] * CONCURRENCY
                    suite.measure(server, scenario, pair, partial(run_curls, kept, suite.ca, suite.workdir))
                elif scenario == "session-new":
                    _session_round(suite, server, pair, math.ceil(a.sessions / CONCURRENCY))


def _session_round(suite: Suite, server: str, pair: int, per_device: int) -> None:
    """Each device's next *per_device* sessions, package 1 each, on a new
    connection each."""
    url = suite.urls[server]
    streams: list[tuple[Sequence[Req], Path | None]] = []
    sent: list[tuple[Path, str]] = []
    for n, (client, management_url, pem) in enumerate(suite.session_devices):
        reqs = []
        for i in range(per_device):
            body = suite.workdir / f"session-{server}-{pair}-{n}-{i}.xml"
            body.write_bytes(client.session_start(management_url))
            answer = body.with_suffix(".reply")
            sent.append((answer, parse_message(body.read_bytes()).hdr.session_id))
            reqs.append(Req(url, SYNCML["Content-Type"], body, close=True, output=answer))
        streams.append((reqs, pem))
    ids = [client.device.device_id for client, _, _ in suite.session_devices]
    seq_before = _session_seqs(suite.daemon, ids)
    r = suite.measure(server, "session-new", pair, lambda: run_curls(streams, suite.ca, suite.workdir))
    if server != "mdmd":
        return
    # A new session each, answered and committed: the SyncHdr status of the
    # answer (a refusal is a SyncML error in an HTTP 200) and the store's
    # per-device step counter.
    answered = 0
    for answer, session_id in sent:
        try:
            reply = parse_message(answer.read_bytes())
        except (OSError, ValueError):
            continue
        hdr_status = next((s for s in reply.body if isinstance(s, Status) and s.cmd_ref == "0"), None)
        if reply.hdr.session_id == session_id and hdr_status is not None and hdr_status.code == 200:
            answered += 1
    committed = _session_seqs(suite.daemon, ids) - seq_before
    r.checks.update({"new sessions": len(sent), "SyncHdr 200": answered, "committed": committed})
    if not answered == committed == r.outcome.ok == len(sent):
        say(
            f"session-new: {len(sent)} sent, {r.outcome.ok} HTTP 2xx, {answered} SyncHdr 200, "
            f"{committed} committed"
        )


def _session_seqs(daemon: Daemon, device_ids: Sequence[str]) -> int:
    marks = ", ".join("?" * len(device_ids))
    rows = db_rows(daemon, f"SELECT SUM(session_seq) FROM devices WHERE device_id IN ({marks})", *device_ids)
    return int(rows[0][0] or 0)


def _enrolled_count(daemon: Daemon) -> int:
    return int(db_rows(daemon, "SELECT COUNT(*) FROM devices WHERE state = 'enrolled'")[0][0])


def _enrollment_chains(suite: Suite, count: int, pair: int) -> list[tuple[Sequence[Req], Path | None]]:
    """*count* devices whose agents enrolled (orbit), each with its discovery,
    policy and enroll requests written out for curl, in CONCURRENCY streams;
    the enroll request closes the connection, so each chain has its own."""
    daemon = suite.daemon
    base = daemon.url("enrollment")
    url = f"https://localhost:{daemon.port('enrollment')}/api/mdm/microsoft"
    key = pki.generate_rsa_key()
    csr = None
    streams: list[list[Req]] = [[] for _ in range(CONCURRENCY)]
    for n in range(count):
        device = WindowsDevice(key=key, hostname=f"CHAIN-{pair}-{n}")
        status, answer = daemon.post_json(
            "/api/fleet/orbit/enroll", device.orbit_enroll_request(daemon.enroll_secret)
        )
        assert status == 200, answer
        device.orbit_enrolled(answer)
        for name, data in (
            ("discovery", device.discover_request(f"{base}/api/mdm/microsoft/discovery")),
            ("policy", device.get_policies_request(f"{base}/api/mdm/microsoft/policy")),
            ("enroll", device.enroll_request(f"{base}/api/mdm/microsoft/enroll", csr_der=csr)),
        ):
            f = suite.workdir / f"chain-{pair}-{n}-{name}.xml"
            f.write_bytes(data)
            streams[n % CONCURRENCY].append(
                Req(f"{url}/{name}", SOAP["Content-Type"], f, close=name == "enroll")
            )
        if csr is None:
            # One key for every chain device (key generation is the client's
            # cost, not the server's); the server still checks and signs
            # each CSR.
            csr = device.certification_request()
    return [(s, None) for s in streams if s]


# --------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------


def git_commit() -> str:
    commit = run_text("git", "rev-parse", "--short", "HEAD")
    dirty = run_text("git", "status", "--porcelain", "--untracked-files=no")
    return commit + ("+dirty" if dirty else "")


def machine() -> str:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "?",
    )
    return (
        f"{len(os.sched_getaffinity(0))} CPUs ({os.cpu_count()} online), {model}, Linux {platform.release()}"
    )


def versions() -> str:
    from OpenSSL import SSL

    mdmd_ssl = SSL.SSLeay_version(SSL.OPENSSL_VERSION).decode()
    nginx = run_text("nginx", "-v").split(":", 1)[-1].strip()
    nginx_ssl = re.search(r"running with (OpenSSL [\d.]+)", run_text("nginx", "-V"))
    curl = run_text("curl", "--version").split("\n", 1)[0].split()
    return (
        f"mdmd {git_commit()} (Python {platform.python_version()}, {mdmd_ssl}); "
        f"{nginx} ({nginx_ssl.group(1) if nginx_ssl else '?'}); clients ab 2.3, curl {curl[1]} ({curl[3]})"
    )


def tls_details(suite: Suite) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    def describe(cert: x509.Certificate) -> str:
        key = cert.public_key()
        if isinstance(key, ec.EllipticCurvePublicKey):
            return f"ECDSA {key.curve.name}"
        if isinstance(key, rsa.RSAPublicKey):
            return f"RSA {key.key_size}"
        return type(key).__name__

    server = x509.load_pem_x509_certificate((suite.daemon.state / "tls-server.pem").read_bytes())
    client = x509.load_pem_x509_certificate(suite.pem.read_bytes())
    seen = "; ".join(
        f"{name}: {', '.join(sorted(suite.tls.get(name, set()))) or '-'}" for name in ("mdmd", "nginx")
    )
    return (
        f"server certificate {describe(server)}, client certificate {describe(client)} (mutual TLS), "
        f"no session resumption; negotiated ({seen})"
    )


def header(suite: Suite, a: argparse.Namespace, title: str, workers: str = "") -> None:
    print(f"\n{title}")
    print(f"- machine: {machine()}")
    print(f"- software: {versions()}")
    print(f"- TLS: {tls_details(suite)}")
    print(
        f"- {a.rounds} alternating round pairs per scenario (mdmd then nginx), {CONCURRENCY} concurrent "
        f"clients; medians; ratios per pair, then their median; workers {workers or suite.workers} "
        "(mdmd [mdmd] workers, nginx worker_processes)"
    )


def print_tables(suite: Suite, a: argparse.Namespace) -> None:
    header(suite, a, "mdmd beside nginx")
    print(
        "\n| scenario | mdmd req/s | mdmd CPU ms/req | nginx req/s | nginx CPU ms/req "
        "| CPU ratio mdmd/nginx | req/s ratio nginx/mdmd | not 2xx | checks |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for scenario in dict.fromkeys(r.scenario for r in suite.rounds):
        mine = [r for r in suite.rounds if r.scenario == scenario and r.server == "mdmd"]
        theirs = {r.pair: r for r in suite.rounds if r.scenario == scenario and r.server == "nginx"}
        if not mine:
            continue
        m_rate = statistics.median(r.rate for r in mine)
        m_cpu = statistics.median(r.cpu_ms for r in mine)
        bad = "; ".join(
            f"{r.server} #{r.pair + 1}: {r.bad}"
            for r in suite.rounds
            if r.scenario == scenario and r.bad != "-"
        )
        summed: Counter[str] = Counter()
        for r in mine:
            summed.update(r.checks)
        checks = ", ".join(f"{name} {n}" for name, n in summed.items())
        unit = " (chains)" if mine[0].unit > 1 else ""
        if theirs:
            pairs = [(m, theirs[m.pair]) for m in mine if m.pair in theirs]
            n_rate = statistics.median(r.rate for r in theirs.values())
            n_cpu = statistics.median(r.cpu_ms for r in theirs.values())
            cpu_ratio = statistics.median(m.cpu_ms / n.cpu_ms for m, n in pairs)
            rate_ratio = statistics.median(n.rate / m.rate for m, n in pairs if m.rate)
            print(
                f"| {scenario} | {m_rate:.0f} | {m_cpu:.3f} | {n_rate:.0f} | {n_cpu:.3f} | {cpu_ratio:.1f} "
                f"| {rate_ratio:.1f} | {bad or '-'} | {checks or '-'} |"
            )
        else:
            print(
                f"| {scenario}{unit} | {m_rate:.0f} | {m_cpu:.3f} | - | - | - | - | {bad or '-'} "
                f"| {checks or '-'} |"
            )
    if suite.floors:
        print(
            "\nThe floor under mdmd (bench/floor.py with mdmd's TLS options): server CPU ms per request, "
            "median of the rounds"
        )
        names = ["nginx", *suite.floors, "mdmd"]
        print("\n| scenario | " + " | ".join(names) + " | mdmd above floor-web |")
        print("|---|" + "---|" * (len(names) + 1))
        for scenario in dict.fromkeys(r.scenario for r in suite.rounds):
            cpu = {
                name: statistics.median(
                    [r.cpu_ms for r in suite.rounds if r.scenario == scenario and r.server == name]
                    or [math.nan]
                )
                for name in names
            }
            if math.isnan(cpu["floor-web"]):
                continue
            print(
                f"| {scenario} | "
                + " | ".join(f"{cpu[n]:.3f}" for n in names)
                + f" | {cpu['mdmd'] - cpu['floor-web']:.3f} |"
            )
    print(
        "\nEvery round (client: CPU of ab/curl per request; conns/req: new connections per request as the "
        "client counted them; other: the machine's busy share that was neither server nor client):"
    )
    print("\n| scenario | # | server | req/s | CPU ms/req | client ms/req | conns/req | other % | not 2xx |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in suite.rounds:
        print(
            f"| {r.scenario} | {r.pair + 1} | {r.server} | {r.rate:.0f} | {r.cpu_ms:.3f} "
            f"| {r.client_cpu_ms:.3f} | {r.connections_per_request:.2f} | {r.other_pct:.0f} | {r.bad} |"
        )


def print_scaling(suites: Sequence[Suite], a: argparse.Namespace) -> None:
    one, two = suites
    header(two, a, "mdmd beside nginx: scaling from 1 worker to 2 (req/s at 2 / req/s at 1)", "1, then 2")
    print(
        "\n| scenario | mdmd req/s w1 | mdmd req/s w2 | mdmd scaling | mdmd CPU ms/req w1 "
        "| mdmd CPU ms/req w2 | nginx req/s w1 | nginx req/s w2 | nginx scaling "
        "| other % w1 / w2 (mdmd rounds) | not 2xx |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")

    def med(suite: Suite, scenario: str, server: str, what: Callable[[Round], float]) -> float | None:
        values = [what(r) for r in suite.rounds if r.scenario == scenario and r.server == server]
        return statistics.median(values) if values else None

    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for scenario in dict.fromkeys(r.scenario for r in one.rounds):
        cells = []
        for server in ("mdmd", "nginx"):
            r1 = med(one, scenario, server, lambda r: r.rate)
            r2 = med(two, scenario, server, lambda r: r.rate)
            factor = r2 / r1 if r1 and r2 is not None else None
            cells += [fmt(r1, ".0f"), fmt(r2, ".0f"), fmt(factor, ".2f")]
            if server == "mdmd":
                cells += [
                    fmt(med(one, scenario, server, lambda r: r.cpu_ms), ".3f"),
                    fmt(med(two, scenario, server, lambda r: r.cpu_ms), ".3f"),
                ]
        others = [med(s, scenario, "mdmd", lambda r: r.other_pct) for s in suites]
        cells.append(" / ".join(fmt(o, ".0f") for o in others))
        bad = "; ".join(
            f"{r.server} w{r.workers} #{r.pair + 1}: {r.bad}"
            for s in suites
            for r in s.rounds
            if r.scenario == scenario and r.bad != "-"
        )
        print(f"| {scenario} | {' | '.join(cells)} | {bad or '-'} |")


def main(argv: Sequence[str] | None = None, prog: str = "bench/anchor") -> int:
    p = argparse.ArgumentParser(
        prog=prog,
        description=(__doc__ or "").split("\n\n")[0],
        epilog=f"scenarios: {', '.join(SCENARIOS)}",
    )
    p.add_argument("--rounds", type=int, default=3, help="alternating round pairs per scenario (3)")
    p.add_argument(
        "--requests", type=int, default=2000, help="requests per new-connection round (2000; x5 kept alive)"
    )
    p.add_argument("--sessions", type=int, default=800, help="new sessions per session-new round (800)")
    p.add_argument("--chains", type=int, default=200, help="enrollment chains per round (200)")
    p.add_argument(
        "--workers", type=int, default=1, help="mdmd [mdmd] workers and nginx worker_processes (1)"
    )
    p.add_argument(
        "--scaling",
        action="store_true",
        help=f"run {', '.join(SCALING)} with workers 1, then 2, and print the scaling factor",
    )
    p.add_argument("--only", action="append", choices=SCENARIOS, help="run only these scenarios (repeatable)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs, stores)")
    p.add_argument(
        "--floor",
        action="store_true",
        help="also measure bench/floor.py (mdmd's TLS options before a bare protocol and before twisted.web)",
    )
    a = p.parse_args(argv)
    need("nginx", "ab", "curl")
    if a.scaling:
        scenarios = [s for s in SCALING if not a.only or s in a.only]
        worker_counts = [1, 2]
    else:
        scenarios = [s for s in SCENARIOS if not a.only or s in a.only]
        worker_counts = [a.workers]

    root = Path(tempfile.mkdtemp(prefix="mdmd-anchor-"))
    suites: list[Suite] = []
    try:
        for workers in worker_counts:
            suite = start_suite(root, workers, "session-new" in scenarios, a.floor)
            suites.append(suite)
            try:
                for server in ("mdmd", "nginx"):
                    for version in ("1.2", "1.3"):
                        suite.tls.setdefault(server, set()).update(
                            tls_probe(suite.urls[server], suite.body, suite.pem, version)
                        )
                run_suite(suite, scenarios, a)
            finally:
                suite.stop()
            print_tables(suite, a)
            sys.stdout.flush()
        if a.scaling:
            print_scaling(suites, a)
    finally:
        if a.keep:
            say(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
