"""Device actions end to end: the admin API of a real daemon, emulated
Windows PCs over mutual TLS carrying each action out as Windows does,
group operations and their progress, refusals, and kill -9 between
queueing and delivery and in the middle of a fan-out."""

from __future__ import annotations

import itertools
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import Daemon, db_rows, running_daemon, start_daemon
from mdmd import pki
from mdmd.sim.device import ManagementClient, WindowsDevice
from omadm_helpers import Enrolled, enroll, post, run_session

REBOOT = "./Device/Vendor/MSFT/Reboot/RebootNow"
SCAN = "./Device/Vendor/MSFT/Defender/Scan"
UPDATE = "./Device/Vendor/MSFT/Defender/UpdateSignature"
DNS_NAME = "./DevDetail/Ext/Microsoft/DNSComputerName"
NOT_FOUND = "404 Not found: the device has no such node; the CSP may be missing on this Windows edition"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, store_backend: str) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory.mktemp("actions"), store=store_backend) as d:
        yield d


@pytest.fixture(scope="module")
def keys() -> list[object]:
    return [pki.generate_rsa_key() for _ in range(3)]


_n = itertools.count()


def pc(daemon: Daemon, keys: list[object], tmp_path: Path) -> tuple[Enrolled, ManagementClient]:
    n = next(_n)
    device = WindowsDevice(key=keys[n % len(keys)], hostname=f"ACT-{n}")  # type: ignore[arg-type]
    enrolled = enroll(daemon, device, tmp_path)
    return enrolled, ManagementClient(enrolled.device)


def admin(daemon: Daemon, method: str, path: str, body: object | None = None, expect: int = 200) -> Any:
    status, answer = daemon.admin(method, path, body)
    assert status == expect, answer
    return answer


def act(daemon: Daemon, device_id: str, body: dict[str, object], expect: int = 201) -> Any:
    return admin(daemon, "POST", f"/api/v1/devices/{device_id}/actions", body, expect)


def actions(daemon: Daemon, device_id: str) -> list[dict[str, Any]]:
    return list(admin(daemon, "GET", f"/api/v1/devices/{device_id}/actions")["actions"])


def verbs(seen: list[Any]) -> list[tuple[str, str]]:
    """(verb, first LocURI) of every command the device received."""
    out = []
    for message in seen:
        for cmd in message.commands:
            target = cmd.findtext(".//{SYNCML:SYNCML1.2}LocURI") or ""
            out.append((cmd.tag.split("}")[1], target))
    return out


def command_count(daemon: Daemon) -> int:
    ((count,),) = db_rows(daemon, "SELECT COUNT(*) FROM commands")
    assert isinstance(count, int)
    return count


def until(what: Callable[[], Any], *, seconds: float = 20.0) -> Any:
    """Poll *what* until it is true, within a bound."""
    deadline = time.monotonic() + seconds
    while True:
        found = what()
        if found:
            return found
        assert time.monotonic() < deadline, "not within the bound"
        time.sleep(0.05)


# --- one device ---


def test_restart_runs_at_the_end_of_the_session_and_the_next_one_starts_over(
    daemon: Daemon, keys: list[object], tmp_path: Path
) -> None:
    enrolled, client = pc(daemon, keys, tmp_path)
    answer = act(daemon, enrolled.id, {"action": "restart"})
    device = admin(daemon, "GET", f"/api/v1/devices/{enrolled.id}")
    assert device["state"] == "enrolled" and device["pending_actions"] == ["restart"]
    (shown,) = [a for a in device["actions"] if a["action_id"] == answer["action_id"]]
    assert (shown["state"], shown["command_uuid"]) == ("pending", answer["command_uuid"])
    assert verbs(run_session(daemon, enrolled, client)) == [("Exec", REBOOT)]
    (restart,) = actions(daemon, enrolled.id)
    assert (restart["state"], restart["status"], restart["status_text"]) == ("acknowledged", 200, "200 OK")
    assert "restarts" in restart["detail"]
    command = admin(daemon, "GET", f"/api/v1/commands/{answer['command_uuid']}")
    assert (command["state"], command["status_text"]) == ("acknowledged", "200 OK")
    assert client.restart_pending
    # The restarted PC numbers its sessions anew: the server follows.
    seen = run_session(daemon, enrolled, client)
    assert client.restarts == 1 and seen[0].hdr_status == 200 and seen[0].commands == []
    assert admin(daemon, "GET", f"/api/v1/devices/{enrolled.id}")["pending_actions"] == []


