"""The daemon: configuration and key material in, a MultiService out.

``twistd mdmd`` (see :mod:`mdmd.tap`) builds the service tree here:

- the store (its transactions on their own threads),
- the *enrollment* listener (TLS): the orbit agent API and MS-MDE2
  discovery / MS-XCEP policy / MS-WSTEP enrollment,
- the *management* listener (mutual TLS, client certificates issued by the
  WSTEP identity CA): OMA-DM sessions,
- the *admin* listener (named bearer tokens): the administrators' API, and
  health, readiness and metrics without a token,
- certificate housekeeping (:mod:`mdmd.maintenance`),
- the fan-out of group operations (:mod:`mdmd.fanout`),
- with ``workers = N``, the worker processes and their supervision,
- systemd readiness and watchdog notifications, and ``systemctl reload``
  (SIGHUP): the TLS certificates read again, in every process.
"""

from __future__ import annotations

import os
import platform
import signal
import socket
import sqlite3
import sys
from collections.abc import Sequence
from typing import Any, cast

from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IReactorCore, IReactorTime, IStreamServerEndpoint
from twisted.logger import ILogObserver, Logger
from twisted.protocols.haproxy import proxyEndpoint

import twisted
from mdmd import __version__
from mdmd.app import TEST_CLOCK_OFFSET_VARIABLE, Mdmd, clock_offset_for_tests
from mdmd.config import MdmdConfig
from mdmd.fanout import FanOutService
from mdmd.health import store_check
from mdmd.listeners import (
    DeviceListener,
    ListenError,
    ListenerService,
    admin_site,
    device_listeners,
    reload_tls,
)
from mdmd.logs import json_observer
from mdmd.maintenance import CertificateMaintenance
from mdmd.material import Material
from mdmd.metrics import observe_commit
from mdmd.preflight import EX_CANTLISTEN
from mdmd.store.service import StoreService, open_store
from mdmd.tls import ReloadableTLS, TLSServerEndpoint, server_tls_options
from mdmd.tokens import AdminTokens, AdminTokensService
from mdmd.workers import WorkerPool

__all__ = ["MdmdService", "build_service"]

log = Logger(namespace=__name__)

# systemd waits this much longer for READY=1 while the database migrates.
_MIGRATION_EXTENSION_USEC = 30 * 60 * 1_000_000


def _notify_systemd(message: bytes) -> None:
    """sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message)
    except OSError as e:
        log.warn("cannot notify systemd: {error}", error=e)


def _socket(reactor: IReactorCore, listen: str, device: DeviceListener) -> IStreamServerEndpoint:
    """The listening socket's endpoint; behind a load balancer that sends
    the PROXY protocol header, the reader of that header on top."""
    endpoint = serverFromString(reactor, listen)
    return proxyEndpoint(endpoint) if device.proxy_protocol else endpoint


class MdmdService(MultiService):
    """The top of the tree: a listener that cannot listen stops start-up
    with one line and :data:`~mdmd.preflight.EX_CANTLISTEN` (the unit does
    not restart on it); with ``log_format = json``, twistd logs through the
    JSON observer."""

    def __init__(self, config: MdmdConfig) -> None:
        super().__init__()
        self.config = config

    def setServiceParent(self, parent: Any) -> None:
        # twistd asks the application for a log observer before it starts
        # logging, after this service is attached to it.
        if self.config.log_format == "json" and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, json_observer(sys.stdout))
        super().setServiceParent(parent)

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except ListenError as e:
            # Logging has begun and sys.stderr goes to the log by now: the
            # line goes to the process's real standard error, like a
            # configuration error's.
            stderr = sys.__stderr__ or sys.stderr
            stderr.write(f"mdmd: {e}\n")
            stderr.flush()
            raise SystemExit(EX_CANTLISTEN) from None


class ReloadService(Service):
    """SIGHUP (``systemctl reload``): the TLS certificates read again here
    (the admin listener's too) and in every worker process."""

    def __init__(
        self,
        app: Mdmd,
        listeners: Sequence[DeviceListener],
        pool: WorkerPool | None,
        admin_tls: ReloadableTLS | None = None,
    ) -> None:
        self.app = app
        self.listeners = listeners
        self.pool = pool
        self.admin_tls = admin_tls

    def startService(self) -> None:
        super().startService()
        reactor = self.app.reactor
        signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(self.reload))  # type: ignore[attr-defined]

    def stopService(self) -> Deferred[None] | None:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        return super().stopService()  # type: ignore[no-any-return]

    def reload(self) -> None:
        log.info("reload: SIGHUP received")
        reload_tls(self.app, self.listeners, self.admin_tls)
        if self.pool is not None:
            self.pool.signal_workers("HUP")


