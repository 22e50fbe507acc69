"""The era target's I/O cost against plain file I/O on the same files, in one run.

* 1 MiB sequential writes (64 KiB era blocks): first pass (every block fresh: one metadata
  commit per write, 16 blocks batched) and second pass (all marked: no metadata I/O).
* 4 KiB random writes to blocks already marked in this era.
* 4 KiB random writes to fresh blocks (4 KiB era blocks): every write needs a metadata commit
  (two flushes), with 1 writer and with 16 concurrent writers (whose first writes share
  commits). Two baselines: plain writes, and plain writes each followed by fdatasync (the least
  a durable write costs).
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

from blockera.engine.userspace import Engine  # noqa: E402


def _files(work: Path, origin_bytes: int) -> tuple[Path, Path]:
    meta, origin = work / "meta.img", work / "origin.img"
    for path, size in ((meta, 64 << 20), (origin, origin_bytes)):
        with open(path, "wb") as f:
            f.truncate(size)
    return meta, origin


def _run_threads(n: int, fn) -> float:
    threads = [threading.Thread(target=fn, args=(t,)) for t in range(n)]
    start = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return time.perf_counter() - start


def bench(work: Path, origin_mib: int, ops: int) -> list[dict]:
    rows = []
    origin_bytes = origin_mib << 20
    rng = random.Random(1)
    mib = os.urandom(1 << 20)
    page = os.urandom(4096)
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

        plain_pass()                       # allocate the file's blocks once
        plain_runs = []
        for label in ("1 MiB sequential write, fresh blocks", "1 MiB sequential write, marked"):
            plain_runs.append(plain_pass())
            t0 = time.perf_counter()
            for i in range(origin_mib):
                dev.write(i << 20, mib)
            era = time.perf_counter() - t0
            plain_runs.append(plain_pass())
            rows.append(_row(label, origin_mib / sorted(plain_runs)[len(plain_runs) // 2],
                             origin_mib / era, "MiB/s"))
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
    for writers in (1, 16):
        meta, origin = _files(work, origin_bytes)
        engine = Engine()
        engine.create("era", f"0 {origin_bytes // 512} era {meta} {origin} 8")
        dev = engine.device("era")
        blocks = rng.sample(range(origin_bytes // 4096), ops)
        per = ops // writers
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

            plain = _run_threads(writers, plain_writer)
            durable = _run_threads(writers, durable_writer)
            era = _run_threads(writers, era_writer)
        finally:
            os.close(fd)
            engine.shutdown()
        n = per * writers
        row = _row(f"4 KiB random write, fresh blocks, {writers} writer(s)", n / plain, n / era,
                   "IOPS")
        row["durable_baseline"] = round(n / durable, 1)
        row["ratio_vs_durable"] = round(durable / era, 3)
        rows.append(row)
    return rows


def _row(name: str, plain: float, era: float, unit: str) -> dict:
    return {"operation": name, "unit": unit, "plain_file": round(plain, 1),
            "era_device": round(era, 1), "ratio": round(era / plain, 3),
            "durable_baseline": "-", "ratio_vs_durable": "-"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--origin-mib", type=int, default=256)
    parser.add_argument("--ops", type=int, default=2000)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="era-target-bench-", dir=args.workdir) as work:
        rows = bench(Path(work), args.origin_mib, args.ops)
    report("era target: engine device vs plain file I/O on the same files", rows)


if __name__ == "__main__":
    main()
