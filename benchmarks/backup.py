"""Device backups against restic 0.14 on the same data, in one run.

1. Full backup of a 2 GiB image of half-compressible data (each 1 MiB: a quarter random, three
   quarters text-like; zstd -3 shrinks it to about half): `restic backup IMAGE` into a
   repository `restic init` made against `blockera backup IMAGE` into one blockera made with
   the same scrypt parameters (restic's calibration, about half a second of key derivation
   on one core when a command opens the repository; blockera runs scrypt's p lanes on every
   core; the parameters are in the results). Goal: at least 1.5x restic's throughput.
2. Incremental after rewriting 1 % of the 1 MiB chunks (20 of 2048): restic re-reads the whole
   file (its mtime changed); blockera gets the changed ranges as `--changed` JSON, as an era
   or COW list would give them. Rounds alternate, each with new changes. Goal: 10x faster.
3. The same 20 changed chunks on an 8 GiB image (blockera only): the incremental should grow
   with the changed data, not the device (goal: at most 1.3x the 2 GiB time).
4. Restore of the latest 2 GiB snapshot: `restic restore` against `blockera restore` into a new
   file. blockera flushes the target before it returns; restic leaves its writes in the page
   cache, so it is timed both alone and with the `sync` that makes its restore durable (each
   run starts with nothing left to write back; the order alternates). Goal: at least
   restic's throughput.
   With --cold the incrementals are also timed with the page cache dropped before each run,
   as when a device's blocks are not cached: restic then reads the whole image from disk.
5. Peak memory (GNU time's max RSS) of blockera's full and incremental backups at 2 and 8 GiB,
   extrapolated linearly to 64 GiB.

Times are wall-clock medians of alternating runs of the whole commands (start-up and key
derivation included), page cache warm (the image was just written). Files go to a scratch
directory on a disk (refused on tmpfs), removed afterwards unless --keep.

    python3 benchmarks/backup.py [--scratch DIR] [--rounds N] [--keep]
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
SRC = HERE.parent / "src"
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(SRC))

from common import compile_sources, measure, report  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
PASSWORD = "benchmark password"


def fs_type(path: Path) -> str:
    """The file system type of the mount holding `path`."""
    best, kind = "", "?"
    real = str(path.resolve())
    with open("/proc/mounts") as f:
        for line in f:
            _, mount, fstype = line.split()[:3]
            if (real == mount or real.startswith(mount.rstrip("/") + "/")) and \
                    len(mount) > len(best):
                best, kind = mount, fstype
    return kind


def write_image(path: Path, size: int, seed: int) -> None:
    """Half-compressible, no two chunks alike: per 1 MiB, 256 KiB random and 768 KiB of text
    cut at a random place from a 16 MiB pool."""
    rnd = random.Random(seed)
    words = [bytes(rnd.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rnd.randint(2, 9)))
             for _ in range(5000)]
    pool = bytearray()
    while len(pool) < 16 * MiB:
        pool += b" ".join(rnd.choices(words, k=10000)) + b"\n"
    text = bytes(pool)
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            at = rnd.randrange(0, len(text) - 768 * 1024)
            f.write(rnd.randbytes(256 * 1024) + text[at:at + 768 * 1024])


def rewrite_chunks(path: Path, count: int, seed: int) -> list[int]:
    """Random bytes over `count` whole 1 MiB chunks of the image; their indexes."""
    chunks = path.stat().st_size // MiB
    rnd = random.Random(seed)
    picked = sorted(rnd.sample(range(min(chunks, 2048)), count))
    with open(path, "r+b") as f:
        for c in picked:
            f.seek(c * MiB)
            f.write(rnd.randbytes(MiB))
    return picked


def drop_caches() -> None:
    """Write back and drop the page cache (root only), so the next run reads from disk."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def changed_json(path: Path, chunks: list[int]) -> None:
    path.write_text(json.dumps({"chunk_size": MiB // 512, "valid": True,
                                "ranges": [[c, c + 1] for c in chunks]}))


