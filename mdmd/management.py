"""OMA-DM management sessions (MS-MDM, OMA-DM 1.2), pure: one device
message in, the reply and what to store out.  No I/O; the twisted.web
adapter is :mod:`mdmd.management_endpoint`.

A session is the exchange that starts with the device's package 1 (MsgID 1,
``Alert 1201``) and ends with a server message that carries statuses only
(MS-MDM 2.2.6.1).  Its state between messages is a :class:`SessionState`, a
frozen value: :func:`process_message` never changes the state it is given,
it returns the next one inside the :class:`ManagementStep` to commit.

Two things are kept apart from the session state so that a small message
commits a small write whatever came before it: the last reply (kept for a
retransmission, see :func:`is_retransmission`) and the chunks of a large
object the device is uploading (only their running sizes are in the state;
the pieces are appended by the store and joined once the last one arrives).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Final

from mdmd.syncml import (
    ALERT_CLIENT_EVENT,
    ALERT_CLIENT_INITIATED_MGMT,
    ALERT_GENERIC,
    ALERT_NEXT_MESSAGE,
    ALERT_NO_END_OF_DATA,
    ALERT_SERVER_INITIATED_MGMT,
    ALERT_SESSION_ABORT,
    UNENROLL_USER_REQUEST_TYPE,
    Command,
    Item,
    Results,
    Status,
    SyncHdr,
    SyncMLMessage,
    build_message,
    hdr_status,
    pack_body,
    parse_commands_fragment,
    renumber,
    reply_header,
    status_for,
    walk,
)

__all__ = [
    "AlertRecord",
    "CommandResult",
    "CompletedObject",
    "FollowUps",
    "LargeObject",
    "ManagementStep",
    "NewCommand",
    "QueuedCommand",
    "Reply",
    "SentRef",
    "SessionError",
    "SessionState",
    "decode_session",
    "digest",
    "encode_session",
    "is_retransmission",
    "process_message",
    "refusal",
]

_KNOWN_ALERTS: Final = frozenset(
    {
        ALERT_SERVER_INITIATED_MGMT,
        ALERT_CLIENT_INITIATED_MGMT,
        ALERT_NEXT_MESSAGE,
        ALERT_SESSION_ABORT,
        ALERT_CLIENT_EVENT,
        ALERT_NO_END_OF_DATA,
        ALERT_GENERIC,
    }
)
# Inventory the device reports by Replace in package 1 is kept, bounded.
_MAX_INVENTORY_ITEMS: Final = 64
_MAX_INVENTORY_VALUE: Final = 4096
# The read-only device description CSPs: what a Get reads there is
# inventory as well.
_INVENTORY_ROOTS: Final = ("./DevInfo/", "./DevDetail/")
# A large object the device uploads in chunks is reassembled up to this size.
MAX_LARGE_OBJECT: Final = 16 * 1024 * 1024
# Status codes (OMA-DM RepPro 1.2 §10, MS-MDM 2.2.6.1).
_OK, _CHUNK_BUFFERED, _BAD_REQUEST, _NOT_FOUND = 200, 213, 400, 404
_OPTIONAL_FEATURE, _SIZE_MISMATCH, _TOO_BIG = 406, 424, 416

#: Version of :func:`encode_session`'s format.  Version 1 (no ``"v"`` key)
#: was a mutable dict that also carried the last reply and the chunk data.
SESSION_FORMAT: Final = 2


# --- what the session exchanges with the store ---


@dataclass(frozen=True, slots=True)
class QueuedCommand:
    """A command waiting for the device: stored SyncML without CmdIDs."""

    uuid: str
    body: str


@dataclass(frozen=True, slots=True)
class CommandResult:
    """A Status or a Results item a device returned for a queued command
    (for Atomic/Sequence: one per inner command, by CmdID)."""

    kind: str  # "status" | "results"
    cmd_id: str | None
    cmd: str | None
    status: int | None
    loc_uri: str | None = None
    format: str | None = None
    type: str | None = None
    data: str | None = None
    received_at: float = 0.0


@dataclass(frozen=True, slots=True)
class AlertRecord:
    code: str
    type: str | None
    format: str | None
    source: str | None
    data: str | None


@dataclass(frozen=True, slots=True)
class SentRef:
    """What a CmdID the server sent in this session stands for."""

    uuid: str  # the queued command
    verb: str  # this CmdID's own verb (an inner command of an Atomic has its own)
    top_level: bool  # the queued command itself, not a command inside it
    loc_uri: str | None = None  # its first item's target, to say which part of an Atomic failed


@dataclass(frozen=True, slots=True)
class NewCommand:
    """A command created while a message is processed (a follow-up of an
    answered command, or one planned when the session starts): the store
    adds it to the queue when the step commits, before marking it sent."""

    uuid: str
    verb: str
    body: str


#: Called once per top-level command the device answered in a message, with
#: its status code and every Status/Results of it in that message (inner
#: commands of an Atomic included); returns the commands to send next.
FollowUps = Callable[[str, int, Sequence["CommandResult"]], Sequence[NewCommand]]


@dataclass(frozen=True, slots=True)
class LargeObject:
    """A Results item the device is uploading in chunks (MoreData): what is
    known of it between messages.  The pieces themselves are in the store."""

    uuid: str
    received: int  # bytes (UTF-8) so far
    size: int | None  # the total the first chunk's Meta/Size announced
    format: str | None
    type: str | None


def _frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True, slots=True)
class SessionState:
    """One device's OMA-DM session between two of its messages."""

    session_id: str
    last_msg_id: int  # the device's last MsgID
    next_msg_id: int  # the server's next MsgID
    max_msg_size: int  # the device's MaxMsgSize in force
    # "msgid:cmdid" of every command sent in this session: each Status and
    # Results is mapped to the command it answers, inside Atomic too.
    refs: Mapping[str, SentRef] = field(default_factory=lambda: MappingProxyType({}))
    # Queued commands sent in this session (each at most once: one left
    # unanswered is sent again in the next session, one answered never).
    sent: frozenset[str] = frozenset()
    # "msgid:cmdid" keys answered in this session (a duplicate is ignored).
    done: frozenset[str] = frozenset()
    request_digest: str = ""  # of the device's last message, to spot a retransmission
    ended: bool = False  # the last reply ended the session
    # The server's package is split over several messages and not finished:
    # the device's Alert 1222 asks for its next message (OMA-DM 1.2,
    # multiple messages in package; MS-MDM 2.2.3.4).
    package_open: bool = False
    # Large objects being received, by "msgref:cmdref:item index".
    objects: Mapping[str, LargeObject] = field(default_factory=lambda: MappingProxyType({}))


