"""twisted.web plumbing shared by the three listeners.

- :class:`MdmdSite` / :class:`MdmdRequest`: a body-size limit enforced while
  the body arrives (an oversize request is answered 413 without buffering
  it), a request ID (the client's ``X-Request-ID`` when it is a sane one,
  else a fresh one; answered in ``X-Request-ID``), and one structured log
  line per request with the client's address and the request ID; the
  request metrics by listener, endpoint and status.
- :class:`MdmdChannel`: a request head over Twisted's limits (a line over
  16 KiB, more than 16 KiB or 500 header fields in all) is answered 431
  (414 for the request line, 400 for a malformed head), logged once and
  the connection closed at once, over TLS too.
- :class:`RoutingResource`: the one routing mechanism of the three
  listeners, path templates to :class:`EndpointResource` leaves; the query
  string is ignored (Windows appends ``?mode=...&Platform=WoA`` to the
  management URL); the admin listener's :class:`BearerTokenGuard`, which
  finds the token's name by the token's hash.
- :class:`EndpointResource`: ``async def`` handlers returning an :class:`HTTPResponse`,
  wrapped once with ``Deferred.fromCoroutine``.  A handler raises
  :class:`HTTPError` for a client mistake; anything else is a server bug,
  logged with its traceback and answered with a bare 500 (never a traceback to
  the client).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar, Protocol, cast
from urllib.parse import unquote_to_bytes

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from mdmd import metrics
from mdmd.jsonsafe import JSONInputError, parse_untrusted_json
from mdmd.store.records import StoreUnavailable

__all__ = [
    "BearerTokenGuard",
    "EndpointResource",
    "HTTPError",
    "HTTPResponse",
    "MdmdChannel",
    "MdmdRequest",
    "MdmdSite",
    "Route",
    "RoutingResource",
    "iso_time",
    "json_body",
    "json_error",
    "json_response",
    "refused",
    "request_body",
]

log = Logger(namespace=__name__)


@dataclass(frozen=True, slots=True)
class HTTPResponse:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


class HTTPError(Exception):
    """A client mistake, answered with *response* and logged once as *reason*."""

    def __init__(self, response: HTTPResponse, reason: str) -> None:
        super().__init__(reason)
        self.response = response
        self.reason = reason


def request_body(request: server.Request) -> bytes:
    """The whole request body (bounded by the listener's max_body_bytes)."""
    assert request.content is not None
    request.content.seek(0)
    return bytes(request.content.read())


class NamedReason(Protocol):
    """A field error: which field (``items[0].target``), and why."""

    @property
    def name(self) -> str: ...

    @property
    def reason(self) -> str: ...


def refused(status: int, message: str, errors: Sequence[NamedReason] = ()) -> HTTPError:
    """A client mistake answered with the JSON error shape, naming each bad
    field when there are any."""
    extra: dict[str, Any] = {}
    if errors:
        extra["errors"] = [{"name": e.name, "reason": e.reason} for e in errors]
    return HTTPError(json_error(status, message, **extra), message)


def json_body(request: server.Request) -> object:
    """The request body read by the hardened JSON reader; a 400 naming the
    field for anything it refuses."""
    try:
        return parse_untrusted_json(request_body(request))
    except JSONInputError as e:
        reason = f"the request body is {e}"
        errors = [{"name": e.field or "base", "reason": reason}]
        raise HTTPError(json_error(400, reason, errors=errors), reason) from None


def iso_time(timestamp: float | None) -> str | None:
    """A time as the JSON APIs show it: ISO 8601 UTC to the second, or None."""
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def json_response(status: int, obj: object) -> HTTPResponse:
    return HTTPResponse(status, json.dumps(obj, separators=(",", ":")).encode() + b"\n")


def json_error(status: int, message: str, **extra: Any) -> HTTPResponse:
    """Fleet's error shape, so agents and tools parse ours the same way."""
    body: dict[str, Any] = {"message": message, "errors": [{"name": "base", "reason": message}]}
    body.update(extra)
    return json_response(status, body)


# A request ID a client (or a reverse proxy) may choose; anything else is
# replaced, so that log lines stay one line and greppable.
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,64}")


