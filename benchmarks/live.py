"""A tracked device's backup and replication against reading the whole device, in one run.

A 2 GiB ext4 image is filled with files (about 1.4 GiB: random and text-like), tracked on the
userspace engine (`blockera track`, era blocks of 64 KiB), backed up once in full and mirrored
once. Then, each round, 1 % of the device (20 MiB) is rewritten in place inside existing files,
as a database or a VM image inside the filesystem would (the files' blocks are found with
debugfs and written through the tracked device), and timed:

1. `blockera backup /dev/mapper/NAME` (incremental, from a snapshot of the device) against a
   full read of the device (`blockera dd` of the engine device to /dev/null) and against a
   full backup (`--chunk-size` changed forces one): wall time and bytes read.
2. `blockera replicate` (one round into the mirror image) against `rsync --inplace
   --no-whole-file` of the source image to the mirror and a blocksync-style full compare
   (read both 1 MiB at a time, write the blocks that differ): wall time and bytes read.

Both sides get the same changes; the rounds alternate. The page cache is warm (the machine
has the memory): the full reads are a lower bound of their cost on a real disk.

    python3 benchmarks/live.py [--scratch DIR] [--rounds N] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import compile_sources, report  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
BLOCK_BYTES = 64 << 10
PASSWORD = "benchmark password"


def run(*cmd: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}: {r.stderr}")
    return r


def timed(*cmd: str, env: dict[str, str] | None = None) -> tuple[float, str]:
    started = time.perf_counter()
    out = run(*cmd, env=env).stdout
    return time.perf_counter() - started, out


def make_filesystem(image: Path, size: int, mount_dir: Path, seed: int) -> list[str]:
    """An ext4 image holding files of 4 to 64 MiB to about 70 % of its size."""
    with open(image, "wb") as f:
        f.truncate(size)
    run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(image))
    mount_dir.mkdir(exist_ok=True)
    run("mount", "-o", "loop", str(image), str(mount_dir))
    rnd = random.Random(seed)
    names, used = [], 0
    try:
        while used < size * 7 // 10:
            n = rnd.choice((4, 8, 16, 32, 64)) * MiB
            name = f"f{len(names):04d}"
            with open(mount_dir / name, "wb") as f:
                for _ in range(n // MiB):
                    f.write(rnd.randbytes(MiB // 4) + bytes(rnd.choice(b"abc \n")
                                                           for _ in range(64)) * (3 * MiB // 256))
            names.append(name)
            used += n
    finally:
        run("umount", str(mount_dir))
    return names


def file_blocks(image: Path, names: list[str]) -> list[int]:
    """Every 4 KiB filesystem block of the files, from debugfs (the image is not mounted)."""
    script = "".join(f"blocks /{n}\n" for n in names)
    out = subprocess.run(["debugfs", "-f", "-", str(image)], input=script, capture_output=True,
                         text=True, check=True).stdout
    return [int(w) for line in out.splitlines() if not line.startswith("debugfs")
            for w in line.split() if w.isdigit()]


def rewrite(env: dict[str, str], blocks: list[int], nbytes: int, rnd: random.Random) -> None:
    """Rewrite `nbytes` of file data in place, in runs of 64 KiB of consecutive file blocks."""
    from blockera.engine.client import EngineClient

    client = EngineClient(env["BLOCKERA_SOCKET"])
    try:
        written = 0
        while written < nbytes:
            at = rnd.randrange(0, len(blocks) - 16)
            if blocks[at + 15] != blocks[at] + 15:       # not 16 consecutive blocks of a file
                continue
            client.write("disk", blocks[at] * 4096, rnd.randbytes(BLOCK_BYTES))
            written += BLOCK_BYTES
    finally:
        client.close()


def blocksync(source: Path, mirror: Path) -> int:
    """Read both 1 MiB at a time, write what differs; bytes read."""
    read = 0
    with open(source, "rb") as src, open(mirror, "r+b") as dst:
        while True:
            a = src.read(MiB)
            if not a:
                break
            at = dst.tell()
            b = dst.read(len(a))
            read += len(a) + len(b)
            if a != b:
                dst.seek(at)
                dst.write(a)
        dst.flush()
        os.fsync(dst.fileno())
    return read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scratch", type=Path, default=Path("/var/tmp/blockera-live-bench"))
    parser.add_argument("--size-gib", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    compile_sources()
    for tool in ("rsync", "debugfs", "mkfs.ext4"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: apt-get install rsync e2fsprogs")
    scratch = args.scratch
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    size = args.size_gib * GiB
    disk, meta, mirror, repo = (scratch / "disk.img", scratch / "era.img",
                                scratch / "mirror.img", scratch / "repo")
    env = {**os.environ, "BLOCKERA_SOCKET": str(scratch / "engine.sock"),
           "BLOCKERA_STATE_DIR": str(scratch / "state"), "BLOCKERA_REPOSITORY": str(repo),
           "BLOCKERA_PASSWORD": PASSWORD, "BLOCKERA_LOCK_DIR": str(scratch / "locks"),
           "TMPDIR": str(scratch)}
    blockera = [sys.executable, "-m", "blockera"]
    print(f"making a {args.size_gib} GiB ext4 image with files...", file=sys.stderr)
    names = make_filesystem(disk, size, scratch / "mnt", seed=1)
    blocks = file_blocks(disk, names)
    with open(meta, "wb") as f:
        f.truncate(16 * MiB)
    daemon = subprocess.Popen([*blockera, "daemon", "--socket", env["BLOCKERA_SOCKET"]],
                              env=env, stderr=subprocess.DEVNULL)
    try:
        while not Path(env["BLOCKERA_SOCKET"]).exists():
            time.sleep(0.05)
        run(*blockera, "track", str(disk), "--metadata", str(meta), "--block-size", "128",
            env=env)
        run(*blockera, "init", env=env)
        full_s, out = timed(*blockera, "backup", "/dev/mapper/disk", "--json", env=env)
        print(f"first (full) backup: {full_s:.1f} s", file=sys.stderr)
        run(*blockera, "replicate", "/dev/mapper/disk", str(mirror), env=env)
        shutil.copyfile(mirror, scratch / "rsync-mirror.img")
        shutil.copyfile(mirror, scratch / "blocksync-mirror.img")
        rnd = random.Random(2)
        rows: dict[str, list[float]] = {k: [] for k in (
            "incremental_s", "incremental_read_mib", "full_read_s", "full_backup_s",
            "replicate_s", "replicate_copied_mib", "rsync_s", "blocksync_s")}
        chunk = "1M"
        for round_ in range(args.rounds):
            rewrite(env, blocks, size // 100, rnd)
            t, out = timed(*blockera, "backup", "/dev/mapper/disk", "--json", env=env)
            doc = json.loads(out)
            assert not doc["tracked"]["full"], doc["tracked"]
            rows["incremental_s"].append(t)
            rows["incremental_read_mib"].append(doc["bytes_read"] / MiB)
            t, _ = timed(*blockera, "dd", "if=/dev/mapper/disk", "of=/dev/null", "bs=4M",
                         "status=none", env=env)
            rows["full_read_s"].append(t)
            chunk = "512K" if chunk == "1M" else "1M"           # forces a full read
            t, out = timed(*blockera, "backup", "/dev/mapper/disk", "--json", "--chunk-size",
                           chunk, env=env)
            assert json.loads(out)["tracked"]["full"]
            rows["full_backup_s"].append(t)
            t, out = timed(*blockera, "replicate", "/dev/mapper/disk", str(mirror), "--json",
                           env=env)
            rows["replicate_s"].append(t)
            rows["replicate_copied_mib"].append(json.loads(out)["bytes_copied"] / MiB)
            t, _ = timed("rsync", "--inplace", "--no-whole-file", str(disk),
                         str(scratch / "rsync-mirror.img"))
            rows["rsync_s"].append(t)
            started = time.perf_counter()
            blocksync(disk, scratch / "blocksync-mirror.img")
            rows["blocksync_s"].append(time.perf_counter() - started)
            print(f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:.2f}"
                                                    for k, v in rows.items()), file=sys.stderr)
        run("cmp", str(disk), str(mirror))
        run(*blockera, "untrack", "/dev/mapper/disk", env=env)
    finally:
        daemon.terminate()
        daemon.wait()
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in rows.items()}
    size_mib = size / MiB
    table = [
        {"job": "backup (incremental, 1 % rewritten)", "blockera_s": round(med["incremental_s"], 2),
         "peer": "full read of the device", "peer_s": round(med["full_read_s"], 2),
         "speedup": round(med["full_read_s"] / med["incremental_s"], 2),
         "read_mib": round(med["incremental_read_mib"]), "peer_read_mib": round(size_mib)},
        {"job": "backup (incremental, 1 % rewritten)", "blockera_s": round(med["incremental_s"], 2),
         "peer": "full backup of the device", "peer_s": round(med["full_backup_s"], 2),
         "speedup": round(med["full_backup_s"] / med["incremental_s"], 2),
         "read_mib": round(med["incremental_read_mib"]), "peer_read_mib": round(size_mib)},
        {"job": "replicate (one round)", "blockera_s": round(med["replicate_s"], 2),
         "peer": "rsync --inplace --no-whole-file", "peer_s": round(med["rsync_s"], 2),
         "speedup": round(med["rsync_s"] / med["replicate_s"], 2),
         "read_mib": round(med["replicate_copied_mib"]), "peer_read_mib": round(2 * size_mib)},
        {"job": "replicate (one round)", "blockera_s": round(med["replicate_s"], 2),
         "peer": "blocksync-style full compare", "peer_s": round(med["blocksync_s"], 2),
         "speedup": round(med["blocksync_s"] / med["replicate_s"], 2),
         "read_mib": round(med["replicate_copied_mib"]), "peer_read_mib": round(2 * size_mib)},
    ]
    report(f"live: tracked {args.size_gib} GiB ext4 device, 1 % rewritten per round "
           f"(medians of {args.rounds})", table, {"runs": rows})


if __name__ == "__main__":
    main()
