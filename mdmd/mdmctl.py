"""``mdmctl``: the administrator's command line.

``mdmctl init DIR`` creates the key material a production deployment needs
without starting the server.  Every other command talks to the admin API of
a running mdmd (``[admin] url`` and the token in ``[admin] token_file`` of
``--config``, default ``/etc/mdmd/mdmd.ini``)::

    mdmctl devices                      mdmctl device ID
    mdmctl get ID ./DevDetail/SwV       mdmctl replace ID LOCURI --format int --data 1
    mdmctl add ID LOCURI ...            mdmctl delete ID LOCURI
    mdmctl exec ID LOCURI [--data ...]  mdmctl queue ID --syncml FILE|-
    mdmctl command UUID                 mdmctl commands ID
    mdmctl unenroll ID
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
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from mdmd.config import ConfigError, load_config

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


def _client(args: argparse.Namespace) -> AdminClient:
    try:
        config = load_config(args.config)
    except ConfigError as e:
        raise CliError(_one_line(str(e))) from None
    path = config.admin.token_file
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
    cells = [list(headers), *([_cell(v) for v in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]


def _fields(pairs: Sequence[tuple[str, object]]) -> list[str]:
    width = max(len(k) for k, _ in pairs)
    return [f"{k.ljust(width)}  {_cell(v)}" for k, v in pairs]


def _print(lines: Sequence[str]) -> None:
    for line in lines:
        print(line)


def _show_devices(answer: Any) -> None:
    devices = answer.get("devices", [])
    if not devices:
        print("no devices")
        return
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
    headers = ("DEVICE ID", "NAME", "MANUFACTURER", "MODEL", "OS VERSION", "STATE", "ENROLLED", "LAST SEEN")
    _print(_table(headers, rows))
    if any(d.get("hw_dev_id_collision") for d in devices):
        print("* shares its HWDevID with another enrolled device (a clone made without sysprep?)")


def _command_rows(commands: Sequence[Any]) -> list[tuple[object, ...]]:
    return [
        (c["command_uuid"], c.get("verb"), c.get("state"), c.get("status"), c.get("created_at"))
        for c in commands
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
                p.get("status"),
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
                ("status", c.get("status")),
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
        (r.get("kind"), r.get("cmd_id"), r.get("status"), r.get("target"), r.get("format"), r.get("data"))
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


def _devices(args: argparse.Namespace) -> int:
    _output(args, _client(args).call("GET", "/api/v1/devices"), _show_devices)
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


def _unenroll(args: argparse.Namespace) -> int:
    answer = _client(args).call("POST", f"/api/v1/devices/{_q(args.id)}/unenroll")
    _output(
        args,
        answer,
        lambda a: print(
            f"unenrollment requested for {a['device_id']}: its agent unenrolls it at its next check-in"
        ),
    )
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
        raise CliError(f"command {command_uuid} failed with status {command.get('status')}")
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
    # The same options after the command name (mdmctl devices --json); SUPPRESS
    # keeps a sub-command from resetting what was given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, metavar="PATH", help=argparse.SUPPRESS)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print the API's JSON")
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

    api("devices", "list MDM devices", _devices)
    api("device", "show one device: certificate, inventory, recent commands", _device).add_argument(
        "id", metavar="ID", help="MDM device ID"
    )
    api("commands", "list a device's commands, newest first", _commands).add_argument(
        "id", metavar="ID", help="MDM device ID"
    )
    api("command", "show one command with the device's answers", _command).add_argument(
        "uuid", metavar="UUID", help="command UUID"
    )
    api("unenroll", "ask the device's agent to unenroll it from MDM", _unenroll).add_argument(
        "id", metavar="ID", help="MDM device ID"
    )

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
    args = build_parser().parse_args(argv)
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
