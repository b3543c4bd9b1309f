"""Certificate renewal rules (MS-MDE2 3.5, Windows' "ROBO" renewal), pure.

When a device's certificate enters its renewal period, Windows posts a
RequestSecurityToken of type ``.../Renew`` over TLS authenticated by that
certificate, carrying a PKCS#7 signed with the certificate's key around a
PKCS#10 for a new key.  This module says whether a certificate may be renewed
now, where renewals are served, and what an administrator is shown; the
twisted.web adapter is :mod:`mdmd.renewal_endpoint`.

Times are seconds since the epoch, from the caller's clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, Literal, Protocol
from urllib.parse import urlsplit

from mdmd.soap import ErrorType, FaultCode, SoapFault

__all__ = [
    "CLOCK_ALLOWANCE",
    "DAY",
    "RENEWAL_DISCOVERY_PATH",
    "RenewalPolicy",
    "RenewalStatus",
    "not_eligible",
    "renewal_policy",
    "renewal_problem",
    "renewal_server_url",
    "renewal_status",
]

DAY: Final = 86400.0
#: A device whose clock runs ahead starts its renewal a little before the
#: server's window opens; refusing it would cost it a whole retry interval.
CLOCK_ALLOWANCE: Final = DAY
#: Where the management listener serves discovery for renewals; Windows
#: starts a renewal at ``Renew/ServerURL`` with discovery, as it starts an
#: enrollment (CertificateStore CSP, ``Renew/ServerURL``).
RENEWAL_DISCOVERY_PATH: Final = "/api/mdm/microsoft/discovery"


def renewal_server_url(management_url: str) -> str:
    """``Renew/ServerURL``: the discovery URL on the management listener
    (same scheme, host and port as the management URL)."""
    parts = urlsplit(management_url)
    return f"{parts.scheme}://{parts.netloc}{RENEWAL_DISCOVERY_PATH}"


@dataclass(frozen=True, slots=True)
class RenewalPolicy:
    """The ``[wstep]`` renewal settings, in days."""

    renew_period_days: int
    retry_days: int
    grace_days: int = 0

    def window(self, not_after: float) -> tuple[float, float]:
        """(opens, closes) of the renewal window of a certificate ending at
        *not_after*: it opens ``renew_period_days`` before the end (less
        :data:`CLOCK_ALLOWANCE`) and closes ``grace_days`` after it."""
        opens = not_after - self.renew_period_days * DAY - CLOCK_ALLOWANCE
        return opens, not_after + self.grace_days * DAY


class _WstepSettings(Protocol):
    @property
    def renew_period_days(self) -> int: ...
    @property
    def renew_retry_days(self) -> int: ...
    @property
    def renew_grace_days(self) -> int: ...


def renewal_policy(wstep: _WstepSettings) -> RenewalPolicy:
    """The policy of the ``[wstep]`` configuration section."""
    return RenewalPolicy(wstep.renew_period_days, wstep.renew_retry_days, wstep.renew_grace_days)


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def renewal_problem(
    *,
    issued_by_mdmd: bool,
    revoked: str | None,
    device_enrolled: bool,
    not_after: float,
    now: float,
    policy: RenewalPolicy,
) -> str | None:
    """Why the certificate presented for a renewal may not be renewed now, or
    None.  The checks run in this order and the first that fails is named:
    issued by mdmd (its serial and thumbprint stored), not revoked (*revoked*
    is the revocation reason), its device enrolled, inside its window."""
    if not issued_by_mdmd:
        return "not a certificate mdmd issued"
    if revoked is not None:
        return f"certificate revoked ({revoked})"
    if not device_enrolled:
        return "device not enrolled"
    opens, closes = policy.window(not_after)
    if now < opens:
        return f"outside the renewal window: it opens {_when(opens)}"
    if now > closes:
        return f"outside the renewal window: certificate ended {_when(not_after)}" + (
            f" and the {policy.grace_days}-day grace closed {_when(closes)}" if policy.grace_days else ""
        )
    return None


def not_eligible(reason: str) -> SoapFault:
    """The fault answering a refused renewal (MENROLL_E_NOTELIGIBLETORENEW)."""
    return SoapFault(FaultCode.AUTHORIZATION, f"renewal refused: {reason}", ErrorType.NOT_ELIGIBLE_TO_RENEW)


RenewalState = Literal["none", "renewed", "failed"]


@dataclass(frozen=True, slots=True)
class RenewalStatus:
    """What an administrator is shown about a device's certificate."""

    state: RenewalState
    #: When the current certificate was issued by a renewal (``renewed``).
    renewed_at: float | None = None
    #: Why the renewal is considered failed (``failed``).
    reason: str | None = None


def renewal_status(
    *,
    not_after: float | None,
    renewed_at: float | None,
    now: float,
    policy: RenewalPolicy,
) -> RenewalStatus:
    """The renewal state of a device's current certificate (*not_after*
    None: it has none; *renewed_at*: when that certificate was issued by a
    renewal, None if it came from an enrollment).

    ``failed`` is derived, never stored (a refused renewal changes nothing):
    the certificate ended, or it has been inside its renewal window for
    longer than Windows waits between attempts, so at least one attempt did
    not succeed.  The log says why each refused request was refused."""
    if not_after is None:
        return RenewalStatus("none")
    if now > not_after:
        return RenewalStatus("failed", renewed_at, f"certificate ended {_when(not_after)} without renewal")
    opens = not_after - policy.renew_period_days * DAY
    if now > opens + policy.retry_days * DAY:
        return RenewalStatus(
            "failed",
            renewed_at,
            f"in its renewal window since {_when(opens)} and not renewed "
            f"(Windows tries again every {policy.retry_days} days)",
        )
    if renewed_at is not None:
        return RenewalStatus("renewed", renewed_at)
    return RenewalStatus("none")
