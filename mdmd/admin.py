"""The administrators' JSON API on the admin listener (``/api/v1/...``).

:class:`AdminAPI` resolves the path to one small :class:`~mdmd.web.Endpoint`
per resource; the endpoints are thin adapters around the store and around
the pure functions of this module, which turn a queue request into the
command's stored SyncML (:func:`parse_command_request`) and records into
JSON (:func:`device_json`, :func:`command_json`).

Commands are validated completely before anything is stored (no poison
commands, docs/windows-clients.md): what reaches the queue is exactly what
``parse_commands_fragment`` reads back when the command is sent.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Final

from twisted.logger import Logger

from mdmd.app import Mdmd
from mdmd.management import CommandResult
from mdmd.renewal import RenewalPolicy, renewal_policy, renewal_status
from mdmd.store import CertificateRecord, CommandRecord, DeviceRecord
from mdmd.syncml import (
    Command,
    Item,
    Meta,
    check_locuri,
    parse_commands_fragment,
    serialize_command,
    walk,
)
from mdmd.web import (
    EndpointResource,
    HTTPError,
    HTTPResponse,
    MdmdRequest,
    Route,
    json_error,
    json_response,
    request_body,
)

__all__ = [
    "FORMATS",
    "ITEM_VERBS",
    "CommandRequestError",
    "FieldError",
    "QueuedCommand",
    "admin_api_routes",
    "command_json",
    "command_summary_json",
    "device_json",
    "parse_command_request",
    "renewal_json",
]

log = Logger(namespace=__name__)

#: The verbs of the structured ("items") form of a queue request.
ITEM_VERBS: Final = ("Add", "Delete", "Exec", "Get", "Replace")
#: Meta/Format values an administrator may give (OMA-DM TND 1.2 formats that
#: Windows CSPs use).
FORMATS: Final = frozenset({"chr", "int", "bool", "b64", "xml", "node", "null", "float", "date", "time"})
_NO_DATA_FORMATS: Final = frozenset({"node", "null"})
# SyncML values are whitespace-trimmed when read (docs/windows-clients.md,
# "Spellings the examples get wrong"), so leading or trailing whitespace
# would be silently lost between the queue and the device.  In b64 and xml it
# carries no meaning and is trimmed here.
_TRIMMED_FORMATS: Final = frozenset({"b64", "xml"})
_INT_RE: Final = re.compile(r"[+-]?[0-9]+")
# Characters XML 1.0 cannot carry, not even as character references.
_NON_XML_RE: Final = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff\ud800-\udfff]")
_MAX_TYPE_LEN: Final = 255
_RECENT_COMMANDS: Final = 20


# --------------------------------------------------------------------------
# Queue requests (pure)
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FieldError:
    """One problem of a request, named by its field path (``items[0].target``)."""

    name: str
    reason: str


class CommandRequestError(ValueError):
    """The queue request is refused; ``errors`` lists every problem found."""

    def __init__(self, errors: Sequence[FieldError]) -> None:
        assert errors
        self.errors = tuple(errors)
        first = self.errors[0]
        message = f"invalid command: {first.name}: {first.reason}"
        if len(self.errors) > 1:
            message += f" (and {len(self.errors) - 1} more)"
        super().__init__(message)
        self.message = message


@dataclass(frozen=True, slots=True)
class QueuedCommand:
    """What the store keeps: the top-level verb and the command as SyncML
    without CmdIDs."""

    verb: str
    body: str


def parse_command_request(obj: object) -> QueuedCommand:
    """Validate a ``POST .../commands`` body and build the command to store.

    Two forms, exactly one per request: ``{"verb": ..., "items": [...]}`` or
    ``{"syncml": "<Atomic>...</Atomic>"}`` (one top-level command).  Raises
    :class:`CommandRequestError` naming every field that is wrong.
    """
    if not isinstance(obj, dict):
        raise CommandRequestError([FieldError("base", "the body must be a JSON object")])
    errors = [FieldError(str(key), "unknown field") for key in obj if key not in ("verb", "items", "syncml")]
    structured = "verb" in obj or "items" in obj
    if "syncml" in obj and structured:
        errors.append(FieldError("syncml", "give either syncml or verb and items, not both"))
        raise CommandRequestError(errors)
    cmd = _syncml_command(obj["syncml"], errors) if "syncml" in obj else _structured_command(obj, errors)
    if errors or cmd is None:
        raise CommandRequestError(errors or [FieldError("base", "no command")])
    try:
        body = serialize_command(_without_ids(cmd))
        # Belt and braces: store only what the sender will read back as
        # this very command (a difference would change it behind the
        # administrator's back, or poison the queue).
        stored = parse_commands_fragment(body)
    except ValueError as e:
        raise CommandRequestError([FieldError("base", f"cannot be stored as SyncML: {e}")]) from None
    if stored != (_without_ids(cmd),):
        raise CommandRequestError([FieldError("base", "the command does not survive storage as SyncML")])
    return QueuedCommand(cmd.verb, body)


def _without_ids(cmd: Command) -> Command:
    return replace(cmd, cmd_id="", children=tuple(_without_ids(c) for c in cmd.children))


def _syncml_command(value: object, errors: list[FieldError]) -> Command | None:
    if not isinstance(value, str) or not value.strip():
        errors.append(FieldError("syncml", "must be a non-empty string of SyncML commands"))
        return None
    try:
        commands = parse_commands_fragment(value)
    except ValueError as e:
        errors.append(FieldError("syncml", str(e)))
        return None
    if len(commands) != 1:
        errors.append(
            FieldError(
                "syncml",
                f"holds {len(commands)} commands; queue exactly one (wrap several in Atomic or Sequence)",
            )
        )
        return None
    (cmd,) = commands
    if any(c.no_resp for c in walk(cmd)):
        # Without a Status the command could never be marked answered.
        errors.append(FieldError("syncml", "NoResp is not supported: mdmd tracks each command by its Status"))
        return None
    return cmd


def _structured_command(obj: Mapping[str, object], errors: list[FieldError]) -> Command | None:
    verb = obj.get("verb")
    if "verb" not in obj:
        errors.append(FieldError("verb", "required (or give syncml)"))
        verb = None
    elif verb not in ITEM_VERBS:
        errors.append(FieldError("verb", f"must be one of {', '.join(ITEM_VERBS)}"))
        verb = None
    raw_items = obj.get("items")
    if "items" not in obj:
        errors.append(FieldError("items", "required"))
        return None
    if not isinstance(raw_items, list):
        errors.append(FieldError("items", "must be a list of items"))
        return None
    if not raw_items:
        errors.append(FieldError("items", "must not be empty"))
        return None
    if verb == "Exec" and len(raw_items) != 1:
        errors.append(FieldError("items", f"Exec takes exactly one item, got {len(raw_items)}"))
    items = [_item(raw, f"items[{i}]", verb, errors) for i, raw in enumerate(raw_items)]
    if verb is None or any(item is None for item in items):
        return None
    return Command(verb=verb, cmd_id="", items=tuple(item for item in items if item is not None))


def _item(raw: object, name: str, verb: str | None, errors: list[FieldError]) -> Item | None:
    if not isinstance(raw, dict):
        errors.append(FieldError(name, "must be an object with target, format, type, data"))
        return None
    before = len(errors)
    errors.extend(
        FieldError(f"{name}.{key}", "unknown field")
        for key in raw
        if key not in ("target", "format", "type", "data")
    )

    target = raw.get("target")
    if "target" not in raw:
        errors.append(FieldError(f"{name}.target", "required"))
    elif not isinstance(target, str):
        errors.append(FieldError(f"{name}.target", "must be a string"))
    elif target != target.strip():
        # SyncML values are trimmed when read: the device would see another URI.
        errors.append(FieldError(f"{name}.target", "must not start or end with whitespace"))
    elif _NON_XML_RE.search(target):
        errors.append(FieldError(f"{name}.target", "contains characters XML cannot carry"))
    else:
        try:
            check_locuri(target)
        except ValueError as e:
            errors.append(FieldError(f"{name}.target", str(e)))

    fmt = raw.get("format")
    if "format" in raw and (not isinstance(fmt, str) or fmt not in FORMATS):
        errors.append(FieldError(f"{name}.format", f"must be one of {', '.join(sorted(FORMATS))}"))
        fmt = None

    type_ = raw.get("type")
    if "type" in raw:
        if not isinstance(type_, str) or not type_.strip():
            errors.append(FieldError(f"{name}.type", "must be a non-empty string"))
        elif (
            len(type_) > _MAX_TYPE_LEN
            or _NON_XML_RE.search(type_)
            or any(ch.isspace() or ord(ch) < 0x20 for ch in type_)
        ):
            errors.append(FieldError(f"{name}.type", "must be a MIME-like type without spaces"))

    data = raw.get("data")
    if "data" in raw:
        data = _data(data, f"{name}.data", verb, fmt if isinstance(fmt, str) else None, errors)
    elif verb in ("Add", "Replace") and fmt not in _NO_DATA_FORMATS:
        errors.append(FieldError(f"{name}.data", f"required for {verb} unless format is node or null"))

    if len(errors) > before:
        return None
    assert isinstance(target, str)
    meta = None
    if fmt is not None or type_ is not None:
        meta = Meta(format=fmt, type=type_ if isinstance(type_, str) else None)
    return Item(target=target, meta=meta, data=data if isinstance(data, str) else None)


def _data(data: object, name: str, verb: str | None, fmt: str | None, errors: list[FieldError]) -> str | None:
    """The item's Data after checks, or None (and an error appended)."""
    if not isinstance(data, str):
        errors.append(FieldError(name, "must be a string"))
        return None
    if verb in ("Get", "Delete"):
        errors.append(FieldError(name, f"{verb} items carry no data"))
        return None
    if fmt in _NO_DATA_FORMATS:
        errors.append(FieldError(name, f"a {fmt} item carries no data"))
        return None
    if _NON_XML_RE.search(data):
        errors.append(FieldError(name, "contains characters XML cannot carry (send them with format b64)"))
        return None
    if fmt in _TRIMMED_FORMATS:
        data = data.strip()
    elif data != data.strip():
        errors.append(
            FieldError(name, "leading or trailing whitespace would be lost (SyncML values are trimmed)")
        )
        return None
    if fmt == "int" and not _INT_RE.fullmatch(data):
        errors.append(FieldError(name, f"format int needs a whole number, got {data[:40]!r}"))
        return None
    if fmt == "bool" and data not in ("true", "false"):
        errors.append(FieldError(name, f"format bool needs true or false, got {data[:40]!r}"))
        return None
    if fmt == "b64":
        try:
            base64.b64decode("".join(data.split()), validate=True)
        except (binascii.Error, ValueError):
            errors.append(FieldError(name, "format b64 needs base64 data"))
            return None
    return data


# --------------------------------------------------------------------------
# Records as JSON (pure)
# --------------------------------------------------------------------------


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


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
        "cert_not_after": None if cert is None else _iso(cert.not_after),
        "renewal": {"state": status.state, "renewed_at": _iso(status.renewed_at), "reason": status.reason},
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
        "enrolled_at": _iso(device.enrolled_at),
        "last_seen": _iso(device.last_seen),
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
        "unenrolled_at": _iso(device.unenrolled_at),
        "certificate": None
        if newest is None
        else {
            "serial": newest.serial,
            "thumbprint": newest.thumbprint,
            "not_after": _iso(newest.not_after),
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
                "created_at": _iso(c.created_at),
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
        "created_at": _iso(command.created_at),
        "sent_at": _iso(command.sent_at),
        "acknowledged_at": _iso(command.acked_at),
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
            obj = json.loads(request_body(request))
        except ValueError:  # JSONDecodeError and UnicodeDecodeError
            raise HTTPError(json_error(400, "the request body is not JSON"), "body is not JSON") from None
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
