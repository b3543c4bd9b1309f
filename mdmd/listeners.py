"""The listeners: each one's socket, TLS options and twisted.web site.

The enrollment (TLS) and management (mutual TLS) listeners face devices;
with ``workers = N`` worker processes serve them too, on the sockets the
main process opened.  The admin listener stays in the main process.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger

from mdmd import preflight
from mdmd.app import Mdmd
from mdmd.config import ConfigError
from mdmd.material import load_admin_tls, load_tls
from mdmd.refusals import RefusalLog
from mdmd.routes import admin_routes, enrollment_routes, management_routes
from mdmd.tls import ReloadableTLS, mutual_tls_options, server_tls_options
from mdmd.web import BearerTokenGuard, MdmdSite, RoutingResource

__all__ = [
    "DeviceListener",
    "ListenError",
    "ListenerService",
    "admin_site",
    "device_listeners",
    "reload_tls",
]

log = Logger(namespace=__name__)


class ListenError(ConfigError):
    """A listener cannot listen (the port is taken, the address is not
    this machine's): one line naming the key."""


class ListenerService(StreamServerEndpointService):
    """A listener that says where it listens, and fails start-up with one
    line naming its key if it cannot."""

    def __init__(
        self,
        name: str,
        endpoint: IStreamServerEndpoint,
        factory: IProtocolFactory,
        public_url: str,
        description: str,
        *,
        config_path: str = "?",
        listen: str = "?",
    ) -> None:
        super().__init__(endpoint, factory)
        self.setName(name)
        self.public_url = public_url
        self.description = description
        self.config_path = config_path
        self.listen = listen
        self._raiseSynchronously = True
        self.listening: Deferred[IListeningPort] = Deferred()
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            error = e.socketError
            reason = getattr(error, "strerror", None) or str(error)
            raise ListenError(
                self.config_path, self.name, "listen", f"cannot listen on {self.listen}: {reason}"
            ) from None
        except Exception as e:
            raise ListenError(
                self.config_path, self.name, "listen", f"cannot listen on {self.listen}: {e}"
            ) from None
        assert self._waitingForPort is not None
        self._waitingForPort.addCallback(self._listening)

    def _listening(self, port: IListeningPort | None) -> IListeningPort | None:
        if port is not None:
            self.port = port
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

    async def problem(self) -> str | None:
        """Readiness: None while it listens."""
        if not self.running or self.port is None:
            return "not listening"
        return None


@dataclass(frozen=True, slots=True)
class DeviceListener:
    """What a device-facing listener serves: its TLS options (replaceable on
    reload) and its site.  The main process listens with it; worker
    processes adopt its socket."""

    name: str
    tls: ReloadableTLS
    site: MdmdSite
    public_url: str
    description: str
    #: Where refused handshakes are logged (the management listener's).
    refusals: RefusalLog | None = None
    #: Each connection starts with a PROXY protocol header (v1 or v2) from
    #: the load balancer, naming the client ([section] proxy_protocol).
    proxy_protocol: bool = False

    def outermost(self, factory: IProtocolFactory) -> IProtocolFactory:
        """*factory* (TLS and the site) as it faces the socket: behind the
        PROXY protocol header's reader when the listener has one, so that
        the address of the client, not the balancer's, is its peer."""
        if not self.proxy_protocol:
            return factory
        # Twisted's own reader of the header (twisted.protocols.haproxy,
        # which exports it as an endpoint wrapper only; adopted sockets of
        # worker processes need the factory).
        from twisted.protocols.haproxy._wrapper import HAProxyWrappingFactory

        return HAProxyWrappingFactory(factory)


def device_listeners(app: Mdmd) -> tuple[DeviceListener, DeviceListener]:
    """The enrollment (TLS) and management (mutual TLS) listeners of *app*."""
    config, material = app.config, app.material
    refusals = RefusalLog(app.reactor)  # type: ignore[arg-type]
    return (
        DeviceListener(
            "enrollment",
            ReloadableTLS(server_tls_options(material.enrollment_chain, material.enrollment_key)),
            MdmdSite(
                RoutingResource(enrollment_routes(app)),
                listener="enrollment",
                max_body_bytes=config.enrollment.max_body_bytes,
            ),
            config.enrollment.url,
            "TLS, PROXY protocol" if config.enrollment.proxy_protocol else "TLS",
            proxy_protocol=config.enrollment.proxy_protocol,
        ),
        DeviceListener(
            "management",
            ReloadableTLS(
                mutual_tls_options(
                    material.management_chain, material.management_key, [material.identity_cert]
                )
            ),
            MdmdSite(
                RoutingResource(management_routes(app, refusals)),
                listener="management",
                max_body_bytes=config.management.max_body_bytes,
            ),
            config.management.url,
            "mutual TLS, PROXY protocol" if config.management.proxy_protocol else "mutual TLS",
            refusals,
            proxy_protocol=config.management.proxy_protocol,
        ),
    )


def reload_tls(app: Mdmd, listeners: Sequence[DeviceListener], admin: ReloadableTLS | None = None) -> bool:
    """Read the TLS certificates and keys again and serve new connections
    with them (``systemctl reload``, SIGHUP); established connections keep
    theirs.  *admin* is the admin listener's, when it serves TLS (main
    process only).  Anything wrong (a key that does not match, a
    certificate that does not cover the URL) keeps the old ones, all of
    them, and says why."""
    config = app.config
    try:
        tls = load_tls(config)
        admin_tls = load_admin_tls(config) if admin is not None else None
        preflight.check_private_files(config)
        preflight.check_certificates_cover_urls(config, tls)
        options = {
            "enrollment": server_tls_options(tls.enrollment_chain, tls.enrollment_key),
            "management": mutual_tls_options(
                tls.management_chain, tls.management_key, [app.material.identity_cert]
            ),
        }
        admin_options = None if admin_tls is None else server_tls_options(*admin_tls)
        # OpenSSL checks each certificate and key when their context is made:
        # all of them before any listener takes its new one.
        for made in (*options.values(), *([admin_options] if admin_options is not None else [])):
            made.getContext()
        for listener in listeners:
            listener.tls.replace(options[listener.name])
        if admin is not None and admin_options is not None:
            admin.replace(admin_options)
    except Exception as e:  # a ConfigError, or OpenSSL's refusal of a certificate
        reason = str(e) if isinstance(e, ConfigError | ValueError) else f"{type(e).__name__}: {e}"
        log.error(
            "reload: TLS certificates NOT reloaded, the previous ones stay in use: {error}", error=reason
        )
        return False
    admin_line = (
        ""
        if admin_tls is None
        else f", admin {admin_tls[0][0].subject.rfc4514_string()}"
        f" until {admin_tls[0][0].not_valid_after_utc.isoformat()}"
    )
    log.info(
        "reload: TLS certificates reloaded: enrollment {enrollment} until {enrollment_until}, "
        "management {management} until {management_until}{admin_line}",
        enrollment=tls.enrollment_chain[0].subject.rfc4514_string(),
        enrollment_until=tls.enrollment_chain[0].not_valid_after_utc.isoformat(),
        management=tls.management_chain[0].subject.rfc4514_string(),
        management_until=tls.management_chain[0].not_valid_after_utc.isoformat(),
        admin_line=admin_line,
    )
    return True


def admin_site(app: Mdmd) -> MdmdSite:
    """The administrators' API behind the bearer tokens; health, readiness
    and metrics without."""
    assert app.tokens is not None
    return MdmdSite(
        RoutingResource(admin_routes(app), guard=BearerTokenGuard(app.tokens.current, app.tokens.pending)),
        listener="admin",
        max_body_bytes=1024 * 1024,
    )
