"""Reports how many crash images the crash-safety tests checked."""

from __future__ import annotations

import pytest


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    from tests.snapshot.test_crash import CHECKED

    if CHECKED["points"]:
        terminalreporter.write_line(
            f"snapshot store crash images checked: {CHECKED['points']}")
