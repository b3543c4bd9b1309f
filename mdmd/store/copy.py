"""Moving a fleet from SQLite to PostgreSQL (``mdmctl store copy``).

Every table of the SQLite store is copied as it is, row for row and column
for column, into an empty PostgreSQL database (migrated to the same schema
version first): devices, certificates, commands and their results, OMA-DM
sessions with their last replies and large-object pieces, profiles, groups,
and every other table of the schema.  Device certificates, session state
and node keys are rows like the others, so an enrolled device goes on
checking in with the certificate it has, and a session that was under way
goes on where it was.

The source is read in one read transaction (one consistent snapshot; stop
mdmd first, or what it writes meanwhile is not copied).  The target is
written in one transaction with PostgreSQL's COPY, the row counts compared
before COMMIT: a failure leaves it empty, and a target that is not empty is
refused before anything is written.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from mdmd.store import postgresql, postgresql_schema, sqlite_schema
from mdmd.store.records import StoreError

__all__ = ["CopyError", "CopyReport", "copy_sqlite_to_postgresql"]

#: Rows read from SQLite at a time.
_BATCH = 5000
#: Seconds between progress lines of one table.
_PROGRESS_EVERY = 2.0


class CopyError(Exception):
    """The copy cannot be made (or did not verify); nothing was written."""


@dataclass(frozen=True, slots=True)
class CopyReport:
    tables: dict[str, int]  # rows per table, in copy order
    seconds: float

    @property
    def rows(self) -> int:
        return sum(self.tables.values())


def _source_tables(conn: sqlite3.Connection) -> list[str]:
    """The SQLite store's tables, each after those it refers to."""
    names = [
        r[0]
        for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name"
        )
    ]
    needs = {
        name: {r[2] for r in conn.execute(f'PRAGMA foreign_key_list("{name}")') if r[2] != name}
        for name in names
    }
    ordered: list[str] = []
    while len(ordered) < len(names):
        ready = [n for n in names if n not in ordered and needs[n] <= set(ordered)]
        if not ready:
            raise CopyError(f"circular references between tables {sorted(set(names) - set(ordered))}")
        ordered += ready
    return ordered


def _columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [r[1] for r in conn.execute(f'PRAGMA table_info("{table}")')]


def _target_types(target: psycopg.Connection[Any]) -> dict[str, dict[str, tuple[str, bool]]]:
    """Table -> column -> (data type, identity) of the target's mdmd schema."""
    out: dict[str, dict[str, tuple[str, bool]]] = {}
    for table, column, kind, identity in target.execute(
        "SELECT table_name, column_name, data_type, is_identity FROM information_schema.columns"
        " WHERE table_schema = current_schema() AND table_name <> %s",
        (postgresql_schema.VERSION_TABLE,),
    ):
        out.setdefault(table, {})[column] = (kind, identity == "YES")
    return out


def _coercer(kind: str) -> Callable[[Any], Any]:
    """SQLite's loosely typed value as the PostgreSQL column takes it."""
    if kind == "bytea":
        return lambda v: v.encode("utf-8") if isinstance(v, str) else v
    if kind == "double precision":
        return lambda v: float(v) if isinstance(v, int) else v
    return lambda v: v


def _rows(cursor: sqlite3.Cursor) -> Iterator[Sequence[Any]]:
    while True:
        batch = cursor.fetchmany(_BATCH)
        if not batch:
            return
        yield from batch


def copy_sqlite_to_postgresql(
    sqlite_path: str,
    dsn: str,
    *,
    password: str | None = None,
    progress: Callable[[str], None] = lambda line: None,
) -> CopyReport:
    """Copy the SQLite store at *sqlite_path* into the empty PostgreSQL
    database of *dsn*; :class:`CopyError` (nothing written) when it cannot."""
    started = time.monotonic()
    try:
        source = sqlite3.connect(f"file:{sqlite_path}?mode=ro", uri=True)
        found = int(source.execute("PRAGMA user_version").fetchone()[0])
    except sqlite3.Error as e:
        raise CopyError(f"{sqlite_path}: {e}") from None
    try:
        if found == 0:
            raise CopyError(f"{sqlite_path}: not an mdmd store (no schema)")
        if found != sqlite_schema.SCHEMA_VERSION:
            raise CopyError(
                f"{sqlite_path}: schema version {found}, this mdmctl copies version "
                f"{sqlite_schema.SCHEMA_VERSION}: start this version of mdmd on it once (it migrates "
                "the file), stop it, then copy"
            )
        try:
            target = postgresql.connect(dsn, password)
        except postgresql.StoreUnavailable as e:
            raise CopyError(f"cannot use the PostgreSQL database: {e}") from None
        try:
            return _copy(source, target, progress, started)
        except psycopg.Error as e:
            raise CopyError(f"PostgreSQL: {postgresql._one_line(e)}") from None
        finally:
            target.close()
    finally:
        source.close()


