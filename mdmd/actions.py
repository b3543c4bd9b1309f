"""Device actions, pure: restart, wipe, MDM-side unenroll, rename, Defender
scan and signature update, by name instead of by CSP path.

An administrator asks for an action by name with a few options
(:func:`parse_action_request`); the request is checked completely and
turned into the one SyncML command Windows carries it out with
(:func:`action_command`, the CSP nodes below, ``docs/actions.md`` says
which Windows editions have them).  The action is then a
:class:`DeviceAction` record beside that command, and it moves through
:data:`ACTION_STATES` as the device answers:

- ``pending`` (queued), ``sent`` (in a session, not answered yet);
- ``acknowledged``: the device accepted it (for a wipe the device is then
  ``wiped``, for an unenrollment ``unenrolled``: its certificate is revoked,
  nothing more is sent to it);
- ``awaiting_restart``: a rename the device accepted; the name takes effect
  after a restart, and the action is ``acknowledged`` once the device
  reports it (each session asks, :func:`plan_session`);
- ``failed`` (the device's status code and what it means), ``cancelled``
  (the device was wiped or unenrolled before it got to it, or a newer
  rename replaced it).

A wipe or an unenrollment in flight shows in the device's state
(:func:`shown_state`): ``wipe_pending``, ``unenroll_pending``, then
``wiped``.  Remote lock is refused: the RemoteLock CSP is a Windows 10
Mobile feature (:data:`REFUSED_ACTIONS`).

Nothing here does I/O: the admin API feeds requests in, the management
endpoint feeds each message's :class:`~mdmd.management.ManagementStep` to
:func:`settle` and commits the :class:`ActionStep` it returns with the
message.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote

from mdmd.commands import FieldError, QueuedCommand, without_ids
from mdmd.management import ManagementStep, NewCommand
from mdmd.syncml import Command, Item, Meta, describe_status, parse_commands_fragment, serialize_command

__all__ = [
    "ACTIONS",
    "ACTION_STATES",
    "BLOCKING_STATES",
    "DEFENDER_SCAN",
    "DEFENDER_UPDATE",
    "DNS_COMPUTER_NAME",
    "LIFECYCLE_STATES",
    "OPEN_STATES",
    "REBOOT_NOW",
    "REFUSED_ACTIONS",
    "REMOTE_WIPE",
    "WIPE_MODES",
    "ActionRequest",
    "ActionRequestError",
    "ActionStep",
    "ActionUpdate",
    "DeviceAction",
    "action_command",
    "check_computer_name",
    "ends_enrollment",
    "lifecycle_of",
    "parse_action_request",
    "plan_session",
    "settle",
    "shown_state",
    "unenroll_target",
]

# --- the CSP nodes (MS-MDM CSP reference; docs/actions.md) ---

#: Reboot CSP: Exec restarts the PC at the end of the OMA-DM session
#: (within 5 minutes); Format null.
REBOOT_NOW: Final = "./Device/Vendor/MSFT/Reboot/RebootNow"
#: RemoteWipe CSP: one Exec node per kind of reset; Format chr, no Data
#: (the dummy "1" is for OMA Client Provisioning only).
REMOTE_WIPE: Final = "./Device/Vendor/MSFT/RemoteWipe"
#: DevDetail CSP (Windows 10 2004 and later): Replace sets the DNS host
#: name; the server must restart the device for it to take effect.
DNS_COMPUTER_NAME: Final = "./DevDetail/Ext/Microsoft/DNSComputerName"
#: Defender CSP: Exec Scan with Data 1 (quick) or 2 (full); Exec
#: UpdateSignature.  Both nodes are Format chr in the CSP's description.
DEFENDER_SCAN: Final = "./Device/Vendor/MSFT/Defender/Scan"
DEFENDER_UPDATE: Final = "./Device/Vendor/MSFT/Defender/UpdateSignature"

#: The action names, in the order the API lists them.
ACTIONS: Final = ("restart", "wipe", "unenroll", "rename", "defender_scan", "defender_update")
#: Wipe modes and the RemoteWipe node each one executes.
WIPE_MODES: Final = {
    "wipe": "doWipe",
    "protected": "doWipeProtected",
    "keep-provisioning": "doWipePersistProvisionedData",
    "keep-user-data": "doWipePersistUserData",
}
_LOCK_REASON: Final = (
    "remote lock is not offered: the RemoteLock CSP works on Windows 10 Mobile only, "
    "and a Windows 10 or 11 PC has no OMA-DM node that locks its screen"
)
#: Names an administrator may try that mdmd refuses, and why.
REFUSED_ACTIONS: Final = {"lock": _LOCK_REASON, "remote_lock": _LOCK_REASON, "remote-lock": _LOCK_REASON}
_OPTIONS: Final[Mapping[str, frozenset[str]]] = {
    "restart": frozenset(),
    "wipe": frozenset({"mode", "confirm"}),
    "unenroll": frozenset(),
    "rename": frozenset({"name"}),
    "defender_scan": frozenset({"full"}),
    "defender_update": frozenset(),
}

#: Where an action stands.
ACTION_STATES: Final = ("pending", "sent", "awaiting_restart", "acknowledged", "failed", "cancelled")
#: Not finished yet: shown as the device's pending actions.
OPEN_STATES: Final = ("pending", "sent", "awaiting_restart")
#: A second request for the same action is refused (409) while one is here.
BLOCKING_STATES: Final = ("pending", "sent")
#: What a wipe or an unenrollment makes of the device's shown state.
LIFECYCLE_STATES: Final = ("wipe_pending", "unenroll_pending", "wiped")

# NetBIOS names are at most 15 characters (the DNS name may be longer, but
# a longer one is cut for NetBIOS and domain join); letters, digits and
# hyphens only, and never all digits (Windows refuses a numeric name).
_COMPUTER_NAME_RE: Final = re.compile(r"[A-Za-z0-9-]{1,15}")


class ActionRequestError(ValueError):
    """The action is refused; ``errors`` lists every problem found."""

    def __init__(self, errors: Sequence[FieldError]) -> None:
        assert errors
        self.errors = tuple(errors)
        first = self.errors[0]
        message = f"invalid action: {first.name}: {first.reason}"
        if len(self.errors) > 1:
            message += f" (and {len(self.errors) - 1} more)"
        super().__init__(message)
        self.message = message


@dataclass(frozen=True, slots=True)
class ActionRequest:
    """A checked action request: the action and its options (only those
    the action takes are set)."""

    action: str
    mode: str | None = None  # wipe
    name: str | None = None  # rename
    full: bool | None = None  # defender_scan

    def options(self) -> dict[str, Any]:
        """The options as the API shows and the store keeps them."""
        found = {"mode": self.mode, "name": self.name, "full": self.full}
        return {k: v for k, v in found.items() if v is not None}

    @classmethod
    def from_options(cls, action: str, options: Mapping[str, Any]) -> ActionRequest:
        return cls(action, options.get("mode"), options.get("name"), options.get("full"))


def check_computer_name(name: object) -> str | None:
    """Why *name* cannot be a Windows computer name, or None."""
    if not isinstance(name, str) or not _COMPUTER_NAME_RE.fullmatch(name):
        return "1 to 15 letters, digits or hyphens"
    if name.isdigit():
        return "must not be all digits"
    return None


def parse_action_request(obj: object, *, group: bool = False) -> ActionRequest:
    """Validate a ``POST .../actions`` body (``{"action": ..., options}``).
    *group*: the action goes to every member of a group.  Raises
    :class:`ActionRequestError` naming every field that is wrong."""
    if not isinstance(obj, dict):
        raise ActionRequestError([FieldError("base", "the body must be a JSON object")])
    action = obj.get("action")
    if "action" not in obj:
        raise ActionRequestError([FieldError("action", f"required: one of {', '.join(ACTIONS)}")])
    if not isinstance(action, str):
        raise ActionRequestError([FieldError("action", f"must be one of {', '.join(ACTIONS)}")])
    if action.lower() in REFUSED_ACTIONS:
        raise ActionRequestError([FieldError("action", REFUSED_ACTIONS[action.lower()])])
    if action not in _OPTIONS:
        shown = action if len(action) <= 40 else action[:40] + "..."
        raise ActionRequestError(
            [FieldError("action", f"unknown action {shown!r}; known: {', '.join(ACTIONS)}")]
        )
    allowed = _OPTIONS[action]
    errors = [
        FieldError(
            str(key),
            f"not an option of {action}" + (f" (it takes {', '.join(sorted(allowed))})" if allowed else ""),
        )
        for key in obj
        if key != "action" and key not in allowed
    ]
    mode = name = full = None
    if action == "wipe":
        mode = obj.get("mode", "wipe")
        if mode not in WIPE_MODES:
            errors.append(FieldError("mode", f"must be one of {', '.join(WIPE_MODES)}"))
        if obj.get("confirm") is not True:
            errors.append(
                FieldError(
                    "confirm", 'a wipe erases the device: confirm it with "confirm": true (mdmctl: --yes)'
                )
            )
    elif action == "rename":
        if group:
            errors.append(FieldError("action", "rename gives one device its name; it cannot go to a group"))
        name = obj.get("name")
        if "name" not in obj:
            errors.append(FieldError("name", "required: the new computer name"))
        elif (reason := check_computer_name(name)) is not None:
            errors.append(FieldError("name", reason))
    elif action == "defender_scan":
        full = obj.get("full", False)
        if not isinstance(full, bool):
            errors.append(FieldError("full", "must be true (full scan) or false (quick scan)"))
    if errors:
        raise ActionRequestError(errors)
    return ActionRequest(
        action,
        mode=mode if isinstance(mode, str) else None,
        name=name if isinstance(name, str) else None,
        full=full if isinstance(full, bool) else None,
    )


def unenroll_target(provider_id: str) -> str:
    """The DMClient node that unenrolls the device from *provider_id*'s
    server (the node name is the URI-encoded provider ID)."""
    return f"./Vendor/MSFT/DMClient/Provider/{quote(provider_id, safe='')}/Unenroll"


def _exec(target: str, fmt: str, data: str | None = None) -> Command:
    return Command(verb="Exec", cmd_id="", items=(Item(target=target, meta=Meta(format=fmt), data=data),))


def action_command(request: ActionRequest, *, provider_id: str) -> QueuedCommand:
    """The command that carries *request* out, as the queue stores it."""
    action = request.action
    if action == "restart":
        cmd = _exec(REBOOT_NOW, "null")
    elif action == "wipe":
        cmd = _exec(f"{REMOTE_WIPE}/{WIPE_MODES[request.mode or 'wipe']}", "chr")
    elif action == "unenroll":
        # The Data names the server to leave (DMClient CSP, Unenroll).
        cmd = _exec(unenroll_target(provider_id), "chr", provider_id)
    elif action == "rename":
        assert request.name is not None
        item = Item(target=DNS_COMPUTER_NAME, meta=Meta(format="chr"), data=request.name)
        cmd = Command(verb="Replace", cmd_id="", items=(item,))
    elif action == "defender_scan":
        cmd = _exec(DEFENDER_SCAN, "chr", "2" if request.full else "1")
    elif action == "defender_update":
        cmd = _exec(DEFENDER_UPDATE, "chr")
    else:
        raise ValueError(f"unknown action {action!r}")
    body = serialize_command(cmd)
    # The sender reads the body back when it sends it: it must be this very command.
    if parse_commands_fragment(body) != (without_ids(cmd),):
        raise ValueError(f"the {action} command does not survive storage as SyncML")
    return QueuedCommand(cmd.verb, body)


# --- actions on a device, and what its answers do to them ---


@dataclass(frozen=True, slots=True)
class DeviceAction:
    """One action asked of one device, and where it stands."""

    action_id: str
    device_id: str
    action: str
    options: Mapping[str, Any]
    command_uuid: str
    state: str  # ACTION_STATES
    status: int | None
    detail: str | None
    created_at: float
    updated_at: float
    operation_id: str | None = None

    @property
    def open(self) -> bool:
        return self.state in OPEN_STATES

    def options_json(self) -> str:
        return json.dumps(dict(self.options), sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class ActionUpdate:
    action_id: str
    state: str
    status: int | None = None
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class ActionStep:
    """What one message changed of a device's actions; committed with the
    message's step."""

    updates: tuple[ActionUpdate, ...] = ()
    # The device leaves management with this message: "wiped" or
    # "unenrolled" (certificate revoked, what is still queued cancelled).
    ended: str | None = None
    # Commands answered without a status: the unenrollment the device
    # confirmed with its Alert 1226 instead.
    confirmed: tuple[str, ...] = ()
    lifecycle: str | None = None  # the device's lifecycle afterwards
    lifecycle_changed: bool = False

    def __bool__(self) -> bool:
        return bool(self.updates or self.ended or self.confirmed or self.lifecycle_changed)


