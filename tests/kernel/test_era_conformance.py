"""The era target: blockera's userspace engine and the real kernel give identical results for
every scenario in `scenarios.SCENARIOS` (status lines, tables, errors, what the metadata says,
device contents), and each engine continues from metadata the other one wrote.

One guest boot runs every kernel job:
  NAME        the whole scenario;
  NAME@u2     the second half, on metadata the userspace engine wrote in the first half;
  NAME@k1     the first half (its metadata comes back to the host);
  NAME@k2     the second half on NAME@k1's metadata, for comparison with the userspace engine
              continuing from the same metadata.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from blockera.dm.engine import Engine

from .guest import KernelGuest
from .scenarios import SCENARIOS, Runner, Scenario, steps_for

pytestmark = pytest.mark.kernel
REPO = Path(__file__).resolve().parents[2]


def _host_disks(directory: Path, scenario: Scenario, metadata_from: Path | None = None
                ) -> dict[str, str]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, size in scenario.disks.items():
        image = directory / f"{name}.img"
        with open(image, "wb") as f:
            f.truncate(size)
        if metadata_from is not None and name in scenario.metadata_disks:
            shutil.copyfile(metadata_from / f"{name}.img", image)
        paths[name] = str(image)
    return paths


def _userspace(scenario: Scenario, part: str, disks: dict[str, str]) -> list[str]:
    engine = Engine()
    try:
        return Runner(engine, disks).run(steps_for(scenario, part))
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def conformance(kernel_guest: KernelGuest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("era-conformance")
    share = work / "share"
    share.mkdir()
    user: dict[str, list[str]] = {}
    plan = []
    for s in SCENARIOS:
        user[s.name] = _userspace(s, "all", _host_disks(work / "user" / s.name, s))
        plan.append({"scenario": s.name, "part": "all", "key": s.name})
        if s.handoff_after is None:
            continue
        first = work / "user" / f"{s.name}@u1"
        user[f"{s.name}@u1"] = _userspace(s, "first", _host_disks(first, s))
        handed = share / "images" / f"{s.name}@u2"
        handed.mkdir(parents=True)
        for name in s.metadata_disks:
            shutil.copyfile(first / f"{name}.img", handed / f"{name}.img")
        user[f"{s.name}@u2"] = _userspace(
            s, "second", _host_disks(work / "user" / f"{s.name}@u2", s, metadata_from=first))
        plan.append({"scenario": s.name, "part": "second", "key": f"{s.name}@u2"})
        plan.append({"scenario": s.name, "part": "first", "key": f"{s.name}@k1"})
        plan.append({"scenario": s.name, "part": "second", "key": f"{s.name}@k2",
                     "images_from": f"{s.name}@k1"})
    (share / "plan.json").write_text(json.dumps(plan))
    script = (f"cd {REPO}\n"
              f"{sys.executable} -m tests.kernel.scenarios \"$SHARE/plan.json\" "
              "\"$SHARE/results.json\"\n")
    result = kernel_guest.run(script, [], share, timeout_s=1500, memory_mb=2048)
    result.check()
    kernel = json.loads((share / "results.json").read_text())
    # the userspace engine continuing from the kernel's metadata
    for s in SCENARIOS:
        if s.handoff_after is not None:
            user[f"{s.name}@k2"] = _userspace(
                s, "second", _host_disks(work / "user" / f"{s.name}@k2", s,
                                         metadata_from=share / "out" / f"{s.name}@k1"))
    return {"user": user, "kernel": kernel, "out": share / "out",
            "seconds": result.duration_s}


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
