#!/usr/bin/env python3
"""How should mdmd drive PostgreSQL: psycopg's blocking API on threads of
its own with psycopg_pool (what mdmd does), or psycopg's async API on
Twisted's asyncio reactor?  ``bench/run --pg-drivers SECONDS`` runs this
once per way, each in a fresh process, on the same database and workload,
and prints the table.

The workload is the store's work for one check-in without commands, in
the statements mdmd runs: the read transaction of ``management_context``
(certificate, device with its current certificate, session, queue,
profiles, profile links; REPEATABLE READ READ ONLY) and the write
transaction of ``commit_management_step`` (the session counter, last seen,
the alert, the session row and the reply; SERIALIZABLE, run again if it
loses a race), each device in turn, *concurrency* check-ins in flight.
Measured: check-ins per second, the process's CPU per check-in, the
reactor thread's share, and PostgreSQL's own CPU.

    python bench/pg_drivers.py threads|async DSN SECONDS CONCURRENCY POOL DEVICES

``store-serializable`` and ``store-repeatable-read`` run mdmd's own store
calls of a check-in instead (its read, the profiles' read, its session
step), with write transactions at that isolation level, and count the
transactions run again after losing a race (``--pg-drivers`` prints them).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

CLK_TCK = os.sysconf("SC_CLK_TCK")

_READ = [
    ("SELECT * FROM certificates WHERE serial = %s", "serial"),
    (None, "id"),  # the device with its current certificate (the store's own SELECT)
    ("SELECT state FROM syncml_sessions WHERE device_id = %s", "id"),
    (
        "SELECT uuid, body FROM commands WHERE device_id = %s AND state IN ('pending', 'sent') "
        "ORDER BY seq LIMIT 100",
        "id",
    ),
    ("SELECT * FROM device_profiles WHERE device_id = %s", "id"),
    ("SELECT * FROM profile_commands WHERE device_id = %s", "id"),
]

_WRITE = [
    ("SELECT inventory, session_seq FROM devices WHERE device_id = %s", ("id",)),
    ("UPDATE devices SET last_seen = %s, session_seq = session_seq + 1 WHERE device_id = %s", ("now", "id")),
    (
        "INSERT INTO device_alerts (device_id, code, type, source, format, data, received_at)"
        " VALUES (%s, '1201', '', '', NULL, NULL, %s) ON CONFLICT (device_id, code, type, source) DO UPDATE"
        " SET received_at = excluded.received_at, count = device_alerts.count + 1",
        ("id", "now"),
    ),
    ("DELETE FROM large_object_chunks WHERE device_id = %s", ("id",)),
    (
        "INSERT INTO syncml_sessions (device_id, state, updated_at) VALUES (%s, %s, %s)"
        " ON CONFLICT (device_id) DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at",
        ("id", "session", "now"),
    ),
    (
        "INSERT INTO syncml_replies (device_id, reply, base64) VALUES (%s, %s, 0)"
        " ON CONFLICT (device_id) DO UPDATE SET reply = excluded.reply, base64 = 0",
        ("id", "reply"),
    ),
]


def _session() -> str:
    from mdmd.management import SessionState, encode_session

    return encode_session(SessionState(session_id="1A", last_msg_id=1, next_msg_id=2, max_msg_size=65536))


SESSION = _session()
REPLY = b"<SyncML>" + b"x" * 700 + b"</SyncML>"


def statements(
    device: tuple[str, str],
) -> tuple[list[tuple[str, tuple[Any, ...]]], list[tuple[str, tuple[Any, ...]]]]:
    from mdmd.store.postgresql import qmark_to_format
    from mdmd.store.sqlite import _DEVICE_SELECT

    device_id, serial = device
    values: dict[str, Any] = {
        "id": device_id,
        "serial": serial,
        "now": time.time(),
        "session": SESSION,
        "reply": REPLY,
    }
    read = [
        (sql or qmark_to_format(_DEVICE_SELECT + " WHERE d.device_id = ?"), (values[arg],))
        for sql, arg in _READ
    ]
    write = [(sql, tuple(values[a] for a in args)) for sql, args in _WRITE]
    return read, write


def thread_cpu(tid: int) -> float:
    fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def process_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def postgres_cpu(dsn: str) -> float:
    """CPU of every PostgreSQL server process (the postmaster's children)."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT pg_postmaster_start_time(), current_setting('data_directory')").fetchone()
    assert row is not None
    postmaster = int(Path(str(row[1]), "postmaster.pid").read_text().split()[0])
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(entry.name) == postmaster or int(fields[1]) == postmaster:
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def devices(dsn: str, count: int) -> list[tuple[str, str]]:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT d.device_id, c.serial FROM devices d JOIN certificates c ON c.device_id = d.device_id"
            " ORDER BY d.device_id LIMIT %s",
            (count,),
        ).fetchall()
    return [(str(a), str(b)) for a, b in rows]


