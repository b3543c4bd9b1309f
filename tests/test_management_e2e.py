"""OMA-DM management end to end: devices enrolled through the real enrollment
endpoints, then sessions over mutual TLS with the certificate they were issued,
driven by the Windows device emulator (mdmd.sim.device)."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from lxml import etree

from harness import (
    Daemon,
    client_tls_context,
    daemon_env,
    db_rows,
    enroll_device,
    running_daemon,
    start_daemon,
)
from mdmd import pki
from mdmd.sim.device import EnrollmentResult, ManagementClient, ServerMessage, WindowsDevice
from omadm_helpers import Enrolled, command_state, enroll, get, post, queue, run_session


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, store_backend: str) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory.mktemp("mgmt"), store=store_backend) as d:
        yield d


@pytest.fixture(scope="module")
def keys() -> list[object]:
    return [pki.generate_rsa_key() for _ in range(4)]


_counter = iter(range(1000))


@pytest.fixture
def enrolled(daemon: Daemon, keys: list[object], tmp_path: Path) -> Enrolled:
    """A freshly enrolled device (its own host, its own certificate)."""
    n = next(_counter)
    device = WindowsDevice(key=keys[n % len(keys)], hostname=f"PC-{n}")  # type: ignore[arg-type]
    return enroll(daemon, device, tmp_path)


def hdr_status(body: bytes) -> int:
    """The server's status for our SyncHdr (CmdRef 0)."""
    root = etree.fromstring(body)
    ns = "{SYNCML:SYNCML1.2}"
    for status in root.iter(f"{ns}Status"):
        if status.findtext(f"{ns}CmdRef") == "0":
            return int(status.findtext(f"{ns}Data") or 0)
    raise AssertionError("no SyncHdr status")


# --- sessions ---


def test_session_start_stores_inventory_and_last_seen(daemon: Daemon, enrolled: Enrolled) -> None:
    client = ManagementClient(enrolled.device)
    seen = run_session(daemon, enrolled, client)
    assert len(seen) == 1 and seen[0].final and not seen[0].commands
    status, device = daemon.admin("GET", f"/api/v1/devices/{enrolled.id}")
    assert status == 200 and isinstance(device, dict)
    assert device["model"] == "Virtual Machine" and device["manufacturer"] == "Microsoft Corporation"
    assert device["last_seen"] is not None
    assert device["inventory"]["./DevInfo/DevId"] == enrolled.id


