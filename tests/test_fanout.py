"""The fan-out loop of group operations, in process: whom it takes leases
over from, the pause between batches on the reactor's clock, and a stop in
the middle that hands the operation over at once.  The store's side of the
lease is in test_store_contract.py, the whole thing end to end (kill -9
included) in test_actions_e2e.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, cast

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, LogLevel, formatEvent, globalLogPublisher

from mdmd.config import ActionsConfig
from mdmd.fanout import POLL_INTERVAL, FanOutService, owner_is_dead
from mdmd.store import GroupRecord, OperationRecord, StoreUnavailable

HOST = socket.gethostname()


def test_only_a_dead_process_of_this_host_is_taken_over() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead = int(done.stdout)
    me = os.getpid()
    assert owner_is_dead(f"{HOST}/{dead}/ab12", host=HOST, pid=me)
    assert not owner_is_dead(f"{HOST}/{os.getppid()}/ab12", host=HOST, pid=me)  # alive
    assert not owner_is_dead(f"{HOST}/{me}/ab12", host=HOST, pid=me)  # this process
    assert not owner_is_dead(f"elsewhere/{dead}/ab12", host=HOST, pid=me)  # its lease expires
    assert not owner_is_dead("garbage", host=HOST, pid=me)
    assert not owner_is_dead(f"{HOST}/notapid/ab12", host=HOST, pid=me)


def _op(**changes: Any) -> OperationRecord:
    base = OperationRecord(
        operation_id="op",
        kind="action",
        group_name="g",
        action="restart",
        options={},
        verb="Exec",
        body="<Exec/>",
        state="queuing",
        total=None,
        queued=0,
        skipped=0,
        acknowledged=0,
        failed=0,
        created_at=0.0,
        updated_at=0.0,
        finished_at=None,
    )
    return replace(base, **changes)


class Store:
    """The store calls the loop makes, answered at once, and recorded."""

    def __init__(self, batches: int, leases: Sequence[OperationRecord] = ()) -> None:
        self.batches = batches
        self.leases = list(leases)
        self.calls: list[tuple[Any, ...]] = []
        self.claimed = False

    def operation_leases(self) -> Deferred[list[OperationRecord]]:
        return succeed(self.leases)

    def claim_operation(
        self, owner: str, now: float, lease_until: float, *, takeover: Sequence[str] = ()
    ) -> Deferred[OperationRecord | None]:
        self.calls.append(("claim", now, lease_until, tuple(takeover)))
        if self.claimed:
            return succeed(None)
        self.claimed = True
        return succeed(_op(lease_owner=owner))

    def group(self, name: str) -> Deferred[GroupRecord | None]:
        return succeed(GroupRecord(name, 10, 0.0))

    def fan_out(
        self,
        operation_id: str,
        owner: str,
        now: float,
        lease_until: float,
        *,
        limit: int,
        total: int | None = None,
    ) -> Deferred[OperationRecord | None]:
        self.calls.append(("batch", now, lease_until, limit, total))
        self.batches -= 1
        return succeed(_op(state="queuing" if self.batches else "delivering", lease_owner=owner))

    def release_operation(self, operation_id: str, owner: str) -> Deferred[None]:
        self.calls.append(("release", operation_id))
        return succeed(None)

    def last(self) -> tuple[Any, ...]:
        return self.calls[-1]


def test_batches_are_paced_on_the_clock_and_each_renews_the_lease() -> None:
    clock = Clock()
    clock.advance(100)
    store = Store(batches=3)
    service = FanOutService(store, clock, ActionsConfig(fanout_batch=50, fanout_pause=2.0, fanout_lease=30.0))  # type: ignore[arg-type]
    service.startService()
    assert store.calls == [("claim", 100.0, 130.0, ()), ("batch", 100.0, 130.0, 50, 10)]
    clock.advance(1.9)
    assert len(store.calls) == 2  # the pause holds
    clock.advance(0.1)
    assert store.last() == ("batch", 102.0, 132.0, 50, None)
    clock.advance(2)
    assert store.last() == ("batch", 104.0, 134.0, 50, None)
    clock.advance(2)
    # Done: it looks for the next operation, finds none, and sleeps.
    assert store.last() == ("claim", 106.0, 136.0, ())
    clock.advance(POLL_INTERVAL - 0.1)
    assert store.last()[0] == "claim" and len(store.calls) == 5
    service.wake()  # a new operation: it looks at once
    assert len(store.calls) == 6
    service.stopService()


def test_a_stop_in_the_middle_releases_the_lease() -> None:
    clock = Clock()
    store = Store(batches=10)
    service = FanOutService(store, clock, ActionsConfig(fanout_pause=60.0))  # type: ignore[arg-type]
    service.startService()
    clock.advance(60)
    stopped = service.stopService()
    assert stopped is not None
    # The stop does not wait for the pause to end.
    fired: list[object] = []
    stopped.addCallback(fired.append)
    assert fired == [None]
    assert store.last() == ("release", "op")
    assert [c[0] for c in store.calls].count("batch") == 2


def test_a_dead_owners_lease_is_claimed_as_a_takeover() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_owner = f"{HOST}/{int(done.stdout)}/ffff"
    alive_owner = f"{HOST}/{os.getppid()}/ffff"
    store = Store(
        batches=1, leases=[_op(lease_owner=dead_owner), _op(operation_id="b", lease_owner=alive_owner)]
    )
    service = FanOutService(store, Clock(), ActionsConfig())  # type: ignore[arg-type]
    service.startService()
    assert store.calls[0][3] == (dead_owner,)
    service.stopService()


class AwayStore(Store):
    """The database away for the first *away* looks for work."""

    def __init__(self, away: int) -> None:
        super().__init__(batches=1)
        self.away = away

    def operation_leases(self) -> Deferred[list[OperationRecord]]:
        if self.away:
            self.away -= 1
            return fail(StoreUnavailable("no database connection: refused"))
        return super().operation_leases()


def test_a_store_away_is_one_line_and_the_loop_goes_on_once_it_is_back() -> None:
    clock = Clock()
    store = AwayStore(away=3)
    events: list[LogEvent] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        service = FanOutService(store, clock, ActionsConfig())  # type: ignore[arg-type]
        service.startService()
        for _ in range(3):
            clock.advance(POLL_INTERVAL)
        service.stopService()
    finally:
        globalLogPublisher.removeObserver(observer)
    mine = [e for e in events if e.get("log_namespace") == "mdmd.fanout"]
    # One warning for three failed looks, none of them a traceback; then
    # back at work (the operation it claims is logged after these).
    assert [e["log_level"] for e in mine[:2]] == [LogLevel.warn, LogLevel.info]
    assert "the store is unavailable (no database connection: refused)" in formatEvent(mine[0])
    assert formatEvent(mine[1]) == "group operation fan-out: the store is back"
    assert not [e for e in mine if e["log_level"] in (LogLevel.error, LogLevel.critical)]
    assert store.calls[0][0] == "claim"
