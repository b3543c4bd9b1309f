"""The administrators' JSON API on the admin listener (``/api/v1/...``).

:func:`admin_api_routes` maps each path to one small
:class:`~mdmd.web.EndpointResource`; these are thin adapters around the
store and around pure functions: :mod:`mdmd.commands` checks a queue request
and builds the command's stored SyncML, :mod:`mdmd.profiles` does the same
for configuration profiles, and this module's :func:`device_json` and
:func:`command_json` turn records into JSON.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any, Final

from twisted.logger import Logger

from mdmd.actions import ActionRequest, DeviceAction, action_command, shown_state
from mdmd.app import Mdmd
from mdmd.commands import CommandRequestError, parse_command_request
from mdmd.jsonsafe import JSONInputError, parse_untrusted_json
from mdmd.management import CommandResult
from mdmd.store import CertificateRecord, CommandRecord, DeviceRecord, NewAction
from mdmd.syncml import describe_status
from mdmd.web import (
    EndpointResource,
    HTTPError,
    HTTPResponse,
    MdmdRequest,
    Route,
    iso_time,
    json_error,
    json_response,
    request_body,
)

__all__ = [
    "action_json",
    "admin_api_routes",
    "command_json",
    "command_summary_json",
    "device_json",
]

log = Logger(namespace=__name__)

_RECENT_COMMANDS: Final = 20


# --------------------------------------------------------------------------
# Records as JSON (pure)
# --------------------------------------------------------------------------


def device_json(device: DeviceRecord) -> dict[str, Any]:
    """The fields of ``GET /api/v1/devices``."""
    return {
        "device_id": device.device_id,
        "host_id": device.host_id,
        "name": device.device_name,
        "model": device.inventory.get("./DevInfo/Mod"),
        "manufacturer": device.inventory.get("./DevInfo/Man"),
        "os_version": device.os_version,
        # enrolled, unenrolled, or what a wipe or an unenrollment made of it
        "state": shown_state(device.state, device.lifecycle),
        "pending_actions": list(device.pending_actions),
        "enrolled_at": iso_time(device.enrolled_at),
        "last_seen": iso_time(device.last_seen),
        "hw_dev_id_collision": device.hw_dev_id_collision,
    }


def status_text(code: int | None) -> str | None:
    """The device's status code with its meaning (``"404 Not found: ..."``)."""
    return None if code is None else describe_status(code)


def action_json(action: DeviceAction) -> dict[str, Any]:
    """An action asked of a device, and where it stands."""
    return {
        "action_id": action.action_id,
        "device_id": action.device_id,
        "action": action.action,
        "options": dict(action.options),
        "state": action.state,
        "status": action.status,
        "status_text": status_text(action.status),
        "detail": action.detail,
        "command_uuid": action.command_uuid,
        "operation_id": action.operation_id,
        "created_at": iso_time(action.created_at),
        "updated_at": iso_time(action.updated_at),
    }


def device_detail_json(
    device: DeviceRecord,
    certificates: Sequence[CertificateRecord],
    commands: Sequence[CommandRecord],
    actions: Sequence[DeviceAction] = (),
) -> dict[str, Any]:
    """``GET /api/v1/devices/{id}``: the list fields and more; *certificates*,
    *commands* and *actions* newest first."""
    newest = certificates[0] if certificates else None
    return {
        **device_json(device),
        "hw_dev_id": device.hw_dev_id,
        "enrollment_type": device.enrollment_type,
        "unenrolled_at": iso_time(device.unenrolled_at),
        "certificate": None
        if newest is None
        else {
            "serial": newest.serial,
            "thumbprint": newest.thumbprint,
            "not_after": iso_time(newest.not_after),
            "revoked": newest.revoked_at is not None,
        },
        "inventory": dict(device.inventory),
        "recent_commands": [
            {
                "command_uuid": c.uuid,
                "verb": c.verb,
                "state": c.state,
                "status": c.status,
                "status_text": status_text(c.status),
                "detail": c.detail,
                "created_at": iso_time(c.created_at),
            }
            for c in commands
        ],
        "actions": [action_json(a) for a in actions],
    }


def command_summary_json(command: CommandRecord) -> dict[str, Any]:
    """A command without its SyncML and results (``GET .../commands``)."""
    return {
        "command_uuid": command.uuid,
        "device_id": command.device_id,
        "verb": command.verb,
        "state": command.state,
        "status": command.status,
        "status_text": status_text(command.status),
        "detail": command.detail,
        "operation_id": command.operation_id,
        "created_at": iso_time(command.created_at),
        "sent_at": iso_time(command.sent_at),
        "acknowledged_at": iso_time(command.acked_at),
    }


def _result_json(result: CommandResult) -> dict[str, Any]:
    return {
        "cmd_id": result.cmd_id,
        "kind": result.kind,
        "status": result.status,
        "status_text": status_text(result.status),
        "target": result.loc_uri,
        "format": result.format,
        "type": result.type,
        "data": result.data,
    }


def command_json(command: CommandRecord) -> dict[str, Any]:
    """``GET /api/v1/commands/{uuid}``."""
    return {
        **command_summary_json(command),
        "syncml": command.body,
        "results": [_result_json(r) for r in command.results],
    }


