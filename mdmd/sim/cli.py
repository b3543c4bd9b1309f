"""``mdmd-sim``: a fleet of emulated Windows devices against one mdmd node.

Each device runs what a Windows PC with the orbit agent does: orbit enroll
and config, MS-MDE2 discovery (GET probe, then POST), MS-XCEP policy and
MS-WSTEP enrollment with its own RSA-2048 key, then OMA-DM management
sessions over mutual TLS with the certificate it was issued, again every
``--interval`` seconds until ``--duration`` has passed, answering the
server's commands the Windows way.  When a device's certificate enters its
provisioned renewal period it renews it first, as Windows does (MS-MDE2 3.5:
discovery, policy and a Renew request at the provisioned ServerURL over TLS
with the current certificate), then checks in with the new one; after a
failure it waits the provisioned retry interval.  ``--clock-offset DAYS``
moves the devices' clock for that decision (the server decides with its
own).  The messages are built and read by
:mod:`mdmd.sim.device` (the emulator the test suite uses too); this module
adds the Twisted transport (:mod:`mdmd.sim.transport`), the orchestration
and the measurements.

At the end it prints a summary (``--json``: a machine-readable one): devices
enrolled, enrollments/s, check-ins/s, latency p50/p95/p99 per step, errors by
kind and the first few errors in full.  The exit status is 0 when nothing
went wrong, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import resource
import sys
import time
import traceback
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TextIO, TypeVar
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer, error, task, threads
from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.interfaces import IReactorCore, IReactorTime
from twisted.internet.ssl import platformTrust
from twisted.web.client import ResponseFailed

from mdmd.sim.device import EnrollmentResult, ManagementClient, ProtocolError, RenewalSchedule, WindowsDevice
from mdmd.sim.transport import HTTPReply, HTTPSClient, HTTPStatusError, SimTLSPolicy, load_trust_root

__all__ = ["Fleet", "SimOptions", "Stats", "main", "parse_args"]

T = TypeVar("T")

ORBIT_ENROLL = "/api/fleet/orbit/enroll"
ORBIT_CONFIG = "/api/fleet/orbit/config"
SOAP_CONTENT_TYPE = "application/soap+xml; charset=utf-8"
SYNCML_CONTENT_TYPE = "application/vnd.syncml.dm+xml"
# Windows appends this to the provisioned management URL.
MANAGEMENT_QUERY = "mode=Maintenance&Platform=WoA"
STEPS = ("orbit_enroll", "orbit_config", "discovery", "policy", "enroll", "checkin", "renew")
MAX_SESSION_MESSAGES = 200
FIRST_ERRORS = 3
DEVICES_FILE_VERSION = 1


# --------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class SimOptions:
    url: str | None  # enrollment base URL, https://host:port
    secret: str | None
    cacert: str | None
    devices: int | None
    concurrency: int
    interval: float
    duration: float
    keys_cache: str | None
    json: bool
    management_url: str | None
    max_msg_size: int | None
    timeout: float
    keep_alive: bool
    save_devices: str | None
    load_devices: str | None
    progress: bool | None
    samples: bool = False
    # How the devices' management trees answer (OMA-DM).
    drift_rate: float = 0.0
    refuse: tuple[tuple[str, int], ...] = ()
    write_only: tuple[str, ...] = ()
    seed: int | None = None
    clock_offset: float = 0.0  # seconds added to the devices' clock


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a number of seconds, 0 or more, got {text}")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _locuri(text: str) -> str:
    if not text.startswith("./") or text.endswith("/"):
        raise argparse.ArgumentTypeError(f"must be a LocURI like ./Device/Vendor/MSFT/..., got {text!r}")
    return text


def _refusal(text: str) -> tuple[str, int]:
    """LOCURI[=CODE], CODE 500 when left out."""
    locuri, sep, code = text.rpartition("=")
    if not sep:
        return _locuri(text), 500
    if not code.isdigit() or not 400 <= int(code) <= 599:
        raise argparse.ArgumentTypeError(f"CODE must be a status code from 400 to 599, got {code!r}")
    return _locuri(locuri), int(code)


def _days(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of days, got {text!r}") from None
    if math.isnan(value) or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a number of days, got {text!r}")
    return value * 86400.0


def parse_args(argv: Sequence[str] | None = None) -> SimOptions:
    p = argparse.ArgumentParser(
        prog="mdmd-sim",
        description="Emulate N Windows devices enrolling into and checking in with an mdmd node.",
    )
    where = p.add_argument_group("server (--config, or --url/--secret/--cacert; these override --config)")
    where.add_argument("--config", metavar="INI", help="the node's mdmd.ini: URLs, enroll secret, dev root")
    where.add_argument("--url", help="enrollment base URL, e.g. https://localhost:8443")
    where.add_argument("--secret", help="the enroll secret")
    where.add_argument("--cacert", metavar="PEM", help="CA certificate(s) to trust for the server")
    where.add_argument(
        "--management-url",
        metavar="URL",
        help="post management sessions here instead of the provisioned URL (e.g. behind a proxy)",
    )
    fleet = p.add_argument_group("fleet")
    fleet.add_argument("--devices", type=_positive_int, metavar="N", help="number of devices")
    fleet.add_argument(
        "--concurrency", type=_positive_int, default=50, metavar="C", help="flows in flight at once (50)"
    )
    fleet.add_argument(
        "--interval",
        type=_seconds,
        default=60.0,
        metavar="S",
        help="seconds between a device's check-ins (60; 0: back to back)",
    )
    fleet.add_argument(
        "--duration",
        type=_seconds,
        default=0.0,
        metavar="S",
        help="keep checking in until S seconds after the start (0: enroll and check in once)",
    )
    fleet.add_argument(
        "--keys-cache",
        metavar="DIR",
        help="device keys as PEM files in DIR, generated once when missing",
    )
    fleet.add_argument(
        "--max-msg-size", type=_positive_int, metavar="BYTES", help="MaxMsgSize the devices announce"
    )
    fleet.add_argument(
        "--keep-alive",
        action="store_true",
        help="keep each device's management connection open between check-ins "
        "(default: a new TLS connection per session, like Windows)",
    )
    fleet.add_argument("--timeout", type=_seconds, default=30.0, metavar="S", help="per request (30)")
    fleet.add_argument(
        "--clock-offset",
        type=_days,
        default=0.0,
        metavar="DAYS",
        help="move the devices' clock by DAYS (may be negative or fractional): when their "
        "certificates are due for renewal (the server decides with its own clock)",
    )
    fleet.add_argument(
        "--save-devices", metavar="FILE", help="write the enrolled devices (keys, certificates) to FILE"
    )
    fleet.add_argument(
        "--load-devices",
        metavar="FILE",
        help="devices enrolled by an earlier run (--save-devices): check in only",
    )
    tree = p.add_argument_group("management tree (how the devices answer the server's OMA-DM commands)")
    tree.add_argument(
        "--drift-rate",
        type=_probability,
        default=0.0,
        metavar="P",
        help="at the start of each session, with probability P, one node the server set on the device "
        "has been changed locally to another value (0)",
    )
    tree.add_argument(
        "--refuse",
        type=_refusal,
        action="append",
        default=[],
        metavar="LOCURI[=CODE]",
        help="Add, Replace, Delete and Exec of LOCURI and of the nodes under it fail with CODE (500), "
        "as when a CSP rejects a value or is missing on an edition (404); repeatable",
    )
    tree.add_argument(
        "--write-only",
        type=_locuri,
        action="append",
        default=[],
        metavar="LOCURI",
        help="a Get of LOCURI answers 405 ('*' matches any one segment); repeatable, "
        "besides the Accounts CSP's user passwords",
    )
    tree.add_argument(
        "--seed",
        type=int,
        metavar="N",
        help="seed the random choices (drift, check-in spread) to repeat a run",
    )
    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print the summary as JSON")
    out.add_argument(
        "--samples",
        action="store_true",
        help="with --json: every latency sample too (to merge the summaries of several processes)",
    )
    progress = out.add_mutually_exclusive_group()
    progress.add_argument(
        "--progress",
        dest="progress",
        action="store_true",
        default=None,
        help="a status line on stderr (default: when stderr is a terminal)",
    )
    progress.add_argument("--no-progress", dest="progress", action="store_false", help="no status line")
    a = p.parse_args(argv)

    url, secret, cacert = a.url, a.secret, a.cacert
    if a.config:
        from mdmd.config import ConfigError, load_config

        try:
            config = load_config(a.config)
        except ConfigError as e:
            p.error(str(e))
        url = url or config.enrollment.url
        if cacert is None:
            if not os.path.exists(config.tls_root_cert):
                # A brought-in certificate: mdmd has no development root to
                # offer, and the simulator cannot guess which CA to trust.
                root = config.tls_root_cert
                _say(
                    f"the server's TLS certificate is not from mdmd's development root ({root} does not"
                    f" exist): give --cacert with the CA certificate that issued it"
                )
                raise SystemExit(2)
            cacert = config.tls_root_cert
        if secret is None and not a.load_devices:
            try:
                with open(config.enrollment.enroll_secret_file, encoding="utf-8") as f:
                    secret = f.read().strip()
            except OSError as e:
                p.error(f"{config.enrollment.enroll_secret_file}: {e.strerror}")
    if not a.load_devices:
        if not url or secret is None:
            p.error("give --config, or --url and --secret")
        if a.devices is None:
            p.error("--devices is required (unless --load-devices)")
    if cacert is not None and not os.path.isfile(cacert):
        _say(f"--cacert {cacert}: no such file")
        raise SystemExit(2)
    if url is not None:
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            p.error(f"--url must be an https:// URL, got {url!r}")
        url = url.rstrip("/")
    return SimOptions(
        url=url,
        secret=secret,
        cacert=cacert,
        devices=a.devices,
        concurrency=a.concurrency,
        interval=a.interval,
        duration=a.duration,
        keys_cache=a.keys_cache,
        json=a.json,
        management_url=a.management_url,
        max_msg_size=a.max_msg_size,
        timeout=a.timeout or 30.0,
        keep_alive=a.keep_alive,
        save_devices=a.save_devices,
        load_devices=a.load_devices,
        progress=a.progress,
        samples=a.samples,
        drift_rate=a.drift_rate,
        refuse=tuple(a.refuse),
        write_only=tuple(a.write_only),
        seed=a.seed,
        clock_offset=a.clock_offset,
    )


# --------------------------------------------------------------------------
# Device keys (before the reactor runs: RSA generation is seconds of CPU)
# --------------------------------------------------------------------------


def _new_key_pem() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())


def _load_key(pem: bytes) -> rsa.RSAPrivateKey:
    # Our own keys: the (slow) RSA consistency check adds nothing.
    key = load_pem_private_key(pem, None, unsafe_skip_rsa_key_validation=True)
    if not isinstance(key, rsa.RSAPrivateKey) or key.key_size < 2048:
        raise ValueError("not an RSA key of 2048 bits or more")
    return key


def _generate_pems(count: int) -> list[bytes]:
    if count <= 2:
        return [_new_key_pem() for _ in range(count)]
    workers = min(count, os.cpu_count() or 1)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_new_key_pem_n, range(count), chunksize=max(1, count // (workers * 4))))


def _new_key_pem_n(_: int) -> bytes:
    return _new_key_pem()


def device_keys(count: int, cache: str | None, say: Callable[[str], None]) -> list[rsa.RSAPrivateKey]:
    """*count* RSA-2048 keys: from *cache* (``device-000000.pem``...), the
    missing ones generated (in parallel processes) and written there."""
    if cache is None:
        if count > 2:
            say(f"generating {count} RSA-2048 device keys (use --keys-cache to keep them)")
        return [_load_key(pem) for pem in _generate_pems(count)]
    os.makedirs(cache, exist_ok=True)
    paths = [os.path.join(cache, f"device-{i:06d}.pem") for i in range(count)]
    missing = [path for path in paths if not os.path.exists(path)]
    if missing:
        say(f"generating {len(missing)} RSA-2048 device keys into {cache}")
        for path, pem in zip(missing, _generate_pems(len(missing)), strict=True):
            tmp = f"{path}.{os.getpid()}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
            os.replace(tmp, path)
    keys = []
    for path in paths:
        with open(path, "rb") as f:
            keys.append(_load_key(f.read()))
    return keys


# --------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------


@dataclass
class SimDevice:
    index: int
    device: WindowsDevice
    client: ManagementClient | None = None
    http: HTTPSClient | None = None  # kept between check-ins with --keep-alive
    renew_not_before: float = 0.0  # after a failed renewal: the retry interval (wall clock)

    @property
    def name(self) -> str:
        return f"{self.device.hostname} ({self.device.device_id})"


def new_devices(keys: Sequence[rsa.RSAPrivateKey]) -> list[SimDevice]:
    # Windows names are at most 15 characters.
    return [
        SimDevice(i, WindowsDevice(key=key, hostname=f"DESKTOP-{i:07d}"[-15:])) for i, key in enumerate(keys)
    ]


def save_devices(path: str, devices: Sequence[SimDevice]) -> int:
    """Write the enrolled *devices* to *path* (0600: it holds private keys).
    A device that was wiped or unenrolled is no longer one."""
    records = []
    for sd in devices:
        d, e = sd.device, sd.device.enrollment
        if e is None or (sd.client is not None and sd.client.gone):
            continue
        records.append(
            {
                "hardware_uuid": d.hardware_uuid,
                "device_id": d.device_id,
                "hw_dev_id": d.hw_dev_id,
                "hostname": d.hostname,
                "os_version": d.os_version,
                "node_key": d.node_key,
                "key": d.key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()).decode(),
                "certificate": e.certificate.public_bytes(Encoding.PEM).decode(),
                "management_url": e.management_url,
                "provider_id": e.provider_id,
                "session_id": sd.client.session_id if sd.client else 0,
                "nodes": sd.client.tree_state() if sd.client else {},
                "renewal": None
                if e.renewal is None
                else {
                    "renew_period_days": e.renewal.renew_period_days,
                    "retry_interval_days": e.renewal.retry_interval_days,
                    "server_url": e.renewal.server_url,
                },
            }
        )
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"version": DEVICES_FILE_VERSION, "devices": records}, f)
    os.replace(tmp, path)
    return len(records)


def load_devices(path: str, limit: int | None, max_msg_size: int | None) -> list[SimDevice]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or data.get("version") != DEVICES_FILE_VERSION:
        raise ValueError(f"{path}: not an mdmd-sim devices file (version {DEVICES_FILE_VERSION})")
    out = []
    for i, r in enumerate(data["devices"][:limit]):
        device = WindowsDevice(
            key=_load_key(r["key"].encode()),
            hardware_uuid=r["hardware_uuid"],
            device_id=r["device_id"],
            hw_dev_id=r["hw_dev_id"],
            hostname=r["hostname"],
            os_version=r["os_version"],
        )
        device.node_key = r["node_key"]
        device.enrollment = EnrollmentResult(
            certificate=x509.load_pem_x509_certificate(r["certificate"].encode()),
            root_certificates=(),
            management_url=r["management_url"],
            provider_id=r["provider_id"],
            provisioning_doc=b"",
            renewal=None if not r.get("renewal") else RenewalSchedule(**r["renewal"]),
        )
        client = ManagementClient(device, max_msg_size=max_msg_size)
        client.session_id = int(r.get("session_id", 0))
        client.restore_tree(r.get("nodes", {}))
        out.append(SimDevice(i, device, client))
    return out


def configure_tree(client: ManagementClient, index: int, options: SimOptions) -> ManagementClient:
    """Give device *index*'s management tree the behaviour the options ask
    for.  Each device draws from its own generator, so that a seeded run
    repeats whatever order the devices' sessions interleave in."""
    client.drift_rate = options.drift_rate
    client.rng = random.Random(f"{options.seed}:{index}") if options.seed is not None else random.Random()
    for locuri, code in options.refuse:
        client.refuse(locuri, code)
    client.write_only.update(options.write_only)
    return client


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