def encode_session(state: SessionState) -> str:
    """The stored form of *state* (JSON, versioned)."""
    return json.dumps(
        {
            "v": SESSION_FORMAT,
            "sid": state.session_id,
            "last": state.last_msg_id,
            "out": state.next_msg_id,
            "max": state.max_msg_size,
            "refs": {k: [r.uuid, r.verb, r.top_level, r.loc_uri] for k, r in state.refs.items()},
            "sent": sorted(state.sent),
            "done": sorted(state.done),
            "req": state.request_digest,
            "end": state.ended,
            "more": state.package_open,
            "objects": {k: [o.uuid, o.received, o.size, o.format, o.type] for k, o in state.objects.items()},
        },
        separators=(",", ":"),
    )


def decode_session(text: str) -> SessionState:
    """Load a stored session, of this format or an older one.  ValueError
    for anything else."""
    try:
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError("not an object")
        version = raw.get("v", 1)
        refs = {
            k: SentRef(str(v[0]), str(v[1]), bool(v[2]), v[3] if len(v) > 3 else None)
            for k, v in raw.get("refs", {}).items()
        }
        if version == 1:
            # Version 1 kept each chunked object's data inline (moved to the
            # chunk table by schema migration 3); its size is the UTF-8 length.
            objects = {
                k: LargeObject(
                    uuid=refs[_ref_key_of_object(k)].uuid if _ref_key_of_object(k) in refs else "",
                    received=len(str(v.get("data", "")).encode("utf-8")),
                    size=v.get("size"),
                    format=v.get("format"),
                    type=v.get("type"),
                )
                for k, v in raw.get("chunks", {}).items()
            }
            package_open = False
        elif version == SESSION_FORMAT:
            objects = {
                k: LargeObject(str(v[0]), int(v[1]), v[2], v[3], v[4]) for k, v in raw["objects"].items()
            }
            package_open = bool(raw["more"])
        else:
            raise ValueError(f"unknown session format {version!r}")
        return SessionState(
            session_id=str(raw["sid"]),
            last_msg_id=int(raw["last"]),
            next_msg_id=int(raw["out"]),
            max_msg_size=int(raw["max"]),
            refs=_frozen(refs),
            sent=frozenset(str(u) for u in raw.get("sent", ())),
            done=frozenset(str(k) for k in raw.get("done", ())),
            request_digest=str(raw.get("req", "")),
            ended=bool(raw.get("end", False)),
            package_open=package_open,
            objects=_frozen(objects),
        )
    except (KeyError, TypeError, IndexError, AttributeError, json.JSONDecodeError) as e:
        raise ValueError(f"unreadable session state: {e!r}") from None