def test_a_protected_wipe_needs_confirmation_then_the_device_is_gone(
    daemon: Daemon, keys: list[object], tmp_path: Path
) -> None:
    enrolled, client = pc(daemon, keys, tmp_path)
    before = command_count(daemon)
    refused = act(daemon, enrolled.id, {"action": "wipe", "mode": "protected"}, expect=400)
    assert [e["name"] for e in refused["errors"]] == ["confirm"] and "confirm" in refused["message"]
    assert command_count(daemon) == before
    act(daemon, enrolled.id, {"action": "wipe", "mode": "protected", "confirm": True})
    assert admin(daemon, "GET", f"/api/v1/devices/{enrolled.id}")["state"] == "wipe_pending"
    listed = {d["device_id"]: d for d in admin(daemon, "GET", "/api/v1/devices")["devices"]}
    assert listed[enrolled.id]["state"] == "wipe_pending" and listed[enrolled.id]["pending_actions"] == [
        "wipe"
    ]
    assert verbs(run_session(daemon, enrolled, client)) == [
        ("Exec", "./Device/Vendor/MSFT/RemoteWipe/doWipeProtected")
    ]
    assert client.wiped and client.gone
    device = admin(daemon, "GET", f"/api/v1/devices/{enrolled.id}")
    assert device["state"] == "wiped" and device["certificate"]["revoked"] is True
    assert device["pending_actions"] == []
    (wipe,) = device["actions"]
    assert (wipe["state"], wipe["status"]) == ("acknowledged", 200) and "doWipeProtected" in wipe["detail"]
    assert f"device {enrolled.id} wiped: certificate revoked" in daemon.log_text()
    # Its certificate opens no session any more.
    status, body = post(daemon, enrolled, ManagementClient(enrolled.device).session_start("https://x/"))
    assert status == 200 and b"<Data>403</Data>" in body
    # And nothing more is queued for it.
    refused = act(daemon, enrolled.id, {"action": "restart"}, expect=409)
    assert "wiped" in refused["message"]
    get = {"verb": "Get", "items": [{"target": "./DevDetail/SwV"}]}
    admin(daemon, "POST", f"/api/v1/devices/{enrolled.id}/commands", get, expect=404)


def test_mdm_side_unenroll_ends_with_the_devices_alert_1226(
    daemon: Daemon, keys: list[object], tmp_path: Path
) -> None:
    enrolled, client = pc(daemon, keys, tmp_path)
    answer = act(daemon, enrolled.id, {"action": "unenroll"})
    assert admin(daemon, "GET", f"/api/v1/devices/{enrolled.id}")["state"] == "unenroll_pending"
    # The agent is told too.
    status, config = daemon.post_json("/api/fleet/orbit/config", enrolled.device.orbit_config_request())
    assert status == 200 and config["notifications"]["needs_programmatic_windows_mdm_unenrollment"]  # type: ignore[index]
    act(daemon, enrolled.id, {"action": "unenroll"}, expect=409)
    # Windows does not answer the Exec: it drops the session...
    seen = run_session(daemon, enrolled, client)
    assert verbs(seen) == [("Exec", "./Vendor/MSFT/DMClient/Provider/mdmd/Unenroll")]
    assert client.unenrolling
    assert admin(daemon, "GET", f"/api/v1/devices/{enrolled.id}")["state"] == "unenroll_pending"
    # ... and reports the unenrollment in a new one.
    run_session(daemon, enrolled, client)
    assert client.gone
    device = admin(daemon, "GET", f"/api/v1/devices/{enrolled.id}")
    assert device["state"] == "unenrolled" and device["certificate"]["revoked"] is True
    (unenroll,) = device["actions"]
    assert unenroll["state"] == "acknowledged" and "1226" in unenroll["detail"]
    command = admin(daemon, "GET", f"/api/v1/commands/{answer['command_uuid']}")
    assert command["state"] == "acknowledged" and command["detail"] == "confirmed by the device's Alert 1226"
    assert "unenrolled" in act(daemon, enrolled.id, {"action": "defender_update"}, expect=409)["message"]


