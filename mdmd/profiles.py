"""Configuration profiles, pure: desired state for Windows CSP nodes,
delivered, verified, repaired on drift and removed.

A profile is a named list of ``Replace``/``Add`` items (LocURI, format,
type, data), the form Windows administrators already write for custom
profiles.  Its version is a hash of its content.  Each device keeps a
:class:`DeviceProfile` record per profile: the version it was given, where
delivery stands (:data:`STATES`) and the items as sent, so that they can
be read back and removed.

:class:`ProfilePlanner` decides, for one device message, what to send and
how the records change:

- when a session starts (:meth:`ProfilePlanner.plan_session`) it compares
  the device's desired profiles with its records and plans what is
  missing: the profile as one ``Atomic`` (all or nothing), ``Get``\\ s that
  re-read a verified profile once its verification is older than the
  verify interval, ``Delete``\\ s for a profile that left the device;
- when the device answers one of those commands
  (:meth:`ProfilePlanner.followups`, the :data:`~mdmd.management.FollowUps`
  hook of :func:`~mdmd.management.process_message`) it records the outcome
  and plans what follows in the same session: after the Atomic's 200 a
  ``Get`` of every LocURI, compared with the value sent; after a drifted
  value the Atomic again; after Windows' 418 on an ``Add`` the Atomic again
  with ``Replace`` for that node.

Nothing here does I/O: the management endpoint feeds the planner what the
store read and commits the :class:`ProfileStep` it returns with the
message's step.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final

from mdmd.commands import FieldError, check_item
from mdmd.management import CommandResult, ManagementStep, NewCommand
from mdmd.syncml import (
    Command,
    Item,
    Meta,
    describe_status,
    parse_commands_fragment,
    serialize_command,
)

__all__ = [
    "PROFILE_VERBS",
    "STATES",
    "VARIABLES",
    "AppliedItem",
    "DeviceProfile",
    "DeviceVars",
    "Profile",
    "ProfileCommand",
    "ProfileEvent",
    "ProfileItem",
    "ProfilePlanner",
    "ProfileRequestError",
    "ProfileSettings",
    "ProfileStep",
    "check_name",
    "items_from_json",
    "items_json",
    "parse_profile_request",
    "profile_syncml",
    "profile_version",
    "values_match",
]

#: The verbs a profile may hold (one top-level Atomic around them is accepted).
PROFILE_VERBS: Final = ("Replace", "Add")
#: Where a device's copy of a profile stands.
STATES: Final = ("pending", "sent", "verifying", "verified", "failed", "drifted", "removing", "removed")
#: Per-device variables allowed in Data, replaced at delivery.
VARIABLES: Final = {
    "$MDMD_DEVICE_ID": "device_id",
    "$MDMD_HOSTNAME": "hostname",
    "$MDMD_SERIAL": "serial",
}
_VARIABLE_RE: Final = re.compile(r"\$MDMD_[A-Za-z0-9_]*")
_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_MAX_ITEMS: Final = 500
# Gets Windows answers this way for a node whose Atomic succeeded cannot
# read the value back (ADMX-backed policies, write-only nodes).
_UNREADABLE: Final = frozenset({404, 405})


class ProfileRequestError(ValueError):
    """The profile is refused; ``errors`` lists every problem found."""

    def __init__(self, errors: Sequence[FieldError]) -> None:
        assert errors
        self.errors = tuple(errors)
        first = self.errors[0]
        message = f"invalid profile: {first.name}: {first.reason}"
        if len(self.errors) > 1:
            message += f" (and {len(self.errors) - 1} more)"
        super().__init__(message)
        self.message = message


# --- profiles ---


@dataclass(frozen=True, slots=True)
class ProfileItem:
    verb: str  # Replace | Add
    target: str
    format: str | None = None
    type: str | None = None
    data: str | None = None


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    version: str
    items: tuple[ProfileItem, ...]


def check_name(name: object) -> str | None:
    """Why *name* cannot name a profile or a group, or None."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        return "1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"
    return None


def items_json(items: Iterable[ProfileItem]) -> str:
    """The canonical stored form of a profile's items."""
    return json.dumps(
        [[i.verb, i.target, i.format, i.type, i.data] for i in items],
        separators=(",", ":"),
        ensure_ascii=False,
    )


def items_from_json(text: str) -> tuple[ProfileItem, ...]:
    return tuple(ProfileItem(*row) for row in json.loads(text))


