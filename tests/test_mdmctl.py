"""``mdmctl`` as an administrator runs it: a separate process reading the
daemon's INI file, talking to the real admin API."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from harness import (
    MANAGEMENT_PATH,
    SYNCML,
    Daemon,
    client_tls_context,
    daemon_env,
    edit_ini,
    enroll_device,
    refused_port,
    running_daemon,
)
from mdmd import pki
from mdmd.sim.device import EnrollmentResult, ManagementClient, WindowsDevice
from mdmd.syncml import Item, Meta, parse_commands_fragment

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
SWV = "./DevDetail/SwV"


@dataclass
class Managed:
    device: WindowsDevice
    enrollment: EnrollmentResult
    client: ManagementClient
    tls_dir: Path

    @property
    def id(self) -> str:
        return self.device.device_id

    def sync(self, daemon: Daemon) -> None:
        """One whole OMA-DM session, as Windows runs it (delivering what is queued)."""
        tls = client_tls_context(daemon, self.tls_dir, self.enrollment.certificate, self.device.key)
        message: bytes | None = self.client.session_start(self.enrollment.management_url)
        while message is not None:
            response, body = daemon.request(
                "POST", MANAGEMENT_PATH, message, SYNCML, section="management", context=tls
            )
            assert response.status == 200, body
            message = self.client.respond(self.client.read(body))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory.mktemp("mdmctl")) as d:
        yield d


@pytest.fixture(scope="module")
def pc(daemon: Daemon, tmp_path_factory: pytest.TempPathFactory) -> Managed:
    device = WindowsDevice(key=pki.generate_rsa_key(), hostname="DESKTOP-CTL")
    result = enroll_device(daemon, device)
    assert isinstance(result, EnrollmentResult)
    return Managed(device, result, ManagementClient(device), tmp_path_factory.mktemp("mdmctl-tls"))


def mdmctl(
    daemon: Daemon, *args: str, config: Path | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mdmd.mdmctl", "--config", str(config or daemon.config), *args],
        env=daemon_env(),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return done.stdout


def failed(done: subprocess.CompletedProcess[str]) -> str:
    """The one error line of a failed run (exit status 1, no traceback)."""
    assert done.returncode == 1, (done.stdout, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mdmctl: "), done.stderr
    return lines[0]


def api_command(daemon: Daemon, uuid: str) -> dict[str, object]:
    status, command = daemon.admin("GET", f"/api/v1/commands/{uuid}")
    assert status == 200 and isinstance(command, dict)
    return command


def test_devices_prints_an_aligned_table(daemon: Daemon, pc: Managed) -> None:
    lines = ok(mdmctl(daemon, "devices")).splitlines()
    header = lines[0]
    assert header.split("  ")[0] == "DEVICE ID"
    for column in ("NAME", "MANUFACTURER", "MODEL", "OS VERSION", "STATE", "ENROLLED", "LAST SEEN"):
        assert column in header
    (row,) = [line for line in lines[1:] if line.startswith(pc.id)]
    # Aligned: each value starts where its column's title does.
    assert row.index("DESKTOP-CTL") == header.index("NAME")
    assert row.index("enrolled") == header.index("STATE")
    assert row.index(pc.device.os_version) == header.index("OS VERSION")


def test_json_prints_the_api_answer(daemon: Daemon, pc: Managed) -> None:
    before = json.loads(ok(mdmctl(daemon, "--json", "devices")))
    after = json.loads(ok(mdmctl(daemon, "devices", "--json")))
    assert before == after
    assert [d["name"] for d in before["devices"] if d["device_id"] == pc.id] == ["DESKTOP-CTL"]
    device = json.loads(ok(mdmctl(daemon, "--json", "device", pc.id)))
    assert device["certificate"]["serial"] == pki.serial_hex(pc.enrollment.certificate)


def test_device_shows_fields_and_certificate(daemon: Daemon, pc: Managed) -> None:
    out = ok(mdmctl(daemon, "device", pc.id))
    assert re.search(rf"^device_id +{pc.id}$", out, re.M)
    assert re.search(r"^state +enrolled$", out, re.M)
    assert "\ncertificate:\n" in out
    assert re.search(rf"^  serial +{pki.serial_hex(pc.enrollment.certificate)}$", out, re.M)
    assert re.search(r"^  revoked +no$", out, re.M)
    not_after = pc.enrollment.certificate.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert re.search(rf"^cert_not_after +{not_after}$", out, re.M)
    assert re.search(r"^renewal +none$", out, re.M)


@pytest.mark.parametrize(
    ("renewal", "shown"),
    [
        ({"state": "none", "renewed_at": None, "reason": None}, "none"),
        (
            {"state": "renewed", "renewed_at": "2030-01-01T00:00:00Z", "reason": None},
            "renewed 2030-01-01T00:00:00Z",
        ),
        ({"state": "failed", "renewed_at": None, "reason": "certificate ended"}, "failed: certificate ended"),
        (None, None),
    ],
)
def test_the_renewal_state_in_one_cell(renewal: Any, shown: str | None) -> None:
    from mdmd.mdmctl import _renewal_text

    assert _renewal_text(renewal) == shown


def test_get_prints_the_uuid_of_a_pending_command(daemon: Daemon, pc: Managed) -> None:
    out = ok(mdmctl(daemon, "get", pc.id, SWV, "./DevInfo/Lang"))
    assert UUID.fullmatch(out.strip())
    uuid = out.strip()
    command = api_command(daemon, uuid)
    assert command["verb"] == "Get" and command["state"] == "pending"
    shown = ok(mdmctl(daemon, "command", uuid))
    assert re.search(r"^state +pending$", shown, re.M)
    assert re.search(rf"^command_uuid +{uuid}$", shown, re.M)
    assert "<LocURI>./DevInfo/Lang</LocURI>" in shown
    listed = ok(mdmctl(daemon, "commands", pc.id))
    assert uuid in listed and listed.startswith("COMMAND UUID")


def test_replace_sends_format_type_and_data(daemon: Daemon, pc: Managed) -> None:
    target = "./Device/Vendor/MSFT/Policy/Config/Camera/AllowCamera"
    uuid = ok(
        mdmctl(daemon, "replace", pc.id, target, "--format", "int", "--data", "1", "--type", "text/plain")
    ).strip()
    command = api_command(daemon, uuid)
    assert command["verb"] == "Replace"
    (stored,) = parse_commands_fragment(str(command["syncml"]))
    assert stored.items == (Item(target=target, meta=Meta(format="int", type="text/plain"), data="1"),)


def test_add_delete_and_exec_queue_their_verbs(daemon: Daemon, pc: Managed) -> None:
    node = "./Vendor/MSFT/Test/Node"
    for args, verb in (
        (["add", pc.id, node, "--format", "node"], "Add"),
        (["delete", pc.id, node, node + "2"], "Delete"),
        (["exec", pc.id, "./Device/Vendor/MSFT/Reboot/RebootNow"], "Exec"),
    ):
        uuid = ok(mdmctl(daemon, *args)).strip()
        assert api_command(daemon, uuid)["verb"] == verb


def test_queue_reads_raw_syncml_from_stdin(daemon: Daemon, pc: Managed) -> None:
    syncml = (
        "<Atomic><Replace><Item><Target><LocURI>./Vendor/MSFT/A</LocURI></Target>"
        "<Data>x</Data></Item></Replace></Atomic>"
    )
    uuid = ok(mdmctl(daemon, "queue", pc.id, "--syncml", "-", stdin=syncml)).strip()
    command = api_command(daemon, uuid)
    assert (command["verb"], command["syncml"]) == ("Atomic", syncml)


def test_get_wait_shows_the_devices_answer(daemon: Daemon, pc: Managed) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mdmd.mdmctl",
            "--config",
            str(daemon.config),
            "get",
            pc.id,
            SWV,
            "--wait",
            "60",
        ],
        env=daemon_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        # The UUID comes first, before the wait: the command is queued now.
        uuid = proc.stdout.readline().strip()
        assert UUID.fullmatch(uuid), uuid
        pc.sync(daemon)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert re.search(r"^state +acknowledged$", out, re.M)
    (row,) = [line for line in out.splitlines() if line.startswith("  results ")]
    assert SWV in row and row.rstrip().endswith(pc.device.os_version)


def test_wait_that_sees_no_answer_exits_1(daemon: Daemon, pc: Managed) -> None:
    done = mdmctl(daemon, "get", pc.id, SWV, "--wait", "0")
    assert UUID.fullmatch(done.stdout.splitlines()[0])
    assert re.fullmatch(r"mdmctl: command \S+ is still pending after 0 seconds", failed(done))


def another(daemon: Daemon, tmp_path: Path, hostname: str) -> Managed:
    """A device of a test's own (actions change it for good)."""
    device = WindowsDevice(key=pki.generate_rsa_key(), hostname=hostname)
    result = enroll_device(daemon, device)
    assert isinstance(result, EnrollmentResult)
    return Managed(device, result, ManagementClient(device), tmp_path)