def _ref_key_of_object(key: str) -> str:
    msg_ref, cmd_ref, _ = key.split(":", 2)
    return f"{msg_ref}:{cmd_ref}"


@dataclass(frozen=True, slots=True)
class CompletedObject:
    """The last chunk of a large object arrived: the store joins the pieces
    it kept for *key* with ``result.data`` (the last piece) into one
    Results row."""

    key: str
    uuid: str
    result: CommandResult


@dataclass(frozen=True, slots=True)
class ManagementStep:
    """What one SyncML message changed; committed before the reply leaves."""

    device_id: str
    session: SessionState | None  # the session state to keep; None ends it
    reply: bytes = b""  # kept for a retransmission of this message
    inventory: Mapping[str, str] = field(default_factory=dict)
    alerts: tuple[AlertRecord, ...] = ()
    answered: tuple[tuple[str, int], ...] = ()  # (command uuid, top-level status code)
    results: tuple[tuple[str, CommandResult], ...] = ()
    sent: tuple[tuple[str, str, int], ...] = ()  # (command uuid, SessionID, server MsgID)
    failed: tuple[tuple[str, int], ...] = ()  # (command uuid, status) refused by the server
    unenroll: bool = False
    # Commands created while this message was processed (to be queued
    # before the ``sent`` marks apply).
    created: tuple[NewCommand, ...] = ()
    # Large objects: pieces to append, objects now complete, and objects
    # given up (too big, size mismatch).  new_session: chunks left over from
    # an earlier session are dropped.
    chunks: tuple[tuple[str, str], ...] = ()
    completed: tuple[CompletedObject, ...] = ()
    dropped: tuple[str, ...] = ()
    new_session: bool = False


