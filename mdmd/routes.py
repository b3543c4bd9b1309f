"""The URL map of each listener: path templates to thin twisted.web adapters."""

from __future__ import annotations

from urllib.parse import urlsplit

from mdmd.admin import admin_api_routes
from mdmd.admin_actions import action_routes
from mdmd.admin_profiles import profile_routes
from mdmd.agent import (
    OrbitConfigResource,
    OrbitDeviceTokenResource,
    OrbitEnrollResource,
    OrbitPingResource,
)
from mdmd.app import Mdmd
from mdmd.enrollment import (
    DISCOVERY_PATH,
    ENROLLMENT_PATH,
    POLICY_PATH,
    DiscoveryResource,
    EnrollmentResource,
    PolicyResource,
)
from mdmd.health import FleetCountsCache, HealthResource, MetricsResource, ReadyResource
from mdmd.management_endpoint import ManagementResource
from mdmd.refusals import RefusalLog
from mdmd.renewal import RENEWAL_DISCOVERY_PATH
from mdmd.renewal_endpoint import RenewalDiscoveryResource, RenewalPolicyResource, RenewalResource
from mdmd.web import Route

__all__ = ["admin_routes", "enrollment_routes", "management_routes"]


def enrollment_routes(app: Mdmd) -> list[Route]:
    return [
        Route("/api/fleet/orbit/enroll", OrbitEnrollResource(app)),
        Route("/api/fleet/orbit/config", OrbitConfigResource(app)),
        Route("/api/fleet/orbit/device_token", OrbitDeviceTokenResource(app)),
        Route("/api/fleet/orbit/ping", OrbitPingResource()),
        Route(DISCOVERY_PATH, DiscoveryResource(app)),
        Route(POLICY_PATH, PolicyResource(app)),
        Route(ENROLLMENT_PATH, EnrollmentResource(app)),
    ]


def management_routes(app: Mdmd, refusals: RefusalLog | None = None) -> list[Route]:
    resource = ManagementResource(app, refusals)
    # The provisioned ADDR may carry another path (behind a reverse proxy);
    # Windows appends a query string, which routing ignores.
    configured = urlsplit(app.config.management.url).path.rstrip("/") or "/"
    return [
        Route("/api/mdm/microsoft/management", resource),
        Route(configured, resource),
        # Certificate renewal (MS-MDE2 3.5): the provisioned
        # CertificateStore/My/WSTEP/Renew/ServerURL is this discovery URL.
        Route(RENEWAL_DISCOVERY_PATH, RenewalDiscoveryResource(app)),
        Route(POLICY_PATH, RenewalPolicyResource(app)),
        Route(ENROLLMENT_PATH, RenewalResource(app)),
    ]


def admin_routes(app: Mdmd) -> list[Route]:
    """The admin API behind the token; what monitoring asks, without."""
    fleet = FleetCountsCache(app.store, app.reactor, app.config.admin.metrics_cache_seconds)  # type: ignore[arg-type]
    return [
        Route("/healthz", HealthResource(), public=True),
        Route("/readyz", ReadyResource(app.readiness), public=True),
        Route("/metrics", MetricsResource(fleet, app.reactor), public=True),
        *admin_api_routes(app),
        *profile_routes(app),
        *action_routes(app),
    ]
