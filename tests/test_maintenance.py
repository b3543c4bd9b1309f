"""Certificate housekeeping on a memory clock: when it runs, with which
cut-off, and in bounded batches."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from mdmd.app import Mdmd
from mdmd.maintenance import CertificateMaintenance
from mdmd.renewal import DAY


class CountingStore:
    """Answers as a store with *retirable* and *prunable* rows would."""

    def __init__(self, retirable: int, prunable: int) -> None:
        self.left = {"retire": retirable, "prune": prunable}
        self.calls: list[tuple[str, float, int]] = []

    def _take(self, kind: str, when: float, limit: int) -> Deferred[int]:
        self.calls.append((kind, when, limit))
        done = min(limit, self.left[kind])
        self.left[kind] -= done
        return succeed(done)

    def retire_renewed_certificates(self, now: float, *, limit: int) -> Deferred[int]:
        return self._take("retire", now, limit)

    def prune_certificates(self, revoked_before: float, *, limit: int) -> Deferred[int]:
        return self._take("prune", revoked_before, limit)


def _maintenance(store: CountingStore, clock: Clock, offset: float = 0.0) -> Iterator[CertificateMaintenance]:
    config = SimpleNamespace(wstep=SimpleNamespace(keep_revoked_days=90))
    app = Mdmd(config=config, material=None, store=store, reactor=clock, clock_offset=offset)  # type: ignore[arg-type]
    service = CertificateMaintenance(app, interval=3600.0, batch=10)
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
