"""The daemon: configuration and key material in, a MultiService out.

``twistd mdmd`` (see :mod:`mdmd.tap`) builds the service tree here:

- the store (SQLite on its own thread),
- the *enrollment* listener (TLS): the orbit agent API and MS-MDE2
  discovery / MS-XCEP policy / MS-WSTEP enrollment,
- the *management* listener (mutual TLS, client certificates issued by the
  WSTEP identity CA): OMA-DM sessions,
- the *admin* listener (bearer token): the administrators' API.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IReactorCore, IStreamServerEndpoint
from twisted.internet.ssl import CertificateOptions
from twisted.logger import Logger

from mdmd import pki
from mdmd.app import Mdmd
from mdmd.config import ConfigError, MdmdConfig
from mdmd.routes import admin_routes, enrollment_routes, management_routes
from mdmd.store import SQLiteStore
from mdmd.tls import TLSServerEndpoint, mutual_tls_options, server_tls_options
from mdmd.web import AdminRouter, MdmdSite, Router

__all__ = [
    "DeviceListener",
    "Material",
    "bootstrap_plan",
    "build_service",
    "device_listeners",
    "load_material",
    "open_store",
]

log = Logger(namespace="mdmd.service")


@dataclass(frozen=True, slots=True)
class Material:
    """Certificates, keys and secrets, loaded once at start-up."""

    enrollment_chain: Sequence[x509.Certificate]
    enrollment_key: PrivateKeyTypes
    management_chain: Sequence[x509.Certificate]
    management_key: PrivateKeyTypes
    identity_cert: x509.Certificate
    identity_key: rsa.RSAPrivateKey
    enroll_secret: str
    admin_token: str


def bootstrap_plan(config: MdmdConfig) -> pki.BootstrapPlan:
    hosts: list[str] = []
    for url in (config.enrollment.url, config.management.url):
        host = urlsplit(url).hostname
        if host and host not in hosts:
            hosts.append(host)
    own_tls = config.management.tls_cert == config.enrollment.tls_cert
    return pki.BootstrapPlan(
        identity_cert=config.wstep.identity_cert,
        identity_key=config.wstep.identity_key,
        tls_cert=config.enrollment.tls_cert,
        tls_key=config.enrollment.tls_key,
        tls_root_cert=config.tls_root_cert,
        tls_root_key=config.tls_root_key,
        tls_hosts=hosts if own_tls else hosts[:1],
        enroll_secret_file=config.enrollment.enroll_secret_file,
        admin_token_file=config.admin.token_file,
    )


def _read(path: str, section: str, key: str, config: MdmdConfig) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        hint = "" if config.bootstrap else " (set [mdmd] bootstrap = yes, or run mdmctl init)"
        raise ConfigError(config.path, section, key, f"{path}: {e.strerror}{hint}") from None


def _chain(config: MdmdConfig, section: str, key: str, path: str) -> list[x509.Certificate]:
    try:
        return pki.load_pem_certificates(_read(path, section, key, config), path)
    except ValueError as e:
        raise ConfigError(config.path, section, key, str(e)) from None


def _key(config: MdmdConfig, section: str, key: str, path: str, cert: x509.Certificate) -> PrivateKeyTypes:
    try:
        private = pki.load_pem_private_key(_read(path, section, key, config), path)
    except ValueError as e:
        raise ConfigError(config.path, section, key, str(e)) from None
    if not pki.key_matches_certificate(private, cert):
        raise ConfigError(config.path, section, key, f"{path}: key does not match its certificate")
    return private


def _secret(config: MdmdConfig, section: str, key: str, path: str) -> str:
    raw = _read(path, section, key, config)
    try:
        value = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError(config.path, section, key, f"{path}: not UTF-8 text") from None
    if len(value) < 16:
        raise ConfigError(config.path, section, key, f"{path}: secret is shorter than 16 characters")
    return value


def load_material(config: MdmdConfig) -> Material:
    """Load and cross-check every file the daemon needs; ConfigError on the first problem."""
    e, m, w = config.enrollment, config.management, config.wstep
    enrollment_chain = _chain(config, "enrollment", "tls_cert", e.tls_cert)
    enrollment_key = _key(config, "enrollment", "tls_key", e.tls_key, enrollment_chain[0])
    if (m.tls_cert, m.tls_key) == (e.tls_cert, e.tls_key):
        management_chain, management_key = enrollment_chain, enrollment_key
    else:
        management_chain = _chain(config, "management", "tls_cert", m.tls_cert)
        management_key = _key(config, "management", "tls_key", m.tls_key, management_chain[0])
    identity = _chain(config, "wstep", "identity_cert", w.identity_cert)
    if len(identity) != 1:
        raise ConfigError(
            config.path, "wstep", "identity_cert", f"{w.identity_cert}: expected exactly one certificate"
        )
    identity_key = _key(config, "wstep", "identity_key", w.identity_key, identity[0])
    if not isinstance(identity_key, rsa.RSAPrivateKey) or identity_key.key_size < 2048:
        raise ConfigError(
            config.path, "wstep", "identity_key", f"{w.identity_key}: must be an RSA key of 2048 bits or more"
        )
    try:
        constraints = identity[0].extensions.get_extension_for_class(x509.BasicConstraints).value
        ca = constraints.ca
    except x509.ExtensionNotFound:
        ca = False
    if not ca:
        raise ConfigError(
            config.path,
            "wstep",
            "identity_cert",
            f"{w.identity_cert}: not a CA certificate (CA:true required)",
        )
    return Material(
        enrollment_chain=enrollment_chain,
        enrollment_key=enrollment_key,
        management_chain=management_chain,
        management_key=management_key,
        identity_cert=identity[0],
        identity_key=identity_key,
        enroll_secret=_secret(config, "enrollment", "enroll_secret_file", e.enroll_secret_file),
        admin_token=_secret(config, "admin", "token_file", config.admin.token_file),
    )


def prepare(config: MdmdConfig) -> Material:
    """Bootstrap missing material if configured, then load it (before the reactor runs)."""
    if config.bootstrap:
        try:
            os.makedirs(config.state_dir, mode=0o700, exist_ok=True)
            created = pki.bootstrap(bootstrap_plan(config), now=datetime.now(UTC))
        except (OSError, pki.BootstrapError) as e:
            raise ConfigError(config.path, "mdmd", "bootstrap", str(e)) from None
        for path in created:
            log.info("bootstrap created {path}", path=path)
    return load_material(config)


# --- listeners ---


class ListenerService(StreamServerEndpointService):
    """A listener that says where it listens, and fails start-up if it cannot."""

    def __init__(
        self,
        name: str,
        endpoint: IStreamServerEndpoint,
        factory: IProtocolFactory,
        public_url: str,
        description: str,
    ) -> None:
        super().__init__(endpoint, factory)
        self.setName(name)
        self.public_url = public_url
        self.description = description
        self._raiseSynchronously = True
        self.listening: Deferred[IListeningPort] = Deferred()

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        assert self._waitingForPort is not None
        self._waitingForPort.addCallback(self._listening)

    def _listening(self, port: IListeningPort | None) -> IListeningPort | None:
        if port is not None:
            address = port.getHost()
            where = f"{getattr(address, 'host', address)}:{getattr(address, 'port', '')}"
            log.info(
                "{listener} listener ({description}) on {address}, public URL {url}",
                listener=self.name,
                description=self.description,
                address=where,
                url=self.public_url,
            )
            self.listening.callback(port)
        return port


class StoreService(Service):
    def __init__(self, store: SQLiteStore) -> None:
        self.store = store

    def startService(self) -> None:
        super().startService()
        self.store.start()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        self.store.stop()
        return None


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


@dataclass(frozen=True, slots=True)
class DeviceListener:
    """What a device-facing listener serves: its TLS options and its site.
    The main process listens with it; worker processes adopt its socket."""

    name: str
    tls: CertificateOptions
    site: MdmdSite
    public_url: str
    description: str


def device_listeners(app: Mdmd) -> tuple[DeviceListener, DeviceListener]:
    """The enrollment (TLS) and management (mutual TLS) listeners of *app*."""
    config, material = app.config, app.material
    return (
        DeviceListener(
            "enrollment",
            server_tls_options(material.enrollment_chain, material.enrollment_key),
            MdmdSite(
                Router(enrollment_routes(app)),
                listener="enrollment",
                max_body_bytes=config.enrollment.max_body_bytes,
            ),
            config.enrollment.url,
            "TLS",
        ),
        DeviceListener(
            "management",
            mutual_tls_options(material.management_chain, material.management_key, [material.identity_cert]),
            MdmdSite(
                Router(management_routes(app)),
                listener="management",
                max_body_bytes=config.management.max_body_bytes,
            ),
            config.management.url,
            "mutual TLS",
        ),
    )


def open_store(config: MdmdConfig, reactor: IReactorCore, *, check: bool = True) -> SQLiteStore:
    store = SQLiteStore(config.database, reactor)  # type: ignore[arg-type]
    try:
        found = store.open(check=check)
    except Exception as e:
        raise ConfigError(config.path, "mdmd", "state_dir", str(e)) from None
    log.info("store {path} (schema version {found})", path=config.database, found=found)
    return store


def build_service(config: MdmdConfig, material: Material, reactor: IReactorCore) -> MultiService:
    top = MultiService()
    store = open_store(config, reactor)
    StoreService(store).setServiceParent(top)

    app = Mdmd(config=config, material=material, store=store, reactor=reactor)
    enrollment, management = device_listeners(app)
    listen = {"enrollment": config.enrollment.listen, "management": config.management.listen}

    listeners = [
        *(
            ListenerService(
                device.name,
                TLSServerEndpoint(serverFromString(reactor, listen[device.name]), device.tls),
                device.site,
                device.public_url,
                device.description,
            )
            for device in (enrollment, management)
        ),
        ListenerService(
            "admin",
            serverFromString(reactor, config.admin.listen),
            MdmdSite(
                AdminRouter(admin_routes(app), material.admin_token),
                listener="admin",
                max_body_bytes=1024 * 1024,
            ),
            config.admin.url,
            "HTTP, bearer token",
        ),
    ]
    for listener in listeners:
        listener.setServiceParent(top)
    ready_when: list[Deferred[Any]] = [listener.listening for listener in listeners]

    if config.workers > 1:
        from mdmd.workers import WorkerPool

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