def shown_state(state: str, lifecycle: str | None) -> str:
    """The device's state as the API shows it: ``enrolled`` /
    ``unenrolled``, or what a wipe or an unenrollment made of it."""
    if state == "enrolled" and lifecycle in ("wipe_pending", "unenroll_pending"):
        return lifecycle
    if state == "unenrolled" and lifecycle == "wiped":
        return "wiped"
    return state


def lifecycle_of(open_actions: Iterable[str]) -> str | None:
    """The lifecycle the device's open actions give it (a wipe outranks an
    unenrollment)."""
    names = set(open_actions)
    if "wipe" in names:
        return "wipe_pending"
    if "unenroll" in names:
        return "unenroll_pending"
    return None


def ends_enrollment(actions: Iterable[DeviceAction]) -> Callable[[str, int], bool]:
    """Whether the device's answer *code* to command *uuid* ends its
    management: a wipe or an unenrollment it accepted.  Nothing more is sent
    to it in that session."""
    leaving = {a.command_uuid for a in actions if a.open and a.action in ("wipe", "unenroll")}
    return lambda uuid, code: uuid in leaving and 200 <= code < 300


def _accepted(action: DeviceAction) -> ActionUpdate:
    options = action.options
    match action.action:
        case "wipe":
            mode = str(options.get("mode", "wipe"))
            detail = f"the device accepted the wipe ({mode}, {WIPE_MODES.get(mode, '?')}) and is being reset"
            return ActionUpdate(action.action_id, "acknowledged", None, detail)
        case "unenroll":
            return ActionUpdate(
                action.action_id, "acknowledged", None, "the device accepted the unenrollment"
            )
        case "rename":
            detail = f"the device accepted the name {options.get('name')}; it takes effect after a restart"
            return ActionUpdate(action.action_id, "awaiting_restart", None, detail)
        case "restart":
            detail = "the device restarts when this session ends (within 5 minutes)"
            return ActionUpdate(action.action_id, "acknowledged", None, detail)
        case "defender_scan":
            kind = "full" if options.get("full") else "quick"
            return ActionUpdate(action.action_id, "acknowledged", None, f"Defender started a {kind} scan")
        case _:
            return ActionUpdate(action.action_id, "acknowledged", None, "Defender started a signature update")


