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
from mdmd.enrollment import DiscoveryResource, EnrollmentResource, PolicyResource
from mdmd.management_endpoint import ManagementResource
from mdmd.web import EndpointResource, HTTPResponse, MdmdRequest, Route, json_response

__all__ = ["admin_routes", "enrollment_routes", "management_routes"]


class HealthResource(EndpointResource):
    async def handle_GET(self, request: MdmdRequest) -> HTTPResponse:
        return json_response(200, {"status": "ok"})


def enrollment_routes(app: Mdmd) -> list[Route]:
    return [
        Route("/api/fleet/orbit/enroll", OrbitEnrollResource(app)),
        Route("/api/fleet/orbit/config", OrbitConfigResource(app)),
        Route("/api/fleet/orbit/device_token", OrbitDeviceTokenResource(app)),
        Route("/api/fleet/orbit/ping", OrbitPingResource()),
        Route("/api/mdm/microsoft/discovery", DiscoveryResource(app)),
        Route("/api/mdm/microsoft/policy", PolicyResource(app)),
        Route("/api/mdm/microsoft/enroll", EnrollmentResource(app)),
    ]


def management_routes(app: Mdmd) -> list[Route]:
    resource = ManagementResource(app)
    # The provisioned ADDR may carry another path (behind a reverse proxy);
    # Windows appends a query string, which routing ignores.
    configured = urlsplit(app.config.management.url).path.rstrip("/") or "/"
    return [Route("/api/mdm/microsoft/management", resource), Route(configured, resource)]


def admin_routes(app: Mdmd) -> list[Route]:
    return [
        Route("/healthz", HealthResource()),
        *admin_api_routes(app),
        *profile_routes(app),
        *action_routes(app),
    ]