class AnswerError(Exception):
    """A reply the device would not accept (bad XML or JSON, a fault, a
    refusal): the cause, and the reply for the report."""

    def __init__(self, cause: Exception, reply: HTTPReply) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.reply = reply


def accept(reply: HTTPReply, read: Callable[[bytes], T]) -> T:
    """What *read* makes of the reply body; a reply the device cannot read
    (or an HTTP status other than 200) is an error."""
    try:
        value = read(reply.body)
    except (ProtocolError, ValueError) as e:
        raise AnswerError(e, reply) from e
    if reply.status != 200:
        raise HTTPStatusError("POST", "", reply)
    return value


def _json_object(body: bytes) -> dict[str, Any]:
    value = json.loads(body)
    if not isinstance(value, dict):
        raise ValueError("the answer is not a JSON object")
    return value


def _ssl_failure(e: BaseException) -> bool:
    # A server certificate for another host name fails after the handshake,
    # in service_identity: still a TLS failure to the device.
    if isinstance(e, SSL.Error | VerificationError):
        return True
    if isinstance(e, ResponseFailed):
        return any(_ssl_failure(f.value) for f in e.reasons)
    return False


def classify(e: BaseException) -> str:
    """The kind of an error, for the counts (the step is added by the caller)."""
    if isinstance(e, AnswerError):
        cause = e.cause
        if isinstance(cause, ProtocolError):
            text = str(cause)
            fault = re.search(r"fault (\S+):", text)
            if fault:
                return f"fault {fault.group(1)}"
            status = re.search(r"SyncHdr with status (\d+)", text)
            if status:
                return f"SyncHdr status {status.group(1)}"
            status = re.search(r"with status (\d+)", text)
            if status:
                return f"status {status.group(1)}"
            if "not XML" in text:
                return "bad XML"
            return "protocol"
        return "bad JSON"
    if isinstance(e, HTTPStatusError):
        return f"http {e.status}"
    if isinstance(e, ProtocolError):
        return "protocol"
    if isinstance(e, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, defer.TimeoutError | error.TimeoutError):
        return "timeout"
    if _ssl_failure(e):
        return "tls"
    if isinstance(e, ResponseFailed):
        return "connection lost"
    if isinstance(e, error.ConnectError):
        return "connect"
    return type(e).__name__


