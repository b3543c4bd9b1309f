"""Several mdmd nodes on one PostgreSQL database, behind haproxy in TCP
mode: any node serves any request, a device's session hops between nodes,
and a node killed under load loses nothing and repeats nothing.

Every node is a real ``twistd mdmd`` on loopback with the same key
material; haproxy balances their enrollment and management listeners
round robin (mutual TLS passes through it to the node)."""

from __future__ import annotations

import http.client
import itertools
import os
import re
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from harness import HAPROXY, MANAGEMENT_PATH, SYNCML, Daemon, Nodes, db_rows, running_nodes
from mdmd import pki
from mdmd.sim.device import ManagementClient, ServerMessage, WindowsDevice
from omadm_helpers import Enrolled, enroll, post, queue, run_session

CAMERA = "./Device/Vendor/MSFT/Policy/Config/Camera/AllowCamera"
TELEMETRY = "./Device/Vendor/MSFT/Policy/Config/System/AllowTelemetry"
REBOOT: dict[str, object] = {"verb": "Exec", "items": [{"target": "./Vendor/MSFT/Reboot/RebootNow"}]}


@pytest.fixture(scope="module", autouse=True)
def _haproxy() -> None:
    if not Path(HAPROXY).exists():
        if os.environ.get("MDMD_REQUIRE_HAPROXY", "") not in ("", "0"):
            pytest.fail(f"MDMD_REQUIRE_HAPROXY is set but {HAPROXY} is missing (Debian package haproxy)")
        pytest.skip("haproxy is not installed (set MDMD_REQUIRE_HAPROXY=1 to fail instead)")


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nodes]:
    with running_nodes(tmp_path_factory.mktemp("nodes")) as n:
        yield n


@pytest.fixture(scope="module")
def keys() -> list[object]:
    return [pki.generate_rsa_key() for _ in range(4)]


_n = itertools.count()


def device(nodes: Nodes, keys: list[object], tmp_path: Path) -> tuple[Enrolled, ManagementClient]:
    """A device enrolled through haproxy (its requests spread over the nodes)."""
    n = next(_n)
    enrolled = enroll(nodes.front, WindowsDevice(key=keys[n % len(keys)], hostname=f"NODE-{n}"), tmp_path)  # type: ignore[arg-type]
    return enrolled, ManagementClient(enrolled.device)


def served(node: Daemon, device_id: str) -> list[str]:
    """The management messages of a device a node served (its log lines)."""
    return [
        line
        for line in node.log_text().splitlines()
        if f"device={device_id}" in line and "management POST" in line
    ]


def verbs(messages: list[ServerMessage]) -> list[str]:
    return [c.tag.split("}")[1] for m in messages for c in m.commands]


def test_a_device_enrolled_through_the_balancer_is_managed_by_both_nodes(
    nodes: Nodes, keys: list[object], tmp_path: Path
) -> None:
    enrolled, client = device(nodes, keys, tmp_path)
    # Requests spread round robin: the agent's and MS-MDE2's requests landed
    # on both nodes.
    for node in nodes.nodes:
        assert "/api/" in node.log_text()
    uuids = [queue(nodes.front, enrolled.id, {"verb": "Get", "items": [{"target": "./DevDetail/SwV"}]})]
    uuids.append(queue(nodes.nodes[1], enrolled.id, {"verb": "Get", "items": [{"target": "./DevInfo/Mod"}]}))
    for _ in range(3):
        run_session(nodes.front, enrolled, client)
    # Each node served some of the device's messages (every message is a new
    # connection, which haproxy gives to the next node).
    assert all(served(node, enrolled.id) for node in nodes.nodes)
    for node in nodes.nodes:
        for uuid in uuids:
            status, command = node.admin("GET", f"/api/v1/commands/{uuid}")
            assert status == 200 and isinstance(command, dict) and command["state"] == "acknowledged"


def test_a_command_queued_through_one_nodes_admin_api_is_delivered_through_the_other(
    nodes: Nodes, keys: list[object], tmp_path: Path
) -> None:
    first, second = nodes.nodes
    enrolled, client = device(nodes, keys, tmp_path)
    uuid = queue(
        first, enrolled.id, {"verb": "Exec", "items": [{"target": "./Vendor/MSFT/Reboot/RebootNow"}]}
    )
    seen = run_session(second, enrolled, client)
    assert verbs(seen) == ["Exec"] and client.executed == ["./Vendor/MSFT/Reboot/RebootNow"]
    status, command = first.admin("GET", f"/api/v1/commands/{uuid}")
    assert status == 200 and isinstance(command, dict)
    assert (command["state"], command["status"]) == ("acknowledged", 200)


