"""Certificate housekeeping on a memory clock: when it runs, with which
cut-off, and in bounded batches."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import cast

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, LogLevel, formatEvent, globalLogPublisher

from mdmd.app import Mdmd
from mdmd.maintenance import CertificateMaintenance
from mdmd.renewal import DAY
from mdmd.store import StoreUnavailable


class CountingStore:
    """Answers as a store with *retirable* and *prunable* rows would."""

    def __init__(self, retirable: int, prunable: int, lease: tuple[str, float] | None = None) -> None:
        self.left = {"retire": retirable, "prune": prunable}
        self.calls: list[tuple[str, float, int]] = []
        self.lease = lease  # (holder, until)

    def claim_lease(self, name: str, holder: str, now: float, until: float) -> Deferred[bool]:
        assert name == "certificate-maintenance"
        if self.lease is not None and self.lease[0] != holder and self.lease[1] > now:
            return succeed(False)
        self.lease = (holder, until)
        return succeed(True)

    def _take(self, kind: str, when: float, limit: int) -> Deferred[int]:
        self.calls.append((kind, when, limit))
        done = min(limit, self.left[kind])
        self.left[kind] -= done
        return succeed(done)

    def retire_renewed_certificates(self, now: float, *, limit: int) -> Deferred[int]:
        return self._take("retire", now, limit)

    def prune_certificates(self, revoked_before: float, *, limit: int) -> Deferred[int]:
        return self._take("prune", revoked_before, limit)


def _maintenance(
    store: CountingStore, clock: Clock, offset: float = 0.0, holder: str = "this node"
) -> Iterator[CertificateMaintenance]:
    config = SimpleNamespace(wstep=SimpleNamespace(keep_revoked_days=90))
    app = Mdmd(config=config, material=None, store=store, reactor=clock, clock_offset=offset)  # type: ignore[arg-type]
    service = CertificateMaintenance(app, interval=3600.0, batch=10, holder=holder)
    service.startService()
    try:
        yield service
    finally:
        service.stopService()


def test_a_pass_runs_at_start_and_every_interval_in_batches() -> None:
    clock = Clock()
    clock.advance(1000 * DAY)
    store = CountingStore(retirable=25, prunable=7)
    for _ in _maintenance(store, clock):
        now = 1000 * DAY
        assert store.calls == [
            ("retire", now, 10),
            ("retire", now, 10),
            ("retire", now, 10),  # 5 left: the last batch
            ("prune", now - 90 * DAY, 10),
        ]
        store.calls.clear()
        clock.advance(3599)
        assert store.calls == []
        clock.advance(1)
        assert store.calls == [("retire", now + 3600, 10), ("prune", now + 3600 - 90 * DAY, 10)]
    store.calls.clear()
    clock.advance(3600)
    assert store.calls == []  # stopped


def test_the_cut_off_follows_the_moved_clock() -> None:
    clock = Clock()
    store = CountingStore(retirable=0, prunable=0)
    for _ in _maintenance(store, clock, offset=400 * DAY):
        assert store.calls == [("retire", 400 * DAY, 10), ("prune", 310 * DAY, 10)]


def test_a_pass_never_runs_unbounded() -> None:
    clock = Clock()
    store = CountingStore(retirable=10**9, prunable=0)
    for _ in _maintenance(store, clock):
        assert len([c for c in store.calls if c[0] == "retire"]) == 200


def test_a_pass_runs_only_under_the_lease_and_another_node_takes_over_when_it_runs_out() -> None:
    clock = Clock()
    clock.advance(1000 * DAY)
    store = CountingStore(retirable=0, prunable=0, lease=("other node", 1000 * DAY + 1800))
    for service in _maintenance(store, clock):
        assert store.calls == []  # the other node's lease runs for another 30 minutes
        clock.advance(3600)
        # It ran out (the other node is gone): this node claims it and works.
        assert [c[0] for c in store.calls] == ["retire", "prune"]
        assert store.lease == (service.holder, 1000 * DAY + 7200)
        store.calls.clear()
        clock.advance(3600)
        assert [c[0] for c in store.calls] == ["retire", "prune"]  # its own lease, renewed
        assert store.lease == ("this node", 1000 * DAY + 10800)


class AwayStore(CountingStore):
    """The database is away."""

    def claim_lease(self, name: str, holder: str, now: float, until: float) -> Deferred[bool]:
        return fail(StoreUnavailable("no database connection: refused"))


def test_a_pass_while_the_store_is_away_is_one_line_not_a_traceback() -> None:
    clock = Clock()
    events: list[LogEvent] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        for _ in _maintenance(AwayStore(0, 0), clock):
            clock.advance(3600.0)  # a second pass
    finally:
        globalLogPublisher.removeObserver(observer)
    mine = [e for e in events if e.get("log_namespace") == "mdmd.maintenance"]
    assert [e["log_level"] for e in mine] == [LogLevel.warn, LogLevel.warn]
    assert formatEvent(mine[0]) == "certificate maintenance pass skipped: no database connection: refused"
