"""Transactions off the reactor thread, with group commit.

A store backend hands its transactions to a :class:`TransactionEngine` as
plain functions of a DB-API connection.  Writes run on one dedicated thread
that owns the writing connection: the jobs that queued up while the
previous commit was syncing run as savepoints of one transaction and share
one COMMIT (one fsync), and each job's Deferred fires only after that
COMMIT, so nothing is acknowledged before it is durable.  A job that fails
rolls back to its savepoint alone.  Reads run on their own thread and
connection, so a lookup never waits behind another request's commit; a read
transaction is always rolled back.  Bulk reads (the administrators' lists,
fleet-wide counts) have a thread and connection of their own too, so that a
page of a million-device list never makes a device's check-in wait; a
backend may add more such lanes (*lanes*), e.g. for reads of the whole fleet
that take seconds and must not hold up the pages of the device list.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.failure import Failure

from mdmd.store.records import StoreError

__all__ = ["Connection", "Engine", "SQLConnection", "SQLCursor", "SQLRow", "TransactionEngine"]

R = TypeVar("R")


class Connection(Protocol):
    def execute(self, sql: str, /) -> Any: ...

    def close(self) -> None: ...


class SQLRow(Protocol):
    """A result row: by position and by column name (``sqlite3.Row``)."""

    def __getitem__(self, key: int | str, /) -> Any: ...


class SQLCursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class SQLConnection(Protocol):
    """What a store transaction gets: ``sqlite3.Connection``'s calls, with
    ``?`` parameters and rows that are :class:`SQLRow`."""

    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> SQLCursor: ...

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> SQLCursor: ...


class Engine(Protocol):
    """Runs a store's transactions off the reactor; each Deferred fires on
    the reactor thread, a write's only once it is committed."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    @property
    def alive(self) -> bool: ...

    def write(self, fn: Callable[[SQLConnection], R]) -> Deferred[R]: ...

    def read(
        self, fn: Callable[[SQLConnection], R], *, bulk: bool = False, lane: str | None = None
    ) -> Deferred[R]:
        """A read; *bulk* (it may take long) or of a named *lane* (its own
        thread, when the engine has one): beside the devices' reads."""
        ...


C = TypeVar("C", bound=Connection)

# A batch is bounded so that one slow commit cannot hold an unbounded number
# of waiting requests hostage to its fate.
MAX_BATCH = 64


@dataclass(slots=True)
class _Job(Generic[C]):
    fn: Callable[[C], Any]
    deferred: Deferred[Any]


