"""The web console in process: sessions, CSRF, the Content-Security-Policy
and the redirect to sign-in, through the real twisted.web site and store
(the browser tests in test_console_browser.py drive it end to end)."""

from __future__ import annotations

import re
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, replace
from http.client import HTTPSConnection
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar
from urllib.parse import urlencode

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock, StringTransport

from harness import running_daemon
from mdmd.app import Mdmd
from mdmd.config import WstepConfig
from mdmd.console.pages import console_routes
from mdmd.console.session import (
    SESSION_COOKIE,
    SIGNIN_COOKIE,
    Sessions,
    cookie_header,
    parse_form,
    read_cookie,
    safe_next,
)
from mdmd.health import FleetCountsCache
from mdmd.store.sqlite import SQLiteStore
from mdmd.tokens import AdminTokens, hash_token
from mdmd.web import MdmdSite, RoutingResource
from store_helpers import ThreadReactor, enrollment, host, wait

TOKEN = "mdmd_console-test-token"
OTHER = "mdmd_another-token"

# --- sessions (pure) ---


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


T = TypeVar("T")


def _done(coroutine: Coroutine[Any, Any, T]) -> T:
    return wait(Deferred.fromCoroutine(coroutine))


@pytest.fixture
def session_store(tmp_path: Path) -> Iterator[SQLiteStore]:
    store = SQLiteStore(str(tmp_path / "mdmd.sqlite3"), ThreadReactor())  # type: ignore[arg-type]
    store.open()
    store.start()
    try:
        yield store
    finally:
        store.stop()


def test_a_session_needs_a_valid_token_and_ends_with_its_lifetime_idle_time_or_token(
    session_store: SQLiteStore,
) -> None:
    tokens = {hash_token(TOKEN): "alice"}
    clock = FakeClock()
    sessions = Sessions(session_store, lambda: tokens, clock, lifetime=100, idle=30)
    assert _done(sessions.sign_in("wrong")) is None and _done(sessions.sign_in("")) is None
    signed = _done(sessions.sign_in(f"  {TOKEN} "))
    assert signed is not None
    cookie, session = signed
    assert session.token_name == "alice" and len(cookie) >= 40 and len(session.csrf) >= 40
    clock.now += 20
    assert _done(sessions.get(cookie)) == replace(session, used_at=clock.now)
    clock.now += 20  # idle 20 s since the last request: still alive
    assert _done(sessions.get(cookie)) == replace(session, used_at=clock.now)
    clock.now += 31  # idle too long
    assert _done(sessions.get(cookie)) is None
    # The lifetime holds however busy the session is.
    cookie, _ = _done(sessions.sign_in(TOKEN)) or ("", None)
    for _ in range(3):
        clock.now += 25
        assert _done(sessions.get(cookie)) is not None
    clock.now += 25  # 100 s since sign-in
    assert _done(sessions.get(cookie)) is None
    # A revoked token ends its sessions at their next request.
    cookie, _ = _done(sessions.sign_in(TOKEN)) or ("", None)
    tokens.clear()
    assert _done(sessions.get(cookie)) is None
    tokens[hash_token(TOKEN)] = "alice"
    assert _done(sessions.get(cookie)) is None  # ended, not only refused
    # Signing out ends it; an unknown cookie is no session.
    cookie, _ = _done(sessions.sign_in(TOKEN)) or ("", None)
    assert _done(sessions.sign_out(cookie)) is not None and _done(sessions.get(cookie)) is None
    assert _done(sessions.get("nonsense")) is None and _done(sessions.get(None)) is None


def test_a_token_renamed_under_a_session_ends_it_and_sessions_are_bounded(session_store: SQLiteStore) -> None:
    tokens = {hash_token(TOKEN): "alice"}
    clock = FakeClock()
    sessions = Sessions(session_store, lambda: tokens, clock, limit=3)
    cookies = []
    for _ in range(5):
        clock.now += 1
        cookies.append((_done(sessions.sign_in(TOKEN)) or ("", None))[0])
    # The oldest two made room for the last two.
    assert [_done(sessions.get(c)) is not None for c in cookies] == [False, False, True, True, True]
    tokens[hash_token(TOKEN)] = "bob"  # revoked, and the hash given to another name
    assert _done(sessions.get(cookies[-1])) is None


