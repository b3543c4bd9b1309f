"""``mdmctl``: the administrator's command line.

``mdmctl init DIR`` creates the key material a production deployment needs
without starting the server; ``mdmctl check-config`` runs the daemon's
start-up checks; ``mdmctl backup FILE`` copies the database of a running (or
stopped) mdmd.  Every other command talks to the admin API of a running mdmd
(``[admin] url`` of ``--config``, default ``/etc/mdmd/mdmd.ini``, with the
token in ``$MDMCTL_TOKEN``, ``--token-file`` or ``[admin] token_file``)::

    mdmctl devices [--search Q] [--state S] [--expiring DAYS] [--all] ...
    mdmctl device ID                    mdmctl commands ID
    mdmctl get ID ./DevDetail/SwV       mdmctl replace ID LOCURI --format int --data 1
    mdmctl add ID LOCURI ...            mdmctl delete ID LOCURI
    mdmctl exec ID LOCURI [--data ...]  mdmctl queue ID --syncml FILE|-
    mdmctl command UUID
    mdmctl restart ID                   mdmctl wipe ID --mode protected --yes
    mdmctl unenroll ID                  mdmctl rename ID NAME
    mdmctl scan ID [--full]             mdmctl defender-update ID
    mdmctl restart --group NAME [--wait SECONDS]   (every action but rename)
    mdmctl operation ID
    mdmctl token create|list|revoke     mdmctl audit [--all] [--actor NAME]
    mdmctl version
    mdmctl profile list|show|add|update|delete ...
    mdmctl group list|show|add|delete|members ...
    mdmctl assign PROFILE GROUP...

``mdmctl store copy --from sqlite:PATH --to postgresql:DSN`` moves a stopped
mdmd's store from SQLite to PostgreSQL (no server needed either).

Output is aligned text, or the API's JSON with ``--json``.  A failure is one
line on stderr (``mdmctl: ...``) and exit status 1; usage errors exit 2.

Only the standard library speaks HTTP here, so that mdmctl works wherever
the daemon's Python does, without extra packages.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote, urlencode

from mdmd.config import ConfigError, MdmdConfig, load_config

__all__ = ["DEFAULT_CONFIG", "CliError", "main"]

DEFAULT_CONFIG = "/etc/mdmd/mdmd.ini"
_HTTP_TIMEOUT = 30.0
# --wait polls the command this often: a device answers within seconds of
# its session, and a loopback GET costs next to nothing.
_POLL_INTERVAL = 0.5


class CliError(Exception):
    """A failure reported as ``mdmctl: <message>`` with exit status 1."""


# --------------------------------------------------------------------------
# init (no server needed)
# --------------------------------------------------------------------------


def _init(args: argparse.Namespace) -> int:
    # Imported here: the API commands need none of its cryptography, and
    # mdmctl starts faster without it.
    from mdmd import pki

    directory = os.path.abspath(args.dir)
    hosts: list[str] = args.host or ["localhost"]
    plan = pki.BootstrapPlan(
        identity_cert=os.path.join(directory, "wstep-identity.pem"),
        identity_key=os.path.join(directory, "wstep-identity.key"),
        tls_cert=None if args.no_tls else os.path.join(directory, "tls-server.pem"),
        tls_key=None if args.no_tls else os.path.join(directory, "tls-server.key"),
        tls_root_cert=os.path.join(directory, "tls-root.pem"),
        tls_root_key=os.path.join(directory, "tls-root.key"),
        tls_hosts=hosts,
        enroll_secret_file=os.path.join(directory, "enroll_secret"),
        admin_token_file=os.path.join(directory, "admin_token"),
    )
    old_umask = os.umask(0o077)
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        created = pki.bootstrap(plan, now=datetime.now(UTC))
    except (OSError, pki.BootstrapError) as e:
        print(f"mdmctl init: {e}", file=sys.stderr)
        return 1
    finally:
        os.umask(old_umask)
    for path in created:
        print(f"created {path}")
    if not created:
        print(f"nothing to do: every file already exists in {directory}")
    return 0


# --------------------------------------------------------------------------
# The admin API client
# --------------------------------------------------------------------------


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _api_error(status: int, body: bytes) -> str:
    """The API's own words for a refusal (its JSON ``message``; every field
    error when there are several), else the HTTP status."""
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if not isinstance(answer, dict) or not isinstance(answer.get("message"), str):
        return f"the admin API answered HTTP {status}"
    message: str = answer["message"]
    errors = answer.get("errors")
    if isinstance(errors, list) and len(errors) > 1:
        fields = [
            f"{e.get('name')}: {e.get('reason')}" for e in errors if isinstance(e, dict) and e.get("reason")
        ]
        message = "request refused: " + "; ".join(fields)
    if status == 401:
        message += " (is the token in [admin] token_file the server's?)"
    return _one_line(message)


class AdminClient:
    """Blocking JSON calls to the admin API with the bearer token."""

    def __init__(self, base_url: str, token: str, *, timeout: float = _HTTP_TIMEOUT) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def call_no_content(self, method: str, path: str) -> None:
        """A call answered with 204 and no body."""
        self.call(method, path, empty_ok=True)

    def call(self, method: str, path: str, body: object | None = None, *, empty_ok: bool = False) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.base_url + path,
            data=data,
            method=method,
            headers={
                "Authorization": f"Bearer {self.token}",
                "Accept": "application/json",
                **({"Content-Type": "application/json"} if data is not None else {}),
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            with e:
                try:
                    refusal = e.read()
                except (http.client.HTTPException, OSError):
                    refusal = b""  # the status alone still says what happened
            raise CliError(_api_error(e.code, refusal)) from None
        except urllib.error.URLError as e:
            raise CliError(_one_line(f"cannot reach the admin API at {self.base_url}: {e.reason}")) from None
        except (http.client.HTTPException, OSError) as e:
            raise CliError(_one_line(f"cannot reach the admin API at {self.base_url}: {e}")) from None
        if empty_ok and not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise CliError(f"the admin API at {self.base_url} did not answer with JSON") from None


def _config(args: argparse.Namespace) -> MdmdConfig:
    try:
        return load_config(args.config)
    except ConfigError as e:
        raise CliError(_one_line(str(e))) from None


def _client(args: argparse.Namespace) -> AdminClient:
    config = _config(args)
    from_env = os.environ.get("MDMCTL_TOKEN", "").strip()
    token_file = getattr(args, "token_file", None)
    if from_env and token_file is None:
        return AdminClient(config.admin.url, from_env)
    path = token_file or config.admin.token_file
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as e:
        raise CliError(f"cannot read the admin token from {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise CliError(f"the admin token in {path} is not text") from None
    if not token:
        raise CliError(f"the admin token file {path} is empty")
    return AdminClient(config.admin.url, token)


def _q(ident: str) -> str:
    # IDs go into one path segment: escape everything, "/" included.
    return quote(ident, safe="")


# --------------------------------------------------------------------------
# Text output
# --------------------------------------------------------------------------


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    # Keep each row on one line: a multi-line value would break the columns.
    return str(value).replace("\r", "\\r").replace("\n", "\\n")


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    return _aligned(headers, rows)[0]


def _aligned(
    headers: Sequence[str], rows: Sequence[Sequence[object]], widths: list[int] | None = None
) -> tuple[list[str], list[int]]:
    """The header and rows aligned, with the column widths used (at least
    *widths*, so that the pages of one listing line up)."""
    cells = [list(headers), *([_cell(v) for v in row] for row in rows)]
    found = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    if widths is not None:
        found = [max(a, b) for a, b in zip(found, widths, strict=True)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, found, strict=True)).rstrip() for row in cells]
    return lines, found


def _fields(pairs: Sequence[tuple[str, object]]) -> list[str]:
    width = max(len(k) for k, _ in pairs)
    return [f"{k.ljust(width)}  {_cell(v)}" for k, v in pairs]


def _print(lines: Sequence[str]) -> None:
    for line in lines:
        print(line)


_DEVICE_HEADERS = (
    "DEVICE ID",
    "NAME",
    "MANUFACTURER",
    "MODEL",
    "OS VERSION",
    "STATE",
    "ENROLLED",
    "LAST SEEN",
)


def _show_devices(answer: Any, widths: list[int] | None = None, *, header: bool = True) -> list[int] | None:
    """One page of devices as table rows; *widths* keeps later pages'
    columns under the first page's header."""
    devices = answer.get("devices", [])
    if not devices:
        return widths
    rows = [
        (
            d["device_id"] + ("*" if d.get("hw_dev_id_collision") else ""),
            d.get("name"),
            d.get("manufacturer"),
            d.get("model"),
            d.get("os_version"),
            d.get("state"),
            d.get("enrolled_at"),
            d.get("last_seen"),
        )
        for d in devices
    ]
    lines, widths = _aligned(_DEVICE_HEADERS, rows, widths)
    _print(lines if header else lines[1:])
    if any(d.get("hw_dev_id_collision") for d in devices):
        print("* shares its HWDevID with another enrolled device (a clone made without sysprep?)")
    return widths