def test_unenroll_confirms(daemon: Daemon, tmp_path: Path) -> None:
    leaving = another(daemon, tmp_path, "DESKTOP-LEAVE")
    out = ok(mdmctl(daemon, "unenroll", leaving.id))
    assert out.startswith(f"unenrollment requested for {leaving.id}")
    shown = ok(mdmctl(daemon, "device", leaving.id))
    assert re.search(r"^state +unenroll_pending$", shown, re.M)
    assert re.search(r"^pending_actions +unenroll$", shown, re.M)


def background(daemon: Daemon, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "mdmd.mdmctl", "--config", str(daemon.config), *args],
        env=daemon_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, err


def test_actions_for_one_device(daemon: Daemon, tmp_path: Path) -> None:
    target = another(daemon, tmp_path, "DESKTOP-ACT")
    for args, action in (
        (["restart", target.id], "restart"),
        (["scan", target.id, "--full"], "defender_scan"),
        (["defender-update", target.id], "defender_update"),
        (["rename", target.id, "DESK-9"], "rename"),
    ):
        out = ok(mdmctl(daemon, *args))
        assert re.fullmatch(
            rf"{action} queued for {target.id}: action {UUID.pattern}, command {UUID.pattern}\n", out
        )
    assert "name: 1 to 15 letters" in failed(mdmctl(daemon, "rename", target.id, "NOT_VALID"))
    assert "--yes" in failed(mdmctl(daemon, "wipe", target.id))
    assert "has a restart pending already" in failed(mdmctl(daemon, "restart", target.id))
    assert "device ID or --group" in failed(mdmctl(daemon, "restart"))
    shown = ok(mdmctl(daemon, "device", target.id))
    assert re.search(r"^pending_actions +restart, defender_scan, defender_update, rename$", shown, re.M)
    assert re.search(r"defender_scan +full=True +pending", shown)
    target.sync(daemon)
    shown = ok(mdmctl(daemon, "device", target.id))
    assert re.search(
        r"rename +name=DESK-9 +awaiting_restart +200 OK +the device accepted the name DESK-9", shown
    )
    assert re.search(r"restart +- +acknowledged +200 OK", shown)


