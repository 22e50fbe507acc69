"""Runs a list of scenarios on both engines: every scenario whole on each; for those with a
handoff point, the first half on one engine and the second half on the other, in both
directions. One guest boot runs every kernel job:

  NAME        the whole scenario;
  NAME@u2     the second half, on the disks the userspace engine left after the first half;
  NAME@k1     the first half (its disks come back to the host);
  NAME@k2     the second half on NAME@k1's disks, for comparison with the userspace engine
              continuing from the same disks.

Returns {"user": {key: results}, "kernel": {key: results}, "out": the kernel jobs' disks,
"seconds": guest run time}.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from blockera.engine.userspace import Engine

from .guest import KernelGuest
from .scenarios import Runner, Scenario, steps_for

REPO = Path(__file__).resolve().parents[2]


def host_disks(directory: Path, scenario: Scenario, carried_from: Path | None = None
               ) -> dict[str, str]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, size in scenario.disks.items():
        image = directory / f"{name}.img"
        with open(image, "wb") as f:
            f.truncate(size)
        if carried_from is not None and name in scenario.carried_disks:
            shutil.copyfile(carried_from / f"{name}.img", image)
        paths[name] = str(image)
    return paths


def run_userspace(scenario: Scenario, part: str, disks: dict[str, str]) -> list[str]:
    engine = Engine()
    try:
        return Runner(engine, disks).run(steps_for(scenario, part))
    finally:
        engine.shutdown()


def run_conformance(kernel_guest: KernelGuest, work: Path, scenarios: list[Scenario],
                    timeout_s: float = 1500) -> dict:
    share = work / "share"
    share.mkdir()
    user: dict[str, list[str]] = {}
    plan = []
    for s in scenarios:
        user[s.name] = run_userspace(s, "all", host_disks(work / "user" / s.name, s))
        plan.append({"scenario": s.name, "part": "all", "key": s.name})
        if s.handoff_after is None:
            continue
        first = work / "user" / f"{s.name}@u1"
        user[f"{s.name}@u1"] = run_userspace(s, "first", host_disks(first, s))
        handed = share / "images" / f"{s.name}@u2"
        handed.mkdir(parents=True)
        for name in s.carried_disks:
            shutil.copyfile(first / f"{name}.img", handed / f"{name}.img")
        user[f"{s.name}@u2"] = run_userspace(
            s, "second", host_disks(work / "user" / f"{s.name}@u2", s, carried_from=first))
        plan.append({"scenario": s.name, "part": "second", "key": f"{s.name}@u2"})
        plan.append({"scenario": s.name, "part": "first", "key": f"{s.name}@k1"})
        plan.append({"scenario": s.name, "part": "second", "key": f"{s.name}@k2",
                     "images_from": f"{s.name}@k1"})
    (share / "plan.json").write_text(json.dumps(plan))
    script = (f"cd {REPO}\n"
              f"{sys.executable} -m tests.kernel.scenarios \"$SHARE/plan.json\" "
              "\"$SHARE/results.json\"\n")
    result = kernel_guest.run(script, [], share, timeout_s=timeout_s, memory_mb=2048)
    result.check()
    kernel = json.loads((share / "results.json").read_text())
    for s in scenarios:
        if s.handoff_after is not None:
            user[f"{s.name}@k2"] = run_userspace(
                s, "second", host_disks(work / "user" / f"{s.name}@k2", s,
                                        carried_from=share / "out" / f"{s.name}@k1"))
    return {"user": user, "kernel": kernel, "out": share / "out",
            "seconds": result.duration_s}