def test_a_session_alternating_between_nodes_delivers_a_profile_once(
    nodes: Nodes, keys: list[object], tmp_path: Path
) -> None:
    enrolled, client = device(nodes, keys, tmp_path)
    front = nodes.front
    front.admin("POST", "/api/v1/groups", {"name": "hop"})
    front.admin("POST", "/api/v1/groups/hop/devices", {"add": [enrolled.id]})
    items = [
        {"verb": "Replace", "target": t, "format": "int", "data": d}
        for t, d in ((CAMERA, "0"), (TELEMETRY, "1"))
    ]
    status, _ = nodes.nodes[1].admin("POST", "/api/v1/profiles", {"name": "hop", "items": items})
    assert status == 201
    front.admin("PUT", "/api/v1/profiles/hop/groups", {"groups": ["hop"]})
    # Message 1 to node 1, message 2 to node 2, and so on.
    sent: list[ServerMessage] = []
    message: bytes | None = client.session_start(enrolled.enrollment.management_url)
    for node in itertools.cycle(nodes.nodes):
        if message is None:
            break
        status, body = post(node, enrolled, message)
        assert status == 200, body
        sent.append(client.read(body))
        message = client.respond(sent[-1])
    assert len(sent) >= 2
    # Planned at the session start, delivered, read back: once.
    assert verbs(sent) == ["Atomic", "Get", "Get"]
    assert client.nodes[CAMERA] == ("int", "0") and client.nodes[TELEMETRY] == ("int", "1")
    status, answer = nodes.nodes[1].admin("GET", f"/api/v1/devices/{enrolled.id}/profiles")
    assert status == 200 and isinstance(answer, dict)
    assert [(p["name"], p["state"]) for p in answer["profiles"]] == [("hop", "verified")]
    rows = db_rows(front, "SELECT verb, state FROM commands WHERE device_id = ? ORDER BY seq", enrolled.id)
    assert rows == [("Atomic", "acknowledged"), ("Get", "acknowledged"), ("Get", "acknowledged")]
    front.admin("PUT", "/api/v1/profiles/hop/groups", {"groups": []})