def test_a_failed_command_reads_with_its_meaning(daemon: Daemon, tmp_path: Path) -> None:
    target = another(daemon, tmp_path, "DESKTOP-404")
    proc = background(daemon, "exec", target.id, "./Vendor/MSFT/NoSuchCSP/Go", "--wait", "60")
    assert proc.stdout is not None
    uuid = proc.stdout.readline().strip()
    assert UUID.fullmatch(uuid)
    target.sync(daemon)
    code, out, err = finish(proc)
    assert code == 1 and re.search(r"^status +404 Not found: the device has no such node", out, re.M)
    assert err.strip() == f"mdmctl: command {uuid} failed: 404 Not found: the device has no such node; " + (
        "the CSP may be missing on this Windows edition"
    )


def test_wipe_with_yes_waits_for_the_device(daemon: Daemon, tmp_path: Path) -> None:
    target = another(daemon, tmp_path, "DESKTOP-WIPE")
    proc = background(daemon, "wipe", target.id, "--mode", "protected", "--yes", "--wait", "60")
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith(f"wipe queued for {target.id}: action ")
    target.sync(daemon)
    code, out, err = finish(proc)
    assert code == 0, err
    assert out.startswith("acknowledged: the device accepted the wipe (protected, doWipeProtected)")
    assert re.search(r"^state +wiped$", ok(mdmctl(daemon, "device", target.id)), re.M)


