"""Configuration profiles end to end: profiles and groups through the admin
API of a real daemon, delivered to emulated Windows devices over mutual TLS,
verified by reading back, repaired on drift and removed."""

from __future__ import annotations

import itertools
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import Daemon, db_rows, running_daemon, start_daemon
from mdmd import pki
from mdmd.sim.device import ManagementClient, WindowsDevice
from omadm_helpers import Enrolled, enroll, post, run_session

CAMERA = "./Device/Vendor/MSFT/Policy/Config/Camera/AllowCamera"
TELEMETRY = "./Device/Vendor/MSFT/Policy/Config/System/AllowTelemetry"
NAME_NODE = "./Device/Vendor/MSFT/Policy/Config/Settings/AllowYourAccount"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, store_backend: str) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory.mktemp("profiles"), store=store_backend) as d:
        yield d


@pytest.fixture(scope="module")
def keys() -> list[object]:
    return [pki.generate_rsa_key() for _ in range(3)]


_n = itertools.count()


def device(daemon: Daemon, keys: list[object], tmp_path: Path) -> tuple[Enrolled, ManagementClient]:
    n = next(_n)
    enrolled = enroll(daemon, WindowsDevice(key=keys[n % len(keys)], hostname=f"PROF-{n}"), tmp_path)  # type: ignore[arg-type]
    return enrolled, ManagementClient(enrolled.device)


def admin(daemon: Daemon, method: str, path: str, body: object | None = None, expect: int = 200) -> Any:
    status, answer = daemon.admin(method, path, body)
    assert status == expect, answer
    return answer


def profile_states(daemon: Daemon, device_id: str) -> dict[str, tuple[str, Any, Any]]:
    answer = admin(daemon, "GET", f"/api/v1/devices/{device_id}/profiles")
    return {p["name"]: (p["state"], p["status"], p["detail"]) for p in answer["profiles"]}


def group_with(daemon: Daemon, name: str, *device_ids: str) -> None:
    admin(daemon, "POST", "/api/v1/groups", {"name": name}, expect=201)
    admin(daemon, "POST", f"/api/v1/groups/{name}/devices", {"add": list(device_ids)})


def replace_items(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"verb": "Replace", "target": t, "format": "int", "data": d} for t, d in pairs]


def test_a_profile_assigned_to_all_is_verified_on_every_device(
    daemon: Daemon, keys: list[object], tmp_path: Path
) -> None:
    devices = [device(daemon, keys, tmp_path) for _ in range(3)]
    syncml = (
        f"<Atomic><Replace><Item><Target><LocURI>{CAMERA}</LocURI></Target>"
        '<Meta><Format xmlns="syncml:metinf">int</Format></Meta><Data>0</Data></Item></Replace>'
        f"<Replace><Item><Target><LocURI>{TELEMETRY}</LocURI></Target>"
        '<Meta><Format xmlns="syncml:metinf">int</Format></Meta><Data>1</Data></Item></Replace></Atomic>'
    )
    created = admin(daemon, "POST", "/api/v1/profiles", {"name": "baseline", "syncml": syncml}, expect=201)
    admin(daemon, "PUT", "/api/v1/profiles/baseline/groups", {"groups": ["all"]})
    for enrolled, client in devices:
        seen = run_session(daemon, enrolled, client)
        # The Atomic, then a Get per LocURI, in one session.
        verbs = [c.tag.split("}")[1] for m in seen for c in m.commands]
        assert verbs == ["Atomic", "Get", "Get"]
        assert client.nodes[CAMERA] == ("int", "0") and client.nodes[TELEMETRY] == ("int", "1")
        assert profile_states(daemon, enrolled.id)["baseline"][0] == "verified"
    shown = admin(daemon, "GET", "/api/v1/profiles/baseline")
    assert shown["version"] == created["version"] and shown["groups"] == ["all"]
    assert shown["status"]["verified"] >= 3
    # A verified profile is not sent again while its verification is fresh.
    enrolled, client = devices[0]
    assert [m.commands for m in run_session(daemon, enrolled, client)] == [[]]
    # Leave the other tests' devices alone.
    admin(daemon, "PUT", "/api/v1/profiles/baseline/groups", {"groups": []})


