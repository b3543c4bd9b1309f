"""The PostgreSQL backend of :class:`~mdmd.store.interface.Store`, for
several mdmd nodes sharing one database.

It runs the SQL of :class:`~mdmd.store.sqlite.SQLStore` (translated from
SQLite's ``?`` parameters to psycopg's) on psycopg 3 connections from a
``psycopg_pool`` pool, on ``pool_size`` threads of its own: the reactor
thread never waits for the database, and a process has at most
``pool_size`` transactions in flight.

Why it behaves as the SQLite store does: there, one writer thread runs
every write transaction, so each store method sees the database as if it
were alone.  Here several threads in several processes write at once, so
write transactions run ``SERIALIZABLE``: PostgreSQL lets them commit only
in a way equivalent to one after the other, and aborts one that cannot
(serialization failure, deadlock), which is then run again from the start,
as the transaction functions are pure functions of the database.  The
session step's compare-and-swap on ``session_seq`` is one such case: of two
nodes stepping one device's session, one commits and the other's
re-run finds the counter moved (``SessionConflict``).  Reads run
``REPEATABLE READ READ ONLY``: one snapshot, and a read that wrote would
fail.  A method's Deferred fires only after its COMMIT returned.

PostgreSQL groups the WAL flushes of concurrent commits itself, so there is
no group commit here.  The schema is migrated under an advisory lock, so
nodes started together migrate once.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import psycopg
import psycopg.errors
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import RowMaker
from psycopg_pool import ConnectionPool, PoolTimeout
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import Logger
from twisted.python.failure import Failure

from mdmd.store.engine import SQLConnection, SQLCursor
from mdmd.store.postgresql_devices import device_page
from mdmd.store.postgresql_schema import MIGRATIONS, SCHEMA_VERSION, VERSION_TABLE
from mdmd.store.records import DevicePage, DeviceQuery, StoreError, StoreUnavailable
from mdmd.store.sqlite import SQLStore

__all__ = [
    "PoolEngine",
    "PostgreSQLStore",
    "StoreUnavailable",
    "connect",
    "migrate",
    "qmark_to_format",
]

R = TypeVar("R")

log = Logger(namespace=__name__)

#: pg_advisory_lock key of schema migrations (any constant: ours).
MIGRATION_LOCK: Final = 0x6D646D64_00000001
#: How often a transaction that lost a serialization race is run again.
MAX_ATTEMPTS: Final = 30
#: Seconds a connection attempt may take.
CONNECT_TIMEOUT: Final = 10
#: Seconds a transaction waits for a pooled connection (there is one per
#: thread, so it waits only while connections are being made again).
POOL_WAIT: Final = 5.0
#: While the database cannot be reached: one job per PROBE_INTERVAL seconds
#: waits up to PROBE_WAIT for a connection, the others fail at once.
PROBE_INTERVAL: Final = 1.0
PROBE_WAIT: Final = 2.0
#: A connection the pool cannot make again within this many seconds is
#: given up, and made again when a transaction next needs one (so that,
#: once the database is back, the next transaction reconnects at once
#: instead of waiting out the pool's growing back-off).
RECONNECT_TIMEOUT: Final = 2.0
#: psycopg_pool's warnings: at most one line per this many seconds.
POOL_LOG_INTERVAL: Final = 10.0

# Transient: the transaction is run again from the start, nothing of it
# having been committed.
_RETRY = (psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected)


# --- the SQL dialect ---------------------------------------------------------

_TRANSLATED: dict[str, str] = {}


# SQLite's case-insensitive equality (NOCASE folds ASCII letters), as
# PostgreSQL runs it on the lower(column) indexes of postgresql_schema.
_NOCASE_EQUALS = re.compile(r"([\w.]+) = \? COLLATE NOCASE")
_IS_NOT_VALUE = re.compile(r"\bIS NOT (?=['?])")
_IS_VALUE = re.compile(r"\bIS (?=['?])")
# SQLite's index hints (the fleet counts pin their indexes): PostgreSQL's
# planner chooses its own.
_INDEXED_BY = re.compile(r"\s+INDEXED BY \w+")


def qmark_to_format(sql: str) -> str:
    """SQLite's ``?`` parameters as psycopg's ``%s`` (a literal ``%`` doubled);
    quoted text and identifiers are left as they are.  ``column = ? COLLATE
    NOCASE`` becomes ``lower(column) = lower(?)``; another use of NOCASE is
    refused (it would need a translation of its own); ``IS [NOT]`` a value
    becomes ``IS [NOT] DISTINCT FROM`` it; ``INDEXED BY`` hints go."""
    known = _TRANSLATED.get(sql)
    if known is not None:
        return known
    original = sql
    sql = _NOCASE_EQUALS.sub(r"lower(\1) = lower(?)", sql)
    # SQLite's null-safe comparisons with a value: "x IS NOT 'v'", "x IS ?".
    sql = _IS_NOT_VALUE.sub("IS DISTINCT FROM ", sql)
    sql = _IS_VALUE.sub("IS NOT DISTINCT FROM ", sql)
    sql = _INDEXED_BY.sub("", sql)
    if "NOCASE" in sql.upper():
        raise StoreError(f"SQL with a COLLATE NOCASE PostgreSQL cannot run: {' '.join(sql.split())[:200]}")
    out: list[str] = []
    quote: str | None = None
    for ch in sql:
        if quote is not None:
            if ch == quote:
                quote = None
            out.append("%%" if ch == "%" else ch)
        elif ch in "'\"":
            quote = ch
            out.append(ch)
        elif ch == "?":
            out.append("%s")
        elif ch == "%":
            out.append("%%")
        else:
            out.append(ch)
    translated = "".join(out)
    _TRANSLATED[original] = translated
    return translated


class Row:
    """A result row by position and by column name, as ``sqlite3.Row``."""

    __slots__ = ("_index", "_values")

    def __init__(self, values: Sequence[Any], index: dict[str, int]) -> None:
        self._values = values
        self._index = index

    def __getitem__(self, key: int | str) -> Any:
        if isinstance(key, str):
            return self._values[self._index[key]]
        return self._values[key]

    def __len__(self) -> int:
        return len(self._values)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)

    def keys(self) -> list[str]:
        return list(self._index)

    def __repr__(self) -> str:
        return f"Row({dict(zip(self._index, self._values, strict=True))!r})"


def _row_factory(cursor: psycopg.Cursor[Any]) -> RowMaker[Row]:
    index = {column.name: i for i, column in enumerate(cursor.description or ())}

    def make(values: Sequence[Any]) -> Row:
        return Row(values, index)

    return make


class PgConnection:
    """A psycopg connection speaking the shared SQL (:class:`SQLConnection`)."""

    __slots__ = ("raw",)

    def __init__(self, raw: psycopg.Connection[Any]) -> None:
        self.raw = raw

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> SQLCursor:
        cursor = self.raw.cursor(row_factory=_row_factory)
        if parameters:
            cursor.execute(qmark_to_format(sql), parameters)
        else:
            cursor.execute(sql)
        return cursor

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> SQLCursor:
        rows = list(parameters)
        # psycopg runs executemany in a pipeline of its own, which costs a
        # round trip even for nothing: most of a session step's lists are
        # empty or hold one row.
        if not rows:
            return _NO_ROWS
        if len(rows) == 1:
            return self.execute(sql, rows[0])
        cursor = self.raw.cursor(row_factory=_row_factory)
        cursor.executemany(qmark_to_format(sql), rows)
        return cursor


class _NoRows:
    """What executing a statement for no rows at all returns."""

    rowcount = 0

    def fetchone(self) -> None:
        return None

    def fetchall(self) -> list[Any]:
        return []

    def __iter__(self) -> Iterator[Any]:
        return iter(())


_NO_ROWS: Final = _NoRows()


# --- connections and the schema ----------------------------------------------


def connection_settings(dsn: str, password: str | None) -> dict[str, Any]:
    """What every connection adds to the DSN: the password, autocommit (the
    engine says BEGIN itself), a connect timeout, and ``application_name``
    ``mdmd`` (pg_stat_activity) unless the DSN names it."""
    settings: dict[str, Any] = {"autocommit": True, "connect_timeout": CONNECT_TIMEOUT}
    if password is not None:
        settings["password"] = password
    if "application_name" not in conninfo_to_dict(dsn):
        settings["application_name"] = "mdmd"
    return settings


def connect(dsn: str, password: str | None = None) -> psycopg.Connection[Any]:
    """One connection; :class:`StoreUnavailable` when the server cannot be
    reached or refuses us."""
    try:
        return psycopg.connect(dsn, **connection_settings(dsn, password))
    except psycopg.OperationalError as e:
        raise StoreUnavailable(_one_line(e)) from None


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


def schema_version(conn: psycopg.Connection[Any]) -> int:
    """The schema version of the database (0: no mdmd schema)."""
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (VERSION_TABLE,)).fetchone()
    if row is None or not row[0]:
        return 0
    found = conn.execute(f"SELECT version FROM {VERSION_TABLE}").fetchone()
    return 0 if found is None else int(found[0])


def migrate(conn: psycopg.Connection[Any]) -> int:
    """Bring the schema up to :data:`SCHEMA_VERSION` (an autocommit
    connection); return the version found.  Under an advisory lock, so that
    of several nodes starting together one migrates and the others wait and
    find the work done."""
    conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
    try:
        found = schema_version(conn)
        if found > SCHEMA_VERSION:
            raise StoreError(
                f"the database has schema version {found}, newer than this mdmd "
                f"understands ({SCHEMA_VERSION}); refusing to touch it"
            )
        for version in range(found, SCHEMA_VERSION):
            with conn.transaction():
                if version == 0:
                    conn.execute(f"CREATE TABLE {VERSION_TABLE} (version INTEGER NOT NULL)")
                    conn.execute(f"INSERT INTO {VERSION_TABLE} (version) VALUES (0)")
                for statement in MIGRATIONS[version]:
                    conn.execute(statement)
                conn.execute(f"UPDATE {VERSION_TABLE} SET version = %s", (version + 1,))
        return found
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))


# --- the engine --------------------------------------------------------------


@dataclass(slots=True)
class _Job:
    fn: Callable[[SQLConnection], Any]
    write: bool
    deferred: Deferred[Any]


class PoolEngine:
    """Transactions on *size* threads, each with a connection of *pool*
    while it runs one (:class:`~mdmd.store.engine.Engine`)."""

    BEGIN_WRITE = "BEGIN ISOLATION LEVEL SERIALIZABLE"
    BEGIN_READ = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"

    def __init__(
        self,
        reactor: IReactorFromThreads,
        pool: ConnectionPool,
        size: int,
        *,
        name: str = "mdmd-store",
        on_commit: Callable[[int, float], None] | None = None,
    ) -> None:
        self._reactor = reactor
        self._on_commit = on_commit
        self._pool = pool
        self._size = size
        self._name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        # Why the database cannot be reached, while it cannot (None: it can).
        self._down: str | None = None
        self._next_probe = 0.0
        self._probe_lock = threading.Lock()
        #: Transactions run again because they lost a race (a measure).
        self.races = 0

    def start(self) -> None:
        self._threads = [
            threading.Thread(target=self._loop, name=f"{self._name}-{n}", daemon=True)
            for n in range(self._size)
        ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Finish what is queued, stop the threads, close the pool."""
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()
        self._threads = []
        self._pool.close()

    def write(self, fn: Callable[[SQLConnection], R]) -> Deferred[R]:
        d: Deferred[R] = Deferred()
        self._jobs.put(_Job(fn, True, d))
        return d

    def read(
        self, fn: Callable[[SQLConnection], R], *, bulk: bool = False, lane: str | None = None
    ) -> Deferred[R]:
        # A bulk read (one that may take long), or one of a lane, takes one
        # of the threads and connections like any other: there are
        # pool_size of them.
        d: Deferred[R] = Deferred()
        self._jobs.put(_Job(fn, False, d))
        return d

    @property
    def alive(self) -> bool:
        """Every thread is running (readiness)."""
        return bool(self._threads) and all(thread.is_alive() for thread in self._threads)

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            outcome: object
            try:
                outcome, ok = self._run(job), True
            except Exception:
                outcome, ok = Failure(), False
            self._reactor.callFromThread(job.deferred.callback if ok else job.deferred.errback, outcome)

    def _admit(self) -> float | None:
        """While the database cannot be reached and the pool has no
        connection, a job fails at once (a 503 for its request) instead of
        queueing behind others that wait for one; one job a second goes
        ahead and waits a little (it makes the pool connect again).  The
        seconds the job may wait for a connection (None: the pool's own)."""
        down = self._down
        if down is None:
            return None
        if self._pool.get_stats().get("pool_available", 0) > 0:
            return None
        with self._probe_lock:
            now = time.monotonic()
            if now >= self._next_probe:
                self._next_probe = now + PROBE_INTERVAL
                return PROBE_WAIT
        raise StoreUnavailable(down)

    def _run(self, job: _Job) -> Any:
        begin = self.BEGIN_WRITE if job.write else self.BEGIN_READ
        wait = self._admit()
        try:
            result = self._attempts(job, begin, wait)
        except StoreUnavailable as e:
            self._down = str(e)
            raise
        self._down = None
        return result

    def _attempts(self, job: _Job, begin: str, wait: float | None) -> Any:
        delay = 0.001
        for attempt in range(1, MAX_ATTEMPTS + 1):
            stage = "connect"
            try:
                # On leaving the block the pool rolls back whatever the job
                # left open (an error) and replaces a broken connection.
                with self._pool.connection(timeout=wait) as raw:
                    stage = "begin"
                    raw.execute(begin)
                    stage = "run"
                    result = job.fn(PgConnection(raw))
                    stage = "commit"
                    started = time.perf_counter()
                    raw.execute("COMMIT" if job.write else "ROLLBACK")
                    if job.write and self._on_commit is not None:
                        with contextlib.suppress(Exception):  # a metric never fails a commit
                            self._on_commit(1, time.perf_counter() - started)
                    return result
            except _RETRY:
                if attempt == MAX_ATTEMPTS:
                    raise
                self.races += 1
            except PoolTimeout as e:  # (an OperationalError: first)
                raise StoreUnavailable(f"no database connection: {_one_line(e)}") from None
            except psycopg.OperationalError as e:
                # A connection the server closed (it restarted, say) fails
                # at BEGIN, before anything that could commit was sent:
                # another connection may do.  A failure later is the job's
                # (whether a COMMIT whose answer was lost took effect is
                # unknown).
                if attempt == MAX_ATTEMPTS or stage != "begin":
                    raise StoreUnavailable(_one_line(e)) from None
            # Lost a race: back off a little (jittered) and run it again.
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.05)
        raise AssertionError("unreachable")


