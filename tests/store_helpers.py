"""What the store tests share: a reactor stand-in, a bounded wait, and
sample records."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from mdmd.management import ManagementStep
from mdmd.store import DeviceEnrollment, DeviceQuery, DeviceRecord, HostEnrollment, Store

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
    from pg_cluster import cluster_or_skip

    cluster = cluster_or_skip()
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


# --------------------------------------------------------------------------
# A small fleet for the device list, and what the list must say about it
# --------------------------------------------------------------------------

OS_VERSIONS = ("10.0.19045.1", "10.0.22631.4460", "10.0.22631", "10.0.226310.1", None)


@dataclass(frozen=True)
class ListFleet:
    """Devices shaped to catch paging and filter mistakes: ties in every
    sort value, never-seen devices, mixed-case IDs, revoked, unenrolled and
    colliding ones; *hosts* by host ID, *valid_until* the latest valid
    certificate's end by device ID."""

    hosts: dict[int, HostEnrollment]
    valid_until: dict[str, float]


def build_list_fleet(store: Store, count: int = 30) -> ListFleet:
    hosts: dict[int, HostEnrollment] = {}
    valid_until: dict[str, float] = {}
    for i in range(count):
        enrollment_ = replace(
            host(i),
            hostname=("DESKTOP-" if i % 2 else "laptop-") + f"{i:03d}",
            hardware_serial=f"SN{i % 7}X{i}",
            hardware_uuid=f"{i:02x}ab-uuid",
        )
        h = wait(store.enroll_host(enrollment_, now=1.0))
        hosts[h.id] = enrollment_
        # Mixed case, as IDs come from devices; three devices share each
        # enrollment time.
        device_id = (f"{i:02X}dev" if i % 3 else f"{i:02x}DEV") + "ice"
        not_after = 1000.0 + (i % 5) * 100
        wait(
            store.record_device_enrollment(
                replace(
                    enrollment(device_id, h.id, f"s{i}", hw="clone" if i in (4, 9) else f"hw{i}"),
                    os_version=OS_VERSIONS[i % len(OS_VERSIONS)],
                    device_name=f"PC-{i}",
                    cert_not_after=not_after,
                ),
                now=10.0 + i // 3,
            )
        )
        valid_until[device_id] = not_after
        if i % 4:  # a quarter never check in; the others in groups of 2
            wait(store.commit_management_step(ManagementStep(device_id, session=None), now=100.0 + i // 2))
        if i % 10 == 7:  # Windows reinstalled: a new device ID on the same host
            wait(
                store.record_device_enrollment(
                    enrollment(device_id + "2", h.id, f"t{i}", hw=f"hw{i}"), now=50.0 + i
                )
            )
            valid_until[device_id + "2"] = 2.0
            del valid_until[device_id]  # its certificate is revoked
    return ListFleet(hosts, valid_until)


def expected_devices(store: Store, fleet: ListFleet, query: DeviceQuery) -> list[str]:
    """The device IDs *query* must list, in order, from a plain reading of
    every device (the reference the store's indexed query is held to)."""

    def matches(d: DeviceRecord) -> bool:
        last_seen = d.last_seen or 0
        if query.state is not None and d.state != query.state:
            return False
        if query.last_seen_before is not None and not last_seen < query.last_seen_before:
            return False
        if query.last_seen_after is not None and not last_seen >= query.last_seen_after:
            return False
        if query.os_version is not None and not (
            d.os_version == query.os_version or (d.os_version or "").startswith(query.os_version + ".")
        ):
            return False
        if query.cert_expiring_before is not None:
            until = fleet.valid_until.get(d.device_id)
            if until is None or not until < query.cert_expiring_before:
                return False
        if query.hw_dev_id_collision is not None and d.hw_dev_id_collision != query.hw_dev_id_collision:
            return False
        if query.search:
            h = fleet.hosts[d.host_id] if d.host_id is not None else None
            fields = [d.device_id, d.device_name or ""]
            if h is not None:
                fields += [h.hostname, h.hardware_serial, h.hardware_uuid]
            if not any(f.lower().startswith(query.search.lower()) for f in fields):
                return False
        return True

    def key(d: DeviceRecord) -> tuple[float, str]:
        return (d.enrolled_at if query.sort == "enrolled_at" else d.last_seen or 0, d.device_id)

    listed = sorted((d for d in wait(store.devices()) if matches(d)), key=key, reverse=query.descending)
    return [d.device_id for d in listed]


def read_all_pages(store: Store, query: DeviceQuery, limit: int) -> list[str]:
    seen: list[str] = []
    after = None
    for _ in range(1000):
        page = wait(store.device_page(query, limit=limit, after=after))
        assert len(page.devices) <= limit
        seen += [d.device_id for d in page.devices]
        if page.after is None:
            return seen
        assert page.devices, "a page that says more follow must not be empty"
        after = page.after
    raise AssertionError("the listing does not end")