class Tools:
    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self.env = {**os.environ, "RESTIC_PASSWORD": PASSWORD, "BLOCKERA_PASSWORD": PASSWORD,
                    "BLOCKERA_LOCK_DIR": str(scratch / "locks"),
                    "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
        os.environ.update(self.env)

    def restic(self, repo: Path, *args: str) -> list[str]:
        return ["restic", "--no-cache", "-q", "-r", str(repo), *args]

    def blockera(self, repo: Path, *args: str) -> list[str]:
        return [sys.executable, "-m", "blockera", *args[:1], "-r", str(repo), *args[1:]]

    def init_pair(self, name: str) -> tuple[Path, Path]:
        """A repository made by `restic init` and one made by blockera with the same scrypt
        parameters (restic calibrates them to about half a second; both tools then derive
        their key with the same work when they open the repository)."""
        from blockera.backup import KdfParams, LocalBackend, Repository

        restic_repo, ours = self.scratch / f"{name}-restic", self.scratch / f"{name}-blockera"
        for p in (restic_repo, ours):
            shutil.rmtree(p, ignore_errors=True)
        subprocess.run(self.restic(restic_repo, "init"), check=True, env=self.env,
                       stdout=subprocess.DEVNULL)
        key = json.loads(next((restic_repo / "keys").iterdir()).read_text())
        params = KdfParams(key["N"], key["r"], key["p"])
        Repository.init(LocalBackend(ours), PASSWORD, kdf_params=params).close()
        return restic_repo, ours


def _kdf(repo: Path) -> str:
    key = json.loads(next((repo / "keys").iterdir()).read_text())
    return f"scrypt N={key['N']} r={key['r']} p={key['p']}"


def _ratio(a: float, b: float) -> float:
    return round(a / b, 2) if b else float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scratch", type=Path, default=Path("/var/tmp/blockera-backup-bench"))
    parser.add_argument("--rounds", type=int, default=3, help="incremental and restore rounds")
    parser.add_argument("--full-rounds", type=int, default=1, help="full backup rounds")
    parser.add_argument("--small-gib", type=int, default=2)
    parser.add_argument("--large-gib", type=int, default=8)
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument("--cold", action="store_true",
                        help="also time the incrementals with the page cache dropped before "
                             "each run (root only): the source is read from the disk")
    args = parser.parse_args()
    compile_sources()
    if shutil.which("restic") is None:
        sys.exit("restic is not installed (apt-get install restic)")
    args.scratch.mkdir(parents=True, exist_ok=True)
    kind = fs_type(args.scratch)
    if kind in ("tmpfs", "ramfs"):
        sys.exit(f"{args.scratch} is on {kind}: give --scratch on a disk")
    tools = Tools(args.scratch)
    small, large = args.scratch / "small.img", args.scratch / "large.img"
    rows: list[dict[str, float | str]] = []
    extra: dict[str, object] = {"scratch_fs": kind, "cpus": os.cpu_count(),
                                "restic": subprocess.run(["restic", "version"],
                                                         capture_output=True,
                                                         text=True).stdout.strip()}
    try:
        print(f"writing {args.small_gib} GiB and {args.large_gib} GiB images in {args.scratch}")
        write_image(small, args.small_gib * GiB, seed=1)
        write_image(large, args.large_gib * GiB, seed=2)

        # 1. full backups (a fresh pair of repositories per round)
        restic_full, our_full = [], []
        for _ in range(args.full_rounds):
            r_repo, b_repo = tools.init_pair("full")
            os.sync()
            restic_full.append(measure(tools.restic(r_repo, "backup", str(small))))
            os.sync()
            our_full.append(measure(tools.blockera(b_repo, "backup", str(small))))
        r_t = statistics.median(m.seconds for m in restic_full)
        b_t = statistics.median(m.seconds for m in our_full)
        rows.append({"operation": f"full backup, {args.small_gib} GiB",
                     "restic_s": round(r_t, 2), "blockera_s": round(b_t, 2),
                     "restic_MBps": round(args.small_gib * GiB / 1e6 / r_t, 1),
                     "blockera_MBps": round(args.small_gib * GiB / 1e6 / b_t, 1),
                     "speedup": _ratio(r_t, b_t),
                     "blockera_rss_mb": round(max(m.max_rss_mb for m in our_full), 1)})

        # the large image's full backup (blockera only), so that its incrementals can run in
        # the same rounds as the small image's
        _, big_repo = tools.init_pair("large")
        big_full = measure(tools.blockera(big_repo, "backup", str(large)))

        # 2 and 3. incrementals, alternating restic (small), blockera (small), blockera
        #    (large), new changes each round: 20 chunks of 1 MiB rewritten
        restic_inc, our_inc, big_inc = [], [], []
        for k in range(args.rounds):
            picked = rewrite_chunks(small, 20, seed=100 + k)
            changed_json(args.scratch / "changed.json", picked)
            restic_inc.append(measure(tools.restic(r_repo, "backup", str(small))))
            our_inc.append(measure(tools.blockera(b_repo, "backup", str(small), "--changed",
                                                  str(args.scratch / "changed.json"))))
            picked = rewrite_chunks(large, 20, seed=200 + k)
            changed_json(args.scratch / "changed-large.json", picked)
            big_inc.append(measure(tools.blockera(big_repo, "backup", str(large), "--changed",
                                                  str(args.scratch / "changed-large.json"))))
        ri = statistics.median(m.seconds for m in restic_inc)
        bi = statistics.median(m.seconds for m in our_inc)
        li = statistics.median(m.seconds for m in big_inc)
        if args.cold:
            cold_restic, cold_ours = [], []
            for k in range(args.rounds):
                picked = rewrite_chunks(small, 20, seed=300 + k)
                changed_json(args.scratch / "changed.json", picked)
                drop_caches()
                cold_restic.append(measure(tools.restic(r_repo, "backup", str(small))))
                drop_caches()
                cold_ours.append(measure(tools.blockera(b_repo, "backup", str(small),
                                                        "--changed",
                                                        str(args.scratch / "changed.json"))))
            cr = statistics.median(m.seconds for m in cold_restic)
            cb = statistics.median(m.seconds for m in cold_ours)
            rows.append({"operation": "incremental, cold page cache", "restic_s": round(cr, 2),
                         "blockera_s": round(cb, 2), "restic_MBps": "", "blockera_MBps": "",
                         "speedup": _ratio(cr, cb),
                         "blockera_rss_mb": round(max(m.max_rss_mb for m in cold_ours), 1)})
            extra["incremental_cold_speedup"] = _ratio(cr, cb)
        rows.append({"operation": f"incremental, 20 of {args.small_gib * 1024} chunks changed",
                     "restic_s": round(ri, 2), "blockera_s": round(bi, 2), "restic_MBps": "",
                     "blockera_MBps": "", "speedup": _ratio(ri, bi),
                     "blockera_rss_mb": round(max(m.max_rss_mb for m in our_inc), 1)})
        rows.append({"operation": f"incremental, 20 chunks of a {args.large_gib} GiB image",
                     "restic_s": "", "blockera_s": round(li, 2), "restic_MBps": "", "blockera_MBps": "",
                     "speedup": "", "blockera_rss_mb": round(max(m.max_rss_mb
                                                                 for m in big_inc), 1)})

        # 4. restore of the latest snapshot (the 2 GiB image as it is now). Each run starts
        #    with nothing left to write back (an untimed sync), so no run pays for the one
        #    before; restic returns with its writes still in the page cache, blockera flushes
        #    the target, so restic is also timed with the sync that makes its restore durable.
        #    The order alternates: on a virtual machine whose host takes back free memory,
        #    the run that needs fresh page cache pays for faulting it in
        restic_rs, restic_sync, our_rs = [], [], []
        for k in range(args.rounds):
            out_r, out_b = args.scratch / f"restored-restic-{k}", args.scratch / f"restored-{k}.img"
            for tool in ("restic", "blockera") if k % 2 == 0 else ("blockera", "restic"):
                os.sync()
                if tool == "restic":
                    restic_rs.append(measure(tools.restic(r_repo, "restore", "latest",
                                                          "--target", str(out_r))))
                    started = time.perf_counter()
                    os.sync()
                    restic_sync.append(time.perf_counter() - started)
                else:
                    our_rs.append(measure(tools.blockera(b_repo, "restore", "latest",
                                                         str(out_b))))
            restored = next(out_r.rglob("small.img"))
            same = subprocess.run(["cmp", str(restored), str(out_b)]).returncode == 0 and \
                subprocess.run(["cmp", str(out_b), str(small)]).returncode == 0
            if not same:
                raise SystemExit("restored images differ from the source")
            shutil.rmtree(out_r)
            out_b.unlink()
        rr = statistics.median(m.seconds for m in restic_rs)
        rd = statistics.median(m.seconds + s for m, s in zip(restic_rs, restic_sync))
        br = statistics.median(m.seconds for m in our_rs)
        rows.append({"operation": f"restore, {args.small_gib} GiB (restic + sync: durable)",
                     "restic_s": round(rd, 2), "blockera_s": round(br, 2),
                     "restic_MBps": round(args.small_gib * GiB / 1e6 / rd, 1),
                     "blockera_MBps": round(args.small_gib * GiB / 1e6 / br, 1),
                     "speedup": _ratio(rd, br),
                     "blockera_rss_mb": round(max(m.max_rss_mb for m in our_rs), 1)})
        rows.append({"operation": f"restore, {args.small_gib} GiB (restic without sync)",
                     "restic_s": round(rr, 2), "blockera_s": round(br, 2),
                     "restic_MBps": round(args.small_gib * GiB / 1e6 / rr, 1),
                     "blockera_MBps": round(args.small_gib * GiB / 1e6 / br, 1),
                     "speedup": _ratio(rr, br), "blockera_rss_mb": ""})
        rows.append({"operation": f"full backup, {args.large_gib} GiB (blockera only)",
                     "restic_s": "", "blockera_s": round(big_full.seconds, 2), "restic_MBps": "",
                     "blockera_MBps": round(args.large_gib * GiB / 1e6 / big_full.seconds, 1),
                     "speedup": "", "blockera_rss_mb": round(big_full.max_rss_mb, 1)})

        # 5. memory at 64 GiB: a straight line through the 2 and 8 GiB runs (full backups and
        #    incrementals separately; a slope below zero is noise and counts as flat)
        def at_64(small_mb: float, large_mb: float) -> tuple[float, float]:
            per_gib = max(0.0, (large_mb - small_mb) / (args.large_gib - args.small_gib))
            return round(per_gib, 2), round(max(small_mb, large_mb) + per_gib
                                            * (64 - args.large_gib), 1)

        full_small = max(m.max_rss_mb for m in our_full)
        inc_small = max(m.max_rss_mb for m in our_inc)
        inc_large = max(m.max_rss_mb for m in big_inc)
        full_slope, full_64 = at_64(full_small, big_full.max_rss_mb)
        inc_slope, inc_64 = at_64(inc_small, inc_large)
        extra.update({
            "full_speedup": _ratio(r_t, b_t),
            "incremental_speedup": _ratio(ri, bi),
            "incremental_large_over_small": _ratio(li, bi),
            "restore_speedup_durable": _ratio(rd, br),
            "restore_speedup_without_restic_sync": _ratio(rr, br),
            "rss_mb": {"full_small": full_small, "full_large": big_full.max_rss_mb,
                       "incremental_small": inc_small, "incremental_large": inc_large,
                       "restore_small": max(m.max_rss_mb for m in our_rs)},
            "rss_mb_per_gib": {"full": full_slope, "incremental": inc_slope},
            "rss_mb_at_64_gib_extrapolated": {"full": full_64, "incremental": inc_64},
            "restic_rss_mb": {"full": round(max(m.max_rss_mb for m in restic_full), 1),
                              "incremental": round(max(m.max_rss_mb for m in restic_inc), 1),
                              "restore": round(max(m.max_rss_mb for m in restic_rs), 1)},
            "key": _kdf(r_repo),
            "runs": {"restic_incremental_s": [m.seconds for m in restic_inc],
                     "blockera_incremental_s": [m.seconds for m in our_inc],
                     "blockera_incremental_large_s": [m.seconds for m in big_inc]},
            "when": time.strftime("%Y-%m-%d %H:%M"),
        })
        report("backup: blockera backup/restore vs restic 0.14 (medians; seconds, MB/s)",
               rows, extra)
        for key, value in extra.items():
            print(f"{key}: {value}")
    finally:
        if not args.keep:
            shutil.rmtree(args.scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
