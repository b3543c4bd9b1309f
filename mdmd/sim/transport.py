"""mdmd-sim's wire: a small HTTP/1.1 client on Twisted that moves the bytes
:mod:`mdmd.sim.device` builds and reads.

- Server authentication against a given trust root (mdmd's development root
  ``tls-root.pem``, or any CA file), with host name verification.
- An optional client certificate per device (cryptography objects, never
  pyOpenSSL's deprecated ones) for the management listener's mutual TLS.
- One :class:`HTTPSClient` per device: a device never shares a connection
  (nor a TLS identity) with another device.  A persistent client keeps one
  idle connection and reuses it for its next request unless the server
  closed it or said ``Connection: close``; a request on a reused connection
  that the server drops before answering is an error, not retried.
- Every request carries a Content-Length (MS-MDE2 servers and Windows' own
  stack expect it), never chunked, and goes out in one write.
- Host names are resolved once per process.

It is not ``twisted.web.client.Agent`` on purpose: the simulator has to be
cheaper than the server it loads, and Agent's connection pool, host name
endpoint (a thread-pool name lookup per connection) and response machinery
cost more CPU per check-in than mdmd itself.

Errors: a connection that cannot be made raises Twisted's own
(``ConnectionRefusedError``...), a TLS failure the ``OpenSSL.SSL.Error`` (or
the host name ``VerificationError``), a request that takes longer than the
client's timeout ``twisted.internet.defer.TimeoutError``, a connection lost
before the whole response ``ResponseNeverReceived`` (no byte of it) or
``ResponseFailed`` (part of it), and a response that is not HTTP
:class:`BadResponse`.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from OpenSSL import SSL
from OpenSSL.crypto import X509
from service_identity import VerificationError
from twisted.internet import defer, error
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IAddress,
    IConnector,
    IDelayedCall,
    IOpenSSLClientConnectionCreator,
    IReactorTCP,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.internet.ssl import (
    Certificate,
    TLSVersion,
    optionsForClientTLS,
    trustRootFromCertificates,
)
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

if TYPE_CHECKING:
    # Twisted exports the interface only from its private module.
    from twisted.internet._sslverify import IOpenSSLTrustRoot

__all__ = [
    "BadResponse",
    "HTTPReply",
    "HTTPSClient",
    "HTTPStatusError",
    "SimTLSPolicy",
    "load_trust_root",
    "trust_root",
]


def trust_root(certificates: Sequence[x509.Certificate]) -> IOpenSSLTrustRoot:
    """A trust root holding exactly *certificates*."""
    root: IOpenSSLTrustRoot = trustRootFromCertificates(
        [Certificate(X509.from_cryptography(c)) for c in certificates]
    )
    return root


def load_trust_root(path: str) -> IOpenSSLTrustRoot:
    """The certificates of a PEM file (e.g. mdmd's ``tls-root.pem``) as a trust root."""
    with open(path, "rb") as f:
        certificates = x509.load_pem_x509_certificates(f.read())
    if not certificates:
        raise ValueError(f"{path}: no PEM certificate")
    return trust_root(certificates)


@implementer(IPolicyForHTTPS)
class SimTLSPolicy:
    """Like Twisted's ``BrowserLikePolicyForHTTPS``, with a given trust root
    and, optionally, a client certificate.

    The connection creator (and with it the OpenSSL context) is built once
    per host name and reused for every connection: building a context for
    every request, as ``BrowserLikePolicyForHTTPS`` does, costs more than
    the request.  No TLS session cache is kept, so every new connection is a
    full handshake, as for a device that polls minutes apart.
    """

    def __init__(
        self,
        trust: IOpenSSLTrustRoot,
        *,
        client_certificate: x509.Certificate | None = None,
        client_key: PrivateKeyTypes | None = None,
    ) -> None:
        if (client_certificate is None) != (client_key is None):
            raise ValueError("a client certificate needs its key, and the other way round")
        self._trust = trust
        self._certificate = client_certificate
        self._key = client_key
        self._creators: dict[str, IOpenSSLClientConnectionCreator] = {}

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        name = hostname.decode("ascii")
        creator = self._creators.get(name)
        if creator is None:
            extra: dict[str, Any] = {"raiseMinimumTo": TLSVersion.TLSv1_2}
            if self._certificate is not None:
                # cryptography objects: pyOpenSSL 26 deprecates its own
                # (PrivateCertificate would hand those over).
                extra.update(privateKey=self._key, certificate=self._certificate)
            creator = optionsForClientTLS(name, trustRoot=self._trust, extraCertificateOptions=extra)
            self._creators[name] = creator
        return creator


@dataclass(frozen=True, slots=True)
class HTTPReply:
    status: int
    body: bytes
    content_type: str

    def json(self) -> Any:
        return json.loads(self.body)


class HTTPStatusError(Exception):
    """The server answered with an HTTP status the device did not expect."""

    def __init__(self, method: str, url: str, reply: HTTPReply) -> None:
        self.method = method
        self.url = url
        self.reply = reply
        super().__init__(f"{method} {url}: HTTP {reply.status}")

    @property
    def status(self) -> int:
        return self.reply.status


class BadResponse(Exception):
    """The server's answer is not an HTTP/1.x response this client can read."""


# --------------------------------------------------------------------------
# Addresses and URLs
# --------------------------------------------------------------------------

# Host name -> its addresses, the last one that accepted a connection first.
# A device's host names do not move during a run, and a lookup per
# connection (Agent's, in the reactor's thread pool) costs more than the
# rest of the connection set-up.
_addresses: dict[str, tuple[str, ...]] = {}


def _addresses_of(host: str) -> tuple[str, ...]:
    found = _addresses.get(host)
    if found is None:
        if isIPAddress(host) or isIPv6Address(host):
            found = (host,)
        else:
            try:
                infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
            except OSError as e:
                raise error.DNSLookupError(f"{host}: {e}") from e
            found = tuple(dict.fromkeys(str(info[4][0]) for info in infos))
            if not found:
                raise error.DNSLookupError(f"{host}: no address")
        _addresses[host] = found
    return found


def _prefer(host: str, address: str) -> None:
    # "localhost" is often ::1 first while the server listens on 127.0.0.1
    # only: remember which one answered instead of being refused every time.
    found = _addresses.get(host)
    if found is not None and found[0] != address:
        _addresses[host] = (address, *(a for a in found if a != address))


# (https?, host, port): the connections a request may reuse.
_Origin = tuple[bool, str, int]

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")


@lru_cache(maxsize=256)
def _split_url(url: str) -> tuple[_Origin, str]:
    """The origin of *url* and the first lines of a request to it, up to
    and including the Host header (after the method)."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    tls = parts.scheme == "https"
    host = parts.hostname
    port = parts.port or (443 if tls else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if not target.isascii() or " " in target or _UNSAFE.search(target):
        raise ValueError(f"not a valid request target: {url!r}")
    name = f"[{host}]" if ":" in host else host
    authority = name if port == (443 if tls else 80) else f"{name}:{port}"
    return (tls, host, port), f" {target} HTTP/1.1\r\nHost: {authority}\r\n"


# --------------------------------------------------------------------------
# The connection
# --------------------------------------------------------------------------

_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILER, _UNTIL_CLOSE = range(7)
_MAX_HEAD = 64 * 1024
_MAX_LINE = 4096
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
_DIGITS = re.compile(rb"[0-9]{1,18}")


class _TLSFactory(TLSMemoryBIOFactory):
    # The plain TLS protocol, not the default BufferingTLSTransport: a
    # request is one write already, and the aggregation of small writes
    # would only add a reactor call per write.
    protocol = TLSMemoryBIOProtocol


class _ConnectionFactory(ClientFactory):
    noisy = False

    def __init__(self, connection: _Connection) -> None:
        self.connection = connection

    def buildProtocol(self, addr: IAddress | None) -> _Connection:
        return self.connection

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        self.connection.connect_failed(reason)


class _Connection(Protocol):
    """One connection of an :class:`HTTPSClient`, inside TLS for https: one
    request at a time, its response parsed as the bytes arrive."""

    def __init__(self, client: HTTPSClient, origin: _Origin) -> None:
        self.client = client
        self.origin = origin
        self.idle = False
        self.lost = False
        self._wire: ITCPTransport | None = None
        self._connector: IConnector | None = None
        self._candidates: tuple[str, ...] = ()
        self._tried = 0
        self._unsent: bytes | None = None
        self._closed: list[Deferred[None]] = []
        self._close_timer: IDelayedCall | None = None
        # The request in flight:
        self._pending: Deferred[HTTPReply] | None = None
        self._timer: IDelayedCall | None = None
        self._what = ""
        self._head_only = False
        self._answered = False
        # Its response:
        self._buffer = bytearray()
        self._state = _HEAD
        self._status = 0
        self._content_type = b""
        self._reusable = False
        self._remaining = 0
        self._body: list[bytes] = []

    # -- one request --

    def send(self, data: bytes, what: str, head_only: bool) -> Deferred[HTTPReply]:
        d: Deferred[HTTPReply] = Deferred(self._cancel)
        self._pending = d
        self._what = what
        self._head_only = head_only
        self._answered = False
        self._state = _HEAD
        self._body = []
        client = self.client
        self._timer = client._clock.callLater(client._timeout, self._timed_out)
        if self._wire is not None:
            self.idle = False
            self._wire.write(data)
        else:
            self._unsent = data
            self._candidates = _addresses_of(self.origin[1])
            self._connect()
        return d

    def _connect(self) -> None:
        client = self.client
        tls, host, port = self.origin
        factory: ClientFactory[Any] = _ConnectionFactory(self)
        if tls:
            creator = client._policy.creatorForNetloc(host.encode("ascii"), port)
            factory = _TLSFactory(creator, True, factory, client._clock)
        self._connector = client._tcp.connectTCP(
            self._candidates[self._tried], port, factory, timeout=client._timeout
        )

    def connect_failed(self, reason: Failure) -> None:
        if self._pending is None:
            return
        self._tried += 1
        if self._tried < len(self._candidates) and not reason.check(error.TimeoutError):
            self._connect()
            return
        self._fail(reason)

    def connectionMade(self) -> None:
        # The TLS layer calls this before its handshake and holds what is
        # written until the handshake is done: the request leaves with the
        # client's last handshake flight, with no other event to wait for.
        self._wire = cast(ITCPTransport, self.transport)
        _prefer(self.origin[1], self._candidates[self._tried])
        data, self._unsent = self._unsent, None
        if data is not None:
            self._wire.write(data)

    def _finish(self) -> None:
        d = self._pending
        assert d is not None
        self._pending = None
        self._stop_timer()
        reply = HTTPReply(self._status, b"".join(self._body), self._content_type.decode("latin-1"))
        self._body = []
        if not self.lost:
            if self._reusable and not self._buffer and self.client._persistent:
                self.client._release(self)
            else:
                self._lose()
        d.callback(reply)

    def _fail(self, reason: Failure | BaseException, *, abort: bool = False) -> None:
        d = self._pending
        assert d is not None
        self._pending = None
        self._stop_timer()
        if abort:
            # After the request is detached: stopping a connection attempt
            # reports its failure at once, to a request that must not see it.
            self._abort()
        d.errback(reason)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        what = f"{self._what}: no complete response within {self.client._timeout} s"
        self._fail(defer.TimeoutError(what), abort=True)

    def _cancel(self, d: Deferred[HTTPReply]) -> None:
        self._pending = None
        self._stop_timer()
        self._abort()

    def _abort(self) -> None:
        if self._wire is not None:
            self._wire.abortConnection()
        elif self._connector is not None:
            with contextlib.suppress(error.NotConnectingError):
                self._connector.stopConnecting()

    def _lose(self) -> None:
        if self._wire is not None:
            self._wire.loseConnection()

    # -- the end of the connection --

    def close(self) -> Deferred[None]:
        """Close the (idle) connection; fires once it is closed."""
        self.idle = False
        if self.lost or self._wire is None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._closed.append(d)
        if self._close_timer is None:
            # A TLS close waits for the server's close_notify: bounded.
            self._close_timer = self.client._clock.callLater(self.client._timeout, self._abort)
            self._wire.loseConnection()
        return d

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        self.client._forget(self)
        if self._close_timer is not None:
            if self._close_timer.active():
                self._close_timer.cancel()
            self._close_timer = None
        if self._pending is not None:
            if self._state == _UNTIL_CLOSE:
                self._finish()
            elif reason.check(SSL.Error, VerificationError):
                self._fail(reason)
            elif self._answered:
                self._fail(ResponseFailed([reason]))
            else:
                self._fail(ResponseNeverReceived([reason]))
        closed, self._closed = self._closed, []
        for d in closed:
            d.callback(None)

    # -- the response --

    def dataReceived(self, data: bytes) -> None:
        if self._pending is None:
            if self.idle:
                # Nothing asked, so nothing the next request could trust.
                self.idle = False
                self.client._forget(self)
                self._abort()
            return
        self._answered = True
        self._buffer += data
        try:
            self._parse()
        except BadResponse as e:
            self._fail(e, abort=True)

    def _parse(self) -> None:
        buffer = self._buffer
        while self._pending is not None:
            state = self._state
            if state in (_LENGTH, _CHUNK_DATA):
                n = self._remaining
                if len(buffer) < n:
                    if buffer:
                        self._body.append(bytes(buffer))
                        self._remaining -= len(buffer)
                        del buffer[:]
                    return
                self._body.append(bytes(buffer[:n]))
                del buffer[:n]
                if state == _LENGTH:
                    self._finish()
                    return
                self._state = _CHUNK_END
            elif state == _HEAD:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(buffer) > _MAX_HEAD:
                        raise BadResponse("response head too long")
                    return
                head = bytes(buffer[:end])
                del buffer[: end + 4]
                self._read_head(head)
            elif state == _UNTIL_CLOSE:
                if buffer:
                    self._body.append(bytes(buffer))
                    del buffer[:]
                return
            else:
                end = buffer.find(b"\r\n")
                if end < 0:
                    if len(buffer) > _MAX_LINE:
                        raise BadResponse("chunk line too long")
                    return
                line = bytes(buffer[:end])
                del buffer[: end + 2]
                if state == _CHUNK_SIZE:
                    size = line.split(b";", 1)[0].strip()
                    if not _HEX.fullmatch(size):
                        raise BadResponse(f"bad chunk size {line[:40]!r}")
                    self._remaining = int(size, 16)
                    self._state = _CHUNK_DATA if self._remaining else _TRAILER
                elif state == _CHUNK_END:
                    if line:
                        raise BadResponse("chunk data longer than its size")
                    self._state = _CHUNK_SIZE
                elif not line:  # _TRAILER: an empty line ends it
                    self._finish()
                    return

    def _read_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        code = rest[:3]
        if version not in (b"HTTP/1.1", b"HTTP/1.0") or not code.isdigit() or rest[3:4] not in (b"", b" "):
            raise BadResponse(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
        status = int(code)
        if status < 100:
            raise BadResponse(f"status {status}")
        if status < 200:
            if status == 101:
                raise BadResponse("101 Switching Protocols, never asked for")
            # An interim response (100 Continue, 103 Early Hints): the
            # final one follows.
            return
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or name[-1:] in (b" ", b"\t") or line[:1] in (b" ", b"\t"):
                raise BadResponse(f"bad header line {line[:80]!r}")
            name = name.lower()
            value = value.strip()
            if name in headers:
                if name == b"content-type":
                    continue
                value = headers[name] + b"," + value
            headers[name] = value
        self._status = status
        self._content_type = headers.get(b"content-type", b"")
        tokens = {t.strip().lower() for t in headers.get(b"connection", b"").split(b",")}
        self._reusable = b"close" not in tokens if version == b"HTTP/1.1" else b"keep-alive" in tokens
        if self._head_only or status in (204, 304):
            self._finish()
            return
        coding = headers.get(b"transfer-encoding")
        length = headers.get(b"content-length")
        if coding is not None:
            if coding.rsplit(b",", 1)[-1].strip().lower() == b"chunked":
                self._state = _CHUNK_SIZE
            else:
                self._state = _UNTIL_CLOSE
                self._reusable = False
        elif length is not None:
            values = {v.strip() for v in length.split(b",")}
            value = values.pop()
            if values or not _DIGITS.fullmatch(value):
                raise BadResponse(f"bad Content-Length {length[:40]!r}")
            self._remaining = int(value)
            if not self._remaining:
                self._finish()
                return
            self._state = _LENGTH
        else:
            self._state = _UNTIL_CLOSE
            self._reusable = False


# --------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------


class HTTPSClient:
    """One device's HTTP(S) client: its own connections, its own TLS identity.

    *timeout* bounds each whole request, from the connection (when one is
    made) to the last byte of the response.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        policy: IPolicyForHTTPS,
        *,
        timeout: float = 30.0,
        persistent: bool = True,
    ) -> None:
        self._clock = reactor
        self._tcp = IReactorTCP(reactor)
        self._policy = policy
        self._timeout = timeout
        self._persistent = persistent
        self._idle: _Connection | None = None

    async def request(
        self,
        method: str,
        url: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | Iterable[tuple[str, str]] = (),
        *,
        expect: Iterable[int] | None = (200,),
    ) -> HTTPReply:
        """One request; the reply body is read completely.  An unexpected
        status raises :class:`HTTPStatusError` (``expect=None`` accepts any)."""
        origin, start = _split_url(url)
        if not _TOKEN.fullmatch(method):
            raise ValueError(f"not an HTTP method: {method!r}")
        lines = [method, start, f"Content-Length: {len(body) if body else 0}\r\n"]
        pairs = headers.items() if isinstance(headers, Mapping) else headers
        for name, value in pairs:
            if not _TOKEN.fullmatch(name) or _UNSAFE.search(value):
                raise ValueError(f"not a valid header: {name!r}: {value!r}")
            lines.append(f"{name}: {value}\r\n")
        if not self._persistent:
            lines.append("Connection: close\r\n")
        lines.append("\r\n")
        data = "".join(lines).encode()
        if body:
            data += body
        reply = await self._connection(origin).send(data, f"{method} {url}", method == "HEAD")
        if expect is not None and reply.status not in tuple(expect):
            raise HTTPStatusError(method, url, reply)
        return reply

    async def post(self, url: str, body: bytes, content_type: str, **kw: Any) -> HTTPReply:
        return await self.request("POST", url, body, {"Content-Type": content_type}, **kw)

    async def post_json(self, url: str, obj: object, **kw: Any) -> HTTPReply:
        body = json.dumps(obj, separators=(",", ":")).encode()
        return await self.post(url, body, "application/json", **kw)

    def close(self) -> Deferred[None]:
        """Close the idle connection, if any; fires once it is closed."""
        connection, self._idle = self._idle, None
        if connection is None:
            return succeed(None)
        return connection.close()

    def _connection(self, origin: _Origin) -> _Connection:
        connection, self._idle = self._idle, None
        if connection is not None:
            if connection.origin == origin and not connection.lost:
                return connection
            connection.close()
        return _Connection(self, origin)

    # -- for _Connection --

    def _release(self, connection: _Connection) -> None:
        """*connection* answered and may carry the next request."""
        if self._idle is not None:
            # Another request's connection is kept already (concurrent
            # requests on one client): one idle connection is enough.
            connection.close()
            return
        connection.idle = True
        self._idle = connection

    def _forget(self, connection: _Connection) -> None:
        connection.idle = False
        if self._idle is connection:
            self._idle = None
