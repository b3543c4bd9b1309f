"""The URL map of each listener: path -> thin twisted.web adapter."""

from __future__ import annotations

from urllib.parse import urlsplit

from twisted.web.resource import Resource

from mdmd.admin import AdminAPI
from mdmd.agent import OrbitConfig, OrbitDeviceToken, OrbitEnroll, OrbitPing
from mdmd.app import Mdmd
from mdmd.enrollment import DiscoveryService, EnrollmentService, PolicyService
from mdmd.management_endpoint import ManagementService
from mdmd.web import Endpoint, HTTPResponse, MdmdRequest, json_response

__all__ = ["admin_routes", "enrollment_routes", "management_routes"]


class HealthEndpoint(Endpoint):
    async def handle_GET(self, request: MdmdRequest) -> HTTPResponse:
        return json_response(200, {"status": "ok"})


def enrollment_routes(app: Mdmd) -> dict[bytes, Resource]:
    return {
        b"/api/fleet/orbit/enroll": OrbitEnroll(app),
        b"/api/fleet/orbit/config": OrbitConfig(app),
        b"/api/fleet/orbit/device_token": OrbitDeviceToken(app),
        b"/api/fleet/orbit/ping": OrbitPing(),
        b"/api/mdm/microsoft/discovery": DiscoveryService(app),
        b"/api/mdm/microsoft/policy": PolicyService(app),
        b"/api/mdm/microsoft/enroll": EnrollmentService(app),
    }


def management_routes(app: Mdmd) -> dict[bytes, Resource]:
    service = ManagementService(app)
    # The provisioned ADDR may carry another path (behind a reverse proxy);
    # Windows appends a query string, which routing ignores.
    configured = urlsplit(app.config.management.url).path.rstrip("/").encode() or b"/"
    return {b"/api/mdm/microsoft/management": service, configured: service}


def admin_routes(app: Mdmd) -> dict[bytes, Resource]:
    return {b"/healthz": HealthEndpoint(), b"/api/v1/": AdminAPI(app)}
