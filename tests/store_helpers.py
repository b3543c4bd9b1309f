"""What the store tests share: a reactor stand-in, a bounded wait, and
sample records."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from mdmd.store import DeviceEnrollment, HostEnrollment, Store

T = TypeVar("T")


class ThreadReactor:
    """Just enough reactor for the store outside a running reactor: results
    are delivered on the store's threads and awaited with a bounded wait."""

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kw: Any) -> None:
        f(*args, **kw)


def wait(d: Deferred[T], timeout: float = 10.0) -> T:
    done = threading.Event()
    box: list[Any] = []

    def keep(result: object) -> None:
        box.append(result)
        done.set()

    d.addBoth(keep)
    assert done.wait(timeout), "store call did not complete"
    result = box[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result  # type: ignore[no-any-return]


def host(n: int, key: bytes | None = None) -> HostEnrollment:
    return HostEnrollment(
        hardware_uuid=f"uuid-{n}",
        node_key_hash=hashlib.sha256(key or f"key-{n}".encode()).digest(),
        platform="windows",
        hostname=f"host{n}",
        hardware_serial=f"serial{n}",
        info={"n": n},
    )


def enrollment(device_id: str, host_id: int, serial: str, hw: str | None = "hw") -> DeviceEnrollment:
    return DeviceEnrollment(
        device_id=device_id,
        host_id=host_id,
        hw_dev_id=hw,
        enrollment_type="Full",
        device_name="PC",
        os_version="10.0.19045.1",
        context=(("MAC", "a"), ("MAC", "b")),
        cert_serial=serial,
        cert_thumbprint=serial.upper() * 2,
        cert_not_before=1.0,
        cert_not_after=2.0,
    )


def open_sqlite(directory: Path) -> Store:
    from mdmd.store.sqlite import SQLiteStore

    store = SQLiteStore(str(directory / "mdmd.sqlite3"), ThreadReactor())  # type: ignore[arg-type]
    store.open()
    return store


# The schema of each folder's PostgreSQL store: a store opened again on the
# same folder is another node on the same database.
_SCHEMAS: dict[Path, str] = {}


def postgresql_dsn(directory: Path | None = None) -> str:
    """A fresh, empty schema of the session's throwaway cluster (see
    pg_cluster.py), as a DSN whose search_path selects it (the same one
    again for the same *directory*); the test is skipped when PostgreSQL is
    not installed (and not required)."""
    import pytest
    from pg_cluster import shared_cluster

    cluster = shared_cluster()
    if cluster is None:
        pytest.skip("PostgreSQL is not installed (set MDMD_REQUIRE_POSTGRESQL=1 to fail instead)")
    schema = _SCHEMAS.get(directory) if directory is not None else None
    if schema is None:
        schema = cluster.new_name("s")
        cluster.sql(f"CREATE SCHEMA {schema}", "mdmd_tests")
        if directory is not None:
            _SCHEMAS[directory] = schema
    return cluster.dsn("mdmd_tests") + f" options=-csearch_path={schema}"


def open_postgresql(directory: Path) -> Store:
    from mdmd.store.postgresql import PostgreSQLStore

    store = PostgreSQLStore(postgresql_dsn(directory), ThreadReactor(), pool_size=2)  # type: ignore[arg-type]
    store.open()
    return store


#: Every backend the contract suite holds to the Store interface: name ->
#: a function that opens (not starts) a store in a folder: a fresh, empty
#: one, or, opened again on the same folder, another process's (another
#: node's) store on the same database.
BACKENDS: dict[str, Callable[[Path], Store]] = {"sqlite": open_sqlite, "postgresql": open_postgresql}
