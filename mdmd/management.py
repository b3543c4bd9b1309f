"""OMA-DM management sessions (MS-MDM, OMA-DM 1.2), pure: one device
message in, the reply and what to store out.  No I/O; the twisted.web
adapter is :mod:`mdmd.management_endpoint`.

A session is the exchange that starts with the device's package 1 (MsgID 1,
``Alert 1201``) and ends with a server message that carries statuses only
(MS-MDM 2.2.6.1).  Its state, kept per device between messages:

- ``sid``: SessionID; ``last``: the device's last MsgID; ``out``: the server's
  next MsgID; ``max``: the MaxMsgSize in force;
- ``refs``: for every command sent in this session, ``"msgid:cmdid"`` ->
  ``[command uuid, verb, is-top-level]``, so each Status and Results is
  mapped to the command it answers, inside Atomic too (LESSONS);
- ``sent`` / ``done``: commands sent / answered in this session: a command is
  sent at most once per session (sessions end), and one left unanswered is
  sent again in the next session; one answered is never sent again;
- ``chunks``: large-object Results being reassembled (``MoreData``);
- ``req`` / ``rep``: digest of the last device message and the reply to it,
  so a retransmission (the reply was lost) gets the same reply, idempotently.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mdmd.store import AlertRecord, CommandRecord, CommandResult, ManagementStep
from mdmd.syncml import (
    ALERT_CLIENT_EVENT,
    ALERT_CLIENT_INITIATED_MGMT,
    ALERT_GENERIC,
    ALERT_NEXT_MESSAGE,
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

__all__ = ["Reply", "SessionError", "process_message", "refusal"]

_KNOWN_ALERTS = {
    ALERT_SERVER_INITIATED_MGMT,
    ALERT_CLIENT_INITIATED_MGMT,
    ALERT_NEXT_MESSAGE,
    ALERT_SESSION_ABORT,
    ALERT_CLIENT_EVENT,
    1225,  # NO END OF DATA: the device gave up on a large object
    ALERT_GENERIC,
}
# Inventory the device reports by Replace in package 1 is kept, bounded.
_MAX_INVENTORY_ITEMS = 64
_MAX_INVENTORY_VALUE = 4096
# A large object the device uploads in chunks is reassembled up to this size.
_MAX_LARGE_OBJECT = 16 * 1024 * 1024
# Status codes (OMA-DM RepPro 1.2 §10, MS-MDM).
_OK, _CHUNK_BUFFERED, _BAD_REQUEST, _NOT_FOUND = 200, 213, 400, 404
_NOT_ALLOWED, _OPTIONAL_FEATURE, _SIZE_MISMATCH, _TOO_BIG = 405, 406, 424, 416


class SessionError(Exception):
    """The message cannot be accepted in the device's session (replayed or
    out of order); answered with *status* on the SyncHdr, nothing stored."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Reply:
    body: bytes
    step: ManagementStep | None  # None: nothing to store (a replayed message)
    events: tuple[str, ...] = ()  # what happened, for the log
    commands_sent: int = 0
    session_ended: bool = False


@dataclass
class _Work:
    """Accumulates what one message changes."""

    statuses: list[Status | Results] = field(default_factory=list)
    inventory: dict[str, str] = field(default_factory=dict)
    alerts: list[AlertRecord] = field(default_factory=list)
    answered: list[tuple[str, int]] = field(default_factory=list)
    results: list[tuple[str, CommandResult]] = field(default_factory=list)
    failed: list[tuple[str, int]] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    unenroll: bool = False
    abort: bool = False
    next_id: int = 1

    def cmd_id(self) -> str:
        value = str(self.next_id)
        self.next_id += 1
        return value


def refusal(hdr: SyncHdr, status: int, *, server_url: str, msg_id: int = 1) -> bytes:
    """A reply that refuses the whole message: the SyncHdr status only."""
    reply = reply_header(hdr, msg_id, source=server_url)
    return build_message(reply, [hdr_status(hdr, status, "1")], final=True)


def digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def process_message(
    message: SyncMLMessage,
    body: bytes,
    *,
    device_id: str,
    session: dict[str, Any] | None,
    queue: Sequence[CommandRecord],
    server_url: str,
    default_max_msg_size: int,
) -> Reply:
    """Answer one device message.  Raises :class:`SessionError` for a message
    that does not belong in the session (nothing must be stored then)."""
    hdr = message.hdr
    state = _session_for(message, body, session, default_max_msg_size)
    if isinstance(state, Reply):
        return state

    work = _Work()
    work.statuses.append(hdr_status(hdr, _OK, work.cmd_id()))
    for element in message.body:
        if isinstance(element, Command):
            _client_command(element, hdr, work)
        elif isinstance(element, Status):
            _client_status(element, state, work)
        else:
            _client_results(element, hdr, state, work)

    out_id = int(state["out"])
    reply_hdr = reply_header(hdr, out_id, source=server_url)
    sent: list[tuple[str, str, int]] = []
    session_ended = False
    if work.unenroll or work.abort:
        reply = build_message(reply_hdr, work.statuses, final=True)
        session_ended = True
    elif not message.final:
        # The device's package continues (a large object, or more
        # statuses): ask for its next message, send no new commands.
        alert = Command(verb="Alert", cmd_id=work.cmd_id(), data=str(ALERT_NEXT_MESSAGE))
        reply = build_message(reply_hdr, [*work.statuses, alert], final=True)
    else:
        reply, sent, more = _server_commands(reply_hdr, queue, state, work)
        # Statuses only, and nothing more to come: the session is over.
        session_ended = not sent and not more

    state["out"] = out_id + 1
    state["last"] = hdr.msg_id
    state["req"] = digest(body)
    state["rep"] = base64.b64encode(reply).decode("ascii")
    state["end"] = session_ended
    step = ManagementStep(
        device_id=device_id,
        session=None if work.unenroll else state,
        inventory=work.inventory,
        alerts=tuple(work.alerts),
        answered=tuple(work.answered),
        results=tuple(work.results),
        sent=tuple(sent),
        failed=tuple(work.failed),
        unenroll=work.unenroll,
    )
    return Reply(reply, step, tuple(work.events), len(sent), session_ended)


def _session_for(
    message: SyncMLMessage, body: bytes, session: dict[str, Any] | None, default_max: int
) -> dict[str, Any] | Reply:
    """The session state this message continues or starts, or the stored
    reply when the message is a retransmission of the last one."""
    hdr = message.hdr
    if session is not None and session.get("sid") == hdr.session_id:
        if hdr.msg_id == session.get("last") and session.get("req") == digest(body):
            # The device did not get our reply and sent the same message
            # again: same answer, nothing changes.
            return Reply(base64.b64decode(session["rep"]), None, ("retransmission answered again",))
        if hdr.msg_id == int(session.get("last", 0)) + 1 and not session.get("end"):
            state = dict(session)
            if hdr.meta is not None and hdr.meta.max_msg_size:
                state["max"] = hdr.meta.max_msg_size
            return state
    if hdr.msg_id != 1:
        raise SessionError(
            _BAD_REQUEST,
            f"MsgID {hdr.msg_id} of SessionID {hdr.session_id} is out of order"
            + (
                f" (last MsgID {session.get('last')} of SessionID {session.get('sid')})"
                if session
                else " (no session)"
            ),
        )
    # MsgID 1: a new session.  SessionID is opaque (0 is legal after a
    # reboot, LESSONS); only its format was checked by the parser.
    max_size = hdr.meta.max_msg_size if hdr.meta is not None and hdr.meta.max_msg_size else default_max
    return {"sid": hdr.session_id, "last": 0, "out": 1, "max": max_size, "refs": {}, "sent": [], "done": []}


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


def _ref(state: dict[str, Any], msg_ref: int | None, cmd_ref: str) -> list[Any] | None:
    if msg_ref is None:
        return None
    found = state["refs"].get(f"{msg_ref}:{cmd_ref}")
    return found if isinstance(found, list) else None


def _client_status(status: Status, state: dict[str, Any], work: _Work) -> None:
    if status.cmd_ref == "0":
        return  # the device's verdict on our SyncHdr
    ref = _ref(state, status.msg_ref, status.cmd_ref)
    code = status.code
    if ref is None or code is None:
        work.events.append(
            f"Status for a command never sent (MsgRef {status.msg_ref}, CmdRef {status.cmd_ref}) ignored"
        )
        return
    uuid, verb, top = ref
    if code == _CHUNK_BUFFERED:
        return
    key = f"{status.msg_ref}:{status.cmd_ref}"
    if key in state["done"]:
        work.events.append(f"duplicate Status for CmdRef {status.cmd_ref} ignored")
        return
    state["done"].append(key)
    if top:
        work.answered.append((uuid, code))
    # Every status is kept, by CmdID: for Atomic/Sequence the inner ones say
    # which part failed.
    work.results.append(
        (uuid, CommandResult(kind="status", cmd_id=status.cmd_ref, cmd=status.cmd or verb, status=code))
    )