def test_sessions_are_the_stores_a_restart_or_another_node_knows_them(tmp_path: Path) -> None:
    """Two processes (nodes, or a restart) on one store: a session signed in
    through one is used and ended through the other."""
    tokens = {hash_token(TOKEN): "alice"}
    clock = FakeClock()
    stores = [SQLiteStore(str(tmp_path / "mdmd.sqlite3"), ThreadReactor()) for _ in range(2)]  # type: ignore[arg-type]
    for store in stores:
        store.open()
        store.start()
    try:
        here, there = (Sessions(store, lambda: tokens, clock) for store in stores)
        cookie, session = _done(here.sign_in(TOKEN)) or ("", None)
        assert session is not None
        clock.now += 5
        assert _done(there.get(cookie)) == replace(session, used_at=clock.now)
        assert _done(there.sign_out(cookie)) is not None
        assert _done(here.get(cookie)) is None
    finally:
        for store in stores:
            store.stop()


def test_cookies_are_httponly_strict_scoped_and_secure_over_tls() -> None:
    plain = cookie_header(SESSION_COOKIE, "abc", max_age=60, secure=False)
    assert plain == "mdmd_session=abc; Path=/ui/; Max-Age=60; HttpOnly; SameSite=Strict"
    assert cookie_header(SESSION_COOKIE, "abc", max_age=60, secure=True).endswith("; Secure")
    assert read_cookie(b"a=1; mdmd_session=xyz; b=2", SESSION_COOKIE) == "xyz"
    assert read_cookie(b"a=1", SESSION_COOKIE) is None and read_cookie(None, SESSION_COOKIE) is None


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("/ui/devices?q=a", "/ui/devices?q=a"),
        ("https://evil.example/ui/", "/ui/fleet"),
        ("//evil.example/ui/", "/ui/fleet"),
        ("/ui/\\evil", "/ui/fleet"),
        ("/api/v1/devices", "/ui/fleet"),
        ("/ui/signout", "/ui/fleet"),
        ("/ui/a\r\nSet-Cookie: x", "/ui/fleet"),
        (None, "/ui/fleet"),
    ],
)
def test_after_signing_in_only_console_pages_are_a_destination(given: str | None, expected: str) -> None:
    assert safe_next(given) == expected


def test_only_url_encoded_forms_are_read() -> None:
    assert parse_form(b"application/x-www-form-urlencoded; charset=utf-8", b"a=1&b=&a=2") == {
        "a": ["1", "2"],
        "b": [""],
    }
    for content_type, body in ((b"application/json", b"{}"), (None, b"a=1"), (b"text/plain", b"a=1")):
        with pytest.raises(ValueError):
            parse_form(content_type, body)
    with pytest.raises(ValueError):
        parse_form(b"application/x-www-form-urlencoded", b"a=\xff")


# --- the pages through the real site and store ---


