"""OMA-DM session logic (mdmd.management), without sockets: device messages in,
replies and store steps out."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from mdmd.management import (
    CommandResult,
    QueuedCommand,
    Reply,
    SessionError,
    SessionState,
    decode_session,
    encode_session,
    is_retransmission,
    process_message,
)
from mdmd.syncml import (
    Command,
    Item,
    Meta,
    Results,
    Status,
    SyncHdr,
    SyncMLMessage,
    build_message,
    parse_message,
)

SERVER = "https://mdm.example.com/api/mdm/microsoft/management"
DEVICE = "B5B954E81FBCB94EB79BD08BE625F4EE"
GET_SWV = "<Get><Item><Target><LocURI>./DevDetail/SwV</LocURI></Target></Item></Get>"


def _queued(uuid: str, body: str = GET_SWV) -> QueuedCommand:
    return QueuedCommand(uuid=uuid, body=body)


def _hdr(session: str, msg: int, max_msg_size: int | None = None) -> SyncHdr:
    meta = Meta(max_msg_size=max_msg_size) if max_msg_size else None
    return SyncHdr("1.2", "DM/1.2", session, msg, SERVER, DEVICE, meta=meta)


def _start(session: str = "1", max_msg_size: int | None = None) -> bytes:
    return build_message(
        _hdr(session, 1, max_msg_size),
        [
            Command("Alert", "2", data="1201"),
            Command(
                "Alert",
                "3",
                data="1224",
                items=(Item(meta=Meta(type="com.microsoft/MDM/LoginStatus"), data="user"),),
            ),
            Command(
                "Replace",
                "4",
                items=(Item(source="./DevInfo/DevId", data=DEVICE), Item(source="./DevInfo/Mod", data="VM")),
            ),
        ],
        final=True,
    )


class Device:
    """Drives process_message like the endpoint does, and keeps what the
    store would keep: the session (through its stored form), the last
    reply, the pieces of large objects, the answers."""

    def __init__(self, queue: list[QueuedCommand] | None = None, default_max: int = 512 * 1024) -> None:
        self.session: SessionState | None = None
        self.queue = queue or []
        self.default_max = default_max
        self.acked: dict[str, int] = {}
        self.results: list[tuple[str, CommandResult]] = []
        self.last_reply = b""
        self.pieces: dict[str, list[str]] = {}

    def send(self, body: bytes) -> Reply:
        reply = process_message(
            parse_message(body),
            body,
            device_id=DEVICE,
            session=self.session,
            queue=[c for c in self.queue if c.uuid not in self.acked],
            server_url=SERVER,
            default_max_msg_size=self.default_max,
        )
        step = reply.step
        # What the store does with the step.
        self.session = None if step.session is None else decode_session(encode_session(step.session))
        self.last_reply = step.reply
        for uuid, code in step.answered + step.failed:
            self.acked[uuid] = code
        if step.new_session:
            self.pieces.clear()
        for key in step.dropped:
            self.pieces.pop(key, None)
        for key, piece in step.chunks:
            self.pieces.setdefault(key, []).append(piece)
        self.results += step.results
        for done in step.completed:
            whole = "".join(self.pieces.pop(done.key, [])) + (done.result.data or "")
            self.results.append((done.uuid, replace(done.result, data=whole)))
        return reply


def _server(reply: Reply) -> SyncMLMessage:
    return parse_message(reply.body)


def _answer(
    server: SyncMLMessage, session: str, msg: int, *, results: bool = True, final: bool = True
) -> bytes:
    """The device's statuses (and Results for Gets) for every server command."""
    body: list[Command | Status | Results] = [
        Status("1", server.hdr.msg_id, "0", "SyncHdr", "200"),
    ]
    n = 2
    for cmd in server.commands:
        for inner in [cmd, *cmd.children]:
            body.append(Status(str(n), server.hdr.msg_id, inner.cmd_id, inner.verb, "200"))
            n += 1
            if inner.verb == "Get" and results:
                body.append(
                    Results(
                        str(n),
                        server.hdr.msg_id,
                        inner.cmd_id,
                        "Get",
                        items=(Item(source=inner.items[0].target, meta=Meta(format="chr"), data="10.0.1"),),
                    )
                )
                n += 1
    if not server.final:
        body.append(Command("Alert", str(n), data="1222"))
    return build_message(_hdr(session, msg), body, final=final)