def test_mdmctl_get_is_delivered_in_the_next_session_with_its_results(
    daemon: Daemon, enrolled: Enrolled
) -> None:
    env = daemon_env()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mdmd.mdmctl",
            "--config",
            str(daemon.config),
            "get",
            enrolled.id,
            "./DevDetail/SwV",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    uuid = done.stdout.split()[-1]
    status, command = daemon.admin("GET", f"/api/v1/commands/{uuid}")
    assert status == 200 and isinstance(command, dict) and command["state"] == "pending"

    client = ManagementClient(enrolled.device)
    seen = run_session(daemon, enrolled, client)
    gets = [c for m in seen for c in m.commands]
    assert len(gets) == 1

    status, command = daemon.admin("GET", f"/api/v1/commands/{uuid}")
    assert status == 200 and isinstance(command, dict)
    assert command["state"] == "acknowledged" and command["status"] == 200
    results = [r for r in command["results"] if r["kind"] == "results"]
    assert [(r["target"], r["data"]) for r in results] == [("./DevDetail/SwV", enrolled.device.os_version)]

    shown = subprocess.run(
        [sys.executable, "-m", "mdmd.mdmctl", "--config", str(daemon.config), "--json", "command", uuid],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["results"][-1]["data"] == enrolled.device.os_version
    # Acknowledged: never sent again.
    again = run_session(daemon, enrolled, ManagementClient(enrolled.device))
    assert not [c for m in again for c in m.commands]


def test_small_max_msg_size_delivers_everything_exactly_once(daemon: Daemon, enrolled: Enrolled) -> None:
    uuids = [queue(daemon, enrolled.id, get("./DevDetail/SwV")) for _ in range(6)]
    uuids.append(
        queue(
            daemon,
            enrolled.id,
            {
                "verb": "Replace",
                "items": [
                    {"target": "./Vendor/MSFT/Policy/Config/Camera/AllowCamera", "format": "int", "data": "0"}
                ],
            },
        )
    )
    client = ManagementClient(enrolled.device, max_msg_size=900)
    seen = run_session(daemon, enrolled, client)
    assert len(seen) > 3
    sent = [c for m in seen for c in m.commands if c.tag.endswith(("Get", "Replace"))]
    assert len(sent) == len(uuids)
    for uuid in uuids:
        status, command = daemon.admin("GET", f"/api/v1/commands/{uuid}")
        assert status == 200 and isinstance(command, dict) and command["state"] == "acknowledged", command
    assert client.nodes["./Vendor/MSFT/Policy/Config/Camera/AllowCamera"] == ("int", "0")


def test_a_split_package_is_finished_in_the_same_session(daemon: Daemon, enrolled: Enrolled) -> None:
    # Six Gets do not fit a 1,000-byte message: the server's package is
    # split.  The device answers each non-final message with its statuses
    # and Alert 1222, without Final (it must not send Final while the
    # server's package is open); the server goes on with the same session.
    uuids = [queue(daemon, enrolled.id, get("./DevDetail/SwV")) for _ in range(6)]
    client = ManagementClient(enrolled.device, max_msg_size=1000)
    start = client.session_start(enrolled.enrollment.management_url)
    seen: list[ServerMessage] = []
    sent: list[bytes] = []
    message: bytes | None = start
    while message is not None:
        sent.append(message)
        status, body = post(daemon, enrolled, message)
        assert status == 200 and len(body) <= 1000, body
        seen.append(client.read(body))
        message = client.respond(seen[-1])
    session_ids = {m.split(b"<SessionID>")[1].split(b"<")[0] for m in sent}
    assert len(session_ids) == 1
    assert not seen[0].final and 0 < len(seen[0].commands) < 6
    assert b"<Data>1222</Data>" in sent[1] and b"<Final/>" not in sent[1]
    assert sum(1 for m in seen for c in m.commands if c.tag.endswith("Get")) == 6
    # The server goes straight on with its package: it never answers the
    # device's 1222 with a 1222 of its own (after which Windows, having
    # nothing more to send, ends the session and the rest waits a day).
    assert not [c for m in seen for c in m.commands if c.tag.endswith("Alert")]
    for uuid in uuids:
        status, command = daemon.admin("GET", f"/api/v1/commands/{uuid}")
        assert status == 200 and isinstance(command, dict) and command["state"] == "acknowledged", command


def test_a_broken_session_resends_only_the_unacknowledged_commands(
    daemon: Daemon, enrolled: Enrolled
) -> None:
    uuids = [queue(daemon, enrolled.id, get("./DevDetail/SwV")) for _ in range(4)]
    client = ManagementClient(enrolled.device, max_msg_size=800)
    first = run_session(daemon, enrolled, client, stop_after=3)
    delivered_first = sum(len(m.commands) for m in first)
    acknowledged = [u for u in uuids if command_state(daemon, u) == "acknowledged"]
    assert 0 < len(acknowledged) < len(uuids)
    second = run_session(daemon, enrolled, ManagementClient(enrolled.device))
    delivered_again = sum(len(m.commands) for m in second)
    assert delivered_again == len(uuids) - len(acknowledged)
    assert delivered_first >= len(acknowledged)
    for uuid in uuids:
        assert daemon.admin("GET", f"/api/v1/commands/{uuid}")[1]["state"] == "acknowledged"  # type: ignore[index]


def test_user_unenrollment_revokes_the_certificate(daemon: Daemon, enrolled: Enrolled) -> None:
    client = ManagementClient(enrolled.device)
    status, body = post(
        daemon, enrolled, client.session_start(enrolled.enrollment.management_url, unenroll=True)
    )
    assert status == 200 and hdr_status(body) == 200
    serial = pki.serial_hex(enrolled.enrollment.certificate)
    assert db_rows(daemon, "SELECT revoke_reason FROM certificates WHERE serial = ?", serial) == [
        ("unenrolled",)
    ]
    assert db_rows(daemon, "SELECT state FROM devices WHERE device_id = ?", enrolled.id) == [("unenrolled",)]
    # The next message with that certificate is refused.
    status, body = post(daemon, enrolled, client.session_start(enrolled.enrollment.management_url))
    assert status == 200 and hdr_status(body) == 403
    # And the agent is told to enroll again.
    code, config = daemon.post_json("/api/fleet/orbit/config", enrolled.device.orbit_config_request())
    assert code == 200 and config["notifications"]["needs_programmatic_windows_mdm_enrollment"] is True  # type: ignore[index]


# --- identity ---


def _last_seen(daemon: Daemon, device_id: str) -> object:
    return db_rows(daemon, "SELECT last_seen, inventory FROM devices WHERE device_id = ?", device_id)


def test_a_genuine_certificate_cannot_speak_for_another_device(
    daemon: Daemon, enrolled: Enrolled, keys: list[object], tmp_path: Path
) -> None:
    other = WindowsDevice(key=keys[3], hostname="OTHER")  # type: ignore[arg-type]
    enroll_device(daemon, other)
    before = (_last_seen(daemon, enrolled.id), _last_seen(daemon, other.device_id))
    client = ManagementClient(enrolled.device)
    status, body = post(
        daemon, enrolled, client.session_start(enrolled.enrollment.management_url, source=other.device_id)
    )
    assert status == 200 and hdr_status(body) == 403
    assert b"<Get>" not in body and b"<Replace>" not in body
    assert (_last_seen(daemon, enrolled.id), _last_seen(daemon, other.device_id)) == before


def test_a_certificate_from_the_identity_ca_that_mdmd_never_issued_is_refused(
    daemon: Daemon, enrolled: Enrolled, tmp_path: Path
) -> None:
    ca = x509.load_pem_x509_certificate((daemon.state / "wstep-identity.pem").read_bytes())
    ca_key = load_pem_private_key((daemon.state / "wstep-identity.key").read_bytes(), None)
    assert isinstance(ca_key, rsa.RSAPrivateKey)
    key = pki.generate_rsa_key()
    forged = pki.issue_device_certificate(
        ca, ca_key, key.public_key(), enrolled.id, days=1, now=datetime.now(UTC)
    )
    context = client_tls_context(daemon, tmp_path, forged, key)
    client = ManagementClient(enrolled.device)
    status, body = post(daemon, context, client.session_start(enrolled.enrollment.management_url))
    assert status == 200 and hdr_status(body) == 401


# --- bad input ---


def _warns(daemon: Daemon) -> int:
    return sum(1 for line in daemon.log_text().splitlines() if "#warn]" in line)


@pytest.mark.parametrize(
    ("body", "headers", "expected"),
    [
        (b"<SyncML><unclosed>", None, 400),
        (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><SyncML>&a;</SyncML>', None, 400),
        (b'<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]><SyncML>&e;</SyncML>', None, 400),
        (b'<SyncML xmlns="SYNCML:SYNCML1.2"><SyncBody><Final/></SyncBody></SyncML>', None, 400),
        (b"<SyncML/>", {"Content-Type": "text/xml"}, 415),
    ],
    ids=["malformed", "entity", "external-entity", "no-synchdr", "content-type"],
)
def test_bad_messages_get_an_http_error_and_change_nothing(
    daemon: Daemon, enrolled: Enrolled, body: bytes, headers: dict[str, str] | None, expected: int
) -> None:
    before_rows = _last_seen(daemon, enrolled.id)
    warns = _warns(daemon)
    status, answer = post(daemon, enrolled, body, headers)
    assert status == expected
    assert b"root:" not in answer and b"Traceback" not in answer
    assert _last_seen(daemon, enrolled.id) == before_rows
    assert _warns(daemon) == warns + 1


def test_oversize_message_gets_413(daemon: Daemon, enrolled: Enrolled) -> None:
    body = b"<SyncML>" + b"x" * (4 * 1024 * 1024) + b"</SyncML>"
    try:
        status, _ = post(daemon, enrolled, body)
    except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
        pytest.fail("the 413 answer did not arrive")
    assert status == 413


def test_replayed_or_out_of_order_msgid_is_refused(daemon: Daemon, enrolled: Enrolled) -> None:
    queue(daemon, enrolled.id, get("./DevDetail/SwV"))
    client = ManagementClient(enrolled.device)
    status, body = post(daemon, enrolled, client.session_start(enrolled.enrollment.management_url))
    server = client.read(body)
    answer = client.respond(server)
    assert answer is not None
    skipped = answer.replace(b"<MsgID>2</MsgID>", b"<MsgID>5</MsgID>")
    before = db_rows(daemon, "SELECT state FROM commands WHERE device_id = ?", enrolled.id)
    status, body = post(daemon, enrolled, skipped)
    assert status == 200 and hdr_status(body) == 400
    assert db_rows(daemon, "SELECT state FROM commands WHERE device_id = ?", enrolled.id) == before
    # The in-order message still works afterwards.
    status, body = post(daemon, enrolled, answer)
    assert status == 200 and hdr_status(body) == 200
    assert db_rows(daemon, "SELECT state FROM commands WHERE device_id = ?", enrolled.id) == [
        ("acknowledged",)
    ]


def test_results_for_another_devices_command_are_refused(
    daemon: Daemon, enrolled: Enrolled, keys: list[object], tmp_path: Path
) -> None:
    victim = WindowsDevice(key=keys[2], hostname="VICTIM")  # type: ignore[arg-type]
    enroll_device(daemon, victim)
    victim_command = queue(daemon, victim.device_id, get("./DevDetail/SwV"))
    # The attacker's own session stays open while it has a command to answer.
    queue(daemon, enrolled.id, get("./DevDetail/SwV"))
    client = ManagementClient(enrolled.device)
    status, body = post(daemon, enrolled, client.session_start(enrolled.enrollment.management_url))
    assert hdr_status(body) == 200
    # Pretend to answer command 5 of message 1 (what the victim would get).
    forged = (
        f'<SyncML xmlns="SYNCML:SYNCML1.2"><SyncHdr><VerDTD>1.2</VerDTD><VerProto>DM/1.2</VerProto>'
        f"<SessionID>{client.session_id:X}</SessionID><MsgID>2</MsgID>"
        f"<Target><LocURI>{enrolled.enrollment.management_url}</LocURI></Target>"
        f"<Source><LocURI>{enrolled.id}</LocURI></Source></SyncHdr><SyncBody>"
        "<Status><CmdID>1</CmdID><MsgRef>1</MsgRef><CmdRef>0</CmdRef><Cmd>SyncHdr</Cmd><Data>200</Data></Status>"
        "<Status><CmdID>2</CmdID><MsgRef>1</MsgRef><CmdRef>99</CmdRef><Cmd>Get</Cmd><Data>200</Data></Status>"
        "<Results><CmdID>3</CmdID><MsgRef>1</MsgRef><CmdRef>99</CmdRef><Item><Source><LocURI>./DevDetail/SwV"
        "</LocURI></Source><Data>forged</Data></Item></Results><Final/></SyncBody></SyncML>"
    ).encode()
    status, body = post(daemon, enrolled, forged)
    # Ignored and logged; a Results never gets a Status (OMA-DM RepPro 1.2).
    assert status == 200 and hdr_status(body) == 200 and b"<Cmd>Results</Cmd>" not in body
    assert "Results for a command never sent (MsgRef 1, CmdRef 99) ignored" in daemon.log_text()
    assert db_rows(daemon, "SELECT state FROM commands WHERE uuid = ?", victim_command) == [("pending",)]
    assert db_rows(daemon, "SELECT COUNT(*) FROM command_results WHERE command_uuid = ?", victim_command) == [
        (0,)
    ]


def test_unknown_verb_gets_406_and_the_server_keeps_serving(daemon: Daemon, enrolled: Enrolled) -> None:
    client = ManagementClient(enrolled.device)
    start = client.session_start(enrolled.enrollment.management_url)
    odd = start.replace(b"<Final/>", b"<Sync><CmdID>9</CmdID></Sync><Final/>")
    status, body = post(daemon, enrolled, odd)
    assert status == 200 and b"<CmdRef>9</CmdRef><Cmd>Sync</Cmd><Data>406</Data>" in body
    assert len(run_session(daemon, enrolled, ManagementClient(enrolled.device))) >= 1


def test_management_keeps_serving_when_new_enrollment_is_switched_off(
    tmp_path: Path, keys: list[object]
) -> None:
    # Enrolled devices must still reach the server (to be managed,
    # and to unenroll) after new MDM enrollments are switched off.
    device = WindowsDevice(key=keys[0])  # type: ignore[arg-type]
    (tmp_path / "d").mkdir()
    with running_daemon(tmp_path / "d") as first:
        result = enroll_device(first, device)
        assert isinstance(result, EnrollmentResult)
        config = first.config
    config.write_text(config.read_text().replace("windows_mdm = yes", "windows_mdm = no"))
    second = start_daemon(config)
    try:
        code, agent_config = second.post_json("/api/fleet/orbit/config", device.orbit_config_request())
        assert code == 200 and agent_config["notifications"] == {}
        context = client_tls_context(second, tmp_path, result.certificate, device.key)
        client = ManagementClient(device)
        status, body = post(second, context, client.session_start(result.management_url))
        assert status == 200 and hdr_status(body) == 200
    finally:
        second.stop()


def test_a_large_result_is_stored_whole(daemon: Daemon, enrolled: Enrolled) -> None:
    # Over 64 KiB: parsed and processed on a worker thread (real payloads
    # often exceed 64 KB, docs/windows-clients.md).
    value = "0123456789abcdef" * 20000
    uuid = queue(daemon, enrolled.id, get("./Vendor/MSFT/Big"))
    client = ManagementClient(enrolled.device)
    client.nodes["./Vendor/MSFT/Big"] = ("chr", value)
    run_session(daemon, enrolled, client)
    status, command = daemon.admin("GET", f"/api/v1/commands/{uuid}")
    assert status == 200 and isinstance(command, dict) and command["state"] == "acknowledged"
    assert [r["data"] for r in command["results"] if r["kind"] == "results"] == [value]


def test_one_log_line_per_management_message_says_what_happened(daemon: Daemon, enrolled: Enrolled) -> None:
    run_session(daemon, enrolled, ManagementClient(enrolled.device))
    lines = [
        line
        for line in daemon.log_text().splitlines()
        if f"device={enrolled.id}" in line and "management POST" in line
    ]
    assert lines and "0 command(s) sent, session ended)" in lines[-1]