def test_a_rename_takes_effect_after_a_restart_and_shows_in_inventory(
    daemon: Daemon, keys: list[object], tmp_path: Path
) -> None:
    enrolled, client = pc(daemon, keys, tmp_path)
    for bad in ("12345", "WAY-TOO-LONG-NAME", "no_underscore", ""):
        refused = act(daemon, enrolled.id, {"action": "rename", "name": bad}, expect=400)
        assert [e["name"] for e in refused["errors"]] == ["name"]
    act(daemon, enrolled.id, {"action": "rename", "name": "DESK-NEW"})
    assert verbs(run_session(daemon, enrolled, client)) == [("Replace", DNS_NAME)]
    (rename,) = actions(daemon, enrolled.id)
    assert rename["state"] == "awaiting_restart" and "after a restart" in rename["detail"]
    # Not restarted yet: the session asks for the name, still the old one.
    assert verbs(run_session(daemon, enrolled, client)) == [("Get", DNS_NAME)]
    device = admin(daemon, "GET", f"/api/v1/devices/{enrolled.id}")
    assert device["inventory"][DNS_NAME] == enrolled.device.hostname != "DESK-NEW"
    assert actions(daemon, enrolled.id)[0]["state"] == "awaiting_restart"
    act(daemon, enrolled.id, {"action": "restart"})
    run_session(daemon, enrolled, client)
    # After the restart the name is in effect: reported, and the rename done.
    assert verbs(run_session(daemon, enrolled, client)) == [("Get", DNS_NAME)]
    device = admin(daemon, "GET", f"/api/v1/devices/{enrolled.id}")
    assert device["inventory"][DNS_NAME] == "DESK-NEW"
    rename = next(a for a in device["actions"] if a["action"] == "rename")
    assert (rename["state"], rename["detail"]) == ("acknowledged", "the device reports its new name")
    assert verbs(run_session(daemon, enrolled, client)) == []


def test_defender_scan_and_signature_update(daemon: Daemon, keys: list[object], tmp_path: Path) -> None:
    enrolled, client = pc(daemon, keys, tmp_path)
    act(daemon, enrolled.id, {"action": "defender_scan", "full": True})
    act(daemon, enrolled.id, {"action": "defender_update"})
    assert verbs(run_session(daemon, enrolled, client)) == [("Exec", SCAN), ("Exec", UPDATE)]
    assert client.scans == ["2"] and client.executed == [SCAN, UPDATE]
    details = {a["action"]: (a["state"], a["detail"]) for a in actions(daemon, enrolled.id)}
    assert details == {
        "defender_scan": ("acknowledged", "Defender started a full scan"),
        "defender_update": ("acknowledged", "Defender started a signature update"),
    }


def test_a_failed_action_reads_with_its_meaning_and_is_logged_once(
    daemon: Daemon, keys: list[object], tmp_path: Path
) -> None:
    enrolled, client = pc(daemon, keys, tmp_path)
    client.refuse("./Device/Vendor/MSFT/Defender", 404)  # a PC without the Defender CSP
    answer = act(daemon, enrolled.id, {"action": "defender_scan"})
    run_session(daemon, enrolled, client)
    (scan,) = actions(daemon, enrolled.id)
    assert (scan["state"], scan["status"], scan["status_text"]) == ("failed", 404, NOT_FOUND)
    assert scan["detail"] == f"defender_scan failed: {NOT_FOUND}"
    command = admin(daemon, "GET", f"/api/v1/commands/{answer['command_uuid']}")
    assert (command["state"], command["status_text"]) == ("failed", NOT_FOUND)
    assert [r["status_text"] for r in command["results"]] == [NOT_FOUND]
    line = f"device {enrolled.id} failed action defender_scan {answer['command_uuid']}: {NOT_FOUND}"
    assert daemon.log_text().count(line) == 1
    # A failed action may be asked again.
    act(daemon, enrolled.id, {"action": "defender_scan"})


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"action": "lock"}, "action", "Windows 10 Mobile"),
        ({"action": "remote_lock"}, "action", "Windows 10 Mobile"),
        ({"action": "reboot"}, "action", "unknown action 'reboot'"),
        ({"action": "restart", "when": "now"}, "when", "not an option of restart"),
        ({"action": "wipe", "mode": "gently", "confirm": True}, "mode", "must be one of"),
        ({"action": "wipe", "confirm": False}, "confirm", "confirm"),
        ({"action": "defender_scan", "full": "yes"}, "full", "true"),
        ({"action": "rename"}, "name", "required"),
    ],
)
def test_refused_actions_name_what_is_wrong_and_store_nothing(
    daemon: Daemon, keys: list[object], tmp_path: Path, body: dict[str, object], field: str, words: str
) -> None:
    device_id = admin(daemon, "GET", "/api/v1/groups/all")["devices"][0]
    before = command_count(daemon)
    refused = act(daemon, device_id, body, expect=400)
    assert field in [e["name"] for e in refused["errors"]] and words in refused["message"]
    assert command_count(daemon) == before


