"""The store as a twisted.application service, opened from the configuration."""

from __future__ import annotations

from collections.abc import Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorCore
from twisted.logger import Logger

from mdmd.config import ConfigError, MdmdConfig
from mdmd.store.interface import Store
from mdmd.store.sqlite import SQLiteStore

__all__ = ["StoreService", "open_store"]

log = Logger(namespace=__name__)


class StoreService(Service):
    def __init__(self, store: Store) -> None:
        self.store = store

    def startService(self) -> None:
        super().startService()
        self.store.start()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        self.store.stop()
        return None


def open_store(
    config: MdmdConfig,
    reactor: IReactorCore,
    *,
    check: bool = True,
    before_migration: Callable[[int, str], None] | None = None,
) -> SQLiteStore:
    store = SQLiteStore(config.database, reactor)  # type: ignore[arg-type]
    try:
        found = store.open(check=check, before_migration=before_migration)
    except Exception as e:
        raise ConfigError(config.path, "mdmd", "state_dir", str(e)) from None
    log.info("store {path} (schema version {found})", path=config.database, found=found)
    return store
