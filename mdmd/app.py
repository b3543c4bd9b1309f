"""What every request handler shares: configuration, key material, the store."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from twisted.internet.interfaces import IReactorCore

from mdmd.config import MdmdConfig
from mdmd.material import Material
from mdmd.store import Store

__all__ = ["TEST_CLOCK_OFFSET_VARIABLE", "Mdmd", "clock_offset_for_tests"]

#: TEST ONLY.  Seconds added to the daemon's clock, read once at start-up,
#: so that an end-to-end test can run a daemon "days later" (inside a
#: certificate's renewal window, past its end) without waiting.  Everything
#: mdmd decides with time uses :meth:`Mdmd.now`; OpenSSL keeps checking
#: certificate validity with the real clock.  Never set it in production.
TEST_CLOCK_OFFSET_VARIABLE = "MDMD_TEST_CLOCK_OFFSET"


def clock_offset_for_tests(environ: Mapping[str, str] = os.environ) -> float:
    """The test-only clock offset of :data:`TEST_CLOCK_OFFSET_VARIABLE` (0 when unset)."""
    raw = environ.get(TEST_CLOCK_OFFSET_VARIABLE, "").strip()
    if not raw:
        return 0.0
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{TEST_CLOCK_OFFSET_VARIABLE}={raw!r} is not a number of seconds") from None


@dataclass(frozen=True, slots=True)
class Mdmd:
    config: MdmdConfig
    material: Material
    store: Store
    reactor: IReactorCore
    #: Added to the reactor's clock (see :data:`TEST_CLOCK_OFFSET_VARIABLE`).
    clock_offset: float = 0.0

    def now(self) -> float:
        """Seconds since the epoch: every decision mdmd makes with time
        (certificate dates, renewal windows, pruning) uses this clock."""
        return self.reactor.seconds() + self.clock_offset  # type: ignore[attr-defined,no-any-return]
