"""The admin API (``/api/v1/...`` on the admin listener) against the real
daemon: devices enrolled through the real enrollment endpoints, commands
delivered in real OMA-DM sessions by the device emulator."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from unittest.mock import ANY

import pytest

from harness import (
    MANAGEMENT_PATH,
    SYNCML,
    Daemon,
    client_tls_context,
    db_rows,
    enroll_device,
    running_daemon,
    store_dsn,
)
from mdmd import pki
from mdmd.admin import DeviceListRequest, decode_cursor, encode_cursor, parse_device_list
from mdmd.commands import CommandRequestError, parse_command_request
from mdmd.sim.device import EnrollmentResult, ManagementClient, WindowsDevice
from mdmd.store import DeviceQuery
from mdmd.syncml import Item, Meta, parse_commands_fragment

ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
LIST_FIELDS = {
    "device_id",
    "host_id",
    "name",
    "model",
    "manufacturer",
    "os_version",
    "state",
    "pending_actions",
    "enrolled_at",
    "last_seen",
    "hw_dev_id_collision",
    "cert_not_after",
    "renewal",
}
SWV = "./DevDetail/SwV"
GET_SWV = {"verb": "Get", "items": [{"target": SWV}]}


@dataclass
class Enrolled:
    device: WindowsDevice
    enrollment: EnrollmentResult
    tls: ssl.SSLContext
    client: ManagementClient

    @property
    def id(self) -> str:
        return self.device.device_id

    def sync(self, daemon: Daemon, *, unenroll: bool = False) -> ManagementClient:
        """One whole OMA-DM session, as Windows runs it; the client knows
        what the server changed on the device."""
        # One client per device for its lifetime: Windows numbers its
        # sessions, and a repeated SessionID/MsgID is a retransmission.
        client = self.client
        message: bytes | None = client.session_start(self.enrollment.management_url, unenroll=unenroll)
        while message is not None:
            response, body = daemon.request(
                "POST", MANAGEMENT_PATH, message, SYNCML, section="management", context=self.tls
            )
            assert response.status == 200, body
            message = None if unenroll else client.respond(client.read(body))
        return client


@dataclass
class Fleet:
    synced: Enrolled  # has had a management session: inventory, last_seen
    fresh: Enrolled  # enrolled, never synced
    gone: Enrolled  # the user removed the work account (unenrolled)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, store_backend: str) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory.mktemp("admin"), store=store_backend) as d:
        yield d


@pytest.fixture(scope="module")
def fleet(daemon: Daemon, tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    tmp = tmp_path_factory.mktemp("admin-clients")

    def enroll(hostname: str) -> Enrolled:
        device = WindowsDevice(key=pki.generate_rsa_key(), hostname=hostname)
        result = enroll_device(daemon, device)
        assert isinstance(result, EnrollmentResult)
        tls = client_tls_context(daemon, tmp, result.certificate, device.key)
        return Enrolled(device, result, tls, ManagementClient(device))

    fleet = Fleet(enroll("DESKTOP-SYNCED"), enroll("DESKTOP-FRESH"), enroll("DESKTOP-GONE"))
    fleet.synced.sync(daemon)
    fleet.gone.sync(daemon, unenroll=True)
    return fleet


def _command_count(daemon: Daemon) -> int:
    ((count,),) = db_rows(daemon, "SELECT COUNT(*) FROM commands")
    assert isinstance(count, int)
    return count


def _queue(daemon: Daemon, device_id: str, body: object) -> str:
    status, answer = daemon.admin("POST", f"/api/v1/devices/{device_id}/commands", body)
    assert status == 201, answer
    assert isinstance(answer, dict) and set(answer) == {"command_uuid"}
    assert UUID.fullmatch(answer["command_uuid"])
    return str(answer["command_uuid"])


def _queue_as(daemon: Daemon, token: str, device_id: str) -> str:
    status, answer = daemon.admin("POST", f"/api/v1/devices/{device_id}/commands", GET_SWV, token=token)
    assert status == 201 and isinstance(answer, dict), answer
    return str(answer["command_uuid"])


def _get(daemon: Daemon, path: str) -> dict[str, Any]:
    status, answer = daemon.admin("GET", path)
    assert status == 200, answer
    assert isinstance(answer, dict)
    return answer


# --- authentication and routing ---


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/v1/devices"),
        ("GET", "/api/v1/devices/X"),
        ("POST", "/api/v1/devices/X/commands"),
        ("POST", "/api/v1/devices/X/unenroll"),
        ("GET", "/api/v1/commands/X"),
        ("GET", "/api/v1/nothing/here"),
    ],
)
def test_every_endpoint_needs_the_bearer_token(daemon: Daemon, fleet: Fleet, method: str, path: str) -> None:
    before = _command_count(daemon)
    path = path.replace("X", fleet.fresh.id)
    body = GET_SWV if method == "POST" else None
    for token in (None, "wrong-token-of-some-length", daemon.admin_token + "x"):
        status, answer = daemon.admin(method, path, body, token=token)
        assert status == 401 and isinstance(answer, dict) and "token" in answer["message"]
    assert _command_count(daemon) == before


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("DELETE", "/api/v1/devices", "GET"),
        ("POST", "/api/v1/devices", "GET"),
        ("PUT", "/api/v1/devices/X", "GET"),
        ("DELETE", "/api/v1/devices/X/commands", "GET, POST"),
        ("GET", "/api/v1/devices/X/unenroll", "POST"),
        ("POST", "/api/v1/commands/00000000-0000-4000-8000-000000000000", "GET"),
    ],
)
def test_a_wrong_method_is_405_with_allow(
    daemon: Daemon, fleet: Fleet, method: str, path: str, allow: str
) -> None:
    response, body = daemon.request(
        method,
        path.replace("X", fleet.fresh.id),
        b"{}",
        {"Authorization": f"Bearer {daemon.admin_token}"},
        section="admin",
    )
    assert response.status == 405
    assert response.getheader("Allow") == allow
    assert "not allowed" in json.loads(body)["message"]


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/",
        "/api/v1/nothing",
        "/api/v1/devices/X/nothing",
        "/api/v1/devices/X/commands/more",
        "/api/v1/devices//commands",
        "/api/v1/commands",
        "/api/v1/devices/%FF%FE",
        "/api/v1/devices/" + "A" * 300,
    ],
)
@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
def test_paths_that_name_no_resource_are_404_for_every_method(
    daemon: Daemon, fleet: Fleet, path: str, method: str
) -> None:
    status, answer = daemon.admin(
        method, path.replace("X", fleet.fresh.id), GET_SWV if method == "POST" else None
    )
    assert status == 404 and isinstance(answer, dict) and answer["message"].startswith("no such endpoint")


# --- devices ---


def test_devices_lists_every_device_with_its_fields(daemon: Daemon, fleet: Fleet) -> None:
    devices = {d["device_id"]: d for d in _get(daemon, "/api/v1/devices")["devices"]}
    assert {fleet.synced.id, fleet.fresh.id, fleet.gone.id} <= set(devices)
    for device in devices.values():
        assert set(device) == LIST_FIELDS
        assert ISO.fullmatch(device["enrolled_at"])
    synced = devices[fleet.synced.id]
    assert synced["name"] == "DESKTOP-SYNCED" and synced["state"] == "enrolled"
    # From the DevInfo the device reported in its session.
    assert (synced["manufacturer"], synced["model"]) == ("Microsoft Corporation", "Virtual Machine")
    assert synced["os_version"] == fleet.synced.device.os_version
    assert ISO.fullmatch(synced["last_seen"]) and isinstance(synced["host_id"], int)
    assert synced["hw_dev_id_collision"] is False
    fresh = devices[fleet.fresh.id]
    assert (fresh["model"], fresh["manufacturer"], fresh["last_seen"]) == (None, None, None)
    # The current certificate's end, and no renewal yet.
    assert fresh["cert_not_after"] == fleet.fresh.enrollment.certificate.not_valid_after_utc.strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )
    assert fresh["renewal"] == {"state": "none", "renewed_at": None, "reason": None}
    gone = devices[fleet.gone.id]
    assert gone["state"] == "unenrolled"
    assert gone["cert_not_after"] is None and gone["renewal"]["state"] == "none"


def test_device_shows_certificate_inventory_and_recent_commands(daemon: Daemon, fleet: Fleet) -> None:
    first = _queue(daemon, fleet.fresh.id, GET_SWV)
    second = _queue(daemon, fleet.fresh.id, {"verb": "Delete", "items": [{"target": "./Vendor/MSFT/X"}]})
    device = _get(daemon, f"/api/v1/devices/{fleet.fresh.id}")
    assert set(device) >= LIST_FIELDS
    cert = fleet.fresh.enrollment.certificate
    assert device["certificate"] == {
        "serial": pki.serial_hex(cert),
        "thumbprint": pki.thumbprint(cert),
        "not_after": cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "revoked": False,
        "revoke_reason": None,
        "renewed_from": None,
    }
    assert device["cert_not_after"] == device["certificate"]["not_after"]
    assert device["inventory"] == {}
    recent = device["recent_commands"]
    assert [c["command_uuid"] for c in recent[:2]] == [second, first]  # newest first
    assert recent[0] == {
        "command_uuid": second,
        "verb": "Delete",
        "state": "pending",
        "status": None,
        "status_text": None,
        "detail": None,
        "created_at": recent[0]["created_at"],
    }
    assert ISO.fullmatch(recent[0]["created_at"])

    synced = _get(daemon, f"/api/v1/devices/{fleet.synced.id}")
    assert synced["inventory"]["./DevInfo/DevId"] == fleet.synced.id
    assert synced["inventory"]["./DevInfo/Mod"] == "Virtual Machine"


def test_recent_commands_stop_at_twenty(daemon: Daemon, fleet: Fleet) -> None:
    for _ in range(21):
        _queue(daemon, fleet.fresh.id, GET_SWV)
    device = _get(daemon, f"/api/v1/devices/{fleet.fresh.id}")
    assert len(device["recent_commands"]) == 20


def test_an_unenrolled_device_shows_its_revoked_certificate(daemon: Daemon, fleet: Fleet) -> None:
    device = _get(daemon, f"/api/v1/devices/{fleet.gone.id}")
    assert device["state"] == "unenrolled" and ISO.fullmatch(device["unenrolled_at"])
    assert device["certificate"]["revoked"] is True


def test_a_percent_encoded_device_id_is_the_same_device(daemon: Daemon, fleet: Fleet) -> None:
    encoded = "".join(f"%{ord(ch):02X}" for ch in fleet.fresh.id)
    assert _get(daemon, f"/api/v1/devices/{encoded}")["device_id"] == fleet.fresh.id


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/api/v1/devices/NOSUCHDEVICE", None),
        ("GET", "/api/v1/devices/NOSUCHDEVICE/commands", None),
        ("POST", "/api/v1/devices/NOSUCHDEVICE/commands", GET_SWV),
        ("POST", "/api/v1/devices/NOSUCHDEVICE/unenroll", None),
        ("GET", "/api/v1/commands/00000000-0000-4000-8000-000000000000", None),
        ("GET", "/api/v1/commands/not-a-uuid", None),
    ],
)
def test_unknown_devices_and_commands_are_404(
    daemon: Daemon, method: str, path: str, body: object | None
) -> None:
    before = _command_count(daemon)
    status, answer = daemon.admin(method, path, body)
    assert status == 404 and isinstance(answer, dict)
    assert answer["message"].startswith(("no such", "no enrolled")) and answer["errors"][0]["name"] == "base"
    assert _command_count(daemon) == before


# --- queueing commands ---


def test_a_get_is_delivered_and_its_results_shown(daemon: Daemon, fleet: Fleet) -> None:
    uuid = _queue(
        daemon, fleet.synced.id, {"verb": "Get", "items": [{"target": SWV}, {"target": "./DevInfo/Lang"}]}
    )
    command = _get(daemon, f"/api/v1/commands/{uuid}")
    assert command == {
        "command_uuid": uuid,
        "device_id": fleet.synced.id,
        "verb": "Get",
        "state": "pending",
        "status": None,
        "status_text": None,
        "detail": None,
        "operation_id": None,
        "created_at": command["created_at"],
        "sent_at": None,
        "acknowledged_at": None,
        "syncml": "<Get><Item><Target><LocURI>./DevDetail/SwV</LocURI></Target></Item>"
        "<Item><Target><LocURI>./DevInfo/Lang</LocURI></Target></Item></Get>",
        "results": [],
    }

    fleet.synced.sync(daemon)

    command = _get(daemon, f"/api/v1/commands/{uuid}")
    assert command["state"] == "acknowledged" and command["status"] == 200
    assert ISO.fullmatch(command["sent_at"]) and ISO.fullmatch(command["acknowledged_at"])
    results = [r for r in command["results"] if r["kind"] == "results"]
    assert [(r["target"], r["format"], r["data"]) for r in results] == [
        (SWV, "chr", fleet.synced.device.os_version),
        ("./DevInfo/Lang", "chr", "en-US"),
    ]
    for result in command["results"]:
        assert set(result) == {"cmd_id", "kind", "status", "status_text", "target", "format", "type", "data"}
    assert any(r["kind"] == "status" and r["status_text"] == "200 OK" for r in command["results"])
    assert command["status_text"] == "200 OK"


def test_a_replace_reaches_the_device_with_format_type_and_data(daemon: Daemon, fleet: Fleet) -> None:
    target = "./Device/Vendor/MSFT/Policy/Config/Camera/AllowCamera"
    uuid = _queue(
        daemon,
        fleet.synced.id,
        {
            "verb": "Replace",
            "items": [{"target": target, "format": "int", "type": "text/plain", "data": "0"}],
        },
    )
    stored = _get(daemon, f"/api/v1/commands/{uuid}")["syncml"]
    assert parse_commands_fragment(stored)[0].items == (
        Item(target=target, meta=Meta(format="int", type="text/plain"), data="0"),
    )
    client = fleet.synced.sync(daemon)
    assert client.nodes[target] == ("int", "0")
    assert _get(daemon, f"/api/v1/commands/{uuid}")["state"] == "acknowledged"


def test_raw_syncml_is_stored_without_cmd_ids(daemon: Daemon, fleet: Fleet) -> None:
    syncml = (
        "<Atomic><CmdID>7</CmdID>"
        "<Add><CmdID>8</CmdID><Item><Target><LocURI>./Vendor/MSFT/A</LocURI></Target>"
        '<Meta><Format xmlns="syncml:metinf">node</Format></Meta></Item></Add>'
        "<Exec><CmdID>9</CmdID><Item><Target><LocURI>./Vendor/MSFT/B</LocURI></Target>"
        "<Data>go</Data></Item></Exec></Atomic>"
    )
    uuid = _queue(daemon, fleet.fresh.id, {"syncml": syncml})
    command = _get(daemon, f"/api/v1/commands/{uuid}")
    assert command["verb"] == "Atomic"
    assert command["syncml"] == re.sub(r"<CmdID>\d+</CmdID>", "", syncml)


def test_queued_calls_are_logged_with_device_and_command(daemon: Daemon, fleet: Fleet) -> None:
    uuid = _queue(daemon, fleet.fresh.id, GET_SWV)
    assert f"admin queued Get {uuid} for device {fleet.fresh.id}" in daemon.log_text()


def test_an_unenrolled_device_gets_no_commands(daemon: Daemon, fleet: Fleet) -> None:
    before = _command_count(daemon)
    status, answer = daemon.admin("POST", f"/api/v1/devices/{fleet.gone.id}/commands", GET_SWV)
    assert status == 404 and isinstance(answer, dict) and "no enrolled device" in answer["message"]
    assert _command_count(daemon) == before


def _items(*items: dict[str, object], verb: str = "Replace") -> dict[str, object]:
    return {"verb": verb, "items": list(items)}


T = "./Vendor/MSFT/Policy/Config/X/Y"
TARGET, FORMAT, TYPE, DATA = "items[0].target", "items[0].format", "items[0].type", "items[0].data"
ITEM_A = "<Item><Target><LocURI>./a</LocURI></Target></Item>"


def _one(verb: str = "Replace", **item: object) -> dict[str, object]:
    return _items(item, verb=verb)


REFUSED: list[tuple[str, object, str, str]] = [
    # (case id, body, field named, words of the reason)
    ("unknown top-level field", {**GET_SWV, "priority": 1}, "priority", "unknown field"),
    ("both forms", {**GET_SWV, "syncml": "<Get/>"}, "syncml", "not both"),
    ("neither form", {}, "verb", "required"),
    ("no verb", {"items": [{"target": SWV}]}, "verb", "required"),
    ("unknown verb", {"verb": "Copy", "items": [{"target": SWV}]}, "verb", "must be one of"),
    ("verb not a string", {"verb": ["Get"], "items": [{"target": SWV}]}, "verb", "must be one of"),
    ("lower-case verb", {"verb": "get", "items": [{"target": SWV}]}, "verb", "must be one of"),
    ("no items", {"verb": "Get"}, "items", "required"),
    ("items not a list", {"verb": "Get", "items": {"target": SWV}}, "items", "list"),
    ("items empty", {"verb": "Get", "items": []}, "items", "empty"),
    ("exec of two", _items({"target": T}, {"target": T}, verb="Exec"), "items", "exactly one"),
    ("item not an object", {"verb": "Get", "items": [SWV]}, "items[0]", "object"),
    ("no target", _one(data="1"), TARGET, "required"),
    ("target not a string", _one(target=5, data="1"), TARGET, "string"),
    ("absolute target", _one(target="/Vendor/MSFT/X", data="1"), TARGET, "./"),
    ("dot-dot target", _one(target="./Vendor/../X", data="1"), TARGET, "'..'"),
    ("empty segment", _one(target="./Vendor//X", data="1"), TARGET, "empty segment"),
    ("bad escape", _one(target="./Vendor/100%", data="1"), TARGET, "%XX"),
    ("padded target", _one(target=" ./Vendor/X", data="1"), TARGET, "whitespace"),
    ("second item bad", _items({"target": T, "data": "1"}, {"target": "x"}), "items[1].target", "./"),
    ("unknown format", _one(target=T, format="string", data="1"), FORMAT, "chr"),
    ("format not a string", _one(target=T, format=1, data="1"), FORMAT, "one of"),
    ("type with space", _one(target=T, type="text /plain", data="1"), TYPE, "spaces"),
    ("type empty", _one(target=T, type="", data="1"), TYPE, "non-empty"),
    ("data not a string", _one(target=T, format="int", data=1), DATA, "string"),
    ("data null", _one(target=T, data=None), DATA, "string"),
    ("get with data", _one("Get", target=SWV, data="x"), DATA, "no data"),
    ("delete with data", _one("Delete", target=T, data="x"), DATA, "no data"),
    ("replace without data", _one(target=T, format="int"), DATA, "required for Replace"),
    ("add without data", _one("Add", target=T), DATA, "required for Add"),
    ("node with data", _one("Add", target=T, format="node", data="x"), DATA, "node"),
    ("int not a number", _one(target=T, format="int", data="one"), DATA, "whole number"),
    ("bool not a bool", _one(target=T, format="bool", data="yes"), DATA, "true or false"),
    ("b64 not base64", _one(target=T, format="b64", data="no!"), DATA, "base64"),
    ("nul byte", _one(target=T, data="a\x00b"), DATA, "XML cannot carry"),
    ("edge whitespace", _one(target=T, data="value "), DATA, "whitespace"),
    ("unknown item field", _one(target=T, data="1", value="1"), "items[0].value", "unknown field"),
    ("syncml not a string", {"syncml": 5}, "syncml", "string"),
    ("syncml empty", {"syncml": "  "}, "syncml", "non-empty"),
    ("syncml not XML", {"syncml": "<Get><Item>"}, "syncml", "rejected"),
    ("syncml two commands", {"syncml": f"<Delete>{ITEM_A}</Delete>" * 2}, "syncml", "exactly one"),
    ("syncml alert", {"syncml": "<Alert><Data>1201</Data></Alert>"}, "syncml", "cannot be queued"),
    ("syncml get in atomic", {"syncml": f"<Atomic><Get>{ITEM_A}</Get></Atomic>"}, "syncml", "inside Atomic"),
    ("syncml typo", {"syncml": f"<Get>{ITEM_A.replace('Item>', 'Itme>')}</Get>"}, "syncml", "Itme"),
    ("syncml bad locuri", {"syncml": f"<Get>{ITEM_A.replace('./a', '/a')}</Get>"}, "syncml", "./"),
    ("syncml noresp", {"syncml": f"<Get><NoResp/>{ITEM_A}</Get>"}, "syncml", "NoResp"),
    ("syncml entity", {"syncml": f'<!DOCTYPE x [<!ENTITY e "x">]><Get>{ITEM_A}</Get>'}, "syncml", "rejected"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "name", "reason"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_a_bad_command_is_400_naming_the_field_and_stores_nothing(
    daemon: Daemon, fleet: Fleet, body: object, name: str, reason: str
) -> None:
    before = _command_count(daemon)
    status, answer = daemon.admin("POST", f"/api/v1/devices/{fleet.fresh.id}/commands", body)
    assert status == 400, answer
    assert isinstance(answer, dict) and answer["message"].startswith("invalid command: ")
    named = {e["name"]: e["reason"] for e in answer["errors"]}
    assert name in named, answer
    assert reason in named[name]
    assert _command_count(daemon) == before


@pytest.mark.parametrize(
    ("body", "name", "reason"),
    [
        pytest.param([GET_SWV], "base", "not a JSON object", id="body a list"),
        pytest.param(
            _one(target="./Vendor/\ud800", data="1"), TARGET, "lone surrogate", id="surrogate in target"
        ),
    ],
)
def test_a_body_the_json_reader_refuses_is_400_naming_the_field(
    daemon: Daemon, fleet: Fleet, body: object, name: str, reason: str
) -> None:
    before = _command_count(daemon)
    status, answer = daemon.admin("POST", f"/api/v1/devices/{fleet.fresh.id}/commands", body)
    assert status == 400, answer
    assert isinstance(answer, dict) and answer["message"].startswith("the request body is ")
    assert [e["name"] for e in answer["errors"]] == [name]
    assert reason in answer["errors"][0]["reason"]
    assert _command_count(daemon) == before


def test_the_command_checks_refuse_what_the_json_reader_lets_no_client_send() -> None:
    # parse_command_request stands on its own too (the JSON reader already
    # refuses both over HTTP).
    with pytest.raises(CommandRequestError) as info:
        parse_command_request([GET_SWV])
    assert [(f.name, f.reason) for f in info.value.errors] == [("base", "the body must be a JSON object")]
    with pytest.raises(CommandRequestError) as info:
        parse_command_request(_one(target="./Vendor/\ud800", data="1"))
    assert [f.name for f in info.value.errors] == [TARGET]
    assert "XML cannot carry" in info.value.errors[0].reason


def test_every_problem_is_reported_at_once(daemon: Daemon, fleet: Fleet) -> None:
    body = {"verb": "Frob", "items": [{"target": "x", "colour": "red"}, {"target": T, "format": "nope"}]}
    status, answer = daemon.admin("POST", f"/api/v1/devices/{fleet.fresh.id}/commands", body)
    assert status == 400 and isinstance(answer, dict)
    assert [e["name"] for e in answer["errors"]] == [
        "verb",
        "items[0].colour",
        "items[0].target",
        "items[1].format",
    ]
    assert answer["message"].endswith("(and 3 more)")


@pytest.mark.parametrize("raw", [b"", b"{not json", b"\xff\xfe\x00", b'{"verb": "Get", "items": [}'])
def test_a_body_that_is_not_json_is_400(daemon: Daemon, fleet: Fleet, raw: bytes) -> None:
    before = _command_count(daemon)
    response, body = daemon.request(
        "POST",
        f"/api/v1/devices/{fleet.fresh.id}/commands",
        raw,
        {"Authorization": f"Bearer {daemon.admin_token}", "Content-Type": "application/json"},
        section="admin",
    )
    assert response.status == 400
    assert json.loads(body)["message"].startswith("the request body is not valid JSON: ")
    assert _command_count(daemon) == before


def test_whitespace_around_b64_and_xml_data_is_trimmed_not_refused() -> None:
    queued = parse_command_request(
        _items(
            {"target": T, "format": "b64", "data": "aGVsbG8=\n"},
            {"target": T, "format": "xml", "data": " <a/> "},
        )
    )
    assert [i.data for i in parse_commands_fragment(queued.body)[0].items] == ["aGVsbG8=", "<a/>"]


def test_node_add_and_exec_without_data_are_accepted() -> None:
    assert parse_command_request(_items({"target": T, "format": "node"}, verb="Add")).verb == "Add"
    assert parse_command_request(_items({"target": T}, verb="Exec")).body == (
        "<Exec><Item><Target><LocURI>./Vendor/MSFT/Policy/Config/X/Y</LocURI></Target></Item></Exec>"
    )
    with pytest.raises(CommandRequestError):
        parse_command_request(_items({"target": T, "data": "\ud800"}))


# --- command lists ---


def test_commands_lists_newest_first_without_results(daemon: Daemon, fleet: Fleet) -> None:
    uuids = [_queue(daemon, fleet.fresh.id, GET_SWV) for _ in range(3)]
    commands = _get(daemon, f"/api/v1/devices/{fleet.fresh.id}/commands")["commands"]
    assert [c["command_uuid"] for c in commands[:3]] == uuids[::-1]
    assert set(commands[0]) == {
        "command_uuid",
        "device_id",
        "verb",
        "state",
        "status",
        "status_text",
        "detail",
        "operation_id",
        "created_at",
        "sent_at",
        "acknowledged_at",
    }
    # An unenrolled device still shows its history (empty here).
    assert _get(daemon, f"/api/v1/devices/{fleet.gone.id}/commands") == {"commands": []}


# --- unenrollment ---


def test_unenroll_tells_the_agent_and_is_logged(daemon: Daemon, fleet: Fleet) -> None:
    def agent_told_to_unenroll() -> object:
        status, config = daemon.post_json(
            "/api/fleet/orbit/config", fleet.fresh.device.orbit_config_request()
        )
        assert status == 200
        notifications = config["notifications"]
        assert isinstance(notifications, dict)
        return notifications.get("needs_programmatic_windows_mdm_unenrollment")

    assert not agent_told_to_unenroll()
    status, answer = daemon.admin("POST", f"/api/v1/devices/{fleet.fresh.id}/unenroll")
    assert status == 202 and isinstance(answer, dict)
    assert answer == {"device_id": fleet.fresh.id, "action_id": ANY, "command_uuid": ANY}
    assert agent_told_to_unenroll() is True
    # The MDM side too: the device shows it, and its next session carries
    # DMClient's Unenroll.
    device = _get(daemon, f"/api/v1/devices/{fleet.fresh.id}")
    assert device["state"] == "unenroll_pending" and device["pending_actions"] == ["unenroll"]
    command = _get(daemon, f"/api/v1/commands/{answer['command_uuid']}")
    assert "./Vendor/MSFT/DMClient/Provider/mdmd/Unenroll" in command["syncml"]
    status, again = daemon.admin("POST", f"/api/v1/devices/{fleet.fresh.id}/unenroll")
    assert status == 409 and isinstance(again, dict) and "pending" in again["message"]
    assert f"audit: admin device.unenroll {fleet.fresh.id}" in daemon.log_text()


def test_unenroll_of_an_unenrolled_device_is_404(daemon: Daemon, fleet: Fleet) -> None:
    status, answer = daemon.admin("POST", f"/api/v1/devices/{fleet.gone.id}/unenroll")
    assert status == 404 and isinstance(answer, dict) and "no enrolled device" in answer["message"]


def test_health_answers_without_a_token(daemon: Daemon) -> None:
    assert daemon.admin("GET", "/healthz") == (200, {"status": "ok"})


def test_the_request_log_names_the_device(daemon: Daemon, fleet: Fleet) -> None:
    _get(daemon, f"/api/v1/devices/{fleet.synced.id}")
    assert f"admin GET /api/v1/devices/{fleet.synced.id} 200" in daemon.log_text()
    assert f"device={fleet.synced.id}" in daemon.log_text()


# --- the device list: pages, filters, search, order ---


def _ids(daemon: Daemon, query: str) -> list[str]:
    """Every device the listing with *query* holds, following ``next``."""
    seen: list[str] = []
    path = f"/api/v1/devices?{query}"
    for _ in range(100):
        answer = _get(daemon, path)
        assert set(answer) == {"devices", "next"}
        seen += [d["device_id"] for d in answer["devices"]]
        if answer["next"] is None:
            return seen
        assert isinstance(answer["next"], str) and answer["devices"]
        path = f"/api/v1/devices?cursor={answer['next']}&limit=1"
    raise AssertionError("the listing does not end")


def test_the_device_list_is_paged_with_an_opaque_cursor(daemon: Daemon, fleet: Fleet) -> None:
    everything = _get(daemon, "/api/v1/devices")
    assert everything["next"] is None and len(everything["devices"]) >= 3
    in_order = [d["device_id"] for d in everything["devices"]]
    assert _ids(daemon, "limit=1") == in_order
    first = _get(daemon, "/api/v1/devices?limit=2")
    assert len(first["devices"]) == 2 and isinstance(first["next"], str)
    # 1,000 is the largest page.
    assert _get(daemon, "/api/v1/devices?limit=1000")["devices"] == everything["devices"]


@pytest.mark.parametrize(
    ("query", "name"),
    [
        ("limit=1001", "limit"),
        ("limit=0", "limit"),
        ("limit=ten", "limit"),
        ("limt=5", "limt"),
        ("limit=1&limit=2", "limit"),
        ("state=gone", "state"),
        ("last_seen_before=yesterday", "last_seen_before"),
        ("last_seen_after=2025-01-31T12:00:00", "last_seen_after"),
        ("cert_expiring_within=-1", "cert_expiring_within"),
        ("hw_dev_id_collision=maybe", "hw_dev_id_collision"),
        ("sort=name", "sort"),
        ("order=up", "order"),
        ("q=" + "x" * 129, "q"),
        ("cursor=bm90IGEgY3Vyc29y", "cursor"),
        ("cursor=%FF", "base"),  # not UTF-8
    ],
)
def test_a_bad_list_request_is_400_naming_the_parameter(daemon: Daemon, query: str, name: str) -> None:
    status, answer = daemon.admin("GET", f"/api/v1/devices?{query}")
    assert status == 400 and isinstance(answer, dict), answer
    assert answer["errors"][0]["name"] == name, answer


def test_a_cursor_continues_its_own_listing_only(daemon: Daemon, fleet: Fleet) -> None:
    first = _get(daemon, "/api/v1/devices?state=enrolled&limit=1")
    cursor = first["next"]
    assert cursor is not None
    status, answer = daemon.admin("GET", f"/api/v1/devices?cursor={cursor}&state=unenrolled")
    assert status == 400 and isinstance(answer, dict) and answer["errors"][0]["name"] == "state"
    # The cursor keeps its filter: no unenrolled device on any later page.
    rest = _ids(daemon, f"cursor={cursor}")
    assert fleet.gone.id not in rest and rest


def test_the_device_list_filters_and_searches(daemon: Daemon, fleet: Fleet) -> None:
    synced, fresh, gone = fleet.synced, fleet.fresh, fleet.gone
    enrolled = _ids(daemon, "state=enrolled")
    assert {synced.id, fresh.id} <= set(enrolled) and gone.id not in enrolled
    assert gone.id in _ids(daemon, "state=unenrolled")
    # Search: a case-insensitive prefix of the device ID, the hostname, the
    # serial or the hardware UUID.
    assert _ids(daemon, f"q={synced.id[:8].lower()}") == [synced.id]
    assert _ids(daemon, "q=desktop-syn") == [synced.id]
    assert _ids(daemon, f"q=sim-{synced.device.hardware_uuid[:6].lower()}") == [synced.id]
    assert _ids(daemon, f"q={fresh.device.hardware_uuid[:9].lower()}") == [fresh.id]
    assert _ids(daemon, "q=nothing-like-it") == []
    # The OS version and its revisions.
    family = synced.device.os_version.rsplit(".", 1)[0]
    assert {synced.id, fresh.id, gone.id} <= set(_ids(daemon, f"os_version={family}"))
    assert _ids(daemon, "os_version=10.0.1") == []
    # Devices seen since the epoch: the ones that checked in.
    seen = set(_ids(daemon, "last_seen_after=2000-01-01"))
    assert synced.id in seen and fresh.id not in seen
    assert fresh.id in _ids(daemon, "last_seen_before=2000-01-01T00:00:00Z")
    # Certificates of 365 days: none expires within a day, every valid one
    # within 400 days (the unenrolled device's is revoked).
    assert _ids(daemon, "cert_expiring_within=1") == []
    expiring = _ids(daemon, "cert_expiring_within=400")
    assert {synced.id, fresh.id} <= set(expiring) and gone.id not in expiring
    assert _ids(daemon, "hw_dev_id_collision=true") == []
    assert set(_ids(daemon, "hw_dev_id_collision=false")) == set(_ids(daemon, ""))


def test_the_device_list_sorts_by_last_seen_and_enrollment(daemon: Daemon, fleet: Fleet) -> None:
    everything = {d["device_id"]: d for d in _get(daemon, "/api/v1/devices")["devices"]}
    by_seen = _ids(daemon, "sort=last_seen&order=desc&limit=1")
    seen = [everything[i]["last_seen"] or "" for i in by_seen]
    # Never seen counts as the oldest: last when the newest come first.
    assert seen == sorted(seen, reverse=True)
    assert by_seen.index(fleet.synced.id) < by_seen.index(fleet.fresh.id)
    enrolled_order = [everything[i]["enrolled_at"] for i in _ids(daemon, "sort=enrolled_at&order=desc")]
    assert enrolled_order == sorted(enrolled_order, reverse=True)


def test_device_ids_are_matched_in_any_letter_case(daemon: Daemon, fleet: Fleet) -> None:
    lower = fleet.fresh.id.lower()
    assert lower != fleet.fresh.id
    assert _get(daemon, f"/api/v1/devices/{lower}")["device_id"] == fleet.fresh.id
    assert "commands" in _get(daemon, f"/api/v1/devices/{lower}/commands")
    uuid = _queue(daemon, lower, GET_SWV)
    assert _get(daemon, f"/api/v1/commands/{uuid}")["device_id"] == fleet.fresh.id


# --- who did what: named tokens and the audit log ---


def _audit(daemon: Daemon, query: str = "") -> list[dict[str, Any]]:
    return list(_get(daemon, f"/api/v1/audit?{query}")["entries"])


def test_a_queued_command_is_audited_with_who_what_and_the_locuris(daemon: Daemon, fleet: Fleet) -> None:
    camera = "./Device/Vendor/MSFT/Policy/Config/Camera/AllowCamera"
    body = {"verb": "Replace", "items": [{"target": camera, "format": "int", "data": "0"}]}
    uuid = _queue(daemon, fleet.synced.id.lower(), body)
    (entry,) = [e for e in _audit(daemon, "action=command.queue") if e["detail"]["command_uuid"] == uuid]
    assert entry["actor"] == "admin" and entry["target"] == fleet.synced.id
    assert entry["detail"] == {"command_uuid": uuid, "verb": "Replace", "targets": [camera]}
    assert entry["client"] == "127.0.0.1" and ISO.fullmatch(entry["at"]) and entry["request_id"]
    # Stored with the write: the audit row and the command row both exist.
    assert db_rows(daemon, "SELECT count(*) FROM commands WHERE uuid = ?", uuid) == [(1,)]
    assert db_rows(daemon, "SELECT actor, action FROM audit_log WHERE detail LIKE ?", f"%{uuid}%") == [
        ("admin", "command.queue")
    ]


def test_a_refused_write_and_a_read_leave_no_audit_record(daemon: Daemon, fleet: Fleet) -> None:
    ((before,),) = db_rows(daemon, "SELECT count(*) FROM audit_log")
    daemon.admin("POST", f"/api/v1/devices/{fleet.gone.id}/commands", GET_SWV)
    daemon.admin("POST", f"/api/v1/devices/{fleet.fresh.id}/commands", {"verb": "Nope"})
    _get(daemon, "/api/v1/devices")
    assert db_rows(daemon, "SELECT count(*) FROM audit_log") == [(before,)]


def test_named_tokens_are_created_once_used_and_revoked(daemon: Daemon, fleet: Fleet) -> None:
    status, created = daemon.admin("POST", "/api/v1/tokens", {"name": "ops-alice"})
    assert status == 201 and isinstance(created, dict), created
    token = created["token"]
    assert token.startswith("mdmd_") and len(token) > 40 and created["name"] == "ops-alice"
    # Stored hashed: the token itself is nowhere in the database.
    stored = db_rows(daemon, "SELECT token_hash FROM admin_tokens WHERE name = 'ops-alice'")
    assert stored == [(hashlib.sha256(token.encode()).digest(),)]
    if store_dsn(daemon) is None:  # (PostgreSQL: the query above shows what is stored)
        assert token.encode() not in (daemon.state / "mdmd.sqlite3").read_bytes()
    listed = {t["name"]: t for t in _get(daemon, "/api/v1/tokens")["tokens"]}
    assert listed["ops-alice"]["active"] is True and listed["ops-alice"]["created_by"] == "admin"
    assert "token" not in listed["ops-alice"] and listed["admin"]["active"] is True
    # The token works, and the audit log names it.
    uuid = _queue_as(daemon, token, fleet.fresh.id)
    (entry,) = [e for e in _audit(daemon, "actor=ops-alice") if e["action"] == "command.queue"]
    assert entry["detail"]["command_uuid"] == uuid
    status, refused = daemon.admin("POST", "/api/v1/tokens", {"name": "ops-alice"})
    assert status == 409 and isinstance(refused, dict) and "revoke it first" in refused["message"]
    status, _ = daemon.admin("DELETE", "/api/v1/tokens/ops-alice")
    assert status == 200
    assert daemon.admin("GET", "/api/v1/devices", token=token)[0] == 401
    assert [e["action"] for e in _audit(daemon, "target=ops-alice")] == ["token.revoke", "token.create"]
    assert daemon.admin("DELETE", "/api/v1/tokens/ops-alice")[0] == 404


@pytest.mark.parametrize(
    "body", [{"name": ""}, {"name": "has space"}, {"name": "x" * 65}, {}, {"name": "a", "extra": 1}, ["a"]]
)
def test_a_bad_token_request_is_400(daemon: Daemon, body: object) -> None:
    status, answer = daemon.admin("POST", "/api/v1/tokens", body)
    assert status == 400 and isinstance(answer, dict) and answer["errors"], answer


def test_the_last_active_token_cannot_be_revoked(daemon: Daemon) -> None:
    active = [t["name"] for t in _get(daemon, "/api/v1/tokens")["tokens"] if t["active"]]
    for name in active:
        if name != "admin":
            assert daemon.admin("DELETE", f"/api/v1/tokens/{name}")[0] == 200
    status, answer = daemon.admin("DELETE", "/api/v1/tokens/admin")
    assert status == 409 and isinstance(answer, dict) and "only active token" in answer["message"]
    assert daemon.admin("GET", "/api/v1/devices")[0] == 200


def test_the_audit_log_pages_newest_first(daemon: Daemon, fleet: Fleet) -> None:
    for _ in range(3):
        _queue(daemon, fleet.fresh.id, GET_SWV)
    everything = _audit(daemon, "limit=1000")
    ids = [e["id"] for e in everything]
    assert ids == sorted(ids, reverse=True) and len(ids) >= 3
    paged: list[int] = []
    path = "/api/v1/audit?limit=2"
    while True:
        answer = _get(daemon, path)
        paged += [e["id"] for e in answer["entries"]]
        if answer["next"] is None:
            break
        path = f"/api/v1/audit?cursor={answer['next']}"
    assert paged == ids
    assert daemon.admin("GET", "/api/v1/audit?limit=5000")[0] == 400


def test_the_version_is_answered_and_logged(daemon: Daemon) -> None:
    from mdmd import __version__
    from mdmd.store.sqlite_schema import SCHEMA_VERSION

    answer = _get(daemon, "/api/v1/version")
    assert answer["version"] == __version__ and answer["schema_version"] == SCHEMA_VERSION
    assert f"mdmd {__version__} starting" in daemon.log_text()


def test_a_list_request_becomes_a_store_query() -> None:
    wanted = parse_device_list(
        {
            "state": ["enrolled"],
            "last_seen_before": ["2025-01-31T12:00:00Z"],
            "last_seen_after": ["2025-01-01"],
            "os_version": ["10.0.22631"],
            "cert_expiring_within": ["30"],
            "hw_dev_id_collision": ["true"],
            "q": ["Desk"],
            "sort": ["last_seen"],
            "order": ["desc"],
            "limit": ["7"],
        },
        now=1000.0,
    )
    assert wanted.limit == 7 and wanted.after is None
    assert wanted.query == DeviceQuery(
        state="enrolled",
        last_seen_before=1738324800.0,
        last_seen_after=1735689600.0,
        os_version="10.0.22631",
        cert_expiring_before=1000.0 + 30 * 86400,
        hw_dev_id_collision=True,
        search="Desk",
        sort="last_seen",
        descending=True,
    )
    assert parse_device_list({}, now=0.0) == DeviceListRequest(DeviceQuery(), 100, None)


def test_a_cursor_carries_its_query_and_position_and_nothing_else_passes() -> None:
    query = DeviceQuery(state="enrolled", cert_expiring_before=5.5, search="x", descending=True)
    cursor = encode_cursor(query, (12.5, "DEV"))
    assert decode_cursor(cursor) == (query, (12.5, "DEV"))
    again = parse_device_list({"cursor": [cursor], "limit": ["3"]}, now=0.0)
    assert again == DeviceListRequest(query, 3, (12.5, "DEV"))
    raw = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    for tampered in (
        {**raw, "v": 2},
        {**raw, "a": [1.0]},
        {**raw, "a": ["1", "DEV"]},
        {**raw, "q": {**raw["q"], "sort": "name"}},
        {**raw, "q": {**raw["q"], "state": 1}},
        {**raw, "q": {**raw["q"], "extra": None}},
        {**raw, "q": {**raw["q"], "last_seen_before": float("nan")}},
    ):
        text = base64.urlsafe_b64encode(json.dumps(tampered).encode()).decode()
        with pytest.raises(ValueError, match="not a cursor"):
            decode_cursor(text)
    for junk in ("", "!!!", "x" * 5000):
        with pytest.raises(ValueError):
            decode_cursor(junk)