def test_an_edited_profile_moves_devices_to_the_new_version(
    daemon: Daemon, keys: list[object], tmp_path: Path
) -> None:
    enrolled, client = device(daemon, keys, tmp_path)
    group_with(daemon, "edited", enrolled.id)
    first = admin(
        daemon,
        "POST",
        "/api/v1/profiles",
        {"name": "edited", "items": replace_items((CAMERA, "0"), (TELEMETRY, "1"))},
        expect=201,
    )
    admin(daemon, "PUT", "/api/v1/profiles/edited/groups", {"groups": ["edited"]})
    run_session(daemon, enrolled, client)
    second = admin(daemon, "PUT", "/api/v1/profiles/edited", {"items": replace_items((CAMERA, "1"))})
    assert second["version"] != first["version"]
    run_session(daemon, enrolled, client)
    answer = admin(daemon, "GET", f"/api/v1/devices/{enrolled.id}/profiles")
    (entry,) = [p for p in answer["profiles"] if p["name"] == "edited"]
    assert (entry["version"], entry["state"]) == (second["version"], "verified")
    assert client.nodes[CAMERA] == ("int", "1")
    # The node the new version no longer sets is deleted (the policy's default).
    assert TELEMETRY not in client.nodes


def test_drift_on_the_device_is_found_and_repaired(keys: list[object], tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    with running_daemon(tmp_path / "d") as first:
        config = first.config
        enrolled, client = device(first, keys, tmp_path)
        group_with(first, "drifting", enrolled.id)
        items = replace_items((CAMERA, "0"))
        admin(first, "POST", "/api/v1/profiles", {"name": "drifting", "items": items}, expect=201)
        admin(first, "PUT", "/api/v1/profiles/drifting/groups", {"groups": ["drifting"]})
        run_session(first, enrolled, client)
        assert profile_states(first, enrolled.id)["drifting"][0] == "verified"
        # The next check-in within the verify interval reads nothing back.
        assert [m.commands for m in run_session(first, enrolled, client)] == [[]]
    drift = client.drift(CAMERA)
    assert drift is not None and client.nodes[CAMERA] == ("int", "1")
    # Two days later (the daemon's clock moved; no waiting), the check-in
    # reads the profile back, finds the drift and puts the profile back.
    daemon = start_daemon(config, clock_offset=2 * 86400)
    try:
        seen = run_session(daemon, enrolled, client)
        verbs = [c.tag.split("}")[1] for m in seen for c in m.commands]
        assert verbs == ["Get", "Atomic", "Get"]
        assert client.nodes[CAMERA] == ("int", "0")
        answer = admin(daemon, "GET", f"/api/v1/devices/{enrolled.id}/profiles")
        (entry,) = [p for p in answer["profiles"] if p["name"] == "drifting"]
        assert entry["state"] == "verified"
        assert "drifted" in [h["state"] for h in entry["history"]]
        assert f"profile drifting drifted: {CAMERA}: sent '0', the device has '1'" in daemon.log_text()
    finally:
        daemon.stop()


def test_a_refused_locuri_fails_with_that_locuri_and_code(
    daemon: Daemon, keys: list[object], tmp_path: Path
) -> None:
    enrolled, client = device(daemon, keys, tmp_path)
    client.refuse(TELEMETRY, 404)
    group_with(daemon, "refused", enrolled.id)
    admin(
        daemon,
        "POST",
        "/api/v1/profiles",
        {"name": "refused", "items": replace_items((CAMERA, "0"), (TELEMETRY, "3"))},
        expect=201,
    )
    admin(daemon, "PUT", "/api/v1/profiles/refused/groups", {"groups": ["refused"]})
    run_session(daemon, enrolled, client)
    state, status, detail = profile_states(daemon, enrolled.id)["refused"]
    assert (state, status) == ("failed", 404)
    assert detail.startswith(f"{TELEMETRY}: 404 Not found")
    # All or nothing: the Atomic was rolled back on the device.
    assert CAMERA not in client.nodes
    assert "profile refused failed" in daemon.log_text()


def test_an_existing_node_added_again_is_set_with_replace(
    daemon: Daemon, keys: list[object], tmp_path: Path
) -> None:
    enrolled, client = device(daemon, keys, tmp_path)
    client.nodes[CAMERA] = ("int", "1")  # already set on the device
    group_with(daemon, "adding", enrolled.id)
    items = [{"verb": "Add", "target": CAMERA, "format": "int", "data": "0"}]
    admin(daemon, "POST", "/api/v1/profiles", {"name": "adding", "items": items}, expect=201)
    admin(daemon, "PUT", "/api/v1/profiles/adding/groups", {"groups": ["adding"]})
    seen = run_session(daemon, enrolled, client)
    verbs = [c.tag.split("}")[1] for m in seen for c in m.commands]
    assert verbs == ["Atomic", "Atomic", "Get"]
    assert client.nodes[CAMERA] == ("int", "0")
    assert profile_states(daemon, enrolled.id)["adding"][0] == "verified"


def test_unassigning_sends_the_deletes_and_deleting_a_profile_forgets_it(
    daemon: Daemon, keys: list[object], tmp_path: Path
) -> None:
    enrolled, client = device(daemon, keys, tmp_path)
    group_with(daemon, "leaving", enrolled.id)
    admin(
        daemon,
        "POST",
        "/api/v1/profiles",
        {"name": "leaving", "items": replace_items((CAMERA, "0"), (TELEMETRY, "1"))},
        expect=201,
    )
    admin(daemon, "PUT", "/api/v1/profiles/leaving/groups", {"groups": ["leaving"]})
    run_session(daemon, enrolled, client)
    admin(daemon, "POST", "/api/v1/groups/leaving/devices", {"remove": [enrolled.id]})
    seen = run_session(daemon, enrolled, client)
    verbs = [c.tag.split("}")[1] for m in seen for c in m.commands]
    assert verbs == ["Delete", "Delete"]
    assert CAMERA not in client.nodes and TELEMETRY not in client.nodes
    assert profile_states(daemon, enrolled.id)["leaving"][0] == "removed"
    admin(daemon, "DELETE", "/api/v1/profiles/leaving", expect=202)
    admin(daemon, "GET", "/api/v1/profiles/leaving", expect=404)
    # The device's entry stays listed as removed.
    assert profile_states(daemon, enrolled.id)["leaving"][0] == "removed"


def test_a_device_enrolled_after_the_assignment_gets_it_in_its_first_session(
    daemon: Daemon, keys: list[object], tmp_path: Path
) -> None:
    admin(
        daemon,
        "POST",
        "/api/v1/profiles",
        {"name": "late", "items": replace_items((NAME_NODE, "1"))},
        expect=201,
    )
    admin(daemon, "PUT", "/api/v1/profiles/late/groups", {"groups": ["all"]})
    enrolled, client = device(daemon, keys, tmp_path)
    seen = run_session(daemon, enrolled, client)
    assert seen[0].commands, "the first session carries the profile"
    assert profile_states(daemon, enrolled.id)["late"][0] == "verified"
    assert client.nodes[NAME_NODE] == ("int", "1")
    admin(daemon, "PUT", "/api/v1/profiles/late/groups", {"groups": []})


def test_variables_are_replaced_per_device(daemon: Daemon, keys: list[object], tmp_path: Path) -> None:
    node = "./Device/Vendor/MSFT/Policy/Config/Experience/Motd"
    enrolled, client = device(daemon, keys, tmp_path)
    group_with(daemon, "named", enrolled.id)
    items = [{"target": node, "format": "chr", "data": "hello $MDMD_HOSTNAME ($MDMD_DEVICE_ID)"}]
    admin(daemon, "POST", "/api/v1/profiles", {"name": "named", "items": items}, expect=201)
    admin(daemon, "PUT", "/api/v1/profiles/named/groups", {"groups": ["named"]})
    run_session(daemon, enrolled, client)
    assert client.nodes[node] == ("chr", f"hello {enrolled.device.hostname} ({enrolled.id})")
    assert profile_states(daemon, enrolled.id)["named"][0] == "verified"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (
            {"name": "x", "syncml": f"<Get><Item><Target><LocURI>{CAMERA}</LocURI></Target></Item></Get>"},
            "syncml",
        ),
        (
            {"name": "x", "syncml": f"<Exec><Item><Target><LocURI>{CAMERA}</LocURI></Target></Item></Exec>"},
            "syncml",
        ),
        (
            {
                "name": "x",
                "syncml": f"<Delete><Item><Target><LocURI>{CAMERA}</LocURI></Target></Item></Delete>",
            },
            "syncml",
        ),
        (
            {
                "name": "x",
                "syncml": "<Atomic><Atomic><Replace><Item><Target><LocURI>./a</LocURI></Target>"
                "<Data>1</Data></Item></Replace></Atomic></Atomic>",
            },
            "syncml",
        ),
        (
            {"name": "x", "items": [{"target": CAMERA, "format": "int", "data": "$MDMD_NOPE"}]},
            "items[0].data",
        ),
        ({"name": "x", "items": [{"target": "./a/../b", "format": "int", "data": "1"}]}, "items[0].target"),
        ({"name": "x", "items": [{"target": CAMERA, "format": "int", "data": "one"}]}, "items[0].data"),
        ({"name": "x y", "items": replace_items((CAMERA, "1"))}, "name"),
    ],
)
def test_bad_profiles_are_refused_naming_the_field_and_store_nothing(
    daemon: Daemon, body: dict[str, Any], field: str
) -> None:
    before = db_rows(daemon, "SELECT COUNT(*) FROM profiles")
    answer = admin(daemon, "POST", "/api/v1/profiles", body, expect=400)
    assert field in [e["name"] for e in answer["errors"]], answer
    assert db_rows(daemon, "SELECT COUNT(*) FROM profiles") == before


