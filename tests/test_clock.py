"""The daemon's one clock: the reactor's, moved by a test-only offset."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from mdmd.app import TEST_CLOCK_OFFSET_VARIABLE, Mdmd, clock_offset_for_tests


def test_now_is_the_reactor_clock_plus_the_offset() -> None:
    clock = Clock()
    clock.advance(1000)
    app = Mdmd(config=None, material=None, store=None, reactor=clock, clock_offset=86400.0)  # type: ignore[arg-type]
    assert app.now() == 87400.0
    clock.advance(5)
    assert app.now() == 87405.0


def test_the_offset_comes_from_the_test_only_variable() -> None:
    assert clock_offset_for_tests({}) == 0.0
    assert clock_offset_for_tests({TEST_CLOCK_OFFSET_VARIABLE: " "}) == 0.0
    assert clock_offset_for_tests({TEST_CLOCK_OFFSET_VARIABLE: "3628800"}) == 3628800.0
    with pytest.raises(ValueError, match=TEST_CLOCK_OFFSET_VARIABLE):
        clock_offset_for_tests({TEST_CLOCK_OFFSET_VARIABLE: "six weeks"})