def test_a_group_action_prints_the_operation_and_its_progress(daemon: Daemon, tmp_path: Path) -> None:
    member = another(daemon, tmp_path, "DESKTOP-GRP")
    assert mdmctl(daemon, "group", "add", "scanners").returncode == 0
    assert mdmctl(daemon, "group", "members", "scanners", "--add", member.id).returncode == 0
    proc = background(daemon, "scan", "--group", "scanners", "--wait", "60")
    assert proc.stdout is not None
    first = proc.stdout.readline()
    match = re.fullmatch(rf"operation ({UUID.pattern}): defender_scan for group scanners\n", first)
    assert match, first
    # The fan-out has given the member its scan: the device checks in.
    for line in proc.stdout:
        if line.startswith("delivering: 1/1 queued"):
            break
    member.sync(daemon)
    code, out, err = finish(proc)
    assert code == 0, err
    assert out.splitlines()[-1] == "done: 1/1 queued, 1 acknowledged, 0 failed, 0 skipped"
    shown = ok(mdmctl(daemon, "operation", match.group(1)))
    assert re.search(r"^state +done$", shown, re.M) and re.search(r"^acknowledged +1$", shown, re.M)
    assert member.client.scans == ["1"]


# --- failures ---


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["frobnicate"],
        ["get"],
        ["get", "ID"],
        ["replace", "ID", "./a", "./b"],
        ["get", "ID", "./a", "--wait", "-1"],
        ["get", "ID", "./a", "--wait", "soon"],
        ["queue", "ID"],
        ["--bogus", "devices"],
    ],
)
def test_usage_errors_exit_2(daemon: Daemon, args: list[str]) -> None:
    done = mdmctl(daemon, *args)
    assert done.returncode == 2, done.stderr
    assert "usage: mdmctl" in done.stderr and "Traceback" not in done.stderr


def test_unknown_device_reports_the_api_message(daemon: Daemon) -> None:
    assert failed(mdmctl(daemon, "device", "NOSUCHDEVICE")) == "mdmctl: no such device: NOSUCHDEVICE"
    assert failed(mdmctl(daemon, "get", "NOSUCHDEVICE", SWV)) == "mdmctl: no enrolled device: NOSUCHDEVICE"


def test_a_refused_command_reports_the_field(daemon: Daemon, pc: Managed) -> None:
    line = failed(mdmctl(daemon, "replace", pc.id, "/abs", "--data", "1"))
    assert line.startswith("mdmctl: invalid command: items[0].target: LocURI '/abs'")
    line = failed(mdmctl(daemon, "replace", pc.id, "./a", "--format", "words", "--data", "1"))
    assert line.startswith("mdmctl: invalid command: items[0].format: must be one of")
    line = failed(mdmctl(daemon, "replace", pc.id, "/abs", "--format", "int", "--data", "x"))
    assert line.startswith("mdmctl: request refused: items[0].target:") and "items[0].data:" in line


def test_unreachable_server_is_one_line(daemon: Daemon, tmp_path: Path) -> None:
    with refused_port() as port:
        config = daemon.config.parent / "unreachable.ini"
        config.write_text(edit_ini(daemon.config.read_text(), {"admin": {"url": f"http://127.0.0.1:{port}"}}))
        line = failed(mdmctl(daemon, "devices", config=config))
    assert line.startswith(f"mdmctl: cannot reach the admin API at http://127.0.0.1:{port}: ")
    assert "Connection refused" in line