def run_threads(
    dsn: str, seconds: float, concurrency: int, pool_size: int, fleet: list[tuple[str, str]]
) -> dict[str, Any]:
    from psycopg_pool import ConnectionPool
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    from mdmd.store.engine import SQLConnection
    from mdmd.store.postgresql import PgConnection, PoolEngine, connection_settings

    pool = ConnectionPool(
        dsn, kwargs=connection_settings(dsn, None), min_size=pool_size, max_size=pool_size, open=True
    )
    pool.wait()
    engine = PoolEngine(reactor, pool, pool_size)  # type: ignore[arg-type]
    engine.start()
    done = [0]
    window: dict[str, float] = {}

    def run(sql_list: list[tuple[str, tuple[Any, ...]]]) -> Callable[[SQLConnection], None]:
        def txn(conn: SQLConnection) -> None:
            raw = conn.raw if isinstance(conn, PgConnection) else None
            assert raw is not None
            for sql, args in sql_list:
                raw.execute(sql, args).fetchall() if sql.lstrip().startswith("SELECT") else raw.execute(
                    sql, args
                )

        return txn

    async def loop(lane: int) -> None:
        n = lane
        while time.monotonic() < window["end"]:
            read, write = statements(fleet[n % len(fleet)])
            await engine.read(run(read))
            await engine.write(run(write))
            done[0] += 1
            n += concurrency

    def start() -> None:
        window["end"] = time.monotonic() + seconds
        window["cpu"], window["main"] = process_cpu(), thread_cpu(threading.get_native_id())
        window["pg"], window["t0"] = postgres_cpu(dsn), time.monotonic()
        lanes = [Deferred.fromCoroutine(loop(i)) for i in range(concurrency)]
        from twisted.internet.defer import gatherResults

        gatherResults(lanes).addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run()
    elapsed = time.monotonic() - window["t0"]
    result = _result(
        done[0],
        elapsed,
        process_cpu() - window["cpu"],
        thread_cpu(threading.get_native_id()) - window["main"],
        postgres_cpu(dsn) - window["pg"],
    )
    engine.stop()
    return result