@dataclass
class Console:
    site: MdmdSite
    store: SQLiteStore

    def request(
        self,
        method: str,
        path: str,
        *,
        cookies: dict[str, str] | None = None,
        form: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, list[str]], bytes]:
        channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
        assert channel is not None
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 50000))
        channel.makeConnection(transport)
        body = urlencode(form).encode() if form is not None else b""
        head = f"{method} {path} HTTP/1.1\r\nHost: console.test\r\nContent-Length: {len(body)}\r\n"
        if form is not None:
            head += "Content-Type: application/x-www-form-urlencoded\r\n"
        if cookies:
            head += "Cookie: " + "; ".join(f"{k}={v}" for k, v in cookies.items()) + "\r\n"
        channel.dataReceived(head.encode() + b"\r\n" + body)
        # The store answers on its own threads: wait, bounded, for the reply.
        deadline = time.monotonic() + 10
        while True:
            raw = transport.value()
            head_bytes, sep, payload = raw.partition(b"\r\n\r\n")
            length = re.search(rb"Content-Length: (\d+)", head_bytes)
            if sep and length and len(payload) >= int(length.group(1)):
                break
            assert time.monotonic() < deadline, "no reply"
            time.sleep(0.005)
        lines = head_bytes.decode("latin-1").split("\r\n")
        headers: dict[str, list[str]] = {}
        for line in lines[1:]:
            name, _, value = line.partition(": ")
            headers.setdefault(name.lower(), []).append(value)
        return int(lines[0].split()[1]), headers, payload

    def sign_in(self, token: str = TOKEN) -> str:
        status, headers, body = self.request("GET", "/ui/signin")
        assert status == 200
        pre = read_cookie(headers["set-cookie"][0].encode(), SIGNIN_COOKIE)
        csrf = re.search(rb'name="csrf" value="([^"]+)"', body)
        assert pre is not None and csrf is not None
        status, headers, _ = self.request(
            "POST",
            "/ui/signin",
            cookies={SIGNIN_COOKIE: pre},
            form={"csrf": csrf.group(1).decode(), "token": token, "next": "/ui/devices"},
        )
        assert status == 303 and headers["location"] == ["/ui/devices"]
        cookie = read_cookie(headers["set-cookie"][0].encode(), SESSION_COOKIE)
        assert cookie
        return cookie

    def csrf(self, cookie: str) -> str:
        _, _, body = self.request("GET", "/ui/groups", cookies={SESSION_COOKIE: cookie})
        found = re.search(rb'name="csrf" value="([^"]+)"', body)
        assert found is not None
        return found.group(1).decode()


@pytest.fixture
def console(tmp_path: Path) -> Iterator[Console]:
    reactor = ThreadReactor()
    store = SQLiteStore(str(tmp_path / "mdmd.sqlite3"), reactor)  # type: ignore[arg-type]
    store.open()
    store.start()
    tokens = AdminTokens(store)
    wait(Deferred.fromCoroutine(tokens.adopt_bootstrap(TOKEN, 1.0)))
    h = wait(store.enroll_host(host(1), now=1.0))
    wait(store.record_device_enrollment(enrollment("SECRETDEVICE1", h.id, "s1"), now=2.0))
    clock = MemoryReactorClock()
    clock.advance(time.time())
    config = SimpleNamespace(
        admin=SimpleNamespace(url="http://127.0.0.1:8445"),
        management=SimpleNamespace(message_log=50, provider_id="mdmd"),
        wstep=WstepConfig("", "", 365, 42, 7, 0, 90),
    )
    app = Mdmd(config=config, material=None, store=store, reactor=clock, tokens=tokens)  # type: ignore[arg-type]
    fleet = FleetCountsCache(store, clock, 10)
    # Its own clock: nothing a request schedules lands on the global reactor.
    site = MdmdSite(
        RoutingResource(console_routes(app, fleet)), listener="admin", max_body_bytes=1 << 20, reactor=clock
    )
    yield Console(site, store)
    store.stop()


PAGES = [
    "/ui",
    "/ui/fleet",
    "/ui/devices",
    "/ui/devices?q=SECRET",
    "/ui/devices/SECRETDEVICE1",
    "/ui/devices/SECRETDEVICE1/messages",
    "/ui/profiles",
    "/ui/profiles/new",
    "/ui/profiles/p",
    "/ui/groups",
    "/ui/groups/all",
    "/ui/operations",
    "/ui/audit",
    "/ui/no/such/page",
]


@pytest.mark.parametrize("path", PAGES)
def test_without_a_session_every_page_redirects_to_sign_in_and_shows_nothing(
    console: Console, path: str
) -> None:
    for cookies in (None, {SESSION_COOKIE: "made-up"}):
        status, headers, body = console.request("GET", path, cookies=cookies)
        assert status == 303 and body == b""
        assert headers["location"][0].startswith("/ui/signin")
        assert "default-src 'none'" in headers["content-security-policy"][0]


