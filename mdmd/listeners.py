"""The listeners: each one's socket, TLS options and twisted.web site.

The enrollment (TLS) and management (mutual TLS) listeners face devices;
with ``workers = N`` worker processes serve them too, on the sockets the
main process opened.  The admin listener stays in the main process.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.internet.ssl import CertificateOptions
from twisted.logger import Logger

from mdmd.app import Mdmd
from mdmd.refusals import RefusalLog
from mdmd.routes import admin_routes, enrollment_routes, management_routes
from mdmd.tls import mutual_tls_options, server_tls_options
from mdmd.web import BearerTokenGuard, MdmdSite, RoutingResource

__all__ = ["DeviceListener", "ListenerService", "admin_site", "device_listeners"]

log = Logger(namespace=__name__)


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


@dataclass(frozen=True, slots=True)
class DeviceListener:
    """What a device-facing listener serves: its TLS options and its site.
    The main process listens with it; worker processes adopt its socket."""

    name: str
    tls: CertificateOptions
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
            server_tls_options(material.enrollment_chain, material.enrollment_key),
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
            mutual_tls_options(material.management_chain, material.management_key, [material.identity_cert]),
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


def admin_site(app: Mdmd) -> MdmdSite:
    """The administrators' API behind the bearer token."""
    return MdmdSite(
        RoutingResource(admin_routes(app), guard=BearerTokenGuard(app.material.admin_token)),
        listener="admin",
        max_body_bytes=1024 * 1024,
    )