def profile_version(items: Iterable[ProfileItem]) -> str:
    """A content hash: the same items always give the same version."""
    return hashlib.sha256(items_json(items).encode("utf-8")).hexdigest()[:16]


def parse_profile_request(obj: object, *, name: str | None = None) -> Profile:
    """Validate a ``POST /api/v1/profiles`` (or ``PUT``, with the *name* of
    the path) body: ``{"name", "syncml"}`` or ``{"name", "items"}``.  Raises
    :class:`ProfileRequestError` naming every field that is wrong."""
    if not isinstance(obj, dict):
        raise ProfileRequestError([FieldError("base", "the body must be a JSON object")])
    errors = [FieldError(str(k), "unknown field") for k in obj if k not in ("name", "syncml", "items")]
    given = obj.get("name", name)
    if name is not None and "name" in obj and obj["name"] != name:
        errors.append(FieldError("name", f"must be the profile's name, {name!r}, or left out"))
    elif given is None:
        errors.append(FieldError("name", "required"))
    elif (reason := check_name(given)) is not None:
        errors.append(FieldError("name", reason))
    items: list[ProfileItem] = []
    if "syncml" in obj and "items" in obj:
        errors.append(FieldError("syncml", "give either syncml or items, not both"))
    elif "syncml" in obj:
        items = _syncml_items(obj["syncml"], errors)
    elif "items" in obj:
        items = _json_items(obj["items"], errors)
    else:
        errors.append(FieldError("items", "required (or give syncml)"))
    if not errors and not items:
        errors.append(FieldError("items", "must not be empty"))
    if len(items) > _MAX_ITEMS:
        errors.append(FieldError("items", f"at most {_MAX_ITEMS} items"))
    seen: dict[str, int] = {}
    for index, item in enumerate(items):
        where = seen.setdefault(item.target, index)
        if where != index:
            # Windows refuses an Atomic that writes one node twice.
            errors.append(FieldError(f"items[{index}].target", f"{item.target} is already items[{where}]"))
        for found in _VARIABLE_RE.findall(item.data or ""):
            if found not in VARIABLES:
                errors.append(
                    FieldError(
                        f"items[{index}].data",
                        f"unknown variable {found}; known: {', '.join(sorted(VARIABLES))}",
                    )
                )
    if errors:
        raise ProfileRequestError(errors)
    assert isinstance(given, str)
    frozen = tuple(items)
    return Profile(given, profile_version(frozen), frozen)


def _json_items(raw: object, errors: list[FieldError]) -> list[ProfileItem]:
    if not isinstance(raw, list):
        errors.append(FieldError("items", "must be a list of items"))
        return []
    items: list[ProfileItem] = []
    for index, entry in enumerate(raw):
        name = f"items[{index}]"
        if not isinstance(entry, dict):
            errors.append(FieldError(name, "must be an object with verb, target, format, type, data"))
            continue
        verb = entry.get("verb", "Replace")
        if verb not in PROFILE_VERBS:
            errors.append(FieldError(f"{name}.verb", "must be Replace or Add"))
            continue
        item = _checked({k: v for k, v in entry.items() if k != "verb"}, name, verb, errors)
        if item is not None:
            items.append(item)
    return items


def _syncml_items(raw: object, errors: list[FieldError]) -> list[ProfileItem]:
    if not isinstance(raw, str) or not raw.strip():
        errors.append(FieldError("syncml", "must be a non-empty string of SyncML commands"))
        return []
    try:
        commands = parse_commands_fragment(raw)
    except ValueError as e:
        errors.append(FieldError("syncml", str(e)))
        return []
    if len(commands) == 1 and commands[0].verb == "Atomic":
        # mdmd sends every profile as one Atomic anyway.
        commands = commands[0].children
    items: list[ProfileItem] = []
    for index, cmd in enumerate(commands):
        name = f"syncml command {index + 1} ({cmd.verb})"
        if cmd.verb == "Atomic":
            errors.append(FieldError("syncml", f"{name}: an Atomic inside another is not allowed"))
            continue
        if cmd.verb not in PROFILE_VERBS:
            errors.append(
                FieldError("syncml", f"{name}: a profile holds Replace and Add only, not {cmd.verb}")
            )
            continue
        for item in cmd.items:
            raw_item: dict[str, object] = {"target": item.target}
            if item.meta is not None and item.meta.format is not None:
                raw_item["format"] = item.meta.format
            if item.meta is not None and item.meta.type is not None:
                raw_item["type"] = item.meta.type
            if item.data is not None:
                raw_item["data"] = item.data
            checked = _checked(raw_item, f"items[{len(items)}]", cmd.verb, errors)
            if checked is not None:
                items.append(checked)
    return items


