"""Refused management connections: one line each, summarised per address,
on a memory clock (no waiting)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
from OpenSSL import SSL
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent

from mdmd import pki
from mdmd.refusals import CertificateSummary, RefusalLog
from mdmd.tls import handshake_refusal_reason

CERT = CertificateSummary(subject="CN=DEV1", serial="ab12", issuer="CN=mdmd identity,O=mdmd")


@pytest.fixture
def logs() -> Iterator[Sequence[dict[str, Any]]]:
    with capturedLogs() as events:
        yield events


def lines(events: Sequence[dict[str, Any]]) -> list[str]:
    return [formatEvent(e) for e in events if e.get("log_namespace") == "mdmd.refusals"]


def test_the_first_refusal_from_an_address_is_logged_with_every_field(logs: Sequence[dict[str, Any]]) -> None:
    refusals = RefusalLog(Clock())
    refusals.refused("192.0.2.7", "TLS handshake", "expired", CERT)
    refusals.refused("192.0.2.8", "TLS handshake", "no certificate", None)
    first, second = lines(logs)
    assert first == (
        "management TLS handshake refused from 192.0.2.7: expired; certificate subject 'CN=DEV1' "
        "serial ab12 issuer 'CN=mdmd identity,O=mdmd'"
    )
    assert (
        second == "management TLS handshake refused from 192.0.2.8: no certificate; no certificate presented"
    )
    event = next(e for e in logs if e.get("peer") == "192.0.2.7")
    assert (event["reason"], event["subject"], event["serial"], event["issuer"]) == (
        "expired",
        "CN=DEV1",
        "ab12",
        "CN=mdmd identity,O=mdmd",
    )


def test_repeated_refusals_from_one_address_are_counted_then_summarised(
    logs: Sequence[dict[str, Any]],
) -> None:
    clock = Clock()
    refusals = RefusalLog(clock, interval=60.0)
    for _ in range(1000):
        refusals.refused("192.0.2.7", "TLS handshake", "unknown issuer", CERT)
    refusals.refused("192.0.2.7", "request", "revoked (renewed)", CERT)
    assert len(lines(logs)) == 1
    clock.advance(59)
    assert len(lines(logs)) == 1
    clock.advance(1)
    assert lines(logs)[1] == (
        "management: 1000 more refused from 192.0.2.7 in the last 60 s (last: revoked (renewed))"
    )
    # A new interval starts with a full line again; a quiet one ends silently.
    refusals.refused("192.0.2.7", "request", "revoked (renewed)", CERT)
    clock.advance(60)
    assert len(lines(logs)) == 3 and "refused from 192.0.2.7: revoked" in lines(logs)[2]


def test_beyond_the_tracked_addresses_refusals_are_counted_together(logs: Sequence[dict[str, Any]]) -> None:
    clock = Clock()
    refusals = RefusalLog(clock, interval=10.0, max_addresses=3)
    for n in range(50):
        refusals.refused(f"198.51.100.{n}", "TLS handshake", "no certificate", None)
    assert len(lines(logs)) == 3
    clock.advance(10)
    assert lines(logs)[-1] == (
        "management: 47 refused from addresses beyond the 3 tracked, in the last 10 s (last: no certificate)"
    )
    assert not clock.getDelayedCalls()


def test_stopping_logs_what_is_pending(logs: Sequence[dict[str, Any]]) -> None:
    clock = Clock()
    refusals = RefusalLog(clock)
    refusals.refused("192.0.2.7", "TLS handshake", "expired", CERT)
    refusals.refused("192.0.2.7", "TLS handshake", "expired", CERT)
    refusals.stop()
    assert "1 more refused from 192.0.2.7" in lines(logs)[-1]
    assert not clock.getDelayedCalls()


def test_a_certificate_is_summarised_on_one_line() -> None:
    key = pki.generate_rsa_key()
    ca = pki.create_ca_certificate(key, "line\nbreak", days=1, now=datetime.now(UTC))
    summary = CertificateSummary.of(ca)
    assert "\n" not in summary.subject and "\\x0a" in summary.subject
    assert summary.serial == pki.serial_hex(ca)


def _error(*reasons: str) -> SSL.Error:
    return SSL.Error([("SSL routines", "", reason) for reason in reasons])


@pytest.mark.parametrize(
    ("errno", "presented", "error", "reason"),
    [
        (None, False, _error("peer did not return a certificate"), "no certificate"),
        (None, False, _error("tlsv13 alert certificate required"), "no certificate"),
        (20, True, _error("certificate verify failed"), "unknown issuer"),
        (7, True, _error("certificate verify failed"), "unknown issuer (signature does not verify"),
        (10, True, _error("certificate verify failed"), "expired"),
        (9, True, _error("certificate verify failed"), "not yet valid"),
        (99, True, _error("certificate verify failed"), "certificate refused (X509 verify error 99)"),
        (None, False, _error("unsupported protocol"), "TLS error: unsupported protocol"),
        (None, False, SSL.Error(), "TLS error: Error"),
    ],
)
def test_handshake_refusal_reasons(errno: int | None, presented: bool, error: SSL.Error, reason: str) -> None:
    assert handshake_refusal_reason(error, errno, presented).startswith(reason)