def test_a_wrong_token_is_refused(daemon: Daemon, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("not-the-token\n")
    config = daemon.config.parent / "wrong-token.ini"
    config.write_text(edit_ini(daemon.config.read_text(), {"admin": {"token_file": str(token)}}))
    assert "admin bearer token required" in failed(mdmctl(daemon, "devices", config=config))


def test_unreadable_configuration_or_token_is_one_line(daemon: Daemon, tmp_path: Path) -> None:
    line = failed(mdmctl(daemon, "devices", config=tmp_path / "missing.ini"))
    assert "missing.ini" in line and "cannot read the configuration" in line
    config = daemon.config.parent / "no-token.ini"
    config.write_text(edit_ini(daemon.config.read_text(), {"admin": {"token_file": str(tmp_path / "none")}}))
    assert "cannot read the admin token" in failed(mdmctl(daemon, "devices", config=config))


def test_init_still_creates_key_material(tmp_path: Path) -> None:
    target = tmp_path / "state"
    done = subprocess.run(
        [sys.executable, "-m", "mdmd.mdmctl", "init", "--no-tls", str(target)],
        env=daemon_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(target)) == [
        "admin_token",
        "enroll_secret",
        "wstep-identity.key",
        "wstep-identity.pem",
    ]


def test_profiles_and_groups_from_the_command_line(daemon: Daemon, pc: Managed, tmp_path: Path) -> None:
    camera = "./Device/Vendor/MSFT/Policy/Config/Camera/AllowCamera"
    syncml = tmp_path / "camera.xml"
    syncml.write_text(
        f"<Replace><Item><Target><LocURI>{camera}</LocURI></Target>"
        '<Meta><Format xmlns="syncml:metinf">int</Format></Meta><Data>0</Data></Item></Replace>'
    )
    done = mdmctl(daemon, "profile", "add", "no-camera", str(syncml))
    assert done.returncode == 0 and done.stdout.startswith("profile no-camera created, version "), done.stderr
    done = mdmctl(daemon, "profile", "add", "no-camera", str(syncml))
    assert done.returncode == 1 and "exists" in done.stderr
    items = json.dumps({"items": [{"target": camera, "format": "int", "data": "1"}]})
    done = mdmctl(daemon, "profile", "update", "no-camera", "-", stdin=items)
    assert done.returncode == 0 and "is now version" in done.stdout, done.stderr
    assert mdmctl(daemon, "group", "add", "desks").returncode == 0
    done = mdmctl(daemon, "group", "members", "desks", "--add", pc.id)
    assert done.stdout.strip() == "group desks: 1 added, 0 removed", done.stderr
    done = mdmctl(daemon, "group", "members", "desks", "--add", "NOT-A-PC")
    assert done.returncode == 1 and "no such device: NOT-A-PC" in done.stderr
    done = mdmctl(daemon, "assign", "no-camera", "desks")
    assert done.stdout.strip() == "profile no-camera assigned to desks", done.stderr
    pc.sync(daemon)
    shown = mdmctl(daemon, "device", pc.id).stdout
    assert re.search(r"no-camera\s+[0-9a-f]{16}\s+verified", shown), shown
    shown = mdmctl(daemon, "profile", "show", "no-camera").stdout
    assert "1 verified" in shown and camera in shown and "desks" in shown
    listed = mdmctl(daemon, "profile", "list").stdout
    assert re.search(r"no-camera\s+[0-9a-f]{16}\s+1\s+desks", listed), listed
    groups = mdmctl(daemon, "group", "list").stdout
    assert re.search(r"all\s+\d+\s+-\s+built in", groups) and re.search(r"desks\s+1\s+no-camera", groups)
    assert pc.id in mdmctl(daemon, "group", "show", "desks", "--all").stdout
    assert json.loads(mdmctl(daemon, "--json", "group", "show", "desks").stdout)["devices"] == [pc.id]
    assert mdmctl(daemon, "assign", "no-camera").stdout.strip() == "profile no-camera assigned to no group"
    done = mdmctl(daemon, "profile", "delete", "no-camera")
    assert done.returncode == 0 and "remove it at their next check-in" in done.stdout
    pc.sync(daemon)
    assert mdmctl(daemon, "profile", "show", "no-camera").returncode == 1
    assert mdmctl(daemon, "group", "delete", "desks").stdout.strip() == "group desks deleted"


# --- the device list, a page at a time ---


@pytest.fixture(scope="module")
def more_pcs(daemon: Daemon, pc: Managed) -> list[str]:
    """Three more enrolled devices (never checked in), so lists have pages."""
    ids = []
    for n in range(3):
        device = WindowsDevice(key=pki.generate_rsa_key(), hostname=f"LAPTOP-{n}")
        assert isinstance(enroll_device(daemon, device), EnrollmentResult)
        ids.append(device.device_id)
    pc.sync(daemon)
    return ids


def _listed(out: str) -> list[str]:
    """The device IDs of a devices table."""
    lines = out.splitlines()
    assert lines[0].startswith("DEVICE ID")
    return [line.split()[0].rstrip("*") for line in lines[1:] if not line.startswith(("more:", "* "))]


def test_devices_pages_with_a_cursor_or_all_at_once(daemon: Daemon, pc: Managed, more_pcs: list[str]) -> None:
    everything = _listed(ok(mdmctl(daemon, "devices")))
    assert len(everything) >= 4 and set(more_pcs) | {pc.id} <= set(everything)
    out = ok(mdmctl(daemon, "devices", "--limit", "2"))
    assert len(_listed(out)) == 2
    more = out.splitlines()[-1]
    assert more.startswith("more: mdmctl devices --cursor ")
    cursor = more.split()[4]
    rest = _listed(ok(mdmctl(daemon, "devices", "--cursor", cursor, "--all", "--limit", "1")))
    assert _listed(out) + rest == everything
    assert _listed(ok(mdmctl(daemon, "devices", "--all", "--limit", "1"))) == everything
    streamed = json.loads(ok(mdmctl(daemon, "--json", "devices", "--all", "--limit", "2")))
    assert [d["device_id"] for d in streamed["devices"]] == everything and streamed["next"] is None
    assert "--cursor continues its own listing" in failed(
        mdmctl(daemon, "devices", "--cursor", cursor, "--state", "enrolled")
    )


def test_devices_filters_and_searches(daemon: Daemon, pc: Managed, more_pcs: list[str]) -> None:
    assert _listed(ok(mdmctl(daemon, "devices", "--search", pc.id[:10].lower()))) == [pc.id]
    assert set(_listed(ok(mdmctl(daemon, "devices", "-q", "laptop-")))) == set(more_pcs)
    assert ok(mdmctl(daemon, "devices", "--expiring", "1")).strip() == "no devices"
    assert set(more_pcs) <= set(_listed(ok(mdmctl(daemon, "devices", "--expiring", "400"))))
    seen = _listed(ok(mdmctl(daemon, "devices", "--last-seen-after", "1d")))
    assert pc.id in seen and not set(more_pcs) & set(seen)
    assert set(more_pcs) <= set(_listed(ok(mdmctl(daemon, "devices", "--last-seen-before", "2000-01-01"))))
    assert (
        ok(mdmctl(daemon, "devices", "--state", "unenrolled", "--search", "laptop")).strip() == "no devices"
    )
    assert _listed(ok(mdmctl(daemon, "devices", "--no-collision", "--search", pc.id))) == [pc.id]
    newest = _listed(ok(mdmctl(daemon, "devices", "--sort", "enrolled_at", "--desc", "--limit", "1")))
    assert newest == [more_pcs[-1]]
    assert mdmctl(daemon, "devices", "--limit", "1001").returncode == 2


# --- tokens, audit, version ---


def test_a_named_token_is_shown_once_used_and_revoked(daemon: Daemon, pc: Managed) -> None:
    out = ok(mdmctl(daemon, "token", "create", "ci-runner"))
    token = out.splitlines()[0]
    assert token.startswith("mdmd_") and "shown this once" in out
    listed = ok(mdmctl(daemon, "token", "list"))
    assert re.search(r"^ci-runner +active ", listed, re.M) and re.search(r"^admin +active ", listed, re.M)
    assert token not in listed
    as_ci = subprocess.run(
        [sys.executable, "-m", "mdmd.mdmctl", "--config", str(daemon.config), "get", pc.id, SWV],
        env={**daemon_env(), "MDMCTL_TOKEN": token},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert as_ci.returncode == 0 and UUID.fullmatch(as_ci.stdout.strip()), as_ci.stderr
    audit = ok(mdmctl(daemon, "audit", "--actor", "ci-runner"))
    assert audit.splitlines()[0].split() == ["ID", "AT", "ACTOR", "ACTION", "TARGET", "CLIENT", "DETAIL"]
    assert f"ci-runner  command.queue  {pc.id}" in re.sub(r" {2,}", "  ", audit)
    assert as_ci.stdout.strip() in audit and SWV in audit
    assert "revoked ci-runner" in ok(mdmctl(daemon, "token", "revoke", "ci-runner"))
    refused = subprocess.run(
        [sys.executable, "-m", "mdmd.mdmctl", "--config", str(daemon.config), "devices"],
        env={**daemon_env(), "MDMCTL_TOKEN": token},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 1 and "admin bearer token required" in refused.stderr
    entries = json.loads(ok(mdmctl(daemon, "--json", "audit", "--all", "--target", "ci-runner")))["entries"]
    assert [(e["actor"], e["action"]) for e in entries] == [
        ("admin", "token.revoke"),
        ("admin", "token.create"),
    ]
    assert mdmctl(daemon, "token", "create").returncode == 2


def test_version_shows_the_servers(daemon: Daemon) -> None:
    from mdmd import __version__

    out = ok(mdmctl(daemon, "version"))
    assert out.startswith(f"server: mdmd {__version__} (schema ")