class TransactionEngine(Generic[C]):
    """Runs transactions for a store on a writer and a reader thread.

    *begin_write* / *begin_read* are the statements that open a transaction
    on the backend.  *read_guard*, if given, is called with the connection
    before a read job and returns a function called after it, which raises
    if the job wrote anything (a programming error; the read is rolled back
    anyway).
    """

    def __init__(
        self,
        reactor: IReactorFromThreads,
        writer: C,
        reader: C,
        *,
        begin_write: str,
        begin_read: str,
        read_guard: Callable[[C], Callable[[], None]] | None = None,
        name: str = "mdmd-store",
        bulk_reader: C | None = None,
        on_commit: Callable[[int, float], None] | None = None,
        lanes: dict[str, C] | None = None,
    ) -> None:
        self._reactor = reactor
        self._writer: C | None = writer
        self._readers: dict[str, C | None] = {"read": reader}
        if bulk_reader is not None:
            self._readers["bulk"] = bulk_reader
        for lane, conn in (lanes or {}).items():
            self._readers[lane] = conn
        self._begin_write = begin_write
        self._begin_read = begin_read
        self._read_guard = read_guard
        self._name = name
        self._on_commit = on_commit
        self._writes: queue.SimpleQueue[_Job[C] | None] = queue.SimpleQueue()
        self._reads: dict[str, queue.SimpleQueue[_Job[C] | None]] = {
            lane: queue.SimpleQueue() for lane in self._readers
        }
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self._threads = [threading.Thread(target=self._write_loop, name=self._name, daemon=True)]
        self._threads += [
            threading.Thread(target=self._read_loop, args=(lane,), name=f"{self._name}-{lane}", daemon=True)
            for lane in self._readers
        ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Finish what is queued, stop the threads, close the connections."""
        if self._threads:
            self._writes.put(None)
            for lane in self._reads.values():
                lane.put(None)
            for thread in self._threads:
                thread.join()
            self._threads = []
        for conn in (self._writer, *self._readers.values()):
            if conn is not None:
                conn.close()
        self._writer = None
        self._readers = dict.fromkeys(self._readers)

    @property
    def alive(self) -> bool:
        """Every thread of the engine is running (readiness)."""
        return bool(self._threads) and all(thread.is_alive() for thread in self._threads)

    def write(self, fn: Callable[[C], R]) -> Deferred[R]:
        """Run *fn* in a write transaction; fires after its COMMIT."""
        d: Deferred[R] = Deferred()
        self._writes.put(_Job(fn, d))
        return d

    def read(self, fn: Callable[[C], R], *, bulk: bool = False, lane: str | None = None) -> Deferred[R]:
        """Run *fn* in a read transaction beside the writes; a *bulk* read
        (one that may take long) also beside the other reads; one for a
        named *lane* on that lane's own thread (the bulk one's when there is
        no such lane)."""
        d: Deferred[R] = Deferred()
        if lane is not None and lane in self._reads:
            self._reads[lane].put(_Job(fn, d))
            return d
        lane = "bulk" if (bulk or lane is not None) and "bulk" in self._reads else "read"
        self._reads[lane].put(_Job(fn, d))
        return d

    def _fire(self, deferred: Deferred[Any], value: object, ok: bool) -> None:
        self._reactor.callFromThread(deferred.callback if ok else deferred.errback, value)

    def _read_loop(self, lane: str) -> None:
        jobs = self._reads[lane]
        while True:
            job = jobs.get()
            if job is None:
                return
            conn = self._readers[lane]
            outcome: object
            try:
                if conn is None:
                    raise StoreError("store is not open")
                conn.execute(self._begin_read)
                check = self._read_guard(conn) if self._read_guard is not None else None
                try:
                    outcome = job.fn(conn)
                    if check is not None:
                        check()
                finally:
                    conn.execute("ROLLBACK")
                ok = True
            except Exception:
                outcome, ok = Failure(), False
            self._fire(job.deferred, outcome, ok)

    def _write_loop(self) -> None:
        while True:
            job = self._writes.get()
            if job is None:
                return
            batch = [job]
            stop = False
            while len(batch) < MAX_BATCH:
                try:
                    more = self._writes.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            self._run_batch(batch)
            if stop:
                return

    def _run_batch(self, batch: list[_Job[C]]) -> None:
        conn = self._writer
        outcomes: list[tuple[Deferred[Any], object, bool]] = []
        began = False
        started = time.perf_counter()
        try:
            if conn is None:
                raise StoreError("store is not open")
            conn.execute(self._begin_write)
            began = True
            for job in batch:
                conn.execute("SAVEPOINT job")
                try:
                    result = job.fn(conn)
                except Exception:
                    conn.execute("ROLLBACK TO SAVEPOINT job")
                    conn.execute("RELEASE SAVEPOINT job")
                    outcomes.append((job.deferred, Failure(), False))
                else:
                    conn.execute("RELEASE SAVEPOINT job")
                    outcomes.append((job.deferred, result, True))
            conn.execute("COMMIT")
            if self._on_commit is not None:
                with contextlib.suppress(Exception):  # a metric must never fail a commit
                    self._on_commit(len(batch), time.perf_counter() - started)
        except Exception:
            # The commit itself failed (disk full, I/O error, connection
            # lost): nothing of the batch is durable, so every job fails.
            failure = Failure()
            if conn is not None and began:
                # The original failure is the one worth reporting.
                with contextlib.suppress(Exception):
                    conn.execute("ROLLBACK")
            outcomes = [(job.deferred, failure, False) for job in batch]
        for deferred, value, ok in outcomes:
            self._fire(deferred, value, ok)