def _client_results(results: Results, hdr: SyncHdr, state: dict[str, Any], work: _Work) -> None:
    ref = _ref(state, results.msg_ref, results.cmd_ref)
    if ref is None:
        # Results for something this device was never sent in this session
        # (or another device's command): refuse, store nothing.
        work.events.append(
            f"Results for a command never sent (MsgRef {results.msg_ref}, CmdRef {results.cmd_ref}) refused"
        )
        work.statuses.append(status_for(results, hdr.msg_id, _NOT_FOUND, work.cmd_id()))
        return
    uuid = ref[0]
    code = _OK
    chunks: dict[str, Any] = state.setdefault("chunks", {})
    for index, item in enumerate(results.items):
        key = f"{results.msg_ref}:{results.cmd_ref}:{index}"
        pending = chunks.get(key)
        data = item.data or ""
        if item.more_data or pending is not None:
            if pending is None:
                size = item.meta.size if item.meta is not None else None
                pending = chunks[key] = {
                    "data": "",
                    "size": size,
                    "format": item.meta.format if item.meta else None,
                    "type": item.meta.type if item.meta else None,
                }
            pending["data"] += data
            if len(pending["data"]) > _MAX_LARGE_OBJECT:
                del chunks[key]
                code = _TOO_BIG
                work.events.append(
                    f"large object for CmdRef {results.cmd_ref} over {_MAX_LARGE_OBJECT} bytes"
                )
                continue
            if item.more_data:
                code = _CHUNK_BUFFERED
                continue
            del chunks[key]
            assembled = pending["data"]
            declared = pending.get("size")
            if declared is not None and declared != len(assembled.encode("utf-8")):
                code = _SIZE_MISMATCH
                work.events.append(
                    f"large object for CmdRef {results.cmd_ref}: {len(assembled)} bytes, Size said {declared}"
                )
                continue
            work.results.append(
                (uuid, _result(results, item, pending.get("format"), pending.get("type"), assembled))
            )
            continue
        meta = item.meta or results.meta
        work.results.append(
            (
                uuid,
                _result(results, item, meta.format if meta else None, meta.type if meta else None, item.data),
            )
        )
    work.statuses.append(status_for(results, hdr.msg_id, code, work.cmd_id()))


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


def _server_commands(
    reply_hdr: SyncHdr, queue: Sequence[CommandRecord], state: dict[str, Any], work: _Work
) -> tuple[bytes, list[tuple[str, str, int]], bool]:
    """Pack the queued commands not yet sent in this session after the
    statuses, in queue order, within the device's MaxMsgSize.  Returns the
    message, the commands sent, and whether more remain for this package."""
    answered = {uuid for uuid, _ in work.answered}
    already = set(state["sent"])
    candidates: list[tuple[CommandRecord, Command]] = []
    counter = work.next_id
    for record in queue:
        if record.uuid in already or record.uuid in answered:
            continue
        try:
            (parsed,) = parse_commands_fragment(record.body)
        except ValueError as e:
            # Validated when queued; if it still does not parse, fail it
            # rather than block the queue behind it (LESSONS: no poison).
            work.failed.append((record.uuid, _BAD_REQUEST))
            work.events.append(f"command {record.uuid} unusable ({e}); marked failed")
            continue

        def next_id() -> str:
            nonlocal counter
            value = str(counter)
            counter += 1
            return value

        candidates.append((record, renumber(parsed, next_id)))

    max_size = int(state["max"])
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
        # It can never be delivered within the device's MaxMsgSize: fail
        # it and go on with the next (LESSONS: no poison commands).
        record, _ = candidates.pop(0)
        work.failed.append((record.uuid, _TOO_BIG))
        work.events.append(f"command {record.uuid} larger than MaxMsgSize {max_size}; marked failed")

    sent: list[tuple[str, str, int]] = []
    for record, cmd in candidates[:fitted]:
        sent.append((record.uuid, reply_hdr.session_id, reply_hdr.msg_id))
        state["sent"].append(record.uuid)
        for inner in walk(cmd):
            state["refs"][f"{reply_hdr.msg_id}:{inner.cmd_id}"] = [
                record.uuid,
                inner.verb,
                inner is cmd,
            ]
    return reply, sent, fitted < len(candidates)
