"""twisted.web adapter for OMA-DM management (management listener, mutual TLS).

Who is speaking is decided here, before the message is processed: the TLS
layer has verified that the client certificate was issued by the WSTEP
identity CA; this adapter checks that mdmd issued that very certificate
(serial and thumbprint in the store), that it is not revoked and has not
ended (by mdmd's clock), that its device is enrolled, and that the SyncHdr
``Source/LocURI`` is that device's ID.  A certificate refused here is logged
like a refused TLS handshake (:mod:`mdmd.refusals`).

The first accepted message from a certificate issued by renewal retires the
certificate it renewed (MS-MDE2 3.5): until then both work, so a renewal
whose answer was lost strands nothing.
"""

from __future__ import annotations

import random
import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar, cast

from cryptography import x509
from twisted.internet.defer import DeferredLock
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from mdmd import metrics
from mdmd.actions import ActionUpdate, ends_enrollment, settle
from mdmd.actions import plan_session as plan_action_session
from mdmd.app import Mdmd
from mdmd.management import (
    NewCommand,
    Reply,
    SessionError,
    digest,
    is_retransmission,
    process_message,
    refusal,
)
from mdmd.profiles import DeviceVars, ProfilePlanner, ProfileSettings
from mdmd.refusals import CertificateSummary, RefusalLog
from mdmd.store import LoggedMessage, ManagementContext, MessageLogWrite, SessionConflict
from mdmd.syncml import ALERT_GENERIC, SyncMLError, SyncMLMessage, describe_status, parse_message
from mdmd.tls import peer_identity
from mdmd.web import EndpointResource, HTTPError, HTTPResponse, MdmdRequest, peer_address, request_body
from mdmd.xmlsafe import XMLInputError

__all__ = ["SYNCML_CONTENT_TYPE", "ManagementResource"]

log = Logger(namespace=__name__)

SYNCML_CONTENT_TYPE = "application/vnd.syncml.dm+xml"
# Messages above this size are parsed and processed on a worker thread.
_LARGE_MESSAGE = 64 * 1024
# A message whose session step lost a race with another worker process (or
# node) is processed again from a fresh read, after a short pause that grows
# (to _CONFLICT_PAUSE_MAX) with some jitter, so that two processes serving
# one device's concurrent sessions stop colliding.  Only a device still
# losing after _CONFLICT_PATIENCE seconds is told to retry later (503).
_CONFLICT_PATIENCE = 30.0
_CONFLICT_PAUSE_FIRST = 0.002
_CONFLICT_PAUSE_MAX = 0.25
#: The message log keeps at most this much of each message (the size it
#: records is the whole message's).
MESSAGE_LOG_MAX_BYTES = 64 * 1024
_MSG_ID = re.compile(rb"<MsgID>([0-9]{1,9})</MsgID>")
_T = TypeVar("_T")


def _syncml(body: bytes) -> HTTPResponse:
    return HTTPResponse(200, body, content_type=SYNCML_CONTENT_TYPE)


def _plain(status: int, text: str) -> HTTPResponse:
    return HTTPResponse(status, (text + "\n").encode(), content_type="text/plain")


