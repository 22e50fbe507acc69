"""The era target: blockera's userspace engine and the real kernel give identical results for
every scenario in `era_scenarios` (status lines, tables, errors, what the metadata says,
device contents), and each engine continues from metadata the other one wrote (see
`conformance` for the jobs one guest boot runs)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from .conformance import run_conformance
from .era_scenarios import ERA_SCENARIOS as SCENARIOS
from .guest import KernelGuest

# one worker runs the whole module: its fixture boots the guest once for all of them
pytestmark = [pytest.mark.kernel, pytest.mark.xdist_group("era-conformance")]


@pytest.fixture(scope="module")
def conformance(kernel_guest: KernelGuest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_conformance(kernel_guest, tmp_path_factory.mktemp("era-conformance"), SCENARIOS)


@pytest.mark.parametrize("scenario", [s.name for s in SCENARIOS])
def test_scenario_identical_on_both_engines(conformance: dict, scenario: str) -> None:
    assert conformance["kernel"][scenario] == conformance["user"][scenario]


@pytest.mark.parametrize("scenario", [s.name for s in SCENARIOS if s.handoff_after])
def test_kernel_continues_from_userspace_metadata(conformance: dict, scenario: str) -> None:
    assert conformance["kernel"][f"{scenario}@u2"] == conformance["user"][f"{scenario}@u2"]


@pytest.mark.parametrize("scenario", [s.name for s in SCENARIOS if s.handoff_after])
def test_userspace_continues_from_kernel_metadata(conformance: dict, scenario: str) -> None:
    assert conformance["user"][f"{scenario}@k2"] == conformance["kernel"][f"{scenario}@k2"]


@pytest.mark.parametrize("scenario", [s.name for s in SCENARIOS])
def test_kernel_metadata_read_by_blockera_and_0_9_0(conformance: dict, scenario: str) -> None:
    from blockera.blockdev import FileDevice
    from blockera.era.check import check_era_metadata

    s = next(x for x in SCENARIOS if x.name == scenario)
    for name in s.metadata_disks:
        image = conformance["out"] / scenario / f"{name}.img"
        with FileDevice(image, writable=False) as dev:
            report = check_era_metadata(dev)
        assert report.ok, report.lines()
        if shutil.which("era_check") and not any("past the end of the array" in w
                                                 for w in report.warnings):
            assert subprocess.run(["era_check", "-q", str(image)]).returncode == 0