def run_async(
    dsn: str, seconds: float, concurrency: int, pool_size: int, fleet: list[tuple[str, str]]
) -> dict[str, Any]:
    from twisted.internet import asyncioreactor

    asyncioreactor.install()
    import asyncio

    import psycopg
    from psycopg_pool import AsyncConnectionPool
    from twisted.internet import reactor

    from mdmd.store.postgresql import connection_settings

    done = [0]
    window: dict[str, float] = {}
    retry = (psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected)

    async def transaction(
        pool: AsyncConnectionPool, begin: str, end: str, sql_list: list[tuple[str, tuple[Any, ...]]]
    ) -> None:
        while True:
            try:
                async with pool.connection() as conn:
                    await conn.execute(begin)
                    for sql, args in sql_list:
                        cursor = await conn.execute(sql, args)
                        if sql.lstrip().startswith("SELECT"):
                            await cursor.fetchall()
                    await conn.execute(end)
                    return
            except retry:
                continue

    async def main() -> None:
        pool = AsyncConnectionPool(
            dsn, kwargs=connection_settings(dsn, None), min_size=pool_size, max_size=pool_size, open=False
        )
        await pool.open(wait=True)

        async def lane(n: int) -> None:
            while time.monotonic() < window["end"]:
                read, write = statements(fleet[n % len(fleet)])
                await transaction(pool, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", "ROLLBACK", read)
                await transaction(pool, "BEGIN ISOLATION LEVEL SERIALIZABLE", "COMMIT", write)
                done[0] += 1
                n += concurrency

        window["end"] = time.monotonic() + seconds
        window["cpu"], window["main"] = process_cpu(), thread_cpu(threading.get_native_id())
        window["pg"], window["t0"] = postgres_cpu(dsn), time.monotonic()
        await asyncio.gather(*(lane(i) for i in range(concurrency)))
        window["elapsed"] = time.monotonic() - window["t0"]
        window["cpu"] = process_cpu() - window["cpu"]
        window["main"] = thread_cpu(threading.get_native_id()) - window["main"]
        window["pg"] = postgres_cpu(dsn) - window["pg"]
        await pool.close()

    def start() -> None:
        from twisted.internet.defer import Deferred

        Deferred.fromFuture(asyncio.ensure_future(main())).addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run()
    return _result(done[0], window["elapsed"], window["cpu"], window["main"], window["pg"])


def run_store(
    dsn: str, seconds: float, concurrency: int, pool_size: int, fleet: list[tuple[str, str]], begin_write: str
) -> dict[str, Any]:
    """mdmd's own store (threads and psycopg_pool) doing a check-in's store
    calls: the session start's context, the profiles' context, the session
    step with an alert and the reply; write transactions begun with
    *begin_write*.  Also counts the transactions run again after a race."""
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred, gatherResults

    from mdmd.management import AlertRecord, ManagementStep, SessionState
    from mdmd.store.postgresql import PoolEngine, PostgreSQLStore

    PoolEngine.BEGIN_WRITE = begin_write
    store = PostgreSQLStore(dsn, reactor, pool_size=pool_size)  # type: ignore[arg-type]
    store.open(check=False)
    store.start()
    done = [0]
    window: dict[str, float] = {}
    alert = AlertRecord("1201", None, None, None, None)

    async def lane(n: int) -> None:
        while time.monotonic() < window["end"]:
            device_id, serial = fleet[n % len(fleet)]
            ctx = await store.management_context(serial)
            assert ctx is not None
            await store.profile_context(device_id)
            session = SessionState(session_id=f"{n:X}", last_msg_id=1, next_msg_id=2, max_msg_size=65536)
            step = ManagementStep(device_id, session, reply=REPLY, alerts=(alert,), new_session=True)
            await store.commit_management_step(step, time.time(), expected_seq=ctx.session_seq)
            done[0] += 1
            n += concurrency

    def start() -> None:
        window["end"] = time.monotonic() + seconds
        window["cpu"], window["main"] = process_cpu(), thread_cpu(threading.get_native_id())
        window["pg"], window["t0"] = postgres_cpu(dsn), time.monotonic()
        lanes = [Deferred.fromCoroutine(lane(i)) for i in range(concurrency)]
        gatherResults(lanes).addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run()
    elapsed = time.monotonic() - window["t0"]
    engine = store._engine
    races = engine.races if isinstance(engine, PoolEngine) else 0
    result = _result(
        done[0],
        elapsed,
        process_cpu() - window["cpu"],
        thread_cpu(threading.get_native_id()) - window["main"],
        postgres_cpu(dsn) - window["pg"],
    )
    store.stop()
    return {**result, "races_per_1000": round(1000 * races / max(1, done[0]), 1)}


def _result(count: int, elapsed: float, cpu: float, main: float, pg: float) -> dict[str, Any]:
    return {
        "checkins": count,
        "seconds": round(elapsed, 2),
        "checkins_per_s": round(count / elapsed, 1),
        "cpu_ms_per_checkin": round(1000 * cpu / count, 3),
        "reactor_thread_ms_per_checkin": round(1000 * main / count, 3),
        "postgresql_cpu_ms_per_checkin": round(1000 * pg / count, 3),
    }


def main(argv: list[str]) -> int:
    mode, dsn, seconds, concurrency, pool_size, count = argv
    fleet = devices(dsn, int(count))
    args = (dsn, float(seconds), int(concurrency), int(pool_size), fleet)
    if mode == "store-serializable":
        print(json.dumps(run_store(*args, "BEGIN ISOLATION LEVEL SERIALIZABLE")))
    elif mode == "store-repeatable-read":
        print(json.dumps(run_store(*args, "BEGIN ISOLATION LEVEL REPEATABLE READ")))
    else:
        print(json.dumps((run_threads if mode == "threads" else run_async)(*args)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