class ManagementResource(EndpointResource):
    """``POST /api/mdm/microsoft/management`` (plus Windows' query string)."""

    def __init__(self, app: Mdmd, refusals: RefusalLog | None = None) -> None:
        super().__init__()
        self.app = app
        self._refusals = refusals
        # One message at a time per device: its session state is read,
        # advanced and written as one step.
        self._locks: dict[str, DeferredLock] = {}

    @property
    def refusals(self) -> RefusalLog:
        if self._refusals is None:
            self._refusals = RefusalLog(self.app.reactor)  # type: ignore[arg-type]
        return self._refusals

    @contextmanager
    def _lock_entry(self, key: str) -> Iterator[DeferredLock]:
        lock = self._locks.setdefault(key, DeferredLock())
        try:
            yield lock
        finally:
            if not lock.locked and not lock.waiting:
                self._locks.pop(key, None)

    async def handle_POST(self, request: MdmdRequest) -> HTTPResponse:
        peer = peer_identity(request)
        if peer is None:  # the mTLS context makes this unreachable; belt and braces
            raise HTTPError(_plain(403, "client certificate required"), "no client certificate")
        cert, serial, thumbprint = peer.certificate, peer.serial, peer.thumbprint
        content_type = (request.getHeader(b"Content-Type") or b"").decode("latin-1")
        if content_type.split(";")[0].strip().lower() != SYNCML_CONTENT_TYPE:
            raise HTTPError(
                _plain(415, f"Content-Type must be {SYNCML_CONTENT_TYPE}"),
                f"Content-Type {content_type!r} from certificate {serial}",
            )
        body = request_body(request)
        # The lock orders one device's messages within this process; the
        # store's compare-and-swap on the session step orders them across
        # worker processes.
        with self._lock_entry(serial) as lock:
            await lock.acquire()
            try:
                return await self._handle_patiently(request, cert, serial, thumbprint, body)
            finally:
                lock.release()

    async def _handle_patiently(
        self, request: MdmdRequest, cert: x509.Certificate, serial: str, thumbprint: str, body: bytes
    ) -> HTTPResponse:
        clock = cast(IReactorTime, self.app.reactor)
        deadline = clock.seconds() + _CONFLICT_PATIENCE
        pause = _CONFLICT_PAUSE_FIRST
        attempt = 1
        while True:
            try:
                return await self._handle(request, cert, serial, thumbprint, body)
            except SessionConflict:
                if clock.seconds() >= deadline:
                    raise HTTPError(
                        _plain(503, "busy, retry later"),
                        f"device {request.device_id}: session step lost to another process "
                        f"{attempt} times in {_CONFLICT_PATIENCE:.0f} s",
                    ) from None
                if attempt == 1:  # one line per message, however many attempts it takes
                    log.info(
                        "device {device_id}: session advanced by another process; reading it again",
                        device_id=request.device_id,
                    )
            await deferLater(clock, pause * random.uniform(0.5, 1.5))
            pause = min(pause * 2, _CONFLICT_PAUSE_MAX)
            attempt += 1

    async def _handle(
        self, request: MdmdRequest, cert: x509.Certificate, serial: str, thumbprint: str, body: bytes
    ) -> HTTPResponse:
        app = self.app
        ctx = await app.store.management_context(
            serial, request_digest=digest(body), with_profile_context=_looks_like_a_session_start(body)
        )
        problem = self._identity_problem(ctx, thumbprint, app.now())
        if ctx is not None:
            request.device_id = ctx.device.device_id
        if problem is not None:
            # One line with the same fields as a refused handshake (and
            # summarised the same way); the refusal itself follows below.
            self.refusals.refused(peer_address(request), "request", problem[1], CertificateSummary.of(cert))
        elif (
            ctx is not None
            and ctx.last_reply is not None
            and ctx.session is not None
            and not (ctx.certificate.renewed_from is not None and ctx.certificate.activated_at is None)
        ):
            # The device's last message again, byte for byte (MS-MDM: a
            # device that got no reply sends it again): the same reply, and
            # nothing changes.  Those bytes were parsed and checked (SyncHdr
            # Source included) when they first came, so they are not again.
            request.session_id, request.msg_id = ctx.session.session_id, ctx.session.last_msg_id
            request.note = f"session {request.session_id} msg {request.msg_id}: retransmission answered again"
            return _syncml(ctx.last_reply)
        server_url = app.config.management.url
        try:
            message = await self._off_reactor_if_large(body, parse_message, body)
        except (XMLInputError, SyncMLError) as e:
            if problem is not None:
                request.note = f"certificate {serial}: {problem[1]}"
                return _plain(403, "forbidden")
            hdr = getattr(e, "hdr", None)
            if isinstance(e, SyncMLError) and hdr is not None:
                log.warn(
                    "device {device_id}: message refused with SyncHdr status {status}: {reason}",
                    device_id=request.device_id,
                    status=e.status,
                    reason=e.reason,
                )
                return _syncml(refusal(hdr, e.status, server_url=server_url))
            raise HTTPError(
                _plain(400, f"not a SyncML 1.2 message: {e}"), f"unparsable SyncML: {e}"
            ) from None

        if problem is not None:
            request.note = f"refused {problem[0]}: {problem[1]}"
            return _syncml(refusal(message.hdr, problem[0], server_url=server_url))
        assert ctx is not None
        if message.hdr.source != ctx.device.device_id:
            log.warn(
                "management message refused (403): certificate of device {device_id} used with "
                "SyncHdr Source {source}",
                device_id=ctx.device.device_id,
                source=repr(message.hdr.source[:64]),
            )
            return _syncml(refusal(message.hdr, 403, server_url=server_url))
        if ctx.certificate.renewed_from is not None and ctx.certificate.activated_at is None:
            # The renewed certificate is in use: the one it renewed retires.
            retired = await app.store.confirm_renewal(serial, app.now())
            log.info(
                "device {device_id}: first session with renewed certificate {serial}; revoked {retired}",
                device_id=ctx.device.device_id,
                serial=serial,
                retired=list(retired) or "none",
            )
        return await self._session(request, ctx, message, body)

    async def _off_reactor_if_large(
        self, body: bytes, fn: Callable[..., _T], *args: Any, **kwargs: Any
    ) -> _T:
        """Run *fn* here for the usual small message; on a worker thread for
        a large one (parsing a 4 MiB SyncML message with 15,000 Items takes
        about 0.4 s of CPU, which must not stall every other connection)."""
        if len(body) <= _LARGE_MESSAGE:
            return fn(*args, **kwargs)
        reactor = self.app.reactor
        return await deferToThreadPool(
            reactor,  # type: ignore[arg-type]
            reactor.getThreadPool(),  # type: ignore[attr-defined]
            fn,
            *args,
            **kwargs,
        )

    @staticmethod
    def _identity_problem(
        ctx: ManagementContext | None, thumbprint: str, now: float
    ) -> tuple[int, str] | None:
        if ctx is None:
            return 401, "not a certificate mdmd issued (unknown serial)"
        if ctx.certificate.thumbprint != thumbprint:
            return 401, "not a certificate mdmd issued (another certificate with this serial)"
        if ctx.certificate.revoked_at is not None:
            reason = ctx.certificate.revoke_reason or "revoked"
            wiped = " (the device was wiped)" if ctx.device.lifecycle == "wiped" else ""
            return 403, f"revoked ({reason}): certificate of device {ctx.device.device_id}{wiped}"
        if ctx.certificate.not_after < now:
            # OpenSSL checks validity with the system clock; mdmd's own clock
            # decides here too.
            return 403, f"expired: certificate of device {ctx.device.device_id}"
        if ctx.device.state != "enrolled":
            return 403, f"device {ctx.device.device_id} is not enrolled{wiped}"
        return None

    async def _session(
        self, request: MdmdRequest, ctx: ManagementContext, message: SyncMLMessage, body: bytes
    ) -> HTTPResponse:
        app = self.app
        hdr = message.hdr
        device_id = ctx.device.device_id
        request.session_id, request.msg_id = hdr.session_id, hdr.msg_id
        if ctx.last_reply is not None and is_retransmission(message, body, ctx.session):
            # A retransmission with a renewed certificate's first use (see
            # _handle): the same answer, and nothing else changes.
            request.note = f"session {hdr.session_id} msg {hdr.msg_id}: retransmission answered again"
            return _syncml(ctx.last_reply)
        planner = ProfilePlanner.for_device(
            DeviceVars(device_id, "", ""),
            ctx.profiles,
            ctx.profile_links,
            now=app.now(),
            settings=ProfileSettings(app.config.profiles.verify_interval, app.config.profiles.max_retries),
            new_uuid=lambda: str(uuid.uuid4()),
        )
        planned: list[NewCommand] = []
        started: list[ActionUpdate] = []
        if _starts_session(message):
            # Desired state first: what the device's profiles need goes out
            # before the administrators' one-shot commands.
            wanted = ctx.profile_context
            if wanted is None:
                wanted = await app.store.profile_context(device_id)
            planner.device = wanted.device
            planned = planner.plan_session(wanted.desired)
            # A rename waiting for its restart asks for the device's name.
            asked, started = plan_action_session(ctx.actions, ctx.device.inventory, lambda: str(uuid.uuid4()))
            planned += asked
        try:
            reply: Reply = await self._off_reactor_if_large(
                body,
                process_message,
                message,
                body,
                device_id=device_id,
                session=ctx.session,
                queue=ctx.queue,
                server_url=app.config.management.url,
                default_max_msg_size=app.config.management.max_msg_size,
                new_commands=planned,
                followups=planner.followups,
                ends_session=ends_enrollment(ctx.actions),
            )
        except SessionError as e:
            log.warn(
                "device {device_id} session {session_id} msg {msg_id} refused: {reason}",
                device_id=device_id,
                session_id=hdr.session_id,
                msg_id=hdr.msg_id,
                reason=e.reason,
            )
            out = ctx.session.next_msg_id if ctx.session else 1
            return _syncml(refusal(hdr, e.status, server_url=app.config.management.url, msg_id=out))
        profiles = planner.finish(reply.step)
        actions = settle(ctx.actions, reply.step, started)
        # Durable before the reply that acknowledges it leaves.
        now = app.now()
        await app.store.commit_management_step(
            reply.step,
            now,
            expected_seq=ctx.session_seq,
            profiles=profiles,
            actions=actions,
            messages=_message_log(
                app.config.management.message_log, now, hdr.session_id, hdr.msg_id, body, reply
            ),
        )
        # Profiles log their own failures (below), by profile.
        profile_commands = {link.command_uuid for link in ctx.profile_links} | {
            link.command_uuid for link in profiles.links
        }
        action_of = {a.command_uuid: a.action for a in ctx.actions}
        for command_uuid, code in reply.step.answered:
            if 200 <= code < 300 or command_uuid in profile_commands:
                continue
            log.warn(
                "device {device_id} failed {what} {command_uuid}: {status_text}",
                device_id=device_id,
                what=f"action {action_of[command_uuid]}" if command_uuid in action_of else "command",
                command_uuid=command_uuid,
                status=code,
                status_text=describe_status(code),
                session_id=hdr.session_id,
                msg_id=hdr.msg_id,
            )
        if actions.ended is not None:
            log.info(
                "device {device_id} {ended}: certificate revoked, nothing more is sent to it",
                device_id=device_id,
                ended=actions.ended,
            )
        for change in profiles.events:
            if change.state in ("failed", "drifted"):
                log.warn(
                    "device {device_id} profile {profile} {state}: {detail}",
                    device_id=device_id,
                    profile=change.profile,
                    state=change.state,
                    detail=change.detail,
                    session_id=hdr.session_id,
                    msg_id=hdr.msg_id,
                )
        if reply.step.new_session:
            metrics.CHECKIN_SESSIONS.inc()
        for event in reply.events:
            log.info(
                "device {device_id} session {session_id} msg {msg_id}: {event}",
                device_id=device_id,
                session_id=hdr.session_id,
                msg_id=hdr.msg_id,
                event=event,
            )
        # One line per message: the request log line carries this note.
        request.note = f"session {hdr.session_id} msg {hdr.msg_id}: {reply.commands_sent} command(s) sent" + (
            ", session ended" if reply.session_ended else ""
        )
        return _syncml(reply.body)


