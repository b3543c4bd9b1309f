"""mdmd.web in process: the HTTP channel's refusals of a request head, on a
string transport (tests/test_hostile_input.py does the same over real TLS)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import cast

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher

from mdmd.web import (
    EndpointResource,
    HTTPResponse,
    MdmdChannel,
    MdmdRequest,
    MdmdSite,
    Route,
    RoutingResource,
)


class _Hello(EndpointResource):
    async def handle_GET(self, request: MdmdRequest) -> HTTPResponse:
        return HTTPResponse(200, b"{}")


@pytest.fixture
def logged() -> Iterator[list[LogEvent]]:
    events: list[LogEvent] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)


def connect() -> tuple[MdmdChannel, StringTransport]:
    site = MdmdSite(RoutingResource([Route("/hello", _Hello())]), listener="test", max_body_bytes=4096)
    channel = cast(MdmdChannel, site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000)))
    assert isinstance(channel, MdmdChannel)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))
    channel.makeConnection(transport)
    # The channel registers itself as the transport's producer; a TLS
    # transport does not close while a producer is registered.
    assert transport.producer is channel
    return channel, transport


def warnings(events: list[LogEvent]) -> list[str]:
    return [formatEvent(e) for e in events if e.get("log_namespace") == "mdmd.web"]


@pytest.mark.parametrize(
    ("data", "status", "reason"),
    [
        (b"GET /hello HTTP/1.1\r\nX-Long: " + b"a" * 16_400, 431, "header line longer than 16384 bytes"),
        (b"GET /hello?" + b"a" * 16_400, 414, "request line longer than 16384 bytes"),
        (
            b"GET /hello HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % n for n in range(501)),
            431,
            "more than 500 header fields",
        ),
        (
            b"GET /hello HTTP/1.1\r\n" + b"".join(b"X-%d: %s\r\n" % (n, b"a" * 1000) for n in range(17)),
            431,
            "request head larger than 16384 bytes",
        ),
        (b"GET /hello HTTP/1.1\r\nno colon\r\n\r\n", 400, "malformed request head"),
        (b"BAD\r\n\r\n", 400, "malformed request head"),
        (
            b"POST /hello HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            400,
            "malformed chunked body",
        ),
    ],
    ids=[
        "long header line",
        "long request line",
        "501 fields",
        "17 KB head",
        "no colon",
        "bad request line",
        "chunk",
    ],
)
def test_a_refused_head_is_answered_logged_once_and_closed(
    logged: list[LogEvent], data: bytes, status: int, reason: str
) -> None:
    channel, transport = connect()
    channel.dataReceived(data)
    channel.dataReceived(data)  # more of the same after the refusal is not read

    head, _, body = transport.value().partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode())
    assert b"\r\nConnection: close\r\n" in head + b"\r\n"
    assert f"\r\nContent-Length: {len(body)}".encode() in head
    assert json.loads(body) == {"message": reason, "errors": [{"name": "base", "reason": reason}]}
    assert transport.disconnecting
    assert transport.producer is None  # unregistered, so TLS can close too
    (line,) = warnings(logged)
    assert "test " in line and f"refused ({status}): {reason} (peer 192.0.2.7)" in line


def test_a_good_request_is_still_served(logged: list[LogEvent]) -> None:
    channel, transport = connect()
    channel.dataReceived(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 200 OK\r\n")
    assert not transport.disconnecting
    assert not [line for line in warnings(logged) if "refused" in line]


def test_an_oversize_body_unregisters_the_channel_before_closing(logged: list[LogEvent]) -> None:
    channel, transport = connect()
    channel.dataReceived(b"POST /hello HTTP/1.1\r\nContent-Length: 5000\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 413 ")
    assert transport.disconnecting
    assert transport.producer is None
