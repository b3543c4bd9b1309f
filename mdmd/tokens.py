"""Named admin tokens.

Administrators each get a token with a name (``mdmctl token create NAME``);
the admin API knows who made each request by it, and the audit log records
that name.  Only a token's SHA-256 is stored; the token itself is shown once,
when it is created.  The bootstrap token (``[admin] token_file``) is the token
named ``admin``: adopted at start-up, its hash updated when the file changes,
unless an administrator revoked it.

The valid tokens' hashes live in memory (:class:`AdminTokens`), loaded at
start-up and reloaded after every change, so the admin listener's
:class:`~mdmd.web.BearerTokenGuard` never waits for the store.  Only the main
process serves the admin API; with several nodes on one database each node
has its copy, read again every :data:`REFRESH_SECONDS`, so that a token
created or revoked through another node counts here too within that time.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from typing import Final

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from mdmd.store import Store

__all__ = ["BOOTSTRAP_NAME", "AdminTokens", "AdminTokensService", "hash_token", "name_problem", "new_token"]

log = Logger(namespace=__name__)

#: The name of the token in ``[admin] token_file``.
BOOTSTRAP_NAME: Final = "admin"
#: How often the tokens are read again (changes made through other nodes).
REFRESH_SECONDS: Final = 5.0
_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


def new_token() -> str:
    """A fresh token: 256 random bits, recognisable as mdmd's."""
    return "mdmd_" + secrets.token_urlsafe(32)


def hash_token(token: str | bytes) -> bytes:
    raw = token.encode() if isinstance(token, str) else token
    return hashlib.sha256(raw.strip()).digest()


def name_problem(name: object) -> str | None:
    """Why *name* cannot name a token, or None."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        return "must be 1-64 letters, digits, '.', '_', '@' or '-', starting with a letter or digit"
    return None


class AdminTokens:
    """The valid tokens by hash, in memory (``None`` until loaded)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._by_hash: dict[bytes, str] | None = None
        self._waiting: list[Deferred[None]] | None = []

    def current(self) -> dict[bytes, str] | None:
        return self._by_hash

    @property
    def loaded(self) -> bool:
        return self._by_hash is not None

    def pending(self) -> Deferred[None] | None:
        """A Deferred that fires once the first load is done (or has failed),
        None after that."""
        if self._waiting is None:
            return None
        waiting: Deferred[None] = Deferred()
        self._waiting.append(waiting)
        return waiting

    def settle(self) -> None:
        """The first load is over, for better or worse: release the waiting."""
        waiting, self._waiting = self._waiting or [], None
        for d in waiting:
            d.callback(None)

    async def load(self) -> None:
        tokens = await self.store.admin_tokens()
        self._by_hash = {t.token_hash: t.name for t in tokens if t.revoked_at is None}
        self.settle()

    async def adopt_bootstrap(self, token: str, now: float) -> None:
        outcome = await self.store.adopt_bootstrap_token(BOOTSTRAP_NAME, hash_token(token), now)
        if outcome == "revoked":
            log.warn(
                "the admin token {name!r} is revoked: the token in [admin] token_file is not accepted",
                name=BOOTSTRAP_NAME,
            )
        elif outcome != "unchanged":
            log.info(
                "admin token {name!r} {outcome} from [admin] token_file", name=BOOTSTRAP_NAME, outcome=outcome
            )
        await self.load()


class AdminTokensService(Service):
    """Adopts the bootstrap token and loads every token when mdmd starts,
    then reads them again every :data:`REFRESH_SECONDS`."""

    def __init__(
        self, tokens: AdminTokens, bootstrap_token: str, now: float, clock: IReactorTime | None = None
    ) -> None:
        self.tokens = tokens
        self.bootstrap_token = bootstrap_token
        self.now = now
        self.clock = clock
        self.loaded: Deferred[None] = Deferred()
        self._refresh: LoopingCall | None = None
        self._refreshing = False
        self._failing = False

    def startService(self) -> None:
        super().startService()
        d = Deferred.fromCoroutine(self.tokens.adopt_bootstrap(self.bootstrap_token, self.now))
        d.addErrback(lambda f: log.failure("cannot load the admin tokens: the admin API answers 503", f))
        d.addBoth(lambda _: self.tokens.settle())
        d.addBoth(lambda _: self._start_refreshing())
        d.chainDeferred(self.loaded)

    def stopService(self) -> Deferred[None] | None:
        if self._refresh is not None and self._refresh.running:
            self._refresh.stop()
        self._refresh = None
        return super().stopService()  # type: ignore[no-any-return]

    def _start_refreshing(self) -> None:
        if self.clock is None or not self.running:
            return
        self._refresh = LoopingCall(self.refresh)
        self._refresh.clock = self.clock
        self._refresh.start(REFRESH_SECONDS, now=False)

    def refresh(self) -> None:
        """Read the tokens again (one at a time; a failure keeps the ones
        known, and is logged once until a read works again)."""
        if self._refreshing:
            return
        self._refreshing = True

        def ok(_: object) -> None:
            if self._failing:
                log.info("admin tokens read again from the store")
            self._failing = False

        def failed(f: Failure) -> None:
            if not self._failing:
                log.warn(
                    "cannot read the admin tokens again (the ones known stay in use): {error}",
                    error=f.getErrorMessage(),
                )
            self._failing = True

        def done(_: object) -> None:
            self._refreshing = False

        d = Deferred.fromCoroutine(self.tokens.load())
        d.addCallbacks(ok, failed)
        # Not returned: the loop never waits for a read (a slow store must
        # not stop it); a read still running skips the next turn instead.
        d.addBoth(done)
