"""``syncml.serialize_command``: the queue's storage form of a command, the
inverse of ``parse_commands_fragment``."""

from __future__ import annotations

from dataclasses import replace

import pytest

from mdmd.syncml import (
    SYNCML_NS,
    Command,
    Item,
    Meta,
    build_message,
    id_counter,
    parse_commands_fragment,
    renumber,
    reply_header,
    serialize_command,
)
from mdmd.syncml import SyncHdr as Hdr


def _without_ids(cmd: Command) -> Command:
    return replace(cmd, cmd_id="", children=tuple(_without_ids(c) for c in cmd.children))


def _round_trip(cmd: Command) -> Command:
    text = serialize_command(cmd)
    (parsed,) = parse_commands_fragment(text)
    return parsed


def test_replace_with_meta_and_data_round_trips_without_cmd_id() -> None:
    cmd = Command(
        "Replace",
        "7",
        items=(
            Item(target="./Device/Vendor/MSFT/Policy/Config/Camera/AllowCamera", meta=Meta("int"), data="0"),
        ),
    )
    text = serialize_command(cmd)
    assert text == (
        "<Replace><Item><Target><LocURI>./Device/Vendor/MSFT/Policy/Config/Camera/AllowCamera</LocURI>"
        '</Target><Meta><Format xmlns="syncml:metinf">int</Format></Meta><Data>0</Data></Item></Replace>'
    )
    assert "CmdID" not in text and SYNCML_NS not in text
    assert _round_trip(cmd) == _without_ids(cmd)


def test_containers_lose_every_cmd_id_and_keep_their_structure() -> None:
    (cmd,) = parse_commands_fragment(
        "<Sequence><CmdID>1</CmdID><NoResp/>"
        '<Meta><Type xmlns="syncml:metinf">text/plain</Type></Meta>'
        "<Atomic><CmdID>2</CmdID>"
        "<Add><CmdID>3</CmdID><Item><Target><LocURI>./Vendor/MSFT/A</LocURI></Target>"
        '<Meta><Format xmlns="syncml:metinf">node</Format></Meta></Item></Add>'
        "<Delete><CmdID>4</CmdID><Item><Target><LocURI>./Vendor/MSFT/B</LocURI></Target></Item></Delete>"
        "</Atomic>"
        "<Get><CmdID>5</CmdID><Item><Target><LocURI>./DevDetail/SwV</LocURI></Target></Item>"
        "<Item><Target><LocURI>./DevInfo/Mod</LocURI></Target></Item></Get>"
        "<Exec><CmdID>6</CmdID><Item><Target><LocURI>./Device/Vendor/MSFT/Reboot/RebootNow</LocURI>"
        "</Target></Item></Exec>"
        "</Sequence>"
    )
    text = serialize_command(cmd)
    assert "CmdID" not in text
    parsed = _round_trip(cmd)
    assert parsed == _without_ids(cmd)
    assert parsed.no_resp and parsed.meta == Meta(type="text/plain")
    assert [c.verb for c in parsed.children] == ["Atomic", "Get", "Exec"]
    assert [c.verb for c in parsed.children[0].children] == ["Add", "Delete"]


def test_data_that_looks_like_markup_stays_data() -> None:
    job = '<MsiInstallJob id="{X}"><Product Version="1.0"/></MsiInstallJob>'
    cmd = Command("Exec", "", items=(Item(target="./x/DownloadInstall", meta=Meta("xml"), data=job),))
    text = serialize_command(cmd)
    # Escaped, never embedded: the data cannot add elements to the command.
    assert "<MsiInstallJob" not in text and "&lt;MsiInstallJob" in text
    assert _round_trip(cmd).items[0].data == job


def test_embedded_markup_from_an_admin_fragment_round_trips_as_text() -> None:
    (cmd,) = parse_commands_fragment(
        "<Exec><Item><Target><LocURI>./x</LocURI></Target>"
        '<Data><A xmlns="urn:q"><b/></A></Data></Item></Exec>'
    )
    assert _round_trip(cmd) == cmd


@pytest.mark.parametrize("data", ["a & b < c > d", "line1\r\nline2", "tab\there", "ünïcödé ✓", ""])
def test_character_data_round_trips_exactly(data: str) -> None:
    cmd = Command(
        "Replace", "", items=(Item(target="./Vendor/MSFT/X", meta=Meta("chr", "text/plain"), data=data),)
    )
    assert _round_trip(cmd).items[0].data == data


def test_the_stored_text_still_builds_into_a_message() -> None:
    cmd = Command("Get", "", items=(Item(target="./DevInfo/Man"),))
    (parsed,) = parse_commands_fragment(serialize_command(cmd))
    hdr = Hdr("1.2", "DM/1.2", "1", 1, "https://mdm.example/m", "DEVICE1")
    message = build_message(reply_header(hdr, 1), [renumber(parsed, id_counter())], final=True)
    assert b"<Get><CmdID>1</CmdID>" in message


@pytest.mark.parametrize(
    "cmd",
    [
        Command("Get", ""),  # no Item
        Command("Exec", "", items=(Item(target="./a"), Item(target="./b"))),
        Command("Replace", "", items=(Item(target="./a", data="nul\x00byte"),)),
        Command("Replace", "", items=(Item(target="./a", data="1"),), error="broken"),
        Command("Atomic", ""),  # no commands
        Command("Frobnicate", "", items=(Item(target="./a"),)),
    ],
)
def test_what_cannot_be_sent_is_refused(cmd: Command) -> None:
    with pytest.raises(ValueError):
        serialize_command(cmd)
