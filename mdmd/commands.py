"""Administrators' commands, pure: a queue request (JSON) checked completely
and turned into the SyncML mdmd stores and later sends.

Commands are validated completely before anything is stored (no poison
commands, docs/windows-clients.md): what reaches the queue is exactly what
``parse_commands_fragment`` reads back when the command is sent.  The item
rules (:func:`check_item`) serve configuration profiles too.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Final

from mdmd.syncml import (
    Command,
    Item,
    Meta,
    check_locuri,
    parse_commands_fragment,
    serialize_command,
    walk,
)

__all__ = [
    "FORMATS",
    "ITEM_VERBS",
    "CommandRequestError",
    "FieldError",
    "QueuedCommand",
    "check_item",
    "command_targets",
    "parse_command_request",
    "without_ids",
]

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
        body = serialize_command(without_ids(cmd))
        # Belt and braces: store only what the sender will read back as
        # this very command (a difference would change it behind the
        # administrator's back, or poison the queue).
        stored = parse_commands_fragment(body)
    except ValueError as e:
        raise CommandRequestError([FieldError("base", f"cannot be stored as SyncML: {e}")]) from None
    if stored != (without_ids(cmd),):
        raise CommandRequestError([FieldError("base", "the command does not survive storage as SyncML")])
    return QueuedCommand(cmd.verb, body)


def without_ids(cmd: Command) -> Command:
    return replace(cmd, cmd_id="", children=tuple(without_ids(c) for c in cmd.children))


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
    items = [check_item(raw, f"items[{i}]", verb, errors) for i, raw in enumerate(raw_items)]
    if verb is None or any(item is None for item in items):
        return None
    return Command(verb=verb, cmd_id="", items=tuple(item for item in items if item is not None))


def check_item(raw: object, name: str, verb: str | None, errors: list[FieldError]) -> Item | None:
    """One item of a request (target, format, type, data) checked for *verb*;
    None (and the problems appended to *errors*) when it is wrong."""
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


def command_targets(body: str) -> list[str]:
    """The LocURIs a stored command addresses (for the audit log)."""
    return [
        item.target
        for cmd in parse_commands_fragment(body)
        for c in walk(cmd)
        for item in c.items
        if item.target is not None
    ]
