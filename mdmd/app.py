"""What every request handler shares: configuration, key material, the store."""

from __future__ import annotations

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

    def now(self) -> float:
        return self.reactor.seconds()  # type: ignore[attr-defined,no-any-return]
