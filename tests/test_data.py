"""The test data in tests/data: every file accounted for in its SOURCES.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent / "data"


def _documented(sources: Path) -> set[str]:
    """File names in the first column of SOURCES.md's tables (placeholders
    such as ``{{SERVER_URL}}`` are not files)."""
    names = re.findall(r"^\| `([^`]+)` \|", sources.read_text(encoding="utf-8"), re.MULTILINE)
    return {name for name in names if not name.startswith("{{")}


@pytest.mark.parametrize("folder", ["windows", "schemas"])
def test_every_data_file_has_its_source_written_down(folder: str) -> None:
    here = DATA / folder
    assert (here / "SOURCES.md").is_file(), f"{here}/SOURCES.md is part of the repository"
    present = {p.name for p in here.iterdir()} - {"SOURCES.md"}
    assert present, f"{here} holds no test data"
    assert _documented(here / "SOURCES.md") == present