def test_a_page_asked_for_before_signing_in_is_where_sign_in_leads(console: Console) -> None:
    status, headers, _ = console.request("GET", "/ui/devices?q=SECRET")
    assert status == 303 and headers["location"] == ["/ui/signin?next=%2Fui%2Fdevices%3Fq%3DSECRET"]
    status, _, body = console.request("GET", headers["location"][0])
    assert status == 200 and b'name="next" value="/ui/devices?q=SECRET"' in body


def test_writes_without_a_session_change_nothing(console: Console) -> None:
    status, headers, _ = console.request("POST", "/ui/groups", form={"name": "g1", "csrf": "x"})
    assert status == 303 and headers["location"][0].startswith("/ui/signin")
    status, headers, _ = console.request(
        "POST", "/ui/devices/SECRETDEVICE1/actions", form={"action": "restart", "confirm": "yes", "csrf": "x"}
    )
    assert status == 303
    assert wait(console.store.group("g1")) is None
    assert wait(console.store.device_actions("SECRETDEVICE1")) == []


def test_signing_in_gives_a_strict_session_cookie_and_every_page_a_strict_policy(console: Console) -> None:
    status, headers, body = console.request("GET", "/ui/signin")
    (signin_cookie,) = headers["set-cookie"]
    assert (
        "HttpOnly" in signin_cookie and "SameSite=Strict" in signin_cookie and "Secure" not in signin_cookie
    )
    cookie = console.sign_in()
    for path in PAGES[1:]:
        status, headers, body = console.request("GET", path, cookies={SESSION_COOKIE: cookie})
        assert status in (200, 404), (path, status)
        assert headers["content-type"] == ["text/html; charset=utf-8"]
        csp = headers["content-security-policy"][0]
        assert "default-src 'none'" in csp and "script-src" not in csp and "frame-ancestors 'none'" in csp
        assert headers["x-frame-options"] == ["DENY"] and headers["cache-control"] == ["no-store"]
        assert b"<script" not in body and b" style=" not in body
    _, _, body = console.request("GET", "/ui/devices?q=SECRET", cookies={SESSION_COOKIE: cookie})
    assert b"SECRETDEVICE1" in body
    entries = wait(console.store.audit_log(__import__("mdmd.store", fromlist=["AuditQuery"]).AuditQuery()))
    assert [(e.entry.actor, e.entry.action) for e in entries] == [("admin", "console.signin")]


def test_sign_in_refuses_a_wrong_token_or_a_forged_form(console: Console) -> None:
    status, headers, body = console.request("GET", "/ui/signin")
    pre = read_cookie(headers["set-cookie"][0].encode(), SIGNIN_COOKIE)
    csrf = re.search(rb'name="csrf" value="([^"]+)"', body)
    assert pre and csrf
    form = {"csrf": csrf.group(1).decode(), "token": "wrong"}
    status, headers, body = console.request("POST", "/ui/signin", cookies={SIGNIN_COOKIE: pre}, form=form)
    assert status == 401 and b"unknown or revoked" in body
    assert all(SESSION_COOKIE not in c for c in headers.get("set-cookie", []))
    # The right token in a form this console did not give out.
    forged = {"csrf": "forged", "token": TOKEN}
    status, headers, _ = console.request("POST", "/ui/signin", cookies={SIGNIN_COOKIE: pre}, form=forged)
    assert status == 403 and all(SESSION_COOKIE not in c for c in headers.get("set-cookie", []))
    status, _, _ = console.request("POST", "/ui/signin", form={"csrf": pre, "token": TOKEN})
    assert status == 403