def test_unknown_devices_and_pending_actions(daemon: Daemon, keys: list[object], tmp_path: Path) -> None:
    assert "no such device" in act(daemon, "NOSUCHDEVICE", {"action": "restart"}, expect=404)["message"]
    admin(daemon, "GET", "/api/v1/devices/NOSUCHDEVICE/actions", expect=404)
    enrolled, _ = pc(daemon, keys, tmp_path)
    act(daemon, enrolled.id, {"action": "defender_update"})
    refused = act(daemon, enrolled.id, {"action": "defender_update"}, expect=409)
    assert refused["message"] == f"device {enrolled.id} has a defender_update pending already"
    act(daemon, enrolled.id, {"action": "restart"})


# --- groups ---


def _progress(daemon: Daemon, operation_id: str) -> dict[str, Any]:
    return dict(admin(daemon, "GET", f"/api/v1/operations/{operation_id}"))


def test_a_group_action_reaches_every_member_with_progress_counts(
    daemon: Daemon, keys: list[object], tmp_path: Path
) -> None:
    members = [pc(daemon, keys, tmp_path) for _ in range(3)]
    left, left_client = pc(daemon, keys, tmp_path)
    admin(daemon, "POST", "/api/v1/groups", {"name": "lab"}, expect=201)
    ids = [e.id for e, _ in members] + [left.id]
    admin(daemon, "POST", "/api/v1/groups/lab/devices", {"add": ids})
    # One member left before the operation: it is skipped.
    run_session(daemon, left, left_client)
    left_client.unenrolling = True
    run_session(daemon, left, left_client)
    operation_id = admin(daemon, "POST", "/api/v1/groups/lab/actions", {"action": "defender_update"}, 202)[
        "operation_id"
    ]
    progress = until(lambda: (p := _progress(daemon, operation_id))["state"] == "delivering" and p)
    assert {k: progress[k] for k in ("total", "queued", "skipped", "acknowledged", "failed")} == {
        "total": 4,
        "queued": 3,
        "skipped": 1,
        "acknowledged": 0,
        "failed": 0,
    }
    (first, first_client), (second, second_client), (third, third_client) = members
    run_session(daemon, first, first_client)
    run_session(daemon, second, second_client)
    progress = _progress(daemon, operation_id)
    assert (progress["acknowledged"], progress["failed"], progress["state"]) == (2, 0, "delivering")
    third_client.refuse("./Device/Vendor/MSFT/Defender", 404)
    run_session(daemon, third, third_client)
    progress = _progress(daemon, operation_id)
    assert (progress["acknowledged"], progress["failed"], progress["waiting"]) == (2, 1, 0)
    assert progress["state"] == "done" and progress["finished_at"]
    for enrolled, _ in members:
        (done,) = actions(daemon, enrolled.id)
        assert done["operation_id"] == operation_id


def test_a_command_for_all_reaches_every_enrolled_device(
    daemon: Daemon, keys: list[object], tmp_path: Path
) -> None:
    enrolled, client = pc(daemon, keys, tmp_path)
    get = {"verb": "Get", "items": [{"target": "./DevDetail/SwV"}]}
    operation_id = admin(daemon, "POST", "/api/v1/groups/all/commands", get, 202)["operation_id"]
    progress = until(
        lambda: (p := _progress(daemon, operation_id))["state"] != "queuing" and p["total"] and p
    )
    everyone = admin(daemon, "GET", "/api/v1/groups/all")["members"]
    assert progress["total"] == progress["queued"] == everyone
    assert verbs(run_session(daemon, enrolled, client)) == [("Get", "./DevDetail/SwV")]
    assert _progress(daemon, operation_id)["acknowledged"] == 1
    assert db_rows(daemon, "SELECT COUNT(*) FROM commands WHERE operation_id = ?", operation_id) == [
        (everyone,)
    ]


