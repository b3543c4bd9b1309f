"""Tests of mdmd.syncml: OMA-DM 1.2 / SyncML 1.2 parsing and building."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from lxml import etree

from mdmd import syncml
from mdmd.syncml import (
    Command,
    Cred,
    Item,
    Meta,
    Results,
    Status,
    SyncHdr,
    SyncMLError,
    build_message,
    check_locuri,
    hdr_status,
    id_counter,
    pack_body,
    parse_commands_fragment,
    parse_message,
    renumber,
    reply_header,
    status_for,
    walk,
)
from mdmd.xmlsafe import XMLInputError

NS = "SYNCML:SYNCML1.2"
METINF = "syncml:metinf"
DEVICE_ID = "B5B954E81FBCB94EB79BD08BE625F4EE"
SERVER_URL = "https://mdm.example.com:8443"
MGMT_URL = "https://mdm.example.com/ManagementServer/MDM.svc"

# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def fixture_bytes(folder: Path, name: str) -> bytes:
    text = (folder / name).read_text(encoding="utf-8")
    # Placeholders of the Fleet emulator samples (tests/data/windows/SOURCES.md).
    text = text.replace("{{SERVER_URL}}", SERVER_URL).replace("{{DEVICE_ID}}", DEVICE_ID)
    return text.encode("utf-8")


def message(body: str, *, hdr: str | None = None, root_ns: str = NS) -> bytes:
    if hdr is None:
        hdr = hdr_xml()
    return f'<SyncML xmlns="{root_ns}">{hdr}<SyncBody>{body}</SyncBody></SyncML>'.encode()


def hdr_xml(
    *,
    session: str = "1",
    msg: str = "1",
    ver_dtd: str = "1.2",
    ver_proto: str = "DM/1.2",
    extra: str = "",
) -> str:
    return (
        f"<SyncHdr><VerDTD>{ver_dtd}</VerDTD><VerProto>{ver_proto}</VerProto>"
        f"<SessionID>{session}</SessionID><MsgID>{msg}</MsgID>"
        f"<Target><LocURI>{MGMT_URL}</LocURI></Target>"
        f"<Source><LocURI>{DEVICE_ID}</LocURI></Source>{extra}</SyncHdr>"
    )


def server_hdr(msg_id: int = 1) -> SyncHdr:
    return SyncHdr(
        ver_dtd="1.2",
        ver_proto="DM/1.2",
        session_id="1A",
        msg_id=msg_id,
        target=DEVICE_ID,
        source=MGMT_URL,
    )


def replace_cmd(cmd_id: str, uri: str, value: str, fmt: str = "int") -> Command:
    return Command(
        verb="Replace",
        cmd_id=cmd_id,
        items=(Item(target=uri, meta=Meta(format=fmt), data=value),),
    )


def local(el: etree._Element) -> str:
    return etree.QName(el).localname


# Content models of the OMA SyncML RepPro 1.2 DTD and MetInf DTD, written out
# here independently of the module, to check the element order it emits.
# "*" stands for any command (Atomic/Sequence content).
DTD_ORDER: dict[str, list[str]] = {
    "SyncML": ["SyncHdr", "SyncBody"],
    "SyncHdr": [
        "VerDTD", "VerProto", "SessionID", "MsgID", "Target", "Source",
        "RespURI", "NoResp", "Cred", "Meta",
    ],
    "Status": [
        "CmdID", "MsgRef", "CmdRef", "Cmd", "TargetRef", "SourceRef", "Cred",
        "Chal", "Data", "Item",
    ],
    # Windows adds Cmd after CmdRef (MS-MDM 2.2.7.8).
    "Results": [
        "CmdID", "MsgRef", "CmdRef", "Cmd", "Meta", "TargetRef", "SourceRef", "Item",
    ],
    "Add": ["CmdID", "NoResp", "Cred", "Meta", "Item"],
    "Replace": ["CmdID", "NoResp", "Cred", "Meta", "Item"],
    "Delete": ["CmdID", "NoResp", "Archive", "SftDel", "Cred", "Meta", "Item"],
    "Get": ["CmdID", "NoResp", "Lang", "Cred", "Meta", "Item"],
    "Exec": ["CmdID", "NoResp", "Cred", "Meta", "Correlator", "Item"],
    "Alert": ["CmdID", "NoResp", "Cred", "Data", "Correlator", "Item"],
    "Atomic": ["CmdID", "NoResp", "Meta", "*"],
    "Sequence": ["CmdID", "NoResp", "Meta", "*"],
    "Item": ["Target", "Source", "SourceParent", "TargetParent", "Meta", "Data", "MoreData"],
    "Target": ["LocURI", "LocName", "Filter"],
    "Source": ["LocURI", "LocName"],
    "Cred": ["Meta", "Data"],
    "Chal": ["Meta"],
    "Meta": [
        "Format", "Type", "Mark", "Size", "Anchor", "Version", "NextNonce",
        "MaxMsgSize", "MaxObjSize", "EMI", "Mem",
    ],
}  # fmt: skip
COMMANDS = {"Add", "Alert", "Atomic", "Delete", "Exec", "Get", "Replace", "Sequence"}


def assert_dtd_order(root: etree._Element) -> int:
    """Assert every element's children follow DTD_ORDER; return how many
    elements were checked."""
    checked = 0
    for el in root.iter():
        name = local(el)
        order = DTD_ORDER.get(name)
        if name == "SyncBody":
            names = [local(c) for c in el]
            assert "Final" not in names[:-1], "Final must be the last SyncBody child"
            continue
        if order is None:
            continue
        slots = []
        for child in el:
            child_name = local(child)
            slot = "*" if (child_name in COMMANDS and "*" in order) else child_name
            assert slot in order, f"{child_name} is not allowed in {name}"
            slots.append(order.index(slot))
        assert slots == sorted(slots), f"{name} children out of DTD order: {[local(c) for c in el]}"
        checked += 1
    return checked


def full_example() -> tuple[SyncHdr, list[Command | Status | Results]]:
    """A message with every command kind and every optional field."""
    hdr = SyncHdr(
        ver_dtd="1.2",
        ver_proto="DM/1.2",
        session_id="0",
        msg_id=7,
        target=DEVICE_ID,
        source=MGMT_URL,
        meta=Meta(max_msg_size=65536, max_obj_size=4194304),
        cred=Cred(meta=Meta(format="b64", type="syncml:auth-md5"), data="c2VjcmV0"),
        resp_uri="https://mdm.example.com/next",
        no_resp=True,
    )
    body: list[Command | Status | Results] = [
        Status(cmd_id="1", msg_ref=3, cmd_ref="0", cmd="SyncHdr", data="200"),
        Status(
            cmd_id="2",
            msg_ref=3,
            cmd_ref="5",
            cmd="Replace",
            data="404",
            target_refs=("./Vendor/MSFT/A", "./Vendor/MSFT/B"),
            source_refs=("./DevInfo/Man",),
            items=(Item(data="detail"),),
            chal=Meta(format="b64", type="syncml:auth-md5", next_nonce="bm9uY2U="),
            original_error="0x86000002",
        ),
        Results(
            cmd_id="3",
            msg_ref=3,
            cmd_ref="6",
            cmd="Get",
            meta=Meta(format="chr"),
            target_ref="./DevDetail",
            source_ref="./DevDetail",
            items=(
                Item(source="./DevDetail/SwV", meta=Meta(format="chr"), data="10.0.19043.2364"),
                Item(source="./DevDetail/OEM", data="VMware, Inc."),
                Item(source="./DevDetail/Ext", meta=Meta(format="node"), data="Microsoft/Foo"),
            ),
        ),
        Command(
            verb="Alert",
            cmd_id="4",
            data="1226",
            items=(
                Item(
                    source="./Vendor/MSFT/X",
                    meta=Meta(type="com.example.alert", format="int", mark="critical"),
                    data="1",
                ),
            ),
        ),
        Command(verb="Alert", cmd_id="5", data="1222", no_resp=True),
        Command(
            verb="Add",
            cmd_id="6",
            meta=Meta(format="chr"),
            items=(Item(target="./Vendor/MSFT/Node/A", data="a"),),
        ),
        replace_cmd("7", "./Device/Vendor/MSFT/Policy/Config/Camera/AllowCamera", "0"),
        Command(
            verb="Delete",
            cmd_id="8",
            items=(Item(target="./Vendor/MSFT/Node/A"), Item(target="./Vendor/MSFT/Node/B")),
        ),
        Command(
            verb="Exec",
            cmd_id="9",
            items=(
                Item(
                    target="./Vendor/MSFT/DMClient/Provider/mdmd/Unenroll",
                    meta=Meta(format="chr", type="text/plain"),
                    data="mdmd",
                ),
            ),
        ),
        Command(verb="Get", cmd_id="10", items=(Item(target="./DevDetail/SwV"),)),
        Command(
            verb="Atomic",
            cmd_id="11",
            meta=Meta(type="text/plain"),
            children=(
                replace_cmd("12", "./Vendor/MSFT/A", "1"),
                Command(verb="Add", cmd_id="13", items=(Item(target="./Vendor/MSFT/B"),)),
                Command(verb="Delete", cmd_id="14", items=(Item(target="./Vendor/MSFT/C"),)),
            ),
        ),
        Command(
            verb="Sequence",
            cmd_id="15",
            no_resp=True,
            children=(
                Command(verb="Get", cmd_id="16", items=(Item(target="./DevDetail/SwV"),)),
                Command(
                    verb="Atomic",
                    cmd_id="17",
                    children=(replace_cmd("18", "./Vendor/MSFT/D", "2"),),
                ),
            ),
        ),
        # Large object chunk: Meta/Size on the first chunk, MoreData after Data.
        Command(
            verb="Replace",
            cmd_id="19",
            items=(
                Item(
                    target="./Vendor/MSFT/Big",
                    meta=Meta(format="b64", size=123456),
                    data="QUJD",
                    more_data=True,
                ),
            ),
        ),
    ]
    return hdr, body


# ---------------------------------------------------------------------------
# Real and emulated Windows messages
# ---------------------------------------------------------------------------

SESSION_START_FIXTURES = [
    "syncml-session-start.xml",
    "real-w10-19043-syncml-session-start.xml",
    "real-w10-19043-syncml-user-unenroll.xml",
]


@pytest.mark.parametrize("name", SESSION_START_FIXTURES)
def test_windows_session_start_parses(windows_fixtures: Path, name: str) -> None:
    msg = parse_message(fixture_bytes(windows_fixtures, name))

    assert msg.namespace == NS
    assert msg.final is True
    assert msg.hdr.ver_dtd == "1.2"
    assert msg.hdr.ver_proto == "DM/1.2"
    assert msg.hdr.msg_id == 1
    assert msg.hdr.source == DEVICE_ID
    assert msg.hdr.target.endswith(("/ManagementServer/MDM.svc", "/api/mdm/microsoft/management"))
    assert msg.hdr.meta is None and msg.hdr.cred is None
    assert msg.statuses == () and msg.results == ()
    assert all(cmd.error is None for cmd in msg.commands)

    alerts = [c for c in msg.commands if c.verb == "Alert"]
    assert [a.cmd_id for a in alerts[:2]] == ["2", "3"]
    assert alerts[0].alert_code == syncml.ALERT_CLIENT_INITIATED_MGMT
    assert alerts[0].items == ()
    login = alerts[1]
    assert login.alert_code == syncml.ALERT_CLIENT_EVENT
    assert login.items == (Item(meta=Meta(type=syncml.LOGIN_STATUS_TYPE), data="user"),)

    (replace,) = [c for c in msg.commands if c.verb == "Replace"]
    devinfo = {item.source: item.data for item in replace.items}
    assert devinfo == {
        "./DevInfo/DevId": DEVICE_ID,
        "./DevInfo/Man": "VMware, Inc.",
        "./DevInfo/Mod": "VMware7,1",
        "./DevInfo/DmV": "1.3",
        "./DevInfo/Lang": "en-US",
    }
    assert all(item.target is None and not item.more_data for item in replace.items)


def test_real_session_ids(windows_fixtures: Path) -> None:
    start = parse_message(fixture_bytes(windows_fixtures, "real-w10-19043-syncml-session-start.xml"))
    unenroll = parse_message(fixture_bytes(windows_fixtures, "real-w10-19043-syncml-user-unenroll.xml"))
    assert start.hdr.session_id == "1"
    assert unenroll.hdr.session_id == "2"
    assert start.hdr.target == "https://windows.fleetdm.ngrok.io/ManagementServer/MDM.svc"


def test_real_user_unenroll_alert(windows_fixtures: Path) -> None:
    msg = parse_message(fixture_bytes(windows_fixtures, "real-w10-19043-syncml-user-unenroll.xml"))
    verbs = [(c.verb, c.cmd_id, c.data) for c in msg.commands]
    assert verbs == [
        ("Alert", "2", "1201"),
        ("Alert", "3", "1224"),
        ("Alert", "4", "1226"),
        ("Replace", "5", None),
    ]
    unenroll = msg.commands[2]
    assert unenroll.alert_code == syncml.ALERT_GENERIC
    assert unenroll.items == (
        Item(meta=Meta(type=syncml.UNENROLL_USER_REQUEST_TYPE, format="int"), data="1"),
    )


def test_pretty_printed_and_wire_form_parse_the_same(windows_fixtures: Path) -> None:
    # The emulator sample is indented; the real capture is one line.  Values
    # are stripped, so both give the same commands.
    pretty = parse_message(fixture_bytes(windows_fixtures, "syncml-session-start.xml"))
    wire = parse_message(fixture_bytes(windows_fixtures, "real-w10-19043-syncml-session-start.xml"))
    assert pretty.body == wire.body


def test_reply_to_real_session_start(windows_fixtures: Path) -> None:
    client = parse_message(fixture_bytes(windows_fixtures, "real-w10-19043-syncml-session-start.xml"))
    hdr = reply_header(client.hdr, 1)
    ids = id_counter()
    statuses = [hdr_status(client.hdr, 200, ids())]
    statuses += [status_for(c, client.hdr.msg_id, 200, ids()) for c in client.commands]
    get = Command(verb="Get", cmd_id=ids(), items=(Item(target="./DevDetail/SwV"),))
    data = build_message(hdr, [*statuses, get], final=True)

    reply = parse_message(data)
    assert reply.hdr.target == DEVICE_ID
    assert reply.hdr.source == client.hdr.target
    assert reply.hdr.session_id == client.hdr.session_id
    assert [(s.cmd_id, s.msg_ref, s.cmd_ref, s.cmd, s.data) for s in reply.statuses] == [
        ("1", 1, "0", "SyncHdr", "200"),
        ("2", 1, "2", "Alert", "200"),
        ("3", 1, "3", "Alert", "200"),
        ("4", 1, "4", "Replace", "200"),
    ]
    assert reply.commands == (get,)
    assert reply.final


# ---------------------------------------------------------------------------
# Building and round trips
# ---------------------------------------------------------------------------


def test_round_trip_every_kind() -> None:
    hdr, body = full_example()
    data = build_message(hdr, body, final=True)
    parsed = parse_message(data)
    assert parsed.hdr == hdr
    assert list(parsed.body) == body
    assert parsed.final is True
    assert parsed.namespace == NS


def test_round_trip_without_final_and_with_11_namespace() -> None:
    hdr, body = full_example()
    data = build_message(hdr, body[:3], final=False, namespace=syncml.SYNCML11_NS)
    assert data.startswith(b'<SyncML xmlns="SYNCML:SYNCML1.1">')
    parsed = parse_message(data)
    assert parsed.final is False
    assert parsed.namespace == syncml.SYNCML11_NS
    assert list(parsed.body) == body[:3]


def test_built_xml_follows_dtd_order() -> None:
    hdr, body = full_example()
    root = etree.fromstring(build_message(hdr, body, final=True))
    checked = assert_dtd_order(root)
    assert checked > 40  # the check did walk the whole message

    hdr_el = root[0]
    assert [local(c) for c in hdr_el] == [
        "VerDTD", "VerProto", "SessionID", "MsgID", "Target", "Source",
        "RespURI", "NoResp", "Cred", "Meta",
    ]  # fmt: skip
    status = root[1][1]
    assert [local(c) for c in status] == [
        "CmdID", "MsgRef", "CmdRef", "Cmd", "TargetRef", "TargetRef", "SourceRef",
        "Chal", "Data", "Item",
    ]  # fmt: skip
    results = root[1][2]
    assert [local(c) for c in results] == [
        "CmdID", "MsgRef", "CmdRef", "Cmd", "Meta", "TargetRef", "SourceRef",
        "Item", "Item", "Item",
    ]  # fmt: skip
    chunk_item = root[1][-2].find(f"{{{NS}}}Item")
    assert chunk_item is not None
    assert [local(c) for c in chunk_item] == ["Target", "Meta", "Data", "MoreData"]
    assert local(root[1][-1]) == "Final"


def test_dtd_order_checker_catches_wrong_order() -> None:
    bad = etree.fromstring(
        f'<Status xmlns="{NS}"><CmdID>1</CmdID><Data>200</Data><CmdRef>0</CmdRef></Status>'
    )
    with pytest.raises(AssertionError):
        assert_dtd_order(bad)


def test_meta_children_are_in_metinf_namespace() -> None:
    hdr, body = full_example()
    data = build_message(hdr, body, final=True)
    root = etree.fromstring(data)
    metas = list(root.iter(f"{{{NS}}}Meta"))
    assert len(metas) > 10
    for meta in metas:
        assert len(meta) > 0
        for child in meta:
            assert etree.QName(child).namespace == METINF
    assert b'<Format xmlns="syncml:metinf">int</Format>' in data
    assert b'<MaxMsgSize xmlns="syncml:metinf">65536</MaxMsgSize>' in data
    assert b'<Size xmlns="syncml:metinf">123456</Size>' in data


def test_serialization_shape() -> None:
    hdr = server_hdr()
    data = build_message(
        hdr,
        [
            hdr_status(SyncHdr("1.2", "DM/1.2", "1", 1, MGMT_URL, DEVICE_ID), 200, "1"),
            replace_cmd("2", "./Vendor/MSFT/Ünïcode", "é€", fmt="chr"),
        ],
        final=True,
    )
    assert data.startswith(b'<SyncML xmlns="SYNCML:SYNCML1.2"><SyncHdr><VerDTD>1.2</VerDTD>')
    assert not data.startswith(b"<?xml")
    assert b"\n" not in data
    assert data.endswith(b"<Final/></SyncBody></SyncML>")
    assert "é€".encode() in data  # UTF-8, not character references
    assert (
        b"<Status><CmdID>1</CmdID><MsgRef>1</MsgRef><CmdRef>0</CmdRef><Cmd>SyncHdr</Cmd>"
        b"<Data>200</Data></Status>"
    ) in data


def test_xml_data_is_written_as_escaped_text() -> None:
    doc = (
        '<wap-provisioningdoc><characteristic type="x"><parm name="a" value="1&amp;2"/>'
        "</characteristic></wap-provisioningdoc>"
    )
    cmd = replace_cmd("2", "./Vendor/MSFT/Thing", doc, fmt="xml")
    data = build_message(server_hdr(), [cmd], final=True)
    assert b"<Data>&lt;wap-provisioningdoc&gt;&lt;characteristic" in data
    assert b"1&amp;amp;2" in data
    root = etree.fromstring(data)
    data_el = next(root.iter(f"{{{NS}}}Data"))
    assert len(data_el) == 0 and data_el.text == doc
    assert parse_message(data).commands == (cmd,)


def test_embedded_markup_in_data_is_returned_as_xml_string() -> None:
    body = (
        "<Results><CmdID>2</CmdID><MsgRef>1</MsgRef><CmdRef>5</CmdRef><Cmd>Get</Cmd>"
        "<Item><Source><LocURI>./Vendor/MSFT/X</LocURI></Source>"
        '<Meta><Format xmlns="syncml:metinf">xml</Format></Meta>'
        '<Data> <root a="1"><child>x &amp; y</child></root> </Data></Item></Results>'
    )
    (results,) = parse_message(message(body)).results
    # The inherited SyncML namespace is not forced onto the embedded document.
    assert results.items[0].data == '<root a="1"><child>x &amp; y</child></root>'
    assert results.items[0].meta == Meta(format="xml")


def test_build_rejects_what_the_dtd_does_not_allow() -> None:
    hdr = server_hdr()
    bad_commands = [
        Command(verb="Replace", cmd_id="2"),  # Item+ required
        Command(verb="Exec", cmd_id="2", items=(Item(target="./a"), Item(target="./b"))),
        Command(verb="Alert", cmd_id="2"),  # alert code required
        Command(verb="Alert", cmd_id="2", data="1201", meta=Meta(type="x")),  # no Meta
        Command(verb="Atomic", cmd_id="2"),  # commands required
        Command(verb="Get", cmd_id="2", items=(Item(target="./a"),), data="x"),
        Command(verb="Sync", cmd_id="2", items=(Item(target="./a"),)),  # unsupported
        Command(verb="Get", cmd_id="", items=(Item(target="./a"),)),  # no CmdID
        Command(verb="Get", cmd_id="0", items=(Item(target="./a"),)),  # CmdID "0"
        Command(verb="Get", cmd_id="2", items=(Item(target="./a"),), error="broken"),
        replace_cmd("2", "./a", "nul\x00byte"),  # not representable in XML
    ]
    for cmd in bad_commands:
        with pytest.raises(ValueError):
            build_message(hdr, [cmd], final=True)
    with pytest.raises(ValueError):
        build_message(hdr, [Results(cmd_id="2", msg_ref=1, cmd_ref="3")], final=True)
    with pytest.raises(ValueError):
        build_message(server_hdr(msg_id=0), [], final=True)


# ---------------------------------------------------------------------------
# Header validation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("session", ["0", "1", "ff", "1A2B3C4D", "00000000", "  7  "])
def test_session_id_format_accepted(session: str) -> None:
    msg = parse_message(message("<Final/>", hdr=hdr_xml(session=session)))
    assert msg.hdr.session_id == session.strip()


@pytest.mark.parametrize("session", ["xyz!", "", "123456789", "-1", "1 2", "g1"])
def test_session_id_format_rejected(session: str) -> None:
    with pytest.raises(SyncMLError) as info:
        parse_message(message("<Final/>", hdr=hdr_xml(session=session)))
    assert info.value.status == 400
    assert "SessionID" in info.value.reason


@pytest.mark.parametrize("msg_id", ["0", "abc", "-1", "", "1.5", "99999999999"])
def test_msg_id_rejected(msg_id: str) -> None:
    with pytest.raises(SyncMLError) as info:
        parse_message(message("<Final/>", hdr=hdr_xml(msg=msg_id)))
    assert info.value.status == 400
    assert "MsgID" in info.value.reason


def test_missing_synchdr_is_400() -> None:
    data = f'<SyncML xmlns="{NS}"><SyncBody><Final/></SyncBody></SyncML>'.encode()
    with pytest.raises(SyncMLError) as info:
        parse_message(data)
    assert info.value.status == 400
    assert info.value.hdr is None
    assert isinstance(info.value, ValueError)


def test_missing_syncbody_is_400_with_header() -> None:
    data = f'<SyncML xmlns="{NS}">{hdr_xml(msg="3")}</SyncML>'.encode()
    with pytest.raises(SyncMLError) as info:
        parse_message(data)
    assert info.value.status == 400
    assert info.value.hdr is not None and info.value.hdr.msg_id == 3


@pytest.mark.parametrize(
    ("missing", "element"),
    [("VerDTD", "<VerDTD>1.2</VerDTD>"), ("Source", f"<Source><LocURI>{DEVICE_ID}</LocURI></Source>")],
)
def test_missing_header_element_is_400(missing: str, element: str) -> None:
    data = message("<Final/>", hdr=hdr_xml().replace(element, ""))
    with pytest.raises(SyncMLError) as info:
        parse_message(data)
    assert info.value.status == 400
    assert missing in info.value.reason


def test_header_target_without_locuri_is_400() -> None:
    hdr = hdr_xml().replace(f"<Target><LocURI>{MGMT_URL}</LocURI></Target>", "<Target/>")
    with pytest.raises(SyncMLError) as info:
        parse_message(message("<Final/>", hdr=hdr))
    assert info.value.status == 400


def test_verproto_dm11_is_513_with_header() -> None:
    with pytest.raises(SyncMLError) as info:
        parse_message(message("<Final/>", hdr=hdr_xml(ver_proto="DM/1.1", msg="2")))
    assert info.value.status == 513
    assert info.value.hdr is not None
    assert info.value.hdr.msg_id == 2 and info.value.hdr.source == DEVICE_ID


def test_verdtd_11_is_505() -> None:
    with pytest.raises(SyncMLError) as info:
        parse_message(message("<Final/>", hdr=hdr_xml(ver_dtd="1.1")))
    assert info.value.status == 505
    assert info.value.hdr is not None


def test_root_namespace_variants() -> None:
    # SYNCML1.1 namespace (Learn samples) is accepted with VerDTD 1.2.
    msg = parse_message(message("<Final/>", root_ns="SYNCML:SYNCML1.1"))
    assert msg.namespace == "SYNCML:SYNCML1.1" and msg.final
    with pytest.raises(SyncMLError) as info:
        parse_message(message("<Final/>", root_ns="SYNCML:SYNCML1.0"))
    assert info.value.status == 505
    with pytest.raises(SyncMLError) as info:
        parse_message(message("<Final/>", root_ns="urn:other"))
    assert info.value.status == 400
    no_ns = f"<SyncML>{hdr_xml()}<SyncBody><Final/></SyncBody></SyncML>".encode()
    with pytest.raises(SyncMLError) as info:
        parse_message(no_ns)
    assert info.value.status == 400


def test_wrong_root_is_400() -> None:
    with pytest.raises(SyncMLError) as info:
        parse_message(f'<SyncBody xmlns="{NS}"/>'.encode())
    assert info.value.status == 400


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not xml at all",
        b"<SyncML",
        b'<?xml version="1.0"?><!DOCTYPE SyncML [<!ENTITY x "boom">]>'
        b'<SyncML xmlns="SYNCML:SYNCML1.2">&x;</SyncML>',
        b'<!DOCTYPE SyncML SYSTEM "file:///etc/passwd"><SyncML xmlns="SYNCML:SYNCML1.2"/>',
        b'<SyncML xmlns="SYNCML:SYNCML1.2">&undefined;</SyncML>',
    ],
)
def test_unacceptable_xml_raises_xml_input_error(data: bytes) -> None:
    with pytest.raises(XMLInputError):
        parse_message(data)


def test_header_meta_cred_and_metinf_variants() -> None:
    extra = (
        '<Cred><Meta><Format xmlns="syncml:metinf">b64</Format>'
        '<Type xmlns="syncml:metinf">syncml:auth-md5</Type></Meta><Data> abc= </Data></Cred>'
        '<Meta><MaxMsgSize xmlns="syncml:metinfo"> 32768 </MaxMsgSize>'
        '<MaxObjSize xmlns="">100</MaxObjSize><Mark>informational</Mark>'
        '<EMI xmlns="syncml:metinf">ignored</EMI></Meta>'
    )
    msg = parse_message(message("<Final/>", hdr=hdr_xml(extra=extra)))
    assert msg.hdr.cred == Cred(meta=Meta(format="b64", type="syncml:auth-md5"), data="abc=")
    # syncml:metinfo (Learn's typo), no namespace, and the SyncML namespace.
    assert msg.hdr.meta == Meta(max_msg_size=32768, max_obj_size=100, mark="informational")


def test_bad_header_meta_size_is_400() -> None:
    extra = '<Meta><MaxMsgSize xmlns="syncml:metinf">big</MaxMsgSize></Meta>'
    with pytest.raises(SyncMLError) as info:
        parse_message(message("<Final/>", hdr=hdr_xml(extra=extra)))
    assert info.value.status == 400
    assert "MaxMsgSize" in info.value.reason


# ---------------------------------------------------------------------------
# Body parsing leniency
# ---------------------------------------------------------------------------


def test_unknown_and_unsupported_verbs_are_kept() -> None:
    body = (
        "<Sync><CmdID>7</CmdID><Item><Target><LocURI>./x</LocURI></Target></Item></Sync>"
        "<Frobnicate><CmdID>8</CmdID></Frobnicate>"
        "<Alert><CmdID>9</CmdID><Data>1201</Data></Alert><Final/>"
    )
    msg = parse_message(message(body))
    sync, frob, alert = msg.commands
    assert (sync.verb, sync.cmd_id, sync.error) == ("Sync", "7", None)
    assert sync.items == (Item(target="./x"),)
    assert (frob.verb, frob.cmd_id, frob.error) == ("Frobnicate", "8", None)
    assert sync.verb not in syncml.SUPPORTED_VERBS and frob.verb not in syncml.SUPPORTED_VERBS
    assert alert.alert_code == 1201
    answer = status_for(frob, msg.hdr.msg_id, syncml.StatusCode.OPTIONAL_FEATURE_NOT_SUPPORTED, "2")
    assert answer == Status(cmd_id="2", msg_ref=1, cmd_ref="8", cmd="Frobnicate", data="406")


def test_command_without_cmdid_is_representable() -> None:
    body = (
        "<Alert><Data>1201</Data></Alert>"
        "<Alert><CmdID>0</CmdID><Data>1201</Data></Alert>"
        "<Replace><CmdID>4</CmdID><Item><Source><LocURI>./DevInfo/Man</LocURI></Source>"
        "<Data>x</Data></Item></Replace><Final/>"
    )
    msg = parse_message(message(body))
    no_id, zero_id, replace = msg.commands
    assert no_id.cmd_id == "" and no_id.error is not None and "CmdID" in no_id.error
    assert zero_id.cmd_id == "0" and zero_id.error is not None and '"0"' in zero_id.error
    assert replace.error is None and replace.items[0].data == "x"

    status = status_for(no_id, msg.hdr.msg_id, 400, "2")
    assert (status.cmd_ref, status.cmd, status.data) == ("", "Alert", "400")
    data = build_message(reply_header(msg.hdr, 1), [status], final=True)
    assert b"<CmdRef></CmdRef><Cmd>Alert</Cmd><Data>400</Data>" in data
    assert parse_message(data).statuses == (status,)


def test_malformed_commands_get_an_error_not_an_exception() -> None:
    body = (
        "<Replace><CmdID>2</CmdID></Replace>"  # no Item
        "<Alert><CmdID>3</CmdID></Alert>"  # no code
        '<Replace><CmdID>4</CmdID><Item><Meta><Size xmlns="syncml:metinf">-5</Size></Meta>'
        "<Data>x</Data></Item></Replace>"
        "<Exec><CmdID>5</CmdID></Exec>"
        "<Atomic><CmdID>6</CmdID></Atomic>"
        "<Get><CmdID>7</CmdID><Item><Target/></Item></Get>"
        '<x:Replace xmlns:x="urn:x"><x:CmdID>8</x:CmdID></x:Replace>'
        "<Alert><CmdID>9</CmdID><Data>1201</Data></Alert>"
    )
    msg = parse_message(message(body))
    errors = {c.cmd_id: c.error for c in msg.commands}
    assert set(errors) == {"2", "3", "4", "5", "6", "7", "", "9"}
    for cmd_id in ("2", "3", "4", "5", "6", "7"):
        assert errors[cmd_id], cmd_id
    assert errors["9"] is None
    assert "Item" in (errors["2"] or "")
    assert "Size" in (errors["4"] or "")
    foreign = msg.commands[6]
    assert foreign.verb == "Replace" and "namespace" in (foreign.error or "")
    assert not msg.final


def test_non_commands_inside_atomic_are_flagged() -> None:
    body = (
        "<Atomic><CmdID>2</CmdID>"
        "<Replace><CmdID>3</CmdID><Item><Target><LocURI>./a</LocURI></Target><Data>1</Data></Item></Replace>"
        "<Status><CmdID>4</CmdID><Data>200</Data></Status>"
        "<Copy><CmdID>5</CmdID></Copy>"
        "</Atomic>"
    )
    (atomic,) = parse_message(message(body)).commands
    assert atomic.error is None
    replace, status, copy = atomic.children
    assert replace.error is None and replace.items[0].target == "./a"
    assert status.verb == "Status" and "not a command" in (status.error or "")
    assert copy.verb == "Copy" and copy.error is None  # answered 406 by the caller


def test_status_and_results_parsing_is_lenient() -> None:
    body = (
        # MS-MDM order (refs last), msft:originalerror on Data.
        "<Status><CmdID>1</CmdID><MsgRef>1</MsgRef><CmdRef>0</CmdRef><Cmd>SyncHdr</Cmd>"
        "<Data>200</Data></Status>"
        "<Status><CmdID>2</CmdID><MsgRef>1</MsgRef><CmdRef>6</CmdRef><Cmd>Replace</Cmd>"
        '<Data xmlns:msft="http://schemas.microsoft.com/MobileDevice/MDM" '
        'msft:originalerror="0x86000002">405</Data>'
        "<TargetRef>./Vendor/MSFT/A</TargetRef><SourceRef><LocURI>./x</LocURI></SourceRef></Status>"
        # Windows: Cmd after CmdRef in Results; MsgRef may be absent.
        "<Results><CmdID>3</CmdID><CmdRef>5</CmdRef><Cmd>Get</Cmd>"
        "<Item><Source><LocURI>./DevDetail/SwV</LocURI></Source>"
        '<Meta><Format xmlns="syncml:metinf">chr</Format></Meta>'
        "<Data>10.0.19043.2364</Data></Item></Results><Final/>"
    )
    msg = parse_message(message(body, hdr=hdr_xml(msg="2")))
    hdr_st, replace_st = msg.statuses
    assert hdr_st.code == 200 and hdr_st.cmd == "SyncHdr" and hdr_st.cmd_ref == "0"
    assert replace_st.code == 405
    assert replace_st.original_error == "0x86000002"
    assert replace_st.target_refs == ("./Vendor/MSFT/A",)
    assert replace_st.source_refs == ("./x",)
    (results,) = msg.results
    assert results == Results(
        cmd_id="3",
        msg_ref=None,
        cmd_ref="5",
        cmd="Get",
        items=(Item(source="./DevDetail/SwV", meta=Meta(format="chr"), data="10.0.19043.2364"),),
    )
    assert [type(e).__name__ for e in msg.body] == ["Status", "Status", "Results"]
    assert status_for(results, 2, 200, "4").cmd == "Results"


def test_status_with_garbage_msgref_is_400() -> None:
    body = (
        "<Status><CmdID>1</CmdID><MsgRef>abc</MsgRef><CmdRef>0</CmdRef><Cmd>SyncHdr</Cmd>"
        "<Data>200</Data></Status>"
    )
    with pytest.raises(SyncMLError) as info:
        parse_message(message(body))
    assert info.value.status == 400
    assert info.value.hdr is not None


def test_large_object_chunk_parses() -> None:
    body = (
        "<Results><CmdID>2</CmdID><MsgRef>1</MsgRef><CmdRef>5</CmdRef><Cmd>Get</Cmd>"
        "<Item><Source><LocURI>./Vendor/MSFT/Big</LocURI></Source>"
        '<Meta><Format xmlns="syncml:metinf">b64</Format><Size xmlns="syncml:metinf">300000</Size></Meta>'
        "<Data>QUJD</Data><MoreData/></Item></Results>"
    )
    msg = parse_message(message(body))
    item = msg.results[0].items[0]
    assert item.more_data is True
    assert item.meta == Meta(format="b64", size=300000)
    assert msg.final is False


def test_empty_and_absent_data_differ() -> None:
    body = (
        "<Results><CmdID>2</CmdID><MsgRef>1</MsgRef><CmdRef>5</CmdRef>"
        "<Item><Source><LocURI>./a</LocURI></Source><Data/></Item>"
        "<Item><Source><LocURI>./b</LocURI></Source></Item></Results>"
    )
    items = parse_message(message(body)).results[0].items
    assert items[0].data == "" and items[1].data is None


# ---------------------------------------------------------------------------
# Administrator command fragments
# ---------------------------------------------------------------------------

ATOMIC_FRAGMENT = (
    "<Atomic><CmdID>1</CmdID>"
    "<Replace><CmdID>2</CmdID><Item><Target><LocURI>./Device/Vendor/MSFT/Policy/Config/"
    'Camera/AllowCamera</LocURI></Target><Meta><Format xmlns="syncml:metinf">int</Format>'
    "</Meta><Data>0</Data></Item></Replace>"
    "<Replace><CmdID>3</CmdID><Item><Target><LocURI>./Vendor/MSFT/DMClient/Provider/mdmd/"
    "EntDMID</LocURI></Target><Data>abc</Data></Item></Replace>"
    "</Atomic>"
)


def test_fragment_atomic_of_replaces() -> None:
    (atomic,) = parse_commands_fragment(ATOMIC_FRAGMENT)
    assert atomic.verb == "Atomic" and atomic.cmd_id == "1"
    assert [(c.verb, c.cmd_id) for c in atomic.children] == [("Replace", "2"), ("Replace", "3")]
    assert atomic.children[0].items[0] == Item(
        target="./Device/Vendor/MSFT/Policy/Config/Camera/AllowCamera",
        meta=Meta(format="int"),
        data="0",
    )
    # With the namespace declared by the administrator: same result.
    with_ns = ATOMIC_FRAGMENT.replace("<Atomic>", f'<Atomic xmlns="{NS}">', 1)
    assert parse_commands_fragment(with_ns) == (atomic,)


def test_fragment_several_commands_pretty_printed_with_declaration() -> None:
    xml = """<?xml version="1.0" encoding="utf-8"?>
    <Get>
        <CmdID>10</CmdID>
        <Item><Target><LocURI>./DevDetail/SwV</LocURI></Target></Item>
    </Get>
    <Delete><Item><Target><LocURI>./Vendor/MSFT/Node%20A</LocURI></Target></Item></Delete>
    <Exec><CmdID>12</CmdID><Item><Target><LocURI>./Vendor/MSFT/RemoteWipe/doWipe</LocURI></Target>
        <Meta><Format xmlns="syncml:metinf">chr</Format></Meta><Data></Data></Item></Exec>
    <Sequence><CmdID>13</CmdID>
      <Get><CmdID>14</CmdID><Item><Target><LocURI>./DevDetail/Ext?list=Struct</LocURI></Target></Item></Get>
      <Atomic><CmdID>15</CmdID><Add><CmdID>16</CmdID><Item><Target><LocURI>./Vendor/MSFT/B</LocURI>
      </Target><Data>1</Data></Item></Add></Atomic>
    </Sequence>
    """
    commands = parse_commands_fragment(xml)
    assert [(c.verb, c.cmd_id) for c in commands] == [
        ("Get", "10"),
        ("Delete", ""),  # CmdID optional: renumbered when sent
        ("Exec", "12"),
        ("Sequence", "13"),
    ]
    assert commands[2].items[0].data == ""
    assert [c.verb for c in walk(commands[3])] == ["Sequence", "Get", "Atomic", "Add"]
    # Queued commands build into a valid message once renumbered.
    ids = id_counter(2)
    data = build_message(server_hdr(), [renumber(c, ids) for c in commands], final=True)
    assert_dtd_order(etree.fromstring(data))


def test_fragment_with_bom_and_declaration() -> None:
    (cmd,) = parse_commands_fragment('\ufeff<?xml version="1.0"?>' + ATOMIC_FRAGMENT)
    assert cmd.verb == "Atomic"


def test_fragment_embedded_xml_data_becomes_text() -> None:
    xml = (
        "<Replace><CmdID>1</CmdID><Item><Target><LocURI>./Vendor/MSFT/WiFi/Profile/Corp/WlanXml"
        '</LocURI></Target><Meta><Format xmlns="syncml:metinf">xml</Format></Meta>'
        '<Data><WLANProfile xmlns="http://www.microsoft.com/networking/WLAN/profile/v1">'
        "<name>Corp</name></WLANProfile></Data></Item></Replace>"
    )
    (cmd,) = parse_commands_fragment(xml)
    expected = (
        '<WLANProfile xmlns="http://www.microsoft.com/networking/WLAN/profile/v1">'
        "<name>Corp</name></WLANProfile>"
    )
    assert cmd.items[0].data == expected
    sent = build_message(server_hdr(), [cmd], final=True)
    assert b"<Data>&lt;WLANProfile xmlns=" in sent
    assert parse_message(sent).commands == (cmd,)


@pytest.mark.parametrize(
    ("xml", "complaint"),
    [
        (
            "<Status><CmdID>1</CmdID><MsgRef>1</MsgRef><CmdRef>1</CmdRef><Cmd>Get</Cmd>"
            "<Data>200</Data></Status>",
            "Status cannot be queued",
        ),
        ("<Results><CmdID>1</CmdID><CmdRef>1</CmdRef></Results>", "Results cannot be queued"),
        ("<Alert><CmdID>1</CmdID><Data>1226</Data></Alert>", "Alert cannot be queued"),
        ("<Final/>", "Final cannot be queued"),
        (
            "<Atomic><CmdID>1</CmdID><Get><CmdID>2</CmdID><Item><Target><LocURI>./DevDetail/SwV"
            "</LocURI></Target></Item></Get></Atomic>",
            "Get is not allowed inside Atomic",
        ),
        (
            "<Atomic><CmdID>1</CmdID><Atomic><CmdID>2</CmdID><Delete><Item><Target><LocURI>./a"
            "</LocURI></Target></Item></Delete></Atomic></Atomic>",
            "Atomic is not allowed inside Atomic",
        ),
        (
            "<Sequence><Atomic><Sequence><Delete><Item><Target><LocURI>./a</LocURI></Target>"
            "</Item></Delete></Sequence></Atomic></Sequence>",
            "Sequence is not allowed inside Atomic",
        ),
        (
            "<Atomic><Alert><CmdID>2</CmdID><Data>1201</Data></Alert></Atomic>",
            "Alert is not allowed inside Atomic",
        ),
        (
            "<Atomic><Add><Item><Target><LocURI>./Vendor/MSFT/N</LocURI></Target></Item></Add>"
            "<Replace><Item><Target><LocURI>./Vendor/MSFT/N</LocURI></Target><Data>1</Data>"
            "</Item></Replace></Atomic>",
            "Add then Replace of ./Vendor/MSFT/N",
        ),
        ("<Replace><CmdID>1</CmdID></Replace>", "Replace without Item"),
        ("<Atomic><CmdID>1</CmdID></Atomic>", "Atomic without commands"),
        ("<Exec><CmdID>1</CmdID></Exec>", "Exec needs exactly one Item"),
        ("<Get><Item><Source><LocURI>./a</LocURI></Source></Item></Get>", "Item 1 has no Target"),
        ("<Get><Item><Target/></Item></Get>", "Target without LocURI"),
        ("<Get><Itme><Target><LocURI>./a</LocURI></Target></Itme></Get>", "unexpected element Itme"),
        (
            "<Get><Item><Target><LocURI>./a</LocURI></Target><Dta>1</Dta></Item></Get>",
            "unexpected element Dta in Item",
        ),
        (
            "<Replace><Item><Target><LocURI>./a</LocURI></Target><Data>1</Data><MoreData/></Item></Replace>",
            "MoreData",
        ),
        ("<Get>oops<Item><Target><LocURI>./a</LocURI></Target></Item></Get>", "unexpected text"),
        ("junk <Get><Item><Target><LocURI>./a</LocURI></Target></Item></Get>", "text outside"),
        ("<Get><Item><Target><LocURI>./a</LocURI></Target></Item></Get> junk", "text after Get"),
        (
            '<Get xmlns="urn:evil"><Item><Target><LocURI>./a</LocURI></Target></Item></Get>',
            "not in the SyncML namespace",
        ),
        ("", "no command"),
        ("   ", "no command"),
        ("<Replace><CmdID>1</CmdID>", "command XML rejected"),
        ("<Get></Replace>", "command XML rejected"),
        ("</SyncBody><Get/>", "command XML rejected"),
        ("<Replace><CmdID>&xxe;</CmdID></Replace>", "command XML rejected"),
        (
            '<!DOCTYPE x [<!ENTITY xxe SYSTEM "file:///etc/passwd">]><Replace><CmdID>&xxe;</CmdID></Replace>',
            "command XML rejected",
        ),
    ],
)
def test_fragment_rejections(xml: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=re.escape(complaint)):
        parse_commands_fragment(xml)


@pytest.mark.parametrize(
    "uri",
    [
        "/Vendor/MSFT/A",
        "Vendor/MSFT/A",
        "https://example.com/A",
        ".",
        "./",
        "./Vendor//MSFT",
        "./Vendor/MSFT/",
        "./Vendor/../MSFT",
        "./Vendor/./MSFT",
        "./Vendor/*/MSFT",
        "./Vendor/MSFT/100%",
        "./Vendor/MSFT/\x01",
        "",
    ],
)
def test_fragment_rejects_bad_locuri(uri: str) -> None:
    with pytest.raises(ValueError, match="LocURI"):
        check_locuri(uri)
    xml = f"<Replace><Item><Target><LocURI>{uri}</LocURI></Target><Data>1</Data></Item></Replace>"
    if "\x01" in uri:
        with pytest.raises(ValueError):  # not even XML
            parse_commands_fragment(xml)
        return
    with pytest.raises(ValueError, match=r"Replace: Item 1: .*LocURI"):
        parse_commands_fragment(xml)


@pytest.mark.parametrize(
    "uri",
    [
        "./DevDetail/SwV",
        "./Device/Vendor/MSFT/Policy/Config/Camera/AllowCamera",
        "./User/Vendor/MSFT/Policy/Config/Browser/HomePages",
        "./Vendor/MSFT/WiFi/Profile/My%20Net/WlanXml",
        "./DevDetail/Ext?list=Struct",
    ],
)
def test_good_locuri(uri: str) -> None:
    check_locuri(uri)


def test_fragment_error_names_the_nested_command() -> None:
    xml = (
        "<Atomic><CmdID>1</CmdID><Replace><CmdID>7</CmdID><Item><Target><LocURI>./a//b"
        "</LocURI></Target><Data>1</Data></Item></Replace></Atomic>"
    )
    with pytest.raises(ValueError, match=re.escape("Atomic (CmdID 1) > Replace (CmdID 7)")):
        parse_commands_fragment(xml)


# ---------------------------------------------------------------------------
# Renumbering
# ---------------------------------------------------------------------------


def test_renumber_gives_fresh_unique_ids_and_a_mapping() -> None:
    (atomic,) = parse_commands_fragment(ATOMIC_FRAGMENT)
    get = Command(verb="Get", cmd_id="1", items=(Item(target="./DevDetail/SwV"),))
    ids = id_counter(5)
    sent = [renumber(atomic, ids), renumber(get, ids)]
    assert [c.cmd_id for c in walk(sent[0])] == ["5", "6", "7"]
    assert sent[1].cmd_id == "8"
    # The originals are untouched (frozen dataclasses).
    assert [c.cmd_id for c in walk(atomic)] == ["1", "2", "3"]
    # Pairing new CmdIDs with what was queued, inside Atomic too.
    mapping = {new.cmd_id: old for new, old in zip(walk(sent[0]), walk(atomic), strict=True)}
    assert mapping["6"].items == atomic.children[0].items
    assert mapping["7"].cmd_id == "3"
    # Everything else is preserved.
    assert sent[0].children[1].items == atomic.children[1].items
    data = build_message(server_hdr(), sent, final=True)
    cmd_ids = [el.text for el in etree.fromstring(data).iter(f"{{{NS}}}CmdID")]
    assert cmd_ids == ["5", "6", "7", "8"]


def test_id_counter_counts_from_start() -> None:
    ids = id_counter()
    assert [ids(), ids(), ids()] == ["1", "2", "3"]


# ---------------------------------------------------------------------------
# Packing under MaxMsgSize
# ---------------------------------------------------------------------------


def many_commands(count: int) -> list[Command]:
    return [
        replace_cmd(str(10 + i), f"./Vendor/MSFT/Policy/Config/Area/Setting{i}", str(i)) for i in range(count)
    ]


def statuses_for_pack() -> list[Status | Results]:
    return [
        Status(cmd_id="1", msg_ref=1, cmd_ref="0", cmd="SyncHdr", data="200"),
        Status(cmd_id="2", msg_ref=1, cmd_ref="2", cmd="Alert", data="200"),
    ]


def test_pack_body_without_limit_takes_everything() -> None:
    commands = many_commands(20)
    data, count = pack_body(server_hdr(), statuses_for_pack(), commands, max_msg_size=None)
    assert count == 20
    parsed = parse_message(data)
    assert parsed.final
    assert list(parsed.commands) == commands
    assert data == build_message(server_hdr(), [*statuses_for_pack(), *commands], final=True)


def test_pack_body_splits_and_never_exceeds_the_limit() -> None:
    commands = many_commands(30)
    statuses = statuses_for_pack()
    limit = 2000
    sent: list[Command] = []
    remaining = commands
    msg_id = 1
    messages = 0
    while remaining:
        data, count = pack_body(server_hdr(msg_id), statuses, remaining, max_msg_size=limit)
        assert len(data) <= limit
        assert count > 0
        parsed = parse_message(data)
        assert parsed.statuses == tuple(statuses)
        assert list(parsed.commands) == remaining[:count]
        # Final only in the message that completes the package.
        assert parsed.final is (count == len(remaining))
        sent.extend(remaining[:count])
        remaining = remaining[count:]
        msg_id += 1
        messages += 1
    assert sent == commands
    assert messages > 2


def test_pack_body_takes_the_largest_prefix() -> None:
    commands = many_commands(12)
    statuses = statuses_for_pack()
    hdr = server_hdr()
    full = build_message(hdr, [*statuses, *commands], final=True)
    data, count = pack_body(hdr, statuses, commands, max_msg_size=len(full))
    assert (data, count) == (full, 12)
    data, count = pack_body(hdr, statuses, commands, max_msg_size=len(full) - 1)
    assert count == 11 and len(data) <= len(full) - 1
    # One more command would not have fitted (prefix is maximal).
    assert count < len(commands)
    bigger = build_message(hdr, [*statuses, *commands[: count + 1]], final=False)
    assert count + 1 == len(commands) or len(bigger) > len(full) - 1
    assert b"<Final/>" not in data


def test_pack_body_when_a_single_command_does_not_fit() -> None:
    statuses = statuses_for_pack()
    hdr = server_hdr()
    huge = replace_cmd("10", "./Vendor/MSFT/Big", "A" * 5000, fmt="b64")
    small = many_commands(3)
    bare = build_message(hdr, statuses, final=False)
    data, count = pack_body(hdr, statuses, [huge, *small], max_msg_size=len(bare) + 500)
    # The huge command blocks the queue position: nothing after it is sent
    # and the caller decides (chunk it or fail it).
    assert count == 0
    assert data == bare
    assert parse_message(data).final is False


def test_pack_body_statuses_always_included() -> None:
    statuses = statuses_for_pack()
    hdr = server_hdr()
    data, count = pack_body(hdr, statuses, many_commands(2), max_msg_size=50)
    assert count == 0
    assert parse_message(data).statuses == tuple(statuses)
    # No commands at all: statuses-only message with Final ends the session.
    data, count = pack_body(hdr, statuses, [], max_msg_size=10_000)
    assert count == 0 and parse_message(data).final is True


def test_pack_body_final_if_all_false() -> None:
    data, count = pack_body(
        server_hdr(), statuses_for_pack(), many_commands(2), max_msg_size=None, final_if_all=False
    )
    assert count == 2 and parse_message(data).final is False
    data, count = pack_body(
        server_hdr(), statuses_for_pack(), many_commands(2), max_msg_size=100_000, final_if_all=False
    )
    assert count == 2 and parse_message(data).final is False


# ---------------------------------------------------------------------------
# Small helpers and constants
# ---------------------------------------------------------------------------


def test_hdr_status_and_reply_header() -> None:
    client = SyncHdr("1.2", "DM/1.2", "0", 4, MGMT_URL, DEVICE_ID)
    chal = Meta(format="b64", type="syncml:auth-md5", next_nonce="bm9uY2U=")
    assert hdr_status(client, 407, "1", chal=chal) == Status(
        cmd_id="1", msg_ref=4, cmd_ref="0", cmd="SyncHdr", data="407", chal=chal
    )
    reply = reply_header(client, 3)
    assert reply == SyncHdr("1.2", "DM/1.2", "0", 3, DEVICE_ID, MGMT_URL)
    assert reply_header(client, 3, source="https://other/").source == "https://other/"


def test_constants() -> None:
    assert (
        syncml.ALERT_SERVER_INITIATED_MGMT,
        syncml.ALERT_CLIENT_INITIATED_MGMT,
        syncml.ALERT_NEXT_MESSAGE,
        syncml.ALERT_SESSION_ABORT,
        syncml.ALERT_CLIENT_EVENT,
        syncml.ALERT_GENERIC,
    ) == (1200, 1201, 1222, 1223, 1224, 1226)
    assert syncml.UNENROLL_USER_REQUEST_TYPE == "com.microsoft:mdm.unenrollment.userrequest"
    assert int(syncml.StatusCode.ATOMIC_FAILED) == 507
    assert syncml.SUPPORTED_VERBS == COMMANDS
    assert Command(verb="Alert", cmd_id="1", data="abc").alert_code is None
    assert Command(verb="Alert", cmd_id="1", data="12\u00b2").alert_code is None
    assert Command(verb="Get", cmd_id="1", data="1201").alert_code is None
    assert Status(cmd_id="1", msg_ref=1, cmd_ref="1", cmd="Get", data="").code is None