def _excerpt(body: bytes, limit: int = 4000) -> str:
    text = body.decode("utf-8", "replace")
    return text if len(text) <= limit else text[:limit] + f"... ({len(body)} bytes)"


# --------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an ascending sequence."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass
class Stats:
    devices: int = 0
    enrolled: int = 0
    renewed: int = 0
    checkins: int = 0
    messages: int = 0
    commands: int = 0
    drifts: int = 0
    left: int = 0  # devices wiped or unenrolled by the server: they stop checking in
    latencies: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in STEPS})
    errors: Counter[str] = field(default_factory=Counter)
    first_errors: list[dict[str, Any]] = field(default_factory=list)
    started: float = 0.0
    finished: float = 0.0
    cpu_at_start: float = 0.0
    last_enrolled: float | None = None
    first_checkin: float | None = None
    last_checkin: float | None = None

    def error(self, step: str, sd: SimDevice, e: BaseException) -> None:
        kind = f"{step}: {classify(e)}"
        self.errors[kind] += 1
        if len(self.first_errors) < FIRST_ERRORS:
            detail: dict[str, Any] = {"kind": kind, "step": step, "device": sd.name, "error": str(e)}
            reply = e.reply if isinstance(e, AnswerError | HTTPStatusError) else None
            if reply is not None:
                detail["http_status"] = reply.status
                detail["content_type"] = reply.content_type
                detail["body"] = _excerpt(reply.body)
            if isinstance(e, ResponseFailed):
                detail["reasons"] = [f.getErrorMessage() for f in e.reasons]
            elif not isinstance(e, ProtocolError | AnswerError | HTTPStatusError):
                detail["traceback"] = "".join(traceback.format_exception(e)).rstrip()
            self.first_errors.append(detail)

    def summary(self, options: SimOptions, *, interrupted: bool = False) -> dict[str, Any]:
        elapsed = (self.finished or time.monotonic()) - self.started
        enroll_window = (self.last_enrolled - self.started) if self.last_enrolled else 0.0
        checkin_window = (
            self.last_checkin - self.first_checkin
            if self.first_checkin is not None and self.last_checkin is not None
            else 0.0
        )
        latency = {}
        for step, values in self.latencies.items():
            ordered = sorted(values)
            latency[step] = {
                "count": len(ordered),
                "p50": round(percentile(ordered, 50) * 1000, 2) if ordered else None,
                "p95": round(percentile(ordered, 95) * 1000, 2) if ordered else None,
                "p99": round(percentile(ordered, 99) * 1000, 2) if ordered else None,
                "max": round(ordered[-1] * 1000, 2) if ordered else None,
            }
        return {
            "devices": self.devices,
            "concurrency": options.concurrency,
            "interval_s": options.interval,
            "duration_s": options.duration,
            "keep_alive": options.keep_alive,
            "enrolled": self.enrolled,
            "renewed": self.renewed,
            "checkins": self.checkins,
            "messages": self.messages,
            "commands": self.commands,
            "drifts": self.drifts,
            "left": self.left,
            "elapsed_s": round(elapsed, 3),
            "enroll_window_s": round(enroll_window, 3),
            "checkin_window_s": round(checkin_window, 3),
            "enrollments_per_s": round(self.enrolled / enroll_window, 1) if enroll_window > 0 else None,
            "checkins_per_s": round(self.checkins / checkin_window, 1) if checkin_window > 0 else None,
            "latency_ms": latency,
            "errors": dict(sorted(self.errors.items())),
            "error_count": sum(self.errors.values()),
            "first_errors": self.first_errors,
            "sim_cpu_s": round(_cpu_seconds() - self.cpu_at_start, 3),
            "interrupted": interrupted,
        } | (
            {"latency_samples_ms": {s: [round(v * 1000, 3) for v in vs] for s, vs in self.latencies.items()}}
            if options.samples
            else {}
        )