def _checked(raw: Mapping[str, object], name: str, verb: str, errors: list[FieldError]) -> ProfileItem | None:
    item = check_item(dict(raw), name, verb, errors)
    if item is None:
        return None
    assert item.target is not None
    meta = item.meta
    return ProfileItem(
        verb=verb,
        target=item.target,
        format=meta.format if meta is not None else None,
        type=meta.type if meta is not None else None,
        data=item.data,
    )


# --- delivery ---


@dataclass(frozen=True, slots=True)
class DeviceVars:
    """What the per-device variables stand for."""

    device_id: str
    hostname: str
    serial: str


def _substitute(items: Iterable[ProfileItem], device: DeviceVars) -> tuple[ProfileItem, ...]:
    values = {name: getattr(device, attr) for name, attr in VARIABLES.items()}

    def one(match: re.Match[str]) -> str:
        return str(values.get(match.group(0), match.group(0)))

    return tuple(
        item if item.data is None else replace(item, data=_VARIABLE_RE.sub(one, item.data)) for item in items
    )


def _item(item: ProfileItem) -> Item:
    meta = Meta(format=item.format, type=item.type) if item.format or item.type else None
    return Item(target=item.target, meta=meta, data=item.data)


def profile_syncml(items: Iterable[ProfileItem], *, replace_targets: frozenset[str] = frozenset()) -> str:
    """The profile as the one Atomic mdmd sends (one command per item, so
    that each node's status names it); *replace_targets* are sent as
    Replace whatever their verb."""
    children = tuple(
        Command(
            verb="Replace" if item.target in replace_targets else item.verb, cmd_id="", items=(_item(item),)
        )
        for item in items
    )
    return serialize_command(Command(verb="Atomic", cmd_id="", children=children))


def _get(target: str) -> str:
    return serialize_command(Command(verb="Get", cmd_id="", items=(Item(target=target),)))


def _delete(target: str) -> str:
    return serialize_command(Command(verb="Delete", cmd_id="", items=(Item(target=target),)))


def values_match(fmt: str | None, sent: str | None, found: str | None) -> bool:
    """Whether the value read back is the one sent, as Windows returns it:
    integers by value, booleans and text without regard to case, base64 by
    the bytes it encodes."""
    if sent is None or found is None:
        return (sent or "") == (found or "")
    sent, found = sent.strip(), found.strip()
    if fmt == "int":
        try:
            return int(sent) == int(found)
        except ValueError:
            return False
    if fmt == "b64":
        try:
            return base64.b64decode("".join(sent.split())) == base64.b64decode("".join(found.split()))
        except (binascii.Error, ValueError):
            return False
    if fmt == "float":
        try:
            return float(sent) == float(found)
        except ValueError:
            return False
    return sent.casefold() == found.casefold()


# --- per-device records ---


@dataclass(frozen=True, slots=True)
class AppliedItem:
    """One node as it was sent to the device (variables replaced)."""

    target: str
    format: str | None
    data: str | None
    type: str | None = None


@dataclass(frozen=True, slots=True)
class DeviceProfile:
    """One device's record of one profile."""

    profile: str
    version: str
    state: str
    status: int | None = None
    detail: str | None = None
    # "apply" or "remove": what the last failure was about.
    mode: str = "apply"
    # Failed attempts of this version (apply) or of the removal.
    attempts: int = 0
    verified_at: float | None = None
    updated_at: float = 0.0
    applied: tuple[AppliedItem, ...] = ()
    # LocURIs whose Get (or Delete) is still awaited.
    awaiting: frozenset[str] = frozenset()
    # Add items the device already had (418): sent as Replace from now on.
    as_replace: frozenset[str] = frozenset()

    def record_json(self) -> str:
        return json.dumps(
            {
                "mode": self.mode,
                "applied": [[a.target, a.format, a.data, a.type] for a in self.applied],
                "awaiting": sorted(self.awaiting),
                "as_replace": sorted(self.as_replace),
            },
            separators=(",", ":"),
            ensure_ascii=False,
        )

    @staticmethod
    def stored(
        *,
        profile: str,
        version: str,
        state: str,
        status: int | None,
        detail: str | None,
        attempts: int,
        verified_at: float | None,
        updated_at: float,
        record: str,
    ) -> DeviceProfile:
        """A record as the store keeps it (*record*: :meth:`record_json`)."""
        extra = json.loads(record)
        return DeviceProfile(
            profile=profile,
            version=version,
            state=state,
            status=status,
            detail=detail,
            mode=extra["mode"],
            attempts=attempts,
            verified_at=verified_at,
            updated_at=updated_at,
            applied=tuple(AppliedItem(*a) for a in extra["applied"]),
            awaiting=frozenset(extra["awaiting"]),
            as_replace=frozenset(extra["as_replace"]),
        )


