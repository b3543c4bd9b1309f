"""Log output: twistd's text lines, or one JSON object per line
(``[mdmd] log_format = json``) for a log pipeline.

Every mdmd log event carries its facts as fields beside the message
(twisted.logger); the JSON form keeps the ones an operator filters on:
``time`` (ISO 8601 UTC), ``level``, ``namespace``, ``message`` (the text
line), and when the event has them ``device_id``, ``session``, ``msgid``,
``client`` (address), ``request_id``, ``duration_ms``, ``listener``,
``method``, ``path``, ``status``, ``admin`` (token name), ``worker`` and
``traceback``.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import IO, Any, Final

from twisted.logger import FileLogObserver, ILogObserver, formatEvent

__all__ = ["json_line", "json_observer"]

# event field -> JSON key
_FIELDS: Final = {
    "device_id": "device_id",
    "session": "session",
    "session_id": "session",
    "msgid": "msgid",
    "msg_id": "msgid",
    "client": "client",
    "request_id": "request_id",
    "duration_ms": "duration_ms",
    "listener": "listener",
    "method": "method",
    "path": "path",
    "status": "status",
    "admin": "admin",
    "command_uuid": "command_uuid",
}


def _plain(value: object) -> object:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def json_line(event: dict[str, Any], worker: int | None = None) -> str:
    """One event as one line of JSON."""
    level = event.get("log_level")
    when = event.get("log_time")
    obj: dict[str, object] = {
        "time": None
        if when is None
        else datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": getattr(level, "name", None),
        "namespace": event.get("log_namespace"),
        "message": formatEvent(event),
    }
    for field, key in _FIELDS.items():
        value = event.get(field)
        if value is not None and key not in obj:
            obj[key] = _plain(value)
    if worker is not None:
        obj["worker"] = worker
    failure = event.get("log_failure")
    if failure is not None:
        obj["traceback"] = failure.getTraceback()
    # One line whatever the message holds: json.dumps escapes newlines.
    return json.dumps(obj, default=str, ensure_ascii=False) + "\n"


def json_observer(stream: IO[str], worker: int | None = None) -> ILogObserver:
    return FileLogObserver(stream, lambda event: json_line(event, worker))
