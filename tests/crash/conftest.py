"""Reports how many power-cut states the snapshot crash test checked."""

from __future__ import annotations

import pytest


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    from tests.crash.test_snapshot_crash import CHECKED

    if CHECKED["points"]:
        terminalreporter.write_line(
            f"snapshot target power-cut states checked: {CHECKED['points']}")