def _name_reported(action: DeviceAction, inventory: Mapping[str, str]) -> bool:
    reported = inventory.get(DNS_COMPUTER_NAME)
    wanted = action.options.get("name")
    # Windows compares computer names without regard to case.
    return reported is not None and isinstance(wanted, str) and reported.lower() == wanted.lower()


_IN_EFFECT: Final = "the device reports its new name"


def plan_session(
    actions: Iterable[DeviceAction], inventory: Mapping[str, str], new_uuid: Callable[[], str]
) -> tuple[list[NewCommand], list[ActionUpdate]]:
    """At the start of a device's session: a rename waiting for a restart
    is done once the device's reported name is the new one; until then the
    session asks for the name (one Get)."""
    commands: list[NewCommand] = []
    updates: list[ActionUpdate] = []
    for action in actions:
        if action.action != "rename" or action.state != "awaiting_restart":
            continue
        if _name_reported(action, inventory):
            updates.append(ActionUpdate(action.action_id, "acknowledged", action.status, _IN_EFFECT))
        elif not commands:
            get = Command(verb="Get", cmd_id="", items=(Item(target=DNS_COMPUTER_NAME),))
            commands.append(NewCommand(new_uuid(), "Get", serialize_command(get)))
    return commands, updates


def settle(
    actions: Sequence[DeviceAction], step: ManagementStep, earlier: Sequence[ActionUpdate] = ()
) -> ActionStep:
    """What the device's message (its *step*) did to its open *actions*;
    *earlier* are updates made when the session started."""
    by_id = {a.action_id: a for a in actions if a.open}
    by_uuid = {a.command_uuid: a for a in by_id.values()}
    states = {a.action_id: a.state for a in by_id.values()}
    updates: dict[str, ActionUpdate] = {u.action_id: u for u in earlier}
    for u in earlier:
        states[u.action_id] = u.state

    def put(update: ActionUpdate) -> None:
        updates[update.action_id] = update
        states[update.action_id] = update.state

    for uuid, _session, _msg in step.sent:
        found = by_uuid.get(uuid)
        if found is not None and states[found.action_id] == "pending":
            put(ActionUpdate(found.action_id, "sent"))
    ended: str | None = None
    for uuid, code in (*step.answered, *step.failed):
        found = by_uuid.get(uuid)
        if found is None or states[found.action_id] not in BLOCKING_STATES:
            continue
        if 200 <= code < 300:
            update = _accepted(found)
            put(ActionUpdate(update.action_id, update.state, code, update.detail))
            if found.action == "wipe":
                ended = "wiped"
            elif found.action == "unenroll" and ended is None:
                ended = "unenrolled"
        else:
            put(
                ActionUpdate(
                    found.action_id, "failed", code, f"{found.action} failed: {describe_status(code)}"
                )
            )
    for found in by_id.values():
        renamed = found.action == "rename" and states[found.action_id] == "awaiting_restart"
        if renamed and _name_reported(found, step.inventory):
            put(ActionUpdate(found.action_id, "acknowledged", 200, _IN_EFFECT))
    confirmed: list[str] = []
    if step.unenroll:
        # Windows does not answer the Unenroll Exec: it ends the session and
        # reports the unenrollment with Alert 1226 in a new one.
        for found in by_id.values():
            if found.action == "unenroll" and states[found.action_id] in BLOCKING_STATES:
                put(
                    ActionUpdate(
                        found.action_id,
                        "acknowledged",
                        None,
                        "the device reported its unenrollment (Alert 1226)",
                    )
                )
                confirmed.append(found.command_uuid)
        ended = ended or "unenrolled"
    if ended is not None:
        for found in by_id.values():
            if states[found.action_id] in OPEN_STATES:
                put(ActionUpdate(found.action_id, "cancelled", None, f"cancelled: the device was {ended}"))
    before = lifecycle_of(a.action for a in by_id.values())
    if ended == "wiped":
        lifecycle: str | None = "wiped"
    elif ended == "unenrolled":
        lifecycle = None
    else:
        lifecycle = lifecycle_of(a.action for a in by_id.values() if states[a.action_id] in BLOCKING_STATES)
    return ActionStep(
        updates=tuple(updates.values()),
        ended=ended,
        confirmed=tuple(confirmed),
        lifecycle=lifecycle,
        lifecycle_changed=lifecycle != before or ended is not None,
    )