def _cpu_seconds() -> float:
    """CPU time of this process (the simulator's own load on the machine)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def format_summary(s: dict[str, Any]) -> str:
    def num(value: object, unit: str = "") -> str:
        return "-" if value is None else f"{value}{unit}"

    lines = [
        f"mdmd-sim: {s['devices']} devices, concurrency {s['concurrency']}, "
        f"{s['elapsed_s']:.1f} s, simulator CPU {s['sim_cpu_s']:.1f} s"
        f"{' (interrupted)' if s['interrupted'] else ''}",
        f"  enrolled   {s['enrolled']:>8}   enrollments/s {num(s['enrollments_per_s'])}",
        f"  renewed    {s['renewed']:>8}",
        f"  check-ins  {s['checkins']:>8}   check-ins/s   {num(s['checkins_per_s'])}"
        f"   (messages {s['messages']}, commands answered {s['commands']}"
        f"{', drifts injected ' + str(s['drifts']) if s['drifts'] else ''}"
        f"{', wiped or unenrolled ' + str(s['left']) if s.get('left') else ''})",
        "  latency ms        count      p50      p95      p99      max",
    ]
    for step, lat in s["latency_ms"].items():
        if lat["count"]:
            lines.append(
                f"    {step:<13} {lat['count']:>7} {lat['p50']:>8.1f} {lat['p95']:>8.1f} "
                f"{lat['p99']:>8.1f} {lat['max']:>8.1f}"
            )
    if not s["errors"]:
        lines.append("  errors: none")
    else:
        lines.append(f"  errors: {s['error_count']}")
        lines.extend(f"    {count:>7}  {kind}" for kind, count in s["errors"].items())
        for n, detail in enumerate(s["first_errors"], 1):
            lines.append(f"  --- error {n}: {detail['kind']} ({detail['device']})")
            lines.append(f"  {detail['error']}")
            for key in ("http_status", "content_type", "reasons", "body", "traceback"):
                if key in detail:
                    lines.append(f"  {key}: {detail[key]}")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# The fleet
# --------------------------------------------------------------------------


class Fleet:
    """Runs the devices' flows on the reactor, at most *concurrency* at a time."""

    def __init__(self, reactor: IReactorTime, options: SimOptions, devices: list[SimDevice]) -> None:
        self.reactor = reactor
        self.options = options
        self.devices = devices
        self.trust = load_trust_root(options.cacert) if options.cacert else platformTrust()
        self.enrollment_policy = SimTLSPolicy(self.trust)
        self._identities: OrderedDict[int, SimTLSPolicy] = OrderedDict()
        self._identity_cache_size = max(1024, 4 * options.concurrency)
        self.semaphore = DeferredSemaphore(options.concurrency)
        self.stats = Stats(devices=len(devices))
        self.deadline = 0.0
        self.rng = random.Random(options.seed)
        for sd in devices:
            if sd.client is not None:
                configure_tree(sd.client, sd.index, options)

    def now(self) -> float:
        return time.monotonic()

    def device_clock(self) -> float:
        """The devices' wall clock (``--clock-offset`` applied)."""
        return time.time() + self.options.clock_offset

    @property
    def in_flight(self) -> int:
        return self.options.concurrency - self.semaphore.tokens

    def _observe(self, step: str, started: float) -> None:
        self.stats.latencies[step].append(time.monotonic() - started)

    async def _timed(self, step: str, request: Awaitable[T]) -> T:
        started = time.monotonic()
        result = await request
        self._observe(step, started)
        return result

    async def run(self) -> Stats:
        self.stats.started = self.now()
        self.stats.cpu_at_start = _cpu_seconds()
        self.deadline = self.stats.started + self.options.duration
        await defer.gatherResults(
            [Deferred.fromCoroutine(self._device_main(sd)) for sd in self.devices], consumeErrors=True
        )
        closing = [sd.http.close() for sd in self.devices if sd.http is not None]
        if closing:
            await defer.gatherResults(closing, consumeErrors=True)
        self.stats.finished = self.now()
        return self.stats

    async def _device_main(self, sd: SimDevice) -> None:
        o = self.options
        if sd.device.enrollment is None:
            async with self.semaphore:
                if not await self.enroll(sd):
                    return
            first = self.now()
        else:
            # Devices that enrolled earlier do not poll in step: spread
            # their first check-in over one interval (within the duration).
            first = self.now() + self.rng.uniform(0, min(o.interval, o.duration))
        next_at = first
        while True:
            delay = next_at - self.now()
            if delay > 0:
                await task.deferLater(self.reactor, delay)
            started = self.now()
            async with self.semaphore:
                await self.checkin(sd)
            if sd.client is not None and sd.client.gone:
                # Wiped or unenrolled by the server: a PC without an MDM account.
                self.stats.left += 1
                return
            next_at = started + o.interval
            if next_at > self.deadline:
                return
            if o.interval == 0:
                # Let other devices' callbacks run between back-to-back sessions.
                await task.deferLater(self.reactor, 0)

    # -- enrollment --

    async def enroll(self, sd: SimDevice) -> bool:
        """The whole enrollment flow of one device; True if it enrolled.

        The agent and Windows' enrollment client are separate programs: each
        opens its own TLS connection (reused for its own requests)."""
        o = self.options
        assert o.url is not None and o.secret is not None
        dev = sd.device
        agent = HTTPSClient(self.reactor, self.enrollment_policy, timeout=o.timeout)
        windows = HTTPSClient(self.reactor, self.enrollment_policy, timeout=o.timeout)
        step = "orbit_enroll"
        try:
            reply = await self._timed(
                step, agent.post_json(o.url + ORBIT_ENROLL, dev.orbit_enroll_request(o.secret))
            )
            dev.orbit_enrolled(accept(reply, _json_object))

            step = "orbit_config"
            reply = await self._timed(step, agent.post_json(o.url + ORBIT_CONFIG, dev.orbit_config_request()))
            discovery_url = dev.discovery_endpoint(accept(reply, _json_object))
            if discovery_url is None:
                raise ProtocolError("orbit config does not ask for programmatic MDM enrollment")
            await _quietly(agent.close())

            step = "discovery"
            started = time.monotonic()
            # MS-MDE2: Windows probes the discovery URL with a GET first.
            await windows.request("GET", discovery_url)
            reply = await windows.post(
                discovery_url, dev.discover_request(discovery_url), SOAP_CONTENT_TYPE, expect=None
            )
            self._observe(step, started)
            policy_url, enrollment_url = accept(reply, dev.discover_result)

            step = "policy"
            request = dev.get_policies_request(policy_url)
            reply = await self._timed(step, windows.post(policy_url, request, SOAP_CONTENT_TYPE, expect=None))
            bits = accept(reply, dev.policy_min_key_bits)
            if bits > dev.key.key_size:
                raise ProtocolError(f"policy asks for {bits}-bit keys, the device has {dev.key.key_size}")

            step = "enroll"
            request = dev.enroll_request(enrollment_url)  # signs the CSR: outside the timing
            reply = await self._timed(
                step, windows.post(enrollment_url, request, SOAP_CONTENT_TYPE, expect=None)
            )
            accept(reply, dev.enrolled)
        except Exception as e:
            self.stats.error(step, sd, e)
            return False
        finally:
            await _quietly(agent.close())
            await _quietly(windows.close())
        sd.client = self.new_client(sd)
        self.stats.enrolled += 1
        self.stats.last_enrolled = self.now()
        return True

    # -- management --

    def new_client(self, sd: SimDevice) -> ManagementClient:
        client = ManagementClient(sd.device, max_msg_size=self.options.max_msg_size)
        return configure_tree(client, sd.index, self.options)

    def _identity(self, sd: SimDevice) -> SimTLSPolicy:
        """The device's mutual-TLS policy.  Its OpenSSL context costs ~25 KiB
        and ~0.5 ms to build: the recently used ones are kept, not all."""
        policy = self._identities.pop(sd.index, None)
        if policy is None:
            enrollment = sd.device.enrollment
            assert enrollment is not None
            policy = SimTLSPolicy(
                self.trust, client_certificate=enrollment.certificate, client_key=sd.device.key
            )
        self._identities[sd.index] = policy
        while len(self._identities) > self._identity_cache_size:
            self._identities.popitem(last=False)
        return policy

    def _management_http(self, sd: SimDevice) -> HTTPSClient:
        if sd.http is not None:
            return sd.http
        http = HTTPSClient(self.reactor, self._identity(sd), timeout=self.options.timeout)
        if self.options.keep_alive:
            sd.http = http
        return http

    # -- certificate renewal --

    def _forget_identity(self, sd: SimDevice) -> None:
        self._identities.pop(sd.index, None)

    async def renew(self, sd: SimDevice) -> bool:
        """Windows' automatic renewal (MS-MDE2 3.5) over TLS with the current
        certificate; True if the device now holds a new certificate."""
        dev = sd.device
        enrollment = dev.enrollment
        assert enrollment is not None and enrollment.renewal is not None
        schedule = enrollment.renewal
        # A new RSA key is seconds of CPU for many devices: off the reactor.
        new_key: rsa.RSAPrivateKey = await threads.deferToThread(
            rsa.generate_private_key, public_exponent=65537, key_size=2048
        )
        http = HTTPSClient(self.reactor, self._identity(sd), timeout=self.options.timeout)
        started = time.monotonic()
        try:
            await http.request("GET", schedule.server_url)
            reply = await http.post(
                schedule.server_url, dev.discover_request(schedule.server_url), SOAP_CONTENT_TYPE, expect=None
            )
            policy_url, enrollment_url = accept(reply, dev.discover_result)
            reply = await http.post(
                policy_url, dev.renewal_policies_request(policy_url), SOAP_CONTENT_TYPE, expect=None
            )
            accept(reply, dev.policy_min_key_bits)
            request = dev.renew_request(enrollment_url, new_key)
            reply = await http.post(enrollment_url, request, SOAP_CONTENT_TYPE, expect=None)
            accept(reply, lambda body: dev.renewed(body, new_key))
        except Exception as e:
            self.stats.error("renew", sd, e)
            # Windows tries again after the provisioned retry interval.
            sd.renew_not_before = self.device_clock() + schedule.retry_interval_days * 86400
            return False
        finally:
            await _quietly(http.close())
        self._observe("renew", started)
        self.stats.renewed += 1
        # Check in with the new certificate from now on.
        self._forget_identity(sd)
        if sd.http is not None:
            await _quietly(sd.http.close())
            sd.http = None
        return True

    async def checkin(self, sd: SimDevice) -> bool:
        """One whole OMA-DM session; True if it went as Windows expects."""
        clock = self.device_clock()
        if sd.device.renewal_due(clock) and clock >= sd.renew_not_before:
            await self.renew(sd)
        enrollment = sd.device.enrollment
        assert enrollment is not None
        if sd.client is None:
            sd.client = self.new_client(sd)
        client = sd.client
        base = self.options.management_url or enrollment.management_url
        url = base + ("&" if "?" in base else "?") + MANAGEMENT_QUERY
        http = self._management_http(sd)
        started = time.monotonic()
        if self.stats.first_checkin is None:
            self.stats.first_checkin = self.now()
        try:
            drifts = len(client.drifts)
            message: bytes | None = client.session_start(enrollment.management_url)
            self.stats.drifts += len(client.drifts) - drifts
            count = 0
            while message is not None:
                count += 1
                if count > MAX_SESSION_MESSAGES:
                    raise ProtocolError(f"the session did not end after {MAX_SESSION_MESSAGES} messages")
                reply = await http.post(url, message, SYNCML_CONTENT_TYPE, expect=None)
                self.stats.messages += 1
                server = accept(reply, client.read)
                try:
                    message = client.respond(server)
                except ProtocolError as e:
                    raise AnswerError(e, reply) from e
                for _msg_ref, cmd_ref, code in server.statuses:
                    if cmd_ref != "0" and not 200 <= code < 300:
                        raise AnswerError(
                            ProtocolError(f"server answered our command {cmd_ref} with status {code}"), reply
                        )
                self.stats.commands += len(server.commands)
        except Exception as e:
            self.stats.error("checkin", sd, e)
            await _quietly(http.close())
            sd.http = None
            return False
        self._observe("checkin", started)
        self.stats.checkins += 1
        self.stats.last_checkin = self.now()
        if sd.http is None:
            await _quietly(http.close())
        return True