# --------------------------------------------------------------------------
# twisted.web adapters
# --------------------------------------------------------------------------


def _not_found(what: str) -> HTTPError:
    return HTTPError(json_error(404, what), what)


class _AdminResource(EndpointResource):
    def __init__(self, app: Mdmd) -> None:
        super().__init__()
        self.app = app


class _DeviceResource(_AdminResource):
    """A resource below ``/api/v1/devices/{device_id}``."""

    @staticmethod
    def device_id(request: MdmdRequest) -> str:
        request.device_id = request.path_params["device_id"]
        return request.device_id

    async def device(self, request: MdmdRequest) -> DeviceRecord:
        device_id = self.device_id(request)
        device = await self.app.store.device(device_id)
        if device is None:
            raise _not_found(f"no such device: {device_id}")
        return device


class DevicesResource(_AdminResource):
    """``GET /api/v1/devices``."""

    async def handle_GET(self, request: MdmdRequest) -> HTTPResponse:
        devices = await self.app.store.devices()
        return json_response(200, {"devices": [device_json(d) for d in devices]})


class DeviceResource(_DeviceResource):
    """``GET /api/v1/devices/{id}``."""

    async def handle_GET(self, request: MdmdRequest) -> HTTPResponse:
        device = await self.device(request)
        store = self.app.store
        certificates = await store.device_certificates(device.device_id)
        commands = await store.device_commands(device.device_id, limit=_RECENT_COMMANDS)
        actions = await store.device_actions(device.device_id, limit=_RECENT_COMMANDS)
        return json_response(200, device_detail_json(device, certificates, commands, actions))


class DeviceCommandsResource(_DeviceResource):
    """``GET|POST /api/v1/devices/{id}/commands``."""

    async def handle_GET(self, request: MdmdRequest) -> HTTPResponse:
        device = await self.device(request)
        commands = await self.app.store.device_commands(device.device_id)
        return json_response(200, {"commands": [command_summary_json(c) for c in commands]})

    async def handle_POST(self, request: MdmdRequest) -> HTTPResponse:
        device_id = self.device_id(request)
        try:
            obj = parse_untrusted_json(request_body(request))
        except JSONInputError as e:
            reason = f"the request body is {e}"
            errors = [{"name": e.field or "base", "reason": reason}]
            raise HTTPError(json_error(400, reason, errors=errors), reason) from None
        try:
            queued = parse_command_request(obj)
        except CommandRequestError as e:
            errors = [{"name": f.name, "reason": f.reason} for f in e.errors]
            raise HTTPError(json_error(400, e.message, errors=errors), e.message) from None
        command_uuid = str(uuid.uuid4())
        record = await self.app.store.queue_command(
            device_id, command_uuid, queued.verb, queued.body, self.app.now()
        )
        if record is None:
            raise _not_found(f"no enrolled device: {device_id}")
        log.info(
            "admin queued {verb} {command_uuid} for device {device_id}",
            verb=queued.verb,
            command_uuid=command_uuid,
            device_id=device_id,
        )
        return json_response(201, {"command_uuid": command_uuid})


class DeviceUnenrollResource(_DeviceResource):
    """``POST /api/v1/devices/{id}/unenroll``: the ``unenroll`` action.  The
    device gets DMClient's Unenroll at its next session, and its agent, if
    mdmd knows one, is told to unenroll it at its next config poll: whichever
    comes first."""

    async def handle_POST(self, request: MdmdRequest) -> HTTPResponse:
        device_id = self.device_id(request)
        request_ = ActionRequest("unenroll")
        queued = action_command(request_, provider_id=self.app.config.management.provider_id)
        new = NewAction(str(uuid.uuid4()), str(uuid.uuid4()), "unenroll", {}, queued.verb, queued.body)
        outcome = await self.app.store.request_action(device_id, new, self.app.now())
        if outcome.result in ("no_device", "unenrolled", "wiped"):
            raise _not_found(f"no enrolled device: {device_id}")
        if outcome.result == "pending":
            message = f"device {device_id} has an unenrollment pending already"
            raise HTTPError(json_error(409, message), message)
        log.info("admin requested unenrollment of device {device_id}", device_id=device_id)
        return json_response(
            202, {"device_id": device_id, "action_id": new.action_id, "command_uuid": new.command_uuid}
        )


class CommandResource(_AdminResource):
    """``GET /api/v1/commands/{uuid}``."""

    async def handle_GET(self, request: MdmdRequest) -> HTTPResponse:
        command_uuid = request.path_params["command_uuid"]
        command = await self.app.store.command(command_uuid)
        if command is None:
            raise _not_found(f"no such command: {command_uuid}")
        request.device_id = command.device_id
        return json_response(200, command_json(command))


def admin_api_routes(app: Mdmd) -> list[Route]:
    """The routes of the admin API below ``/api/v1/``."""
    return [
        Route("/api/v1/devices", DevicesResource(app)),
        Route("/api/v1/devices/{device_id}", DeviceResource(app)),
        Route("/api/v1/devices/{device_id}/commands", DeviceCommandsResource(app)),
        Route("/api/v1/devices/{device_id}/unenroll", DeviceUnenrollResource(app)),
        Route("/api/v1/commands/{command_uuid}", CommandResource(app)),
    ]
