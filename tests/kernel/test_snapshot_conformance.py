"""The snapshot targets: blockera's userspace engine and the real kernel (Linux 6.1 under
qemu) give identical results for every scenario in `snapshot_scenarios` -- status lines,
tables, errors, device contents (sha256) and the COW stores as `cow changed` reads them --
and each engine loads, writes and merges the COW stores the other one wrote (see
`conformance` for the jobs one guest boot runs)."""

from __future__ import annotations

import pytest

from .conformance import run_conformance
from .guest import KernelGuest
from .snapshot_scenarios import SNAPSHOT_SCENARIOS as SCENARIOS

# one worker runs the whole module: its fixture boots the guest once for all of them
pytestmark = [pytest.mark.kernel, pytest.mark.xdist_group("snapshot-conformance")]


@pytest.fixture(scope="module")
def conformance(kernel_guest: KernelGuest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_conformance(kernel_guest, tmp_path_factory.mktemp("snapshot-conformance"),
                           SCENARIOS)


@pytest.mark.parametrize("scenario", [s.name for s in SCENARIOS])
def test_scenario_identical_on_both_engines(conformance: dict, scenario: str) -> None:
    assert conformance["kernel"][scenario] == conformance["user"][scenario]


@pytest.mark.parametrize("scenario", [s.name for s in SCENARIOS if s.handoff_after])
def test_kernel_continues_from_userspace_cow(conformance: dict, scenario: str) -> None:
    assert conformance["kernel"][f"{scenario}@u2"] == conformance["user"][f"{scenario}@u2"]


@pytest.mark.parametrize("scenario", [s.name for s in SCENARIOS if s.handoff_after])
def test_userspace_continues_from_kernel_cow(conformance: dict, scenario: str) -> None:
    assert conformance["user"][f"{scenario}@k2"] == conformance["kernel"][f"{scenario}@k2"]


def test_first_halves_agree(conformance: dict) -> None:
    """The disks handed over were made by the same steps on both engines."""
    for s in SCENARIOS:
        if s.handoff_after:
            assert conformance["user"][f"{s.name}@u1"] == conformance["kernel"][f"{s.name}@k1"]