@dataclass(frozen=True, slots=True)
class ProfileCommand:
    """What a queued command does for a profile (until it is answered)."""

    command_uuid: str
    profile: str
    version: str
    purpose: str  # apply | verify | drift | remove | cleanup
    loc_uri: str | None = None


@dataclass(frozen=True, slots=True)
class ProfileEvent:
    """One step of a device's history of a profile."""

    profile: str
    version: str
    state: str
    status: int | None
    detail: str | None
    at: float


@dataclass(frozen=True, slots=True)
class ProfileSettings:
    verify_interval: float = 24 * 3600.0  # seconds
    max_retries: int = 3


@dataclass(frozen=True, slots=True)
class ProfileStep:
    """What one message changed of a device's profiles; committed with the
    message's :class:`~mdmd.management.ManagementStep`."""

    records: tuple[DeviceProfile, ...] = ()
    links: tuple[ProfileCommand, ...] = ()
    done: tuple[str, ...] = ()  # command uuids whose link is no longer needed
    events: tuple[ProfileEvent, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.records or self.links or self.done or self.events)


@dataclass
class ProfilePlanner:
    """Plans one device message's profile work (see the module docstring).
    Not thread-safe, used once: build a new one per message."""

    device: DeviceVars
    records: dict[str, DeviceProfile]
    links: dict[str, ProfileCommand]
    now: float
    settings: ProfileSettings
    new_uuid: Callable[[], str]
    _changed: set[str] = field(default_factory=set)
    _new_links: list[ProfileCommand] = field(default_factory=list)
    _done: list[str] = field(default_factory=list)
    _events: list[ProfileEvent] = field(default_factory=list)

    @classmethod
    def for_device(
        cls,
        device: DeviceVars,
        records: Iterable[DeviceProfile],
        links: Iterable[ProfileCommand],
        *,
        now: float,
        settings: ProfileSettings,
        new_uuid: Callable[[], str],
    ) -> ProfilePlanner:
        return cls(
            device,
            {r.profile: r for r in records},
            {link.command_uuid: link for link in links},
            now,
            settings,
            new_uuid,
        )

    # -- bookkeeping --

    def _set(self, record: DeviceProfile, **changes: Any) -> DeviceProfile:
        old = self.records.get(record.profile)
        new = replace(record, updated_at=self.now, **changes)
        self.records[record.profile] = new
        self._changed.add(record.profile)
        if old is None or (old.state, old.version, old.status, old.detail) != (
            new.state,
            new.version,
            new.status,
            new.detail,
        ):
            self._events.append(
                ProfileEvent(new.profile, new.version, new.state, new.status, new.detail, self.now)
            )
        return new

    def _command(
        self, record: DeviceProfile, purpose: str, verb: str, body: str, loc_uri: str | None = None
    ) -> NewCommand:
        uuid = self.new_uuid()
        link = ProfileCommand(uuid, record.profile, record.version, purpose, loc_uri)
        self.links[uuid] = link
        self._new_links.append(link)
        return NewCommand(uuid, verb, body)

    def _in_flight(self) -> set[str]:
        return {link.profile for link in self.links.values()}

    # -- at the start of a session --

    def plan_session(self, desired: Iterable[Profile]) -> list[NewCommand]:
        """What the device's session starts with, profile by profile."""
        wanted = {p.name: p for p in desired}
        busy = self._in_flight()
        out: list[NewCommand] = []
        for name in sorted(set(wanted) | set(self.records)):
            if name in busy:
                continue  # its commands are queued already
            profile, record = wanted.get(name), self.records.get(name)
            if profile is not None:
                out += self._reconcile(profile, record)
            elif record is not None:
                out += self._remove(record)
        return out

    def _reconcile(self, profile: Profile, record: DeviceProfile | None) -> list[NewCommand]:
        if record is None or record.state == "removed" or record.version != profile.version:
            cleanup: list[NewCommand] = []
            if record is not None and record.state != "removed":
                # Nodes the old version set and the new one does not.
                kept = {i.target for i in profile.items}
                stale = replace(record, version=profile.version)
                cleanup = [
                    self._command(stale, "cleanup", "Delete", _delete(a.target), a.target)
                    for a in record.applied
                    if a.target not in kept
                ]
            fresh = DeviceProfile(profile.name, profile.version, "pending", as_replace=frozenset())
            return [*cleanup, self._apply(fresh, profile.items, attempts=0)]
        if record.state == "failed" and record.mode == "apply":
            if record.attempts > self.settings.max_retries:
                return []  # given up: an administrator edits the profile or the device
            return [self._apply(record, profile.items, attempts=record.attempts)]
        if record.state == "failed":  # a removal failed, the profile is wanted again
            return [self._apply(record, profile.items, attempts=0)]
        if record.state == "verified":
            due = record.verified_at is None or self.now - record.verified_at >= self.settings.verify_interval
            return self._reread(record, "drift") if due else []
        # pending, sent, verifying, drifted or removing with nothing in
        # flight: the command was lost; send the profile again.
        return [self._apply(record, profile.items, attempts=record.attempts)]

    def _apply(self, record: DeviceProfile, items: Iterable[ProfileItem], *, attempts: int) -> NewCommand:
        concrete = _substitute(items, self.device)
        applied = tuple(AppliedItem(i.target, i.format, i.data, i.type) for i in concrete)
        record = self._set(
            record,
            state="pending",
            status=None,
            detail=None,
            mode="apply",
            attempts=attempts,
            applied=applied,
            awaiting=frozenset(),
        )
        body = profile_syncml(concrete, replace_targets=record.as_replace)
        return self._command(record, "apply", "Atomic", body)

    def _reread(self, record: DeviceProfile, purpose: str) -> list[NewCommand]:
        targets = [a.target for a in record.applied]
        if not targets:
            return []
        record = self._set(record, awaiting=frozenset(targets))
        return [self._command(record, purpose, "Get", _get(t), t) for t in targets]

    def _remove(self, record: DeviceProfile) -> list[NewCommand]:
        if record.state == "removed":
            return []
        if (
            record.state == "failed"
            and record.mode == "remove"
            and record.attempts > self.settings.max_retries
        ):
            return []
        if not record.applied:
            self._set(record, state="removed", status=None, detail=None, awaiting=frozenset())
            return []
        attempts = record.attempts if record.mode == "remove" else 0
        record = self._set(
            record,
            state="removing",
            status=None,
            detail=None,
            mode="remove",
            attempts=attempts,
            awaiting=frozenset(a.target for a in record.applied),
        )
        return [
            self._command(record, "remove", "Delete", _delete(a.target), a.target) for a in record.applied
        ]

    # -- as the device answers --

    def followups(self, uuid: str, code: int, results: Sequence[CommandResult]) -> list[NewCommand]:
        """The :data:`~mdmd.management.FollowUps` hook: record the outcome of
        a profile's command and return what follows in this session."""
        link = self.links.get(uuid)
        if link is None:
            return []
        self._done.append(uuid)
        record = self.records.get(link.profile)
        if record is None or record.version != link.version:
            return []  # an answer to an older version's command
        if link.purpose == "apply":
            return self._applied(record, code, results)
        if link.purpose in ("verify", "drift"):
            return self._read_back(record, link, code, results)
        if link.purpose == "remove":
            self._removed(record, link, code)
        return []

    def _applied(
        self, record: DeviceProfile, code: int, results: Sequence[CommandResult]
    ) -> list[NewCommand]:
        if 200 <= code < 300:
            record = self._set(record, state="verifying", status=code, detail=None, attempts=0)
            return self._reread(record, "verify")
        failing = [
            r
            for r in results
            if r.kind == "status"
            and r.cmd != "Atomic"
            and r.status is not None
            and r.status not in (200, 216)
        ]
        already = {r.loc_uri for r in failing if r.status == 418 and r.cmd == "Add" and r.loc_uri}
        if failing and len(already) == len(failing):
            # Windows' 418: the node exists; Replace sets it (not a retry).
            record = self._set(record, as_replace=record.as_replace | already, detail="sent again as Replace")
            items = [ProfileItem("Add", a.target, a.format, a.type, a.data) for a in record.applied]
            return [self._resend(record, items)]
        first = failing[0] if failing else None
        status = first.status if first is not None else code
        if failing:
            detail = "; ".join(f"{r.loc_uri or r.cmd}: {describe_status(r.status)}" for r in failing)
        else:
            detail = f"Atomic: {describe_status(code)}"
        self._set(record, state="failed", status=status, detail=detail, attempts=record.attempts + 1)
        return []

    def _resend(self, record: DeviceProfile, items: Iterable[ProfileItem]) -> NewCommand:
        # The applied items are already concrete (variables replaced).
        body = profile_syncml(items, replace_targets=record.as_replace)
        record = self._set(record, state="pending", awaiting=frozenset())
        return self._command(record, "apply", "Atomic", body)

    def _read_back(
        self, record: DeviceProfile, link: ProfileCommand, code: int, results: Sequence[CommandResult]
    ) -> list[NewCommand]:
        target = link.loc_uri or ""
        sent = next((a for a in record.applied if a.target == target), None)
        awaiting = record.awaiting - {target}
        if sent is None:
            self._set(record, awaiting=awaiting)
            return []
        found = next((r for r in results if r.kind == "results"), None)
        if code == 200 and found is not None and not values_match(sent.format, sent.data, found.data):
            shown = (found.data or "")[:200]
            detail = f"{target}: sent {sent.data!r}, the device has {shown!r}"
            if link.purpose == "drift":
                # Changed on the device since it was verified: record the
                # drift, then put the profile back.
                record = self._set(record, state="drifted", status=None, detail=detail, awaiting=frozenset())
                items = [ProfileItem("Replace", a.target, a.format, a.type, a.data) for a in record.applied]
                return [
                    self._resend(
                        replace(record, as_replace=frozenset(a.target for a in record.applied)), items
                    )
                ]
            self._set(
                record,
                state="failed",
                status=None,
                detail=detail,
                awaiting=frozenset(),
                attempts=record.attempts + 1,
            )
            return []
        if code != 200 and code not in _UNREADABLE:
            self._set(
                record,
                state="failed",
                status=code,
                detail=f"{target}: read back: {describe_status(code)}",
                awaiting=frozenset(),
                attempts=record.attempts + 1,
            )
            return []
        note = record.detail
        if code in _UNREADABLE:
            note = f"{target}: not readable back ({describe_status(code)}); verified by the device's status"
        if record.state in ("failed", "drifted", "pending"):
            return []  # already decided by another answer in this round
        if awaiting:
            self._set(record, awaiting=awaiting, detail=note)
        else:
            self._set(record, state="verified", awaiting=frozenset(), verified_at=self.now, detail=note)
        return []

    def _removed(self, record: DeviceProfile, link: ProfileCommand, code: int) -> None:
        if record.state != "removing":
            return
        target = link.loc_uri or ""
        if code not in (200, 404):  # 404: already gone, as the removal wants
            self._set(
                record,
                state="failed",
                status=code,
                detail=f"{target}: {describe_status(code)}",
                awaiting=frozenset(),
                attempts=record.attempts + 1,
            )
            return
        awaiting = record.awaiting - {target}
        if awaiting:
            self._set(record, awaiting=awaiting)
        else:
            self._set(record, state="removed", status=None, detail=None, awaiting=frozenset(), applied=())

    # -- after the message --

    def finish(self, step: ManagementStep) -> ProfileStep:
        """What to commit: records changed, links made and no longer needed,
        history.  Marks the profiles whose Atomic left in this message as
        sent, and those the server could not send as failed."""
        sent = {uuid for uuid, _, _ in step.sent}
        for uuid in sent:
            link = self.links.get(uuid)
            record = self.records.get(link.profile) if link is not None else None
            if (
                link is not None
                and record is not None
                and link.purpose == "apply"
                and record.state == "pending"
            ):
                self._set(record, state="sent")
        for uuid, code in step.failed:
            link = self.links.get(uuid)
            record = self.records.get(link.profile) if link is not None else None
            if link is None or record is None:
                continue
            self._done.append(uuid)
            if link.version == record.version and link.purpose != "cleanup":
                self._set(
                    record,
                    state="failed",
                    status=code,
                    detail=f"not sent: {describe_status(code)}",
                    awaiting=frozenset(),
                    attempts=record.attempts + 1,
                )
        return ProfileStep(
            records=tuple(self.records[name] for name in sorted(self._changed)),
            links=tuple(self._new_links),
            done=tuple(dict.fromkeys(self._done)),
            events=tuple(self._events),
        )
