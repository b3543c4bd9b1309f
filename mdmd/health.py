"""Health, readiness and metrics on the admin listener, without the token
(what a load balancer, systemd or Prometheus asks):

- ``GET /healthz``: the process answers (200 while the reactor runs);
- ``GET /readyz``: 200 when the node can serve: the store commits a write,
  every listener listens, every worker process serves; else 503 with the
  reasons;
- ``GET /metrics``: :mod:`mdmd.metrics` in the Prometheus text format.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from mdmd import metrics
from mdmd.store import Store
from mdmd.web import EndpointResource, HTTPResponse, MdmdRequest, json_error, json_response

__all__ = ["FleetCountsCache", "HealthResource", "MetricsResource", "Readiness", "ReadyResource"]

log = Logger(namespace=__name__)

#: A check says what is wrong, or None.
Check = Callable[[], Coroutine[Any, Any, str | None]]

#: How long the store may take to commit the readiness probe.
STORE_PROBE_TIMEOUT = 5.0


@dataclass
class Readiness:
    """The checks ``/readyz`` runs, by name; the daemon adds its listeners'
    and workers' as it builds them."""

    checks: dict[str, Check] = field(default_factory=dict)

    def add(self, name: str, check: Check) -> None:
        self.checks[name] = check

    async def problems(self) -> list[str]:
        found = []
        for name, check in self.checks.items():
            try:
                problem = await check()
            except Exception as e:
                problem = f"{type(e).__name__}: {e}"
            if problem is not None:
                found.append(f"{name}: {problem}")
        return found


def store_check(store: Store, clock: IReactorTime, *, timeout: float = STORE_PROBE_TIMEOUT) -> Check:
    """The store commits a small write within *timeout* seconds."""

    async def check() -> str | None:
        done = store.check_writable(clock.seconds())
        timed_out: list[bool] = []

        def give_up() -> None:
            timed_out.append(True)
            done.cancel()  # the store's late answer is then ignored

        timer = clock.callLater(timeout, give_up)
        try:
            await done
        except Exception as e:
            return f"no commit within {timeout:g} s" if timed_out else f"cannot commit: {e}"
        finally:
            if timer.active():
                timer.cancel()
        return None

    return check


class FleetCountsCache:
    """The store's fleet-wide counts for :data:`mdmd.metrics.FLEET`, read off
    the reactor at most once per *max_age* seconds; scrapes meanwhile share
    one read."""

    def __init__(self, store: Store, clock: IReactorTime, max_age: float) -> None:
        self.store = store
        self.clock = clock
        self.max_age = max_age
        self._pending: list[Deferred[None]] | None = None

    async def refresh(self) -> None:
        updated = metrics.FLEET.updated_at
        if updated is not None and time.time() - updated < self.max_age:
            return
        if self._pending is not None:
            waiting: Deferred[None] = Deferred()
            self._pending.append(waiting)
            await waiting
            return
        self._pending = []
        try:
            metrics.FLEET.counts = await self.store.fleet_counts(self.clock.seconds())
            metrics.FLEET.updated_at = time.time()
        except Exception as e:
            # The last counts stay; the timestamp metric shows their age.
            log.warn("metrics: cannot read the fleet counts: {error}", error=str(e))
        finally:
            pending, self._pending = self._pending, None
            for d in pending:
                d.callback(None)


class HealthResource(EndpointResource):
    async def handle_GET(self, request: MdmdRequest) -> HTTPResponse:
        return json_response(200, {"status": "ok"})


class ReadyResource(EndpointResource):
    def __init__(self, readiness: Readiness) -> None:
        super().__init__()
        self.readiness = readiness

    async def handle_GET(self, request: MdmdRequest) -> HTTPResponse:
        problems = await self.readiness.problems()
        if problems:
            request.note = "; ".join(problems)
            return json_error(503, "not ready: " + "; ".join(problems), reasons=problems)
        return json_response(200, {"status": "ready"})


class MetricsResource(EndpointResource):
    def __init__(self, fleet: FleetCountsCache, reactor: object) -> None:
        super().__init__()
        self.fleet = fleet
        self.reactor = reactor

    async def handle_GET(self, request: MdmdRequest) -> HTTPResponse:
        with contextlib.suppress(Exception):
            await self.fleet.refresh()
        # Rendering (and in multiprocess mode reading every process's
        # files) is done off the reactor.
        body = await deferToThreadPool(
            self.reactor,  # type: ignore[arg-type]
            self.reactor.getThreadPool(),  # type: ignore[attr-defined]
            metrics.exposition,
        )
        return HTTPResponse(200, body, content_type=metrics.CONTENT_TYPE)
