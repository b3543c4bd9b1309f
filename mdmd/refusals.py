"""One log line per refused management connection, summarised per address.

A device whose certificate ended, was revoked or never came from mdmd is
refused at every poll; a scanner is refused thousands of times a minute.
Each refusal is worth one line that says who, why and with which
certificate, but not thousands: the first refusal from an address is logged
in full, the ones that follow within :attr:`RefusalLog.interval` seconds are
counted, and the count is logged once when that interval ends.

The TLS layer (:mod:`mdmd.tls`) reports handshakes OpenSSL refused (no
certificate, unknown issuer, expired); the management endpoint reports
certificates refused after the handshake (not issued by mdmd, revoked, device
not enrolled).  Both lines carry the same fields: ``peer``, ``reason``,
``subject``, ``serial``, ``issuer``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from cryptography import x509
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

__all__ = ["CertificateSummary", "RefusalLog"]

log = Logger(namespace=__name__)

#: Addresses tracked at once; refusals from more addresses than this (a
#: scan from many sources) are counted together.
MAX_ADDRESSES: Final = 10_000


@dataclass(frozen=True, slots=True)
class CertificateSummary:
    """What a refusal line says about the certificate presented."""

    subject: str
    serial: str
    issuer: str

    @classmethod
    def of(cls, cert: x509.Certificate) -> CertificateSummary:
        return cls(
            subject=_name(cert.subject),
            serial=f"{cert.serial_number:x}",
            issuer=_name(cert.issuer),
        )


def _name(name: x509.Name) -> str:
    try:
        text = name.rfc4514_string()
    except ValueError:  # an attribute cryptography cannot render
        return "<unreadable name>"
    # One line per refusal, whatever a hostile certificate puts in its names.
    return "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in text)[:256]


@dataclass(slots=True)
class _Window:
    suppressed: int = 0
    last_reason: str = ""
    call: IDelayedCall | None = field(default=None, repr=False)


class RefusalLog:
    """Logs refusals of one listener, at most two lines per address and
    :attr:`interval`: the first refusal, then how many followed."""

    def __init__(
        self,
        reactor: IReactorTime,
        *,
        listener: str = "management",
        interval: float = 60.0,
        max_addresses: int = MAX_ADDRESSES,
    ) -> None:
        self.reactor = reactor
        self.listener = listener
        self.interval = interval
        self.max_addresses = max_addresses
        self._windows: dict[str, _Window] = {}
        self._overflow: _Window | None = None

    def refused(self, peer: str, stage: str, reason: str, cert: CertificateSummary | None) -> None:
        """A connection from *peer* was refused at *stage* (``TLS handshake``
        or ``request``) for *reason*, presenting *cert* (None: none)."""
        window = self._windows.get(peer)
        if window is not None:
            window.suppressed += 1
            window.last_reason = reason
            return
        if len(self._windows) >= self.max_addresses:
            self._count_overflow(reason)
            return
        window = _Window()
        window.call = self.reactor.callLater(self.interval, self._close, peer)
        self._windows[peer] = window
        certificate = (
            "no certificate presented"
            if cert is None
            else f"certificate subject {cert.subject!r} serial {cert.serial} issuer {cert.issuer!r}"
        )
        log.warn(
            "{listener} {stage} refused from {peer}: {reason}; {certificate}",
            listener=self.listener,
            stage=stage,
            peer=peer,
            reason=reason,
            certificate=certificate,
            subject=None if cert is None else cert.subject,
            serial=None if cert is None else cert.serial,
            issuer=None if cert is None else cert.issuer,
        )

    def _close(self, peer: str) -> None:
        window = self._windows.pop(peer, None)
        if window is not None and window.suppressed:
            log.warn(
                "{listener}: {count} more refused from {peer} in the last {interval:g} s (last: {reason})",
                listener=self.listener,
                count=window.suppressed,
                peer=peer,
                interval=self.interval,
                reason=window.last_reason,
            )

    def _count_overflow(self, reason: str) -> None:
        if self._overflow is None:
            self._overflow = _Window()
            self._overflow.call = self.reactor.callLater(self.interval, self._close_overflow)
        self._overflow.suppressed += 1
        self._overflow.last_reason = reason

    def _close_overflow(self) -> None:
        overflow, self._overflow = self._overflow, None
        if overflow is not None and overflow.suppressed:
            log.warn(
                "{listener}: {count} refused from addresses beyond the {limit} tracked, in the last "
                "{interval:g} s (last: {reason})",
                listener=self.listener,
                count=overflow.suppressed,
                limit=self.max_addresses,
                interval=self.interval,
                reason=overflow.last_reason,
            )

    def stop(self) -> None:
        """Log what is pending and cancel the timers (the listener stops)."""
        for peer in list(self._windows):
            window = self._windows[peer]
            if window.call is not None and window.call.active():
                window.call.cancel()
            self._close(peer)
        if self._overflow is not None:
            if self._overflow.call is not None and self._overflow.call.active():
                self._overflow.call.cancel()
            self._close_overflow()