def _status(item: Any) -> object:
    """The device's status code with its meaning, as the API gives it."""
    return item.get("status_text") or item.get("status")


def _command_rows(commands: Sequence[Any]) -> list[tuple[object, ...]]:
    return [
        (
            c["command_uuid"],
            c.get("verb"),
            c.get("state"),
            _status(c) if not c.get("detail") else f"{_cell(_status(c))} ({c['detail']})",
            c.get("created_at"),
        )
        for c in commands
    ]


_ACTION_HEADERS = ("ACTION ID", "ACTION", "OPTIONS", "STATE", "STATUS", "DETAIL", "CREATED")


def _action_rows(actions: Sequence[Any]) -> list[tuple[object, ...]]:
    return [
        (
            a["action_id"],
            a.get("action"),
            " ".join(f"{k}={v}" for k, v in (a.get("options") or {}).items()) or "-",
            a.get("state"),
            _status(a),
            a.get("detail"),
            a.get("created_at"),
        )
        for a in actions
    ]


_COMMAND_HEADERS = ("COMMAND UUID", "VERB", "STATE", "STATUS", "CREATED")


def _renewal_text(renewal: Any) -> str | None:
    """``none``, ``renewed <when>`` or ``failed: <why>``."""
    if not isinstance(renewal, dict):
        return None
    state = str(renewal.get("state"))
    if state == "renewed":
        return f"renewed {renewal.get('renewed_at')}"
    if state == "failed":
        return f"failed: {renewal.get('reason')}"
    return state


def _show_device(d: Any) -> None:
    _print(
        _fields(
            [
                ("device_id", d["device_id"]),
                ("name", d.get("name")),
                ("manufacturer", d.get("manufacturer")),
                ("model", d.get("model")),
                ("os_version", d.get("os_version")),
                ("state", d.get("state")),
                ("pending_actions", ", ".join(d.get("pending_actions") or []) or "none"),
                ("enrollment_type", d.get("enrollment_type")),
                ("host_id", d.get("host_id")),
                ("hw_dev_id", d.get("hw_dev_id")),
                ("hw_dev_id_collision", d.get("hw_dev_id_collision")),
                ("enrolled_at", d.get("enrolled_at")),
                ("unenrolled_at", d.get("unenrolled_at")),
                ("last_seen", d.get("last_seen")),
                ("cert_not_after", d.get("cert_not_after")),
                ("renewal", _renewal_text(d.get("renewal"))),
            ]
        )
    )
    cert = d.get("certificate")
    print("\ncertificate:")
    if cert:
        _print(["  " + line for line in _fields(list(cert.items()))])
    else:
        print("  none")
    inventory = d.get("inventory") or {}
    print("\ninventory:")
    if inventory:
        _print(["  " + line for line in _fields(sorted(inventory.items()))])
    else:
        print("  none reported yet")
    profiles = d.get("profiles") or []
    print("\nprofiles:")
    if profiles:
        rows = [
            (
                p["name"],
                p.get("version"),
                p.get("state"),
                _status(p),
                p.get("updated_at"),
                p.get("detail"),
            )
            for p in profiles
        ]
        _print(
            [
                "  " + line
                for line in _table(("PROFILE", "VERSION", "STATE", "STATUS", "UPDATED", "DETAIL"), rows)
            ]
        )
    else:
        print("  none")
    actions = d.get("actions") or []
    print("\nactions:")
    if actions:
        _print(["  " + line for line in _table(_ACTION_HEADERS, _action_rows(actions))])
    else:
        print("  none")
    commands = d.get("recent_commands") or []
    print("\nrecent commands:")
    if commands:
        _print(["  " + line for line in _table(_COMMAND_HEADERS, _command_rows(commands))])
    else:
        print("  none")


def _show_commands(answer: Any) -> None:
    commands = answer.get("commands", [])
    if not commands:
        print("no commands")
        return
    rows = [
        (*row, c.get("acknowledged_at")) for row, c in zip(_command_rows(commands), commands, strict=True)
    ]
    _print(_table((*_COMMAND_HEADERS, "ACKNOWLEDGED"), rows))


