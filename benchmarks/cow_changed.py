"""`cow changed` on a large dm-snapshot COW: the numpy path against a plain-Python record parse.

The COW: a persistent store (default chunk size 8 sectors) holding 2**20 exceptions whose origin
chunks come in random runs (mean length 4) over a 64 GiB origin; written as a sparse file (only
the header and the ~4,100 metadata areas hold data). Both paths read the same file, produce the
same JSON document (`{"chunk_size", "valid", "exceptions", "ranges", "sector_ranges"}`) and are
checked to agree:

* numpy: what `blockera cow changed --json` runs (blockera.snapshot: bulk area reads, the
  kernel's stopping rules, vectorised anomaly checks, range merging and rendering);
* plain Python: seek/read per area, `struct.iter_unpack` per record, a set, a sort, a range
  loop and `json.dumps`, with no anomaly checks.

They alternate `--rounds` times in one process (median wall time, warm page cache). The whole
command is also timed once as a subprocess. Nothing here runs in the test suite.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from blockera.blockdev import FileDevice
from blockera.snapshot import Geometry, changed_chunks, write_store
from blockera.snapshot.changed import load_checked, write_json

SHIM = ("import sys; from blockera.cli.main import cli, main; from blockera.cli.cow import cow; "
        "cli.add_command(cow); main(sys.argv[1:])")


def build_cow(path: Path, exceptions: int, chunk_sectors: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    origin_chunks = 16 << 20
    lengths = rng.geometric(0.25, size=exceptions)            # mean 4
    starts = rng.integers(0, origin_chunks - 64, size=len(lengths))
    old = np.unique(np.concatenate([np.arange(s, s + n) for s, n in
                                    zip(starts[: exceptions // 2].tolist(),
                                        lengths[: exceptions // 2].tolist())]))
    old = rng.permutation(old[:exceptions]).astype(np.uint64)
    if len(old) < exceptions:
        raise SystemExit("not enough distinct chunks generated; use another --seed")
    g = Geometry(chunk_sectors)
    size = (g.allocation_chunk(exceptions) + g.stride_chunks + 1) * g.chunk_bytes
    with open(path, "wb") as f:
        f.truncate(size)
    with FileDevice(path) as dev:
        write_store(dev, chunk_sectors, old)


def numpy_path(path: Path) -> bytes:
    with FileDevice(path, writable=False, direct=True) as dev:
        image, _ = load_checked(dev)
    out = io.BytesIO()
    write_json(changed_chunks(image), out)
    return out.getvalue()


def plain_python_path(path: Path) -> bytes:
    with open(path, "rb") as f:
        magic, valid, version, chunk_sectors = struct.unpack("<IIII", f.read(16))
        if magic != 0x70416E53 or version != 1:
            raise ValueError("not a snapshot COW")
        chunk_bytes = chunk_sectors * 512
        per_area = chunk_bytes // 16
        olds = []
        area = 0
        while True:
            f.seek((1 + area * (per_area + 1)) * chunk_bytes)
            raw = f.read(chunk_bytes)
            if len(raw) < chunk_bytes:
                raise ValueError(f"area {area} beyond the end")
            full = True
            for old, new in struct.iter_unpack("<QQ", raw):
                if new == 0:
                    full = False
                    break
                olds.append(old)
            if not full:
                break
            area += 1
    ranges: list[list[int]] = []
    for chunk in sorted(set(olds)):
        if ranges and ranges[-1][1] == chunk:
            ranges[-1][1] = chunk + 1
        else:
            ranges.append([chunk, chunk + 1])
    doc = {"chunk_size": chunk_sectors, "valid": valid != 0, "exceptions": len(olds),
           "ranges": ranges,
           "sector_ranges": [[b * chunk_sectors, e * chunk_sectors] for b, e in ranges]}
    return (json.dumps(doc) + "\n").encode()


def timed(fn, path: Path) -> tuple[float, bytes]:
    start = time.perf_counter()
    out = fn(path)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exceptions", type=int, default=1 << 20)
    parser.add_argument("--chunk-sectors", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--save", action="store_true",
                        help="also write benchmarks/results/cow_changed.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cow-bench-", dir=args.workdir) as work:
        cow = Path(work) / "cow.img"
        t0 = time.perf_counter()
        build_cow(cow, args.exceptions, args.chunk_sectors, args.seed)
        print(f"built {cow.stat().st_size / 2**30:.1f} GiB sparse COW with {args.exceptions} "
              f"exceptions in {time.perf_counter() - t0:.1f} s")
        ours, peer = [], []
        for _ in range(args.rounds):
            t, plain_out = timed(plain_python_path, cow)
            peer.append(t)
            t, numpy_out = timed(numpy_path, cow)
            ours.append(t)
            if json.loads(plain_out) != json.loads(numpy_out):
                raise SystemExit("the two paths disagree")
        start = time.perf_counter()
        cli = subprocess.run([sys.executable, "-c", SHIM, "cow", "changed", "--json", str(cow)],
                             capture_output=True)
        cli_s = time.perf_counter() - start
        if cli.returncode != 0 or json.loads(cli.stdout) != json.loads(numpy_out):
            raise SystemExit(f"the command failed: {cli.stderr.decode()}")
        doc = json.loads(numpy_out)
    row = {"exceptions": args.exceptions, "ranges": len(doc["ranges"]),
           "plain_python_s": round(statistics.median(peer), 3),
           "numpy_s": round(statistics.median(ours), 3),
           "speedup": round(statistics.median(peer) / statistics.median(ours), 1),
           "command_s": round(cli_s, 3)}
    print("\ncow changed --json: plain-Python parse vs numpy path (median of "
          f"{args.rounds} alternating rounds)")
    for key, value in row.items():
        print(f"  {key:16} {value}")
    if args.save:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from common import report
        report("cow_changed: plain-Python parse vs numpy path", [row])


if __name__ == "__main__":
    main()