def _fixture(windows_fixtures: Path, name: str) -> bytes:
    text = (windows_fixtures / name).read_text()
    return text.replace("{{SERVER_URL}}", "https://mdm.example.com").replace("{{DEVICE_ID}}", DEVICE).encode()


def test_windows_session_start_is_answered_and_inventory_stored(windows_fixtures: Path) -> None:
    reply = Device().send(_fixture(windows_fixtures, "syncml-session-start.xml"))
    server = _server(reply)
    assert server.hdr.session_id == "1" and server.hdr.msg_id == 1
    assert (server.hdr.target, server.hdr.source) == (DEVICE, SERVER)
    refs = [(s.cmd_ref, s.cmd, s.data) for s in server.statuses]
    # SyncHdr first, then every client command in order (MS-MDM 2.2.6.1).
    assert refs == [
        ("0", "SyncHdr", "200"),
        ("2", "Alert", "200"),
        ("3", "Alert", "200"),
        ("4", "Replace", "200"),
    ]
    assert len({s.cmd_id for s in server.statuses}) == len(server.statuses)
    assert server.final and not server.commands
    assert reply.session_ended
    assert reply.step is not None
    assert reply.step.inventory["./DevInfo/Mod"] == "VMware7,1"
    assert reply.step.inventory["./DevInfo/DevId"] == DEVICE
    assert [(a.code, a.type, a.data) for a in reply.step.alerts] == [
        ("1224", "com.microsoft/MDM/LoginStatus", "user")
    ]


def test_real_windows_10_messages(windows_fixtures: Path) -> None:
    device_id = "B5B954E81FBCB94EB79BD08BE625F4EE"
    body = (windows_fixtures / "real-w10-19043-syncml-session-start.xml").read_bytes()
    message = parse_message(body)
    assert message.hdr.source == device_id
    reply = process_message(
        message,
        body,
        device_id=device_id,
        session=None,
        queue=[],
        server_url=SERVER,
        default_max_msg_size=65536,
    )
    assert reply.step is not None and not reply.step.unenroll
    unenroll = (windows_fixtures / "real-w10-19043-syncml-user-unenroll.xml").read_bytes()
    reply = process_message(
        parse_message(unenroll),
        unenroll,
        device_id=device_id,
        session=None,
        queue=[],
        server_url=SERVER,
        default_max_msg_size=65536,
    )
    assert reply.step is not None and reply.step.unenroll and reply.step.session is None
    assert ("1226", "com.microsoft:mdm.unenrollment.userrequest") in [
        (a.code, a.type) for a in reply.step.alerts
    ]
    statuses = _server(reply).statuses
    assert [s.cmd_ref for s in statuses] == ["0", "2", "3", "4", "5"]


def test_queued_commands_go_out_and_their_answers_come_back() -> None:
    device = Device(
        [
            _queued("a"),
            _queued(
                "b",
                "<Replace><Item><Target><LocURI>./Vendor/MSFT/X</LocURI></Target>"
                "<Meta><Format xmlns='syncml:metinf'>int</Format></Meta><Data>1</Data></Item></Replace>",
            ),
        ]
    )
    first = device.send(_start())
    server = _server(first)
    assert [c.verb for c in server.commands] == ["Get", "Replace"]
    ids = [s.cmd_id for s in server.statuses] + [c.cmd_id for c in server.commands]
    assert len(ids) == len(set(ids)) and "0" not in ids
    assert first.step is not None and [u for u, _, _ in first.step.sent] == ["a", "b"]
    assert not first.session_ended

    second = device.send(_answer(server, "1", 2))
    assert second.step is not None
    assert sorted(second.step.answered) == [("a", 200), ("b", 200)]
    results = [(u, r.kind, r.loc_uri, r.data) for u, r in second.step.results if r.kind == "results"]
    assert results == [("a", "results", "./DevDetail/SwV", "10.0.1")]
    closing = _server(second)
    # Statuses only: the session ends.  A Results gets no Status (OMA-DM
    # RepPro 1.2; MS-MDM 4's example sends none).
    assert not closing.commands and closing.final and second.session_ended
    assert [s.cmd for s in closing.statuses] == ["SyncHdr"]