def _show_command(c: Any) -> None:
    _print(
        _fields(
            [
                ("command_uuid", c["command_uuid"]),
                ("device_id", c.get("device_id")),
                ("verb", c.get("verb")),
                ("state", c.get("state")),
                ("status", _status(c)),
                ("detail", c.get("detail")),
                ("created_at", c.get("created_at")),
                ("sent_at", c.get("sent_at")),
                ("acknowledged_at", c.get("acknowledged_at")),
            ]
        )
    )
    print("\nsyncml:")
    print("  " + str(c.get("syncml", "")))
    results = c.get("results") or []
    print("\nresults:")
    if not results:
        print("  none yet")
        return
    rows = [
        (r.get("kind"), r.get("cmd_id"), _status(r), r.get("target"), r.get("format"), r.get("data"))
        for r in results
    ]
    _print(["  " + line for line in _table(("KIND", "CMD ID", "STATUS", "TARGET", "FORMAT", "DATA"), rows)])


def _output(args: argparse.Namespace, answer: Any, show: Callable[[Any], None]) -> None:
    if args.json:
        print(json.dumps(answer, indent=2))
    else:
        show(answer)


# --------------------------------------------------------------------------
# API commands
# --------------------------------------------------------------------------


_AGO = re.compile(r"([0-9]{1,6})([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def _when(text: str) -> str:
    """A time for the API: ISO 8601 as it is, or an age such as 30d, 12h."""
    match = _AGO.fullmatch(text.strip())
    if match is None:
        return text
    ago = datetime.now(UTC) - timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    return ago.isoformat(timespec="seconds").replace("+00:00", "Z")


def _device_filters(args: argparse.Namespace) -> dict[str, str]:
    filters = {
        "q": args.search,
        "state": args.state,
        "os_version": args.os_version,
        "group": args.group,
        "cert_expiring_within": None if args.expiring is None else str(args.expiring),
        "last_seen_before": None if args.last_seen_before is None else _when(args.last_seen_before),
        "last_seen_after": None if args.last_seen_after is None else _when(args.last_seen_after),
        "hw_dev_id_collision": None if args.collision is None else ("true" if args.collision else "false"),
        "sort": args.sort,
        "order": "desc" if args.desc else None,
    }
    return {k: v for k, v in filters.items() if v is not None}


def _pages(client: AdminClient, path: str, first: dict[str, str], limit: int, every: bool) -> Iterator[Any]:
    """The listing's pages: one, or with *every* all of them (following ``next``)."""
    query = {**first, "limit": str(limit)}
    while True:
        answer = client.call("GET", f"{path}?{urlencode(query)}")
        yield answer
        cursor = answer.get("next")
        if not every or not cursor:
            return
        query = {"cursor": cursor, "limit": str(limit)}


def _stream_json(pages: Iterator[Any], key: str) -> None:
    """Every page's items as one JSON object, written as they come: a
    million devices never sit in memory at once."""
    print(f'{{"{key}": [', end="")
    first = True
    last: Any = None
    for page in pages:
        for item in page.get(key, []):
            print(("\n  " if first else ",\n  ") + json.dumps(item), end="")
            first = False
        last = page.get("next")
    print(f'\n], "next": {json.dumps(last)}}}')


def _devices(args: argparse.Namespace) -> int:
    if args.cursor and _device_filters(args):
        raise CliError("--cursor continues its own listing: give it without filters")
    first = {"cursor": args.cursor} if args.cursor else _device_filters(args)
    pages = _pages(_client(args), "/api/v1/devices", first, args.limit, args.all)
    if args.json:
        if args.all:
            _stream_json(pages, "devices")
        else:
            print(json.dumps(next(pages), indent=2))
        return 0
    shown = 0
    widths: list[int] | None = None
    answer: Any = {}
    for answer in pages:
        devices = answer.get("devices", [])
        shown += len(devices)
        widths = _show_devices(answer, widths, header=widths is None)
    if not shown:
        print("no devices")
    elif answer.get("next"):
        print(f"more: mdmctl devices --cursor {answer['next']} (or --all)")
    return 0


def _device(args: argparse.Namespace) -> int:
    client = _client(args)
    answer = client.call("GET", f"/api/v1/devices/{_q(args.id)}")
    answer["profiles"] = client.call("GET", f"/api/v1/devices/{_q(args.id)}/profiles")["profiles"]
    _output(args, answer, _show_device)
    return 0


def _commands(args: argparse.Namespace) -> int:
    _output(args, _client(args).call("GET", f"/api/v1/devices/{_q(args.id)}/commands"), _show_commands)
    return 0


def _command(args: argparse.Namespace) -> int:
    _output(args, _client(args).call("GET", f"/api/v1/commands/{_q(args.uuid)}"), _show_command)
    return 0


# --------------------------------------------------------------------------
# Device actions and group operations
# --------------------------------------------------------------------------

#: Action states after which waiting for a device is over.
_ACTION_DONE = ("acknowledged", "awaiting_restart", "failed", "cancelled")


def _action_body(args: argparse.Namespace) -> dict[str, Any]:
    match args.command:
        case "wipe":
            return {"action": "wipe", "mode": args.mode, "confirm": bool(args.yes)}
        case "rename":
            return {"action": "rename", "name": args.name}
        case "scan":
            return {"action": "defender_scan", "full": bool(args.full)}
        case "defender-update":
            return {"action": "defender_update"}
        case name:
            return {"action": name}


def _target(args: argparse.Namespace) -> None:
    if (args.id is None) == (getattr(args, "group", None) is None):
        raise CliError(f"{args.command}: give a device ID or --group NAME (one of them)")


def _show_operation(o: Any) -> None:
    _print(
        _fields(
            [
                ("operation_id", o["operation_id"]),
                ("group", o.get("group")),
                ("what", o.get("action") or o.get("verb")),
                ("state", o.get("state")),
                ("total", o.get("total")),
                ("queued", o.get("queued")),
                ("skipped", o.get("skipped")),
                ("acknowledged", o.get("acknowledged")),
                ("failed", o.get("failed")),
                ("waiting", o.get("waiting")),
                ("created_at", o.get("created_at")),
                ("finished_at", o.get("finished_at")),
            ]
        )
    )


def _progress_line(o: Any) -> str:
    total = "?" if o.get("total") is None else o["total"]
    return (
        f"{o.get('state')}: {o.get('queued')}/{total} queued, {o.get('acknowledged')} acknowledged, "
        f"{o.get('failed')} failed, {o.get('skipped')} skipped"
    )


def _wait_operation(client: AdminClient, operation_id: str, seconds: float, *, quiet: bool) -> Any:
    """Poll the operation until it is done or *seconds* passed, printing its
    progress when it changes."""
    deadline = time.monotonic() + seconds
    last = ""
    while True:
        op = client.call("GET", f"/api/v1/operations/{_q(operation_id)}")
        line = _progress_line(op)
        if line != last and not quiet:
            print(line, flush=True)
            last = line
        remaining = deadline - time.monotonic()
        if op.get("state") == "done" or remaining <= 0:
            return op
        time.sleep(min(_POLL_INTERVAL, remaining))


def _wait_action(client: AdminClient, device_id: str, action_id: str, seconds: float) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        found = client.call("GET", f"/api/v1/devices/{_q(device_id)}/actions")["actions"]
        action = next((a for a in found if a["action_id"] == action_id), None)
        remaining = deadline - time.monotonic()
        if action is None or action.get("state") in _ACTION_DONE or remaining <= 0:
            return action
        time.sleep(min(_POLL_INTERVAL, remaining))


def _action(args: argparse.Namespace) -> int:
    _target(args)
    client = _client(args)
    body = _action_body(args)
    wait = getattr(args, "wait", None)
    if args.id is None:
        answer = client.call("POST", f"/api/v1/groups/{_q(args.group)}/actions", body)
        operation_id = str(answer.get("operation_id", ""))
        if wait is None:
            _output(
                args,
                answer,
                lambda a: print(f"operation {a['operation_id']}: {body['action']} for group {args.group}"),
            )
            return 0
        if not args.json:
            print(f"operation {operation_id}: {body['action']} for group {args.group}", flush=True)
        op = _wait_operation(client, operation_id, wait, quiet=args.json)
        if args.json:
            print(json.dumps(op, indent=2))
        if op.get("state") != "done":
            raise CliError(f"operation {operation_id} is still {op.get('state')} after {wait:g} seconds")
        if op.get("failed"):
            raise CliError(f"operation {operation_id}: {op['failed']} device(s) failed or were cancelled")
        return 0
    answer = client.call("POST", f"/api/v1/devices/{_q(args.id)}/actions", body)
    if wait is None:
        _output(
            args,
            answer,
            lambda a: print(
                f"{body['action']} queued for {args.id}: action {a['action_id']}, command {a['command_uuid']}"
            ),
        )
        return 0
    if not args.json:
        print(f"{body['action']} queued for {args.id}: action {answer['action_id']}", flush=True)
    action = _wait_action(client, args.id, str(answer["action_id"]), wait)
    if args.json:
        print(json.dumps(action, indent=2))
    elif action is not None:
        print(f"{action['state']}: {action.get('detail') or _cell(_status(action))}")
    state = None if action is None else action.get("state")
    if state in ("acknowledged", "awaiting_restart"):
        return 0
    if state in ("failed", "cancelled"):
        raise CliError(f"{body['action']} {state}: {action.get('detail') if action else ''}")
    raise CliError(f"{body['action']} is still {state} after {wait:g} seconds")


def _unenroll(args: argparse.Namespace) -> int:
    if args.id is None or getattr(args, "group", None) is not None:
        return _action(args)
    answer = _client(args).call("POST", f"/api/v1/devices/{_q(args.id)}/unenroll")
    _output(
        args,
        answer,
        lambda a: print(
            f"unenrollment requested for {a['device_id']}: the device gets DMClient's Unenroll at its next "
            f"session, and its agent, if it has one, unenrolls it at its next check-in"
        ),
    )
    return 0


def _token(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.action == "create":
        answer = client.call("POST", "/api/v1/tokens", {"name": args.name})
        _output(
            args,
            answer,
            lambda a: print(
                f"{a['token']}\n(the token of {a['name']}: shown this once, store it now; "
                f"use it with MDMCTL_TOKEN or --token-file)"
            ),
        )
    elif args.action == "revoke":
        answer = client.call("DELETE", f"/api/v1/tokens/{_q(args.name)}")
        _output(args, answer, lambda a: print(f"revoked {a['name']}: it is refused from now on"))
    else:
        answer = client.call("GET", "/api/v1/tokens")

        def show(a: Any) -> None:
            rows = [
                (t["name"], "active" if t["active"] else "revoked", t.get("created_at"), t.get("created_by"))
                for t in a.get("tokens", [])
            ]
            _print(_table(("NAME", "STATE", "CREATED", "CREATED BY"), rows))

        _output(args, answer, show)
    return 0


_AUDIT_HEADERS = ("ID", "AT", "ACTOR", "ACTION", "TARGET", "CLIENT", "DETAIL")


def _audit(args: argparse.Namespace) -> int:
    filters = {
        k: v for k, v in (("actor", args.actor), ("action", args.action), ("target", args.target)) if v
    }
    pages = _pages(_client(args), "/api/v1/audit", filters, args.limit, args.all)
    if args.json:
        if args.all:
            _stream_json(pages, "entries")
        else:
            print(json.dumps(next(pages), indent=2))
        return 0
    widths: list[int] | None = None
    shown = 0
    answer: Any = {}
    for answer in pages:
        entries = answer.get("entries", [])
        if not entries:
            continue
        rows = [
            (
                e["id"],
                e.get("at"),
                e.get("actor"),
                e.get("action"),
                e.get("target"),
                e.get("client"),
                json.dumps(e.get("detail") or {}, sort_keys=True),
            )
            for e in entries
        ]
        lines, widths = _aligned(_AUDIT_HEADERS, rows, widths)
        _print(lines if shown == 0 else lines[1:])
        shown += len(entries)
    if not shown:
        print("no audit entries")
    elif answer.get("next"):
        print("more: mdmctl audit --all")
    return 0


def _version(args: argparse.Namespace) -> int:
    from mdmd import __version__

    answer = _client(args).call("GET", "/api/v1/version")
    _output(
        args,
        answer,
        lambda a: print(
            f"server: mdmd {a.get('version')} (schema {a.get('schema_version')}, Python {a.get('python')}, "
            f"Twisted {a.get('twisted')}, SQLite {a.get('sqlite')})\nmdmctl: mdmd {__version__}"
        ),
    )
    return 0


# --------------------------------------------------------------------------
# Without the server: check-config and backup
# --------------------------------------------------------------------------


def _check_config(args: argparse.Namespace) -> int:
    from mdmd.preflight import run_check

    status, line = run_check(_config(args))
    print(line, file=sys.stdout if status == 0 else sys.stderr)
    return status


def backup_sources(config: MdmdConfig) -> list[tuple[str, str]]:
    """(path, why) of every file a restore needs besides the database."""
    why = [
        (
            config.wstep.identity_key,
            "WSTEP identity CA key: IRREPLACEABLE. Every enrolled device's certificate chains to it; "
            "without it every device must be enrolled again",
        ),
        (config.wstep.identity_cert, "WSTEP identity CA certificate"),
        (config.enrollment.tls_cert, "server TLS certificate chain"),
        (config.enrollment.tls_key, "server TLS key"),
        (config.management.tls_cert, "management TLS certificate chain"),
        (config.management.tls_key, "management TLS key"),
        (config.enrollment.enroll_secret_file, "agents' enroll secret"),
        (config.admin.token_file, "bootstrap admin token (the token named admin)"),
        (config.tls_root_cert, "development TLS root (clients trust it)"),
        (config.tls_root_key, "development TLS root key"),
        (config.path, "the configuration"),
    ]
    seen: set[str] = set()
    found = []
    for path, reason in why:
        if path not in seen and os.path.exists(path):
            seen.add(path)
            found.append((path, reason))
    return found


def _backup(args: argparse.Namespace) -> int:
    import sqlite3

    from mdmd.store.sqlite import backup_database

    config = _config(args)
    if config.store.backend == "postgresql":
        # A database server's own tools make a consistent copy (and keep
        # doing it while mdmd runs); the key material list still applies.
        raise CliError(
            "the store is PostgreSQL ([store] backend): back it up with pg_dump (or the database's own "
            "backups), and keep copies of the key material in state_dir"
        )
    source_path = config.database
    if not os.path.exists(source_path):
        raise CliError(f"no database at {source_path} ([mdmd] state_dir)")
    owner = os.stat(source_path).st_uid
    if os.geteuid() != owner:
        # SQLite may create the -wal and -shm files beside the database,
        # owned by whoever runs this: they must stay mdmd's.
        raise CliError(
            f"run mdmctl backup as the user that owns {source_path} (uid {owner}): sudo -u mdmd mdmctl ..."
        )
    target = os.path.abspath(args.file)
    if os.path.exists(target):
        raise CliError(f"{target} exists: give a new file")
    try:
        source = sqlite3.connect(f"file:{source_path}?mode=ro", uri=True)
        try:
            # SQLite's online backup: a consistent copy while mdmd writes.
            backup_database(source, target)
            version = source.execute("PRAGMA user_version").fetchone()[0]
        finally:
            source.close()
    except (OSError, sqlite3.Error) as e:
        raise CliError(_one_line(f"cannot back up {source_path} to {target}: {e}")) from None
    size = os.path.getsize(target)
    print(f"backed up {source_path} to {target} (schema version {version}, {size / 2**20:.1f} MiB)")
    print("A restore needs these files as well; keep copies as safe as the keys themselves:")
    for path, reason in backup_sources(config):
        print(f"  {path}  {reason}")
    return 0


def _operation(args: argparse.Namespace) -> int:
    _output(args, _client(args).call("GET", f"/api/v1/operations/{_q(args.operation_id)}"), _show_operation)
    return 0


def _item(args: argparse.Namespace, target: str) -> dict[str, str]:
    item = {"target": target}
    for key in ("format", "type", "data"):
        value = getattr(args, key, None)
        if value is not None:
            item[key] = value
    return item


def _queue_request(args: argparse.Namespace) -> dict[str, Any]:
    if args.command == "queue":
        try:
            if args.syncml == "-":
                text = sys.stdin.read()
            else:
                with open(args.syncml, encoding="utf-8") as f:
                    text = f.read()
        except OSError as e:
            raise CliError(f"cannot read {args.syncml}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise CliError(f"{args.syncml} is not UTF-8 text") from None
        return {"syncml": text}
    return {"verb": args.command.capitalize(), "items": [_item(args, t) for t in args.locuris]}


def _wait(client: AdminClient, command_uuid: str, seconds: float) -> Any:
    """Poll the command until the device answered it or *seconds* passed."""
    deadline = time.monotonic() + seconds
    while True:
        command = client.call("GET", f"/api/v1/commands/{_q(command_uuid)}")
        remaining = deadline - time.monotonic()
        if command.get("state") in ("acknowledged", "failed") or remaining <= 0:
            return command
        time.sleep(min(_POLL_INTERVAL, remaining))


def _queue(args: argparse.Namespace) -> int:
    client = _client(args)
    body = _queue_request(args)
    answer = client.call("POST", f"/api/v1/devices/{_q(args.id)}/commands", body)
    command_uuid = str(answer.get("command_uuid", ""))
    if args.wait is None:
        _output(args, answer, lambda a: print(a["command_uuid"]))
        return 0
    if not args.json:
        # The UUID first, at once: whoever waits may want it before the end.
        print(command_uuid, flush=True)
    command = _wait(client, command_uuid, args.wait)
    if args.json:
        print(json.dumps(command, indent=2))
    else:
        print()
        _show_command(command)
    state = command.get("state")
    if state == "acknowledged":
        return 0
    if state == "failed":
        raise CliError(f"command {command_uuid} failed: {_cell(_status(command))}")
    raise CliError(f"command {command_uuid} is still {state} after {args.wait:g} seconds")


# --------------------------------------------------------------------------
# Configuration profiles and groups
# --------------------------------------------------------------------------


def _read_text(path: str) -> str:
    try:
        if path == "-":
            return sys.stdin.read()
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise CliError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise CliError(f"{path} is not UTF-8 text") from None


def _profile_body(args: argparse.Namespace) -> dict[str, Any]:
    """FILE holds the SyncML commands (Replace/Add, optionally in one
    Atomic), or JSON: ``{"items": [...]}`` or the list of items alone."""
    text = _read_text(args.file)
    body: dict[str, Any] = {"name": args.name}
    if text.lstrip().startswith(("{", "[")):
        try:
            payload = json.loads(text)
        except ValueError as e:
            raise CliError(f"{args.file} is not valid JSON: {e}") from None
        body["items"] = payload.get("items") if isinstance(payload, dict) else payload
    else:
        body["syncml"] = text
    return body


def _show_profiles(answer: Any) -> None:
    profiles = answer.get("profiles", [])
    if not profiles:
        print("no profiles")
        return
    rows = [
        (
            p["name"] + (" (being deleted)" if p.get("deleting") else ""),
            p.get("version"),
            p.get("items"),
            ", ".join(p.get("groups") or []) or "-",
            p.get("updated_at"),
        )
        for p in profiles
    ]
    _print(_table(("PROFILE", "VERSION", "ITEMS", "GROUPS", "UPDATED"), rows))


def _show_profile(p: Any) -> None:
    status = p.get("status") or {}
    _print(
        _fields(
            [
                ("name", p["name"]),
                ("version", p.get("version")),
                ("groups", ", ".join(p.get("groups") or []) or "none"),
                ("devices", ", ".join(f"{n} {state}" for state, n in sorted(status.items())) or "none yet"),
                ("created_at", p.get("created_at")),
                ("updated_at", p.get("updated_at")),
                ("deleting", p.get("deleting")),
            ]
        )
    )
    rows = [(i.get("verb"), i.get("target"), i.get("format"), i.get("data")) for i in p.get("items") or []]
    print("\nitems:")
    _print(["  " + line for line in _table(("VERB", "TARGET", "FORMAT", "DATA"), rows)])


def _show_groups(answer: Any) -> None:
    rows = [
        (
            g["name"],
            g.get("members"),
            ", ".join(g.get("profiles") or []) or "-",
            "built in" if g.get("builtin") else "",
        )
        for g in answer.get("groups", [])
    ]
    _print(_table(("GROUP", "MEMBERS", "PROFILES", ""), rows))


def _profile(args: argparse.Namespace) -> int:
    client = _client(args)
    name = _q(args.name) if getattr(args, "name", None) else ""
    match args.action:
        case "list":
            _output(args, client.call("GET", "/api/v1/profiles"), _show_profiles)
        case "show":
            _output(args, client.call("GET", f"/api/v1/profiles/{name}"), _show_profile)
        case "add":
            answer = client.call("POST", "/api/v1/profiles", _profile_body(args))
            _output(args, answer, lambda a: print(f"profile {a['name']} created, version {a['version']}"))
        case "update":
            body = _profile_body(args)
            del body["name"]
            answer = client.call("PUT", f"/api/v1/profiles/{name}", body)
            _output(args, answer, lambda a: print(f"profile {a['name']} is now version {a['version']}"))
        case "delete":
            answer = client.call("DELETE", f"/api/v1/profiles/{name}")
            _output(
                args,
                answer,
                lambda a: print(f"profile {a['name']} deleted: devices remove it at their next check-in"),
            )
    return 0


def _group(args: argparse.Namespace) -> int:
    client = _client(args)
    name = _q(args.name) if getattr(args, "name", None) else ""
    match args.action:
        case "list":
            _output(args, client.call("GET", "/api/v1/groups"), _show_groups)
        case "add":
            answer = client.call("POST", "/api/v1/groups", {"name": args.name})
            _output(args, answer, lambda a: print(f"group {a['name']} created"))
        case "delete":
            client.call_no_content("DELETE", f"/api/v1/groups/{name}")
            _output(args, {"name": args.name}, lambda a: print(f"group {a['name']} deleted"))
        case "show":
            pages = []
            cursor: str | None = None
            while True:
                query = f"?limit={args.limit}" + (f"&cursor={_q(cursor)}" if cursor else "")
                page = client.call("GET", f"/api/v1/groups/{name}{query}")
                pages.append(page)
                cursor = page.get("next")
                if not args.all or not cursor:
                    break
            answer = {**pages[-1], "devices": [d for p in pages for d in p.get("devices", [])]}

            def show(g: Any) -> None:
                _print(
                    _fields(
                        [
                            ("name", g["name"]),
                            ("members", g.get("members")),
                            ("profiles", ", ".join(g.get("profiles") or []) or "none"),
                        ]
                    )
                )
                print("\ndevices:")
                _print(["  " + d for d in g.get("devices", [])] or ["  none"])
                if g.get("next"):
                    print(f"  ... more: --all, or --limit larger than {args.limit}")

            _output(args, answer, show)
        case "members":
            if not args.add and not args.remove:
                raise CliError("give --add ID ... and/or --remove ID ...")
            answer = client.call(
                "POST", f"/api/v1/groups/{name}/devices", {"add": args.add or [], "remove": args.remove or []}
            )
            _output(
                args,
                answer,
                lambda a: print(f"group {a['name']}: {a['added']} added, {a['removed']} removed"),
            )
    return 0


def _assign(args: argparse.Namespace) -> int:
    answer = _client(args).call("PUT", f"/api/v1/profiles/{_q(args.profile)}/groups", {"groups": args.groups})
    _output(
        args,
        answer,
        lambda a: print(f"profile {a['name']} assigned to {', '.join(a['groups']) or 'no group'}"),
    )
    return 0


# --------------------------------------------------------------------------
# store copy (no server needed)
# --------------------------------------------------------------------------


def _store_location(text: str, scheme: str) -> str:
    """``sqlite:PATH`` -> PATH; ``postgresql:DSN`` (or a postgresql:// URI) -> DSN."""
    if scheme == "postgresql" and text.startswith(("postgresql://", "postgres://")):
        return text
    prefix = f"{scheme}:"
    if not text.startswith(prefix) or not text[len(prefix) :].strip():
        raise argparse.ArgumentTypeError(
            f"expected {prefix}{'PATH' if scheme == 'sqlite' else 'DSN'}, got {text!r}"
        )
    return text[len(prefix) :].strip()


def _store_copy(args: argparse.Namespace) -> int:
    from psycopg.conninfo import conninfo_to_dict

    from mdmd.config import password_from_file
    from mdmd.store.copy import CopyError, copy_sqlite_to_postgresql

    source = os.path.abspath(args.source)
    if not os.path.isfile(source):
        raise CliError(f"store copy: {source}: no such file")
    try:
        params = conninfo_to_dict(args.target)
    except Exception as e:
        raise CliError(f"store copy: --to: not a libpq connection string: {_one_line(str(e))}") from None
    if "password" in params:
        raise CliError(
            "store copy: --to: the DSN must not hold the password (use --password-file or PGPASSFILE)"
        )
    password = None
    if args.password_file is not None:
        try:
            password = password_from_file(args.password_file)
        except ValueError as e:
            raise CliError(f"store copy: --password-file {args.password_file}: {e}") from None

    def progress(line: str) -> None:
        print(f"mdmctl: {line}", file=sys.stderr, flush=True)

    where = " ".join(f"{k}={params[k]}" for k in ("host", "port", "dbname", "user") if params.get(k))
    progress(f"copying {source} to PostgreSQL {where or args.target}")
    try:
        report = copy_sqlite_to_postgresql(source, args.target, password=password, progress=progress)
    except CopyError as e:
        raise CliError(f"store copy: {e}") from None
    if args.json:
        print(json.dumps({"tables": report.tables, "rows": report.rows, "seconds": round(report.seconds, 3)}))
        return 0
    width = max(len(t) for t in report.tables)
    for table, count in report.tables.items():
        print(f"{table:<{width}}  {count:>12,}")
    print(
        f"{report.rows:,} rows in {len(report.tables)} tables copied in {report.seconds:.1f} s; "
        "the counts match. Set [store] backend = postgresql and dsn, then start mdmd."
    )
    return 0


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def _page_size(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 1000:
        raise argparse.ArgumentTypeError("must be a whole number from 1 to 1000")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= value <= 86400:
        raise argparse.ArgumentTypeError("must be between 0 and 86400 seconds")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mdmctl", description="Administer an mdmd server.")
    parser.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        metavar="PATH",
        help=f"mdmd's INI file, for the admin URL and token (default {DEFAULT_CONFIG})",
    )
    parser.add_argument("--json", action="store_true", help="print the admin API's JSON")
    parser.add_argument(
        "--token-file",
        metavar="PATH",
        help="file with the admin token to use (default: $MDMCTL_TOKEN, else [admin] token_file)",
    )
    # The same options after the command name (mdmctl devices --json); SUPPRESS
    # keeps a sub-command from resetting what was given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, metavar="PATH", help=argparse.SUPPRESS)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print the API's JSON")
    common.add_argument(
        "--token-file", default=argparse.SUPPRESS, metavar="PATH", help="the admin token (else $MDMCTL_TOKEN)"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    init = commands.add_parser(
        "init",
        help="create key material and secrets in DIR (never overwrites)",
        description=(
            "Create the WSTEP identity CA, a server TLS certificate signed by a local "
            "root (unless --no-tls), the enroll secret and the admin token in DIR. "
            "Existing files are kept as they are."
        ),
    )
    init.add_argument("dir", metavar="DIR", help="the state directory ([mdmd] state_dir)")
    init.add_argument(
        "--host",
        action="append",
        metavar="NAME",
        help="host name or IP for the server TLS certificate (repeatable; default localhost)",
    )
    init.add_argument(
        "--no-tls",
        action="store_true",
        help="do not create a server TLS certificate (you bring a public one)",
    )
    init.set_defaults(run=_init)

    store = commands.add_parser("store", help="the store itself: copy (no server needed)")
    store_actions = store.add_subparsers(dest="action", required=True, metavar="ACTION")
    copy = store_actions.add_parser(
        "copy",
        help="copy a SQLite store into an empty PostgreSQL database",
        description=(
            "Copy every table of mdmd's SQLite store into an empty PostgreSQL database "
            "(created with mdmd's schema), with progress, and compare the row counts. "
            "Stop mdmd first. Enrolled devices keep their certificates and go on checking in "
            "once mdmd runs with [store] backend = postgresql."
        ),
    )
    copy.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="sqlite:PATH",
        type=lambda t: _store_location(t, "sqlite"),
        help="the SQLite store (state_dir/mdmd.sqlite3)",
    )
    copy.add_argument(
        "--to",
        dest="target",
        required=True,
        metavar="postgresql:DSN",
        type=lambda t: _store_location(t, "postgresql"),
        help="a libpq connection string without the password ('postgresql:host=db dbname=mdmd user=mdmd')",
    )
    copy.add_argument(
        "--password-file",
        metavar="FILE",
        help="the database password alone in a 0600 file (else libpq's PGPASSFILE, ~/.pgpass)",
    )
    copy.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print the counts as JSON"
    )
    copy.set_defaults(run=_store_copy)

    def api(name: str, text: str, run: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=text, description=text, parents=[common])
        sub.set_defaults(run=run)
        return sub

    devices = api("devices", "list MDM devices, a page at a time (--all: every page)", _devices)
    devices.add_argument("--limit", type=_page_size, default=100, metavar="N", help="devices per page (100)")
    devices.add_argument("--all", action="store_true", help="every page, not only the first")
    devices.add_argument("--cursor", metavar="NEXT", help="continue a listing where a page ended")
    devices.add_argument(
        "--search",
        "-q",
        metavar="TEXT",
        help="device ID, hostname, serial or hardware UUID starting with TEXT",
    )
    devices.add_argument("--state", choices=("enrolled", "unenrolled"))
    devices.add_argument("--group", metavar="NAME", help="members of this device group (all: every enrolled)")
    devices.add_argument("--os-version", metavar="VERSION", help="this OS version or a revision of it")
    devices.add_argument(
        "--expiring", type=int, metavar="DAYS", help="whose certificate expires within DAYS days"
    )
    devices.add_argument("--last-seen-before", metavar="WHEN", help="ISO 8601 time, or an age: 30d, 12h, 15m")
    devices.add_argument("--last-seen-after", metavar="WHEN", help="ISO 8601 time, or an age: 30d, 12h, 15m")
    collision = devices.add_mutually_exclusive_group()
    collision.add_argument(
        "--collision", dest="collision", action="store_true", default=None, help="sharing a HWDevID (clones)"
    )
    collision.add_argument("--no-collision", dest="collision", action="store_false", help="not sharing one")
    devices.add_argument("--sort", choices=("enrolled_at", "last_seen"), help="order (enrolled_at)")
    devices.add_argument("--desc", action="store_true", help="newest first")
    api("device", "show one device: certificate, inventory, recent commands", _device).add_argument(
        "id", metavar="ID", help="MDM device ID"
    )
    api("commands", "list a device's commands, newest first", _commands).add_argument(
        "id", metavar="ID", help="MDM device ID"
    )
    api("command", "show one command with the device's answers", _command).add_argument(
        "uuid", metavar="UUID", help="command UUID"
    )
    action_helps = {
        "restart": "restart the device (Reboot CSP: at the end of its next session)",
        "wipe": "wipe the device (RemoteWipe CSP); needs --yes",
        "unenroll": "unenroll the device from MDM (DMClient Unenroll, and its agent when it has one)",
        "scan": "start a Microsoft Defender scan (quick, or --full)",
        "defender-update": "update Microsoft Defender's signatures",
    }
    for name, text in action_helps.items():
        sub = api(name, text, _unenroll if name == "unenroll" else _action)
        sub.add_argument("id", nargs="?", metavar="ID", help="MDM device ID (or --group)")
        sub.add_argument("--group", metavar="NAME", help="every member of the group (all: every device)")
        if name == "wipe":
            sub.add_argument(
                "--mode",
                default="wipe",
                choices=("wipe", "protected", "keep-provisioning", "keep-user-data"),
                help="wipe (default), protected (keeps trying until done), keep-provisioning, keep-user-data",
            )
            sub.add_argument("--yes", action="store_true", help="confirm: the device is erased")
        if name == "scan":
            sub.add_argument("--full", action="store_true", help="a full scan instead of a quick one")
        sub.add_argument(
            "--wait",
            type=_seconds,
            metavar="SECONDS",
            help="then wait up to SECONDS for the device (the group's progress) and show it",
        )
    rename = api("rename", "give the device a new computer name (in effect after a restart)", _action)
    rename.add_argument("id", metavar="ID", help="MDM device ID")
    rename.add_argument("name", metavar="NAME", help="1 to 15 letters, digits or hyphens, not all digits")
    rename.add_argument("--wait", type=_seconds, metavar="SECONDS", help="then wait for the device's answer")
    api("operation", "show a group operation's progress", _operation).add_argument(
        "operation_id", metavar="ID", help="operation ID"
    )
    token = api("token", "named admin tokens: create NAME (shown once), list, revoke NAME", _token)
    token.add_argument("action", choices=("create", "list", "revoke"))
    token.add_argument("name", nargs="?", metavar="NAME", help="the token's name (create, revoke)")
    audit = api("audit", "administrators' writes, newest first: who, what, on what, when", _audit)
    audit.add_argument("--limit", type=_page_size, default=100, metavar="N", help="entries per page (100)")
    audit.add_argument("--all", action="store_true", help="every page, not only the first")
    audit.add_argument("--actor", metavar="NAME", help="by this token")
    audit.add_argument("--action", metavar="ACTION", help="e.g. command.queue, device.unenroll, token.create")
    audit.add_argument("--target", metavar="TARGET", help="on this device ID or token name")
    api("version", "the server's version", _version)

    check = commands.add_parser(
        "check-config",
        help="run the daemon's start-up checks on --config without starting it (exit 0 or 78)",
        description="The checks of twistd mdmd --config FILE --check: one line, exit 0 or 78.",
        parents=[common],
    )
    check.set_defaults(run=_check_config)
    backup = commands.add_parser(
        "backup",
        help="copy the database to FILE (online: mdmd may run) and name the key material a restore needs",
        description=(
            "Copy mdmd's database with SQLite's online backup API (a consistent copy while mdmd runs), "
            "and list the key material and secrets a restore needs as well. Run it as a user who can "
            "read state_dir."
        ),
        parents=[common],
    )
    backup.add_argument("file", metavar="FILE", help="the new file")
    backup.set_defaults(run=_backup)

    profile = api("profile", "configuration profiles: list, show, add, update, delete", _profile)
    actions = profile.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("list", help="every profile", parents=[common])
    for action, text in (
        ("show", "one profile: items, groups, device states"),
        ("delete", "remove it from every device, then forget it"),
    ):
        actions.add_parser(action, help=text, parents=[common]).add_argument("name", metavar="NAME")
    for action, text in (
        ("add", "create a profile"),
        ("update", "change a profile (devices get the new version)"),
    ):
        sub = actions.add_parser(action, help=text, parents=[common])
        sub.add_argument("name", metavar="NAME")
        sub.add_argument(
            "file", metavar="FILE", help="SyncML Replace/Add commands, or JSON items; - reads stdin"
        )
    group = api("group", "device groups: list, show, add, delete, members", _group)
    actions = group.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("list", help="every group, the built-in all first", parents=[common])
    for action, text in (
        ("add", "create a group"),
        ("delete", "delete a group (its profiles leave its devices)"),
    ):
        actions.add_parser(action, help=text, parents=[common]).add_argument("name", metavar="NAME")
    show = actions.add_parser("show", help="a group and its member devices", parents=[common])
    show.add_argument("name", metavar="NAME")
    show.add_argument("--limit", type=int, default=100, metavar="N", help="devices per page (100)")
    show.add_argument("--all", action="store_true", help="every member, page after page")
    members = actions.add_parser("members", help="add devices to a group or remove them", parents=[common])
    members.add_argument("name", metavar="NAME")
    members.add_argument("--add", nargs="+", metavar="ID", help="device IDs to add")
    members.add_argument("--remove", nargs="+", metavar="ID", help="device IDs to remove")
    assign = api("assign", "make GROUPs (all included) the profile's groups; none unassigns it", _assign)
    assign.add_argument("profile", metavar="PROFILE")
    assign.add_argument("groups", nargs="*", metavar="GROUP")

    queue_helps = {
        "get": "queue a Get of one or more LocURIs",
        "replace": "queue a Replace of a LocURI's value",
        "add": "queue an Add of a node or value",
        "delete": "queue a Delete of one or more LocURIs",
        "exec": "queue an Exec of a LocURI",
        "queue": "queue raw SyncML: one command (Atomic and Sequence allowed), without CmdIDs",
    }
    for name, text in queue_helps.items():
        sub = api(name, text + "; prints the command UUID", _queue)
        sub.add_argument("id", metavar="ID", help="MDM device ID")
        if name == "queue":
            sub.add_argument(
                "--syncml", required=True, metavar="FILE", help="file with the SyncML command, - for stdin"
            )
        else:
            many = name in ("get", "delete")
            sub.add_argument(
                "locuris",
                nargs="+" if many else 1,
                metavar="LOCURI",
                help="node address, e.g. ./DevDetail/SwV" + (" (repeatable)" if many else ""),
            )
        if name in ("replace", "add", "exec"):
            sub.add_argument(
                "--format", metavar="FORMAT", help="Meta/Format: chr, int, bool, b64, xml, node, null, ..."
            )
            sub.add_argument("--type", metavar="TYPE", help="Meta/Type, e.g. text/plain")
            sub.add_argument("--data", metavar="DATA", help="the value (Data)")
        sub.add_argument(
            "--wait",
            type=_seconds,
            metavar="SECONDS",
            help="then wait up to SECONDS for the device's answer and show it "
            "(exit 1 if it failed or did not come)",
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "token" and (args.action == "list") != (args.name is None):
        parser.error("token create and revoke take a NAME, token list none")
    try:
        return int(args.run(args))
    except CliError as e:
        print(f"mdmctl: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader (head, less) went away: nothing left to say to it.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as e:
        # An administrator's tool: one line, never a traceback, even for a bug.
        print(f"mdmctl: internal error ({type(e).__name__}: {_one_line(str(e))})", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