def _message_log(
    keep: int, now: float, session_id: str, msg_id: int, body: bytes, reply: Reply
) -> MessageLogWrite:
    """The device's message and mdmd's reply for its message log (with
    *keep* 0 none, and what was kept is trimmed away)."""
    if keep <= 0:
        return MessageLogWrite((), 0)
    # The reply is mdmd's own: its first MsgID is its SyncHdr's.
    found = _MSG_ID.search(reply.body, 0, 1024)
    out_msg_id = int(found.group(1)) if found else None
    return MessageLogWrite(
        (
            _logged("in", now, session_id, msg_id, body),
            _logged("out", now, session_id, out_msg_id, reply.body),
        ),
        keep,
    )


def _logged(direction: str, now: float, session_id: str, msg_id: int | None, body: bytes) -> LoggedMessage:
    return LoggedMessage(
        direction,
        now,
        session_id,
        msg_id,
        len(body),
        body[:MESSAGE_LOG_MAX_BYTES],
        len(body) > MESSAGE_LOG_MAX_BYTES,
    )


def _looks_like_a_session_start(body: bytes) -> bool:
    """The raw message's first MsgID is 1 (read before the message is
    parsed): its context read then takes the profile context along, which
    spares the session start a second trip to the store's thread.  A guess
    only; the parsed message decides (:func:`_starts_session`)."""
    found = _MSG_ID.search(body, 0, 2048)
    return found is not None and found.group(1) == b"1"


def _starts_session(message: SyncMLMessage) -> bool:
    """Package 1 of a session that is not the user's unenrollment (a
    device leaving gets no new work)."""
    return message.hdr.msg_id == 1 and not any(c.alert_code == ALERT_GENERIC for c in message.commands)
