"""The admin API's configuration profiles and device groups
(``/api/v1/profiles``, ``/api/v1/groups``, ``/api/v1/devices/{id}/profiles``):
thin adapters around :mod:`mdmd.profiles` and the store.

Assigning a profile to a group, ``all`` included, is one small write: the
devices pick it up when they next check in, each its own (nothing here
touches every device).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Final

from twisted.logger import Logger

from mdmd.app import Mdmd
from mdmd.commands import FieldError
from mdmd.profiles import (
    DeviceProfile,
    ProfileEvent,
    ProfileItem,
    ProfileRequestError,
    check_name,
    parse_profile_request,
    profile_syncml,
)
from mdmd.store import DeviceProfileEntry, GroupRecord, ProfileRecord
from mdmd.syncml import describe_status
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

__all__ = ["profile_routes"]

log = Logger(namespace=__name__)

ALL_GROUP: Final = "all"
_PAGE: Final = 100
_MAX_PAGE: Final = 1000
_MAX_IDS: Final = 10_000


def _profile(obj: object, name: str | None = None) -> Any:
    try:
        return parse_profile_request(obj, name=name)
    except ProfileRequestError as e:
        raise refused(400, e.message, e.errors) from None


def _item_json(item: ProfileItem) -> dict[str, Any]:
    return {
        "verb": item.verb,
        "target": item.target,
        "format": item.format,
        "type": item.type,
        "data": item.data,
    }


def profile_json(p: ProfileRecord) -> dict[str, Any]:
    return {
        "name": p.name,
        "version": p.version,
        "groups": list(p.groups),
        "items": len(p.items),
        "created_at": iso_time(p.created_at),
        "updated_at": iso_time(p.updated_at),
        "deleting": p.deleted_at is not None,
    }


def group_json(g: GroupRecord) -> dict[str, Any]:
    return {
        "name": g.name,
        "builtin": g.created_at is None,
        "members": g.members,
        "profiles": list(g.profiles),
        "created_at": iso_time(g.created_at),
    }


def _event_json(e: ProfileEvent) -> dict[str, Any]:
    return {
        "version": e.version,
        "state": e.state,
        "status": e.status,
        "detail": e.detail,
        "at": iso_time(e.at),
    }


def device_profile_json(entry: DeviceProfileEntry) -> dict[str, Any]:
    r: DeviceProfile = entry.record
    return {
        "name": r.profile,
        "version": r.version,
        "state": r.state,
        "status": r.status,
        "status_text": None if r.status is None else describe_status(r.status),
        "detail": r.detail,
        "updated_at": iso_time(r.updated_at),
        "verified_at": iso_time(r.verified_at),
        "history": [_event_json(e) for e in entry.history],
    }


def _names(obj: object, field: str, *, limit: int = _MAX_IDS) -> list[str]:
    if not isinstance(obj, list) or not all(isinstance(x, str) and x for x in obj):
        raise refused(400, f"{field} must be a list of names", [FieldError(field, "must be a list of names")])
    if len(obj) > limit:
        raise refused(
            400, f"{field}: at most {limit} at once", [FieldError(field, f"at most {limit} at once")]
        )
    return list(obj)


def _page(request: MdmdRequest) -> tuple[int, str | None]:
    """``?limit=`` (default 100, at most 1,000) and the opaque ``?cursor=``."""
    args = request.args or {}
    raw_limit = (args.get(b"limit") or [str(_PAGE).encode()])[0]
    try:
        limit = int(raw_limit)
    except ValueError:
        limit = 0
    if not 1 <= limit <= _MAX_PAGE:
        reason = f"limit must be a whole number from 1 to {_MAX_PAGE}"
        raise refused(400, reason, [FieldError("limit", reason)])
    raw_cursor = (args.get(b"cursor") or [b""])[0]
    if not raw_cursor:
        return limit, None
    try:
        return limit, base64.urlsafe_b64decode(raw_cursor + b"=" * (-len(raw_cursor) % 4)).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise refused(
            400, "cursor is not one this API gave", [FieldError("cursor", "unknown cursor")]
        ) from None


def _cursor(last: str) -> str:
    return base64.urlsafe_b64encode(last.encode("utf-8")).decode("ascii").rstrip("=")


class _Resource(EndpointResource):
    def __init__(self, app: Mdmd) -> None:
        super().__init__()
        self.app = app


class ProfilesResource(_Resource):
    """``GET|POST /api/v1/profiles``."""

    async def handle_GET(self, request: MdmdRequest) -> HTTPResponse:
        profiles = await self.app.store.profiles()
        return json_response(200, {"profiles": [profile_json(p) for p in profiles]})

    async def handle_POST(self, request: MdmdRequest) -> HTTPResponse:
        profile = _profile(json_body(request))
        if not await self.app.store.create_profile(profile, self.app.now()):
            raise refused(
                409, f"profile {profile.name} exists (PUT /api/v1/profiles/{profile.name} changes it)"
            )
        await self.app.audit(request, "profile.create", profile.name, {"version": profile.version})
        return json_response(201, {"name": profile.name, "version": profile.version})


class ProfileResource(_Resource):
    """``GET|PUT|DELETE /api/v1/profiles/{name}``."""

    async def handle_GET(self, request: MdmdRequest) -> HTTPResponse:
        name = request.path_params["name"]
        profile = await self.app.store.profile(name)
        if profile is None:
            raise refused(404, f"no such profile: {name}")
        status = await self.app.store.profile_status(name)
        return json_response(
            200,
            {
                **profile_json(profile),
                "items": [_item_json(i) for i in profile.items],
                "syncml": profile_syncml(profile.items),
                "status": status,
            },
        )

    async def handle_PUT(self, request: MdmdRequest) -> HTTPResponse:
        name = request.path_params["name"]
        profile = _profile(json_body(request), name)
        if not await self.app.store.update_profile(profile, self.app.now()):
            raise refused(404, f"no such profile: {name}")
        await self.app.audit(request, "profile.update", name, {"version": profile.version})
        return json_response(200, {"name": name, "version": profile.version})

    async def handle_DELETE(self, request: MdmdRequest) -> HTTPResponse:
        name = request.path_params["name"]
        if not await self.app.store.delete_profile(name, self.app.now()):
            raise refused(404, f"no such profile: {name}")
        await self.app.audit(request, "profile.delete", name)
        return json_response(202, {"name": name})


class ProfileGroupsResource(_Resource):
    """``PUT /api/v1/profiles/{name}/groups`` ``{"groups": [...]}``."""

    async def handle_PUT(self, request: MdmdRequest) -> HTTPResponse:
        name = request.path_params["name"]
        body = json_body(request)
        if not isinstance(body, dict) or set(body) != {"groups"}:
            raise refused(400, 'the body must be {"groups": [names]}', [FieldError("groups", "required")])
        groups = _names(body["groups"], "groups")
        outcome = await self.app.store.assign_profile(name, groups, self.app.now())
        if not outcome.found:
            raise refused(404, f"no such profile: {name}")
        if outcome.unknown_groups:
            unknown = ", ".join(outcome.unknown_groups)
            raise refused(
                400, f"no such group: {unknown}", [FieldError("groups", f"no such group: {unknown}")]
            )
        await self.app.audit(request, "profile.assign", name, {"groups": list(dict.fromkeys(groups))})
        return json_response(200, {"name": name, "groups": list(dict.fromkeys(groups))})


class GroupsResource(_Resource):
    """``GET|POST /api/v1/groups``."""

    async def handle_GET(self, request: MdmdRequest) -> HTTPResponse:
        groups = await self.app.store.groups()
        return json_response(200, {"groups": [group_json(g) for g in groups]})

    async def handle_POST(self, request: MdmdRequest) -> HTTPResponse:
        body = json_body(request)
        name = body.get("name") if isinstance(body, dict) else None
        reason = check_name(name)
        if reason is None and name == ALL_GROUP:
            reason = "all is the built-in group of every enrolled device"
        if reason is not None or not isinstance(name, str):
            raise refused(400, f"invalid group name: {reason}", [FieldError("name", reason or "required")])
        if isinstance(body, dict) and set(body) - {"name"}:
            fields = [FieldError(str(k), "unknown field") for k in body if k != "name"]
            raise refused(400, "unknown field", fields)
        if not await self.app.store.create_group(name, self.app.now()):
            raise refused(409, f"group {name} exists")
        await self.app.audit(request, "group.create", name)
        return json_response(201, {"name": name})


class GroupResource(_Resource):
    """``GET|DELETE /api/v1/groups/{name}``: the group and a page of its
    members (``?limit=``, ``?cursor=``)."""

    async def handle_GET(self, request: MdmdRequest) -> HTTPResponse:
        name = request.path_params["name"]
        limit, after = _page(request)
        group = await self.app.store.group(name)
        if group is None:
            raise refused(404, f"no such group: {name}")
        members = await self.app.store.group_members(name, after=after, limit=limit)
        more = len(members) == limit and members
        return json_response(
            200, {**group_json(group), "devices": members, "next": _cursor(members[-1]) if more else None}
        )

    async def handle_DELETE(self, request: MdmdRequest) -> HTTPResponse:
        name = request.path_params["name"]
        if name == ALL_GROUP:
            raise refused(400, "the built-in group all cannot be deleted")
        if not await self.app.store.delete_group(name):
            raise refused(404, f"no such group: {name}")
        await self.app.audit(request, "group.delete", name)
        return HTTPResponse(204, b"")


class GroupDevicesResource(_Resource):
    """``POST /api/v1/groups/{name}/devices`` ``{"add": [...], "remove": [...]}``."""

    async def handle_POST(self, request: MdmdRequest) -> HTTPResponse:
        name = request.path_params["name"]
        if name == ALL_GROUP:
            raise refused(
                400, "the built-in group all holds every enrolled device; its members cannot change"
            )
        body = json_body(request)
        if not isinstance(body, dict) or not body or set(body) - {"add", "remove"}:
            raise refused(400, 'the body must be {"add": [device IDs], "remove": [device IDs]}')
        add = _names(body.get("add", []), "add")
        remove = _names(body.get("remove", []), "remove")
        change = await self.app.store.change_group_members(name, add, remove, self.app.now())
        if change is None:
            raise refused(404, f"no such group: {name}")
        if change.unknown:
            shown = ", ".join(change.unknown[:20]) + (" ..." if len(change.unknown) > 20 else "")
            raise refused(
                400,
                f"no such device: {shown}",
                [FieldError("add" if d in add else "remove", f"no such device: {d}") for d in change.unknown],
            )
        await self.app.audit(
            request,
            "group.members",
            name,
            # The first IDs name the change; the counts say how big it was.
            {"added": change.added, "removed": change.removed, "add": add[:100], "remove": remove[:100]},
        )
        return json_response(200, {"name": name, "added": change.added, "removed": change.removed})


class DeviceProfilesResource(_Resource):
    """``GET /api/v1/devices/{id}/profiles``."""

    async def handle_GET(self, request: MdmdRequest) -> HTTPResponse:
        device_id = request.path_params["device_id"]
        request.device_id = device_id
        if await self.app.store.device(device_id) is None:
            raise refused(404, f"no such device: {device_id}")
        entries = await self.app.store.device_profiles(device_id)
        return json_response(200, {"profiles": [device_profile_json(e) for e in entries]})


def profile_routes(app: Mdmd) -> list[Route]:
    return [
        Route("/api/v1/profiles", ProfilesResource(app)),
        Route("/api/v1/profiles/{name}", ProfileResource(app)),
        Route("/api/v1/profiles/{name}/groups", ProfileGroupsResource(app)),
        Route("/api/v1/groups", GroupsResource(app)),
        Route("/api/v1/groups/{name}", GroupResource(app)),
        Route("/api/v1/groups/{name}/devices", GroupDevicesResource(app)),
        Route("/api/v1/devices/{device_id}/profiles", DeviceProfilesResource(app)),
    ]