class MdmdRequest(server.Request):
    """A request that knows its listener's body limit, its own timing, its
    ID and what the log line and the metrics say about it."""

    site: MdmdSite
    device_id: str | None = None  # set by handlers once they know it, for the log line
    note: str | None = None  # what the handler did, appended to the log line
    admin: str | None = None  # the admin token's name, set by BearerTokenGuard
    route: str = "unmatched"  # the route template that answered (a bounded metrics label)
    session_id: str | None = None  # OMA-DM SessionID and MsgID, for the log line
    msg_id: int | None = None
    rejected: bool = False
    path_params: dict[str, str]  # set by RoutingResource

    def __init__(self, channel: http.HTTPChannel, *args: Any, **kw: Any) -> None:
        super().__init__(channel, *args, **kw)
        self.started = time.monotonic()
        self._received = 0
        self.path_params = {}
        self.request_id = secrets.token_hex(8)

    @property
    def client_address(self) -> str:
        """The client's address (for logs and the audit log)."""
        return peer_address(self)

    def _site(self) -> MdmdSite:
        # process() sets self.site; the body arrives before that.
        return cast(MdmdSite, self.channel.site)  # type: ignore[attr-defined]

    def _limit(self) -> int:
        return self._site().max_body_bytes

    def gotLength(self, length: int | None) -> None:
        super().gotLength(length)
        if length is not None and length > self._limit():
            self._reject_oversize(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.rejected:
            return
        self._received += len(data)
        if self._received > self._limit():
            self._reject_oversize(None)
            return
        super().handleContentChunk(data)

    def _reject_oversize(self, declared: int | None) -> None:
        # Answer before the body is read, then close: reading (or buffering)
        # a body we will refuse anyway is how a small server is made to fall
        # over.  The HTTP parser has not produced a request yet, so write the
        # response to the transport directly.
        self.rejected = True
        site = self._site()
        body = json.dumps({"message": f"request body larger than {site.max_body_bytes} bytes"}).encode()
        head = (
            b"HTTP/1.1 413 Request Entity Too Large\r\n"
            b"Content-Type: application/json\r\n"
            b"Connection: close\r\n"
            b"X-Request-ID: " + self.request_id.encode() + b"\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
        )
        self.channel.transport.write(head + body)  # type: ignore[union-attr]
        # The channel's loseConnection, not the transport's: the channel is
        # the transport's registered producer, and a TLS transport waits for
        # its producer to unregister before it closes.
        self.channel.loseConnection()
        metrics.HTTP_REQUESTS.labels(site.listener, "oversize", "413").inc()
        log.warn(
            "{listener} {method} {path} 413: body of {declared} bytes over the {limit}-byte limit"
            " client={client} request_id={request_id}",
            listener=site.listener,
            client=self.client_address,
            request_id=self.request_id,
            # The request line is still the channel's: Request.method and
            # .uri are only set once the body has arrived.
            method=bytes(getattr(self.channel, "_command", b"?") or b"?").decode("latin-1"),
            path=bytes(getattr(self.channel, "_path", b"?") or b"?").decode("latin-1").split("?")[0],
            declared="unknown" if declared is None else declared,
            limit=site.max_body_bytes,
        )

    def write(self, data: bytes) -> None:
        if not self.startedWriting and self.clientproto != b"HTTP/1.1" and self.channel is not None:
            channel = cast(MdmdChannel, self.channel)
            if channel.persistent:
                # An HTTP/1.0 keep-alive (MdmdChannel.checkPersistence): the
                # client finds the body's end by Content-Length, or else by
                # the connection closing.
                if self.responseHeaders.hasHeader(b"Content-Length"):
                    self.responseHeaders.setRawHeaders(b"Connection", [b"keep-alive"])
                else:
                    channel.persistent = False
        super().write(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self.rejected:
            return
        offered = self.requestHeaders.getRawHeaders(b"X-Request-ID")
        if offered and _REQUEST_ID.fullmatch(offered[-1]):
            self.request_id = offered[-1].decode("ascii")
        super().requestReceived(command, path, version)


# Reason phrases (RFC 9110 section 15.5; twisted.web.http.RESPONSES lacks 431).
_HEAD_REFUSALS = {400: "Bad Request", 414: "URI Too Long", 431: "Request Header Fields Too Large"}


class MdmdChannel(http.HTTPChannel):
    """An HTTP/1.1 channel that refuses a request head it will not read with
    an answer, one log line and an immediate close.

    Twisted's own handling falls short twice.  A line longer than
    ``MAX_LENGTH`` (16 KiB) reaches ``LineReceiver.lineLengthExceeded``,
    which calls ``transport.loseConnection()`` without a word to the client;
    this channel is the transport's registered producer, and a TLS transport
    does not close until its producer unregisters, so the socket stayed open
    until the idle timeout (60 s).  And its other refusals (more than
    ``totalHeadersSize`` bytes or ``maxHeaders`` fields, a malformed line)
    send a bare 400 that nothing logs.
    """

    site: MdmdSite
    _refused = False

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return  # the answer is sent; what follows is not read
        super().dataReceived(data)

    def checkPersistence(self, request: http.Request, version: bytes) -> bool:
        # Twisted closes every HTTP/1.0 connection; an HTTP/1.0 client that
        # asks for keep-alive (RFC 9112 appendix C.2.2) keeps its connection
        # when the answer carries a Content-Length (MdmdRequest.write), as
        # every endpoint's answer does.  HTTP/1.1 is Twisted's rule.
        if version == b"HTTP/1.0":
            tokens = b",".join(request.requestHeaders.getRawHeaders(b"Connection", [])).lower()
            return b"keep-alive" in [t.strip() for t in tokens.split(b",")]
        return bool(super().checkPersistence(request, version))

    def lineLengthExceeded(self, line: bytes) -> None:
        if getattr(self, "_command", None) is None:  # no request line yet
            self._refuse(414, f"request line longer than {self.MAX_LENGTH} bytes")
        else:
            self._refuse(431, f"header line longer than {self.MAX_LENGTH} bytes")

    def _respondToBadRequestAndDisconnect(self) -> None:
        # Twisted's one exit for a head it refuses (and for a malformed
        # chunked body); its counters say which limit was passed.
        if getattr(self, "_receivedHeaderSize", 0) > self.totalHeadersSize:
            self._refuse(431, f"request head larger than {self.totalHeadersSize} bytes")
        elif getattr(self, "_receivedHeaderCount", 0) > self.maxHeaders:
            self._refuse(431, f"more than {self.maxHeaders} header fields")
        elif self.line_mode:
            self._refuse(400, "malformed request head")
        else:  # reading the body
            self._refuse(400, "malformed chunked body")

    def _refuse(self, status: int, reason: str) -> None:
        if self._refused:
            return
        self._refused = True
        body = json_error(status, reason).body
        head = (
            f"HTTP/1.1 {status} {_HEAD_REFUSALS[status]}\r\n"
            "Content-Type: application/json\r\n"
            "Connection: close\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        assert self.transport is not None
        self.transport.write(head.encode() + body)
        # HTTPChannel.loseConnection unregisters the channel as the
        # transport's producer first (see the class docstring).
        self.loseConnection()
        site = getattr(self, "site", None)
        peer = self.transport.getPeer()
        log.warn(
            "{listener} {method} {path} refused ({status}): {reason} (peer {peer})",
            listener=getattr(site, "listener", "?"),
            method=bytes(getattr(self, "_command", b"-")).decode("latin-1")[:32],
            path=bytes(getattr(self, "_path", b"-")).decode("latin-1").split("?")[0][:200],
            status=status,
            reason=reason,
            peer=str(getattr(peer, "host", peer)),
        )


class MdmdSite(server.Site):
    """A Site for one listener: names it in logs and bounds request bodies."""

    # The plain HTTP/1.1 channel, not Twisted's HTTP/2-negotiating wrapper:
    # no listener offers h2 (no ALPN), and the channel's refusals are ours.
    protocol = MdmdChannel  # type: ignore[assignment]
    requestFactory = MdmdRequest
    displayTracebacks = False

    def __init__(
        self, resource: Resource, *, listener: str, max_body_bytes: int, reactor: Any = None
    ) -> None:
        # No endpoint takes HTML forms: skip Twisted's form and multipart
        # parsing (it parses every Content-Type with email.message).
        super().__init__(resource, parsePOSTFormSubmission=False, reactor=reactor)
        self.listener = listener
        self.max_body_bytes = max_body_bytes
        self.noisy = False

    def log(self, request: http.Request) -> None:
        req = cast(MdmdRequest, request)
        seconds = time.monotonic() - req.started
        metrics.HTTP_REQUESTS.labels(self.listener, req.route, str(req.code)).inc()
        metrics.HTTP_DURATION.labels(self.listener, req.route).observe(seconds)
        # The line is put together here, once: twisted.logger's formatting of
        # a format string with a dozen fields costs several times more, on
        # every request.  The fields stay on the event for the JSON log.
        line = (
            f"{self.listener} {req.method.decode('latin-1')} {req.path.decode('latin-1')} {req.code}"
            f" {req.sentLength}B {round(seconds * 1000, 1)}ms client={req.client_address}"
            f" request_id={req.request_id}"
        )
        if req.device_id:
            line += f" device={req.device_id}"
        if req.admin:
            line += f" admin={req.admin}"
        if req.note:
            line += f" ({req.note})"
        log.info(
            "{line}",
            line=line,
            listener=self.listener,
            method=req.method.decode("latin-1"),
            path=req.path.decode("latin-1"),
            status=req.code,
            bytes=req.sentLength,
            duration_ms=round(seconds * 1000, 1),
            client=req.client_address,
            request_id=req.request_id,
            device_id=req.device_id,
            admin=req.admin,
            session=req.session_id,
            msgid=req.msg_id,
            note=req.note,
        )


def peer_address(request: http.Request) -> str:
    addr = request.getClientAddress()
    host = getattr(addr, "host", None)
    return str(host) if host is not None else str(addr)


Handler = Callable[[MdmdRequest], Awaitable[HTTPResponse]]


class EndpointResource(Resource):
    """A leaf answering with ``async def handle_<METHOD>(request)`` methods."""

    isLeaf = True

    def render(self, request: server.Request) -> int:
        req = cast(MdmdRequest, request)
        method = req.method.decode("ascii", "replace")
        handler: Handler | None = getattr(self, f"handle_{method}", None)
        if handler is None:
            allowed = sorted(name.removeprefix("handle_") for name in dir(self) if name.startswith("handle_"))
            refusal = json_error(405, f"method {method} not allowed")
            _write(req, HTTPResponse(405, refusal.body, headers=(("Allow", ", ".join(allowed)),)))
            return NOT_DONE_YET
        finished: list[bool] = []
        req.notifyFinish().addBoth(lambda _: finished.append(True))

        d = Deferred.fromCoroutine(_call(handler, req))
        d.addCallback(lambda response: _write(req, response, finished))
        return NOT_DONE_YET


async def _call(handler: Handler, request: MdmdRequest) -> HTTPResponse:
    try:
        return await handler(request)
    except HTTPError as e:
        log.warn(
            "{listener} {method} {path} refused ({status}): {reason}",
            listener=request.site.listener if hasattr(request, "site") else "?",
            method=request.method.decode("latin-1"),
            path=request.path.decode("latin-1"),
            status=e.response.status,
            reason=e.reason,
            device_id=request.device_id,
            client=request.client_address,
            request_id=request.request_id,
        )
        return e.response
    except StoreUnavailable as e:
        # The database is down or unreachable (PostgreSQL): nothing was
        # done; the client tries again later.  One line, no traceback.
        log.warn(
            "{listener} {method} {path}: store unavailable, answered 503: {error}",
            listener=request.site.listener if hasattr(request, "site") else "?",
            method=request.method.decode("latin-1"),
            path=request.path.decode("latin-1"),
            error=str(e),
            device_id=request.device_id,
            client=request.client_address,
            request_id=request.request_id,
        )
        unavailable = json_error(503, "the store is unavailable; try again later")
        return HTTPResponse(503, unavailable.body, headers=(("Retry-After", "60"),))
    except Exception:
        log.failure(
            "unhandled error in {method} {path}",
            Failure(),
            method=request.method.decode("latin-1"),
            path=request.path.decode("latin-1"),
            device_id=request.device_id,
            client=request.client_address,
            request_id=request.request_id,
        )
        return json_error(500, "internal server error")


def _write(request: MdmdRequest, response: HTTPResponse, finished: list[bool] | None = None) -> None:
    if finished:
        # The client went away while we worked; what we stored is stored.
        return
    request.setResponseCode(response.status)
    request.setHeader(b"Content-Type", response.content_type.encode())
    # One body with Content-Length, never chunked: MS-MDE2 clients require it.
    request.setHeader(b"Content-Length", str(len(response.body)).encode())
    request.setHeader(b"X-Request-ID", request.request_id.encode())
    for name, value in response.headers:
        request.setHeader(name.encode(), value.encode())
    if request.method != b"HEAD":
        request.write(response.body)
    request.finish()


@dataclass(frozen=True, slots=True)
class Route:
    """One path of a listener: ``/api/v1/devices/{device_id}/commands``.

    A ``{name}`` segment matches one non-empty path segment, which the
    resource reads, percent-decoded, from ``request.path_params[name]``.  A
    template ending in ``/*`` also serves every path below it.  One trailing
    slash is tolerated; the query string is ignored (Windows appends
    ``?mode=Maintenance&Platform=WoA`` to the management URL).  *public*
    routes skip the listener's guard.
    """

    template: str
    resource: Resource
    public: bool = False

    def match(self, segments: list[bytes]) -> dict[str, str] | None:
        parts = self.template.strip("/").split("/") if self.template.strip("/") else []
        if parts and parts[-1] == "*":
            parts = parts[:-1]
            if len(segments) < len(parts):
                return None
            segments = segments[: len(parts)]
        elif len(segments) != len(parts):
            return None
        params: dict[str, str] = {}
        for part, raw in zip(parts, segments, strict=True):
            if part.startswith("{") and part.endswith("}"):
                value = _segment(raw)
                if value is None:
                    return None
                params[part[1:-1]] = value
            elif raw.decode("latin-1") != part:
                return None
        return params


# A path segment this long is not an ID but an attempt to make the server
# work for nothing.
MAX_SEGMENT = 256


def _segment(raw: bytes) -> str | None:
    """A percent-decoded path segment, or None when it cannot be a name or ID."""
    try:
        text = unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not text or len(text) > MAX_SEGMENT or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in text):
        return None
    return text


#: None lets the request through; a response refuses it; a Deferred holds it
#: until the guard can judge (the admin tokens are still loading).
Guard = Callable[[MdmdRequest], "HTTPResponse | Deferred[None] | None"]


class RoutingResource(Resource):
    """The one routing mechanism of every listener: the first
    :class:`Route` whose template matches the path answers; anything else
    is a JSON 404.  A *guard* (the admin bearer token) answers instead of
    every non-public route when it refuses the request."""

    isLeaf = True

    def __init__(self, routes: Sequence[Route], *, guard: Guard | None = None) -> None:
        super().__init__()
        self.routes = tuple(routes)
        self.guard = guard

    def render(self, request: server.Request) -> int | bytes:
        req = cast(MdmdRequest, request)
        path = request.path
        if path.endswith(b"/") and len(path) > 1:
            path = path[:-1]
        segments = [s for s in path.split(b"/")[1:]] if path != b"/" else []
        for route in self.routes:
            params = route.match(segments)
            if params is None:
                continue
            if self.guard is not None and not route.public:
                refusal = self.guard(req)
                if isinstance(refusal, Deferred):
                    return self._later(refusal, request)
                if refusal is not None:
                    _write(req, refusal)
                    return NOT_DONE_YET
            req.path_params = params
            req.route = route.template
            return cast(int | bytes, route.resource.render(request))
        if self.guard is not None:
            # Nothing below a guarded listener is revealed without the token,
            # not even which paths exist.
            refusal = self.guard(req)
            if isinstance(refusal, Deferred):
                return self._later(refusal, request)
            if refusal is not None:
                _write(req, refusal)
                return NOT_DONE_YET
        _write(req, json_error(404, f"no such endpoint: {request.path.decode('latin-1')}"))
        return NOT_DONE_YET

    def _later(self, ready: Deferred[None], request: server.Request) -> int:
        """Route *request* again once the guard can judge it."""

        def again(_: object) -> None:
            result = self.render(request)
            if isinstance(result, bytes):  # a resource that answered at once
                request.write(result)
                request.finish()

        ready.addCallback(again)
        return NOT_DONE_YET


class BearerTokenGuard:
    """``Authorization: Bearer <token>``: the token's SHA-256 is looked up in
    the names of the valid tokens, kept in memory by *tokens* (a mapping
    from hash to name, replaced whole when tokens change), so that no
    request waits for the store and nothing is compared byte by byte with a
    secret: what a timing difference could reveal is a digest of what the
    client sent.  The request's ``admin`` becomes the token's name.  While
    the tokens load (*tokens* gives None) a request waits for *pending*'s
    Deferred; if they cannot be loaded (*pending* gives None too) it is
    answered 503.
    """

    realm: ClassVar[str] = "mdmd-admin"

    def __init__(
        self,
        tokens: Callable[[], dict[bytes, str] | None],
        pending: Callable[[], Deferred[None] | None] | None = None,
    ) -> None:
        self._tokens = tokens
        self._pending = pending

    def __call__(self, request: MdmdRequest) -> HTTPResponse | Deferred[None] | None:
        tokens = self._tokens()
        if tokens is None:
            waiting = self._pending() if self._pending is not None else None
            if waiting is not None:
                return waiting
            return json_error(503, "the admin tokens cannot be loaded: see the log")
        header = request.getHeader(b"Authorization") or b""
        scheme, _, presented = header.partition(b" ")
        name = None
        if scheme.lower() == b"bearer" and presented.strip():
            name = tokens.get(hashlib.sha256(presented.strip()).digest())
        if name is not None:
            request.admin = name
            return None
        log.warn(
            "admin {method} {path} refused: {why} client={client} request_id={request_id}",
            method=request.method.decode("latin-1"),
            path=request.path.decode("latin-1"),
            why="no bearer token" if not header else "unknown or revoked bearer token",
            client=request.client_address,
            request_id=request.request_id,
        )
        return HTTPResponse(
            401,
            json.dumps({"message": "admin bearer token required"}).encode(),
            headers=(("WWW-Authenticate", f'Bearer realm="{self.realm}"'),),
        )
