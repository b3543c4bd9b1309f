"""mdmd.profiles (pure): profile requests, versions, value comparison, and
the planner's decisions message by message."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pytest

from mdmd.management import CommandResult, ManagementStep, NewCommand
from mdmd.profiles import (
    DeviceProfile,
    DeviceVars,
    Profile,
    ProfileItem,
    ProfilePlanner,
    ProfileRequestError,
    ProfileSettings,
    parse_profile_request,
    profile_syncml,
    profile_version,
    values_match,
)
from mdmd.syncml import parse_commands_fragment

A = "./Device/Vendor/MSFT/Policy/Config/Camera/AllowCamera"
B = "./Device/Vendor/MSFT/Policy/Config/System/AllowTelemetry"
DEVICE = DeviceVars("DEV1", "PC-1", "SN-1")
DAY = 86400.0


def profile(*items: tuple[str, str], name: str = "p", verb: str = "Replace") -> Profile:
    found = tuple(ProfileItem(verb, t, "int", None, d) for t, d in items)
    return Profile(name, profile_version(found), found)


class Run:
    """Drives a planner across messages the way the endpoint does, keeping
    the records and links as the store would."""

    def __init__(self, settings: ProfileSettings | None = None) -> None:
        self.records: dict[str, DeviceProfile] = {}
        self.links: dict[str, object] = {}
        self.settings = settings or ProfileSettings(verify_interval=DAY, max_retries=2)
        self.uuids = (f"u{i}" for i in itertools.count())
        self.now = 1000.0

    def planner(self) -> ProfilePlanner:
        return ProfilePlanner.for_device(
            DEVICE,
            self.records.values(),
            self.links.values(),  # type: ignore[arg-type]
            now=self.now,
            settings=self.settings,
            new_uuid=lambda: next(self.uuids),
        )

    def keep(
        self, planner: ProfilePlanner, created: Sequence[NewCommand], failed: Sequence[tuple[str, int]] = ()
    ) -> None:
        step = ManagementStep(
            "DEV1",
            None,
            created=tuple(created),
            sent=tuple((c.uuid, "1", 1) for c in created),
            failed=tuple(failed),
        )
        result = planner.finish(step)
        for record in result.records:
            self.records[record.profile] = record
        for link in result.links:
            self.links[link.command_uuid] = link
        for uuid in result.done:
            self.links.pop(uuid, None)

    def start(self, *desired: Profile) -> list[NewCommand]:
        planner = self.planner()
        commands = planner.plan_session(desired)
        self.keep(planner, commands)
        return commands

    def answer(
        self, command: NewCommand, code: int, results: Sequence[CommandResult] = ()
    ) -> list[NewCommand]:
        planner = self.planner()
        top = CommandResult("status", "9", command.verb, code)
        followups = planner.followups(command.uuid, code, [top, *results])
        self.keep(planner, followups)
        return followups


def value(target: str, data: str) -> CommandResult:
    return CommandResult("results", "9", "Get", None, target, "int", None, data)


def inner(verb: str, target: str, code: int) -> CommandResult:
    return CommandResult("status", "10", verb, code, loc_uri=target)


# --- requests ---


def test_the_syncml_and_json_forms_give_the_same_version() -> None:
    syncml = (
        f"<Atomic><Replace><CmdID>1</CmdID><Item><Target><LocURI>{A}</LocURI></Target>"
        '<Meta><Format xmlns="syncml:metinf">int</Format></Meta><Data>0</Data></Item></Replace></Atomic>'
    )
    from_syncml = parse_profile_request({"name": "cam", "syncml": syncml})
    from_json = parse_profile_request({"name": "cam", "items": [{"target": A, "format": "int", "data": "0"}]})
    assert from_syncml == from_json
    assert from_json.items == (ProfileItem("Replace", A, "int", None, "0"),)
    changed = parse_profile_request({"name": "cam", "items": [{"target": A, "format": "int", "data": "1"}]})
    assert changed.version != from_json.version


@pytest.mark.parametrize(
    ("body", "name", "reason"),
    [
        ({"name": "p", "items": [{"verb": "Delete", "target": A}]}, "items[0].verb", "Replace or Add"),
        (
            {"name": "p", "items": [{"target": A, "format": "int", "data": "1"}] * 2},
            "items[1].target",
            "already",
        ),
        (
            {"name": "p", "items": [{"target": A, "format": "chr", "data": "$MDMD_X"}]},
            "items[0].data",
            "unknown variable",
        ),
        ({"name": "p", "items": []}, "items", "empty"),
        ({"name": "p"}, "items", "required"),
        ({"items": [{"target": A, "data": "1"}]}, "name", "required"),
        ({"name": "p", "items": [{"target": A}], "extra": 1}, "extra", "unknown"),
    ],
)
def test_refusals_name_the_field(body: dict[str, object], name: str, reason: str) -> None:
    with pytest.raises(ProfileRequestError) as refused:
        parse_profile_request(body)
    assert any(e.name == name and reason in e.reason for e in refused.value.errors), refused.value.errors


def test_the_profile_goes_out_as_one_atomic_of_one_command_per_item() -> None:
    p = profile((A, "0"), (B, "1"))
    (atomic,) = parse_commands_fragment(profile_syncml(p.items, replace_targets=frozenset({B})))
    assert atomic.verb == "Atomic"
    assert [(c.verb, c.items[0].target, c.items[0].data) for c in atomic.children] == [
        ("Replace", A, "0"),
        ("Replace", B, "1"),
    ]


@pytest.mark.parametrize(
    ("fmt", "sent", "found", "same"),
    [
        ("int", "1", "01", True),
        ("int", "1", "2", False),
        ("bool", "true", "True", True),
        ("chr", "Hello", "hello", True),
        ("chr", "Hello", "Hello!", False),
        ("b64", "aGk=", "aGk", False),
        ("b64", "aGk=", "aG k=", True),
        ("int", "1", "x", False),
    ],
)
def test_values_are_compared_as_windows_returns_them(fmt: str, sent: str, found: str, same: bool) -> None:
    assert values_match(fmt, sent, found) is same


# --- the planner ---


def test_delivery_verification_and_no_resend_while_fresh() -> None:
    run = Run()
    p = profile((A, "0"), (B, "1"))
    (apply,) = run.start(p)
    assert apply.verb == "Atomic" and run.records["p"].state == "sent"
    gets = run.answer(apply, 200)
    assert [g.verb for g in gets] == ["Get", "Get"] and run.records["p"].state == "verifying"
    run.answer(gets[0], 200, [value(A, "0")])
    assert run.records["p"].state == "verifying"
    run.answer(gets[1], 200, [value(B, "1")])
    assert run.records["p"].state == "verified" and run.records["p"].verified_at == run.now
    assert run.start(p) == []
    run.now += DAY
    rereads = run.start(p)
    assert [c.verb for c in rereads] == ["Get", "Get"]


def test_a_node_that_cannot_be_read_back_counts_as_verified_by_status() -> None:
    run = Run()
    (apply,) = run.start(profile((A, "0")))
    (get,) = run.answer(apply, 200)
    run.answer(get, 405)
    record = run.records["p"]
    assert record.state == "verified" and record.detail is not None and "not readable back" in record.detail


def test_a_mismatch_after_delivery_fails_and_names_the_value() -> None:
    run = Run()
    (apply,) = run.start(profile((A, "0")))
    (get,) = run.answer(apply, 200)
    run.answer(get, 200, [value(A, "1")])
    record = run.records["p"]
    assert record.state == "failed" and record.detail == f"{A}: sent '0', the device has '1'"


def test_a_failed_profile_is_resent_at_most_max_retries_times_each_in_a_later_session() -> None:
    run = Run(ProfileSettings(verify_interval=DAY, max_retries=2))
    p = profile((A, "0"), (B, "1"))
    sends = 0
    while (commands := run.start(p)) != []:
        sends += 1
        (apply,) = commands
        run.answer(apply, 507, [inner("Replace", A, 216), inner("Replace", B, 500)])
        record = run.records["p"]
        assert (record.state, record.status) == ("failed", 500)
        assert record.detail == f"{B}: 500 Command failed: the CSP refused the command or the value"
    assert sends == 3  # the first send and two retries


def test_418_on_an_add_sends_the_atomic_again_with_replace() -> None:
    run = Run()
    (apply,) = run.start(profile((A, "0"), (B, "1"), verb="Add"))
    (again,) = run.answer(apply, 507, [inner("Add", A, 418), inner("Add", B, 216)])
    (atomic,) = parse_commands_fragment(again.body)
    assert [c.verb for c in atomic.children] == ["Replace", "Add"]
    assert run.records["p"].attempts == 0


def test_drift_is_recorded_and_the_profile_put_back() -> None:
    run = Run()
    p = profile((A, "0"))
    (apply,) = run.start(p)
    (get,) = run.answer(apply, 200)
    run.answer(get, 200, [value(A, "0")])
    run.now += DAY
    (reread,) = run.start(p)
    (repair,) = run.answer(reread, 200, [value(A, "5")])
    assert repair.verb == "Atomic" and run.records["p"].state == "sent"
    (get,) = run.answer(repair, 200)
    run.answer(get, 200, [value(A, "0")])
    assert run.records["p"].state == "verified"


def test_removal_deletes_each_node_and_a_missing_node_counts_as_removed() -> None:
    run = Run()
    p = profile((A, "0"), (B, "1"))
    (apply,) = run.start(p)
    for get in run.answer(apply, 200):
        run.answer(get, 200, [value(A, "0") if A in get.body else value(B, "1")])
    deletes = run.start()
    assert [d.verb for d in deletes] == ["Delete", "Delete"] and run.records["p"].state == "removing"
    run.answer(deletes[0], 200)
    run.answer(deletes[1], 404)
    assert run.records["p"].state == "removed" and run.records["p"].applied == ()
    assert run.start() == []


def test_a_failed_removal_is_retried_then_given_up() -> None:
    run = Run(ProfileSettings(verify_interval=DAY, max_retries=1))
    (apply,) = run.start(profile((A, "0")))
    (get,) = run.answer(apply, 200)
    run.answer(get, 200, [value(A, "0")])
    for _ in range(2):
        (delete,) = run.start()
        run.answer(delete, 425)
        assert (run.records["p"].state, run.records["p"].status) == ("failed", 425)
    assert run.start() == []


def test_a_new_version_deletes_the_nodes_it_no_longer_sets() -> None:
    run = Run()
    (apply,) = run.start(profile((A, "0"), (B, "1")))
    for get in run.answer(apply, 200):
        run.answer(get, 200, [value(A, "0") if A in get.body else value(B, "1")])
    commands = run.start(profile((A, "1")))
    assert [c.verb for c in commands] == ["Delete", "Atomic"] and B in commands[0].body


def test_an_answer_to_an_older_versions_command_changes_nothing() -> None:
    run = Run()
    (old,) = run.start(profile((A, "0")))
    run.records["p"] = DeviceProfile("p", "other-version", "sent")
    assert run.answer(old, 200) == []
    assert run.records["p"].state == "sent"


def test_a_command_the_server_could_not_send_fails_the_profile() -> None:
    run = Run()
    planner = run.planner()
    (apply,) = planner.plan_session([profile((A, "0"))])
    run.keep(planner, [apply], failed=[(apply.uuid, 416)])
    record = run.records["p"]
    assert (record.state, record.status) == ("failed", 416) and record.detail is not None
    assert run.links == {}


def test_variables_are_replaced_in_what_is_sent_and_verified() -> None:
    run = Run()
    item = ProfileItem("Replace", A, "chr", None, "$MDMD_HOSTNAME/$MDMD_SERIAL/$MDMD_DEVICE_ID")
    (apply,) = run.start(Profile("p", profile_version([item]), (item,)))
    assert "PC-1/SN-1/DEV1" in apply.body
    (get,) = run.answer(apply, 200)
    run.answer(get, 200, [CommandResult("results", "9", "Get", None, A, "chr", None, "PC-1/SN-1/DEV1")])
    assert run.records["p"].state == "verified"
