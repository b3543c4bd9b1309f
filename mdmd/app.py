"""What every request handler shares: configuration, key material, the store."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet.interfaces import IReactorCore

from mdmd.config import MdmdConfig
from mdmd.material import Material
from mdmd.store import Store

__all__ = ["Mdmd"]


@dataclass(frozen=True, slots=True)
class Mdmd:
    config: MdmdConfig
    material: Material
    store: Store
    reactor: IReactorCore
    #: Tells the group operations' fan-out that one is waiting (the main
    #: process only: it alone serves the admin API and fans out).
    wake_fanout: Callable[[], None] | None = None

    def now(self) -> float:
        return self.reactor.seconds()  # type: ignore[attr-defined,no-any-return]