class _PoolLog(logging.Handler):
    """psycopg_pool's warnings (a connection it could not make again, one it
    discarded) in mdmd's log, not Python's stderr: one line, and at most one
    per :data:`POOL_LOG_INTERVAL` (a database that is down would otherwise
    fill the log), saying how many were left out."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self._last = -POOL_LOG_INTERVAL
        self._left_out = 0

    def emit(self, record: logging.LogRecord) -> None:
        now = time.monotonic()
        with self.lock or threading.Lock():
            if now - self._last < POOL_LOG_INTERVAL:
                self._left_out += 1
                return
            self._last, left_out, self._left_out = now, self._left_out, 0
        log.warn(
            "PostgreSQL connection pool: {message}{more}",
            message=" ".join(record.getMessage().split()),
            more=f" ({left_out} more such lines in the last {POOL_LOG_INTERVAL:g} s)" if left_out else "",
        )


def _route_pool_log() -> None:
    logger = logging.getLogger("psycopg.pool")
    if not any(isinstance(h, _PoolLog) for h in logger.handlers):
        logger.addHandler(_PoolLog())
        logger.propagate = False


# --- the store ---------------------------------------------------------------


class PostgreSQLStore(SQLStore):
    """:class:`~mdmd.store.interface.Store` on a PostgreSQL database shared
    by every mdmd node."""

    def __init__(
        self,
        dsn: str,
        reactor: IReactorFromThreads,
        *,
        password: str | None = None,
        pool_size: int = 4,
    ) -> None:
        self.dsn = dsn
        self._password = password
        self._reactor = reactor
        self._pool_size = pool_size
        self._pool: ConnectionPool | None = None
        self._engine = None

    def open(self, *, check: bool = True) -> int:
        """Connect, check and migrate (``check=False``, worker processes:
        only verify the version); return the schema version found.
        :class:`StoreUnavailable` if the database cannot be reached."""
        conn = connect(self.dsn, self._password)
        try:
            if check:
                found = migrate(conn)
            else:
                found = schema_version(conn)
                if found != SCHEMA_VERSION:
                    raise StoreError(f"schema version {found}, expected {SCHEMA_VERSION}")
        except psycopg.OperationalError as e:
            raise StoreUnavailable(_one_line(e)) from None
        except psycopg.Error as e:
            raise StoreError(_one_line(e)) from None
        finally:
            conn.close()
        pool = ConnectionPool(
            self.dsn,
            kwargs=connection_settings(self.dsn, self._password),
            min_size=self._pool_size,
            max_size=self._pool_size,
            open=False,
            name="mdmd-store",
            timeout=POOL_WAIT,
            reconnect_timeout=RECONNECT_TIMEOUT,
        )
        self._engine = PoolEngine(self._reactor, pool, self._pool_size, on_commit=self._on_commit)
        self._pool = pool
        return found

    @property
    def schema_version(self) -> int:
        return SCHEMA_VERSION

    def device_page(
        self, query: DeviceQuery, *, limit: int, after: tuple[float, str] | None = None
    ) -> Deferred[DevicePage]:
        def txn(conn: SQLConnection) -> DevicePage:
            return device_page(conn, query, limit, after)

        return self._run(txn, write=False, bulk=True)

    def start(self) -> None:
        if self._engine is None or self._pool is None:
            raise StoreError("store is not open")
        _route_pool_log()
        # The connections are made in the background: a request that comes
        # first waits for one (at most the pool's timeout).
        self._pool.open(wait=False)
        self._engine.start()

    def stop(self) -> None:
        if self._engine is not None:
            self._engine.stop()
            self._engine = None
