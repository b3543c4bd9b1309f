"""The admin API's device actions and group operations: thin adapters
around :mod:`mdmd.actions` (requests, the command of each action) and the
store.

- ``POST /api/v1/devices/{id}/actions`` queues one action for one device;
- ``POST /api/v1/groups/{name}/actions`` and ``.../commands`` record a
  group operation and answer at once (202): the members get their command
  from :mod:`mdmd.fanout`, in batches off the reactor;
- ``GET /api/v1/operations/{id}`` reads the operation's counters, kept
  up to date by the store as the members answer (no request counts the
  fleet).
"""

from __future__ import annotations

import uuid
from typing import Any

from twisted.logger import Logger

from mdmd.actions import ActionRequest, ActionRequestError, action_command, parse_action_request
from mdmd.admin import action_json
from mdmd.app import Mdmd
from mdmd.commands import CommandRequestError, QueuedCommand, parse_command_request
from mdmd.store import NewAction, NewOperation, OperationRecord
from mdmd.web import (
    EndpointResource,
    HTTPResponse,
    MdmdRequest,
    Route,
    iso_time,
    json_body,
    json_response,
    refused,
)

__all__ = ["action_routes", "operation_json"]

log = Logger(namespace=__name__)


def _action_request(request: MdmdRequest, *, group: bool) -> ActionRequest:
    try:
        return parse_action_request(json_body(request), group=group)
    except ActionRequestError as e:
        raise refused(400, e.message, e.errors) from None


def operation_json(op: OperationRecord) -> dict[str, Any]:
    """A group operation and its progress."""
    return {
        "operation_id": op.operation_id,
        "kind": op.kind,
        "group": op.group_name,
        "action": op.action,
        "options": None if op.options is None else dict(op.options),
        "verb": op.verb,
        "state": op.state,
        "total": op.total,
        "queued": op.queued,
        "skipped": op.skipped,
        "acknowledged": op.acknowledged,
        "failed": op.failed,
        "waiting": op.queued - op.acknowledged - op.failed,
        "created_at": iso_time(op.created_at),
        "updated_at": iso_time(op.updated_at),
        "finished_at": iso_time(op.finished_at),
    }


class _Resource(EndpointResource):
    def __init__(self, app: Mdmd) -> None:
        super().__init__()
        self.app = app

    def command_of(self, request: ActionRequest) -> QueuedCommand:
        return action_command(request, provider_id=self.app.config.management.provider_id)


class DeviceActionsResource(_Resource):
    """``GET|POST /api/v1/devices/{id}/actions``."""

    async def handle_GET(self, request: MdmdRequest) -> HTTPResponse:
        device_id = request.device_id = request.path_params["device_id"]
        if await self.app.store.device(device_id) is None:
            raise refused(404, f"no such device: {device_id}")
        actions = await self.app.store.device_actions(device_id, limit=100)
        return json_response(200, {"actions": [action_json(a) for a in actions]})

    async def handle_POST(self, request: MdmdRequest) -> HTTPResponse:
        device_id = request.device_id = request.path_params["device_id"]
        wanted = _action_request(request, group=False)
        queued = self.command_of(wanted)
        new = NewAction(
            str(uuid.uuid4()), str(uuid.uuid4()), wanted.action, wanted.options(), queued.verb, queued.body
        )
        outcome = await self.app.store.request_action(device_id, new, self.app.now())
        match outcome.result:
            case "no_device":
                raise refused(404, f"no such device: {device_id}")
            case "wiped":
                raise refused(409, f"device {device_id} was wiped: it is no longer managed")
            case "unenrolled":
                raise refused(409, f"device {device_id} is unenrolled: it is no longer managed")
            case "pending":
                raise refused(409, f"device {device_id} has a {wanted.action} pending already")
        detail = {
            "options": dict(wanted.options()),
            "action_id": new.action_id,
            "command_uuid": new.command_uuid,
        }
        await self.app.audit(request, f"action.{wanted.action}", device_id, detail)
        return json_response(201, {"action_id": new.action_id, "command_uuid": new.command_uuid})


class _GroupOperationResource(_Resource):
    async def start(self, request: MdmdRequest, operation: NewOperation) -> HTTPResponse:
        if not await self.app.store.create_operation(operation, self.app.now()):
            raise refused(404, f"no such group: {operation.group_name}")
        if self.app.wake_fanout is not None:
            self.app.wake_fanout()
        what = f"action.{operation.action}" if operation.action else "command"
        detail = {
            "operation_id": operation.operation_id,
            "verb": operation.verb,
            "options": operation.options,
        }
        await self.app.audit(request, f"group.{what}", operation.group_name, detail)
        return json_response(202, {"operation_id": operation.operation_id})


class GroupActionsResource(_GroupOperationResource):
    """``POST /api/v1/groups/{name}/actions``: one action for every member."""

    async def handle_POST(self, request: MdmdRequest) -> HTTPResponse:
        group = request.path_params["name"]
        wanted = _action_request(request, group=True)
        queued = self.command_of(wanted)
        operation = NewOperation(
            str(uuid.uuid4()), "action", group, queued.verb, queued.body, wanted.action, wanted.options()
        )
        return await self.start(request, operation)


class GroupCommandsResource(_GroupOperationResource):
    """``POST /api/v1/groups/{name}/commands``: one command (the body of
    ``POST /api/v1/devices/{id}/commands``) for every member."""

    async def handle_POST(self, request: MdmdRequest) -> HTTPResponse:
        group = request.path_params["name"]
        try:
            queued = parse_command_request(json_body(request))
        except CommandRequestError as e:
            raise refused(400, e.message, e.errors) from None
        operation = NewOperation(str(uuid.uuid4()), "command", group, queued.verb, queued.body)
        return await self.start(request, operation)


class OperationResource(_Resource):
    """``GET /api/v1/operations/{id}``."""

    async def handle_GET(self, request: MdmdRequest) -> HTTPResponse:
        operation_id = request.path_params["operation_id"]
        op = await self.app.store.operation(operation_id)
        if op is None:
            raise refused(404, f"no such operation: {operation_id}")
        return json_response(200, operation_json(op))


def action_routes(app: Mdmd) -> list[Route]:
    return [
        Route("/api/v1/devices/{device_id}/actions", DeviceActionsResource(app)),
        Route("/api/v1/groups/{name}/actions", GroupActionsResource(app)),
        Route("/api/v1/groups/{name}/commands", GroupCommandsResource(app)),
        Route("/api/v1/operations/{operation_id}", OperationResource(app)),
    ]