def test_atomic_children_statuses_are_kept_by_cmdid() -> None:
    atomic = (
        "<Atomic><Replace><Item><Target><LocURI>./Vendor/MSFT/A</LocURI></Target><Data>1</Data></Item></Replace>"
        "<Replace><Item><Target><LocURI>./Vendor/MSFT/B</LocURI></Target><Data>2</Data></Item></Replace></Atomic>"
    )
    device = Device([_queued("atom", atomic)])
    server = _server(device.send(_start()))
    (sent,) = server.commands
    child_ids = [c.cmd_id for c in sent.children]
    reply = device.send(_answer(server, "1", 2))
    assert reply.step is not None and reply.step.answered == (("atom", 200),)
    kept = {(r.cmd_id, r.cmd) for _, r in reply.step.results}
    assert kept == {(sent.cmd_id, "Atomic"), (child_ids[0], "Replace"), (child_ids[1], "Replace")}


def test_small_max_msg_size_splits_the_package_and_delivers_each_command_once() -> None:
    queue = [_queued(f"c{i}") for i in range(8)]
    device = Device(queue)
    limit = 900
    reply = device.send(_start(max_msg_size=limit))
    delivered: list[str] = []
    msg = 1
    while True:
        assert len(reply.body) <= limit
        assert reply.step is not None
        delivered += [u for u, _, _ in reply.step.sent]
        server = _server(reply)
        if not server.commands and server.final:
            break
        msg += 1
        reply = device.send(_answer(server, "1", msg))
    assert sorted(delivered) == sorted(c.uuid for c in queue)
    assert len(delivered) == len(set(delivered))
    assert device.acked == {c.uuid: 200 for c in queue}
    assert msg > 3  # it really took several messages


def test_a_command_that_can_never_fit_fails_and_does_not_block_the_queue() -> None:
    huge = (
        "<Replace><Item><Target><LocURI>./Vendor/MSFT/Big</LocURI></Target><Data>"
        + "x" * 5000
        + "</Data></Item></Replace>"
    )
    device = Device([_queued("big", huge), _queued("small")])
    reply = device.send(_start(max_msg_size=2000))
    assert reply.step is not None
    assert reply.step.failed == (("big", 416),)
    assert [u for u, _, _ in reply.step.sent] == ["small"]


def test_a_retransmitted_message_is_recognised_and_its_reply_kept() -> None:
    device = Device([_queued("a")])
    start = _start()
    first = device.send(start)
    assert first.step.reply == first.body
    assert is_retransmission(parse_message(start), start, device.session)
    # A different message with the same MsgID is not a retransmission.
    other = _start(max_msg_size=4000)
    assert not is_retransmission(parse_message(other), other, device.session)


@pytest.mark.parametrize("msg_id", [3, 5])
def test_out_of_order_msgid_is_refused(msg_id: int) -> None:
    device = Device([_queued("a")])
    server = _server(device.send(_start()))
    body = _answer(server, "1", msg_id)
    with pytest.raises(SessionError, match="out of order"):
        device.send(body)


def test_a_session_cannot_start_mid_way() -> None:
    with pytest.raises(SessionError):
        Device().send(build_message(_hdr("7", 2), [Command("Alert", "2", data="1201")], final=True))


def test_session_id_zero_is_legal() -> None:
    reply = Device().send(_start(session="0"))
    assert _server(reply).hdr.session_id == "0"


def test_unanswered_commands_are_sent_again_in_the_next_session_only() -> None:
    device = Device([_queued("a"), _queued("b")])
    server = _server(device.send(_start(session="1")))
    assert len(server.commands) == 2
    # The device answers only "a", then the connection breaks.
    partial = build_message(
        _hdr("1", 2),
        [Status("1", 1, "0", "SyncHdr", "200"), Status("2", 1, server.commands[0].cmd_id, "Get", "200")],
        final=True,
    )
    reply = device.send(partial)
    assert reply.step is not None and reply.step.answered == (("a", 200),)
    # Not sent twice within the session: statuses only, session over.
    assert not _server(reply).commands and reply.session_ended
    again = _server(device.send(_start(session="2")))
    assert [c.items[0].target for c in again.commands] == ["./DevDetail/SwV"]
    assert device.session is not None and device.session.sent == {"b"}


