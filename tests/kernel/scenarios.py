"""The conformance scenario language: a scenario is data (disks and a list of steps), run once
by the userspace engine and once by the real kernel (inside the qemu guest), with the same
runner; the recorded results must be identical.

Steps (tuples):
  ("create"|"load", dev, table)   table text; "{name}" stands for a scenario disk's path
  ("suspend"|"resume"|"remove"|"clear", dev)
  ("message", dev, word, ...)     sector 0
  ("status"|"table", dev)         recorded (tables with device names normalised)
  ("write", dev, block_bytes, [blocks], seed)   one I/O per block: block_bytes at block * bytes
  ("write_at", dev, offset_bytes, length_bytes, seed)   one I/O
  ("sha", dev)                    recorded: sha256 of the whole device
  ("invalidate", disk, since, snapshot)   recorded: blockera's reading of the metadata disk
  ("dump", disk)                  recorded: sha256 of `era dump --logical` of the metadata disk
  ("check", disk)                 recorded: blockera's full check of the metadata disk

A failing step records "ERROR <errno>: <reason>" (the reason as the target gave it) and the run
goes on. The runner is run in the guest as `python3 -m tests.kernel.scenarios PLAN OUT`.
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


def _era(bs: int, sectors: int = 65536) -> str:
    return f"0 {sectors} era {{meta}} {{origin}} {bs}"


TRACE = [
    ("create", "era", _era(128)), ("status", "era"),
    ("write", "era", K64, [3], 1), ("write", "era", K64, [200], 2), ("write", "era", K64, [201], 3),
    ("status", "era"), ("message", "era", "checkpoint"), ("status", "era"),
    ("write", "era", K64, [5], 4), ("write", "era", K64, [3], 5), ("status", "era"),
    ("message", "era", "take_metadata_snap"), ("status", "era"),
    ("invalidate", "meta", 1, True),
    ("write", "era", K64, [7], 6), ("status", "era"),
    ("message", "era", "drop_metadata_snap"), ("status", "era"),
    ("message", "era", "CHECKPOINT"), ("status", "era"), ("table", "era"),
    ("sha", "era"), ("remove", "era"), ("check", "meta"), ("dump", "meta"),
]

SCENARIOS: list[Scenario] = [
    Scenario("status-trace-128", {"meta": 8 * MiB, "origin": 32 * MiB}, TRACE,
             handoff_after=11, notes="specs §12, one bio per block"),
    Scenario("block-size-8", {"meta": 4 * MiB, "origin": 16 * MiB}, [
        ("create", "era", _era(8, 32768)), ("status", "era"),
        ("write", "era", 4096, [0, 1, 2, 100, 4095], 7), ("status", "era"),
        ("message", "era", "checkpoint"), ("write", "era", 4096, [1, 2000], 8),
        ("message", "era", "take_metadata_snap"), ("status", "era"),
        ("invalidate", "meta", 0, True), ("invalidate", "meta", 2, True),
        ("message", "era", "drop_metadata_snap"), ("status", "era"), ("sha", "era"),
        ("remove", "era"), ("check", "meta"), ("dump", "meta")], handoff_after=6),
    Scenario("block-size-24", {"meta": 4 * MiB, "origin": 16 * MiB}, [
        ("create", "era", _era(24, 32760)), ("status", "era"),
        ("write_at", "era", 71 * 512, 512, 9), ("write_at", "era", 72 * 512, 512, 10),
        ("write_at", "era", 24 * 512 * 40 + 4096, 4096, 11),
        ("message", "era", "take_metadata_snap"), ("status", "era"),
        ("invalidate", "meta", 1, True), ("message", "era", "drop_metadata_snap"),
        ("table", "era"), ("sha", "era"), ("remove", "era"), ("dump", "meta")],
        notes="not a power of two: sector 71 is block 2, sector 72 block 3"),
    Scenario("block-size-4096", {"meta": 4 * MiB, "origin": 128 * MiB}, [
        ("create", "era", _era(4096, 262144)), ("status", "era"),
        ("write_at", "era", 30 * 2 * MiB, 64 << 10, 12),
        ("write_at", "era", 49 * 2 * MiB + MiB, 64 << 10, 13),
        ("message", "era", "checkpoint"), ("status", "era"),
        ("write_at", "era", 0, 4096, 14),
        ("message", "era", "take_metadata_snap"), ("status", "era"),
        ("invalidate", "meta", 1, True), ("invalidate", "meta", 2, True),
        ("message", "era", "drop_metadata_snap"), ("remove", "era"), ("dump", "meta")],
        handoff_after=5),
    Scenario("checkpoints-without-writes", {"meta": 4 * MiB, "origin": 16 * MiB}, [
        ("create", "era", _era(128, 32768)),
        ("message", "era", "checkpoint"), ("status", "era"),
        ("message", "era", "checkpoint"), ("message", "era", "checkpoint"), ("status", "era"),
        ("write", "era", K64, [10], 15), ("message", "era", "checkpoint"), ("status", "era"),
        ("message", "era", "take_metadata_snap"), ("status", "era"),
        ("invalidate", "meta", 4, True), ("invalidate", "meta", 5, True),
        ("message", "era", "drop_metadata_snap"), ("remove", "era"), ("check", "meta")]),
    Scenario("snapshot-held-across-writes", {"meta": 4 * MiB, "origin": 32 * MiB}, [
        ("create", "era", _era(128)),
        ("write", "era", K64, [1, 2, 3], 16), ("message", "era", "take_metadata_snap"),
        ("status", "era"),
        ("write", "era", K64, [4, 5, 300], 17), ("message", "era", "checkpoint"),
        ("write", "era", K64, [6], 18), ("status", "era"),
        ("invalidate", "meta", 1, True), ("status", "era"),
        ("message", "era", "drop_metadata_snap"), ("message", "era", "take_metadata_snap"),
        ("status", "era"), ("invalidate", "meta", 1, True), ("invalidate", "meta", 3, True),
        ("message", "era", "drop_metadata_snap"), ("remove", "era"), ("check", "meta"),
        ("dump", "meta")], handoff_after=4),
    Scenario("reload", {"meta": 4 * MiB, "origin": 32 * MiB}, [
        ("create", "era", _era(128)), ("write", "era", K64, [8], 19), ("status", "era"),
        ("suspend", "era"), ("load", "era", _era(128)), ("resume", "era"), ("status", "era"),
        ("write", "era", K64, [9], 20), ("load", "era", _era(128)), ("resume", "era"),
        ("status", "era"), ("message", "era", "take_metadata_snap"),
        ("invalidate", "meta", 1, True), ("invalidate", "meta", 3, True),
        ("message", "era", "drop_metadata_snap"), ("remove", "era"), ("check", "meta")],
        notes="reload while suspended, and reload of a live device (the kernel's reload race)"),
    Scenario("remove-recreate", {"meta": 4 * MiB, "origin": 32 * MiB}, [
        ("create", "era", _era(128)), ("write", "era", K64, [11, 12], 21), ("remove", "era"),
        ("create", "era", _era(128)), ("status", "era"), ("write", "era", K64, [13], 22),
        ("remove", "era"), ("create", "era", _era(128)), ("status", "era"),
        ("message", "era", "take_metadata_snap"), ("invalidate", "meta", 1, True),
        ("invalidate", "meta", 3, True), ("message", "era", "drop_metadata_snap"),
        ("remove", "era"), ("check", "meta"), ("dump", "meta")], handoff_after=3),
    Scenario("suspend-resume", {"meta": 4 * MiB, "origin": 32 * MiB}, [
        ("create", "era", _era(128)), ("write", "era", K64, [14], 23), ("suspend", "era"),
        ("resume", "era"), ("status", "era"), ("suspend", "era"), ("resume", "era"),
        ("status", "era"), ("write", "era", K64, [14, 15], 24), ("status", "era"),
        ("remove", "era"), ("check", "meta"), ("dump", "meta")]),
    Scenario("resize", {"meta": 4 * MiB, "origin": 64 * MiB}, [
        ("create", "era", _era(128)), ("write", "era", K64, [511], 25), ("status", "era"),
        ("load", "era", _era(128, 65544)), ("resume", "era"), ("status", "era"),
        ("write_at", "era", 512 * K64, 4096, 26),
        ("load", "era", _era(128, 131072)), ("resume", "era"), ("status", "era"),
        ("load", "era", _era(128, 32768)), ("resume", "era"), ("status", "era"),
        ("message", "era", "take_metadata_snap"), ("invalidate", "meta", 0, True),
        ("message", "era", "drop_metadata_snap"), ("remove", "era"), ("check", "meta")],
        notes="512 -> 513 -> 1024 -> 256 blocks (specs §11.11)"),
    Scenario("shrink-to-array-block-multiple", {"meta": 4 * MiB, "origin": 16 * MiB}, [
        ("create", "era", _era(8, 1020 * 8)), ("write", "era", 4096, [1019], 27),
        ("load", "era", _era(8, 1018 * 8)), ("resume", "era"), ("status", "era"),
        ("message", "era", "checkpoint"), ("status", "era"), ("remove", "era"),
        ("check", "meta"), ("dump", "meta")],
        notes="dm_array_resize leaves the old partial tail block (0.9.0 tools reject this)"),
    Scenario("seed-000-stack", {"sdb": 256 * MiB, "sdc": 256 * MiB}, [
        ("create", "era-meta", "0 256 linear {sdb} 0"),
        ("create", "era", "0 524288 era /dev/mapper/era-meta {sdc} 4096"),
        ("create", "era-access", "0 256 linear /dev/mapper/era-meta 0"),
        ("status", "era"), ("table", "era"), ("table", "era-access"),
        ("message", "era", "take_metadata_snap"), ("status", "era"),
        ("message", "era", "drop_metadata_snap"),
        ("write_at", "era", 60 * MiB, MiB, 28), ("write_at", "era", 62 * MiB, MiB, 29),
        ("message", "era", "take_metadata_snap"), ("status", "era"),
        ("invalidate", "sdb", 1, True), ("message", "era", "drop_metadata_snap"),
        ("message", "era", "drop_metadata_snap"),
        ("remove", "era-meta"), ("remove", "era-access"), ("remove", "era"),
        ("remove", "era-meta"), ("check", "sdb")], metadata_disks=["sdb"]),
    Scenario("constructor-errors", {"meta": 4 * MiB, "origin": 16 * MiB}, [
        ("create", "era", "0 32768 era {meta} {origin}"),
        ("create", "era", "0 32768 era {meta} {origin} 128 1"),
        ("create", "era", "0 32768 era {meta} {origin} 128k"),
        ("create", "era", "0 32768 era {meta} {origin} 7"),
        ("create", "era", "0 32768 era {meta} {origin} 0"),
        ("create", "era", _era(128, 32768)), ("remove", "era"),
        ("create", "era", _era(256, 32768)),
        ("create", "era", _era(128, 32768)), ("status", "era"), ("remove", "era")]),
    Scenario("message-errors", {"meta": 4 * MiB, "origin": 16 * MiB}, [
        ("create", "era", _era(128, 32768)),
        ("message", "era", "bogus"), ("message", "era", "checkpoint", "now"),
        ("message", "era", "drop_metadata_snap"), ("status", "era"),
        ("message", "era", "take_metadata_snap"), ("message", "era", "take_metadata_snap"),
        ("status", "era"), ("message", "era", "drop_metadata_snap"),
        ("message", "era", "Drop_Metadata_Snap"), ("status", "era"), ("remove", "era")]),
    Scenario("many-blocks", {"meta": 16 * MiB, "origin": 1024 * MiB}, [
        ("create", "era", _era(8, 2 * 1024 * 1024)), ("status", "era"),
        ("write", "era", 4096, [0, 1017, 1018, 100000, 262143], 30), ("status", "era"),
        ("message", "era", "checkpoint"), ("status", "era"),
        ("write", "era", 4096, [5, 200000], 31),
        ("message", "era", "take_metadata_snap"), ("status", "era"),
        ("invalidate", "meta", 1, True), ("message", "era", "drop_metadata_snap"),
        ("remove", "era"), ("check", "meta")], handoff_after=6,
        notes="262144 blocks: a 258-block era array under a two-level btree"),
    Scenario("pending-writesets", {"meta": 4 * MiB, "origin": 32 * MiB}, [
        ("create", "era", _era(8)),
        ("write", "era", 4096, [1], 32), ("message", "era", "checkpoint"),
        ("write", "era", 4096, [2], 33), ("message", "era", "checkpoint"),
        ("write", "era", 4096, [3], 34), ("message", "era", "checkpoint"),
        ("write", "era", 4096, [1, 4], 35), ("message", "era", "take_metadata_snap"),
        ("status", "era"), ("invalidate", "meta", 2, True), ("invalidate", "meta", 4, True),
        ("message", "era", "drop_metadata_snap"), ("status", "era"), ("remove", "era"),
        ("check", "meta"), ("dump", "meta")]),
]


# -- the runner ------------------------------------------------------------------------------------
def _data(seed: int, length: int) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < length:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:length])


_ERRNO_WORDS = ("Invalid argument: ", "No space left on device: ", "Device or resource busy: ",
                "Input/output error: ")


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
        elif op == "status":
            text = e.status(dev).rstrip("\n")
            e.settle()
            return text
        elif op == "table":
            return self._normalise(e.table(dev).rstrip("\n"), live)
        elif op == "write":
            block_bytes, blocks, seed = args
            with e.device(dev) as device:
                for block in blocks:
                    device.write(block * block_bytes, _data(seed * 100003 + block, block_bytes))
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
        elif op in ("invalidate", "dump", "check"):
            return self._metadata(op, dev, args)
        else:
            raise ValueError(f"unknown step {op!r}")
        return None

    def _metadata(self, op: str, disk: str, args: tuple) -> str:
        from blockera.blockdev import FileDevice
        from blockera.era.check import check_era_metadata
        from blockera.era.dump import dump_xml
        from blockera.era.invalidate import written_since
        from blockera.era.reader import EraImage

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
    return next(s for s in SCENARIOS if s.name == name)


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
    table = next(s[2] for s in head if s[0] == "create" and s[1] == "era")
    return [("create", "era", table)] + scenario.steps[cut:]


def _guest_main(plan_path: str, out_path: str) -> None:
    """In the guest: each job's disks are image files in a scratch directory attached with
    losetup; a job's metadata disks start from $SHARE/images/KEY/NAME.img, or from the images
    another job left in $SHARE/out/SOURCE when the job says "images_from"; origin disks start
    empty. Every job's metadata images are left in $SHARE/out/KEY."""
    import shutil
    import tempfile

    from blockera.dm.kernel import KernelEngine

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
            if name in scenario.metadata_disks and given.exists():
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
            if name in scenario.metadata_disks:
                shutil.copyfile(scratch / f"{job['key']}-{name}.img", out_dir / f"{name}.img")
            (scratch / f"{job['key']}-{name}.img").unlink()
    Path(out_path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    _guest_main(sys.argv[1], sys.argv[2])
