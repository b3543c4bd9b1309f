"""The twisted.web adapters in process: a real HTTP channel on a memory
transport and a memory clock, so that their own paths (a handler's bug, a
client that goes away, an oversize body, a wrong method or content type,
routing) are tested without sockets."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python.failure import Failure

from mdmd import metrics
from mdmd.logs import json_line
from mdmd.store import StoreUnavailable
from mdmd.web import (
    BearerTokenGuard,
    EndpointResource,
    HTTPResponse,
    MdmdRequest,
    MdmdSite,
    Route,
    RoutingResource,
    json_response,
)


class Echo(EndpointResource):
    async def handle_GET(self, request: MdmdRequest) -> HTTPResponse:
        return json_response(200, {"params": request.path_params})

    async def handle_POST(self, request: MdmdRequest) -> HTTPResponse:
        return json_response(201, {})


class Broken(EndpointResource):
    async def handle_GET(self, request: MdmdRequest) -> HTTPResponse:
        raise RuntimeError("secret internals")


class StoreDown(EndpointResource):
    async def handle_GET(self, request: MdmdRequest) -> HTTPResponse:
        raise StoreUnavailable("connection to server on socket ... failed: No such file or directory")


class Slow(EndpointResource):
    def __init__(self) -> None:
        super().__init__()
        self.pending: list[Deferred[None]] = []
        self.finished = 0

    async def handle_POST(self, request: MdmdRequest) -> HTTPResponse:
        d: Deferred[None] = Deferred()
        self.pending.append(d)
        await d
        self.finished += 1
        return json_response(200, {})


@pytest.fixture
def slow() -> Slow:
    return Slow()


@pytest.fixture
def site(slow: Slow) -> MdmdSite:
    routes = [
        Route("/echo/{name}/x", Echo()),
        Route("/broken", Broken()),
        Route("/store-down", StoreDown()),
        Route("/slow", slow),
        Route("/tree/*", Echo()),
    ]
    return MdmdSite(
        RoutingResource(routes), listener="test", max_body_bytes=1024, reactor=MemoryReactorClock()
    )


@pytest.fixture
def logs() -> Iterator[Sequence[dict[str, Any]]]:
    with capturedLogs() as events:
        yield events


def connect(site: MdmdSite) -> tuple[IProtocol, StringTransport]:
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
    assert channel is not None
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 50000))
    channel.makeConnection(transport)
    return channel, transport


def exchange(site: MdmdSite, raw: bytes) -> tuple[int, dict[bytes, bytes], bytes, StringTransport]:
    channel, transport = connect(site)
    channel.dataReceived(raw)
    return (*parse_response(transport.value()), transport)


def parse_response(data: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
    return status, headers, body


def warnings_and_errors(events: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["log_level"] in (LogLevel.warn, LogLevel.error, LogLevel.critical)]


def test_routing_passes_decoded_path_parameters(site: MdmdSite) -> None:
    status, _, body, _ = exchange(site, b"GET /echo/AB%2FCD/x/ HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200 and json.loads(body) == {"params": {"name": "AB/CD"}}
    status, _, body, _ = exchange(site, b"GET /tree/a/b?q=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200


@pytest.mark.parametrize("path", [b"/echo/%00/x", b"/echo//x", b"/echo/a", b"/nope", b"/echo/%FF/x"])
def test_paths_that_name_nothing_get_a_json_404(site: MdmdSite, path: bytes) -> None:
    status, headers, body, _ = exchange(site, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 404 and headers[b"content-type"] == b"application/json"
    assert json.loads(body)["message"].startswith("no such endpoint")


def test_a_handlers_bug_is_a_bare_500_and_one_log_entry(
    site: MdmdSite, logs: Sequence[dict[str, Any]]
) -> None:
    status, _, body, transport = exchange(site, b"GET /broken HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 500 and json.loads(body)["message"] == "internal server error"
    assert b"secret internals" not in transport.value() and b"Traceback" not in transport.value()
    (failure,) = [e for e in logs if "log_failure" in e]
    assert isinstance(failure["log_failure"], Failure) and failure["log_failure"].check(RuntimeError)
    assert len(warnings_and_errors(logs)) == 1


def test_a_store_that_cannot_be_reached_is_a_503_with_retry_after_and_one_line(
    site: MdmdSite, logs: Sequence[dict[str, Any]]
) -> None:
    status, headers, body, _ = exchange(site, b"GET /store-down HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 503 and headers[b"retry-after"] == b"60"
    assert json.loads(body)["message"] == "the store is unavailable; try again later"
    (line,) = warnings_and_errors(logs)
    assert "log_failure" not in line
    assert "store unavailable, answered 503" in line["log_format"] and "No such file" in line["error"]


def test_a_method_the_resource_does_not_serve_is_405_with_allow(site: MdmdSite) -> None:
    status, headers, body, _ = exchange(site, b"DELETE /echo/a/x HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 405 and headers[b"allow"] == b"GET, POST"
    assert json.loads(body)["message"] == "method DELETE not allowed"


def test_an_oversize_body_is_refused_before_it_is_read(
    site: MdmdSite, logs: Sequence[dict[str, Any]]
) -> None:
    status, headers, _, transport = exchange(
        site, b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 4096\r\n\r\n" + b"x" * 100
    )
    assert status == 413 and headers[b"connection"] == b"close"
    assert transport.disconnecting
    (warning,) = warnings_and_errors(logs)
    assert "413" in warning["log_format"] and warning["declared"] == 4096


def test_a_chunked_body_growing_past_the_limit_is_refused(site: MdmdSite, slow: Slow) -> None:
    channel, transport = connect(site)
    channel.dataReceived(b"POST /slow HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(3):
        channel.dataReceived(b"200\r\n" + b"x" * 0x200 + b"\r\n")
    status, _, _ = parse_response(transport.value())
    assert status == 413 and transport.disconnecting and slow.pending == []


def test_a_client_that_goes_away_mid_request_gets_nothing_written(
    site: MdmdSite, slow: Slow, logs: Sequence[dict[str, Any]]
) -> None:
    channel, transport = connect(site)
    channel.dataReceived(b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
    (pending,) = slow.pending
    channel.connectionLost(Failure(ConnectionError("client went away")))
    transport.clear()
    pending.callback(None)  # the handler finishes its work all the same
    assert slow.finished == 1
    assert transport.value() == b""
    assert warnings_and_errors(logs) == []


def test_the_guard_answers_for_every_route_and_every_unknown_path(logs: Sequence[dict[str, Any]]) -> None:
    site = MdmdSite(
        RoutingResource(
            [Route("/open", Echo(), public=True), Route("/secret", Echo())],
            guard=BearerTokenGuard(lambda: {hashlib.sha256(b"t" * 32).digest(): "tester"}),
        ),
        listener="admin",
        max_body_bytes=1024,
        reactor=MemoryReactorClock(),
    )
    status, _, _, _ = exchange(site, b"GET /open HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200
    for path in (b"/secret", b"/nope"):
        status, headers, _, _ = exchange(site, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 401 and headers[b"www-authenticate"] == b'Bearer realm="mdmd-admin"'
    ok = b"GET /secret HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + b"t" * 32 + b"\r\n\r\n"
    assert exchange(site, ok)[0] == 200
    assert exchange(site, ok.replace(b"/secret", b"/nope"))[0] == 404
    assert len(warnings_and_errors(logs)) == 2


class _PeerCertificate:
    def __init__(self, cert: Any) -> None:
        self._cert = cert

    def to_cryptography(self) -> Any:
        return self._cert


class _MutualTLSTransport(StringTransport):
    """What the management listener's TLS layer offers: the verified peer."""

    def __init__(self, cert: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._peer = _PeerCertificate(cert)

    def getPeerCertificate(self) -> _PeerCertificate:
        return self._peer


def test_management_refuses_a_body_that_is_not_syncml_with_415(logs: Sequence[dict[str, Any]]) -> None:
    from datetime import UTC, datetime

    from mdmd import pki
    from mdmd.management_endpoint import ManagementResource

    key = pki.generate_rsa_key()
    cert = pki.create_ca_certificate(key, "device", days=1, now=datetime.now(UTC))
    # The content type is checked before the store is asked anything.
    resource = ManagementResource(app=None)  # type: ignore[arg-type]
    site = MdmdSite(
        RoutingResource([Route("/api/mdm/microsoft/management", resource)]),
        listener="management",
        max_body_bytes=1024,
        reactor=MemoryReactorClock(),
    )
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
    assert channel is not None
    transport = _MutualTLSTransport(cert, peerAddress=IPv4Address("TCP", "127.0.0.1", 50000))
    channel.makeConnection(transport)
    channel.dataReceived(
        b"POST /api/mdm/microsoft/management?mode=Maintenance HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    )
    status, _, body = parse_response(transport.value())
    assert status == 415 and b"application/vnd.syncml.dm+xml" in body
    (warning,) = warnings_and_errors(logs)
    assert warning["status"] == 415


# --- request IDs, the request line, the metrics ---


def _request_line(logs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    (line,) = [e for e in logs if "request_id" in e and "status" in e]
    return line


def test_every_answer_and_its_log_line_carry_a_request_id_and_the_client(
    site: MdmdSite, logs: Sequence[dict[str, Any]]
) -> None:
    status, headers, _, _ = exchange(site, b"GET /echo/a/x HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200
    line = _request_line(logs)
    assert headers[b"x-request-id"].decode() == line["request_id"]
    assert len(line["request_id"]) == 16 and line["client"] == "127.0.0.1"
    text = formatEvent(line)
    assert f"client=127.0.0.1 request_id={line['request_id']}" in text
    assert text.startswith("test GET /echo/a/x 200 ")


@pytest.mark.parametrize(
    ("offered", "kept"),
    [(b"abc-123.X:y_z", True), (b"two words", False), (b"x" * 65, False), (b"", False)],
)
def test_a_sane_request_id_from_the_client_is_kept(
    site: MdmdSite, logs: Sequence[dict[str, Any]], offered: bytes, kept: bool
) -> None:
    raw = b"GET /echo/a/x HTTP/1.1\r\nHost: x\r\nX-Request-ID: " + offered + b"\r\n\r\n"
    _, headers, _, _ = exchange(site, raw)
    assert (headers[b"x-request-id"] == offered) is kept
    assert _request_line(logs)["request_id"] == headers[b"x-request-id"].decode()


def _requests(listener: str, endpoint: str, status: str) -> float:
    labels = {"listener": listener, "endpoint": endpoint, "status": status}
    return metrics.REGISTRY.get_sample_value("mdmd_http_requests_total", labels) or 0.0


def test_requests_are_counted_by_route_template_not_by_path(site: MdmdSite) -> None:
    before = _requests("test", "/echo/{name}/x", "200"), _requests("test", "unmatched", "404")
    seconds = metrics.REGISTRY.get_sample_value(
        "mdmd_http_request_duration_seconds_count", {"listener": "test", "endpoint": "/echo/{name}/x"}
    )
    for name in (b"a", b"b", b"c"):
        exchange(site, b"GET /echo/" + name + b"/x HTTP/1.1\r\nHost: x\r\n\r\n")
    exchange(site, b"GET /no/such/thing HTTP/1.1\r\nHost: x\r\n\r\n")
    assert _requests("test", "/echo/{name}/x", "200") == before[0] + 3
    assert _requests("test", "unmatched", "404") == before[1] + 1
    after = metrics.REGISTRY.get_sample_value(
        "mdmd_http_request_duration_seconds_count", {"listener": "test", "endpoint": "/echo/{name}/x"}
    )
    assert after == (seconds or 0.0) + 3


def _guarded(
    tokens: dict[bytes, str] | None, pending: Callable[[], Deferred[None] | None] | None = None
) -> MdmdSite:
    return MdmdSite(
        RoutingResource([Route("/secret", Echo())], guard=BearerTokenGuard(lambda: tokens, pending)),
        listener="admin",
        max_body_bytes=1024,
        reactor=MemoryReactorClock(),
    )


def test_the_guard_names_the_token_and_waits_for_the_tokens_to_load(logs: Sequence[dict[str, Any]]) -> None:
    request = b"GET /secret HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret-token-of-alice\r\n\r\n"
    assert exchange(_guarded(None), request)[0] == 503
    tokens = {hashlib.sha256(b"s3cret-token-of-alice").digest(): "alice"}
    assert exchange(_guarded(tokens), request)[0] == 200
    line = _request_line([e for e in logs if e.get("status") == 200])
    assert line["admin"] == "alice" and "admin=alice" in formatEvent(line)
    assert exchange(_guarded(tokens), request.replace(b"alice", b"mallory"))[0] == 401


def test_a_request_waits_for_the_tokens_to_load() -> None:
    loaded: dict[bytes, str] = {}
    tokens: list[dict[bytes, str]] = []
    waiting: list[Deferred[None]] = []

    def pending() -> Deferred[None] | None:
        if tokens:
            return None
        waiting.append(Deferred())
        return waiting[-1]

    site = MdmdSite(
        RoutingResource(
            [Route("/secret", Echo())], guard=BearerTokenGuard(lambda: tokens[0] if tokens else None, pending)
        ),
        listener="admin",
        max_body_bytes=1024,
        reactor=MemoryReactorClock(),
    )
    channel, transport = connect(site)
    channel.dataReceived(b"GET /secret HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t0ken-of-alice\r\n\r\n")
    assert transport.value() == b"" and len(waiting) == 1  # held, not refused
    loaded[hashlib.sha256(b"t0ken-of-alice").digest()] = "alice"
    tokens.append(loaded)
    waiting[0].callback(None)
    assert parse_response(transport.value())[0] == 200


def test_a_json_log_line_holds_the_request_lines_fields(
    site: MdmdSite, logs: Sequence[dict[str, Any]]
) -> None:
    exchange(site, b"GET /echo/a/x HTTP/1.1\r\nHost: x\r\n\r\n")
    line = _request_line(logs)
    obj = json.loads(json_line(line))
    assert obj["message"] == formatEvent(line) and obj["level"] == "info" and obj["namespace"] == "mdmd.web"
    assert obj["client"] == "127.0.0.1" and obj["request_id"] == line["request_id"]
    assert obj["status"] == 200 and obj["listener"] == "test" and obj["path"] == "/echo/a/x"
    assert isinstance(obj["duration_ms"], float) and obj["time"].endswith("Z")
    assert json_line(line, worker=2).endswith("\n") and json.loads(json_line(line, worker=2))["worker"] == 2


def test_a_json_log_line_of_a_failure_keeps_the_traceback_on_one_line(
    site: MdmdSite, logs: Sequence[dict[str, Any]]
) -> None:
    exchange(site, b"GET /broken HTTP/1.1\r\nHost: x\r\n\r\n")
    (failure,) = [e for e in logs if "log_failure" in e]
    text = json_line(failure)
    assert text.count("\n") == 1
    assert "RuntimeError: secret internals" in json.loads(text)["traceback"]


def test_an_http_1_0_client_that_asks_for_keep_alive_keeps_its_connection(site: MdmdSite) -> None:
    # ab -k speaks HTTP/1.0 with "Connection: Keep-Alive"; Twisted alone
    # closes every HTTP/1.0 connection after one answer.
    channel, transport = connect(site)
    ask = b"GET /echo/a/x HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"
    channel.dataReceived(ask)
    status, headers, body = parse_response(transport.value())
    assert (status, headers[b"connection"].lower()) == (200, b"keep-alive")
    assert int(headers[b"content-length"]) == len(body)
    assert not transport.disconnecting
    transport.clear()
    channel.dataReceived(ask.replace(b"/echo/a/x", b"/echo/b/x"))
    status, _, body = parse_response(transport.value())
    assert status == 200 and b'"b"' in body


def test_an_http_1_0_client_that_does_not_ask_is_answered_and_closed(site: MdmdSite) -> None:
    status, headers, _, transport = exchange(site, b"GET /echo/a/x HTTP/1.0\r\n\r\n")
    assert status == 200 and b"connection" not in headers
    assert transport.disconnecting
