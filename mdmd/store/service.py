"""The store as a twisted.application service, opened from the configuration."""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorCore
from twisted.logger import Logger

from mdmd.config import ConfigError, MdmdConfig, read_password_file
from mdmd.store.interface import Store
from mdmd.store.records import StoreError

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


def open_store(config: MdmdConfig, reactor: IReactorCore, *, check: bool = True) -> Store:
    """The configured store, opened (checked and migrated when *check*).
    ConfigError for a mistake; DatabaseUnavailable for a database that does
    not answer or refuses the credentials."""
    if config.store.backend == "postgresql":
        return _open_postgresql(config, reactor, check=check)
    from mdmd.store.sqlite import SQLiteStore

    store = SQLiteStore(config.database, reactor)  # type: ignore[arg-type]
    try:
        found = store.open(check=check)
    except Exception as e:
        raise ConfigError(config.path, "mdmd", "state_dir", str(e)) from None
    log.info("store {path} (schema version {found})", path=config.database, found=found)
    return store


def _open_postgresql(config: MdmdConfig, reactor: IReactorCore, *, check: bool) -> Store:
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