def test_a_message_sent_to_both_nodes_at_once_is_processed_once(
    nodes: Nodes, keys: list[object], tmp_path: Path
) -> None:
    # Windows resending on a new connection while its first one is still
    # being served, each landing on another node: the session step is a
    # compare-and-swap in the database, so one node commits it and the other
    # answers the same reply, and the work it plans (profiles, commands)
    # exists once.
    enrolled, client = device(nodes, keys, tmp_path)
    front = nodes.front
    front.admin("POST", "/api/v1/groups", {"name": "race"})
    front.admin("POST", "/api/v1/groups/race/devices", {"add": [enrolled.id]})
    items = [{"verb": "Replace", "target": CAMERA, "format": "int", "data": "1"}]
    front.admin("POST", "/api/v1/profiles", {"name": "race", "items": items})
    front.admin("PUT", "/api/v1/profiles/race/groups", {"groups": ["race"]})
    for _ in range(5):
        message = client.session_start(enrolled.enrollment.management_url)
        answers: list[tuple[int, bytes]] = []

        def send(node: Daemon, message: bytes = message, answers: list[tuple[int, bytes]] = answers) -> None:
            answers.append(post(node, enrolled, message))

        threads = [threading.Thread(target=send, args=(node,)) for node in nodes.nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert [status for status, _ in answers] == [200, 200]
        assert answers[0][1] == answers[1][1]
        reply = client.read(answers[0][1])
        message2 = client.respond(reply)
        while message2 is not None:
            status, body = post(front, enrolled, message2)
            assert status == 200
            message2 = client.respond(client.read(body))
    rows = db_rows(front, "SELECT verb FROM commands WHERE device_id = ? ORDER BY seq", enrolled.id)
    # The profile's Atomic and its read-back, once in five sessions.
    assert rows == [("Atomic",), ("Get",)]
    front.admin("PUT", "/api/v1/profiles/race/groups", {"groups": []})


def test_a_retransmission_that_lands_on_the_other_node_gets_the_same_answer(
    nodes: Nodes, keys: list[object], tmp_path: Path
) -> None:
    first, second = nodes.nodes
    enrolled, client = device(nodes, keys, tmp_path)
    queue(first, enrolled.id, REBOOT)
    message = client.session_start(enrolled.enrollment.management_url)
    status, reply = post(first, enrolled, message)
    assert status == 200
    seq = db_rows(first, "SELECT session_seq FROM devices WHERE device_id = ?", enrolled.id)
    # The reply was lost on its way (the first node died, say): Windows
    # sends the same message again, and haproxy gives it to the other node.
    status, again = post(second, enrolled, message)
    assert (status, again) == (200, reply)
    assert db_rows(first, "SELECT session_seq FROM devices WHERE device_id = ?", enrolled.id) == seq
    assert [line for line in served(second, enrolled.id) if "retransmission answered again" in line]
    # The session goes on (on either node) and the Exec runs once.
    message2 = client.respond(client.read(again))
    while message2 is not None:
        status, body = post(nodes.front, enrolled, message2)
        assert status == 200
        message2 = client.respond(client.read(body))
    assert client.executed == ["./Vendor/MSFT/Reboot/RebootNow"]


# --- a node killed under load ---

# What a connection cut by a dying node looks like to the device.
_CUT = (OSError, http.client.HTTPException, ssl.SSLError)


class CountingClient(ManagementClient):
    """A device that also has ./Vendor/MSFT/Test/RunN nodes to Exec, so that
    its record of what it executed shows every delivery of every command."""

    def _executes(self, locuri: str) -> str | None:
        if locuri.startswith("./Vendor/MSFT/Test/Run"):
            return "run"
        return super()._executes(locuri)


def post_resending(front: Daemon, enrolled: Enrolled, message: bytes, resends: list[int]) -> bytes:
    """POST a message through haproxy as Windows does: when the connection
    breaks before the answer (or the server says 503), send the same message
    again on a new connection (a bounded number of times)."""
    for attempt in range(50):
        try:
            response, body = front.request(
                "POST", MANAGEMENT_PATH, message, SYNCML, section="management", context=enrolled.tls
            )
        except _CUT:
            resends.append(1)
            time.sleep(0.02 * min(attempt + 1, 10))
            continue
        if response.status == 503:
            resends.append(1)
            continue
        assert response.status == 200, (response.status, body[:300])
        return body
    raise AssertionError("no answer after 50 attempts")


def test_a_node_killed_under_load_loses_nothing_acknowledged_and_sends_nothing_again(
    tmp_path: Path, keys: list[object]
) -> None:
    with running_nodes(tmp_path) as nodes:
        first, second = nodes.nodes
        fleet = [
            (enrolled, CountingClient(enrolled.device))
            for enrolled, _ in (device(nodes, keys, tmp_path) for _ in range(6))
        ]
        # Commands queued through both nodes' admin APIs, each a LocURI of
        # its own, so the device's record of what it executed shows every
        # delivery.
        wanted: dict[str, list[str]] = {e.id: [] for e, _ in fleet}
        commands: list[str] = []

        def queue_exec(node: Daemon, enrolled: Enrolled, n: int) -> None:
            target = f"./Vendor/MSFT/Test/Run{n}"
            wanted[enrolled.id].append(target)
            commands.append(queue(node, enrolled.id, {"verb": "Exec", "items": [{"target": target}]}))

        for enrolled, _ in fleet:
            for n in range(4):
                queue_exec(nodes.nodes[n % 2], enrolled, n)
        stop = threading.Event()
        sessions = [0] * len(fleet)
        resends: list[int] = []
        failures: list[BaseException] = []

        def drive(index: int, enrolled: Enrolled, client: ManagementClient) -> None:
            try:
                while not stop.is_set():
                    message: bytes | None = client.session_start(enrolled.enrollment.management_url)
                    while message is not None:
                        body = post_resending(nodes.front, enrolled, message, resends)
                        message = client.respond(client.read(body))
                    sessions[index] += 1
            except BaseException as e:  # reported below
                failures.append(e)

        threads = [
            threading.Thread(target=drive, args=(i, enrolled, client), daemon=True)
            for i, (enrolled, client) in enumerate(fleet)
        ]
        for t in threads:
            t.start()

        def wait_for(condition: Any, what: str) -> None:
            deadline = time.monotonic() + 60
            while not condition():
                assert not failures, failures
                assert time.monotonic() < deadline, what
                time.sleep(0.01)

        wait_for(lambda: sum(sessions) >= 10, "sessions before the kill")
        # Under load: sessions are being served by both nodes right now.
        nodes.kill(first)
        killed_at = sum(sessions)
        for enrolled, _ in fleet:
            for n in range(4, 6):
                queue_exec(second, enrolled, n)

        def all_answered() -> bool:
            rows = db_rows(second, "SELECT COUNT(*) FROM commands WHERE state IN ('pending', 'sent')")
            return bool(rows[0][0] == 0)

        wait_for(lambda: sum(sessions) >= killed_at + 12, "sessions after the kill")
        wait_for(all_answered, "every command answered")
        stop.set()
        for t in threads:
            t.join(60)
        assert not failures, failures
        # Every device carried on, through the node that is left.
        assert all(count >= 2 for count in sessions), sessions
        # Each command was executed exactly once by its device: nothing lost,
        # nothing the device had acknowledged sent again (and, as every
        # resend got the answer it would have had, nothing else either).
        for enrolled, client in fleet:
            assert sorted(client.executed) == sorted(wanted[enrolled.id]), enrolled.id
        states = db_rows(
            second,
            "SELECT c.state, c.status, (SELECT COUNT(*) FROM command_results r"
            " WHERE r.command_uuid = c.uuid AND r.kind = 'status') FROM commands c",
        )
        assert len(states) == len(commands) == 36
        assert set(states) == {("acknowledged", 200, 1)}


def test_the_sample_haproxy_configuration_is_valid_and_passes_tls_through() -> None:
    sample = Path(__file__).resolve().parents[1] / "etc" / "haproxy.cfg"
    result = subprocess.run([HAPROXY, "-c", "-f", str(sample)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    text = sample.read_text()
    assert "    mode tcp\n" in text and "mode http" not in text and "ssl" not in text
    assert "option redispatch" in text


def test_behind_the_proxy_protocol_a_node_sees_and_logs_the_clients_address(tmp_path: Path) -> None:
    with running_nodes(tmp_path, count=1, proxy_protocol=True) as nodes:
        (node,) = nodes.nodes
        front = nodes.front.port("management")
        # A client at 127.0.0.2 presenting no certificate, through haproxy
        # (which connects to the node from 127.0.0.1).
        raw = socket.create_connection(("127.0.0.1", front), timeout=10, source_address=("127.0.0.2", 0))
        # Refused: at the handshake (TLS 1.2) or at the first read (1.3).
        with (
            pytest.raises(OSError),
            node.server_context().wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            if tls.recv(100) == b"":
                raise OSError("closed")
        deadline = time.monotonic() + 10
        while "management TLS handshake refused from 127.0.0.2: no certificate" not in node.log_text():
            assert time.monotonic() < deadline, node.log_text()[-2000:]
            time.sleep(0.05)
        assert "refused from 127.0.0.1" not in node.log_text()
        # Enrollment is served through it as ever.
        response, _ = nodes.front.request(
            "POST", "/api/fleet/orbit/config", b"{}", {"Content-Type": "application/json"}
        )
        assert response.status == 401
        # Straight to the node, without the header: closed, nothing served.
        with socket.create_connection(("127.0.0.1", node.port("management")), timeout=10) as direct:
            direct.sendall(b"\x16\x03\x01\x00\x05hello")
            assert direct.recv(100) == b""


def test_a_group_action_is_fanned_out_once_whichever_nodes_run_fan_outs(
    nodes: Nodes, keys: list[object], tmp_path: Path
) -> None:
    first, second = nodes.nodes
    fleet = [device(nodes, keys, tmp_path) for _ in range(4)]
    first.admin("POST", "/api/v1/groups", {"name": "fan"})
    first.admin("POST", "/api/v1/groups/fan/devices", {"add": [e.id for e, _ in fleet]})
    status, answer = second.admin("POST", "/api/v1/groups/fan/actions", {"action": "restart"})
    assert status == 202 and isinstance(answer, dict), answer
    operation_id = answer["operation_id"]
    deadline = time.monotonic() + 30
    while True:
        status, op = first.admin("GET", f"/api/v1/operations/{operation_id}")
        assert status == 200 and isinstance(op, dict), op
        if op["state"] not in ("pending", "queuing"):
            break
        assert time.monotonic() < deadline, op
        time.sleep(0.05)
    # Each member got its command once, from one node's fan-out.
    rows = db_rows(
        nodes.front,
        "SELECT device_id, COUNT(*) FROM commands WHERE operation_id = ?"
        " GROUP BY device_id ORDER BY device_id",
        operation_id,
    )
    assert rows == sorted((e.id, 1) for e, _ in fleet)
    for enrolled, client in fleet:
        run_session(nodes.front, enrolled, client)
        assert client.executed == ["./Device/Vendor/MSFT/Reboot/RebootNow"]


def _console(
    node: Daemon, method: str, path: str, cookies: dict[str, str], form: dict[str, str] | None = None
) -> tuple[int, http.client.HTTPResponse, bytes]:
    headers = {"Cookie": "; ".join(f"{k}={v}" for k, v in cookies.items())}
    body = None
    if form is not None:
        headers["Content-Type"] = "application/x-www-form-urlencoded"
        body = urlencode(form).encode()
    response, data = node.request(method, path, body, headers, section="admin")
    return response.status, response, data


def _cookie(response: http.client.HTTPResponse, name: str) -> str:
    for header in response.headers.get_all("Set-Cookie") or []:
        key, _, rest = header.partition("=")
        if key == name:
            return rest.split(";")[0]
    raise AssertionError(f"no {name} cookie in {response.headers}")


def _csrf(body: bytes) -> str:
    found = re.search(rb'name="csrf" value="([^"]+)"', body)
    assert found is not None
    return found.group(1).decode()


def test_a_console_session_signed_in_at_one_node_is_used_and_ended_at_the_other(nodes: Nodes) -> None:
    """Behind a balancer that is not sticky, a browser's requests reach
    either node's console: the session is the store's."""
    first, second = nodes.nodes
    status, response, body = _console(first, "GET", "/ui/signin", {})
    assert status == 200
    signin = {"mdmd_signin": _cookie(response, "mdmd_signin")}
    form = {"csrf": _csrf(body), "token": first.admin_token, "next": "/ui/devices"}
    status, response, _ = _console(first, "POST", "/ui/signin", signin, form)
    assert status == 303 and response.getheader("Location") == "/ui/devices"
    session = {"mdmd_session": _cookie(response, "mdmd_session")}
    status, _, body = _console(second, "GET", "/ui/groups", session)
    assert status == 200
    status, response, _ = _console(second, "POST", "/ui/signout", session, {"csrf": _csrf(body)})
    assert status == 303 and response.getheader("Location") == "/ui/signin?signed_out=1"
    status, response, _ = _console(first, "GET", "/ui/devices", session)
    assert status == 303 and (response.getheader("Location") or "").startswith("/ui/signin")


def _answers(node: Daemon, token: str, status: int, timeout: float = 20.0) -> None:
    """Bounded polling: *node* answers *token* with *status*."""
    deadline = time.monotonic() + timeout
    while (got := node.admin("GET", "/api/v1/tokens", token=token)[0]) != status:
        if time.monotonic() > deadline:
            raise AssertionError(f"{node.config}: {got}, not {status}, within {timeout}s")
        time.sleep(0.1)


def test_a_token_created_and_revoked_through_one_node_counts_at_the_other(nodes: Nodes) -> None:
    first, second = nodes.nodes
    status, created = first.admin("POST", "/api/v1/tokens", {"name": "ops-nodes"})
    assert status == 201 and isinstance(created, dict), created
    token = created["token"]
    assert first.admin("GET", "/api/v1/tokens", token=token)[0] == 200  # at once where it was made
    _answers(second, token, 200)
    assert first.admin("DELETE", "/api/v1/tokens/ops-nodes")[0] == 200
    assert first.admin("GET", "/api/v1/tokens", token=token)[0] == 401
    _answers(second, token, 401)