def _copy(
    source: sqlite3.Connection,
    target: psycopg.Connection[Any],
    progress: Callable[[str], None],
    started: float,
) -> CopyReport:
    try:
        postgresql.migrate(target)
    except StoreError as e:
        raise CopyError(f"the PostgreSQL database: {e}") from None
    version = postgresql.schema_version(target)
    if version != postgresql_schema.SCHEMA_VERSION:
        raise CopyError(f"the PostgreSQL database has schema version {version}")
    # One snapshot of the source for the whole copy.
    source.execute("BEGIN")
    tables = _source_tables(source)
    types = _target_types(target)
    if set(tables) != set(types):
        raise CopyError(
            f"the two schemas differ: SQLite only {sorted(set(tables) - set(types))}, "
            f"PostgreSQL only {sorted(set(types) - set(tables))}"
        )
    counts: dict[str, int] = {}
    with target.transaction():
        occupied = [t for t in tables if target.execute(f"SELECT EXISTS (SELECT 1 FROM {t})").fetchone()[0]]  # type: ignore[index]
        if occupied:
            raise CopyError(
                f"the PostgreSQL database is not empty ({', '.join(occupied)} hold rows): "
                "refusing to copy into it"
            )
        for table in tables:
            counts[table] = _copy_table(source, target, table, types[table], progress)
        # Identity columns continue after the copied values.
        for table in tables:
            for column, (_, identity) in types[table].items():
                if identity:
                    target.execute(
                        f"SELECT setval(pg_get_serial_sequence(%s, %s), m) FROM "
                        f"(SELECT MAX({column}) AS m FROM {table}) t WHERE m IS NOT NULL",
                        (table, column),
                    )
        for table in tables:
            copied = target.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]  # type: ignore[index]
            if copied != counts[table]:
                raise CopyError(f"{table}: {counts[table]} rows read, {copied} in PostgreSQL; nothing copied")
    source.execute("ROLLBACK")
    return CopyReport(counts, time.monotonic() - started)


def _copy_table(
    source: sqlite3.Connection,
    target: psycopg.Connection[Any],
    table: str,
    types: dict[str, tuple[str, bool]],
    progress: Callable[[str], None],
) -> int:
    columns = _columns(source, table)
    # PostgreSQL has a column for SQLite's implicit rowid where the shared
    # SQL sorts by it: it gets the same values.
    if "rowid" in types and "rowid" not in columns:
        columns.append("rowid")
    missing = [c for c in columns if c not in types]
    if missing or len(columns) != len(types):
        raise CopyError(f"{table}: the columns differ (SQLite {columns}, PostgreSQL {sorted(types)})")
    total = int(source.execute(f'SELECT COUNT(*) FROM "{table}"').fetchone()[0])
    coerce = [_coercer(types[c][0]) for c in columns]
    listed = ", ".join(columns)
    done = 0
    shown = time.monotonic()
    cursor = source.execute(f'SELECT {listed} FROM "{table}" ORDER BY rowid')
    with target.cursor().copy(f"COPY {table} ({listed}) FROM STDIN") as copy:
        for row in _rows(cursor):
            copy.write_row([c(v) for c, v in zip(coerce, row, strict=True)])
            done += 1
            if time.monotonic() - shown >= _PROGRESS_EVERY:
                shown = time.monotonic()
                progress(f"{table}: {done:,} of {total:,} rows")
    if done != total:
        raise CopyError(f"{table}: {total} rows counted, {done} read; nothing copied")
    progress(f"{table}: {done:,} rows copied")
    return done
