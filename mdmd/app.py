"""What every request handler shares: configuration, key material, the store."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IReactorCore
from twisted.logger import Logger

from mdmd.config import MdmdConfig
from mdmd.health import Readiness
from mdmd.material import Material
from mdmd.store import AuditEntry, Store
from mdmd.tokens import AdminTokens

if TYPE_CHECKING:
    from mdmd.web import MdmdRequest

__all__ = ["TEST_CLOCK_OFFSET_VARIABLE", "Mdmd", "clock_offset_for_tests"]

#: TEST ONLY.  Seconds added to the daemon's clock, read once at start-up,
#: so that an end-to-end test can run a daemon "days later" (inside a
#: certificate's renewal window, past its end) without waiting.  Everything
#: mdmd decides with time uses :meth:`Mdmd.now`; OpenSSL keeps checking
#: certificate validity with the real clock.  Never set it in production.
TEST_CLOCK_OFFSET_VARIABLE = "MDMD_TEST_CLOCK_OFFSET"


def clock_offset_for_tests(environ: Mapping[str, str] = os.environ) -> float:
    """The test-only clock offset of :data:`TEST_CLOCK_OFFSET_VARIABLE` (0 when unset)."""
    raw = environ.get(TEST_CLOCK_OFFSET_VARIABLE, "").strip()
    if not raw:
        return 0.0
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{TEST_CLOCK_OFFSET_VARIABLE}={raw!r} is not a number of seconds") from None


log = Logger(namespace="mdmd.audit")


@dataclass(frozen=True, slots=True)
class Mdmd:
    config: MdmdConfig
    material: Material
    store: Store
    reactor: IReactorCore
    #: The admin API's tokens (the main process only: it alone serves admin).
    tokens: AdminTokens | None = None
    #: What /readyz checks.
    readiness: Readiness = field(default_factory=Readiness)

    #: Added to the reactor's clock (see :data:`TEST_CLOCK_OFFSET_VARIABLE`).
    clock_offset: float = 0.0
    #: Tells the group operations' fan-out that one is waiting (the main
    #: process only: it alone serves the admin API and fans out).
    wake_fanout: Callable[[], None] | None = None

    def now(self) -> float:
        """Seconds since the epoch: every decision mdmd makes with time
        (certificate dates, renewal windows, pruning) uses this clock."""
        return self.reactor.seconds() + self.clock_offset  # type: ignore[attr-defined,no-any-return]

    def audit_entry(
        self,
        request: MdmdRequest,
        action: str,
        target: str | None,
        detail: Mapping[str, Any] | None = None,
    ) -> AuditEntry:
        """The audit record of an administrator's write: who (the request's
        token name), what, on what, from where.  Pass it to a store method's
        ``audit`` argument to record it in the write's own transaction."""
        return AuditEntry(
            at=self.now(),
            actor=request.admin or "-",
            action=action,
            target=target,
            detail=dict(detail or {}),
            client=request.client_address,
            request_id=request.request_id,
        )

    async def audit(
        self,
        request: MdmdRequest,
        action: str,
        target: str | None,
        detail: Mapping[str, Any] | None = None,
    ) -> None:
        """Record an administrator's write that was not one store call with
        an ``audit`` argument, right after it: one call for every write."""
        entry = self.audit_entry(request, action, target, detail)
        await self.store.record_audit(entry)
        log.info(
            "audit: {actor} {action} {target}",
            actor=entry.actor,
            action=action,
            target=target,
            client=entry.client,
            request_id=entry.request_id,
        )