class SessionError(Exception):
    """The message cannot be accepted in the device's session (replayed or
    out of order); answered with *status* on the SyncHdr, nothing stored."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Reply:
    body: bytes
    step: ManagementStep
    events: tuple[str, ...] = ()  # what happened, for the log
    commands_sent: int = 0
    session_ended: bool = False


def refusal(hdr: SyncHdr, status: int, *, server_url: str, msg_id: int = 1) -> bytes:
    """A reply that refuses the whole message: the SyncHdr status only."""
    reply = reply_header(hdr, msg_id, source=server_url)
    return build_message(reply, [hdr_status(hdr, status, "1")], final=True)


def digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def is_retransmission(message: SyncMLMessage, body: bytes, session: SessionState | None) -> bool:
    """The device sent its last message again (our reply was lost): it gets
    the same reply, and nothing changes."""
    return (
        session is not None
        and session.session_id == message.hdr.session_id
        and session.last_msg_id == message.hdr.msg_id
        and session.request_digest == digest(body)
    )


# --- one message ---


@dataclass
class _Work:
    """Accumulates what one message changes (local to one call)."""

    state: SessionState
    statuses: list[Status | Results] = field(default_factory=list)
    inventory: dict[str, str] = field(default_factory=dict)
    alerts: list[AlertRecord] = field(default_factory=list)
    answered: list[tuple[str, int]] = field(default_factory=list)
    results: list[tuple[str, CommandResult]] = field(default_factory=list)
    failed: list[tuple[str, int]] = field(default_factory=list)
    done: set[str] = field(default_factory=set)
    objects: dict[str, LargeObject] = field(default_factory=dict)
    chunks: list[tuple[str, str]] = field(default_factory=list)
    completed: list[CompletedObject] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    next_message: bool = False  # the device sent Alert 1222
    unenroll: bool = False
    abort: bool = False
    next_id: int = 1

    def cmd_id(self) -> str:
        value = str(self.next_id)
        self.next_id += 1
        return value


def process_message(
    message: SyncMLMessage,
    body: bytes,
    *,
    device_id: str,
    session: SessionState | None,
    queue: Sequence[QueuedCommand],
    server_url: str,
    default_max_msg_size: int,
    new_commands: Sequence[NewCommand] = (),
    followups: FollowUps | None = None,
    ends_session: Callable[[str, int], bool] | None = None,
) -> Reply:
    """Answer one device message that is not a retransmission (see
    :func:`is_retransmission`).  Raises :class:`SessionError` for a message
    that does not belong in the session (nothing must be stored then).

    *new_commands* go before the *queue*; *followups* is asked, for every
    command the device answered in this message, what to send next (sent
    before anything else).  Both end up in the step's ``created``.
    *ends_session* is asked the same of each answered command: True (the
    device accepted a wipe or its unenrollment) ends the session with this
    reply, statuses only, and forgets it."""
    hdr = message.hdr
    state, new_session = _session_for(message, session, default_max_msg_size)
    work = _Work(state, done=set(state.done), objects=dict(state.objects))
    work.statuses.append(hdr_status(hdr, _OK, work.cmd_id()))
    for element in message.body:
        if isinstance(element, Command):
            _client_command(element, hdr, work)
        elif isinstance(element, Status):
            _client_status(element, work)
        else:
            _client_results(element, hdr, work)

    leaving = ends_session is not None and any(ends_session(uuid, code) for uuid, code in work.answered)
    if leaving:
        work.events.append("the device accepted a command that ends its management; session ended")
    created: list[NewCommand] = []
    if followups is not None and not leaving:
        for uuid, code in work.answered:
            created += followups(uuid, code, [r for u, r in work.results if u == uuid])
    if not leaving:
        created += new_commands
    queue = [*(QueuedCommand(c.uuid, c.body) for c in created), *queue]

    reply_hdr = reply_header(hdr, state.next_msg_id, source=server_url)
    sent: list[tuple[str, str, int]] = []
    refs: dict[str, SentRef] = dict(state.refs)
    package_open = False
    session_ended = False
    if work.unenroll or work.abort or leaving:
        reply = build_message(reply_hdr, work.statuses, final=True)
        session_ended = True
    elif not message.final and not (work.next_message and state.package_open):
        # The device's package goes on (a large object in chunks, or more
        # statuses): ask for its next message.  No Final, and no new
        # commands: the package is not over (OMA-DM 1.2, multiple messages
        # in package).
        alert = Command(verb="Alert", cmd_id=work.cmd_id(), data=str(ALERT_NEXT_MESSAGE))
        reply = build_message(reply_hdr, [*work.statuses, alert], final=False)
    else:
        # The device's package is complete, or it asks for the next message
        # of ours (Alert 1222, with or without Final): send what is queued.
        reply, sent, package_open = _server_commands(reply_hdr, queue, work, refs)
        # Statuses only, and nothing more to come: the session is over.
        session_ended = not sent and not package_open

    next_state = replace(
        state,
        last_msg_id=hdr.msg_id,
        next_msg_id=state.next_msg_id + 1,
        refs=_frozen(refs),
        sent=state.sent | {uuid for uuid, _, _ in sent},
        done=frozenset(work.done),
        request_digest=digest(body),
        ended=session_ended,
        package_open=package_open,
        objects=_frozen(work.objects),
    )
    step = ManagementStep(
        device_id=device_id,
        session=None if work.unenroll or leaving else next_state,
        reply=reply,
        inventory=work.inventory,
        alerts=tuple(work.alerts),
        answered=tuple(work.answered),
        results=tuple(work.results),
        sent=tuple(sent),
        failed=tuple(work.failed),
        unenroll=work.unenroll,
        created=tuple(created),
        chunks=tuple(work.chunks),
        completed=tuple(work.completed),
        dropped=tuple(work.dropped),
        new_session=new_session,
    )
    return Reply(reply, step, tuple(work.events), len(sent), session_ended)


def _session_for(
    message: SyncMLMessage, session: SessionState | None, default_max: int
) -> tuple[SessionState, bool]:
    """The session state this message continues, or a new one (True)."""
    hdr = message.hdr
    max_size = hdr.meta.max_msg_size if hdr.meta is not None and hdr.meta.max_msg_size else None
    if (
        session is not None
        and session.session_id == hdr.session_id
        and hdr.msg_id == session.last_msg_id + 1
        and not session.ended
    ):
        return (session if max_size is None else replace(session, max_msg_size=max_size)), False
    if hdr.msg_id != 1:
        raise SessionError(
            _BAD_REQUEST,
            f"MsgID {hdr.msg_id} of SessionID {hdr.session_id} is out of order"
            + (
                f" (last MsgID {session.last_msg_id} of SessionID {session.session_id})"
                if session
                else " (no session)"
            ),
        )
    # MsgID 1: a new session.  SessionID is opaque (Windows sends 0 after a
    # reboot); only its format was checked by the parser (MS-MDM 2.2.3.8).
    return SessionState(hdr.session_id, 0, 1, max_size or default_max), True


def _client_command(cmd: Command, hdr: SyncHdr, work: _Work) -> None:
    code = _OK
    if cmd.error is not None:
        code = _BAD_REQUEST
        work.events.append(f"malformed {cmd.verb or 'command'}: {cmd.error}")
    elif cmd.verb == "Alert":
        code = _alert(cmd, work)
    elif cmd.verb == "Replace":
        # Package 1 reports ./DevInfo/* this way (MS-MDM 2.2.6.1).
        for item in cmd.items[:_MAX_INVENTORY_ITEMS]:
            uri = item.source or item.target
            if uri and item.data is not None:
                work.inventory[uri] = item.data[:_MAX_INVENTORY_VALUE]
    else:
        # The server does not serve Get/Add/Exec... from a device.
        code = _OPTIONAL_FEATURE
        work.events.append(f"device sent {cmd.verb} (CmdID {cmd.cmd_id}); answered {code}")
    work.statuses.append(status_for(cmd, hdr.msg_id, code, work.cmd_id()))


def _alert(cmd: Command, work: _Work) -> int:
    code = cmd.alert_code
    if code not in _KNOWN_ALERTS:
        work.events.append(f"unknown alert {cmd.data!r}")
        return _OPTIONAL_FEATURE
    if code == ALERT_NEXT_MESSAGE:
        work.next_message = True
    if code == ALERT_SESSION_ABORT:
        work.abort = True
        work.events.append("device aborted the session (Alert 1223)")
    if code in (ALERT_CLIENT_EVENT, ALERT_GENERIC):
        for item in cmd.items:
            meta = item.meta
            kind = meta.type if meta is not None else None
            work.alerts.append(
                AlertRecord(
                    code=str(code),
                    type=kind,
                    format=meta.format if meta is not None else None,
                    source=item.source,
                    data=None if item.data is None else item.data[:_MAX_INVENTORY_VALUE],
                )
            )
            if code == ALERT_GENERIC and kind == UNENROLL_USER_REQUEST_TYPE:
                # The user removed the work account: the device will not
                # call back, and its certificate must open nothing again.
                work.unenroll = True
                work.events.append("user-initiated unenrollment (Alert 1226)")
    return _OK


def _client_status(status: Status, work: _Work) -> None:
    if status.cmd_ref == "0":
        return  # the device's verdict on our SyncHdr
    key = f"{status.msg_ref}:{status.cmd_ref}"
    ref = work.state.refs.get(key) if status.msg_ref is not None else None
    code = status.code
    if ref is None or code is None:
        work.events.append(
            f"Status for a command never sent (MsgRef {status.msg_ref}, CmdRef {status.cmd_ref}) ignored"
        )
        return
    if code == _CHUNK_BUFFERED:
        return
    if key in work.done:
        work.events.append(f"duplicate Status for CmdRef {status.cmd_ref} ignored")
        return
    work.done.add(key)
    if ref.top_level:
        work.answered.append((ref.uuid, code))
    # Every status is kept, by CmdID: for Atomic/Sequence the inner ones say
    # which part failed.
    work.results.append(
        (
            ref.uuid,
            CommandResult(
                kind="status",
                cmd_id=status.cmd_ref,
                cmd=status.cmd or ref.verb,
                status=code,
                loc_uri=ref.loc_uri,
            ),
        )
    )


def _client_results(results: Results, hdr: SyncHdr, work: _Work) -> None:
    # An absent MsgRef means message 1 (MS-MDM 2.2.7.8).
    msg_ref = 1 if results.msg_ref is None else results.msg_ref
    ref = work.state.refs.get(f"{msg_ref}:{results.cmd_ref}")
    if ref is None:
        # Results for something this device was never sent in this session
        # (or another device's command): store nothing.
        work.events.append(
            f"Results for a command never sent (MsgRef {msg_ref}, CmdRef {results.cmd_ref}) ignored"
        )
        return
    # A Results gets no Status (OMA-DM 1.2 RepPro: Status is not sent for
    # Results; MS-MDM 4's example sends none), except what the large-object
    # rules require: 213 for a buffered chunk, then the outcome of the whole.
    code: int | None = None
    for index, item in enumerate(results.items):
        key = f"{msg_ref}:{results.cmd_ref}:{index}"
        pending = work.objects.get(key)
        if item.more_data or pending is not None:
            code = _large_object_chunk(results, item, key, pending, ref.uuid, work)
            continue
        meta = item.meta or results.meta
        result = _result(results, item, meta.format if meta else None, meta.type if meta else None, item.data)
        work.results.append((ref.uuid, result))
        _inventory_value(result, work)
    if code is not None:
        work.statuses.append(status_for(results, hdr.msg_id, code, work.cmd_id()))


def _inventory_value(result: CommandResult, work: _Work) -> None:
    """A value the server read from the device's DevInfo or DevDetail
    (its name after a rename, say) is kept as inventory too."""
    uri, data = result.loc_uri, result.data
    if (
        uri is None
        or data is None
        or result.format == "node"
        or not uri.startswith(_INVENTORY_ROOTS)
        or (uri not in work.inventory and len(work.inventory) >= _MAX_INVENTORY_ITEMS)
    ):
        return
    work.inventory[uri] = data[:_MAX_INVENTORY_VALUE]


def _large_object_chunk(
    results: Results, item: Item, key: str, pending: LargeObject | None, uuid: str, work: _Work
) -> int:
    piece = item.data or ""
    if pending is None:
        meta = item.meta
        pending = LargeObject(
            uuid=uuid,
            received=0,
            size=meta.size if meta is not None else None,
            format=meta.format if meta is not None else None,
            type=meta.type if meta is not None else None,
        )
    received = pending.received + len(piece.encode("utf-8"))
    if received > MAX_LARGE_OBJECT:
        work.objects.pop(key, None)
        work.dropped.append(key)
        work.events.append(f"large object for CmdRef {results.cmd_ref} over {MAX_LARGE_OBJECT} bytes")
        return _TOO_BIG
    if item.more_data:
        work.objects[key] = replace(pending, received=received)
        work.chunks.append((key, piece))
        return _CHUNK_BUFFERED
    work.objects.pop(key, None)
    if pending.size is not None and pending.size != received:
        work.dropped.append(key)
        work.events.append(
            f"large object for CmdRef {results.cmd_ref}: {received} bytes, Size said {pending.size}"
        )
        return _SIZE_MISMATCH
    work.completed.append(
        CompletedObject(key, uuid, _result(results, item, pending.format, pending.type, piece))
    )
    return _OK


def _result(
    results: Results, item: Item, fmt: str | None, kind: str | None, data: str | None
) -> CommandResult:
    return CommandResult(
        kind="results",
        cmd_id=results.cmd_ref,
        cmd=results.cmd,
        status=None,
        loc_uri=item.source or item.target,
        format=fmt,
        type=kind,
        data=data,
    )


def _candidates(queue: Iterable[QueuedCommand], work: _Work) -> list[tuple[QueuedCommand, Command]]:
    """The queued commands still to send in this session, parsed, with
    CmdIDs that follow the statuses'."""
    answered = {uuid for uuid, _ in work.answered}
    counter = work.next_id

    def next_id() -> str:
        nonlocal counter
        value = str(counter)
        counter += 1
        return value

    out: list[tuple[QueuedCommand, Command]] = []
    for record in queue:
        if record.uuid in work.state.sent or record.uuid in answered:
            continue
        try:
            (parsed,) = parse_commands_fragment(record.body)
        except ValueError as e:
            # Validated when queued; if it still does not parse, fail it
            # rather than block the queue behind it.
            work.failed.append((record.uuid, _BAD_REQUEST))
            work.events.append(f"command {record.uuid} unusable ({e}); marked failed")
            continue
        out.append((record, renumber(parsed, next_id)))
    return out


