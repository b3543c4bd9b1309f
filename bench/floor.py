#!/usr/bin/env python3
"""What mdmd's stack costs before mdmd does anything: the floor under its
figures beside nginx (bench/anchor.py).

    .venv/bin/python bench/floor.py serve --state STATE --port PORT --layer tls|web

serves, on loopback, mdmd's own mutual-TLS options (mdmd.tls, the
certificates in the daemon's *STATE* folder) in front of:

- ``tls``: a bare protocol that reads one HTTP request and answers fixed
  bytes (the cost of Twisted's TLS and pyOpenSSL per connection);
- ``web``: twisted.web with mdmd's own Site and channel (mdmd.web) and a
  resource that answers fixed bytes (the above plus HTTP).

bench/anchor.py ``--floor`` runs both beside mdmd and nginx with the same
clients; what mdmd costs above the ``web`` layer is mdmd's own work (the
store, SyncML, the log line and the metrics).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

from twisted.internet import reactor  # noqa: E402
from twisted.internet.endpoints import TCP4ServerEndpoint  # noqa: E402
from twisted.internet.interfaces import IProtocolFactory, IProtocolNegotiationFactory  # noqa: E402
from twisted.internet.protocol import Factory, Protocol  # noqa: E402
from twisted.web import server  # noqa: E402
from twisted.web.resource import Resource  # noqa: E402
from zope.interface import implementer  # noqa: E402

from mdmd import pki  # noqa: E402
from mdmd.refusals import RefusalLog  # noqa: E402
from mdmd.tls import ReloadableTLS, mutual_tls_options, tls_server_factory  # noqa: E402
from mdmd.web import MdmdSite  # noqa: E402

REPLY_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.syncml.dm+xml\r\nContent-Length: %d\r\n"


class FixedReply(Protocol):
    """One HTTP request (head and Content-Length body) in, fixed bytes out;
    kept alive when the client asks."""

    reply: bytes = b""

    def connectionMade(self) -> None:
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while True:
            head, sep, rest = self.buffer.partition(b"\r\n\r\n")
            if not sep:
                return
            length = 0
            keep = False
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
                elif name.strip().lower() == b"connection":
                    keep = b"keep-alive" in value.lower()
            if len(rest) < length:
                return
            self.buffer = rest[length:]
            http11 = head.split(b"\r\n", 1)[0].endswith(b"HTTP/1.1")
            keep = keep or (http11 and b"connection: close" not in head.lower())
            extra = b"Connection: keep-alive\r\n" if keep else b"Connection: close\r\n"
            assert self.transport is not None
            self.transport.write(REPLY_HEAD % len(self.reply) + extra + b"\r\n" + self.reply)
            if not keep:
                self.transport.loseConnection()
                return


@implementer(IProtocolNegotiationFactory)
class FixedReplyFactory(Factory):
    """Offers HTTP/1.1 by ALPN as twisted.web's Site does (without it curl,
    which offers ALPN, is refused the handshake)."""

    protocol = FixedReply

    def acceptableProtocols(self) -> list[bytes]:
        return [b"http/1.1"]


class FixedResource(Resource):
    isLeaf = True

    def __init__(self, reply: bytes) -> None:
        super().__init__()
        self.reply = reply

    def render_POST(self, request: server.Request) -> bytes:
        request.setHeader(b"Content-Type", b"application/vnd.syncml.dm+xml")
        request.setHeader(b"Content-Length", str(len(self.reply)).encode())
        return self.reply


def serve(state: Path, port: int, layer: str, reply: bytes) -> None:
    chain = pki.load_pem_certificates((state / "tls-server.pem").read_bytes(), "tls-server.pem")
    key = pki.load_pem_private_key((state / "tls-server.key").read_bytes(), "tls-server.key")
    identity = pki.load_pem_certificates((state / "wstep-identity.pem").read_bytes(), "wstep-identity.pem")[0]
    options = ReloadableTLS(mutual_tls_options(chain, key, [identity]))
    inner: IProtocolFactory
    if layer == "tls":
        FixedReply.reply = reply
        inner = FixedReplyFactory()
    else:
        inner = MdmdSite(FixedResource(reply), listener="floor", max_body_bytes=1 << 20)
    factory = tls_server_factory(options, inner, RefusalLog(reactor))
    TCP4ServerEndpoint(reactor, port, interface="127.0.0.1").listen(factory)
    reactor.run()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/floor", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--state", type=Path, required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--layer", choices=("tls", "web"), required=True)
    s.add_argument("--reply", type=Path, required=True, help="the bytes to answer with")
    a = p.parse_args(argv)
    serve(a.state, a.port, a.layer, a.reply.read_bytes())
    return 0


if __name__ == "__main__":
    sys.exit(main())
