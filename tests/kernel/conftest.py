"""Fixtures for tests that drive the real kernel's device-mapper inside a qemu guest."""

from __future__ import annotations

import os

import pytest

from .guest import KernelGuest, ensure_assets, guest_available

REQUIRE_ENV = "BLOCKERA_REQUIRE_KERNEL"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers",
                            "kernel: tests that boot the real Linux kernel under qemu")


@pytest.fixture(scope="session")
def kernel_guest() -> KernelGuest:
    """The qemu guest; skipped when qemu or its helpers are not installed.

    Set ``BLOCKERA_REQUIRE_KERNEL=1`` to turn that skip into a failure (CI).
    """
    available, reason = guest_available()
    if not available:
        if os.environ.get(REQUIRE_ENV, "") not in ("", "0"):
            pytest.fail(f"{reason} (and {REQUIRE_ENV} is set)")
        pytest.skip(f"{reason}; install: apt-get install qemu-system-x86 "
                    "busybox-static kmod dmsetup")
    return KernelGuest(ensure_assets())
