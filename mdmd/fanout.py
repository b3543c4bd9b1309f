"""Group operations fanned out to their members, off the reactor.

``POST /api/v1/groups/{name}/actions`` (or ``.../commands``) only records
the operation; this service, in the main process, gives the group's members
their command in batches of ``[actions] fanout_batch`` devices, one store
transaction each (the members, their commands and the cursor that moves
past them commit together), with ``[actions] fanout_pause`` between
batches.  The reactor only waits for those transactions, so check-ins go on
while a group of a million devices is served.

Which process fans an operation out is decided in the store, by a lease
(:meth:`~mdmd.store.Store.claim_operation`, a compare-and-swap): a process
holds the operation for ``[actions] fanout_lease`` seconds and renews the
lease with each batch.  So one operation is never fanned out twice at once,
by another process or another node, and nothing is queued twice after a
crash: whoever continues starts after the last committed batch.  A process
that died on this host (its owner name carries the host and the process ID)
is taken over at once; one of another host when its lease expires.
"""

from __future__ import annotations

import os
import secrets
import socket

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from mdmd.config import ActionsConfig
from mdmd.store import OperationRecord, Store, StoreUnavailable

__all__ = ["FanOutService", "owner_is_dead"]

log = Logger(namespace=__name__)

# How often the service looks for operations nobody holds (another node's
# that expired); a new operation of this process wakes it at once.
POLL_INTERVAL = 5.0


def owner_is_dead(owner: str, *, host: str, pid: int) -> bool:
    """Whether the lease *owner* (``host/pid/token``) is a process of this
    *host*, other than *pid*, that no longer exists."""
    parts = owner.split("/")
    if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
        return False
    other = int(parts[1])
    if other == pid:
        return False
    try:
        os.kill(other, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # it exists (another user's)
    return False


class FanOutService(Service):
    """The fan-out loop of the main process."""

    def __init__(self, store: Store, reactor: IReactorTime, config: ActionsConfig) -> None:
        self.store = store
        self.reactor = reactor
        self.config = config
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.owner = f"{self.host}/{self.pid}/{secrets.token_hex(4)}"
        self._loop: Deferred[None] | None = None
        self._sleeping: tuple[Deferred[None], IDelayedCall] | None = None
        self._stopping = False
        self._store_away = False
        self._current: str | None = None

    def wake(self) -> None:
        """An operation is waiting: look now."""
        if self._sleeping is not None:
            d, call = self._sleeping
            self._sleeping = None
            if call.active():
                call.cancel()
            d.callback(None)

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self._loop = Deferred.fromCoroutine(self._run())

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        self._stopping = True
        self.wake()
        loop, self._loop = self._loop, None
        return loop

    def _sleep(self, seconds: float) -> Deferred[None]:
        d: Deferred[None] = Deferred()

        def done() -> None:
            if self._sleeping is not None and self._sleeping[0] is d:
                self._sleeping = None
                d.callback(None)

        self._sleeping = (d, self.reactor.callLater(seconds, done))
        return d

    async def _run(self) -> None:
        while not self._stopping:
            try:
                worked = await self._one()
            except StoreUnavailable as e:
                # The database is away (the listeners answer 503 meanwhile):
                # one line, not a traceback every few seconds.
                if not self._store_away:
                    log.warn(
                        "group operation fan-out: the store is unavailable ({error}); "
                        "trying again every {seconds}s",
                        error=str(e),
                        seconds=POLL_INTERVAL,
                    )
                self._store_away, worked = True, False
            except Exception:
                log.failure(
                    "group operation fan-out failed; trying again in {seconds}s", seconds=POLL_INTERVAL
                )
                worked = False
            if self._current is not None:
                # Stopping (or failed) in the middle: let another continue at once.
                current, self._current = self._current, None
                try:
                    await self.store.release_operation(current, self.owner)
                except StoreUnavailable as e:
                    log.warn(
                        "group operation {operation_id} not released ({error}): another process "
                        "continues it when its lease ends",
                        operation_id=current,
                        error=str(e),
                    )
                except Exception:
                    log.failure("cannot release group operation {operation_id}", operation_id=current)
            if not worked and not self._stopping:
                await self._sleep(POLL_INTERVAL)

    async def _one(self) -> bool:
        """Claim one operation and fan it out; False when there was none."""
        now = self.reactor.seconds()
        leases = await self.store.operation_leases()
        if self._store_away:
            log.info("group operation fan-out: the store is back")
            self._store_away = False
        dead = sorted(
            {
                o.lease_owner
                for o in leases
                if o.lease_owner is not None and owner_is_dead(o.lease_owner, host=self.host, pid=self.pid)
            }
        )
        op = await self.store.claim_operation(self.owner, now, now + self.config.fanout_lease, takeover=dead)
        if op is None:
            return False
        self._current = op.operation_id
        total: int | None = None
        if op.total is None:
            group = await self.store.group(op.group_name)
            total = 0 if group is None else group.members
        log.info(
            "fanning out operation {operation_id} to group {group} ({progress})",
            operation_id=op.operation_id,
            group=op.group_name,
            progress="starting" if op.cursor is None else f"resuming after {op.queued + op.skipped} members",
        )
        record: OperationRecord | None = op
        while record is not None and record.state == "queuing" and not self._stopping:
            now = self.reactor.seconds()
            record = await self.store.fan_out(
                op.operation_id,
                self.owner,
                now,
                now + self.config.fanout_lease,
                limit=self.config.fanout_batch,
                total=total,
            )
            total = None
            # Yield between batches (and pause, if configured; a stop cuts it short).
            await self._sleep(self.config.fanout_pause)
        if record is None:
            log.warn(
                "lost the lease of operation {operation_id}; another process goes on",
                operation_id=op.operation_id,
            )
        elif record.state != "queuing":
            log.info(
                "operation {operation_id}: {queued} of {total} members queued, {skipped} skipped",
                operation_id=op.operation_id,
                queued=record.queued,
                total=record.total,
                skipped=record.skipped,
            )
        if record is None or record.state != "queuing":
            self._current = None
        return True
