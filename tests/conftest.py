"""Shared pytest fixtures for the mdmd test suite."""

from __future__ import annotations

from pathlib import Path

import pytest

# Real Windows traffic kept outside the checkout (see SOURCES.md there).
_WINDOWS_FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "windows"


@pytest.fixture(scope="session")
def windows_fixtures() -> Path:
    """Folder of Windows client messages and certificates (test vectors)."""
    if not _WINDOWS_FIXTURES.is_dir():
        # Fail, never skip: without these the suite would pass while proving
        # nothing about real Windows clients.
        pytest.fail(
            f"Windows test vectors not found at {_WINDOWS_FIXTURES}; "
            "they live in shared/fixtures/windows next to the checkout",
            pytrace=False,
        )
    return _WINDOWS_FIXTURES
