"""Origin write throughput under snapshots against the bare origin, in one run.

The same writes go, alternately, to a plain `linear` device over the origin file (the bare
origin) and to a `snapshot-origin` device over the same file with one snapshot (chunk size 8,
a 4 KiB chunk) and with two (chunk sizes 8 and 32) on COW files:

* 1 MiB sequential writes over a region no snapshot has copied yet: every chunk costs a read
  of the old data, a COW write and its share of one commit (two flushes) per write;
* the same region again: everything is copied, the writes go straight through;
* 4 KiB random writes to fresh chunks (one copy-out and one commit each);
* 4 KiB random first writes from 1, 4, 16 and 64 writer threads (queue depth), one snapshot:
  concurrent copy-outs share a batch (one data flush, one exception commit).

The COWs are fresh for every pass, and written out in full first (as an LV is), as are the
floor's, so that no flush pays for allocating file blocks. Ratios are snapshot-origin / bare throughput; the goal for
first writes is >= 0.3. A first write must make the copy durable (flush) and its record durable
(flush) before the origin write may go ahead, so a second baseline is given: the bare origin
with a flush after every write ("durable").

The floor, measured in the same run by plain file I/O on the same files: per first write, read
the old data, write it to the COW file, flush, write a 4 KiB exception record, flush, write the
origin; with two snapshots the copy goes to both COW files and both are flushed. At queue depth
n, a group of n writes shares the two flushes and the record write (the least a batch costs).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report  # noqa: E402

from blockera.engine.userspace import Engine  # noqa: E402

MiB = 1 << 20
ZEROS = bytes(MiB)
QUEUE_DEPTHS = (1, 4, 16, 64)


def _file(path: Path, size: int, data: bytes | None = None) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        if data is not None:
            for off in range(0, size, len(data)):
                f.write(data)
            f.flush()
            os.fsync(f.fileno())    # on disk, as an LV written out is: no flush pays for it
    return path


def _stack(engine: Engine, work: Path, origin: Path, sectors: int, snapshots: list[int],
           cow_bytes: int) -> None:
    engine.create("real", f"0 {sectors} linear {origin} 0")
    engine.create("base", f"0 {sectors} snapshot-origin /dev/mapper/real")
    engine.suspend("base")
    for i, cs in enumerate(snapshots):
        cow = _file(work / f"cow{i}.img", cow_bytes, ZEROS)
        engine.create(f"snap{i}", f"0 {sectors} snapshot /dev/mapper/real {cow} P {cs}")
    engine.resume("base")


def floor_pass(origin: Path, cows: list[Path], offsets: list[int], data: bytes,
               group: int) -> float:
    """Seconds for first writes at `offsets` done by plain file I/O the way the floor allows
    (see the module docstring): per `group` writes, read + COW write each, flush, record,
    flush, then the origin writes."""
    o = os.open(origin, os.O_RDWR)
    cfds = [os.open(c, os.O_RDWR) for c in cows]
    record = os.urandom(4096)
    cow_at = 2 * len(data)
    try:
        t0 = time.perf_counter()
        for i in range(0, len(offsets), group):
            batch = offsets[i: i + group]
            for off in batch:
                old = os.pread(o, len(data), off)
                for c in cfds:
                    os.pwrite(c, old, cow_at)
                cow_at += len(data)
            for c in cfds:
                os.fdatasync(c)
            for c in cfds:
                os.pwrite(c, record, 4096)
                os.fdatasync(c)
            for off in batch:
                os.pwrite(o, data, off)
        return time.perf_counter() - t0
    finally:
        os.close(o)
        for c in cfds:
            os.close(c)


def _threads(n: int, fn) -> float:
    threads = [threading.Thread(target=fn, args=(t,)) for t in range(n)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return time.perf_counter() - t0


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench(work: Path, region_mib: int, ops: int, rounds: int) -> list[dict]:
    origin_bytes = 2 * region_mib * MiB
    sectors = origin_bytes // 512
    origin = _file(work / "origin.img", origin_bytes, os.urandom(MiB))
    mib = os.urandom(MiB)
    page = os.urandom(4096)
    rng = random.Random(1)
    rows = []
    for snapshots in ([8], [8, 32]):
        label = f"{len(snapshots)} snapshot{'s' if len(snapshots) > 1 else ''}"
        results: dict[str, list[tuple[float, float]]] = {"first": [], "again": [], "random": []}
        durable: dict[str, list[float]] = {"first": [], "again": [], "random": []}
        floors: dict[str, list[float]] = {"first": [], "random": []}
        cows = [_file(work / f"floor-cow{i}.img", origin_bytes + 4 * MiB, ZEROS)
                for i in range(len(snapshots))]
        for _ in range(rounds):
            offsets = [rng.randrange(origin_bytes // 4096) * 4096 for _ in range(ops)]
            floors["first"].append(floor_pass(origin, cows, [i * MiB for i in range(region_mib)],
                                              mib, 1))
            floors["random"].append(floor_pass(origin, cows, offsets, page, 1))
            for mode in ("bare", "snap"):
                engine = Engine()
                try:
                    if mode == "bare":
                        engine.create("base", f"0 {sectors} linear {origin} 0")
                    else:
                        _stack(engine, work, origin, sectors, snapshots, origin_bytes)
                    dev = engine.device("base")

                    def sequential() -> None:
                        for i in range(region_mib):
                            dev.write(i * MiB, mib)
                        dev.flush()

                    def random_writes() -> None:
                        for off in offsets:
                            dev.write(off, page)
                        dev.flush()

                    first = _timed(sequential)
                    again = _timed(sequential)
                    if mode == "bare":
                        def sequential_durable() -> None:
                            for i in range(region_mib):
                                dev.write(i * MiB, mib)
                                dev.flush()

                        durable["first"].append(_timed(sequential_durable))
                        durable["again"].append(durable["first"][-1])
                    engine.shutdown()
                    engine = Engine()
                    if mode == "bare":
                        engine.create("base", f"0 {sectors} linear {origin} 0")
                    else:
                        _stack(engine, work, origin, sectors, snapshots, origin_bytes)
                    dev = engine.device("base")
                    rand = _timed(random_writes)
                    if mode == "bare":
                        def random_durable() -> None:
                            for off in offsets:
                                dev.write(off, page)
                                dev.flush()

                        durable["random"].append(_timed(random_durable))
                finally:
                    engine.shutdown()
                for key, seconds in (("first", first), ("again", again), ("random", rand)):
                    results[key].append((mode == "snap", seconds))
        for key, name, amount, unit in (
                ("first", "1 MiB sequential write, chunks not yet copied", region_mib, "MiB/s"),
                ("again", "1 MiB sequential write, chunks already copied", region_mib, "MiB/s"),
                ("random", "4 KiB random write, fresh chunks", ops, "IOPS")):
            bare = statistics.median(s for snap, s in results[key] if not snap)
            snap = statistics.median(s for snap, s in results[key] if snap)
            flushed = statistics.median(durable[key])
            row = {"operation": f"{name}, {label}", "unit": unit,
                   "bare_origin": round(amount / bare, 1),
                   "snapshot_origin": round(amount / snap, 1),
                   "ratio": round(bare / snap, 3),
                   "bare_durable": round(amount / flushed, 1),
                   "ratio_vs_durable": round(flushed / snap, 3),
                   "floor": "-", "ratio_vs_floor": "-", "us_per_write": "-"}
            if key in floors:
                floor = statistics.median(floors[key])
                row["floor"] = round(amount / floor, 1)
                row["ratio_vs_floor"] = round(floor / snap, 3)
            rows.append(row)
    rows.extend(_queue_depths(work, origin, origin_bytes, ops, page, rng))
    return rows


def _queue_depths(work: Path, origin: Path, origin_bytes: int, ops: int, page: bytes,
                  rng: random.Random) -> list[dict]:
    """4 KiB random first writes from QUEUE_DEPTHS writer threads, one snapshot (chunk 8),
    against the floor at that queue depth."""
    rows = []
    sectors = origin_bytes // 512
    floor_cow = _file(work / "floor-cow-qd.img", origin_bytes + 4 * MiB, ZEROS)
    for depth in QUEUE_DEPTHS:
        n = ops * (1 if depth == 1 else 2)
        chunks = rng.sample(range(origin_bytes // 4096), n)
        per = n // depth
        offsets = [c * 4096 for c in chunks[: per * depth]]
        floors = [floor_pass(origin, [floor_cow], offsets, page, depth)]
        engine = Engine()
        try:
            _stack(engine, work, origin, sectors, [8], origin_bytes)
            dev = engine.device("base")

            def writer(t: int) -> None:
                for off in offsets[t * per: (t + 1) * per]:
                    dev.write(off, page)

            snap = _threads(depth, writer)
        finally:
            engine.shutdown()
        floors.append(floor_pass(origin, [floor_cow], offsets, page, depth))
        floor = statistics.median(floors)
        rows.append({"operation": f"4 KiB random first write, 1 snapshot, QD {depth}",
                     "unit": "IOPS", "bare_origin": "-",
                     "snapshot_origin": round(len(offsets) / snap, 1), "ratio": "-",
                     "bare_durable": "-", "ratio_vs_durable": "-",
                     "floor": round(len(offsets) / floor, 1),
                     "ratio_vs_floor": round(floor / snap, 3),
                     "us_per_write": round(snap / len(offsets) * 1e6)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--region-mib", type=int, default=64)
    parser.add_argument("--ops", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="snapshot-bench-", dir=args.workdir) as work:
        rows = bench(Path(work), args.region_mib, args.ops, args.rounds)
    report("snapshot origin writes: snapshot-origin vs the bare origin, same file", rows)


if __name__ == "__main__":
    main()
