"""What every request handler shares: configuration, key material, the store."""

from __future__ import annotations

from collections.abc import Mapping
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

__all__ = ["Mdmd"]

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

    def now(self) -> float:
        return self.reactor.seconds()  # type: ignore[attr-defined,no-any-return]

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
