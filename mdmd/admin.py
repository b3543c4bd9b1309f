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

from mdmd.app import Mdmd
from mdmd.commands import CommandRequestError, parse_command_request
from mdmd.jsonsafe import JSONInputError, parse_untrusted_json
from mdmd.management import CommandResult
from mdmd.renewal import RenewalPolicy, renewal_policy, renewal_status
from mdmd.store import CertificateRecord, CommandRecord, DeviceRecord
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
    "admin_api_routes",
    "command_json",
    "command_summary_json",
    "device_json",
    "renewal_json",
]

log = Logger(namespace=__name__)

_RECENT_COMMANDS: Final = 20


# --------------------------------------------------------------------------
# Records as JSON (pure)
# --------------------------------------------------------------------------


def renewal_json(device: DeviceRecord, now: float, policy: RenewalPolicy) -> dict[str, Any]:
    """The current certificate's end and its renewal state (``none``,
    ``renewed`` with when, ``failed`` with why; see
    :func:`mdmd.renewal.renewal_status`)."""
    cert = device.certificate
    status = renewal_status(
        not_after=None if cert is None else cert.not_after,
        renewed_at=None if cert is None or cert.renewed_from is None else cert.issued_at,
        now=now,
        policy=policy,
    )
    return {
        "cert_not_after": None if cert is None else iso_time(cert.not_after),
        "renewal": {
            "state": status.state,
            "renewed_at": iso_time(status.renewed_at),
            "reason": status.reason,
        },
    }


def device_json(device: DeviceRecord, now: float, policy: RenewalPolicy) -> dict[str, Any]:
    """The fields of ``GET /api/v1/devices`` (*now* and *policy* decide the
    renewal state)."""
    return {
        "device_id": device.device_id,
        "host_id": device.host_id,
        "name": device.device_name,
        "model": device.inventory.get("./DevInfo/Mod"),
        "manufacturer": device.inventory.get("./DevInfo/Man"),
        "os_version": device.os_version,
        "state": device.state,
        "enrolled_at": iso_time(device.enrolled_at),
        "last_seen": iso_time(device.last_seen),
        "hw_dev_id_collision": device.hw_dev_id_collision,
        **renewal_json(device, now, policy),
    }


def device_detail_json(
    device: DeviceRecord,
    certificates: Sequence[CertificateRecord],
    commands: Sequence[CommandRecord],
    now: float,
    policy: RenewalPolicy,
) -> dict[str, Any]:
    """``GET /api/v1/devices/{id}``: the list fields and more; *certificates*
    and *commands* newest first."""
    newest = certificates[0] if certificates else None
    return {
        **device_json(device, now, policy),
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
            "revoke_reason": newest.revoke_reason,
            "renewed_from": newest.renewed_from,
        },
        "inventory": dict(device.inventory),
        "recent_commands": [
            {
                "command_uuid": c.uuid,
                "verb": c.verb,
                "state": c.state,
                "status": c.status,
                "created_at": iso_time(c.created_at),
            }
            for c in commands
        ],
    }


def command_summary_json(command: CommandRecord) -> dict[str, Any]:
    """A command without its SyncML and results (``GET .../commands``)."""
    return {
        "command_uuid": command.uuid,
        "device_id": command.device_id,
        "verb": command.verb,
        "state": command.state,
        "status": command.status,
        "created_at": iso_time(command.created_at),
        "sent_at": iso_time(command.sent_at),
        "acknowledged_at": iso_time(command.acked_at),
    }


def _result_json(result: CommandResult) -> dict[str, Any]:
    return {
        "cmd_id": result.cmd_id,
        "kind": result.kind,
        "status": result.status,
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
        now, policy = self.app.now(), renewal_policy(self.app.config.wstep)
        return json_response(200, {"devices": [device_json(d, now, policy) for d in devices]})


class DeviceResource(_DeviceResource):
    """``GET /api/v1/devices/{id}``."""

    async def handle_GET(self, request: MdmdRequest) -> HTTPResponse:
        device = await self.device(request)
        store = self.app.store
        certificates = await store.device_certificates(device.device_id)
        commands = await store.device_commands(device.device_id, limit=_RECENT_COMMANDS)
        return json_response(
            200,
            device_detail_json(
                device, certificates, commands, self.app.now(), renewal_policy(self.app.config.wstep)
            ),
        )


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
    """``POST /api/v1/devices/{id}/unenroll``: the device's agent is told to
    unenroll it at its next config poll."""

    async def handle_POST(self, request: MdmdRequest) -> HTTPResponse:
        device = await self.device(request)
        if device.state != "enrolled":
            raise _not_found(f"no enrolled device: {device.device_id}")
        if not await self.app.store.request_unenrollment(device.device_id):
            # Enrolled without a known agent host: nobody to ask.
            message = f"device {device.device_id} has no agent host that could unenroll it"
            raise HTTPError(json_error(409, message), message)
        log.info("admin requested unenrollment of device {device_id}", device_id=device.device_id)
        return json_response(202, {"device_id": device.device_id})


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
