"""The era target's I/O cost against plain file I/O and against the floor durability sets, on
the same files, in one run.

* 1 MiB sequential writes (64 KiB era blocks): first pass (every block fresh: each write waits
  for one metadata commit marking its 16 blocks) and second pass (all marked: no metadata I/O).
* 4 KiB random writes to blocks already marked in this era.
* 4 KiB random writes to fresh blocks (4 KiB era blocks) at queue depth 1, 4, 16 and 64
  (that many writer threads): every write needs its block marked by a metadata commit before
  it may reach the origin, and concurrent writes share commits.

Baselines, measured in the same run on the same files:

* plain: the same writes with os.pwrite;
* durable: each write followed by fdatasync;
* floor: what a first write must cost at the least (docs/era.md §3): one metadata commit, two
  flushes, per group of writes that arrive together. For queue depth n, one thread writes n
  blocks, then a 4 KiB metadata block + fdatasync and a 4 KiB superblock + fdatasync on a
  metadata file, per group; at n = 1 that is a plain write plus two fdatasyncs.
* replay (fresh-block rows): the era device's own I/O without its Python -- every write and
  flush the engine made to the metadata file during the pass, recorded, then replayed by
  os.pwrite / os.fdatasync on the same file, with the same origin writes. era_device /
  replay is what the Python costs; replay / floor is what the format's I/O costs beyond the
  floor's (a commit writes its new shadows, at the allocator's positions, not one block).

The metadata file is written out in full first (as an LV or a restored metadata file is), so
no flush pays for allocating file blocks; the origin file is sparse for every pass.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report  # noqa: E402

from blockera.blockdev import FileDevice  # noqa: E402
from blockera.engine.userspace import Engine  # noqa: E402

META_BYTES = 64 << 20
QUEUE_DEPTHS = (1, 4, 16, 64)


def _files(work: Path, origin_bytes: int) -> tuple[Path, Path]:
    meta, origin = work / "meta.img", work / "origin.img"
    with open(meta, "wb") as f:
        chunk = bytes(4 << 20)
        for _ in range(META_BYTES // len(chunk)):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    with open(origin, "wb") as f:
        f.truncate(origin_bytes)
    return meta, origin


class _RecordingFile(FileDevice):
    """A file device that records its writes (offset, length) and flushes (None)."""

    def __init__(self, path: str, writable: bool, ops: list) -> None:
        super().__init__(path, writable=writable, direct=False)
        self.ops = ops

    def write(self, offset_bytes: int, data) -> None:
        super().write(offset_bytes, data)
        self.ops.append((offset_bytes, len(data)))

    def flush(self) -> None:
        super().flush()
        self.ops.append(None)


def _recording_engine(meta: Path, ops: list) -> Engine:
    def opener(path: str, writable: bool) -> FileDevice:
        if Path(path) == meta:
            return _RecordingFile(path, writable, ops)
        return FileDevice(path, writable=writable, direct=False)
    return Engine(file_opener=opener)


def replay_pass(meta: Path, ops: list, origin_fd: int, offsets: list[int], data: bytes,
                group: int) -> float:
    """Seconds for the recorded metadata writes and flushes, replayed by plain file I/O, with
    the origin writes: each group's after the flush that ended one of its commits."""
    fd = os.open(meta, os.O_WRONLY)
    buf = os.urandom(1 << 20)
    todo = list(offsets)
    try:
        t0 = time.perf_counter()
        flushes = 0
        for op in ops:
            if op is None:
                os.fdatasync(fd)
                flushes += 1
                if flushes % 2 == 0:        # a commit's second flush: its writes may go
                    for off in todo[:group]:
                        os.pwrite(origin_fd, data, off)
                    del todo[:group]
            else:
                offset, length = op
                os.pwrite(fd, buf[:length], offset)
        for off in todo:
            os.pwrite(origin_fd, data, off)
        return time.perf_counter() - t0
    finally:
        os.close(fd)


def _run_threads(n: int, fn) -> float:
    threads = [threading.Thread(target=fn, args=(t,)) for t in range(n)]
    start = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return time.perf_counter() - start


