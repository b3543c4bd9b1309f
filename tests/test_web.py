"""The twisted.web adapters in process: a real HTTP channel on a memory
transport and a memory clock, so that their own paths (a handler's bug, a
client that goes away, an oversize body, a wrong method or content type,
routing) are tested without sockets."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure

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
            [Route("/open", Echo(), public=True), Route("/secret", Echo())], guard=BearerTokenGuard("t" * 32)
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
