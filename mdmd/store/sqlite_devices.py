"""The device list on SQLite: filters as SQL, run on indexes, keyset-paged.

Each filter of a :class:`~mdmd.store.records.DeviceQuery` becomes one
:class:`Condition`: a predicate over ``d`` (the ``devices`` table) checked on
every listed row and, when an index finds the filter's devices directly, a
*candidates* query selecting their rowids.  A page is then read one of two
ways, whichever touches fewer rows:

- some filter's candidates are few (at most :data:`CANDIDATE_LIMIT`, counted
  with a bounded probe; the search's limit is higher, since checking it
  along the sort order costs a host lookup per row): those rows are read by
  rowid, checked against every filter and sorted;
- otherwise the index of the sort order is walked from the page's position,
  each row checked against every filter, until the page is full (the filters
  all match many devices, so a page fills quickly).

Pages continue from a position, (sort value, device ID), never from an
OFFSET, so page 10,000 costs what page 1 does.

A new filter is one more :class:`Condition` in :func:`conditions`: its
predicate, and its candidates if an index finds its devices (the device
group filter is one).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from mdmd.actions import OPEN_STATES
from mdmd.store.records import CertificateRecord, DevicePage, DeviceQuery, DeviceRecord

__all__ = [
    "CANDIDATE_LIMIT",
    "DEVICE_COLUMNS",
    "Condition",
    "conditions",
    "device_page",
    "device_record",
    "page_sql",
]

#: A filter whose devices an index finds, and that matches at most this
#: many, is read by its candidates: reading and sorting this many rows costs
#: about what walking the sort order to fill a page costs when one device
#: in 200 matches (measured on a million devices, bench/RESULTS.md).
CANDIDATE_LIMIT: Final = 5000
#: The search is checked along the sort order with a lookup of the agent
#: host per row, which makes walking dearer: candidates pay up to here.
SEARCH_CANDIDATE_LIMIT: Final = 10000
OPEN_ACTION_STATES: Final = ", ".join(f"'{state}'" for state in OPEN_STATES)

#: Every column of a device record (not the enrollment context, which only
#: the device's own page would need).
DEVICE_COLUMNS: Final = (
    "d.device_id, d.host_id, d.hw_dev_id, d.enrollment_type, d.device_name, d.os_version, d.state, "
    "d.hw_dev_id_collision, d.enrolled_at, d.unenrolled_at, d.last_seen, d.inventory, d.lifecycle"
)

# sort -> (the expression ordered by, the index that holds it in that order)
_SORTS: Final = {
    "enrolled_at": ("d.enrolled_at", "devices_by_enrolled_at"),
    "last_seen": ("coalesce(d.last_seen, 0)", "devices_by_last_seen"),
}

# Above every character: "prefix" <= s < "prefix" + _TOP for every s that
# starts with prefix (NOCASE folds ASCII letters only; so does the search).
_TOP: Final = "\U0010ffff"
_HOST_DEVICES: Final = "SELECT d.rowid FROM hosts h JOIN devices d ON d.host_id = h.id"


@dataclass(frozen=True, slots=True)
class Condition:
    """One filter of the device list (see the module's docstring)."""

    name: str
    where: str
    params: tuple[object, ...]
    candidates: str | None = None
    candidate_params: tuple[object, ...] = ()
    # Rows as many as the candidates, from an index alone (when selecting the
    # candidates' rowids costs a lookup each), with the same parameters.
    estimate: str | None = None
    # At most this many candidates are read (None: CANDIDATE_LIMIT).
    candidate_limit: int | None = None


def _prefix(column: str) -> str:
    return f"({column} >= ? COLLATE NOCASE AND {column} < ? COLLATE NOCASE)"


def conditions(query: DeviceQuery) -> list[Condition]:
    """The conditions of *query*'s filters (none for no filter)."""
    found: list[Condition] = []
    if query.state == "unenrolled":
        found.append(
            Condition(
                "state",
                "d.state = 'unenrolled'",
                (),
                "SELECT rowid FROM devices WHERE state = 'unenrolled'",
            )
        )
    elif query.state is not None:
        # Nearly every device: walking the order finds them at once.
        found.append(Condition("state", "d.state = ?", (query.state,)))
    if query.last_seen_before is not None:
        t = query.last_seen_before
        found.append(
            Condition(
                "last_seen_before",
                "coalesce(d.last_seen, 0) < ?",
                (t,),
                "SELECT rowid FROM devices WHERE coalesce(last_seen, 0) < ?",
                (t,),
            )
        )
    if query.last_seen_after is not None:
        t = query.last_seen_after
        found.append(
            Condition(
                "last_seen_after",
                "coalesce(d.last_seen, 0) >= ?",
                (t,),
                "SELECT rowid FROM devices WHERE coalesce(last_seen, 0) >= ?",
                (t,),
            )
        )
    if query.os_version is not None:
        v = query.os_version
        # The version itself, or a revision of it: "10.0.22631" matches
        # "10.0.22631.4460" ("/" follows "." in ASCII).
        revisions = (v + ".", v + "/")
        found.append(
            Condition(
                "os_version",
                "(d.os_version = ? OR (d.os_version >= ? AND d.os_version < ?))",
                (v, *revisions),
                "SELECT rowid FROM devices WHERE os_version = ?"
                " UNION ALL SELECT rowid FROM devices WHERE os_version >= ? AND os_version < ?",
                (v, *revisions),
            )
        )
    if query.cert_expiring_before is not None:
        t = query.cert_expiring_before
        # The device's latest-expiring valid certificate: a device whose
        # certificate was renewed is not "expiring" because of its old one.
        found.append(
            Condition(
                "cert_expiring",
                "(SELECT max(c.not_after) FROM certificates c"
                " WHERE c.device_id = d.device_id AND c.revoked_at IS NULL) < ?",
                (t,),
                "SELECT d.rowid FROM certificates c JOIN devices d ON d.device_id = c.device_id"
                " WHERE c.revoked_at IS NULL AND c.not_after < ?",
                (t,),
                "SELECT 1 FROM certificates WHERE revoked_at IS NULL AND not_after < ?",
            )
        )
    if query.group == "all":
        # The built-in group of every enrolled device.
        found.append(Condition("group", "d.state = 'enrolled'", ()))
    elif query.group is not None:
        g = query.group
        found.append(
            Condition(
                "group",
                "d.device_id IN (SELECT device_id FROM group_members WHERE group_name = ?)",
                (g,),
                "SELECT d.rowid FROM group_members m JOIN devices d ON d.device_id = m.device_id"
                " WHERE m.group_name = ?",
                (g,),
                "SELECT 1 FROM group_members WHERE group_name = ?",
            )
        )
    if query.hw_dev_id_collision is not None:
        if query.hw_dev_id_collision:
            found.append(
                Condition(
                    "hw_dev_id_collision",
                    "d.hw_dev_id_collision = 1",
                    (),
                    "SELECT rowid FROM devices WHERE hw_dev_id_collision = 1",
                )
            )
        else:
            found.append(Condition("hw_dev_id_collision", "d.hw_dev_id_collision = 0", ()))
    if query.search:
        bounds = (query.search, query.search + _TOP)
        host_columns = ("h.hostname", "h.hardware_serial", "h.hardware_uuid")
        found.append(
            Condition(
                "search",
                f"{_prefix('d.device_id')} OR {_prefix('d.device_name')} OR EXISTS (SELECT 1 FROM hosts h"
                f" WHERE h.id = d.host_id AND ({' OR '.join(_prefix(c) for c in host_columns)}))",
                bounds * 5,
                " UNION ALL ".join(
                    [
                        f"SELECT rowid FROM devices WHERE {_prefix('device_id')}",
                        f"SELECT rowid FROM devices WHERE {_prefix('device_name')}",
                        *(f"{_HOST_DEVICES} WHERE {_prefix(c)}" for c in host_columns),
                    ]
                ),
                bounds * 5,
                candidate_limit=SEARCH_CANDIDATE_LIMIT,
            )
        )
    return found


def _fewest_candidates(conn: sqlite3.Connection, found: Sequence[Condition]) -> Condition | None:
    """The condition with the fewest candidates, if within its limit; each
    probe stops counting past its limit or the best so far."""
    best: Condition | None = None
    fewest: int | None = None
    for condition in found:
        if condition.candidates is None:
            continue
        limit = CANDIDATE_LIMIT if condition.candidate_limit is None else condition.candidate_limit
        bound = limit + 1 if fewest is None else min(limit + 1, fewest)
        if bound <= 0:
            continue
        counted = condition.estimate or condition.candidates
        (count,) = conn.execute(
            f"SELECT count(*) FROM ({counted} LIMIT ?)", (*condition.candidate_params, bound)
        ).fetchone()
        if count < bound:
            best, fewest = condition, count
    return best


def page_sql(
    conn: sqlite3.Connection, query: DeviceQuery, limit: int, after: tuple[float, str] | None
) -> tuple[str, list[object]]:
    """The SELECT that reads one page (*limit* + 1 rows, to know whether
    more follow), and its parameters."""
    key, index = _SORTS[query.sort]
    direction = "DESC" if query.descending else "ASC"
    beyond = "<" if query.descending else ">"
    order = f"ORDER BY {key} {direction}, d.device_id {direction} LIMIT ?"
    found = conditions(query)
    where = [f"({c.where})" for c in found]
    params: list[object] = [p for c in found for p in c.params]
    columns = f"{DEVICE_COLUMNS}, {key} AS sort_key"
    best = _fewest_candidates(conn, found)
    if best is not None:
        # Few rows: read them by rowid (NOT INDEXED still allows that), check
        # every filter and the position, sort.
        assert best.candidates is not None
        where.insert(0, f"d.rowid IN ({best.candidates})")
        params[:0] = best.candidate_params
        if after is not None:
            where.append(f"({key}, d.device_id) {beyond} (?, ?)")
            params += after
        sql = f"SELECT {columns} FROM devices AS d NOT INDEXED WHERE {' AND '.join(where) or '1'} {order}"
        return sql, [*params, limit + 1]
    # Walk the sort order's index; INDEXED BY keeps the planner from
    # preferring a filter's index that matches many rows.
    source = f"devices AS d INDEXED BY {index}"
    if after is None:
        sql = f"SELECT {columns} FROM {source} WHERE {' AND '.join(where) or '1'} {order}"
        return sql, [*params, limit + 1]
    # From a position: the rest of its sort value's devices, then the
    # values beyond it, each an index range (SQLite does not bound a range
    # by a row value over an indexed expression, and many devices can share
    # a value: never seen, enrolled in one batch).
    same = " AND ".join([*where, f"{key} = ?", f"d.device_id {beyond} ?"])
    further = " AND ".join([*where, f"{key} {beyond} ?"])
    sql = (
        f"SELECT * FROM (SELECT {columns} FROM {source} WHERE {same}"
        f" ORDER BY d.device_id {direction} LIMIT ?)"
        f" UNION ALL SELECT * FROM (SELECT {columns} FROM {source} WHERE {further} {order})"
        f" ORDER BY sort_key {direction}, device_id {direction} LIMIT ?"
    )
    return sql, [*params, *after, limit + 1, *params, after[0], limit + 1, limit + 1]


def device_page(
    conn: sqlite3.Connection, query: DeviceQuery, limit: int, after: tuple[float, str] | None
) -> DevicePage:
    sql, params = page_sql(conn, query, limit, after)
    rows = conn.execute(sql, params).fetchall()
    more = len(rows) > limit
    rows = rows[:limit]
    position = (rows[-1]["sort_key"], rows[-1]["device_id"]) if more else None
    ids = [r["device_id"] for r in rows]
    current = current_certificates(conn, ids)
    pending = pending_actions(conn, ids)
    return DevicePage(
        tuple(device_record(r, current.get(r["device_id"]), pending.get(r["device_id"], ())) for r in rows),
        position,
    )


def pending_actions(conn: sqlite3.Connection, device_ids: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """The names of each listed device's unfinished actions (one statement
    for a page, on the actions' device index)."""
    found: dict[str, list[str]] = {}
    for start in range(0, len(device_ids), 500):
        chunk = device_ids[start : start + 500]
        rows = conn.execute(
            f"""
            SELECT device_id, action FROM device_actions
            WHERE device_id IN ({",".join("?" * len(chunk))}) AND state IN ({OPEN_ACTION_STATES})
            ORDER BY created_at
            """,
            chunk,
        )
        for row in rows:
            found.setdefault(row["device_id"], []).append(row["action"])
    return {k: tuple(v) for k, v in found.items()}


def current_certificates(conn: sqlite3.Connection, device_ids: Sequence[str]) -> dict[str, CertificateRecord]:
    """Each listed device's current certificate (its newest live one), read
    through the live-certificates index: one statement for a page."""
    found: dict[str, CertificateRecord] = {}
    for start in range(0, len(device_ids), 500):
        chunk = device_ids[start : start + 500]
        rows = conn.execute(
            f"""
            SELECT * FROM certificates WHERE revoked_at IS NULL
            AND device_id IN ({",".join("?" * len(chunk))}) ORDER BY device_id, issued_at DESC, serial DESC
            """,
            chunk,
        )
        for row in rows:
            if row["device_id"] not in found:
                found[row["device_id"]] = CertificateRecord(
                    serial=row["serial"],
                    device_id=row["device_id"],
                    thumbprint=row["thumbprint"],
                    not_before=row["not_before"],
                    not_after=row["not_after"],
                    issued_at=row["issued_at"],
                    revoked_at=None,
                    renewed_from=row["renewed_from"],
                    activated_at=row["activated_at"],
                )
    return found


def device_record(
    row: sqlite3.Row, certificate: CertificateRecord | None = None, pending: tuple[str, ...] = ()
) -> DeviceRecord:
    return DeviceRecord(
        device_id=row["device_id"],
        host_id=row["host_id"],
        hw_dev_id=row["hw_dev_id"],
        enrollment_type=row["enrollment_type"],
        device_name=row["device_name"],
        os_version=row["os_version"],
        state=row["state"],
        hw_dev_id_collision=bool(row["hw_dev_id_collision"]),
        enrolled_at=row["enrolled_at"],
        unenrolled_at=row["unenrolled_at"],
        last_seen=row["last_seen"],
        inventory=json.loads(row["inventory"]),
        certificate=certificate,
        lifecycle=row["lifecycle"],
        pending_actions=pending,
    )
