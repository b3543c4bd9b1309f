"""The daemon: configuration and key material in, a MultiService out.

``twistd mdmd`` (see :mod:`mdmd.tap`) builds the service tree here:

- the store (its transactions on their own threads),
- the *enrollment* listener (TLS): the orbit agent API and MS-MDE2
  discovery / MS-XCEP policy / MS-WSTEP enrollment,
- the *management* listener (mutual TLS, client certificates issued by the
  WSTEP identity CA): OMA-DM sessions,
- the *admin* listener (bearer token): the administrators' API,
- certificate housekeeping (:mod:`mdmd.maintenance`),
- with ``workers = N``, the worker processes and their supervision,
- systemd readiness and watchdog notifications.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IReactorCore, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.protocols.haproxy import proxyEndpoint

from mdmd.app import TEST_CLOCK_OFFSET_VARIABLE, Mdmd, clock_offset_for_tests
from mdmd.config import MdmdConfig
from mdmd.listeners import DeviceListener, ListenerService, admin_site, device_listeners
from mdmd.maintenance import CertificateMaintenance
from mdmd.material import Material
from mdmd.store.service import StoreService, open_store
from mdmd.tls import TLSServerEndpoint
from mdmd.workers import WorkerPool

__all__ = ["build_service"]

log = Logger(namespace=__name__)


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


def build_service(config: MdmdConfig, material: Material, reactor: IReactorCore) -> MultiService:
    top = MultiService()
    store = open_store(config, reactor)
    StoreService(store).setServiceParent(top)

    app = Mdmd(
        config=config, material=material, store=store, reactor=reactor, clock_offset=clock_offset_for_tests()
    )
    if app.clock_offset:
        log.warn(
            "TEST ONLY: the clock is moved by {offset} s ({variable}); never in production",
            offset=app.clock_offset,
            variable=TEST_CLOCK_OFFSET_VARIABLE,
        )
    # Added after the store: stopped before it.
    CertificateMaintenance(app).setServiceParent(top)
    enrollment, management = device_listeners(app)
    listen = {"enrollment": config.enrollment.listen, "management": config.management.listen}

    listeners = [
        *(
            ListenerService(
                device.name,
                TLSServerEndpoint(_socket(reactor, listen[device.name], device), device.tls, device.refusals),
                device.site,
                device.public_url,
                device.description,
            )
            for device in (enrollment, management)
        ),
        ListenerService(
            "admin",
            serverFromString(reactor, config.admin.listen),
            admin_site(app),
            config.admin.url,
            "HTTP, bearer token",
        ),
    ]
    for listener in listeners:
        listener.setServiceParent(top)
    if management.refusals is not None:
        # The counts of the last minute's refusals are logged, not lost.
        reactor.addSystemEventTrigger("before", "shutdown", management.refusals.stop)
    ready_when: list[Deferred[Any]] = [listener.listening for listener in listeners]

    if config.workers > 1:
        pool = WorkerPool(config, reactor, listeners[0].listening, listeners[1].listening)
        pool.setServiceParent(top)
        ready_when.append(pool.ready)

    def ready(_: object) -> None:
        _notify_systemd(b"READY=1\nSTATUS=serving")

    DeferredList(ready_when, fireOnOneErrback=True).addCallback(ready)

    watchdog_usec = os.environ.get("WATCHDOG_USEC", "")
    if watchdog_usec.isdigit() and int(watchdog_usec) > 0:
        # Pinged from the reactor: a blocked reactor misses pings and systemd
        # restarts the daemon.
        TimerService(int(watchdog_usec) / 2e6, _notify_systemd, b"WATCHDOG=1").setServiceParent(top)
    return top
