"""The backup repository's write path and master index.

1. `save_blob` + `flush` throughput into a local repository (fsync per pack, page cache warm)
   for 1 MiB blobs, random (stored uncompressed) and text-like (zstd shrinks them to about a
   third), with the work done in the caller's thread only (`threads=0`), with one worker and
   with two workers; `restic backup --stdin` of the same bytes into its own repository is the
   peer (restic cuts content-defined chunks, hashes, compresses and encrypts them with all
   cores). Runs alternate `--rounds` times; medians.
2. The master index at `--index-blobs` blobs (default 1 M, as 20 index files of 50 000): its
   memory (tracemalloc, which counts numpy's buffers) against a dict of blob ID -> tuple, the
   time to load the index files from the repository, and lookups per second.

Nothing here runs in the test suite. `python3 benchmarks/backup_repository.py --help`.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import report  # noqa: E402

from blockera.backup import BlobType, FileType, KdfParams, LocalBackend, Repository  # noqa: E402
from blockera.backup.index import INDEX_MAX_BLOBS, IndexFile, MasterIndex  # noqa: E402
from blockera.backup.pack import PackEntry  # noqa: E402

MiB = 1 << 20
PASSWORD = "benchmark"
KDF = KdfParams(1024, 8, 1)


def text_like(size: int, seed: int) -> bytes:
    rnd = random.Random(seed)
    words = [bytes(rnd.choice(b"abcdefghijklmnop") for _ in range(rnd.randint(2, 9)))
             for _ in range(700)]
    out = bytearray()
    while len(out) < size:
        out += b" ".join(rnd.choice(words) for _ in range(1000)) + b"\n"
    return bytes(out[:size])


def blobs(kind: str, count: int) -> list[bytes]:
    if kind == "random":
        return [os.urandom(MiB) for _ in range(count)]
    base = text_like(4 * MiB, 1)
    # distinct blobs (no dedup) that compress like text
    return [i.to_bytes(8, "little") + base[(i * 4099) % (3 * MiB):][:MiB - 8]
            for i in range(count)]


def blockera_run(workdir: Path, data: list[bytes], threads: int) -> float:
    path = workdir / f"blockera-{threads}"
    shutil.rmtree(path, ignore_errors=True)
    repo = Repository.init(LocalBackend(path), PASSWORD, kdf_params=KDF, threads=threads)
    with repo.lock():
        start = time.perf_counter()
        for chunk in data:
            repo.save_blob(BlobType.DATA, chunk)
        repo.flush()
        elapsed = time.perf_counter() - start
    repo.close()
    shutil.rmtree(path)
    return elapsed


def restic_run(workdir: Path, data: list[bytes]) -> float | None:
    if shutil.which("restic") is None:
        return None
    path = workdir / "restic"
    shutil.rmtree(path, ignore_errors=True)
    env = {**os.environ, "RESTIC_PASSWORD": PASSWORD, "RESTIC_REPOSITORY": str(path)}
    subprocess.run(["restic", "init", "-q"], env=env, check=True, capture_output=True)
    stream = workdir / "stream.bin"
    with open(stream, "wb") as f:
        for chunk in data:
            f.write(chunk)
    with open(stream, "rb") as f:
        start = time.perf_counter()
        subprocess.run(["restic", "--no-cache", "backup", "-q", "--stdin"], stdin=f, env=env,
                       check=True, capture_output=True)
        elapsed = time.perf_counter() - start
    stream.unlink()
    shutil.rmtree(path)
    return elapsed


def throughput(workdir: Path, size_mib: int, rounds: int) -> list[dict]:
    rows = []
    for kind in ("random", "text-like"):
        data = blobs(kind, size_mib)
        runs: dict[str, list[float]] = {"threads=0": [], "threads=1": [], "threads=2": [],
                                        "restic": []}
        for _ in range(rounds):
            for threads in (0, 1, 2):
                runs[f"threads={threads}"].append(blockera_run(workdir, data, threads))
            r = restic_run(workdir, data)
            if r is not None:
                runs["restic"].append(r)
        row: dict[str, float | str] = {"blobs": f"{size_mib} x 1 MiB {kind}"}
        for name, times in runs.items():
            if times:
                row[f"{name} MB/s"] = round(size_mib * MiB / statistics.median(times) / 1e6, 1)
        rows.append(row)
    return rows


def index_files(n_blobs: int) -> list[IndexFile]:
    rnd = random.Random(7)
    files = []
    per_pack = 16
    made = 0
    while made < n_blobs:
        f = IndexFile()
        while f.blob_count < INDEX_MAX_BLOBS and made < n_blobs:
            entries = [PackEntry(BlobType.DATA, rnd.randbytes(32), k * (MiB + 32), MiB + 32, 0)
                       for k in range(min(per_pack, n_blobs - made))]
            f.packs.append((rnd.randbytes(32), entries))
            made += len(entries)
        files.append(f)
    return files


def index_memory(workdir: Path, n_blobs: int) -> list[dict]:
    files = index_files(n_blobs)
    ids = [e.blob_id for f in files for _, es in f.packs for e in es]
    packs = [p for f in files for p, es in f.packs for _ in es]

    gc.collect()
    tracemalloc.start()
    idx = MasterIndex()
    for f in files:
        idx.add_index_file(f)
    numpy_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()

    gc.collect()
    tracemalloc.start()
    plain = {blob_id: (pack, 0, MiB + 32, 0) for blob_id, pack in zip(ids, packs)}
    dict_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del plain

    sample = random.Random(3).sample(ids, 100_000)
    start = time.perf_counter()
    for blob_id in sample:
        assert idx.lookup(blob_id, BlobType.DATA) is not None
    lookups = len(sample) / (time.perf_counter() - start)

    # loading the same index from a repository
    path = workdir / "index-repo"
    shutil.rmtree(path, ignore_errors=True)
    repo = Repository.init(LocalBackend(path), PASSWORD, kdf_params=KDF)
    for f in files:
        repo.save_unpacked(FileType.INDEX, f.encode())
    start = time.perf_counter()
    repo.load_index()
    load_s = time.perf_counter() - start
    assert len(repo.index) == n_blobs
    repo.close()
    shutil.rmtree(path)
    return [{"blobs": n_blobs, "index files": len(files),
             "MasterIndex MiB": round(numpy_bytes / MiB, 1),
             "bytes/blob": round(numpy_bytes / n_blobs, 1),
             "dict of tuples MiB": round(dict_bytes / MiB, 1),
             "load index files s": round(load_s, 2),
             "lookups/s": int(lookups)}]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=256, help="data per run (default 256)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--index-blobs", type=int, default=1_000_000)
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where repositories are written (default: a temporary directory)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        workdir = Path(tmp)
        rows = throughput(workdir, args.size_mib, args.rounds)
        report("backup repository: save_blob + flush throughput", rows,
               {"cpus": os.cpu_count()})
        report("backup repository index: master index memory and load time",
               index_memory(workdir, args.index_blobs))


if __name__ == "__main__":
    main()