@pytest.mark.parametrize(
    ("path", "body", "status", "words"),
    [
        ("/api/v1/groups/nosuch/actions", {"action": "restart"}, 404, "no such group"),
        (
            "/api/v1/groups/nosuch/commands",
            {"verb": "Get", "items": [{"target": "./A"}]},
            404,
            "no such group",
        ),
        ("/api/v1/groups/all/actions", {"action": "rename", "name": "PC-1"}, 400, "cannot go to a group"),
        ("/api/v1/groups/all/actions", {"action": "lock"}, 400, "Windows 10 Mobile"),
        ("/api/v1/groups/all/actions", {"action": "wipe"}, 400, "confirm"),
        ("/api/v1/groups/all/commands", {"verb": "Got", "items": [{"target": "./A"}]}, 400, "verb"),
    ],
)
def test_group_refusals(daemon: Daemon, path: str, body: object, status: int, words: str) -> None:
    ((before,),) = db_rows(daemon, "SELECT COUNT(*) FROM operations")
    refused = admin(daemon, "POST", path, body, expect=status)
    assert words in refused["message"]
    assert db_rows(daemon, "SELECT COUNT(*) FROM operations") == [(before,)]
    admin(daemon, "GET", "/api/v1/operations/no-such-operation", expect=404)


# --- kill -9 ---


def _kill(daemon: Daemon) -> None:
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait()


def test_kill_9_between_queueing_and_delivery_loses_nothing_and_does_nothing_twice(
    keys: list[object], tmp_path: Path
) -> None:
    (tmp_path / "d").mkdir()
    with running_daemon(tmp_path / "d") as first:
        config = first.config
        enrolled, client = pc(first, keys, tmp_path)
        answer = act(first, enrolled.id, {"action": "defender_scan", "full": True})
        # The 201 left: kill -9 at once.
        _kill(first)
    daemon = start_daemon(config)
    try:
        seen = []
        message: bytes | None = client.session_start(enrolled.enrollment.management_url)
        while message is not None:
            status, body = post(daemon, enrolled, message)
            assert status == 200, body
            server = client.read(body)
            seen.append(server)
            # Each reply left: kill -9, and a new process goes on.
            _kill(daemon)
            daemon = start_daemon(config)
            message = client.respond(server)
        assert verbs(seen) == [("Exec", SCAN)] and client.scans == ["2"]
        run_session(daemon, enrolled, client)  # nothing sent again
        assert client.scans == ["2"]
        (scan,) = actions(daemon, enrolled.id)
        assert (scan["action_id"], scan["state"], scan["status"]) == (
            answer["action_id"],
            "acknowledged",
            200,
        )
        assert db_rows(daemon, "SELECT state, status FROM commands WHERE device_id = ?", enrolled.id) == [
            ("acknowledged", 200)
        ]
    finally:
        daemon.stop()


def test_kill_9_in_the_middle_of_a_fan_out_resumes_without_duplicates(
    keys: list[object], tmp_path: Path
) -> None:
    (tmp_path / "d").mkdir()
    slow = {"actions": {"fanout_batch": "2", "fanout_pause": "400ms"}}
    with running_daemon(tmp_path / "d", slow) as first:
        config = first.config
        ids = [pc(first, keys, tmp_path)[0].id for _ in range(7)]
        admin(first, "POST", "/api/v1/groups", {"name": "crash"}, expect=201)
        admin(first, "POST", "/api/v1/groups/crash/devices", {"add": ids})
        operation_id = admin(first, "POST", "/api/v1/groups/crash/actions", {"action": "restart"}, 202)[
            "operation_id"
        ]

        def half_way() -> bool:
            rows = db_rows(first, "SELECT queued, state FROM operations WHERE operation_id = ?", operation_id)
            return bool(rows) and rows[0][1] == "queuing" and 2 <= int(rows[0][0]) < 7

        until(half_way)
        _kill(first)
    ((queued_before,),) = db_rows(first, "SELECT queued FROM operations WHERE operation_id = ?", operation_id)
    daemon = start_daemon(config)
    try:
        progress = until(lambda: (p := _progress(daemon, operation_id))["state"] == "delivering" and p)
        assert (progress["total"], progress["queued"], progress["skipped"]) == (7, 7, 0)
        per_device = db_rows(
            daemon,
            "SELECT device_id, COUNT(*) FROM device_actions WHERE operation_id = ? GROUP BY device_id",
            operation_id,
        )
        assert sorted(per_device) == sorted((device_id, 1) for device_id in ids)
        assert db_rows(daemon, "SELECT COUNT(*) FROM commands WHERE operation_id = ?", operation_id) == [(7,)]
        assert f"resuming after {queued_before} members" in daemon.log_text()
        assert db_rows(daemon, "PRAGMA integrity_check") == [("ok",)]
    finally:
        daemon.stop()