def _server_commands(
    reply_hdr: SyncHdr, queue: Sequence[QueuedCommand], work: _Work, refs: dict[str, SentRef]
) -> tuple[bytes, list[tuple[str, str, int]], bool]:
    """Pack the queued commands not yet sent in this session after the
    statuses, in queue order, within the device's MaxMsgSize.  Returns the
    message, the commands sent (recording their CmdIDs in *refs*), and
    whether more remain for this package (the message then has no Final)."""
    candidates = _candidates(queue, work)
    max_size = work.state.max_msg_size
    while True:
        commands = [cmd for _, cmd in candidates]
        reply, fitted = pack_body(reply_hdr, work.statuses, commands, max_msg_size=max_size)
        if fitted or not candidates or len(reply) > max_size:
            break
        # Nothing fitted after the statuses.  If the first command fits a
        # message of its own, the statuses took the room: send them now
        # without Final, and the device asks for the rest (Alert 1222).
        _, fits_alone = pack_body(
            reply_hdr, work.statuses[:1], commands[:1], max_msg_size=max_size, final_if_all=False
        )
        if fits_alone:
            break
        # It can never be delivered within the device's MaxMsgSize: fail it
        # and go on with the next (one bad command must not block the queue).
        record, _ = candidates.pop(0)
        work.failed.append((record.uuid, _TOO_BIG))
        work.events.append(f"command {record.uuid} larger than MaxMsgSize {max_size}; marked failed")

    sent: list[tuple[str, str, int]] = []
    for record, cmd in candidates[:fitted]:
        sent.append((record.uuid, reply_hdr.session_id, reply_hdr.msg_id))
        for inner in walk(cmd):
            target = inner.items[0].target if inner.items else None
            refs[f"{reply_hdr.msg_id}:{inner.cmd_id}"] = SentRef(
                record.uuid, inner.verb, inner is cmd, target
            )
    return reply, sent, fitted < len(candidates)