def test_profile_and_group_refusals(daemon: Daemon) -> None:
    admin(
        daemon,
        "POST",
        "/api/v1/profiles",
        {"name": "twice", "items": replace_items((CAMERA, "1"))},
        expect=201,
    )
    admin(
        daemon,
        "POST",
        "/api/v1/profiles",
        {"name": "twice", "items": replace_items((CAMERA, "1"))},
        expect=409,
    )
    admin(daemon, "PUT", "/api/v1/profiles/nope", {"items": replace_items((CAMERA, "1"))}, expect=404)
    answer = admin(daemon, "PUT", "/api/v1/profiles/twice/groups", {"groups": ["ghosts"]}, expect=400)
    assert "ghosts" in answer["message"]
    admin(daemon, "POST", "/api/v1/groups", {"name": "all"}, expect=400)
    admin(daemon, "POST", "/api/v1/groups", {"name": "team"}, expect=201)
    admin(daemon, "POST", "/api/v1/groups", {"name": "team"}, expect=409)
    answer = admin(daemon, "POST", "/api/v1/groups/team/devices", {"add": ["NOT-A-DEVICE"]}, expect=400)
    assert answer["errors"] == [{"name": "add", "reason": "no such device: NOT-A-DEVICE"}]
    admin(daemon, "DELETE", "/api/v1/groups/all", expect=400)
    admin(daemon, "DELETE", "/api/v1/groups/team", expect=204)
    admin(daemon, "GET", "/api/v1/groups/team", expect=404)