def _before_migration(version: int, copy: str) -> None:
    log.info(
        "store: migrating the database from schema version {version}; a copy of it as it was is in {copy}",
        version=version,
        copy=copy,
    )
    _notify_systemd(
        f"EXTEND_TIMEOUT_USEC={_MIGRATION_EXTENSION_USEC}\nSTATUS=migrating the database".encode()
    )


def build_service(
    config: MdmdConfig, material: Material, reactor: IReactorCore, warnings: Sequence[str] = ()
) -> MdmdService:
    log.info(
        "mdmd {version} starting (Python {python}, Twisted {twisted}, SQLite {sqlite}); configuration {path}",
        version=__version__,
        python=platform.python_version(),
        twisted=twisted.__version__,
        sqlite=sqlite3.sqlite_version,
        path=config.path,
    )
    for warning in warnings:
        log.warn("{warning}", warning=warning)
    top = MdmdService(config)
    store = open_store(config, reactor, before_migration=_before_migration)
    store.on_commit = observe_commit
    StoreService(store).setServiceParent(top)

    # Group operations are fanned out by the main process only.
    fanout = FanOutService(store, cast(IReactorTime, reactor), config.actions)
    tokens = AdminTokens(store)
    app = Mdmd(
        config=config,
        material=material,
        store=store,
        reactor=reactor,
        tokens=tokens,
        wake_fanout=fanout.wake,
        clock_offset=clock_offset_for_tests(),
    )
    if app.clock_offset:
        log.warn(
            "TEST ONLY: the clock is moved by {offset} s ({variable}); never in production",
            offset=app.clock_offset,
            variable=TEST_CLOCK_OFFSET_VARIABLE,
        )
    # Added after the store: stopped before it.
    CertificateMaintenance(app).setServiceParent(top)
    tokens_service = AdminTokensService(tokens, material.admin_token, app.now(), reactor)  # type: ignore[arg-type]
    tokens_service.setServiceParent(top)
    app.readiness.add("store", store_check(store, reactor))  # type: ignore[arg-type]

    async def tokens_loaded() -> str | None:
        waiting = tokens.pending()
        if waiting is not None:  # starting: the load is a moment away
            await waiting
        return None if tokens.loaded else "the admin tokens cannot be loaded"

    app.readiness.add("admin tokens", tokens_loaded)
    enrollment, management = device_listeners(app)
    listen = {"enrollment": config.enrollment.listen, "management": config.management.listen}

    # The admin listener's TLS, replaced on reload like the devices' listeners'.
    admin_tls = None if material.admin_tls is None else ReloadableTLS(server_tls_options(*material.admin_tls))
    listeners = [
        *(
            ListenerService(
                device.name,
                TLSServerEndpoint(_socket(reactor, listen[device.name], device), device.tls, device.refusals),
                device.site,
                device.public_url,
                device.description,
                config_path=config.path,
                listen=listen[device.name],
            )
            for device in (enrollment, management)
        ),
        ListenerService(
            "admin",
            serverFromString(reactor, config.admin.listen)
            if admin_tls is None
            else TLSServerEndpoint(serverFromString(reactor, config.admin.listen), admin_tls),
            admin_site(app),
            config.admin.url,
            "HTTP, bearer token" if admin_tls is None else "TLS, bearer token",
            config_path=config.path,
            listen=config.admin.listen,
        ),
    ]
    for listener in listeners:
        listener.setServiceParent(top)
        app.readiness.add(f"{listener.name} listener", listener.problem)
    if management.refusals is not None:
        # The counts of the last minute's refusals are logged, not lost.
        reactor.addSystemEventTrigger("before", "shutdown", management.refusals.stop)
    # After the store: services stop in reverse order, the loop before the store.
    fanout.setServiceParent(top)
    ready_when: list[Deferred[Any]] = [listener.listening for listener in listeners]
    ready_when.append(tokens_service.loaded)

    pool = None
    if config.workers > 1:
        pool = WorkerPool(config, reactor, listeners[0].listening, listeners[1].listening)
        pool.setServiceParent(top)
        ready_when.append(pool.ready)
        app.readiness.add("workers", pool.problem)
    ReloadService(app, (enrollment, management), pool, admin_tls).setServiceParent(top)

    def ready(_: object) -> None:
        _notify_systemd(b"READY=1\nSTATUS=serving")

    DeferredList(ready_when, fireOnOneErrback=True).addCallback(ready)

    watchdog_usec = os.environ.get("WATCHDOG_USEC", "")
    if watchdog_usec.isdigit() and int(watchdog_usec) > 0:
        # Pinged from the reactor: a blocked reactor misses pings and systemd
        # restarts the daemon.
        TimerService(int(watchdog_usec) / 2e6, _notify_systemd, b"WATCHDOG=1").setServiceParent(top)
    return top
