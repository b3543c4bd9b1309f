"""OMA-DM end-to-end helpers: an enrolled emulated device with its TLS
client context, and whole sessions over the management listener."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from harness import MANAGEMENT_PATH, SYNCML, Daemon, client_tls_context, enroll_device
from mdmd.sim.device import EnrollmentResult, ManagementClient, ServerMessage, WindowsDevice


@dataclass
class Enrolled:
    device: WindowsDevice
    enrollment: EnrollmentResult
    tls: ssl.SSLContext

    @property
    def id(self) -> str:
        return self.device.device_id


def enroll(daemon: Daemon, device: WindowsDevice, tmp_path: Path) -> Enrolled:
    """Enroll *device* through the real endpoints; its TLS client context."""
    result = enroll_device(daemon, device)
    assert isinstance(result, EnrollmentResult)
    return Enrolled(device, result, client_tls_context(daemon, tmp_path, result.certificate, device.key))


def post(
    daemon: Daemon, who: Enrolled | ssl.SSLContext, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    context = who.tls if isinstance(who, Enrolled) else who
    response, data = daemon.request(
        "POST", MANAGEMENT_PATH, body, headers or SYNCML, section="management", context=context
    )
    return response.status, data


def run_session(
    daemon: Daemon, who: Enrolled, client: ManagementClient, *, stop_after: int | None = None
) -> list[ServerMessage]:
    """A whole session; with stop_after, the connection 'breaks' after that
    many server messages were received (the device never answers the last)."""
    seen: list[ServerMessage] = []
    message: bytes | None = client.session_start(who.enrollment.management_url)
    while message is not None:
        status, body = post(daemon, who, message)
        assert status == 200, body
        server = client.read(body)
        seen.append(server)
        if stop_after is not None and len(seen) >= stop_after:
            break
        message = client.respond(server)
    return seen


def queue(daemon: Daemon, device_id: str, command: dict[str, object]) -> str:
    status, body = daemon.admin("POST", f"/api/v1/devices/{device_id}/commands", command)
    assert status == 201, body
    assert isinstance(body, dict)
    return str(body["command_uuid"])


def command_state(daemon: Daemon, uuid: str) -> object:
    status, command = daemon.admin("GET", f"/api/v1/commands/{uuid}")
    assert status == 200 and isinstance(command, dict), command
    return command["state"]


def get(target: str) -> dict[str, object]:
    return {"verb": "Get", "items": [{"target": target}]}
