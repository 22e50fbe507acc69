"""The conformance scenario language: a scenario is data (disks and a list of steps), run once
by the userspace engine and once by the real kernel (inside the qemu guest), with the same
runner; the recorded results must be identical.

Steps (tuples):
  ("create"|"load", dev, table)   table text; "{name}" stands for a scenario disk's path
  ("suspend"|"resume"|"remove"|"clear", dev)
  ("message", dev, word, ...)     sector 0
  ("status"|"table", dev)         recorded (tables with device names normalised)
  ("status_era", dev)             recorded: an era status line without the metadata blocks in
                                  use (where block usage differs on purpose, e.g. after a live
                                  reload, which the kernel continues on a stale view)
  ("write", dev, block_bytes, [blocks], seed)   one I/O per block: block_bytes at block * bytes
                                  (background work settles after the first)
  ("write_at", dev, offset_bytes, length_bytes, seed)   one I/O
  ("sha", dev)                    recorded: sha256 of the whole device
  ("invalidate", disk, since, snapshot)   recorded: blockera's reading of the metadata disk
  ("dump", disk)                  recorded: sha256 of `era dump --logical` of the metadata disk
  ("check", disk)                 recorded: blockera's full check of the metadata disk
  ("cow", disk)                   recorded: blockera's reading of a COW (header, changed chunks)
  ("discard", dev, offset_bytes, length_bytes)   one discard
  ("wait_merge", dev)             wait until a snapshot-merge device has merged everything (or
                                  failed), then record its status

A failing step records "ERROR <errno>: <reason>" (the reason as the target gave it) and the run
goes on. The runner is run in the guest as `python3 -m tests.kernel.scenarios PLAN OUT`.

The scenarios themselves are in era_scenarios.py and snapshot_scenarios.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

MiB = 1 << 20
K64 = 64 << 10


@dataclass
class Scenario:
    name: str
    disks: dict[str, int]
    steps: list[tuple]
    handoff_after: int | None = None   # split point for engine-to-engine handoff tests
    notes: str = ""
    metadata_disks: list[str] = field(default_factory=lambda: ["meta"])
    # disks whose contents pass from the first half to the second (default: metadata_disks)
    carried: list[str] | None = None
    # steps that bring the devices back up for the second half (default: the era device's
    # first create step)
    resume_steps: list[tuple] | None = None

    @property
    def carried_disks(self) -> list[str]:
        return self.metadata_disks if self.carried is None else self.carried


def all_scenarios() -> list[Scenario]:
    from .era_scenarios import ERA_SCENARIOS
    from .snapshot_scenarios import SNAPSHOT_SCENARIOS

    return ERA_SCENARIOS + SNAPSHOT_SCENARIOS


# -- the runner ------------------------------------------------------------------------------------
def _data(seed: int, length: int) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < length:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:length])


_ERRNO_WORDS = ("Invalid argument: ", "No space left on device: ", "Device or resource busy: ",
                "Input/output error: ", "No such device or address: ")
MERGE_WAIT_SECONDS = 120


def _reason(text: str) -> str:
    """The target's own words from an error message of either engine: the kernel's arrives as
    dmsetup's errno text plus kernel log lines ("table: 254:0: era: Invalid block size; ...")."""
    for prefix in _ERRNO_WORDS:
        if text.startswith(prefix):
            text = text[len(prefix):]
    parts = text.split("; ")
    text = next((p for p in parts if re.match(r"table: \d+:\d+: ", p)), parts[0])
    text = re.sub(r"^table: \d+:\d+: ", "", text)
    text = re.sub(r"^(era|linear|snapshot|snapshot-origin|snapshot-merge): ", "", text)
    text = re.sub(r"^(metadata|era)_[a-z_]+: ", "", text)
    return re.sub(r" \(.*\)$", "", text)


def _error_text(exc: BaseException) -> str:
    from blockera.errors import BlockeraError, TableError, TargetError

    errno_name = exc.errno_name if isinstance(exc, BlockeraError) else type(exc).__name__
    if isinstance(exc, (TableError, TargetError)):
        return f"ERROR {errno_name}: {_reason(str(exc))}"
    return f"ERROR {errno_name}"