def test_every_form_needs_the_sessions_csrf_token(console: Console) -> None:
    cookie = console.sign_in()
    for form in ({"name": "g1"}, {"name": "g1", "csrf": "forged"}):
        status, _, body = console.request("POST", "/ui/groups", cookies={SESSION_COOKIE: cookie}, form=form)
        assert status == 403 and b"not one this console gave" in body
    for path, form in (
        ("/ui/devices/SECRETDEVICE1/actions", {"action": "restart", "confirm": "yes"}),
        ("/ui/profiles/new", {"name": "p", "syncml": "<Replace/>"}),
        ("/ui/signout", {}),
    ):
        status, _, _ = console.request("POST", path, cookies={SESSION_COOKIE: cookie}, form=form)
        assert status == 403, path
    assert wait(console.store.group("g1")) is None
    assert wait(console.store.device_actions("SECRETDEVICE1")) == []
    # With the token the write happens, audited under the token's name.
    csrf = console.csrf(cookie)
    status, headers, _ = console.request(
        "POST", "/ui/groups", cookies={SESSION_COOKIE: cookie}, form={"name": "g1", "csrf": csrf}
    )
    assert status == 303 and headers["location"] == ["/ui/groups/g1?done=created"]
    assert wait(console.store.group("g1")) is not None


def test_an_action_is_queued_only_after_its_confirmation(console: Console) -> None:
    cookie = console.sign_in()
    csrf = console.csrf(cookie)
    path = "/ui/devices/SECRETDEVICE1/actions"
    form = {"csrf": csrf, "action": "wipe", "mode": "protected"}
    status, _, body = console.request("POST", path, cookies={SESSION_COOKIE: cookie}, form=form)
    assert status == 200 and b"Confirm wipe" in b" ".join(body.split()) and b'value="protected"' in body
    assert wait(console.store.device_actions("SECRETDEVICE1")) == []
    status, headers, _ = console.request(
        "POST", path, cookies={SESSION_COOKIE: cookie}, form={**form, "confirm": "yes"}
    )
    assert status == 303 and headers["location"] == ["/ui/devices/SECRETDEVICE1?done=action"]
    (action,) = wait(console.store.device_actions("SECRETDEVICE1"))
    assert (action.action, dict(action.options)) == ("wipe", {"mode": "protected"})
    # A refusal is shown, not queued: the same action again.
    status, _, body = console.request(
        "POST", path, cookies={SESSION_COOKIE: cookie}, form={**form, "confirm": "yes"}
    )
    assert status == 409 and b"pending already" in body


def test_signing_out_ends_the_session(console: Console) -> None:
    cookie = console.sign_in()
    csrf = console.csrf(cookie)
    status, headers, _ = console.request(
        "POST", "/ui/signout", cookies={SESSION_COOKIE: cookie}, form={"csrf": csrf}
    )
    assert status == 303 and headers["location"] == ["/ui/signin?signed_out=1"]
    assert "Max-Age=0" in headers["set-cookie"][0]
    status, headers, _ = console.request("GET", "/ui/fleet", cookies={SESSION_COOKIE: cookie})
    assert status == 303 and headers["location"][0].startswith("/ui/signin")


def test_the_cookie_is_secure_when_the_console_is_reached_over_https(console: Console) -> None:
    routes = console.site.resource.routes
    app = routes[1].resource.console.app
    app.config.admin.url = "https://mdm-admin.example.com"
    _, headers, _ = console.request("GET", "/ui/signin")
    assert headers["set-cookie"][0].endswith("; Secure")


def test_the_console_is_served_over_tls_with_a_secure_cookie(tmp_path: Path) -> None:
    """[admin] tls_cert/tls_key: the API and the console over HTTPS (the
    development certificate covers localhost)."""
    tls = {"tls_cert": "tls-server.pem", "tls_key": "tls-server.key"}
    with running_daemon(tmp_path, {"admin": tls}) as daemon:
        port = daemon.port("admin")
        conn = HTTPSConnection("localhost", port, context=daemon.server_context(), timeout=30)
        try:
            conn.request("GET", "/ui/signin")
            response = conn.getresponse()
            response.read()
            assert response.status == 200
            cookie = response.getheader("Set-Cookie") or ""
            assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and cookie.endswith("; Secure")
            conn.request("GET", "/api/v1/version", headers={"Authorization": f"Bearer {daemon.admin_token}"})
            response = conn.getresponse()
            assert response.status == 200 and b"schema_version" in response.read()
        finally:
            conn.close()
        assert "admin listener (TLS, bearer token)" in daemon.log_text()