def test_status_for_a_command_never_sent_is_ignored() -> None:
    device = Device()
    server = _server(device.send(_start()))
    assert not server.commands
    assert device.session is not None
    device.session = replace(device.session, ended=False)
    forged = build_message(
        _hdr("1", 2),
        [
            Status("1", 1, "0", "SyncHdr", "200"),
            Status("2", 1, "77", "Get", "200"),
            Results("3", 1, "77", "Get", items=(Item(source="./X", data="stolen"),)),
        ],
        final=True,
    )
    reply = device.send(forged)
    assert reply.step is not None and reply.step.answered == () and reply.step.results == ()
    assert [s.cmd for s in _server(reply).statuses] == ["SyncHdr"]
    assert sum("never sent" in e for e in reply.events) == 2


def test_device_commands_the_server_does_not_serve_get_406_and_malformed_400() -> None:
    body = (
        f'<SyncML xmlns="SYNCML:SYNCML1.2"><SyncHdr><VerDTD>1.2</VerDTD><VerProto>DM/1.2</VerProto>'
        f"<SessionID>1</SessionID><MsgID>1</MsgID><Target><LocURI>{SERVER}</LocURI></Target>"
        f"<Source><LocURI>{DEVICE}</LocURI></Source></SyncHdr><SyncBody>"
        "<Alert><CmdID>2</CmdID><Data>1201</Data></Alert>"
        "<Get><CmdID>3</CmdID><Item><Target><LocURI>./X</LocURI></Target></Item></Get>"
        "<Copy><CmdID>4</CmdID><Item><Target><LocURI>./X</LocURI></Target></Item></Copy>"
        "<Replace><Item><Source><LocURI>./DevInfo/Man</LocURI></Source><Data>x</Data></Item></Replace>"
        "<Final/></SyncBody></SyncML>"
    ).encode()
    reply = Device().send(body)
    codes = [(s.cmd_ref, s.data) for s in _server(reply).statuses]
    assert codes == [("0", "200"), ("2", "200"), ("3", "406"), ("4", "406"), ("", "400")]
    assert reply.step is not None and reply.step.inventory == {}


def test_a_device_package_without_final_is_asked_to_continue() -> None:
    device = Device([_queued("a")])
    start = build_message(_hdr("1", 1), [Command("Alert", "2", data="1201")], final=False)
    server = _server(device.send(start))
    assert not [c for c in server.commands if c.verb != "Alert"]
    assert [c.data for c in server.commands] == ["1222"]


def test_large_object_results_are_reassembled() -> None:
    device = Device([_queued("a")])
    server = _server(device.send(_start()))
    get_id = server.commands[0].cmd_id
    whole = "0123456789" * 30
    first = build_message(
        _hdr("1", 2),
        [
            Status("1", 1, "0", "SyncHdr", "200"),
            Status("2", 1, get_id, "Get", "200"),
            Results(
                "3",
                1,
                get_id,
                "Get",
                items=(
                    Item(
                        source="./DevDetail/SwV",
                        meta=Meta(format="chr", size=len(whole)),
                        data=whole[:120],
                        more_data=True,
                    ),
                ),
            ),
        ],
        final=False,
    )
    reply = device.send(first)
    statuses = _server(reply).statuses
    assert [s.data for s in statuses if s.cmd == "Results"] == ["213"]
    assert reply.step is not None and [r for _, r in reply.step.results if r.kind == "results"] == []
    second = build_message(
        _hdr("1", 3),
        [
            Status("1", 2, "0", "SyncHdr", "200"),
            Results("2", 1, get_id, "Get", items=(Item(source="./DevDetail/SwV", data=whole[120:]),)),
        ],
        final=True,
    )
    reply = device.send(second)
    # The last chunk's Status says the whole object arrived.
    assert [s.data for s in _server(reply).statuses if s.cmd == "Results"] == ["200"]
    assert reply.step.chunks == () and [c.key for c in reply.step.completed] == [f"1:{get_id}:0"]
    assembled = [r.data for _, r in device.results if r.kind == "results"]
    assert assembled == [whole]


