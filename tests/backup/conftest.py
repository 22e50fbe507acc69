"""Fixtures for the backup repository tests (helpers.py has the rest)."""

from __future__ import annotations

import pytest

from .helpers import Restic, need_restic


@pytest.fixture
def restic_factory() -> type[Restic]:
    need_restic()
    return Restic
