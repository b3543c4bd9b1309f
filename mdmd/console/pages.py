"""The web console's pages: thin twisted.web adapters that read with the
store calls the JSON API uses, write with the API's own functions (which
check, write and audit under the signed-in token's name) and render
Jinja2 templates on the server.  Plain forms, no script.

Every page but sign-in needs a session (:mod:`mdmd.console.session`):
without one a GET is sent to the sign-in page and a POST refused the same
way, so that nothing is shown and nothing changes.  Every POST carries the
session's CSRF token.  The fleet-wide counts come from the cache the
metrics use (read off the reactor, at most once per ``[admin]
metrics_cache_seconds``; a page shows the latest counts while a fresh read
runs), so that no page walks the fleet.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import time
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any, Final
from urllib.parse import quote, urlencode

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from lxml import etree
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from mdmd.actions import ACTIONS, WIPE_MODES
from mdmd.admin import (
    ListRequestError,
    audit_page,
    command_json,
    device_detail_json,
    device_list_page,
)
from mdmd.admin_actions import operation_json, queue_device_action
from mdmd.admin_profiles import (
    assign_profile,
    change_group_members,
    create_group,
    create_profile,
    delete_group,
    device_profile_json,
    group_json,
    profile_json,
    update_profile,
)
from mdmd.app import Mdmd
from mdmd.console import charts
from mdmd.console.session import (
    SECURITY_HEADERS,
    SESSION_COOKIE,
    SESSION_SECONDS,
    SIGNIN_COOKIE,
    SIGNIN_SECONDS,
    ConsoleSession,
    FormError,
    Sessions,
    cookie_header,
    parse_form,
    read_cookie,
    safe_next,
    same_secret,
)
from mdmd.health import FleetCountsCache
from mdmd.profiles import profile_syncml
from mdmd.renewal import renewal_policy
from mdmd.store import FleetCounts, LoggedMessage
from mdmd.syncml import describe_status
from mdmd.web import EndpointResource, HTTPError, HTTPResponse, MdmdRequest, Route, iso_time, request_body
from mdmd.xmlsafe import XMLInputError, parse_untrusted_xml

__all__ = ["Console", "console_routes"]

log = Logger(namespace=__name__)

_HTML: Final = "text/html; charset=utf-8"
_RECENT: Final = 20
_MEMBERS_PAGE: Final = 100
_PROFILE_DEVICES_PAGE: Final = 50
#: Message logs up to this size are indented on the reactor (about 1 ms).
_INDENT_HERE: Final = 64 * 1024
#: The compliance states the fleet page charts, with their colours.
_COMPLIANCE: Final = (("verified", "good"), ("pending", "info"), ("failed", "bad"), ("drifted", "warn"))
_DEVICE_LIST_FIELDS: Final = (
    "q",
    "state",
    "os_version",
    "group",
    "cert_expiring_within",
    "last_seen_before",
    "last_seen_after",
    "hw_dev_id_collision",
    "sort",
    "order",
    "limit",
    "cursor",
)
_ACTION_LABELS: Final = {
    "restart": "Restart",
    "wipe": "Wipe",
    "unenroll": "Unenroll",
    "rename": "Rename",
    "defender_scan": "Defender scan",
    "defender_update": "Defender signature update",
}
_DONE: Final = {
    "action": "Action queued: the device gets it when it next checks in.",
    "created": "Created.",
    "updated": "Saved.",
    "assigned": "Assignment saved.",
    "members": "Members changed.",
    "deleted": "Deleted.",
}


def _time(value: object) -> str:
    """An ISO 8601 time as the pages show it."""
    if not value:
        return "—"
    text = str(value)
    return text.replace("T", " ").replace("Z", " UTC")


def _templates() -> Environment:
    env = Environment(
        loader=PackageLoader("mdmd.console", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["t"] = _time
    env.filters["n"] = lambda v: f"{int(v):,}" if v is not None else "—"
    env.filters["q"] = lambda v: quote(str(v), safe="")
    return env


def _field_errors(e: HTTPError) -> dict[str, str]:
    """The refused fields of an admin function's refusal (``errors`` of its
    JSON body), by name; ``base`` for the message when none is named."""
    try:
        body = json.loads(e.response.body)
    except ValueError:
        return {"base": e.reason}
    found: dict[str, str] = {}
    for error in body.get("errors", []):
        name, reason = str(error.get("name", "base")), str(error.get("reason", ""))
        found[name] = f"{found[name]}; {reason}" if name in found else reason
    if not found or set(found) == {"base"}:
        found = {"base": str(body.get("message", e.reason))}
    return found


def pretty_syncml(body: bytes) -> str:
    """A logged message indented for reading (as it came when it is not
    whole XML, e.g. cut at the log's limit)."""
    try:
        root = parse_untrusted_xml(body)
    except XMLInputError:
        return body.decode("utf-8", "replace")
    etree.indent(root, space="  ")
    return etree.tostring(root, encoding="unicode")


def _b64(obj: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")


def _unb64(text: str) -> Any:
    try:
        return json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (ValueError, binascii.Error):
        return None


class Form:
    """A submitted form's fields."""

    def __init__(self, fields: Mapping[str, Sequence[str]]) -> None:
        self.fields = fields

    def get(self, name: str, default: str = "") -> str:
        values = self.fields.get(name)
        return values[-1] if values else default

    def all(self, name: str) -> list[str]:
        return list(self.fields.get(name, []))


class Console:
    """What every page shares: the daemon, the sessions, the fleet counts
    and the templates."""

    def __init__(self, app: Mdmd, fleet: FleetCountsCache) -> None:
        assert app.tokens is not None, "the console runs in the main process"
        self.app = app
        self.fleet = fleet
        self.sessions = Sessions(app.store, app.tokens.current, app.now)
        self.templates = _templates()

    def secure(self, request: MdmdRequest) -> bool:
        """Served over TLS (or behind a TLS proxy: ``[admin] url`` https)."""
        return bool(request.isSecure()) or self.app.config.admin.url.startswith("https:")

    @staticmethod
    def cookie(request: MdmdRequest) -> str | None:
        return read_cookie(request.getHeader(b"Cookie"), SESSION_COOKIE)

    async def session(self, request: MdmdRequest) -> ConsoleSession | None:
        return await self.sessions.get(self.cookie(request))

    def render(
        self,
        template: str,
        session: ConsoleSession | None,
        *,
        status: int = 200,
        headers: Sequence[tuple[str, str]] = (),
        **context: Any,
    ) -> HTTPResponse:
        body = (
            self.templates.get_template(template)
            .render(session=session, actions=ACTIONS, action_labels=_ACTION_LABELS, **context)
            .encode("utf-8")
        )
        return HTTPResponse(status, body, content_type=_HTML, headers=(*SECURITY_HEADERS, *headers))

    @staticmethod
    def redirect(location: str, headers: Sequence[tuple[str, str]] = ()) -> HTTPResponse:
        return HTTPResponse(
            303, b"", content_type=_HTML, headers=(*SECURITY_HEADERS, ("Location", location), *headers)
        )

    async def counts(self) -> tuple[FleetCounts, float | None]:
        try:
            counts, at = await self.fleet.current()
        except Exception as e:  # the page still renders, saying so
            log.warn("console: cannot read the fleet counts: {error}", error=str(e))
            counts, at = None, None
        return counts or {}, at


class Page(EndpointResource):
    """A console page: the session checked first, then ``get`` or, with the
    session's CSRF token, ``post``."""

    nav = ""

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console
        self.app = console.app

    async def _signed_in(self, request: MdmdRequest) -> ConsoleSession | HTTPResponse:
        session = await self.console.session(request)
        if session is None:
            target = request.uri.decode("latin-1") if request.method == b"GET" else ""
            where = "/ui/signin" + (f"?{urlencode({'next': target})}" if safe_next(target, "") else "")
            return self.console.redirect(where)
        request.admin = session.token_name
        return session

    async def handle_GET(self, request: MdmdRequest) -> HTTPResponse:
        session = await self._signed_in(request)
        if isinstance(session, HTTPResponse):
            return session
        try:
            return await self.get(request, session)
        except HTTPError as e:
            return self.error(session, e.response.status, _field_errors(e).get("base", e.reason))

    async def handle_POST(self, request: MdmdRequest) -> HTTPResponse:
        session = await self._signed_in(request)
        if isinstance(session, HTTPResponse):
            return session
        try:
            form = Form(parse_form(request.getHeader(b"Content-Type"), request_body(request)))
        except FormError as e:
            return self.error(session, 400, str(e))
        if not same_secret(form.get("csrf"), session.csrf):
            log.warn(
                "console POST {path} refused: CSRF token missing or wrong (token {admin}) client={client}",
                path=request.path.decode("latin-1"),
                admin=session.token_name,
                client=request.client_address,
            )
            return self.error(session, 403, "This form is not one this console gave you: reload the page.")
        try:
            return await self.post(request, session, form)
        except HTTPError as e:
            return self.error(session, e.response.status, _field_errors(e).get("base", e.reason))

    async def get(self, request: MdmdRequest, session: ConsoleSession) -> HTTPResponse:
        return self.error(session, 405, "This page takes no GET.")

    async def post(self, request: MdmdRequest, session: ConsoleSession, form: Form) -> HTTPResponse:
        return self.error(session, 405, "This page takes no form.")

    def page(
        self, template: str, session: ConsoleSession, *, status: int = 200, **context: Any
    ) -> HTTPResponse:
        return self.console.render(template, session, status=status, nav=self.nav, **context)

    def error(self, session: ConsoleSession | None, status: int, message: str) -> HTTPResponse:
        return self.console.render("error.html", session, status=status, nav=self.nav, message=message)

    @staticmethod
    def args(request: MdmdRequest) -> dict[str, list[str]]:
        try:
            return {
                k.decode("utf-8"): [v.decode("utf-8") for v in values]
                for k, values in (request.args or {}).items()
            }
        except UnicodeDecodeError:
            return {}

    @staticmethod
    def done(request: MdmdRequest) -> str | None:
        key = (request.args or {}).get(b"done", [b""])[0].decode("latin-1")
        return _DONE.get(key)


# --------------------------------------------------------------------------
# Signing in and out, static files, the unknown
# --------------------------------------------------------------------------


class SignInPage(EndpointResource):
    """``/ui/signin``: a named admin token for a session cookie."""

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console

    def _form(
        self, request: MdmdRequest, *, status: int = 200, error: str | None = None, notice: str | None = None
    ) -> HTTPResponse:
        csrf = secrets.token_urlsafe(32)
        cookie = cookie_header(
            SIGNIN_COOKIE, csrf, max_age=SIGNIN_SECONDS, secure=self.console.secure(request)
        )
        target = Page.args(request).get("next", [""])[-1]
        return self.console.render(
            "signin.html",
            None,
            status=status,
            headers=(("Set-Cookie", cookie),),
            nav="",
            csrf=csrf,
            next=safe_next(target),
            error=error,
            notice=notice,
        )

    async def handle_GET(self, request: MdmdRequest) -> HTTPResponse:
        session = await self.console.session(request)
        if session is not None:
            return self.console.redirect("/ui/fleet")
        signed_out = "signed_out" in Page.args(request)
        return self._form(request, notice="You are signed out." if signed_out else None)

    async def handle_POST(self, request: MdmdRequest) -> HTTPResponse:
        try:
            form = Form(parse_form(request.getHeader(b"Content-Type"), request_body(request)))
        except FormError as e:
            return self._form(request, status=400, error=str(e))
        expected = read_cookie(request.getHeader(b"Cookie"), SIGNIN_COOKIE)
        if expected is None or not same_secret(form.get("csrf"), expected):
            return self._form(request, status=403, error="The sign-in form expired: please sign in again.")
        signed_in = await self.console.sessions.sign_in(form.get("token"))
        if signed_in is None:
            log.warn(
                "console sign-in refused: unknown or revoked token client={client} request_id={request_id}",
                client=request.client_address,
                request_id=request.request_id,
            )
            return self._form(request, status=401, error="This token is unknown or revoked.")
        session_id, session = signed_in
        request.admin = session.token_name
        await self.console.app.audit(request, "console.signin", session.token_name)
        cookie = cookie_header(
            SESSION_COOKIE, session_id, max_age=SESSION_SECONDS, secure=self.console.secure(request)
        )
        return self.console.redirect(safe_next(form.get("next")), headers=(("Set-Cookie", cookie),))


class SignOutPage(Page):
    """``POST /ui/signout``: the session ends."""

    async def post(self, request: MdmdRequest, session: ConsoleSession, form: Form) -> HTTPResponse:
        await self.console.sessions.sign_out(self.console.cookie(request))
        await self.app.audit(request, "console.signout", session.token_name)
        gone = cookie_header(SESSION_COOKIE, "", max_age=0, secure=self.console.secure(request))
        return self.console.redirect("/ui/signin?signed_out=1", headers=(("Set-Cookie", gone),))


class StaticFile(EndpointResource):
    """The console's stylesheet (no data: served without a session)."""

    def __init__(self, name: str, content_type: str) -> None:
        super().__init__()
        self.body = resources.files("mdmd.console").joinpath("static", name).read_bytes()
        self.content_type = content_type

    async def handle_GET(self, request: MdmdRequest) -> HTTPResponse:
        return HTTPResponse(
            200,
            self.body,
            content_type=self.content_type,
            headers=(("X-Content-Type-Options", "nosniff"), ("Cache-Control", "max-age=3600")),
        )


class RootPage(Page):
    async def get(self, request: MdmdRequest, session: ConsoleSession) -> HTTPResponse:
        return self.console.redirect("/ui/fleet")


class NotFoundPage(Page):
    async def get(self, request: MdmdRequest, session: ConsoleSession) -> HTTPResponse:
        return self.error(session, 404, "There is no such page.")


# --------------------------------------------------------------------------
# Fleet
# --------------------------------------------------------------------------


class FleetPage(Page):
    nav = "fleet"

    async def get(self, request: MdmdRequest, session: ConsoleSession) -> HTTPResponse:
        counts, at = await self.console.counts()
        devices = counts.get("devices", {})
        states = [
            ("enrolled", devices.get("enrolled", 0.0), "good"),
            ("unenrolled", devices.get("unenrolled", 0.0), "muted"),
        ]
        recency_names = (
            ("1h", "within 1 h", "good"),
            ("24h", "within 24 h", "good"),
            ("7d", "within 7 days", "warn"),
            ("older", "longer ago", "bad"),
            ("never", "never", "muted"),
        )
        checkins = counts.get("checkins", {})
        recency = [(label, checkins.get(key, 0.0), colour) for key, label, colour in recency_names]
        enrollments = sorted(counts.get("enrollments", {}).items())
        compliance = []
        for key in sorted(k for k in counts if k.startswith("profile:")):
            name = key.removeprefix("profile:")
            compliance.append(_compliance(name, counts[key]))
        expiring = counts.get("certificates_expiring", {}).get("", 0.0)
        return self.page(
            "fleet.html",
            session,
            counted_at=None if at is None else iso_time(at),
            counted_ago=None if at is None else max(0, round(time.time() - at)),
            reload_after=3 if at is None else None,
            states=states,
            states_chart=charts.bars(states, label="devices by state"),
            recency=recency,
            recency_chart=charts.bars(recency, label="enrolled devices by last check-in"),
            enrollments=enrollments,
            enrollments_total=sum(v for _, v in enrollments),
            enrollments_chart=charts.columns(enrollments, label="enrollments per day, last 30 days"),
            compliance=compliance,
            expiring=expiring,
        )


def _compliance(name: str, states: Mapping[str, float]) -> dict[str, Any]:
    """A profile's devices by state, its compliance and its bar."""
    shown = {state: states.get(state, 0.0) for state, _ in _COMPLIANCE}
    other = sum(v for s, v in states.items() if s not in shown and s != "removed")
    total = sum(shown.values()) + other
    return {
        "name": name,
        "states": shown,
        "other": other,
        "total": total,
        "percent": None if total == 0 else round(100 * shown["verified"] / total),
        "chart": charts.stacked(
            [(s, shown[s], colour) for s, colour in _COMPLIANCE] + [("in progress", other, "other")],
            label=f"profile {name}: " + ", ".join(f"{s} {int(shown[s])}" for s, _ in _COMPLIANCE),
        ),
    }


# --------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------


class DevicesPage(Page):
    nav = "devices"

    async def get(self, request: MdmdRequest, session: ConsoleSession) -> HTTPResponse:
        given = {
            k: v for k, v in self.args(request).items() if k in _DEVICE_LIST_FIELDS and v and v[-1] != ""
        }
        wanted = {k: [v[-1]] for k, v in given.items()}
        errors: dict[str, str] = {}
        devices: list[dict[str, Any]] = []
        after = None
        try:
            devices, after = await device_list_page(self.app, wanted)
        except ListRequestError as e:
            errors = {f.name: f.reason for f in e.errors}
        groups = await self.app.store.group_names()
        return self.page(
            "devices.html",
            session,
            form={k: v[0] for k, v in wanted.items() if k != "cursor"},
            continued="cursor" in wanted,
            devices=devices,
            next=after,
            errors=errors,
            groups=groups,
        )


class DevicePage(Page):
    nav = "devices"

    async def get(self, request: MdmdRequest, session: ConsoleSession) -> HTTPResponse:
        store = self.app.store
        device = await store.device(request.path_params["device_id"])
        if device is None:
            return self.error(session, 404, f"There is no device {request.path_params['device_id']}.")
        request.device_id = device_id = device.device_id
        certificates = await store.device_certificates(device_id)
        commands = await store.device_commands(device_id, limit=_RECENT)
        actions = await store.device_actions(device_id, limit=_RECENT)
        now, policy = self.app.now(), renewal_policy(self.app.config.wstep)
        detail = device_detail_json(device, certificates, commands, now, policy, actions)
        results: dict[str, list[dict[str, Any]]] = {}
        for command in commands:
            if command.state in ("acknowledged", "failed"):
                whole = await store.command(command.uuid)
                if whole is not None and whole.results:
                    results[command.uuid] = command_json(whole)["results"]
        profiles = [device_profile_json(e) for e in await store.device_profiles(device_id)]
        return self.page(
            "device.html",
            session,
            device=detail,
            groups=await store.device_groups(device_id),
            profiles=profiles,
            results=results,
            wipe_modes=list(WIPE_MODES),
            done=self.done(request),
            message_log=self.app.config.management.message_log,
        )


class DeviceActionPage(Page):
    """``POST /ui/devices/{id}/actions``: an action form shows its
    confirmation; the confirmation (``confirm=yes``) queues it."""

    nav = "devices"

    async def post(self, request: MdmdRequest, session: ConsoleSession, form: Form) -> HTTPResponse:
        device_id = request.device_id = request.path_params["device_id"]
        action = form.get("action")
        body: dict[str, Any] = {"action": action}
        if action == "wipe":
            body["mode"] = form.get("mode", "wipe")
        if action == "rename":
            body["name"] = form.get("name")
        if action == "defender_scan":
            body["full"] = form.get("full") == "yes"
        if form.get("confirm") != "yes":
            device = await self.app.store.device(device_id)
            if device is None:
                return self.error(session, 404, f"There is no device {device_id}.")
            return self.page(
                "confirm_action.html", session, device_id=device.device_id, action=action, body=body
            )
        if action == "wipe":
            body["confirm"] = True
        try:
            await queue_device_action(self.app, request, device_id, body)
        except HTTPError as e:
            return self.error(session, e.response.status, "; ".join(_field_errors(e).values()))
        return self.console.redirect(f"/ui/devices/{quote(device_id, safe='')}?done=action")


class MessageLogPage(Page):
    nav = "devices"

    async def get(self, request: MdmdRequest, session: ConsoleSession) -> HTTPResponse:
        device = await self.app.store.device(request.path_params["device_id"])
        if device is None:
            return self.error(session, 404, f"There is no device {request.path_params['device_id']}.")
        request.device_id = device.device_id
        keep = self.app.config.management.message_log
        messages = await self.app.store.device_messages(device.device_id, limit=max(keep, 1))
        if sum(len(m.body) for m in messages) <= _INDENT_HERE:
            shown = _show_messages(messages)
        else:
            # Indenting up to 50 messages of up to 64 KiB is work for a thread.
            reactor = self.app.reactor
            shown = await deferToThreadPool(
                reactor,  # type: ignore[arg-type]
                reactor.getThreadPool(),  # type: ignore[attr-defined]
                _show_messages,
                messages,
            )
        return self.page("messages.html", session, device_id=device.device_id, messages=shown, keep=keep)


def _show_messages(messages: Sequence[LoggedMessage]) -> list[dict[str, Any]]:
    return [
        {
            "direction": m.direction,
            "at": iso_time(m.at),
            "session_id": m.session_id,
            "msg_id": m.msg_id,
            "size": m.size,
            "truncated": m.truncated,
            "text": pretty_syncml(m.body),
        }
        for m in messages
    ]


# --------------------------------------------------------------------------
# Profiles
# --------------------------------------------------------------------------


def _profile_errors(e: HTTPError) -> dict[str, str]:
    """A profile refusal's errors by form field: items are the SyncML's."""
    shown: dict[str, str] = {}
    for name, reason in _field_errors(e).items():
        field = "name" if name == "name" else "base" if name == "base" else "syncml"
        label = "" if field != "syncml" or name == "syncml" else f"{name}: "
        shown[field] = f"{shown[field]}; {label}{reason}" if field in shown else f"{label}{reason}"
    return shown


class ProfilesPage(Page):
    nav = "profiles"

    async def get(self, request: MdmdRequest, session: ConsoleSession) -> HTTPResponse:
        counts, at = await self.console.counts()
        profiles = []
        for p in await self.app.store.profiles():
            if p.deleted_at is not None:
                continue
            profiles.append({**profile_json(p), **_compliance(p.name, counts.get(f"profile:{p.name}", {}))})
        return self.page(
            "profiles.html",
            session,
            profiles=profiles,
            counted_at=None if at is None else iso_time(at),
            done=self.done(request),
        )


class ProfileFormPage(Page):
    """``/ui/profiles/new`` and ``/ui/profiles/{name}/edit``."""

    nav = "profiles"

    async def get(self, request: MdmdRequest, session: ConsoleSession) -> HTTPResponse:
        name = request.path_params.get("name")
        if name is None:
            return self.page("profile_form.html", session, editing=None, values={}, errors={})
        profile = await self.app.store.profile(name)
        if profile is None or profile.deleted_at is not None:
            return self.error(session, 404, f"There is no profile {name}.")
        values = {"name": name, "syncml": profile_syncml(profile.items)}
        return self.page("profile_form.html", session, editing=name, values=values, errors={})

    async def post(self, request: MdmdRequest, session: ConsoleSession, form: Form) -> HTTPResponse:
        name = request.path_params.get("name")
        values = {"name": name or form.get("name").strip(), "syncml": form.get("syncml")}
        try:
            if name is None:
                await create_profile(self.app, request, {"name": values["name"], "syncml": values["syncml"]})
                done = "created"
            else:
                await update_profile(self.app, request, name, {"syncml": values["syncml"]})
                done = "updated"
        except HTTPError as e:
            if e.response.status == 404:
                raise
            return self.page(
                "profile_form.html",
                session,
                status=400,
                editing=name,
                values=values,
                errors=_profile_errors(e),
            )
        return self.console.redirect(f"/ui/profiles/{quote(values['name'], safe='')}?done={done}")


class ProfilePage(Page):
    nav = "profiles"

    async def get(self, request: MdmdRequest, session: ConsoleSession) -> HTTPResponse:
        name = request.path_params["name"]
        profile = await self.app.store.profile(name)
        if profile is None:
            return self.error(session, 404, f"There is no profile {name}.")
        args = self.args(request)
        state = args.get("state", [""])[-1] or None
        position = _unb64(args.get("after", [""])[-1]) if args.get("after") else None
        after = (
            (str(position[0]), int(position[1]))
            if isinstance(position, list) and len(position) == 2 and isinstance(position[1], int)
            else None
        )
        rows = await self.app.store.profile_devices(
            name, state=state, after=after, limit=_PROFILE_DEVICES_PAGE
        )
        more = None
        if len(rows) == _PROFILE_DEVICES_PAGE:
            more = urlencode({**({"state": state} if state else {}), "after": _b64(list(rows[-1].position))})
        counts, at = await self.console.counts()
        groups = await self.app.store.group_names()
        return self.page(
            "profile.html",
            session,
            profile=profile_json(profile),
            deleting=profile.deleted_at is not None,
            items=profile.items,
            syncml=profile_syncml(profile.items),
            assigned=set(profile.groups),
            groups=groups,
            compliance=_compliance(name, counts.get(f"profile:{name}", {})),
            counted_at=None if at is None else iso_time(at),
            devices=[
                {
                    "device_id": r.device_id,
                    "version": r.version,
                    "state": r.state,
                    "status_text": None if r.status is None else describe_status(r.status),
                    "detail": r.detail,
                    "updated_at": iso_time(r.updated_at),
                }
                for r in rows
            ],
            state=state,
            more=more,
            done=self.done(request),
        )


class ProfileGroupsPage(Page):
    nav = "profiles"

    async def post(self, request: MdmdRequest, session: ConsoleSession, form: Form) -> HTTPResponse:
        name = request.path_params["name"]
        await assign_profile(self.app, request, name, form.all("groups"))
        return self.console.redirect(f"/ui/profiles/{quote(name, safe='')}?done=assigned")


# --------------------------------------------------------------------------
# Groups
# --------------------------------------------------------------------------


class GroupsPage(Page):
    nav = "groups"

    async def get(self, request: MdmdRequest, session: ConsoleSession) -> HTTPResponse:
        return await self._list(request, session, {}, "")

    async def _list(
        self,
        request: MdmdRequest,
        session: ConsoleSession,
        errors: dict[str, str],
        name: str,
        status: int = 200,
    ) -> HTTPResponse:
        groups = [group_json(g) for g in await self.app.store.groups()]
        return self.console.render(
            "groups.html",
            session,
            status=status,
            nav=self.nav,
            groups=groups,
            errors=errors,
            name=name,
            done=self.done(request),
        )

    async def post(self, request: MdmdRequest, session: ConsoleSession, form: Form) -> HTTPResponse:
        name = form.get("name").strip()
        try:
            await create_group(self.app, request, {"name": name})
        except HTTPError as e:
            return await self._list(request, session, _field_errors(e), name, status=400)
        return self.console.redirect(f"/ui/groups/{quote(name, safe='')}?done=created")


class GroupPage(Page):
    nav = "groups"

    async def get(self, request: MdmdRequest, session: ConsoleSession) -> HTTPResponse:
        return await self._show(request, session, {}, {})

    async def _show(
        self,
        request: MdmdRequest,
        session: ConsoleSession,
        errors: dict[str, str],
        values: dict[str, str],
        status: int = 200,
    ) -> HTTPResponse:
        name = request.path_params["name"]
        group = await self.app.store.group(name)
        if group is None:
            return self.error(session, 404, f"There is no group {name}.")
        after = self.args(request).get("after", [""])[-1] or None
        members = await self.app.store.group_members(name, after=after, limit=_MEMBERS_PAGE)
        return self.console.render(
            "group.html",
            session,
            status=status,
            nav=self.nav,
            group=group_json(group),
            members=members,
            more=members[-1] if len(members) == _MEMBERS_PAGE else None,
            errors=errors,
            values=values,
            done=self.done(request),
        )

    async def post(self, request: MdmdRequest, session: ConsoleSession, form: Form) -> HTTPResponse:
        name = request.path_params["name"]
        if form.get("delete") == "yes":
            if form.get("confirm") != "yes":
                return self.page("confirm_delete.html", session, group=name)
            await delete_group(self.app, request, name)
            return self.console.redirect("/ui/groups?done=deleted")
        values = {"add": form.get("add"), "remove": form.get("remove")}
        add = [x for x in values["add"].replace(",", " ").split() if x]
        remove = [x for x in values["remove"].replace(",", " ").split() if x]
        if not add and not remove:
            return await self._show(
                request, session, {"base": "Name a device to add or remove."}, values, 400
            )
        try:
            await change_group_members(self.app, request, name, add, remove)
        except HTTPError as e:
            if e.response.status == 404:
                raise
            return await self._show(request, session, _field_errors(e), values, 400)
        return self.console.redirect(f"/ui/groups/{quote(name, safe='')}?done=members")


# --------------------------------------------------------------------------
# Operations and the audit log
# --------------------------------------------------------------------------


class OperationsPage(Page):
    nav = "operations"

    async def get(self, request: MdmdRequest, session: ConsoleSession) -> HTTPResponse:
        operations = []
        for op in await self.app.store.operations(limit=100):
            shown = operation_json(op)
            shown["chart"] = charts.stacked(
                [
                    ("acknowledged", op.acknowledged, "good"),
                    ("failed", op.failed, "bad"),
                    ("waiting", op.queued - op.acknowledged - op.failed, "info"),
                    ("skipped", op.skipped, "muted"),
                    ("not queued yet", max(0, (op.total or 0) - op.queued - op.skipped), "other"),
                ],
                label=f"operation {op.operation_id}: {op.acknowledged} acknowledged, {op.failed} failed",
                width=220,
            )
            operations.append(shown)
        return self.page("operations.html", session, operations=operations)


class AuditPage(Page):
    nav = "audit"

    async def get(self, request: MdmdRequest, session: ConsoleSession) -> HTTPResponse:
        args = {
            k: [v[-1]]
            for k, v in self.args(request).items()
            if k in ("actor", "action", "target", "cursor") and v and v[-1] != ""
        }
        errors: dict[str, str] = {}
        entries: list[dict[str, Any]] = []
        cursor = None
        try:
            entries, cursor = await audit_page(self.app, args)
        except ListRequestError as e:
            errors = {f.name: f.reason for f in e.errors}
        for entry in entries:
            entry["detail_text"] = json.dumps(entry["detail"], sort_keys=True) if entry["detail"] else ""
        return self.page(
            "audit.html",
            session,
            entries=entries,
            next=cursor,
            errors=errors,
            form={k: v[0] for k, v in args.items() if k != "cursor"},
        )


def console_routes(app: Mdmd, fleet: FleetCountsCache) -> list[Route]:
    """The console's routes (public to the API's bearer-token guard: each
    page checks its own session)."""
    console = Console(app, fleet)
    pages: list[tuple[str, EndpointResource]] = [
        ("/ui", RootPage(console)),
        ("/ui/signin", SignInPage(console)),
        ("/ui/signout", SignOutPage(console)),
        ("/ui/static/console.css", StaticFile("console.css", "text/css; charset=utf-8")),
        ("/ui/static/favicon.svg", StaticFile("favicon.svg", "image/svg+xml")),
        ("/ui/fleet", FleetPage(console)),
        ("/ui/devices", DevicesPage(console)),
        ("/ui/devices/{device_id}", DevicePage(console)),
        ("/ui/devices/{device_id}/actions", DeviceActionPage(console)),
        ("/ui/devices/{device_id}/messages", MessageLogPage(console)),
        ("/ui/profiles", ProfilesPage(console)),
        ("/ui/profiles/new", ProfileFormPage(console)),
        ("/ui/profiles/{name}", ProfilePage(console)),
        ("/ui/profiles/{name}/edit", ProfileFormPage(console)),
        ("/ui/profiles/{name}/groups", ProfileGroupsPage(console)),
        ("/ui/groups", GroupsPage(console)),
        ("/ui/groups/{name}", GroupPage(console)),
        ("/ui/operations", OperationsPage(console)),
        ("/ui/audit", AuditPage(console)),
        ("/ui/*", NotFoundPage(console)),
    ]
    return [Route(template, resource, public=True) for template, resource in pages]
