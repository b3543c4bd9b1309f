"""The web console's sessions, CSRF tokens and response headers.

An administrator signs in with a named admin token; the console keeps a
session for it in the store (so that every node of a fleet knows it, and a
restart keeps it) and hands the browser a random session ID in a cookie
that is ``HttpOnly``, ``SameSite=Strict``, scoped to ``/ui/``, ``Secure``
when the console is reached over TLS, and ends after
:data:`SESSION_SECONDS` (or :data:`IDLE_SECONDS` without a request).  Only
the SHA-256 of a session ID is kept, as for tokens.  A session lives only
as long as its token: a revoked token ends every session signed in with it
at their next request.

Every form carries the session's CSRF token (the sign-in form a token of its
own, paired with a short-lived cookie), compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import parse_qs

from mdmd.store import ConsoleSessionRecord, Store
from mdmd.tokens import hash_token

__all__ = [
    "IDLE_SECONDS",
    "SECURITY_HEADERS",
    "SESSION_COOKIE",
    "SESSION_SECONDS",
    "SIGNIN_COOKIE",
    "ConsoleSession",
    "FormError",
    "Sessions",
    "cookie_header",
    "parse_form",
    "read_cookie",
    "safe_next",
    "same_secret",
]

SESSION_COOKIE: Final = "mdmd_session"
#: The sign-in form's CSRF cookie (before there is a session).
SIGNIN_COOKIE: Final = "mdmd_signin"
COOKIE_PATH: Final = "/ui/"
#: A session ends this long after sign-in, whatever happens ...
SESSION_SECONDS: Final = 8 * 3600
#: ... or after this long without a request.
IDLE_SECONDS: Final = 3600
SIGNIN_SECONDS: Final = 600
#: Sessions kept at once; the oldest ends when one more signs in.
MAX_SESSIONS: Final = 10_000
MAX_FORM_FIELDS: Final = 200

#: Sent with every console response: no script runs, nothing is loaded from
#: elsewhere, forms post only here, no framing, nothing cached.
SECURITY_HEADERS: Final = (
    (
        "Content-Security-Policy",
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "same-origin"),
    ("Cache-Control", "no-store"),
)


@dataclass(frozen=True, slots=True)
class ConsoleSession:
    token_name: str
    token_hash: bytes
    csrf: str
    created_at: float
    used_at: float

    @classmethod
    def of(cls, record: ConsoleSessionRecord) -> ConsoleSession:
        return cls(record.token_name, record.token_hash, record.csrf, record.created_at, record.used_at)


class Sessions:
    """Signed-in sessions, kept in *store* by the hash of their ID.
    *tokens* gives the valid admin tokens (hash to name) as the API's guard
    sees them; *clock* the time."""

    def __init__(
        self,
        store: Store,
        tokens: Callable[[], Mapping[bytes, str] | None],
        clock: Callable[[], float],
        *,
        lifetime: float = SESSION_SECONDS,
        idle: float = IDLE_SECONDS,
        limit: int = MAX_SESSIONS,
    ) -> None:
        self._store = store
        self._tokens = tokens
        self._clock = clock
        self.lifetime = lifetime
        self.idle = idle
        self.limit = limit

    async def sign_in(self, token: str) -> tuple[str, ConsoleSession] | None:
        """A new session for a valid admin *token*: its cookie value and the
        session; None when the token is unknown or revoked."""
        token = token.strip()
        if not token or len(token) > 512:
            return None
        digest = hash_token(token)
        name = (self._tokens() or {}).get(digest)
        if name is None:
            return None
        now = self._clock()
        session_id = secrets.token_urlsafe(32)
        record = ConsoleSessionRecord(_key(session_id), name, digest, secrets.token_urlsafe(32), now, now)
        await self._store.start_console_session(
            record, lifetime=self.lifetime, idle=self.idle, keep=self.limit
        )
        return session_id, ConsoleSession.of(record)

    async def get(self, session_id: str | None) -> ConsoleSession | None:
        """The live session of a cookie value, its idle time renewed; None
        (and the session ended) when it expired or its token was revoked."""
        if not session_id or len(session_id) > 128:
            return None
        key = _key(session_id)
        record = await self._store.use_console_session(
            key, self._clock(), lifetime=self.lifetime, idle=self.idle
        )
        if record is None:
            return None
        if (self._tokens() or {}).get(record.token_hash) != record.token_name:
            await self._store.end_console_session(key)
            return None
        return ConsoleSession.of(record)

    async def sign_out(self, session_id: str | None) -> ConsoleSession | None:
        if not session_id or len(session_id) > 128:
            return None
        record = await self._store.end_console_session(_key(session_id))
        return None if record is None else ConsoleSession.of(record)


def _key(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode("utf-8", "replace")).digest()


def same_secret(given: str | None, expected: str) -> bool:
    """A CSRF token compared in constant time."""
    if not given:
        return False
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode("utf-8"))


def cookie_header(name: str, value: str, *, max_age: int, secure: bool) -> str:
    """A ``Set-Cookie`` value for the console (``max_age`` 0 deletes it)."""
    parts = [f"{name}={value}", f"Path={COOKIE_PATH}", f"Max-Age={max_age}", "HttpOnly", "SameSite=Strict"]
    if secure:
        parts.append("Secure")
    return "; ".join(parts)


def read_cookie(header: bytes | None, name: str) -> str | None:
    """The value of cookie *name* in a ``Cookie`` header (the last one)."""
    if not header:
        return None
    found = None
    for part in header.decode("latin-1").split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            found = value
    return found


class FormError(ValueError):
    """The body is not a form the console sent."""


def parse_form(content_type: bytes | None, body: bytes) -> dict[str, list[str]]:
    """An ``application/x-www-form-urlencoded`` body (UTF-8)."""
    kind = (content_type or b"").split(b";")[0].strip().lower()
    if kind != b"application/x-www-form-urlencoded":
        raise FormError("expected a form (application/x-www-form-urlencoded)")
    try:
        text = body.decode("utf-8")
        return parse_qs(text, keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS, errors="strict")
    except (UnicodeDecodeError, ValueError) as e:
        raise FormError(f"not a form: {e}") from None


def safe_next(target: str | None, default: str = "/ui/fleet") -> str:
    """Where to go after signing in: a console path, never another site."""
    if (
        not target
        or not target.startswith("/ui/")
        or target.startswith("//")
        or "\\" in target
        or any(ord(ch) < 0x21 or ord(ch) == 0x7F for ch in target)
        or target.startswith(("/ui/signin", "/ui/signout"))
        or len(target) > 2048
    ):
        return default
    return target
