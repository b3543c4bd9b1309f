"""Certificate housekeeping, in the main process: at start-up and then every
hour, certificates that ended while a renewal of them exists are retired
(revoked as ``renewed``), and certificates revoked as ``superseded`` or
``renewed`` more than ``[wstep] keep_revoked_days`` ago are deleted, so a
device's history does not grow for ever.

The work is done by the store, off the reactor, in transactions of at most
:data:`BATCH` rows: other writes go in between, and no pass holds the
writer for long.

With several nodes on one database, each node's main process runs this
service, but a pass runs only under the store's lease on the job (see
:meth:`~mdmd.store.Store.claim_lease`), claimed for one interval: one node
keeps doing the work, renewing its lease at each pass, and when it is gone
another takes over once the lease has run out.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from typing import Final

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from mdmd.app import Mdmd
from mdmd.renewal import DAY
from mdmd.store import StoreUnavailable

__all__ = ["BATCH", "CertificateMaintenance"]

log = Logger(namespace=__name__)

#: Rows per transaction.
BATCH: Final = 500
#: Transactions per pass and kind; what is left waits for the next pass.
MAX_BATCHES: Final = 200
#: The lease the passes run under.
LEASE: Final = "certificate-maintenance"


def node_name() -> str:
    """This process among the nodes sharing a database: host, process, and
    a random part (a process ID is reused)."""
    return f"{socket.gethostname()} pid {os.getpid()} {uuid.uuid4().hex[:8]}"


class CertificateMaintenance(Service):
    """Retires ended, renewed certificates and prunes old revoked ones."""

    name = "certificate-maintenance"

    def __init__(
        self, app: Mdmd, *, interval: float = 3600.0, batch: int = BATCH, holder: str | None = None
    ) -> None:
        self.app = app
        self.interval = interval
        self.batch = batch
        self.holder = holder or node_name()
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self.run)
        self._loop.clock = self.app.reactor  # type: ignore[assignment]
        self._loop.start(self.interval, now=True).addErrback(
            lambda failure: log.failure("certificate maintenance stopped", failure)
        )

    def stopService(self) -> Deferred[None] | None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return super().stopService()  # type: ignore[no-any-return]

    def run(self) -> Deferred[None]:
        """One pass (a failure is logged; the next pass tries again)."""
        d = Deferred.fromCoroutine(self._pass())
        d.addErrback(_logged)
        return d

    async def _pass(self) -> None:
        store = self.app.store
        now = self.app.now()
        if not await store.claim_lease(LEASE, self.holder, now, now + self.interval):
            return  # another node does it
        keep = self.app.config.wstep.keep_revoked_days
        retired = await self._batches(lambda: store.retire_renewed_certificates(now, limit=self.batch))
        pruned = await self._batches(lambda: store.prune_certificates(now - keep * DAY, limit=self.batch))
        if retired or pruned:
            log.info(
                "certificates: {retired} renewed one(s) past their end revoked, {pruned} revoked more "
                "than {keep} days ago deleted",
                retired=retired,
                pruned=pruned,
                keep=keep,
            )

    async def _batches(self, step: Callable[[], Awaitable[int]]) -> int:
        total = 0
        for _ in range(MAX_BATCHES):
            done = await step()
            total += done
            if done < self.batch:
                break
        return total


def _logged(failure: Failure) -> None:
    if failure.check(StoreUnavailable):
        # The database is away: one line (the next pass tries again).
        log.warn("certificate maintenance pass skipped: {error}", error=failure.getErrorMessage())
    else:
        log.failure("certificate maintenance pass failed", failure)
