"""The store as a twisted.application service, opened from the configuration."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorCore
from twisted.logger import Logger

from mdmd.config import ConfigError, MdmdConfig, read_password_file
from mdmd.store.interface import Store
from mdmd.store.records import StoreError
from mdmd.store.sqlite import SQLiteStore

if TYPE_CHECKING:
    from mdmd.store.postgresql import PostgreSQLStore

__all__ = ["DatabaseUnavailable", "StoreService", "open_store"]

log = Logger(namespace=__name__)


class DatabaseUnavailable(Exception):
    """The database could not be reached at start-up: the daemon exits with
    a status its service manager retries (unlike a configuration mistake)."""


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
) -> SQLiteStore | PostgreSQLStore:
    """The configured store, opened (checked and migrated when *check*).
    ConfigError for a mistake; DatabaseUnavailable for a database that does
    not answer or refuses the credentials.  *before_migration*: see
    :meth:`SQLiteStore.open` (SQLite's copy before a migration; PostgreSQL's
    backups are the operator's, with the database's own tools)."""
    if config.store.backend == "postgresql":
        return _open_postgresql(config, reactor, check=check)
    store = SQLiteStore(config.database, reactor)  # type: ignore[arg-type]
    try:
        found = store.open(check=check, before_migration=before_migration)
    except Exception as e:
        raise ConfigError(config.path, "mdmd", "state_dir", str(e)) from None
    log.info("store {path} (schema version {found})", path=config.database, found=found)
    return store


def _open_postgresql(config: MdmdConfig, reactor: IReactorCore, *, check: bool) -> PostgreSQLStore:
    from psycopg.conninfo import conninfo_to_dict

    from mdmd.store.postgresql import PostgreSQLStore, StoreUnavailable

    settings = config.store
    assert settings.dsn is not None
    password = read_password_file(config)
    store = PostgreSQLStore(
        settings.dsn,
        reactor,  # type: ignore[arg-type]
        password=password,
        pool_size=settings.pool_size,
    )
    try:
        found = store.open(check=check)
    except StoreUnavailable as e:
        raise DatabaseUnavailable(f"{config.path}: [store] dsn: cannot use the database: {e}") from None
    except StoreError as e:
        raise ConfigError(config.path, "store", "dsn", str(e)) from None
    params = conninfo_to_dict(settings.dsn)
    where = " ".join(f"{k}={params[k]}" for k in ("host", "port", "dbname", "user") if params.get(k))
    log.info(
        "store PostgreSQL {where} (schema version {found}, {pool_size} connections)",
        where=where or settings.dsn,
        found=found,
        pool_size=settings.pool_size,
    )
    return store