async def _quietly(d: Deferred[Any]) -> None:
    # Closing a connection that is already gone is not worth a report.
    with contextlib.suppress(Exception):
        await d


# --------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------


class Progress:
    """One status line on stderr, rewritten in place (every 10 s on a non-terminal)."""

    def __init__(self, fleet: Fleet, stream: TextIO, tty: bool) -> None:
        self.fleet = fleet
        self.stream = stream
        self.tty = tty
        self.loop = task.LoopingCall(self.show)
        self.loop.clock = fleet.reactor

    def start(self) -> None:
        self.loop.start(0.5 if self.tty else 10.0, now=False)

    def line(self) -> str:
        s = self.fleet.stats
        elapsed = time.monotonic() - s.started
        return (
            f"mdmd-sim {elapsed:7.1f}s  enrolled {s.enrolled}/{s.devices}  check-ins {s.checkins}  "
            f"in flight {self.fleet.in_flight}  errors {sum(s.errors.values())}"
        )

    def show(self) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K" + self.line())
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def stop(self) -> None:
        if self.loop.running:
            self.loop.stop()
        if self.tty:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def _say(text: str) -> None:
    sys.stderr.write(f"mdmd-sim: {text}\n")
    sys.stderr.flush()


class Run:
    """One mdmd-sim invocation: prepares the devices, runs the fleet, reports."""

    def __init__(self, options: SimOptions) -> None:
        self.options = options
        self.fleet: Fleet | None = None
        self.progress: Progress | None = None
        self.reported = False
        self.interrupted = False

    def prepare(self) -> list[SimDevice]:
        o = self.options
        if o.load_devices:
            devices = load_devices(o.load_devices, o.devices, o.max_msg_size)
            if not devices:
                raise ValueError(f"{o.load_devices}: no enrolled devices")
            return devices
        assert o.devices is not None
        return new_devices(device_keys(o.devices, o.keys_cache, _say))

    async def main(self, reactor: IReactorCore, devices: list[SimDevice]) -> None:
        o = self.options
        self.fleet = fleet = Fleet(reactor, o, devices)  # type: ignore[arg-type]
        tty = sys.stderr.isatty()
        if o.progress if o.progress is not None else tty:
            self.progress = Progress(fleet, sys.stderr, tty)
            self.progress.start()
        reactor.addSystemEventTrigger("before", "shutdown", self.report, True)
        stats = await fleet.run()
        self.report()
        if stats.errors:
            raise SystemExit(1)

    def report(self, interrupted: bool = False) -> None:
        if self.reported or self.fleet is None:
            return
        self.reported = True
        if self.progress is not None:
            self.progress.stop()
        o = self.options
        summary = self.fleet.stats.summary(o, interrupted=interrupted)
        if o.save_devices:
            saved = save_devices(o.save_devices, self.fleet.devices)
            summary["saved_devices"] = saved
        if o.json:
            sys.stdout.write(json.dumps(summary, indent=2) + "\n")
        else:
            sys.stdout.write(format_summary(summary) + "\n")
        sys.stdout.flush()
        self.interrupted = interrupted


def main(argv: Sequence[str] | None = None) -> None:
    options = parse_args(argv)
    run = Run(options)
    try:
        devices = run.prepare()
    except (OSError, ValueError, KeyError) as e:
        _say(f"cannot prepare the devices: {e}")
        raise SystemExit(2) from None
    try:
        task.react(run.main, (devices,))
    except SystemExit as e:
        code = e.code
        if run.interrupted and not code:
            code = 1
        raise SystemExit(code) from None


if __name__ == "__main__":
    main()
