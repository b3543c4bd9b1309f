"""Every metric mdmd exports, in the Prometheus text format through
``prometheus_client``.  Adding a metric is one line here and one call where
it happens (``metrics.ENROLLMENTS.inc()``).

Two kinds:

- counters and histograms updated where things happen (requests,
  enrollments, check-in sessions, store commits);
- counts over the whole fleet that only the database knows (devices by
  state, commands by state, certificates expiring soon): one entry of
  :data:`FLEET_GAUGES` each, read by the store's ``fleet_counts`` off the
  reactor and cached (``[admin] metrics_cache_seconds``) by
  :class:`mdmd.health.FleetCountsCache`, so that a scrape never makes the
  reactor walk the fleet.  A new one is a line here and a query in
  ``fleet_counts``.

With ``[mdmd] workers = N`` every process counts its own requests.  The main
process then runs prometheus_client in multiprocess mode: each process
writes its values to memory-mapped files in ``state_dir/metrics`` (emptied
when the main process starts), and ``/metrics`` on the admin listener sums
them, so one scrape sees the whole node.  The environment variable
``PROMETHEUS_MULTIPROC_DIR`` must be set before prometheus_client is first
imported (``twistd mdmd`` does so before it imports the daemon; worker
processes inherit it).  Counters of a worker that died stay in the sum, as
Prometheus expects of counters; they restart from zero when the main process
does.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from mdmd.store.records import FleetCounts

__all__ = [
    "AGENT_ENROLLMENTS",
    "CHECKIN_SESSIONS",
    "COMMANDS_QUEUED",
    "CONTENT_TYPE",
    "ENROLLMENTS",
    "FLEET",
    "FLEET_GAUGES",
    "HTTP_DURATION",
    "HTTP_REQUESTS",
    "REGISTRY",
    "RENEWALS",
    "STORE_COMMIT_BATCH",
    "STORE_COMMIT_SECONDS",
    "exposition",
    "observe_commit",
]

MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE: Final = CONTENT_TYPE_LATEST

#: This process's metrics.
REGISTRY: Final = CollectorRegistry()

_LATENCY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_COMMIT_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

# -- updated where things happen ----------------------------------------------

HTTP_REQUESTS: Final = Counter(
    "mdmd_http_requests",
    "HTTP requests answered, by listener, endpoint (route template) and status",
    ["listener", "endpoint", "status"],
    registry=REGISTRY,
)
HTTP_DURATION: Final = Histogram(
    "mdmd_http_request_duration_seconds",
    "Time from a request's arrival to its answer, by listener and endpoint",
    ["listener", "endpoint"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
AGENT_ENROLLMENTS: Final = Counter(
    "mdmd_agent_enrollments", "Orbit agents enrolled (node key issued)", registry=REGISTRY
)
ENROLLMENTS: Final = Counter(
    "mdmd_enrollments", "MDM enrollments completed (device certificate issued and stored)", registry=REGISTRY
)
CHECKIN_SESSIONS: Final = Counter(
    "mdmd_checkin_sessions", "OMA-DM sessions devices started (check-ins)", registry=REGISTRY
)
COMMANDS_QUEUED: Final = Counter("mdmd_commands_queued", "Commands administrators queued", registry=REGISTRY)
RENEWALS: Final = Counter(
    "mdmd_renewals", "Device certificates renewed (MS-WSTEP renewal stored)", registry=REGISTRY
)
STORE_COMMIT_SECONDS: Final = Histogram(
    "mdmd_store_commit_seconds",
    "Time of one group commit of the store, from BEGIN to a durable COMMIT",
    buckets=_COMMIT_BUCKETS,
    registry=REGISTRY,
)
STORE_COMMIT_BATCH: Final = Histogram(
    "mdmd_store_commit_batch_size",
    "Transactions that shared one group commit",
    buckets=(1, 2, 4, 8, 16, 32, 64),
    registry=REGISTRY,
)

# -- counts over the whole fleet, from the store ------------------------------

#: fleet_counts key -> (metric name, help, label name or None).
FLEET_GAUGES: Final[dict[str, tuple[str, str, str | None]]] = {
    "devices": ("mdmd_devices", "Devices by enrollment state", "state"),
    "commands": ("mdmd_commands", "Commands by state", "state"),
    "certificates_expiring": (
        "mdmd_certificates_expiring_30d",
        "Valid device certificates that expire within 30 days",
        None,
    ),
    "profiles": ("mdmd_device_profiles", "Device profile records by state", "state"),
}


class FleetCollector(Collector):
    """The last fleet counts read from the store (kept by
    :class:`mdmd.health.FleetCountsCache`)."""

    def __init__(self) -> None:
        self.counts: FleetCounts | None = None
        self.updated_at: float | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts = self.counts
        if counts is None:
            return
        for key, (name, text, label) in FLEET_GAUGES.items():
            values = counts.get(key, {})
            family = GaugeMetricFamily(name, text, labels=[label] if label else None)
            for value_label, value in sorted(values.items()):
                family.add_metric([value_label] if label else [], value)
            yield family
        if self.updated_at is not None:
            yield GaugeMetricFamily(
                "mdmd_fleet_counts_updated_timestamp_seconds",
                "When the fleet-wide counts above were read from the store",
                value=self.updated_at,
            )


FLEET: Final = FleetCollector()
REGISTRY.register(FLEET)


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


if multiprocess_dir() is None:
    # Meaningful for one process only; in multiprocess mode each worker's
    # would be summed into nonsense.
    ProcessCollector(registry=REGISTRY)
    PlatformCollector(registry=REGISTRY)


def observe_commit(batch: int, seconds: float) -> None:
    """The store's group-commit hook (called on its writer thread)."""
    STORE_COMMIT_SECONDS.observe(seconds)
    STORE_COMMIT_BATCH.observe(batch)


def exposition() -> bytes:
    """Everything, in the text format; in multiprocess mode, every
    process's values summed (reads files: call it off the reactor)."""
    directory = multiprocess_dir()
    if directory is None:
        return generate_latest(REGISTRY)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)
    registry.register(FLEET)
    return generate_latest(registry)