def test_group_members_are_paged(daemon: Daemon, keys: list[object], tmp_path: Path) -> None:
    members = sorted(device(daemon, keys, tmp_path)[0].id for _ in range(3))
    group_with(daemon, "paged", *members)
    first = admin(daemon, "GET", "/api/v1/groups/paged?limit=2")
    assert first["members"] == 3 and first["devices"] == members[:2] and first["next"]
    second = admin(daemon, "GET", f"/api/v1/groups/paged?limit=2&cursor={first['next']}")
    assert second["devices"] == members[2:] and second["next"] is None
    admin(daemon, "GET", "/api/v1/groups/paged?limit=5000", expect=400)
    groups = {g["name"]: g for g in admin(daemon, "GET", "/api/v1/groups")["groups"]}
    assert groups["all"]["builtin"] and groups["paged"]["members"] == 3
    assert db_rows(daemon, "SELECT COUNT(*) FROM group_members WHERE group_name = 'paged'") == [(3,)]


def test_kill_9_between_messages_loses_nothing_and_sends_nothing_twice(
    keys: list[object], tmp_path: Path
) -> None:
    """The daemon is killed after each reply of a profile's session; each
    time a new one continues the same session from what was committed."""
    (tmp_path / "d").mkdir()
    with running_daemon(tmp_path / "d") as first:
        config = first.config
        enrolled, client = device(first, keys, tmp_path)
        group_with(first, "crash", enrolled.id)
        items = replace_items((CAMERA, "0"), (TELEMETRY, "1"))
        admin(first, "POST", "/api/v1/profiles", {"name": "crash", "items": items}, expect=201)
        admin(first, "PUT", "/api/v1/profiles/crash/groups", {"groups": ["crash"]})
    daemon = start_daemon(config)
    sent: list[str] = []
    message: bytes | None = client.session_start(enrolled.enrollment.management_url)
    try:
        while message is not None:
            status, body = post(daemon, enrolled, message)
            assert status == 200, body
            server = client.read(body)
            sent += [c.tag.split("}")[1] for c in server.commands]
            # The reply left: kill -9, and let a new process take over.
            daemon.proc.send_signal(signal.SIGKILL)
            daemon.proc.wait()
            daemon = start_daemon(config)
            message = client.respond(server)
        assert sent == ["Atomic", "Get", "Get"]
        assert profile_states(daemon, enrolled.id)["crash"][0] == "verified"
        rows = db_rows(
            daemon,
            "SELECT c.verb, c.state, c.status FROM commands c WHERE c.device_id = ? ORDER BY c.seq",
            enrolled.id,
        )
        assert rows == [
            ("Atomic", "acknowledged", 200),
            ("Get", "acknowledged", 200),
            ("Get", "acknowledged", 200),
        ]
        assert db_rows(daemon, "PRAGMA integrity_check") == [("ok",)]
    finally:
        daemon.stop()


def test_the_device_list_filters_by_group(daemon: Daemon, keys: list[object], tmp_path: Path) -> None:
    # In the order of enrollment, the list's default order.
    inside = [device(daemon, keys, tmp_path)[0].id for _ in range(2)]
    outside = device(daemon, keys, tmp_path)[0].id
    group_with(daemon, "listed", *inside)
    first = admin(daemon, "GET", "/api/v1/devices?group=listed&limit=1")
    assert [d["device_id"] for d in first["devices"]] == inside[:1] and first["next"]
    rest = admin(daemon, "GET", f"/api/v1/devices?limit=1&cursor={first['next']}")
    assert [d["device_id"] for d in rest["devices"]] == inside[1:] and rest["next"] is None
    everyone = admin(daemon, "GET", "/api/v1/devices?group=all&limit=1000")
    assert set(inside) | {outside} <= {d["device_id"] for d in everyone["devices"]}
    assert admin(daemon, "GET", "/api/v1/devices?group=nobody")["devices"] == []
