"""mdmd-sim's HTTP(S) client (mdmd.sim.transport) against real loopback
servers: a twisted.web Site (plain and TLS, with mdmd's own certificate
helpers), and a raw server that answers with exactly the bytes a test needs.

Trial test cases (pytest runs them): each test runs on the real reactor
and ends with every connection closed, or trial reports a dirty reactor.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from functools import cache
from typing import Any, cast

from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer, error, task
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IProtocolFactory,
    IReactorTCP,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from harness import refused_port
from mdmd import pki
from mdmd.sim import transport
from mdmd.sim.cli import classify
from mdmd.sim.transport import (
    BadResponse,
    HTTPReply,
    HTTPSClient,
    HTTPStatusError,
    SimTLSPolicy,
    trust_root,
)
from mdmd.tls import mutual_tls_options, peer_certificate, server_tls_options, tls_server_factory

tcp = cast(IReactorTCP, _reactor)
clock = cast(IReactorTime, _reactor)

# --------------------------------------------------------------------------
# Servers
# --------------------------------------------------------------------------


class Tracked(WrappingFactory):
    """A server factory that counts its connections and tells when all of
    them are closed."""

    noisy = False

    def __init__(self, wrapped: IProtocolFactory) -> None:
        super().__init__(wrapped)
        self.connections = 0
        self._waiting: list[Deferred[None]] = []

    def registerProtocol(self, p: ProtocolWrapper) -> None:
        super().registerProtocol(p)
        self.connections += 1

    def unregisterProtocol(self, p: ProtocolWrapper) -> None:
        super().unregisterProtocol(p)
        if not self.protocols:
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.callback(None)

    def all_closed(self) -> Deferred[None]:
        if not self.protocols:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        return d


class Echo(Resource):
    """What the request looked like, as JSON; ``/status/N`` answers N."""

    isLeaf = True

    def render(self, request: Request) -> bytes | int:
        status = re.fullmatch(rb"/status/(\d+)", request.path)
        if status:
            request.setResponseCode(int(status.group(1)))
        if request.path == b"/chunked":
            # No length given: twisted.web sends it chunked.
            request.setHeader(b"content-type", b"text/plain")
            request.write(b"first ")
            request.write(b"second")
            request.finish()
            return NOT_DONE_YET
        cert = peer_certificate(request)
        address = request.getClientAddress()
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(
            {
                "method": request.method.decode(),
                "uri": request.uri.decode(),
                "body": request.content.read().decode() if request.content else "",
                "content_length": request.getHeader("content-length"),
                "connection": request.getHeader("connection"),
                "host": request.getHeader("host"),
                "x_test": request.getHeader("x-test"),
                "client_port": getattr(address, "port", None),
                "client_cn": (
                    cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value if cert else None
                ),
            }
        ).encode()


Answer = Callable[["Raw", bytes], None]


class Raw(Protocol):
    """Reads whole requests (the client always sends a Content-Length) and
    hands each to the test's *answer*."""

    def __init__(self, server: RawFactory) -> None:
        self.server = server
        self.buffer = b""

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = self.buffer[:end]
            found = re.search(rb"(?im)^content-length: *(\d+)\r?$", head)
            assert found, head
            total = end + 4 + int(found.group(1))
            if len(self.buffer) < total:
                return
            request, self.buffer = self.buffer[:total], self.buffer[total:]
            self.server.received(self, request)

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def close(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()


class RawFactory(Factory):
    noisy = False

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.requests: list[bytes] = []
        self._waiting: list[Deferred[bytes]] = []

    def buildProtocol(self, addr: IAddress | None) -> Raw:
        return Raw(self)

    def received(self, proto: Raw, request: bytes) -> None:
        self.requests.append(request)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(request)
        self.answer(proto, request)

    def next_request(self) -> Deferred[bytes]:
        d: Deferred[bytes] = Deferred()
        self._waiting.append(d)
        return d


def response(body: bytes, *headers: bytes, status: bytes = b"200 OK") -> bytes:
    return b"HTTP/1.1 " + status + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body


def with_length(body: bytes, *headers: bytes) -> bytes:
    return response(body, b"Content-Length: %d" % len(body), b"Content-Type: text/plain", *headers)


# --------------------------------------------------------------------------
# Certificates, with mdmd's own PKI helpers (made once: RSA keys are slow)
# --------------------------------------------------------------------------


class PKI:
    def __init__(self) -> None:
        now = datetime.now(UTC)
        self.root_key = pki.generate_rsa_key()
        self.root = pki.create_ca_certificate(self.root_key, "sim transport test root", days=1, now=now)
        self.server_key = pki.generate_rsa_key()
        self.server = pki.create_server_certificate(
            self.root, self.root_key, self.server_key, ["localhost"], days=1, now=now
        )
        self.device_key = pki.generate_rsa_key()
        self.device = pki.issue_device_certificate(
            self.root, self.root_key, self.device_key.public_key(), "DEVICE-1", days=1, now=now
        )
        # A CA that signed nothing here: trusting only it fails the handshake.
        self.stranger = pki.create_ca_certificate(self.device_key, "a stranger", days=1, now=now)


@cache
def certificates() -> PKI:
    return PKI()


def policy(trusted: x509.Certificate | None = None, **kw: Any) -> SimTLSPolicy:
    return SimTLSPolicy(trust_root([trusted or certificates().root]), **kw)


@implementer(IReactorTime, IReactorTCP)
class ClockedReactor:
    """The real reactor's TCP with a clock the test moves."""

    def __init__(self, clock: task.Clock) -> None:
        self.clock = clock

    def callLater(
        self, delay: float, callable: Callable[..., Any], *args: object, **kwargs: object
    ) -> IDelayedCall:
        return self.clock.callLater(delay, callable, *args, **kwargs)

    def seconds(self) -> float:
        return self.clock.seconds()

    def getDelayedCalls(self) -> Sequence[IDelayedCall]:
        return self.clock.getDelayedCalls()

    def connectTCP(self, *a: Any, **kw: Any) -> Any:
        return tcp.connectTCP(*a, **kw)

    def listenTCP(self, *a: Any, **kw: Any) -> Any:
        return tcp.listenTCP(*a, **kw)


class StalledConnects(MemoryReactorClock):
    """Connection attempts that never complete; stopping one reports its
    failure at once, as Twisted's own connectors do."""

    def connectTCP(
        self, host: str, port: int, factory: Any, timeout: float = 30, bindAddress: Any = None
    ) -> Any:
        connector = super().connectTCP(host, port, factory, timeout, bindAddress)

        def stop() -> None:
            connector.stoppedConnecting = True
            factory.clientConnectionFailed(connector, Failure(error.UserError()))

        connector.stopConnecting = stop
        return connector


# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------


class TransportTests(unittest.TestCase):
    timeout = 30

    def serve(self, factory: IProtocolFactory, tls: CertificateOptions | None = None) -> tuple[Tracked, int]:
        tracked = Tracked(tls_server_factory(tls, factory) if tls is not None else factory)
        port = tcp.listenTCP(0, tracked, interface="127.0.0.1")  # type: ignore[arg-type]
        # Cleanups run last in, first out: clients close, then the server's
        # side of every connection is gone, then the port.
        self.addCleanup(port.stopListening)
        self.addCleanup(tracked.all_closed)
        return tracked, port.getHost().port  # type: ignore[attr-defined]

    def site(self, tls: CertificateOptions | None = None) -> tuple[Tracked, str]:
        site = Site(Echo())
        site.noisy = False
        tracked, port = self.serve(site, tls)
        return tracked, f"{'https://localhost' if tls else 'http://127.0.0.1'}:{port}"

    def raw(self, answer: Answer) -> tuple[Tracked, RawFactory, str]:
        factory = RawFactory(answer)
        tracked, port = self.serve(factory)
        return tracked, factory, f"http://127.0.0.1:{port}"

    def client(self, *, persistent: bool = True, tls: SimTLSPolicy | None = None, **kw: Any) -> HTTPSClient:
        client = HTTPSClient(kw.pop("reactor", clock), tls or policy(), persistent=persistent, **kw)
        self.addCleanup(client.close)
        return client

    # -- bodies --

    async def test_content_length_body_and_what_the_request_carries(self) -> None:
        _, base = self.site()
        client = self.client()
        reply = await client.post(base + "/post?a=1", b'{"x": 1}', "application/json")
        seen = reply.json()
        assert reply.status == 200 and reply.content_type == "application/json"
        assert seen["method"] == "POST" and seen["uri"] == "/post?a=1" and seen["body"] == '{"x": 1}'
        assert seen["content_length"] == "8" and seen["host"] == base.removeprefix("http://")
        # Always a Content-Length, 0 without a body; given headers as given.
        reply = await client.request("GET", base + "/get", headers={"X-Test": "yes"})
        seen = reply.json()
        assert seen["method"] == "GET" and seen["content_length"] == "0" and seen["x_test"] == "yes"

    async def test_chunked_body(self) -> None:
        chunked = response(
            b"5;ext=1\r\nhello\r\n1\r\n \r\nA\r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\n",
            b"Transfer-Encoding: chunked",
            b"Content-Type: text/plain",
        )
        tracked, factory, base = self.raw(lambda proto, _: proto.write(chunked))
        client = self.client()
        reply = await client.request("GET", base + "/")
        assert reply == HTTPReply(200, b"hello 0123456789", "text/plain")
        # The whole response was read: the connection carries the next one.
        reply = await client.request("GET", base + "/")
        assert reply.body == b"hello 0123456789"
        assert tracked.connections == 1 and len(factory.requests) == 2

    async def test_twisted_web_chunked_body(self) -> None:
        _, base = self.site()
        reply = await self.client().request("GET", base + "/chunked")
        assert reply == HTTPReply(200, b"first second", "text/plain")

    async def test_close_delimited_body(self) -> None:
        def answer(proto: Raw, _: bytes) -> None:
            proto.write(response(b"until ", b"Content-Type: text/plain"))
            proto.write(b"the end")
            proto.close()

        tracked, _, base = self.raw(answer)
        client = self.client()
        assert (await client.request("GET", base + "/")).body == b"until the end"
        assert (await client.request("GET", base + "/")).body == b"until the end"
        assert tracked.connections == 2

    async def test_no_body_for_head_204_and_304_and_interim_responses_are_skipped(self) -> None:
        scripted = [
            # HEAD: a Content-Length, but no body follows.
            response(b"", b"Content-Length: 5"),
            response(b"", b"Content-Length: 5", status=b"204 No Content"),
            response(b"", b"Content-Length: 5", status=b"304 Not Modified"),
            b"HTTP/1.1 100 Continue\r\n\r\n" + with_length(b"final"),
        ]
        tracked, _, base = self.raw(lambda proto, _: proto.write(scripted.pop(0)))
        client = self.client()
        assert (await client.request("HEAD", base + "/")).body == b""
        assert (await client.request("GET", base + "/", expect=(204,))).status == 204
        assert (await client.request("GET", base + "/", expect=(304,))).body == b""
        reply = await client.request("GET", base + "/")
        assert (reply.status, reply.body) == (200, b"final")
        assert tracked.connections == 1

    async def test_a_response_split_across_many_small_writes(self) -> None:
        body = b"x" * 300
        whole = response(
            b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body),
            b"Transfer-Encoding: chunked",
            b"Content-Type: text/plain",
        )

        def answer(proto: Raw, _: bytes) -> None:
            # One byte per reactor turn, without Nagle: many small segments.
            def write(rest: bytes) -> None:
                if rest and proto.transport is not None and proto.transport.connected:  # type: ignore[attr-defined]
                    proto.write(rest[:1])
                    clock.callLater(0, write, rest[1:])

            write(whole)

        _, _, base = self.raw(answer)
        reply = await self.client().request("GET", base + "/")
        assert reply == HTTPReply(200, body, "text/plain")

    async def test_a_malformed_response_is_an_error(self) -> None:
        _, _, base = self.raw(lambda proto, _: proto.write(b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n"))
        with self.assertRaises(BadResponse):
            await self.client().request("GET", base + "/")

    # -- connections --

    async def test_a_persistent_client_reuses_its_connection(self) -> None:
        tracked, base = self.site(server_tls_options([certificates().server], certificates().server_key))
        client = self.client()
        first = (await client.request("GET", base + "/")).json()
        second = (await client.request("GET", base + "/")).json()
        assert first["client_port"] == second["client_port"]
        assert first["connection"] is None and tracked.connections == 1
        assert first["host"] == base.removeprefix("https://")

    async def test_a_client_that_is_not_persistent_opens_a_connection_per_request(self) -> None:
        tracked, base = self.site(server_tls_options([certificates().server], certificates().server_key))
        client = self.client(persistent=False)
        first = (await client.request("GET", base + "/")).json()
        second = (await client.request("GET", base + "/")).json()
        assert first["client_port"] != second["client_port"]
        assert first["connection"] == "close" and tracked.connections == 2

    async def test_connection_close_from_the_server_is_honoured(self) -> None:
        # The server says close but leaves the connection open: the client
        # closes it and opens another for its next request.
        tracked, factory, base = self.raw(
            lambda proto, _: proto.write(with_length(b"bye", b"Connection: close"))
        )
        client = self.client()
        assert (await client.request("GET", base + "/")).body == b"bye"
        assert (await client.request("GET", base + "/")).body == b"bye"
        assert tracked.connections == 2 and len(factory.requests) == 2

    async def test_an_idle_connection_the_server_closed_is_not_reused(self) -> None:
        def answer(proto: Raw, _: bytes) -> None:
            proto.write(with_length(b"ok"))
            proto.close()

        tracked, _, base = self.raw(answer)
        client = self.client()
        assert (await client.request("GET", base + "/")).body == b"ok"
        await tracked.all_closed()
        # The client notices the close on its own, a few reactor turns later
        # (bounded: no sleeping).
        for _ in range(100):
            if client._idle is None:
                break
            await task.deferLater(clock, 0)
        assert client._idle is None
        assert (await client.request("GET", base + "/")).body == b"ok"
        assert tracked.connections == 2

    async def test_a_reused_connection_lost_before_the_response_is_an_error_not_a_retry(self) -> None:
        answers = [lambda proto: proto.write(with_length(b"ok")), lambda proto: proto.close()]
        tracked, factory, base = self.raw(lambda proto, _: answers.pop(0)(proto))
        client = self.client()
        assert (await client.request("GET", base + "/")).body == b"ok"
        with self.assertRaises(ResponseNeverReceived) as caught:
            await client.post(base + "/", b"once", "text/plain")
        assert classify(caught.exception) == "connection lost"
        assert tracked.connections == 1 and len(factory.requests) == 2

    async def test_a_response_cut_short_is_an_error(self) -> None:
        def answer(proto: Raw, _: bytes) -> None:
            proto.write(response(b"only part", b"Content-Length: 100"))
            proto.close()

        _, _, base = self.raw(answer)
        with self.assertRaises(ResponseFailed) as caught:
            await self.client().request("GET", base + "/")
        assert not isinstance(caught.exception, ResponseNeverReceived)
        assert classify(caught.exception) == "connection lost"

    async def test_the_timeout_bounds_the_request_and_aborts_its_connection(self) -> None:
        fake = task.Clock()
        tracked, factory, base = self.raw(lambda proto, _: None)  # never answers
        client = self.client(reactor=ClockedReactor(fake), timeout=7.0)
        sent = factory.next_request()
        reply = Deferred.fromCoroutine(client.request("GET", base + "/"))
        await sent
        fake.advance(6.9)
        assert not reply.called
        fake.advance(0.1)
        with self.assertRaises(defer.TimeoutError) as caught:
            await reply
        assert classify(caught.exception) == "timeout"
        # Aborted: the server sees the connection go.
        await tracked.all_closed()
        assert fake.getDelayedCalls() == []

    async def test_the_next_address_of_a_host_is_tried_and_remembered(self) -> None:
        # Like "localhost" as ::1 then 127.0.0.1 with a server on 127.0.0.1
        # only; 127.0.0.2 is loopback too, and nothing listens there.
        self.patch(transport, "_addresses", {"sim-test.invalid": ("127.0.0.2", "127.0.0.1")})
        tracked, _, base = self.raw(lambda proto, _: proto.write(with_length(b"ok")))
        url = base.replace("127.0.0.1", "sim-test.invalid") + "/"
        reply = await self.client(persistent=False).request("GET", url)
        assert reply.body == b"ok" and tracked.connections == 1
        assert transport._addresses["sim-test.invalid"] == ("127.0.0.1", "127.0.0.2")

    def test_the_timeout_bounds_the_connection_attempt(self) -> None:
        stalled = StalledConnects()
        self.patch(transport, "_addresses", {"sim-test.invalid": ("127.0.0.2", "127.0.0.1")})
        client = HTTPSClient(stalled, policy(), timeout=5.0)
        reply = Deferred.fromCoroutine(client.request("GET", "https://sim-test.invalid:8443/"))
        assert [c[:2] for c in stalled.tcpClients] == [("127.0.0.2", 8443)]
        stalled.advance(5.0)
        self.failureResultOf(reply, defer.TimeoutError)
        # Given up, not moved on to the next address.
        assert stalled.connectors[0].stoppedConnecting and len(stalled.tcpClients) == 1
        assert stalled.getDelayedCalls() == []

    async def test_connection_refused(self) -> None:
        with refused_port() as port, self.assertRaises(error.ConnectionRefusedError) as caught:
            await self.client().request("GET", f"http://127.0.0.1:{port}/")
        assert classify(caught.exception) == "connection refused"

    async def test_an_unexpected_status_raises_http_status_error(self) -> None:
        _, base = self.site()
        client = self.client()
        with self.assertRaises(HTTPStatusError) as caught:
            await client.post(base + "/status/503", b"x", "text/plain")
        assert caught.exception.status == 503 and classify(caught.exception) == "http 503"
        assert caught.exception.reply.json()["body"] == "x"
        assert (await client.request("GET", base + "/status/404", expect=(200, 404))).status == 404
        assert (await client.request("GET", base + "/status/500", expect=None)).status == 500

    # -- TLS --

    async def test_tls_with_a_client_certificate(self) -> None:
        c = certificates()
        _, base = self.site(mutual_tls_options([c.server], c.server_key, [c.root]))
        client = self.client(tls=policy(client_certificate=c.device, client_key=c.device_key))
        reply = await client.post(base + "/management", b"<SyncML/>", "application/vnd.syncml.dm+xml")
        assert reply.json()["client_cn"] == "DEVICE-1"

    async def test_a_server_certificate_from_another_root_fails_the_handshake(self) -> None:
        c = certificates()
        _, base = self.site(server_tls_options([c.server], c.server_key))
        with self.assertRaises(SSL.Error) as caught:
            await self.client(tls=policy(c.stranger)).request("GET", base + "/")
        assert classify(caught.exception) == "tls"

    async def test_the_server_certificate_must_name_the_host(self) -> None:
        c = certificates()
        _, base = self.site(server_tls_options([c.server], c.server_key))
        # The certificate names localhost only.
        with self.assertRaises(VerificationError):
            await self.client().request("GET", base.replace("localhost", "127.0.0.1") + "/")