class Runner:
    def __init__(self, engine, disks: dict[str, str]) -> None:
        self.engine = engine
        self.disks = disks
        self.names: dict[str, str] = {}
        for name, path in disks.items():
            st = os.stat(path)
            if stat.S_ISBLK(st.st_mode):
                self.names[f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"] = f"{{{name}}}"
            self.names[str(Path(path).resolve())] = f"{{{name}}}"

    def _table(self, text: str) -> str:
        return text.format(**self.disks)

    def _normalise(self, text: str, dm_names: list[str]) -> str:
        for dm in dm_names:
            try:
                self.names[self.engine.dev_t(dm)] = f"{{dm:{dm}}}"
            except Exception:   # noqa: BLE001 - the device may be gone
                pass
        return " ".join(self.names.get(word, word) for word in text.split(" "))

    def run(self, steps: list[tuple]) -> list[str]:
        results = []
        live: list[str] = []
        for i, step in enumerate(steps):
            op, dev = step[0], step[1]
            try:
                out = self._step(op, dev, step[2:], live)
            except Exception as exc:  # noqa: BLE001 - every failure is a result to compare
                out = _error_text(exc)
            if out is not None:
                results.append(f"{i} {op} {dev}: {out}")
        return results

    def _step(self, op: str, dev: str, args: tuple, live: list[str]) -> str | None:
        e = self.engine
        # Background work (era digestion) must not race the next step: how far it got would
        # decide which blocks the next commit allocates.
        e.settle()
        if op == "create":
            e.create(dev, self._table(args[0]))
            live.append(dev)
        elif op == "load":
            e.load(dev, self._table(args[0]))
        elif op in ("suspend", "resume", "clear"):
            getattr(e, op)(dev)
        elif op == "remove":
            e.remove(dev)
            live.remove(dev)
        elif op == "message":
            e.message(dev, 0, list(args))
        elif op in ("status", "status_era"):
            text = e.status(dev).rstrip("\n")
            e.settle()
            if op == "status_era":
                text = re.sub(r" era 8 \d+/", " era 8 */", text)
            return text
        elif op == "table":
            return self._normalise(e.table(dev).rstrip("\n"), live)
        elif op == "write":
            block_bytes, blocks, seed = args
            with e.device(dev) as device:
                for n, block in enumerate(blocks):
                    device.write(block * block_bytes, _data(seed * 100003 + block, block_bytes))
                    if n == 0 and len(blocks) > 1:
                        # the first write may have started digestion (the era worker's first
                        # pass since a checkpoint): where the next write's commit fell among
                        # its steps would decide which blocks that commit allocates
                        e.settle()
                device.flush()
        elif op == "write_at":
            offset, length, seed = args
            with e.device(dev) as device:
                device.write(offset, _data(seed, length))
                device.flush()
        elif op == "sha":
            digest = hashlib.sha256()
            with e.device(dev) as device:
                for off in range(0, device.size_bytes, 4 * MiB):
                    digest.update(device.read(off, min(4 * MiB, device.size_bytes - off)))
            return digest.hexdigest()
        elif op == "discard":
            offset, length = args
            with e.device(dev) as device:
                device.discard(offset, length)
        elif op == "wait_merge":
            return self._wait_merge(dev)
        elif op in ("invalidate", "dump", "check"):
            return self._metadata(op, dev, args)
        elif op == "cow":
            return self._cow(dev)
        else:
            raise ValueError(f"unknown step {op!r}")
        return None

    def _wait_merge(self, dev: str) -> str:
        """Poll the status until sectors_allocated == metadata_sectors (the merge is done), or
        the status is no longer a usage line (Invalid, Merge failed, Overflow)."""
        deadline = time.monotonic() + MERGE_WAIT_SECONDS
        while True:
            self.engine.settle()
            text = self.engine.status(dev).rstrip("\n")
            usage = re.search(r" (\d+)/\d+ (\d+)$", text)
            if not usage or usage.group(1) == usage.group(2) or time.monotonic() > deadline:
                return text
            time.sleep(0.05)

    def _cow(self, disk: str) -> str:
        from blockera.blockdev import FileDevice
        from blockera.snapshot import changed_chunks, read_cow

        with FileDevice(self.disks[disk], writable=False, direct=True) as dev:
            image = read_cow(dev, lenient=True)
        if image.table is None:
            return f"unreadable: {image.error}"
        header = image.header
        result = changed_chunks(image)
        return json.dumps({"valid": header.valid, "chunk_sectors": header.chunk_sectors,
                           "exceptions": len(image.table), "ranges": result.ranges(),
                           "error": image.error})

    def _metadata(self, op: str, disk: str, args: tuple) -> str:
        from blockera.blockdev import FileDevice
        from blockera.era.check import check_era_metadata
        from blockera.era.dump import dump_xml
        from blockera.era.invalidate import written_since
        from blockera.era.image import EraImage

        with FileDevice(self.disks[disk], writable=False, direct=True) as dev:
            if op == "check":
                report = check_era_metadata(dev)
                return "ok" if report.ok else "errors: " + "; ".join(report.errors)
            if op == "dump":
                out = io.BytesIO()
                dump_xml(EraImage(dev), out, logical=True)
                return hashlib.sha256(out.getvalue()).hexdigest()
            since, snapshot = args
            result = written_since(EraImage(dev, use_snapshot=snapshot), since)
            return json.dumps(result.ranges())


def by_name(name: str) -> Scenario:
    return next(s for s in all_scenarios() if s.name == name)


def steps_for(scenario: Scenario, part: str) -> list[tuple]:
    if part == "all":
        return scenario.steps
    cut = scenario.handoff_after
    assert cut is not None
    head = scenario.steps[:cut]
    live = [s[1] for s in head if s[0] == "create"]
    live = [d for d in live if not any(s[0] == "remove" and s[1] == d for s in head)]
    if part == "first":
        return head + [("remove", d) for d in reversed(live)]
    if scenario.resume_steps is not None:
        return scenario.resume_steps + scenario.steps[cut:]
    table = next(s[2] for s in head if s[0] == "create" and s[1] == "era")
    return [("create", "era", table)] + scenario.steps[cut:]


def _guest_main(plan_path: str, out_path: str) -> None:
    """In the guest: each job's disks are image files in a scratch directory attached with
    losetup; a job's metadata disks start from $SHARE/images/KEY/NAME.img, or from the images
    another job left in $SHARE/out/SOURCE when the job says "images_from"; origin disks start
    empty. Every job's metadata images are left in $SHARE/out/KEY."""
    import shutil
    import tempfile

    from blockera.engine.kernel import KernelEngine

    share = Path(os.environ.get("SHARE", "."))
    plan = json.loads(Path(plan_path).read_text())
    scratch = Path(tempfile.mkdtemp(prefix="conformance-"))

    sources = {j["key"]: j.get("images_from") for j in plan}

    def disks(key: str, scenario: Scenario) -> dict[str, str]:
        paths = {}
        for name, size in scenario.disks.items():
            image = scratch / f"{key}-{name}.img"
            with open(image, "wb") as f:
                f.truncate(size)
            source = sources.get(key)
            given = (share / "out" / source if source else share / "images" / key) / f"{name}.img"
            if name in scenario.carried_disks and given.exists():
                shutil.copyfile(given, image)
            loop = subprocess.run(["losetup", "-f", "--show", str(image)], capture_output=True,
                                  text=True, check=True).stdout.strip()
            paths[name] = loop
        return paths

    results = {}
    for job in plan:
        scenario = by_name(job["scenario"])
        paths = disks(job["key"], scenario)
        results[job["key"]] = Runner(KernelEngine(), paths).run(steps_for(scenario, job["part"]))
        out_dir = share / "out" / job["key"]
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, loop in paths.items():
            subprocess.run(["losetup", "-d", loop], check=False)
            if name in scenario.carried_disks:
                shutil.copyfile(scratch / f"{job['key']}-{name}.img", out_dir / f"{name}.img")
            (scratch / f"{job['key']}-{name}.img").unlink()
    Path(out_path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    _guest_main(sys.argv[1], sys.argv[2])
