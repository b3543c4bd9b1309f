"""The admin tokens a node knows follow the store: a token created or
revoked through another node (another process on the same database)
counts here within REFRESH_SECONDS, on a real SQLite store and a test
clock."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import pytest
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher

from mdmd.store import AdminToken
from mdmd.store.sqlite import SQLiteStore
from mdmd.tokens import REFRESH_SECONDS, AdminTokens, AdminTokensService, hash_token
from store_helpers import ThreadReactor, wait

BOOTSTRAP = "mdmd_bootstrap-token"
OTHER = "mdmd_made-through-another-node"


def _stores(path: Path) -> tuple[SQLiteStore, SQLiteStore]:
    stores = (SQLiteStore(str(path), ThreadReactor()), SQLiteStore(str(path), ThreadReactor()))  # type: ignore[arg-type]
    for store in stores:
        store.open()
        store.start()
    return stores


@pytest.fixture
def here_and_there(tmp_path: Path) -> Iterator[tuple[SQLiteStore, SQLiteStore]]:
    stores = _stores(tmp_path / "mdmd.sqlite3")
    try:
        yield stores
    finally:
        for store in stores:
            store.stop()


def _until(what: str, check: Callable[[], bool], timeout: float = 10.0) -> None:
    # The store answers on its own threads: bounded polling for the result.
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.01)


def test_a_token_created_or_revoked_elsewhere_counts_here_after_the_next_refresh(
    here_and_there: tuple[SQLiteStore, SQLiteStore],
) -> None:
    here, there = here_and_there
    clock = Clock()
    tokens = AdminTokens(here)
    service = AdminTokensService(tokens, BOOTSTRAP, 1.0, clock)
    service.startService()
    wait(service.loaded)
    assert tokens.current() == {hash_token(BOOTSTRAP): "admin"}

    wait(there.create_admin_token(AdminToken("ops", hash_token(OTHER), 2.0)))
    clock.advance(REFRESH_SECONDS - 0.1)
    assert hash_token(OTHER) not in (tokens.current() or {})  # not read again yet
    clock.advance(0.1)
    _until("the new token known", lambda: (tokens.current() or {}).get(hash_token(OTHER)) == "ops")

    assert wait(there.revoke_admin_token("ops", 3.0)) == "revoked"
    clock.advance(REFRESH_SECONDS)
    _until("the revoked token forgotten", lambda: hash_token(OTHER) not in (tokens.current() or {}))
    assert tokens.current() == {hash_token(BOOTSTRAP): "admin"}

    service.stopService()
    assert clock.getDelayedCalls() == []


def test_a_store_that_cannot_be_read_keeps_the_known_tokens(tmp_path: Path) -> None:
    here, there = _stores(tmp_path / "mdmd.sqlite3")
    clock = Clock()
    tokens = AdminTokens(here)
    service = AdminTokensService(tokens, BOOTSTRAP, 1.0, clock)
    service.startService()
    wait(service.loaded)
    there.stop()
    here.stop()  # every read fails from now on
    events: list[LogEvent] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        for _ in range(3):
            clock.advance(REFRESH_SECONDS)
    finally:
        globalLogPublisher.removeObserver(observer)
    assert tokens.current() == {hash_token(BOOTSTRAP): "admin"}
    warnings = [e for e in events if e.get("log_namespace") == "mdmd.tokens"]
    assert len(warnings) == 1 and "store is not open" in formatEvent(warnings[0])
    service.stopService()
