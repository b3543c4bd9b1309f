"""The device list on PostgreSQL: the filters of
:mod:`mdmd.store.sqlite_devices` (their predicates are plain SQL), keyset
paged along the sort order's index, with PostgreSQL's planner choosing
between walking that index and reading a selective filter's rows first.

What differs from SQLite's: no rowids or index hints, and the search. SQLite
compares with ``COLLATE NOCASE`` (ASCII letters folded); here the search is
a range of ``lower(column)`` in byte order, which the ``lower()`` indexes of
:mod:`mdmd.store.postgresql_schema` serve, its candidate devices selected
once (a semi-join) rather than tested row by row.
"""

from __future__ import annotations

import sqlite3
from typing import Any, Final, cast

from mdmd.store.engine import SQLConnection
from mdmd.store.records import DevicePage, DeviceQuery
from mdmd.store.sqlite_devices import (
    DEVICE_COLUMNS,
    SEARCH_CANDIDATE_LIMIT,
    conditions,
    current_certificates,
    device_record,
    pending_actions,
)

__all__ = ["device_page"]

# sort -> the expression ordered by (an index holds it, then the device ID)
_SORTS: Final = {"enrolled_at": "d.enrolled_at", "last_seen": "coalesce(d.last_seen, 0)"}
# Above every character: every string that starts with p lies in [p, p + _TOP).
_TOP: Final = "\U0010ffff"


def _ascii_lower(text: str) -> str:
    """What NOCASE folds: ASCII letters only."""
    return "".join(chr(ord(c) + 32) if "A" <= c <= "Z" else c for c in text)


def _prefix(column: str) -> str:
    return f'lower({column}) COLLATE "C" >= ? AND lower({column}) COLLATE "C" < ?'


_HOST_COLUMNS: Final = ("h.hostname", "h.hardware_serial", "h.hardware_uuid")


def _search(conn: SQLConnection, search: str) -> tuple[str, list[object]]:
    """The search's condition.  Its candidate devices, when they are few
    (counted with a bounded probe, on the lower() indexes), are selected
    once; when many match (a short prefix), each row along the sort order
    is tested instead, which finds a page's worth at once."""
    low = _ascii_lower(search)
    bounds: list[object] = [low, low + _TOP]
    candidates = " UNION ALL ".join(
        [
            f"SELECT device_id FROM devices WHERE {_prefix('device_id')}",
            f"SELECT device_id FROM devices WHERE {_prefix('device_name')}",
            *(
                f"SELECT d2.device_id FROM hosts h JOIN devices d2 ON d2.host_id = h.id WHERE {_prefix(c)}"
                for c in _HOST_COLUMNS
            ),
        ]
    )
    (count,) = conn.execute(
        f"SELECT count(*) FROM ({candidates} LIMIT ?) c", [*bounds * 5, SEARCH_CANDIDATE_LIMIT + 1]
    ).fetchone()
    if count <= SEARCH_CANDIDATE_LIMIT:
        return f"d.device_id IN ({candidates})", bounds * 5
    hosts = " OR ".join(f"({_prefix(c)})" for c in _HOST_COLUMNS)
    row = (
        f"({_prefix('d.device_id')}) OR ({_prefix('d.device_name')})"
        f" OR EXISTS (SELECT 1 FROM hosts h WHERE h.id = d.host_id AND ({hosts}))"
    )
    return f"({row})", bounds * 5


def device_page(
    conn: SQLConnection, query: DeviceQuery, limit: int, after: tuple[float, str] | None
) -> DevicePage:
    key = _SORTS[query.sort]
    direction = "DESC" if query.descending else "ASC"
    beyond = "<" if query.descending else ">"
    where: list[str] = []
    params: list[object] = []
    for condition in conditions(query):
        if condition.name == "search":
            continue  # SQLite's NOCASE ranges; ours below
        where.append(f"({condition.where})")
        params += condition.params
    if query.search:
        clause, bound = _search(conn, query.search)
        where.append(clause)
        params += bound
    if after is not None:
        where.append(f"({key}, d.device_id) {beyond} (?, ?)")
        params += after
    sql = (
        f"SELECT {DEVICE_COLUMNS}, {key} AS sort_key FROM devices d"
        f" WHERE {' AND '.join(where) or 'TRUE'}"
        f" ORDER BY {key} {direction}, d.device_id {direction} LIMIT ?"
    )
    rows: list[Any] = conn.execute(sql, [*params, limit + 1]).fetchall()
    more = len(rows) > limit
    rows = rows[:limit]
    position = (rows[-1]["sort_key"], rows[-1]["device_id"]) if more else None
    ids = [r["device_id"] for r in rows]
    # The same statements as SQLite's (plain SQL): a connection is a connection.
    same = cast(sqlite3.Connection, conn)
    current = current_certificates(same, ids)
    pending = pending_actions(same, ids)
    return DevicePage(
        tuple(device_record(r, current.get(r["device_id"]), pending.get(r["device_id"], ())) for r in rows),
        position,
    )