def test_a_queued_command_that_no_longer_parses_fails_without_blocking() -> None:
    device = Device([_queued("bad", "<Get><Item></Get>"), _queued("good")])
    reply = device.send(_start())
    assert reply.step is not None
    assert reply.step.failed == (("bad", 400),)
    assert [u for u, _, _ in reply.step.sent] == ["good"]


def test_a_split_package_continues_on_the_devices_1222_with_or_without_final() -> None:
    for device_final in (False, True):
        queue = [_queued(f"c{i}") for i in range(6)]
        device = Device(queue)
        first = device.send(_start(max_msg_size=1000))
        server = _server(first)
        assert not server.final and 0 < len(server.commands) < 6
        assert first.step.session is not None and first.step.session.package_open
        # Statuses and Alert 1222; Final only in the second round.
        second = device.send(_answer(server, "1", 2, results=False, final=device_final))
        more = _server(second)
        assert more.commands, "the rest of the package must follow in the same session"
        delivered = [u for u, _, _ in first.step.sent + second.step.sent]
        assert len(delivered) == len(set(delivered))
        msg = 2
        reply = second
        while not (_server(reply).final and not _server(reply).commands):
            msg += 1
            previous = _server(reply)
            # The device sends Final once the server's package is complete.
            reply = device.send(
                _answer(previous, "1", msg, results=False, final=device_final or previous.final)
            )
        assert device.acked == {c.uuid: 200 for c in queue}


def test_a_non_final_device_message_is_answered_without_final() -> None:
    device = Device([_queued("a")])
    start = build_message(_hdr("1", 1), [Command("Alert", "2", data="1201")], final=False)
    reply = device.send(start)
    server = _server(reply)
    assert not server.final and [c.data for c in server.commands] == ["1222"]
    assert reply.step.sent == () and not reply.session_ended


def test_an_answer_that_ends_the_enrollment_ends_the_session_with_statuses_only() -> None:
    wipe = _queued(
        "wipe",
        "<Exec><Item><Target><LocURI>./Device/Vendor/MSFT/RemoteWipe/doWipe</LocURI></Target></Item></Exec>",
    )
    device = Device([wipe, _queued("after")])
    first = process_message(
        parse_message(_start()),
        _start(),
        device_id=DEVICE,
        session=None,
        queue=[wipe],
        server_url=SERVER,
        default_max_msg_size=512 * 1024,
    )
    device.session = first.step.session
    server = _server(first)
    answer = _answer(server, "1", 2)
    reply = process_message(
        parse_message(answer),
        answer,
        device_id=DEVICE,
        session=device.session,
        queue=[_queued("after")],
        server_url=SERVER,
        default_max_msg_size=512 * 1024,
        new_commands=[],
        followups=lambda uuid, code, results: [],
        ends_session=lambda uuid, code: uuid == "wipe" and code == 200,
    )
    assert reply.step.answered == (("wipe", 200),)
    # Nothing more goes out, and the session is forgotten.
    assert not _server(reply).commands and _server(reply).final
    assert reply.session_ended and reply.step.session is None and not reply.step.sent


def test_values_read_from_devdetail_are_kept_as_inventory() -> None:
    name = "./DevDetail/Ext/Microsoft/DNSComputerName"
    device = Device(
        [
            _queued("n", f"<Get><Item><Target><LocURI>{name}</LocURI></Target></Item></Get>"),
            _queued("p", "<Get><Item><Target><LocURI>./Vendor/MSFT/Policy/X</LocURI></Target></Item></Get>"),
        ]
    )
    server = _server(device.send(_start()))
    reply = device.send(_answer(server, "1", 2))
    # _answer reads every Get as "10.0.1"; only the DevDetail value is inventory.
    assert reply.step.inventory == {name: "10.0.1"}
