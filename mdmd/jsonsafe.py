"""One hardened JSON reader for every untrusted JSON body mdmd reads.

Every JSON request (the orbit agent API, the admin API, the orbit token
inside an MS-MDE2 enrollment request) goes through
:func:`parse_untrusted_json`, as every XML document goes through
:mod:`mdmd.xmlsafe`.  The rules, and why:

* At most *max_bytes* bytes (:data:`MAX_BYTES` unless the caller says less),
  checked before anything is decoded.
* Valid UTF-8 (RFC 8259 section 8.1), decoded strictly by mdmd itself:
  ``json.loads`` given bytes would also guess UTF-16 and UTF-32, and the
  encoded surrogates ``ED A0 80`` are not UTF-8.
* Nesting no deeper than :data:`MAX_DEPTH`, measured by a linear scan of the
  bytes *before* ``json.loads`` runs (see :func:`_deeper_than`).  The standard parser recurses once per
  level, so a body of ``[`` x 100,000 would otherwise end in
  ``RecursionError`` deep inside it (a 500), and catching that relies on
  the interpreter's recursion limit being lower than the C stack.
* No lone surrogates in any decoded string, keys included: ``"\\ud800"``
  is valid JSON syntax but no Unicode text, and it fails later wherever the
  string is encoded (hashing, SQLite, logging), far from the input check.
* No ``NaN`` or ``Infinity``, which Python accepts and JSON does not.
* An object at the top: every mdmd JSON request is one.

The caller answers :class:`JSONInputError` with a 400 in its own error
shape; ``str(err)`` is a short reason that quotes nothing from the body and
reads after "the request body is" ("not valid JSON: ...", "not a JSON
object", ...).
"""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["MAX_BYTES", "MAX_DEPTH", "JSONInputError", "parse_untrusted_json"]

#: Deepest nesting of arrays and objects accepted (the top object is depth 1).
#: The deepest legitimate request, an admin command, is 3 deep.
MAX_DEPTH = 32

#: Largest body accepted when the caller names no smaller bound.
MAX_BYTES = 1024 * 1024


class JSONInputError(ValueError):
    """The body is not acceptable JSON.  ``str(err)`` is a short, safe reason
    that completes "the request body is"; *field* names the member at fault
    when there is one (``items[0].target``), in the admin API's notation."""

    def __init__(self, reason: str, field: str | None = None) -> None:
        super().__init__(reason)
        self.field = field


_NOT_BRACKET = bytes(sorted(set(range(256)) - set(b"[]{}")))
_OPENERS = frozenset(b"[{")
# Only a \uD800-\uDFFF escape can put a surrogate into a decoded string (the
# strict UTF-8 decoding refuses encoded ones); a pair decodes to one
# character above U+FFFF, so any surrogate left over is a lone one.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_NAME = re.compile(r"[A-Za-z0-9_]{1,64}", re.ASCII)
_SHOWN_KEY = 66


def _deeper_than(data: bytes, limit: int) -> bool:
    """True when arrays and objects in *data* nest deeper than *limit*.

    Brackets inside string literals are skipped.  For every prefix of the
    input that is valid JSON the scan sees exactly the brackets ``json.loads``
    descends into, and ``json.loads`` stops at the first error, so the
    depth it reaches is never more than the depth measured here.
    """
    # Drop escaped backslashes, then escaped quotes: what is left of the
    # quotes delimits the string literals, and every other piece lies outside
    # them.  The first backslash of a run always starts an escape (only a
    # backslash makes the character after it part of one), so pairing them
    # from the left matches the parser.  All of it runs in C, in linear time;
    # a backslash outside a string is a syntax error, where the parser stops.
    unescaped = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    outside = b"".join(unescaped.split(b'"')[::2])
    brackets = outside.translate(None, _NOT_BRACKET)
    if len(brackets.translate(None, b"]}")) <= limit:
        return False  # not enough openers to get that deep (every real request)
    depth = 0
    for byte in brackets:
        if byte in _OPENERS:
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def _refuse_constant(name: str) -> Any:
    raise JSONInputError(f"not valid JSON: {name} is not a JSON value")


def _member(parent: str, key: str) -> str:
    if _NAME.fullmatch(key):
        return f"{parent}.{key}" if parent else key
    # Any other key is shown as a JSON string, ASCII only and cut short:
    # the name goes into a log line.
    return f"{parent}[{json.dumps(key)[:_SHOWN_KEY]}]"


def _lone_surrogate_at(value: dict[str, Any]) -> str | None:
    """Where the first string holding a lone surrogate is, or None."""
    # Iterative: the depth is bounded already, but a list of a million
    # strings must not cost a million stack frames either.  A key is checked
    # before its value is queued, so every name in a path is clean text.
    pending: list[tuple[str, object]] = [("", value)]
    while pending:
        path, item = pending.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return path
        elif isinstance(item, dict):
            for key, member in item.items():
                if _SURROGATE.search(key):
                    return f"a key in {path or 'the top object'}"
                pending.append((_member(path, key), member))
        elif isinstance(item, list):
            pending.extend((f"{path}[{n}]", member) for n, member in enumerate(item))
    return None


def parse_untrusted_json(data: bytes, *, max_bytes: int = MAX_BYTES) -> dict[str, Any]:
    """Parse *data*, a JSON object, and return it.

    Raises :class:`JSONInputError` for a body over *max_bytes*, invalid
    UTF-8, nesting deeper than :data:`MAX_DEPTH`, a syntax error, ``NaN`` or
    ``Infinity``, a lone surrogate in any string, and a top-level value that
    is not an object.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise JSONInputError("not bytes")
    raw = bytes(data)
    if len(raw) > max_bytes:
        raise JSONInputError(f"larger than {max_bytes} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JSONInputError(f"not valid JSON: not UTF-8 (byte {e.start})") from None
    if _deeper_than(raw, MAX_DEPTH):
        raise JSONInputError(f"nested deeper than {MAX_DEPTH} levels")
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as e:
        raise JSONInputError(f"not valid JSON: {e.msg} (line {e.lineno} column {e.colno})") from None
    except JSONInputError:
        raise
    except ValueError:  # e.g. an integer of more digits than int() accepts
        raise JSONInputError("not valid JSON: a number out of range") from None
    if not isinstance(value, dict):
        raise JSONInputError("not a JSON object")
    where = _lone_surrogate_at(value) if _SURROGATE_ESCAPE.search(raw) else None
    if where is not None:
        raise JSONInputError(
            f"not Unicode text: {where} holds a lone surrogate (U+D800 to U+DFFF)",
            None if where.startswith("a key in ") else where,
        )
    return value
