#!/usr/bin/env python3
"""What the admin API's fleet-wide reads cost on a large SQLite store, and
whether a device's check-in read waits behind them.

    .venv/bin/python bench/admin_reads.py                  # 1,000,000 devices
    .venv/bin/python bench/admin_reads.py --devices 100000

The store is filled directly (bench/run's fill, every device with a record
of the profile bench-0, which is assigned to the group all), then opened
with mdmd's own SQLiteStore.  For each admin read (the group all's answer,
the group list, a profile's status) it prints the read's own time, and the
time a device's check-in context read (``management_context``) takes when
it is asked for just after the admin read started: the check-in's read
waits when both run on the same reader thread.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from twisted.internet.defer import Deferred  # noqa: E402

from mdmd.profiles import Profile, ProfileItem, profile_version  # noqa: E402
from mdmd.store.sqlite import SQLiteStore  # noqa: E402
from store_helpers import ThreadReactor, wait  # noqa: E402


def _bench_run() -> Any:
    """bench/run (a script without a .py suffix) as a module, for its fill."""
    loader = importlib.machinery.SourceFileLoader("bench_run", str(REPO / "bench" / "run"))
    spec = importlib.util.spec_from_loader("bench_run", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_run"] = module  # its dataclasses look themselves up there
    loader.exec_module(module)
    return module


def _ms(seconds: Sequence[float]) -> str:
    return f"{statistics.median(seconds) * 1000:.1f}"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/admin_reads", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--devices", type=int, default=1_000_000, help="devices in the store (1,000,000)")
    p.add_argument("--repeat", type=int, default=5, help="times each read is timed (5; medians printed)")
    p.add_argument("--db", type=Path, help="measure a store an earlier run filled (its path is printed)")
    a = p.parse_args(argv)
    if a.db is not None:
        return _measure(a.db, a.repeat)
    run = _bench_run()
    workdir = Path(tempfile.mkdtemp(prefix="mdmd-admin-reads-"))
    db = workdir / "mdmd.sqlite3"
    store = SQLiteStore(str(db), ThreadReactor())  # type: ignore[arg-type]
    store.open()  # the schema
    store.start()
    items = (ProfileItem("Replace", "./Device/Vendor/MSFT/Policy/Config/Bench/Setting", "int", None, "1"),)
    wait(store.create_profile(Profile("bench-0", profile_version(items), items), 1.0))
    wait(store.assign_profile("bench-0", ["all"], 1.0))
    store.stop()
    print(f"admin_reads: filling {db} with {a.devices:,} devices", file=sys.stderr)
    fill_s = run.fill_store(db, a.devices)
    records_s = run.fill_profile_records(db)
    print(f"admin_reads: filled in {fill_s:.0f} s, profile records in {records_s:.0f} s", file=sys.stderr)
    return _measure(db, a.repeat)


def _measure(db: Path, repeat: int) -> int:
    conn = sqlite3.connect(db)
    (devices,) = conn.execute("SELECT count(*) FROM devices").fetchone()
    (serial, device_id) = conn.execute(
        "SELECT serial, device_id FROM certificates WHERE revoked_at IS NULL LIMIT 1 OFFSET ?",
        (devices // 2,),
    ).fetchone()
    # The fill's records are placeholders the console can count but a
    # check-in cannot read: the timed device has none.
    conn.execute("DELETE FROM device_profiles WHERE device_id = ?", (device_id,))
    conn.commit()
    conn.execute("ANALYZE")
    conn.close()

    store = SQLiteStore(str(db), ThreadReactor())  # type: ignore[arg-type]
    store.open()
    store.start()
    try:

        def checkin_read() -> Deferred[Any]:
            return store.management_context(serial)

        reads: dict[str, Callable[[], Deferred[Any]]] = {
            "group all (GET /api/v1/groups/all)": lambda: store.group("all"),
            "group list (GET /api/v1/groups)": store.groups,
            "profile status (GET /api/v1/profiles/bench-0)": lambda: store.profile_status("bench-0"),
        }
        alone: list[float] = []
        for _ in range(repeat):
            t = time.monotonic()
            wait(checkin_read(), 300)
            alone.append(time.monotonic() - t)
        rows = [("check-in context read alone", _ms(alone), "-")]
        for name, read in reads.items():
            own: list[float] = []
            beside: list[float] = []
            for _ in range(repeat):
                t = time.monotonic()
                admin = read()
                time.sleep(0.002)  # the admin read has started on its thread
                t_checkin = time.monotonic()
                wait(checkin_read(), 300)
                beside.append(time.monotonic() - t_checkin)
                wait(admin, 300)
                own.append(time.monotonic() - t)
            rows.append((name, _ms(own), _ms(beside)))
    finally:
        store.stop()
    print(f"\nadmin reads on a SQLite store of {devices:,} devices (medians of {repeat}, ms), {db}\n")
    print("| read | its own time | a check-in's context read asked for meanwhile |")
    print("|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