def floor_pass(origin_fd: int, meta_fd: int, offsets: list[int], data: bytes,
               group: int) -> float:
    """Seconds for `offsets` written the way the floor allows: per `group` writes, one commit
    (metadata block + flush, superblock + flush) before the group's data writes."""
    block = os.urandom(4096)
    t0 = time.perf_counter()
    for i in range(0, len(offsets), group):
        os.pwrite(meta_fd, block, 4096 * (1 + (i // group) % 64))
        os.fdatasync(meta_fd)
        os.pwrite(meta_fd, block, 0)
        os.fdatasync(meta_fd)
        for off in offsets[i: i + group]:
            os.pwrite(origin_fd, data, off)
    return time.perf_counter() - t0


def bench(work: Path, origin_mib: int, ops: int) -> list[dict]:
    rows = []
    origin_bytes = origin_mib << 20
    rng = random.Random(1)
    mib = os.urandom(1 << 20)
    page = os.urandom(4096)
    floor_meta = work / "floor-meta.img"
    with open(floor_meta, "wb") as f:
        f.write(bytes(65 * 4096))
    meta_fd = os.open(floor_meta, os.O_WRONLY)
    # -- sequential 1 MiB, 64 KiB era blocks -----------------------------------------------------
    meta, origin = _files(work, origin_bytes)
    engine = Engine()
    engine.create("era", f"0 {origin_bytes // 512} era {meta} {origin} 128")
    dev = engine.device("era")
    fd = os.open(origin, os.O_WRONLY)
    try:
        def plain_pass() -> float:
            t0 = time.perf_counter()
            for i in range(origin_mib):
                os.pwrite(fd, mib, i << 20)
            return time.perf_counter() - t0

        seq = [i << 20 for i in range(origin_mib)]
        plain_pass()                       # allocate the file's blocks once
        plain_runs, floor_runs = [], []
        for label in ("1 MiB sequential write, fresh blocks, QD 1",
                      "1 MiB sequential write, marked"):
            plain_runs.append(plain_pass())
            if "fresh" in label:
                floor_runs.append(floor_pass(fd, meta_fd, seq, mib, 1))
            t0 = time.perf_counter()
            for i in range(origin_mib):
                dev.write(i << 20, mib)
            era = time.perf_counter() - t0
            plain_runs.append(plain_pass())
            if "fresh" in label:
                floor_runs.append(floor_pass(fd, meta_fd, seq, mib, 1))
            row = _row(label, origin_mib / _median(plain_runs), origin_mib / era, "MiB/s")
            if "fresh" in label:
                _add_floor(row, origin_mib / _median(floor_runs))
            rows.append(row)
        # -- 4 KiB random writes to marked blocks -------------------------------------------------
        offsets = [rng.randrange(origin_bytes // 4096) * 4096 for _ in range(ops)]
        t0 = time.perf_counter()
        for off in offsets:
            os.pwrite(fd, page, off)
        plain = time.perf_counter() - t0
        t0 = time.perf_counter()
        for off in offsets:
            dev.write(off, page)
        era = time.perf_counter() - t0
        rows.append(_row("4 KiB random write, marked blocks", ops / plain, ops / era, "IOPS"))
    finally:
        os.close(fd)
        engine.shutdown()
    # -- 4 KiB random writes to fresh blocks, 4 KiB era blocks -------------------------------------
    for writers in QUEUE_DEPTHS:
        meta, origin = _files(work, origin_bytes)
        recorded: list = []
        engine = _recording_engine(meta, recorded)
        engine.create("era", f"0 {origin_bytes // 512} era {meta} {origin} 8")
        dev = engine.device("era")
        n_ops = ops if writers == 1 else ops * 2
        blocks = rng.sample(range(origin_bytes // 4096), n_ops)
        per = n_ops // writers
        fd = os.open(origin, os.O_WRONLY)
        try:
            def plain_writer(t: int) -> None:
                for b in blocks[t * per: (t + 1) * per]:
                    os.pwrite(fd, page, b * 4096)

            def durable_writer(t: int) -> None:
                for b in blocks[t * per: (t + 1) * per]:
                    os.pwrite(fd, page, b * 4096)
                    os.fdatasync(fd)

            def era_writer(t: int) -> None:
                for b in blocks[t * per: (t + 1) * per]:
                    dev.write(b * 4096, page)

            offsets = [b * 4096 for b in blocks[: per * writers]]
            plain = _run_threads(writers, plain_writer)
            durable = _run_threads(writers, durable_writer)
            floor = [floor_pass(fd, meta_fd, offsets, page, writers)]
            del recorded[:]
            era = _run_threads(writers, era_writer)
            ops_of_pass = list(recorded)
            floor.append(floor_pass(fd, meta_fd, offsets, page, writers))
        finally:
            os.close(fd)
            engine.shutdown()
        fd = os.open(origin, os.O_WRONLY)
        try:
            commits = max(1, sum(op is None for op in ops_of_pass) // 2)
            replay = replay_pass(meta, ops_of_pass, fd, offsets, page, -(-len(offsets) // commits))
        finally:
            os.close(fd)
        n = per * writers
        row = _row(f"4 KiB random write, fresh blocks, QD {writers}", n / plain, n / era,
                   "IOPS")
        row["durable"] = round(n / durable, 1)
        row["ratio_vs_durable"] = round(durable / era, 3)
        _add_floor(row, n / _median(floor))
        row["replay"] = round(n / replay, 1)
        row["ratio_vs_replay"] = round(replay / era, 3)
        row["us_per_write"] = round(era / n * 1e6)
        rows.append(row)
    os.close(meta_fd)
    return rows


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def _add_floor(row: dict, floor_rate: float) -> None:
    row["floor"] = round(floor_rate, 1)
    row["ratio_vs_floor"] = round(row["era_device"] / floor_rate, 3)


def _row(name: str, plain: float, era: float, unit: str) -> dict:
    return {"operation": name, "unit": unit, "plain_file": round(plain, 1),
            "era_device": round(era, 1), "ratio": round(era / plain, 3),
            "durable": "-", "ratio_vs_durable": "-", "floor": "-", "ratio_vs_floor": "-",
            "replay": "-", "ratio_vs_replay": "-", "us_per_write": "-"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--origin-mib", type=int, default=256)
    parser.add_argument("--ops", type=int, default=2000)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="era-target-bench-", dir=args.workdir) as work:
        rows = bench(Path(work), args.origin_mib, args.ops)
    report("era target: engine device vs plain file I/O and the commit floor, same files",
           rows)


if __name__ == "__main__":
    main()
