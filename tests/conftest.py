"""Shared pytest fixtures for the mdmd test suite."""

from __future__ import annotations

from pathlib import Path

import pytest

#: Test data kept in the repository; tests/data/*/SOURCES.md says where each
#: file came from.
DATA = Path(__file__).resolve().parent / "data"


def _data_folder(name: str) -> Path:
    folder = DATA / name
    if not (folder / "SOURCES.md").is_file():
        # Fail, never skip: without these the suite would pass while proving
        # nothing about real Windows clients or the published schemas.
        pytest.fail(f"test data missing: {folder} (part of the repository)", pytrace=False)
    return folder


@pytest.fixture(scope="session")
def windows_fixtures() -> Path:
    """Folder of Windows client messages and certificates (test vectors)."""
    return _data_folder("windows")


@pytest.fixture(scope="session")
def schemas() -> Path:
    """Folder of the XML schemas from Microsoft's protocol documents."""
    return _data_folder("schemas")


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def store_backend(request: pytest.FixtureRequest) -> str:
    """The store a module's daemon runs on: its tests run once per backend
    (the PostgreSQL run is skipped when PostgreSQL is not installed and not
    required, see pg_cluster.py)."""
    backend = str(request.param)
    if backend == "postgresql":
        from pg_cluster import cluster_or_skip

        cluster_or_skip()
    return backend
