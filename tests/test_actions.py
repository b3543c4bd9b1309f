"""mdmd.actions (pure): action requests, the SyncML each action sends, and
what the device's answers make of the actions and of the device."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import pytest

from mdmd.actions import (
    DNS_COMPUTER_NAME,
    ActionRequest,
    ActionRequestError,
    ActionUpdate,
    DeviceAction,
    action_command,
    check_computer_name,
    ends_enrollment,
    lifecycle_of,
    parse_action_request,
    plan_session,
    settle,
    shown_state,
    unenroll_target,
)
from mdmd.management import ManagementStep
from mdmd.syncml import Item, Meta, parse_commands_fragment


def _fields(obj: object, *, group: bool = False) -> list[str]:
    with pytest.raises(ActionRequestError) as caught:
        parse_action_request(obj, group=group)
    return [e.name for e in caught.value.errors]


def _reason(obj: object) -> str:
    with pytest.raises(ActionRequestError) as caught:
        parse_action_request(obj)
    return caught.value.errors[0].reason


# --- requests ---


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"action": "restart"}, ActionRequest("restart")),
        ({"action": "wipe", "confirm": True}, ActionRequest("wipe", mode="wipe")),
        ({"action": "wipe", "mode": "protected", "confirm": True}, ActionRequest("wipe", mode="protected")),
        ({"action": "unenroll"}, ActionRequest("unenroll")),
        ({"action": "rename", "name": "DESK-0042"}, ActionRequest("rename", name="DESK-0042")),
        ({"action": "defender_scan"}, ActionRequest("defender_scan", full=False)),
        ({"action": "defender_scan", "full": True}, ActionRequest("defender_scan", full=True)),
        ({"action": "defender_update"}, ActionRequest("defender_update")),
    ],
)
def test_valid_requests(body: dict[str, Any], expected: ActionRequest) -> None:
    assert parse_action_request(body) == expected


def test_a_wipe_needs_an_explicit_confirmation() -> None:
    for body in (
        {"action": "wipe"},
        {"action": "wipe", "confirm": False},
        {"action": "wipe", "confirm": "yes"},
        {"action": "wipe", "confirm": 1},
    ):
        assert _fields(body) == ["confirm"]
    assert "confirm" in _reason({"action": "wipe", "mode": "protected"})


def test_unknown_actions_and_options_are_named() -> None:
    assert _fields({"action": "reboot"}) == ["action"]
    assert "'reboot'" in _reason({"action": "reboot"}) and "restart" in _reason({"action": "reboot"})
    assert _fields({}) == ["action"]
    assert _fields({"action": 3}) == ["action"]
    assert _fields({"action": "restart", "force": True}) == ["force"]
    assert _fields({"action": "wipe", "mode": "everything", "confirm": True}) == ["mode"]
    assert _fields({"action": "defender_scan", "full": "yes"}) == ["full"]
    assert _fields({"action": "rename"}) == ["name"]
    assert _fields({"action": "restart", "name": "X", "mode": "wipe"}) == ["name", "mode"]
    assert _fields(["restart"]) == ["base"]


def test_remote_lock_is_refused_with_the_reason() -> None:
    for name in ("lock", "LOCK", "remote_lock"):
        assert _fields({"action": name}) == ["action"]
        assert "Windows 10 Mobile" in _reason({"action": name})


def test_rename_names_one_device_never_a_group() -> None:
    assert _fields({"action": "rename", "name": "PC-1"}, group=True) == ["action"]
    assert parse_action_request({"action": "restart"}, group=True) == ActionRequest("restart")


@pytest.mark.parametrize("name", ["A", "PC-1", "desk-42", "-x-", "X" * 15, "1A", "A1"])
def test_computer_names_accepted(name: str) -> None:
    assert check_computer_name(name) is None


@pytest.mark.parametrize("name", ["", "X" * 16, "123", "0", "PC_1", "PC 1", "PC.local", "Ünïcode", None, 5])
def test_computer_names_refused(name: object) -> None:
    assert check_computer_name(name) is not None
    assert _fields({"action": "rename", "name": name}) == ["name"]


# --- what each action sends ---


def _item(request: ActionRequest) -> tuple[str, Item]:
    body = action_command(request, provider_id="mdmd").body
    (cmd,) = parse_commands_fragment(body)
    (item,) = cmd.items
    return cmd.verb, item


@pytest.mark.parametrize(
    ("request_", "verb", "target", "fmt", "data"),
    [
        (ActionRequest("restart"), "Exec", "./Device/Vendor/MSFT/Reboot/RebootNow", "null", None),
        (ActionRequest("wipe", mode="wipe"), "Exec", "./Device/Vendor/MSFT/RemoteWipe/doWipe", "chr", None),
        (
            ActionRequest("wipe", mode="protected"),
            "Exec",
            "./Device/Vendor/MSFT/RemoteWipe/doWipeProtected",
            "chr",
            None,
        ),
        (
            ActionRequest("wipe", mode="keep-provisioning"),
            "Exec",
            "./Device/Vendor/MSFT/RemoteWipe/doWipePersistProvisionedData",
            "chr",
            None,
        ),
        (
            ActionRequest("wipe", mode="keep-user-data"),
            "Exec",
            "./Device/Vendor/MSFT/RemoteWipe/doWipePersistUserData",
            "chr",
            None,
        ),
        (ActionRequest("unenroll"), "Exec", "./Vendor/MSFT/DMClient/Provider/mdmd/Unenroll", "chr", "mdmd"),
        (ActionRequest("rename", name="DESK-1"), "Replace", DNS_COMPUTER_NAME, "chr", "DESK-1"),
        (
            ActionRequest("defender_scan", full=False),
            "Exec",
            "./Device/Vendor/MSFT/Defender/Scan",
            "chr",
            "1",
        ),
        (ActionRequest("defender_scan", full=True), "Exec", "./Device/Vendor/MSFT/Defender/Scan", "chr", "2"),
        (
            ActionRequest("defender_update"),
            "Exec",
            "./Device/Vendor/MSFT/Defender/UpdateSignature",
            "chr",
            None,
        ),
    ],
)
def test_each_action_sends_its_csp_command(
    request_: ActionRequest, verb: str, target: str, fmt: str, data: str | None
) -> None:
    assert _item(request_) == (verb, Item(target=target, meta=Meta(format=fmt), data=data))


def test_the_stored_body_is_the_syncml_without_cmdids() -> None:
    assert action_command(ActionRequest("restart"), provider_id="x").body == (
        "<Exec><Item><Target><LocURI>./Device/Vendor/MSFT/Reboot/RebootNow</LocURI></Target>"
        '<Meta><Format xmlns="syncml:metinf">null</Format></Meta></Item></Exec>'
    )


def test_the_provider_id_is_escaped_in_the_node_name() -> None:
    assert unenroll_target("Contoso MDM") == "./Vendor/MSFT/DMClient/Provider/Contoso%20MDM/Unenroll"
    _, item = _item(ActionRequest("unenroll"))
    assert item.data == "mdmd"


def test_options_round_trip() -> None:
    for request in (ActionRequest("wipe", mode="protected"), ActionRequest("defender_scan", full=True)):
        assert ActionRequest.from_options(request.action, request.options()) == request


# --- answers ---

_ids = itertools.count()


def action(kind: str, state: str = "sent", **options: object) -> DeviceAction:
    n = next(_ids)
    return DeviceAction(
        action_id=f"a{n}",
        device_id="DEV",
        action=kind,
        options=options,
        command_uuid=f"c{n}",
        state=state,
        status=None,
        detail=None,
        created_at=1.0,
        updated_at=1.0,
    )


def step(
    answered: tuple[tuple[str, int], ...] = (),
    *,
    sent: tuple[str, ...] = (),
    unenroll: bool = False,
    inventory: Mapping[str, str] | None = None,
) -> ManagementStep:
    return ManagementStep(
        device_id="DEV",
        session=None,
        answered=answered,
        sent=tuple((u, "1", 2) for u in sent),
        unenroll=unenroll,
        inventory=dict(inventory or {}),
    )


def by_id(updates: tuple[ActionUpdate, ...]) -> dict[str, tuple[str, int | None]]:
    return {u.action_id: (u.state, u.status) for u in updates}


def test_sent_then_acknowledged() -> None:
    restart = action("restart", "pending")
    out = settle([restart], step(sent=(restart.command_uuid,)))
    assert by_id(out.updates) == {restart.action_id: ("sent", None)}
    assert not out.ended and not out.lifecycle_changed
    sent = action("restart")
    out = settle([sent], step(((sent.command_uuid, 200),)))
    (update,) = out.updates
    assert (update.state, update.status) == ("acknowledged", 200)
    assert "restart" in (update.detail or "")


def test_a_failure_carries_the_code_and_its_meaning() -> None:
    scan = action("defender_scan", full=True)
    (update,) = settle([scan], step(((scan.command_uuid, 404),))).updates
    assert (update.state, update.status) == ("failed", 404)
    assert update.detail == "defender_scan failed: 404 Not found: the device has no such node; " + (
        "the CSP may be missing on this Windows edition"
    )


def test_an_accepted_wipe_ends_the_device_and_cancels_the_rest() -> None:
    wipe = action("wipe", mode="protected")
    scan = action("defender_scan", "pending")
    out = settle([wipe, scan], step(((wipe.command_uuid, 200),)))
    assert out.ended == "wiped" and out.lifecycle == "wiped" and out.lifecycle_changed
    assert by_id(out.updates) == {wipe.action_id: ("acknowledged", 200), scan.action_id: ("cancelled", None)}
    leaving = ends_enrollment([wipe, scan])
    assert leaving(wipe.command_uuid, 200) and not leaving(wipe.command_uuid, 500)
    assert not leaving(scan.command_uuid, 200)


def test_a_failed_wipe_leaves_the_device_enrolled() -> None:
    wipe = action("wipe", mode="wipe")
    out = settle([wipe], step(((wipe.command_uuid, 500),)))
    assert out.ended is None and out.lifecycle is None and out.lifecycle_changed
    assert by_id(out.updates) == {wipe.action_id: ("failed", 500)}


def test_unenrollment_ends_on_the_200_or_on_alert_1226() -> None:
    unenroll = action("unenroll")
    out = settle([unenroll], step(((unenroll.command_uuid, 200),)))
    assert out.ended == "unenrolled" and out.lifecycle is None and not out.confirmed
    # Windows' way: no status, the session aborts, then Alert 1226.
    unenroll = action("unenroll")
    out = settle([unenroll], step(unenroll=True))
    assert out.ended == "unenrolled" and out.confirmed == (unenroll.command_uuid,)
    (update,) = out.updates
    assert update.state == "acknowledged" and "1226" in (update.detail or "")
    # The user's own unenrollment, nothing pending: the device still ends.
    assert settle([], step(unenroll=True)).ended == "unenrolled"


def test_a_rename_waits_for_the_restart_and_the_reported_name() -> None:
    rename = action("rename", name="DESK-7")
    out = settle([rename], step(((rename.command_uuid, 200),)))
    assert by_id(out.updates) == {rename.action_id: ("awaiting_restart", 200)}
    waiting = action("rename", "awaiting_restart", name="DESK-7")
    uuids = (f"g{i}" for i in itertools.count())
    commands, updates = plan_session([waiting], {DNS_COMPUTER_NAME: "OLD-NAME"}, lambda: next(uuids))
    assert not updates and [c.verb for c in commands] == ["Get"]
    assert DNS_COMPUTER_NAME in commands[0].body
    # The Get's answer in the same session is enough.
    out = settle([waiting], step(inventory={DNS_COMPUTER_NAME: "desk-7"}))
    assert by_id(out.updates) == {waiting.action_id: ("acknowledged", 200)}
    commands, updates = plan_session([waiting], {DNS_COMPUTER_NAME: "DESK-7"}, lambda: next(uuids))
    assert not commands and [u.state for u in updates] == ["acknowledged"]


def test_lifecycle_and_shown_state() -> None:
    assert lifecycle_of(["restart"]) is None
    assert lifecycle_of(["unenroll", "restart"]) == "unenroll_pending"
    assert lifecycle_of(["unenroll", "wipe"]) == "wipe_pending"
    assert shown_state("enrolled", None) == "enrolled"
    assert shown_state("enrolled", "wipe_pending") == "wipe_pending"
    assert shown_state("enrolled", "unenroll_pending") == "unenroll_pending"
    assert shown_state("unenrolled", "wiped") == "wiped"
    assert shown_state("unenrolled", None) == "unenrolled"
    # Enrolled again after a wipe: enrolled, whatever was recorded before.
    assert shown_state("enrolled", "wiped") == "enrolled"
    assert shown_state("unenrolled", "wipe_pending") == "unenrolled"


def test_unrelated_answers_change_nothing() -> None:
    restart = action("restart")
    assert not settle([restart], step((("other", 200),)))
    done = action("restart", "acknowledged")
    assert not settle([done], step(((done.command_uuid, 500),)))
