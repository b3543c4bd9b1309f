"""Hostile input over real sockets: each gets its 4xx at once, one warning
in the log, no traceback, and nothing stored changes.

The JSON cases go through the one JSON reader (mdmd.jsonsafe); the request
heads go through the listeners' HTTP channel (mdmd.web.MdmdChannel), over
TLS, mutual TLS and plain HTTP.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from enrollment_helpers import LogWatch
from harness import Daemon, client_tls_context, db_rows, enroll_device, running_daemon
from mdmd import pki
from mdmd.sim.device import EnrollmentResult, WindowsDevice

ENROLL = "/api/fleet/orbit/enroll"
CONFIG = "/api/fleet/orbit/config"
DEVICE_TOKEN = "/api/fleet/orbit/device_token"
DISCOVERY = "/api/mdm/microsoft/discovery"
MANAGEMENT = "/api/mdm/microsoft/management"

# Far below the 60 s the idle timeout would take: an answer that has not
# come by then is not coming.
PROMPT = 10.0


@dataclass
class Env:
    daemon: Daemon
    device_id: str
    mtls: ssl.SSLContext


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    directory = tmp_path_factory.mktemp("hostile")
    with running_daemon(directory) as daemon:
        device = WindowsDevice(key=pki.generate_rsa_key(), hostname="DESKTOP-HOSTILE")
        result = enroll_device(daemon, device)
        assert isinstance(result, EnrollmentResult)
        mtls = client_tls_context(daemon, directory, result.certificate, device.key)
        yield Env(daemon, device.device_id, mtls)


def store_rows(daemon: Daemon) -> dict[str, list[tuple[object, ...]]]:
    """Every row of every table."""
    tables = [str(row[0]) for row in db_rows(daemon, "SELECT name FROM sqlite_master WHERE type = 'table'")]
    return {table: sorted(db_rows(daemon, f"SELECT * FROM {table}"), key=repr) for table in tables}


def expect_one_warning(watch: LogWatch, needle: str) -> str:
    text = watch.wait_for(needle)
    warns = watch.warn_lines()
    assert len(warns) == 1, warns
    assert needle in warns[0], warns
    assert "Traceback" not in text
    assert "#critical]" not in text and "#error]" not in text, text
    return warns[0]


# --------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------


def _post(env: Env, path: str, body: bytes, section: str = "enrollment") -> tuple[int, dict[str, object]]:
    headers = {"Content-Type": "application/json"}
    if section == "admin":
        headers["Authorization"] = f"Bearer {env.daemon.admin_token}"
    response, data = env.daemon.request("POST", path, body, headers, section=section)
    assert b"Traceback" not in data
    answer = json.loads(data)
    assert isinstance(answer, dict)
    return response.status, answer


def _agent_bodies(env: Env) -> list[tuple[str, str, bytes, str]]:
    """(path, field named, body, words of the reason)."""
    secret = env.daemon.enroll_secret
    host = '"hardware_uuid": "C0FFEE00-0000-0000-0000-000000000001"'
    return [
        (ENROLL, "enroll_secret", b'{"enroll_secret": "\\ud800", ' + host.encode() + b"}", "lone surrogate"),
        (ENROLL, "base", b'{"enroll_secret": "\xed\xa0\x80", ' + host.encode() + b"}", "not UTF-8"),
        (CONFIG, "orbit_node_key", b'{"orbit_node_key": "\\ud800"}', "lone surrogate"),
        (DEVICE_TOKEN, "orbit_node_key", b'{"orbit_node_key": "\\ud800"}', "lone surrogate"),
        (CONFIG, "base", b'{"orbit_node_key": "\xed\xa0\x80"}', "not UTF-8"),
        (
            ENROLL,
            "hostname",
            f'{{"enroll_secret": {json.dumps(secret)}, {host}, "hostname": "DESKTOP-\\ud800"}}'.encode(),
            "lone surrogate",
        ),
        (ENROLL, "base", b"[" * 10_000 + b"]" * 10_000, "nested deeper"),
    ]


AGENT_CASES = [
    "enroll_secret escaped",
    "enroll_secret raw ED A0 80",
    "config node key",
    "device_token node key",
    "config node key raw ED A0 80",
    "hostname with the right secret",
    "enroll 10,000 deep",
]


@pytest.mark.parametrize("case", range(len(AGENT_CASES)), ids=AGENT_CASES)
def test_hostile_json_to_the_agent_api_is_400(env: Env, case: int) -> None:
    path, field, body, words = _agent_bodies(env)[case]
    before = store_rows(env.daemon)
    watch = LogWatch(env.daemon)

    status, answer = _post(env, path, body)

    assert status == 400, answer
    message = answer["message"]
    assert isinstance(message, str) and message.startswith("request body is ") and words in message
    assert answer["errors"] == [{"name": field, "reason": message}]
    line = expect_one_warning(watch, f"enrollment POST {path} refused (400): ")
    assert words in line
    watch.wait_for(f"enrollment POST {path} 400 ")
    assert store_rows(env.daemon) == before


@pytest.mark.parametrize("depth", [1000, 100_000])
def test_deeply_nested_json_to_the_admin_api_is_400(env: Env, depth: int) -> None:
    path = f"/api/v1/devices/{env.device_id}/commands"
    before = store_rows(env.daemon)
    watch = LogWatch(env.daemon)

    status, answer = _post(env, path, b"[" * depth + b"]" * depth, "admin")

    assert status == 400, answer
    assert answer["message"] == "the request body is nested deeper than 32 levels"
    assert answer["errors"] == [{"name": "base", "reason": answer["message"]}]
    expect_one_warning(watch, f"admin POST {path} refused (400): the request body is nested deeper")
    watch.wait_for(f"admin POST {path} 400 ")
    assert store_rows(env.daemon) == before


def test_a_lone_surrogate_in_an_admin_command_is_400(env: Env) -> None:
    path = f"/api/v1/devices/{env.device_id}/commands"
    before = store_rows(env.daemon)
    watch = LogWatch(env.daemon)
    body = b'{"verb": "Get", "items": [{"target": "./DevDetail/\\udfff"}]}'

    status, answer = _post(env, path, body, "admin")

    assert status == 400, answer
    assert [e["name"] for e in answer["errors"]] == ["items[0].target"]  # type: ignore[attr-defined]
    expect_one_warning(watch, f"admin POST {path} refused (400): the request body is not Unicode text")
    assert store_rows(env.daemon) == before


# --------------------------------------------------------------------------
# Request heads over Twisted's limits
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    head: bytes
    body: bytes
    closed: bool  # the server closed the connection after its answer
    seconds: float


def exchange(env: Env, listener: str, request: bytes) -> Reply:
    """Send *request* on a fresh connection and read until the server closes,
    waiting at most PROMPT seconds in all."""
    daemon = env.daemon
    started = time.monotonic()
    raw = socket.create_connection(("127.0.0.1", daemon.port(listener)), timeout=PROMPT)
    with raw:
        conn: socket.socket = raw
        if listener == "enrollment":
            conn = daemon.server_context().wrap_socket(raw, server_hostname="localhost")
        elif listener == "management":
            conn = env.mtls.wrap_socket(raw, server_hostname="localhost")
        # The server may answer and close before all of it is sent.
        with contextlib.suppress(OSError):
            conn.sendall(request)
        data, closed = b"", False
        while time.monotonic() - started < PROMPT:
            conn.settimeout(max(0.01, PROMPT - (time.monotonic() - started)))
            try:
                chunk = conn.recv(65536)
            except TimeoutError:
                break
            except (ssl.SSLError, ConnectionResetError):
                closed = True
                break
            if not chunk:
                closed = True
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return Reply(head, body, closed, time.monotonic() - started)


def _start(path: str) -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n".encode()


LISTENERS = {"enrollment": DISCOVERY, "management": MANAGEMENT, "admin": "/api/v1/devices"}

HEADS = {
    # one header line over LineReceiver.MAX_LENGTH (16,384 bytes)
    "one header of 16,400 bytes": (
        lambda path: _start(path) + b"X-Long: " + b"a" * 16_400 + b"\r\n\r\n",
        431,
        "header line longer than 16384 bytes",
    ),
    # over HTTPChannel.maxHeaders (500)
    "501 header fields": (
        lambda path: _start(path) + b"".join(b"X-%d: 1\r\n" % n for n in range(501)) + b"\r\n",
        431,
        "more than 500 header fields",
    ),
    # over HTTPChannel.totalHeadersSize (16,384 bytes), every line short
    "17 header lines of 1,000 bytes": (
        lambda path: _start(path) + b"".join(b"X-%d: %s\r\n" % (n, b"a" * 1000) for n in range(17)) + b"\r\n",
        431,
        "request head larger than 16384 bytes",
    ),
    "a request line of 17,000 bytes": (
        lambda path: f"GET {path}?{'a' * 17_000} HTTP/1.1\r\n".encode(),
        414,
        "request line longer than 16384 bytes",
    ),
    "a header line without a colon": (
        lambda path: _start(path) + b"no colon here\r\n\r\n",
        400,
        "malformed request head",
    ),
    "a malformed chunked body": (
        lambda path: _start(path) + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",
        400,
        "malformed chunked body",
    ),
}


@pytest.mark.parametrize("listener", list(LISTENERS))
@pytest.mark.parametrize("case", list(HEADS))
def test_a_request_head_over_the_limits_is_refused_at_once(env: Env, listener: str, case: str) -> None:
    make, status, reason = HEADS[case]
    before = store_rows(env.daemon)
    watch = LogWatch(env.daemon)

    reply = exchange(env, listener, make(LISTENERS[listener]))

    assert reply.head.split(b"\r\n")[0].startswith(f"HTTP/1.1 {status} ".encode()), reply
    assert b"\r\nConnection: close" in reply.head
    answer = json.loads(reply.body)
    assert answer == {"message": reason, "errors": [{"name": "base", "reason": reason}]}
    assert reply.closed, f"the server kept the connection open for {reply.seconds:.1f}s"
    line = expect_one_warning(watch, f"refused ({status}): {reason}")
    assert f"[mdmd.web#warn] {listener} " in line
    assert store_rows(env.daemon) == before


@pytest.mark.parametrize("listener", ["enrollment", "admin"])
def test_an_oversize_body_is_413_and_the_connection_closed_at_once(env: Env, listener: str) -> None:
    # The 413 is written before the body is read; the connection must then
    # close, not wait for the idle timeout (TLS waited for the channel).
    watch = LogWatch(env.daemon)
    reply = exchange(env, listener, _start(LISTENERS[listener]) + b"Content-Length: 99999999\r\n\r\n")
    assert reply.head.startswith(b"HTTP/1.1 413 "), reply
    assert reply.closed, f"the server kept the connection open for {reply.seconds:.1f}s"
    expect_one_warning(watch, " 413: body of 99999999 bytes")
