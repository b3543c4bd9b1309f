"""The administrators' JSON API on the admin listener (``/api/v1/...``).

:func:`admin_api_routes` maps paths to one small
:class:`~mdmd.web.EndpointResource` per resource; the endpoints are thin
adapters around the store and around pure functions: :mod:`mdmd.commands`
checks a queue request and builds the command's stored SyncML,
:mod:`mdmd.profiles` does the same for configuration profiles, and this
module turns a device list request into a store query and back
(:func:`parse_device_list`, the opaque ``next`` cursor) and records into
JSON (:func:`device_json`, :func:`command_json`).

Every write is recorded in the audit log with the name of the admin token
that made it (see :meth:`mdmd.app.Mdmd.audit_entry`): in the write's own
transaction when the write is one store call.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import platform
import re
import sqlite3
import ssl
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from typing import Any, Final

from twisted.logger import Logger

import twisted
from mdmd import __version__, metrics, tokens
from mdmd.actions import ActionRequest, DeviceAction, action_command, shown_state
from mdmd.app import Mdmd
from mdmd.commands import CommandRequestError, FieldError, command_targets, parse_command_request
from mdmd.management import CommandResult
from mdmd.renewal import RenewalPolicy, renewal_policy, renewal_status
from mdmd.store import (
    DEVICE_SORTS,
    AdminToken,
    AuditQuery,
    AuditRecord,
    CertificateRecord,
    CommandRecord,
    DeviceQuery,
    DeviceRecord,
    NewAction,
)
from mdmd.syncml import describe_status
from mdmd.web import (
    EndpointResource,
    HTTPError,
    HTTPResponse,
    MdmdRequest,
    Route,
    iso_time,
    json_body,
    json_error,
    json_response,
    refused,
)

__all__ = [
    "DEFAULT_LIMIT",
    "MAX_LIMIT",
    "DeviceListRequest",
    "ListRequestError",
    "action_json",
    "admin_api_routes",
    "command_json",
    "command_summary_json",
    "decode_cursor",
    "device_json",
    "encode_cursor",
    "parse_device_list",
    "renewal_json",
]

log = Logger(namespace=__name__)

_RECENT_COMMANDS: Final = 20


# --------------------------------------------------------------------------
# List requests: limits, filters, cursors (pure)
# --------------------------------------------------------------------------

DEFAULT_LIMIT: Final = 100
MAX_LIMIT: Final = 1000
_MAX_SEARCH: Final = 128
_MAX_DAYS: Final = 3650
_DEVICE_LIST_FILTERS: Final = (
    "state",
    "last_seen_before",
    "last_seen_after",
    "os_version",
    "cert_expiring_within",
    "hw_dev_id_collision",
    "q",
    "group",
    "sort",
    "order",
)


class ListRequestError(ValueError):
    """A list request is refused; ``errors`` names every bad parameter."""

    def __init__(self, errors: Sequence[FieldError]) -> None:
        self.errors = tuple(errors)
        first = self.errors[0]
        super().__init__(f"invalid request: {first.name}: {first.reason}")
        self.message = str(self)


@dataclass(frozen=True, slots=True)
class DeviceListRequest:
    query: DeviceQuery
    limit: int
    after: tuple[float, str] | None


def _single(args: Mapping[str, Sequence[str]], errors: list[FieldError]) -> dict[str, str]:
    values = {}
    for name, given in args.items():
        if len(given) != 1:
            errors.append(FieldError(name, "given more than once"))
        else:
            values[name] = given[0]
    return values


def _limit(values: Mapping[str, str], errors: list[FieldError]) -> int:
    text = values.get("limit")
    if text is None:
        return DEFAULT_LIMIT
    if not re.fullmatch(r"[0-9]{1,9}", text) or not 1 <= int(text) <= MAX_LIMIT:
        errors.append(FieldError("limit", f"must be a whole number from 1 to {MAX_LIMIT}"))
        return DEFAULT_LIMIT
    return int(text)


def _time(text: str) -> float:
    """ISO 8601 with a time zone (``2025-01-31T12:00:00Z``), or a date (UTC)."""
    value = text.strip()
    if re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", value):
        value += "T00:00:00+00:00"
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError("must be an ISO 8601 time, e.g. 2025-01-31T12:00:00Z") from None
    if when.tzinfo is None:
        raise ValueError("needs a time zone, e.g. 2025-01-31T12:00:00Z")
    return when.timestamp()


def _text(value: str, limit: int) -> str:
    if not value or len(value) > limit or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise ValueError(f"must be 1-{limit} printable characters")
    return value


def parse_device_list(args: Mapping[str, Sequence[str]], now: float) -> DeviceListRequest:
    """``GET /api/v1/devices``'s query string to a store query.

    ``cursor`` (a previous answer's ``next``) continues the listing it came
    from, filters and order included; with it only ``limit`` may be given.
    Raises :class:`ListRequestError` naming every bad parameter.
    """
    errors = [
        FieldError(name, "unknown parameter")
        for name in args
        if name not in (*_DEVICE_LIST_FILTERS, "limit", "cursor")
    ]
    values = _single(args, errors)
    limit = _limit(values, errors)
    if "cursor" in values:
        errors += [
            FieldError(name, "a cursor continues its own listing: give only cursor and limit")
            for name in values
            if name in _DEVICE_LIST_FILTERS
        ]
        try:
            query, after = decode_cursor(values["cursor"])
        except ValueError as e:
            errors.append(FieldError("cursor", str(e)))
            query, after = DeviceQuery(), None
        if errors:
            raise ListRequestError(errors)
        return DeviceListRequest(query, limit, after)
    fields: dict[str, Any] = {}

    def field(name: str, parse: Any) -> None:
        if name in values:
            try:
                fields[name] = parse(values[name])
            except ValueError as e:
                errors.append(FieldError(name, str(e)))

    def choice(*allowed: str) -> Any:
        def parse(value: str) -> str:
            if value not in allowed:
                raise ValueError(f"must be one of {', '.join(allowed)}")
            return value

        return parse

    def days(value: str) -> float:
        if not re.fullmatch(r"[0-9]{1,5}", value) or int(value) > _MAX_DAYS:
            raise ValueError(f"must be a whole number of days from 0 to {_MAX_DAYS}")
        return now + int(value) * 86400.0

    field("state", choice("enrolled", "unenrolled"))
    field("last_seen_before", _time)
    field("last_seen_after", _time)
    field("os_version", lambda v: _text(v, 64))
    field("cert_expiring_within", days)
    field("hw_dev_id_collision", lambda v: choice("true", "false")(v) == "true")
    field("q", lambda v: _text(v, _MAX_SEARCH))
    field("group", lambda v: _text(v, 64))
    field("sort", choice(*DEVICE_SORTS))
    field("order", choice("asc", "desc"))
    if errors:
        raise ListRequestError(errors)
    query = DeviceQuery(
        state=fields.get("state"),
        last_seen_before=fields.get("last_seen_before"),
        last_seen_after=fields.get("last_seen_after"),
        os_version=fields.get("os_version"),
        cert_expiring_before=fields.get("cert_expiring_within"),
        hw_dev_id_collision=fields.get("hw_dev_id_collision"),
        search=fields.get("q"),
        group=fields.get("group"),
        sort=fields.get("sort", "enrolled_at"),
        descending=fields.get("order") == "desc",
    )
    return DeviceListRequest(query, limit, None)


def _pack(obj: object) -> str:
    raw = json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unpack(text: str) -> Any:
    if len(text) > 4096:
        raise ValueError("not a cursor this server gave")
    try:
        return json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (ValueError, binascii.Error):
        raise ValueError("not a cursor this server gave") from None


def encode_cursor(query: DeviceQuery, after: tuple[float, str]) -> str:
    """The opaque ``next`` of a device list page."""
    return _pack({"v": 1, "q": asdict(query), "a": list(after)})


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


_QUERY_FIELDS: Final = {
    "state": lambda v: v is None or v in ("enrolled", "unenrolled"),
    "last_seen_before": lambda v: v is None or _number(v),
    "last_seen_after": lambda v: v is None or _number(v),
    "os_version": lambda v: v is None or (isinstance(v, str) and 0 < len(v) <= 64),
    "cert_expiring_before": lambda v: v is None or _number(v),
    "hw_dev_id_collision": lambda v: v is None or isinstance(v, bool),
    "search": lambda v: v is None or (isinstance(v, str) and 0 < len(v) <= _MAX_SEARCH),
    "group": lambda v: v is None or (isinstance(v, str) and 0 < len(v) <= 64),
    "sort": lambda v: v in DEVICE_SORTS,
    "descending": lambda v: isinstance(v, bool),
}


def decode_cursor(text: str) -> tuple[DeviceQuery, tuple[float, str]]:
    """A device list cursor back to its query and position; ValueError for
    anything this server did not make."""
    obj = _unpack(text)
    valid = (
        isinstance(obj, dict)
        and obj.get("v") == 1
        and isinstance(obj.get("q"), dict)
        and set(obj["q"]) == set(_QUERY_FIELDS)
        and all(check(obj["q"][name]) for name, check in _QUERY_FIELDS.items())
        and isinstance(obj.get("a"), list)
        and len(obj["a"]) == 2
        and _number(obj["a"][0])
        and isinstance(obj["a"][1], str)
    )
    if not valid:
        raise ValueError("not a cursor this server gave")
    return DeviceQuery(**obj["q"]), (obj["a"][0], obj["a"][1])


def _audit_query(args: Mapping[str, Sequence[str]]) -> AuditQuery:
    errors = [
        FieldError(name, "unknown parameter")
        for name in args
        if name not in ("limit", "cursor", "actor", "action", "target")
    ]
    values = _single(args, errors)
    limit = _limit(values, errors)
    if "cursor" in values:
        errors += [
            FieldError(name, "a cursor continues its own listing: give only cursor and limit")
            for name in values
            if name in ("actor", "action", "target")
        ]
        obj = None
        try:
            obj = _unpack(values["cursor"])
        except ValueError as e:
            errors.append(FieldError("cursor", str(e)))
        filters = ("actor", "action", "target")
        if obj is not None and not (
            isinstance(obj, dict)
            and set(obj) == {"v", "before", *filters}
            and obj["v"] == 1
            and isinstance(obj["before"], int)
            and not isinstance(obj["before"], bool)
            and all(obj[k] is None or isinstance(obj[k], str) for k in filters)
        ):
            errors.append(FieldError("cursor", "not a cursor this server gave"))
        if errors:
            raise ListRequestError(errors)
        assert isinstance(obj, dict)
        return AuditQuery(limit, obj["before"], obj["actor"], obj["action"], obj["target"])
    for name in ("actor", "action", "target"):
        if name in values:
            try:
                _text(values[name], 256)
            except ValueError as e:
                errors.append(FieldError(name, str(e)))
    if errors:
        raise ListRequestError(errors)
    return AuditQuery(limit, None, values.get("actor"), values.get("action"), values.get("target"))


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
        # enrolled, unenrolled, or what a wipe or an unenrollment made of it
        "state": shown_state(device.state, device.lifecycle),
        "pending_actions": list(device.pending_actions),
        "enrolled_at": iso_time(device.enrolled_at),
        "last_seen": iso_time(device.last_seen),
        "hw_dev_id_collision": device.hw_dev_id_collision,
        **renewal_json(device, now, policy),
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
    now: float,
    policy: RenewalPolicy,
    actions: Sequence[DeviceAction] = (),
) -> dict[str, Any]:
    """``GET /api/v1/devices/{id}``: the list fields and more; *certificates*,
    *commands* and *actions* newest first."""
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


def audit_json(record: AuditRecord) -> dict[str, Any]:
    e = record.entry
    return {
        "id": record.id,
        "at": iso_time(e.at),
        "actor": e.actor,
        "action": e.action,
        "target": e.target,
        "detail": e.detail,
        "client": e.client,
        "request_id": e.request_id,
    }


def token_json(token: AdminToken) -> dict[str, Any]:
    return {
        "name": token.name,
        "active": token.revoked_at is None,
        "created_at": iso_time(token.created_at),
        "created_by": token.created_by,
        "revoked_at": iso_time(token.revoked_at),
        "revoked_by": token.revoked_by,
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


def _query_args(request: MdmdRequest) -> dict[str, list[str]]:
    try:
        return {
            k.decode("utf-8"): [v.decode("utf-8") for v in values]
            for k, values in (request.args or {}).items()
        }
    except UnicodeDecodeError:
        raise HTTPError(json_error(400, "the query string is not UTF-8"), "query string not UTF-8") from None


def _refused(e: ListRequestError | CommandRequestError) -> HTTPError:
    return refused(400, e.message, e.errors)


class _AdminResource(EndpointResource):
    def __init__(self, app: Mdmd) -> None:
        super().__init__()
        self.app = app

    @property
    def tokens(self) -> tokens.AdminTokens:
        assert self.app.tokens is not None, "the admin API runs in the main process"
        return self.app.tokens


class _DeviceResource(_AdminResource):
    """A resource below ``/api/v1/devices/{device_id}`` (the ID in any case)."""

    @staticmethod
    def device_id(request: MdmdRequest) -> str:
        request.device_id = request.path_params["device_id"]
        return request.device_id

    async def device(self, request: MdmdRequest) -> DeviceRecord:
        device_id = self.device_id(request)
        device = await self.app.store.device(device_id)
        if device is None:
            raise _not_found(f"no such device: {device_id}")
        request.device_id = device.device_id
        return device


class DevicesResource(_AdminResource):
    """``GET /api/v1/devices``: one page, filtered, searched, sorted."""

    async def handle_GET(self, request: MdmdRequest) -> HTTPResponse:
        try:
            wanted = parse_device_list(_query_args(request), self.app.now())
        except ListRequestError as e:
            raise _refused(e) from None
        page = await self.app.store.device_page(wanted.query, limit=wanted.limit, after=wanted.after)
        after = page.after
        now, policy = self.app.now(), renewal_policy(self.app.config.wstep)
        return json_response(
            200,
            {
                "devices": [device_json(d, now, policy) for d in page.devices],
                "next": None if after is None else encode_cursor(wanted.query, after),
            },
        )


class DeviceResource(_DeviceResource):
    """``GET /api/v1/devices/{id}``."""

    async def handle_GET(self, request: MdmdRequest) -> HTTPResponse:
        device = await self.device(request)
        store = self.app.store
        certificates = await store.device_certificates(device.device_id)
        commands = await store.device_commands(device.device_id, limit=_RECENT_COMMANDS)
        actions = await store.device_actions(device.device_id, limit=_RECENT_COMMANDS)
        now, policy = self.app.now(), renewal_policy(self.app.config.wstep)
        return json_response(200, device_detail_json(device, certificates, commands, now, policy, actions))


class DeviceCommandsResource(_DeviceResource):
    """``GET|POST /api/v1/devices/{id}/commands``."""

    async def handle_GET(self, request: MdmdRequest) -> HTTPResponse:
        device = await self.device(request)
        commands = await self.app.store.device_commands(device.device_id)
        return json_response(200, {"commands": [command_summary_json(c) for c in commands]})

    async def handle_POST(self, request: MdmdRequest) -> HTTPResponse:
        self.device_id(request)
        obj = json_body(request)
        try:
            queued = parse_command_request(obj)
        except CommandRequestError as e:
            raise _refused(e) from None
        device = await self.app.store.device(request.path_params["device_id"])
        if device is None or device.state != "enrolled":
            raise _not_found(f"no enrolled device: {request.device_id}")
        request.device_id = device.device_id
        command_uuid = str(uuid.uuid4())
        audit = self.app.audit_entry(
            request,
            "command.queue",
            device.device_id,
            {"command_uuid": command_uuid, "verb": queued.verb, "targets": command_targets(queued.body)},
        )
        record = await self.app.store.queue_command(
            device.device_id, command_uuid, queued.verb, queued.body, self.app.now(), audit=audit
        )
        if record is None:
            raise _not_found(f"no enrolled device: {device.device_id}")
        metrics.COMMANDS_QUEUED.inc()
        log.info(
            "admin {admin} queued {verb} {command_uuid} for device {device_id}",
            admin=request.admin,
            verb=queued.verb,
            command_uuid=command_uuid,
            device_id=device.device_id,
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
        await self.app.audit(
            request,
            "device.unenroll",
            device_id,
            {"action_id": new.action_id, "command_uuid": new.command_uuid},
        )
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


class TokensResource(_AdminResource):
    """``GET /api/v1/tokens`` (every token, never a secret) and
    ``POST /api/v1/tokens`` ``{"name": ...}``: 201 with the new token, shown
    this once."""

    async def handle_GET(self, request: MdmdRequest) -> HTTPResponse:
        return json_response(200, {"tokens": [token_json(t) for t in await self.app.store.admin_tokens()]})

    async def handle_POST(self, request: MdmdRequest) -> HTTPResponse:
        obj = json_body(request)
        name = obj.get("name") if isinstance(obj, dict) else None
        problem = tokens.name_problem(name)
        unknown = sorted(k for k in obj if k != "name") if isinstance(obj, dict) else []
        if not isinstance(obj, dict) or problem is not None or unknown:
            errors = [{"name": "name", "reason": problem}] if problem else []
            errors += [{"name": k, "reason": "unknown field"} for k in unknown]
            if not isinstance(obj, dict):
                errors = [{"name": "base", "reason": "the body must be a JSON object"}]
            message = f"invalid token request: {errors[0]['name']}: {errors[0]['reason']}"
            raise HTTPError(json_error(400, message, errors=errors), message)
        assert isinstance(name, str)
        secret = tokens.new_token()
        now = self.app.now()
        token = AdminToken(name, tokens.hash_token(secret), now, created_by=request.admin)
        audit = self.app.audit_entry(request, "token.create", name)
        if not await self.app.store.create_admin_token(token, audit=audit):
            message = f"an active token is named {name}: revoke it first, or choose another name"
            raise HTTPError(json_error(409, message), message)
        await self.tokens.load()
        log.info("admin {admin} created admin token {name}", admin=request.admin, name=name)
        return json_response(201, {**token_json(token), "token": secret})


class TokenResource(_AdminResource):
    """``DELETE /api/v1/tokens/{name}``: revoke it (at once)."""

    async def handle_DELETE(self, request: MdmdRequest) -> HTTPResponse:
        name = request.path_params["name"]
        audit = self.app.audit_entry(request, "token.revoke", name)
        outcome = await self.app.store.revoke_admin_token(name, self.app.now(), by=request.admin, audit=audit)
        if outcome == "unknown":
            raise _not_found(f"no active token named {name}")
        if outcome == "last":
            message = f"{name} is the only active token: create another before revoking it"
            raise HTTPError(json_error(409, message), message)
        await self.tokens.load()
        log.info("admin {admin} revoked admin token {name}", admin=request.admin, name=name)
        return json_response(200, {"name": name, "revoked": True})


class AuditResource(_AdminResource):
    """``GET /api/v1/audit``: administrators' writes, newest first, paged."""

    async def handle_GET(self, request: MdmdRequest) -> HTTPResponse:
        try:
            query = _audit_query(_query_args(request))
        except ListRequestError as e:
            raise _refused(e) from None
        records = await self.app.store.audit_log(replace(query, limit=query.limit + 1))
        more = len(records) > query.limit
        records = records[: query.limit]
        cursor = None
        if more:
            cursor = _pack(
                {
                    "v": 1,
                    "before": records[-1].id,
                    "actor": query.actor,
                    "action": query.action,
                    "target": query.target,
                }
            )
        return json_response(200, {"entries": [audit_json(r) for r in records], "next": cursor})


class VersionResource(_AdminResource):
    """``GET /api/v1/version``."""

    async def handle_GET(self, request: MdmdRequest) -> HTTPResponse:
        return json_response(200, version_json(self.app.store.schema_version))


def version_json(schema_version: int) -> dict[str, Any]:
    return {
        "version": __version__,
        "schema_version": schema_version,
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "openssl": ssl.OPENSSL_VERSION,
        "sqlite": sqlite3.sqlite_version,
    }


def admin_api_routes(app: Mdmd) -> list[Route]:
    """The routes of the admin API below ``/api/v1/``."""
    return [
        Route("/api/v1/version", VersionResource(app)),
        Route("/api/v1/devices", DevicesResource(app)),
        Route("/api/v1/devices/{device_id}", DeviceResource(app)),
        Route("/api/v1/devices/{device_id}/commands", DeviceCommandsResource(app)),
        Route("/api/v1/devices/{device_id}/unenroll", DeviceUnenrollResource(app)),
        Route("/api/v1/commands/{command_uuid}", CommandResource(app)),
        Route("/api/v1/tokens", TokensResource(app)),
        Route("/api/v1/tokens/{name}", TokenResource(app)),
        Route("/api/v1/audit", AuditResource(app)),
    ]
