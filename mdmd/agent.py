"""twisted.web adapters for the orbit agent API (enrollment listener)."""

from __future__ import annotations

import hmac

from twisted.logger import Logger

from mdmd import metrics
from mdmd.app import Mdmd
from mdmd.orbit import (
    OrbitRequestError,
    hash_node_key,
    new_node_key,
    orbit_config,
    parse_node_key,
    parse_orbit_enroll,
)
from mdmd.store import HostEnrollment, HostRecord
from mdmd.web import (
    EndpointResource,
    HTTPError,
    HTTPResponse,
    MdmdRequest,
    json_error,
    json_response,
    request_body,
)

__all__ = [
    "OrbitConfigResource",
    "OrbitDeviceTokenResource",
    "OrbitEnrollResource",
    "OrbitPingResource",
]

log = Logger(namespace=__name__)

# Fleet's agent asks the server what it can do; it only needs the orbit API.
_CAPABILITIES = ("X-Fleet-Capabilities", "orbit_endpoints")


def _bad_request(error: OrbitRequestError) -> HTTPError:
    extra = {"errors": [{"name": error.field or "base", "reason": str(error)}]}
    return HTTPError(json_error(400, str(error), **extra), str(error))


class _Authenticated(EndpointResource):
    def __init__(self, app: Mdmd) -> None:
        super().__init__()
        self.app = app

    async def host(self, request: MdmdRequest) -> HostRecord:
        try:
            node_key = parse_node_key(request_body(request))
        except OrbitRequestError as e:
            raise _bad_request(e) from None
        host = None
        if node_key:
            host = await self.app.store.host_by_node_key(hash_node_key(node_key), seen_at=self.app.now())
        if host is None:
            # 401 is what makes Fleet's agent drop its key and enroll again;
            # node_invalid is the osquery-side flag for the same thing.
            raise HTTPError(
                json_error(401, "Authentication required", node_invalid=True),
                "missing orbit node key" if not node_key else "unknown orbit node key",
            )
        request.device_id = host.mdm_device_id
        return host


class OrbitEnrollResource(EndpointResource):
    """``POST /api/fleet/orbit/enroll``: enroll secret in, node key out."""

    def __init__(self, app: Mdmd) -> None:
        super().__init__()
        self.app = app

    async def handle_POST(self, request: MdmdRequest) -> HTTPResponse:
        try:
            enroll = parse_orbit_enroll(request_body(request))
        except OrbitRequestError as e:
            raise _bad_request(e) from None
        expected = self.app.material.enroll_secret.encode()
        if not hmac.compare_digest(enroll.enroll_secret.encode(), expected):
            raise HTTPError(
                json_error(401, "Authentication failed"),
                f"wrong or missing enroll secret for hardware_uuid {enroll.hardware_uuid!r}",
            )
        node_key = new_node_key()
        host = await self.app.store.enroll_host(
            HostEnrollment(
                hardware_uuid=enroll.hardware_uuid,
                node_key_hash=hash_node_key(node_key),
                platform=enroll.platform,
                hostname=enroll.hostname,
                hardware_serial=enroll.hardware_serial,
                info=dict(enroll.extra),
            ),
            now=self.app.now(),
        )
        metrics.AGENT_ENROLLMENTS.inc()
        log.info(
            "orbit host {host_id} enrolled (hardware_uuid={hardware_uuid}, platform={platform})",
            host_id=host.id,
            hardware_uuid=host.hardware_uuid,
            platform=host.platform,
        )
        response = json_response(200, {"orbit_node_key": node_key})
        return HTTPResponse(response.status, response.body, headers=(_CAPABILITIES,))


class OrbitConfigResource(_Authenticated):
    """``POST /api/fleet/orbit/config``: what the agent should do now."""

    async def handle_POST(self, request: MdmdRequest) -> HTTPResponse:
        host = await self.host(request)
        config = self.app.config
        windows = host.platform == "windows"
        enrolled = host.mdm_device_id is not None
        body = orbit_config(
            needs_windows_mdm_enrollment=(
                windows and config.enrollment.windows_mdm and not enrolled and not host.unenroll_requested
            ),
            discovery_endpoint=config.enrollment.url + "/api/mdm/microsoft/discovery",
            needs_windows_mdm_unenrollment=windows and enrolled and host.unenroll_requested,
        )
        return json_response(200, body)


class OrbitDeviceTokenResource(_Authenticated):
    """``POST /api/fleet/orbit/device_token``: Fleet Desktop's token; mdmd has
    no Fleet Desktop, so it is acknowledged and not kept."""

    async def handle_POST(self, request: MdmdRequest) -> HTTPResponse:
        await self.host(request)
        return json_response(200, {})


class OrbitPingResource(EndpointResource):
    """``HEAD /api/fleet/orbit/ping``: the agent's reachability probe."""

    async def handle_HEAD(self, request: MdmdRequest) -> HTTPResponse:
        return HTTPResponse(200, b"", headers=(_CAPABILITIES,))

    async def handle_GET(self, request: MdmdRequest) -> HTTPResponse:
        return HTTPResponse(200, b"", headers=(_CAPABILITIES,))
