"""The management endpoint redoes a message whose session step lost a race
with another worker process (SessionConflict), a bounded number of times."""

from __future__ import annotations

import io
from datetime import UTC, datetime
from typing import Any

from twisted.internet.defer import Deferred

from mdmd import pki
from mdmd.management_endpoint import ManagementService
from mdmd.store import SessionConflict
from mdmd.web import HTTPError, HTTPResponse


class _PeerCertificate:
    def __init__(self, cert: Any) -> None:
        self.cert = cert

    def to_cryptography(self) -> Any:
        return self.cert


class _Request:
    """What the endpoint reads of a request on the mutual-TLS listener."""

    def __init__(self, cert: Any) -> None:
        transport = type("T", (), {"getPeerCertificate": lambda _: _PeerCertificate(cert)})()
        self.channel = type("C", (), {"transport": transport})()
        self.content = io.BytesIO(b"<SyncML/>")
        self.device_id: str | None = None
        self.note: str | None = None

    def getHeader(self, name: bytes) -> bytes | None:
        return b"application/vnd.syncml.dm+xml" if name.lower() == b"content-type" else None


class _Racing(ManagementService):
    """Loses the race *losses* times, then processes the message."""

    def __init__(self, losses: int) -> None:
        super().__init__(app=None)  # type: ignore[arg-type]
        self.losses = losses
        self.attempts = 0

    async def _handle(self, request: Any, serial: str, thumbprint: str, body: bytes) -> HTTPResponse:
        self.attempts += 1
        if self.attempts <= self.losses:
            raise SessionConflict("DEV1")
        return HTTPResponse(200, b"<SyncML>reply</SyncML>", content_type="application/vnd.syncml.dm+xml")


def _certificate() -> Any:
    key = pki.generate_rsa_key()
    return pki.create_ca_certificate(key, "t", days=1, now=datetime.now(UTC))


def _run(service: ManagementService, request: _Request) -> Any:
    d = Deferred.fromCoroutine(service.handle_POST(request))  # type: ignore[arg-type]
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the handler waited on something"
    return results[0]


def test_a_message_that_lost_a_race_is_processed_again_from_a_fresh_read() -> None:
    service = _Racing(losses=2)
    reply = _run(service, _Request(_certificate()))
    assert isinstance(reply, HTTPResponse) and reply.status == 200
    assert service.attempts == 3


def test_a_message_that_keeps_losing_gets_503_not_a_traceback() -> None:
    service = _Racing(losses=99)
    failure = _run(service, _Request(_certificate()))
    assert failure.check(HTTPError)
    assert failure.value.response.status == 503
    assert service.attempts == 3
    assert service._locks == {}
