"""mdmd-sim's wire: a small Twisted HTTPS client (``twisted.web.client.Agent``)
that moves the bytes :mod:`mdmd.sim.device` builds and reads.

- Server authentication against a given trust root (mdmd's development root
  ``tls-root.pem``, or any CA file), with host name verification.
- An optional client certificate per device (cryptography objects, never
  pyOpenSSL's deprecated ones) for the management listener's mutual TLS.
- One :class:`HTTPConnectionPool` per :class:`HTTPSClient`: a device never
  shares a connection (nor a TLS identity) with another device, and the
  messages of one flow or session reuse one TLS connection where the server
  keeps it open.
- Every request body is sent with a Content-Length (MS-MDE2 servers and
  Windows' own stack expect it), never chunked.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from OpenSSL.crypto import X509
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer, IOpenSSLClientConnectionCreator, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import (
    Certificate,
    TLSVersion,
    optionsForClientTLS,
    trustRootFromCertificates,
)
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IPolicyForHTTPS, IResponse
from zope.interface import implementer

if TYPE_CHECKING:
    # Twisted exports the interface only from its private module.
    from twisted.internet._sslverify import IOpenSSLTrustRoot

__all__ = [
    "BytesProducer",
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


@implementer(IBodyProducer)
class BytesProducer:
    """A request body known in advance: Agent sends it with a Content-Length."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


_DONE = Failure(ResponseDone())


class _BodyCollector(Protocol):
    """Collects a response body.  Twisted's ``readBody`` would do, but in
    Twisted 26 it warns (DeprecationWarning) on every Agent response: the
    response's transport proxy has no ``abortConnection``."""

    def __init__(self, done: Deferred[bytes]) -> None:
        self.done = done
        self.chunks: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = _DONE) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(reason)


def _read_body(response: IResponse) -> Deferred[bytes]:
    collector: _BodyCollector

    def cancel(_: Deferred[bytes]) -> None:
        # A timeout: drop the connection (the pool will not reuse it).
        transport = collector.transport
        if transport is not None:
            transport.loseConnection()

    collector = _BodyCollector(Deferred(cancel))
    response.deliverBody(collector)
    return collector.done


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


class HTTPSClient:
    """One device's HTTP(S) client: its own connection pool, its own TLS identity."""

    def __init__(
        self,
        reactor: IReactorTime,
        policy: IPolicyForHTTPS,
        *,
        timeout: float = 30.0,
        persistent: bool = True,
    ) -> None:
        self._reactor = reactor
        self._timeout = timeout
        self._pool = HTTPConnectionPool(reactor, persistent=persistent)
        self._pool.maxPersistentPerHost = 1
        # A failed POST is an error to count, not something to retry quietly.
        self._pool.retryAutomatically = False
        self._agent = Agent(reactor, contextFactory=policy, pool=self._pool, connectTimeout=timeout)

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
        pairs = headers.items() if isinstance(headers, Mapping) else headers
        raw_headers = Headers()
        for name, value in pairs:
            raw_headers.addRawHeader(name, value)
        d: Deferred[IResponse] = self._agent.request(
            method.encode("ascii"),
            url.encode("ascii"),
            raw_headers,
            BytesProducer(body) if body is not None else None,
        )
        d.addTimeout(self._timeout, self._reactor)
        response = await d
        read = _read_body(response)
        read.addTimeout(self._timeout, self._reactor)
        data = await read
        content_type = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
        reply = HTTPReply(response.code, data, content_type.decode("latin-1"))
        if expect is not None and reply.status not in tuple(expect):
            raise HTTPStatusError(method, url, reply)
        return reply

    async def post(self, url: str, body: bytes, content_type: str, **kw: Any) -> HTTPReply:
        return await self.request("POST", url, body, {"Content-Type": content_type}, **kw)

    async def post_json(self, url: str, obj: object, **kw: Any) -> HTTPReply:
        body = json.dumps(obj, separators=(",", ":")).encode()
        return await self.post(url, body, "application/json", **kw)

    def close(self) -> Deferred[None]:
        """Close the pooled connections; fires once they are closed."""
        return self._pool.closeCachedConnections()  # type: ignore[no-any-return]
