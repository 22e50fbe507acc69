"""blockera's NBD export against qemu-nbd: the same client (fio's nbd engine), the same raw file,
in one run.

Servers, all running for the whole benchmark and measured in turn (the order alternates between
rounds; medians over `--rounds`):

* `qemu-nbd` serving the raw file (cache=writeback, aio=threads: through the page cache, as
  blockera's devices are);
* `blockera daemon` exporting a `linear` device over the raw file and an `era` device over the
  same file (4 KiB era blocks, the finest and costliest tracking; metadata in its own file,
  written out in full first, as an LV or a restored metadata file is, so that no metadata flush
  pays for allocating file blocks).

Jobs (one connection, queue depth `--iodepth`):

* sequential 1 MiB write and read of the whole file (era: blocks already marked);
* 4 KiB random read, and 4 KiB random write to blocks already marked in the current era;
* 4 KiB random write to fresh era blocks: a `checkpoint` message starts a new era first and
  fio's random map never writes a block twice, so every write needs its block marked and the
  metadata committed before it reaches the origin (concurrent first writes share a commit);
* sequential 1 MiB write in a fresh era (256 marks per write), which also re-marks every block
  for the next round.

Ratios are blockera's throughput over qemu-nbd's on the same job (1.0: as fast; higher is
better); the fresh-block rows are compared with qemu-nbd's plain job of the same shape.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report  # noqa: E402

from blockera.engine.client import EngineClient  # noqa: E402

MiB = 1 << 20
GOALS = {"seq_write": 0.8, "seq_read": 0.8, "rand_read": 0.5, "rand_write": 0.5,
         "rand_write_fresh": 0.5, "seq_write_fresh": 0.7}
LABELS = {
    "seq_write": "1 MiB sequential write",
    "seq_read": "1 MiB sequential read",
    "rand_read": "4 KiB random read",
    "rand_write": "4 KiB random write, marked blocks",
    "rand_write_fresh": "4 KiB random write, fresh era blocks",
    "seq_write_fresh": "1 MiB sequential write, fresh era blocks",
}


def _need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        sys.exit(f"{tool} not found: apt-get install {package}")
    return path


def _wait_for_socket(path: Path, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 30
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start (exit status {proc.poll()})")
        time.sleep(0.05)


class Servers:
    """qemu-nbd and the blockera daemon over the same raw file, started and stopped together."""

    def __init__(self, work: Path, file_mib: int) -> None:
        self.work = work
        self.raw = work / "disk.raw"
        self.meta = work / "era-meta.img"
        self.size_bytes = file_mib * MiB
        with open(self.raw, "wb") as f:          # allocated and filled once, so neither
            block = os.urandom(MiB)              # server pays for allocating the file
            for _ in range(file_mib):
                f.write(block)
        with open(self.meta, "wb") as f:
            f.write(bytes(64 * MiB))
        self.qemu_sock = work / "qemu.sock"
        self.control = work / "engine.sock"
        self.nbd_sock = work / "engine-nbd.sock"
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        qemu = subprocess.Popen(
            [_need("qemu-nbd", "qemu-utils"), "-f", "raw", "-k", str(self.qemu_sock), "-x",
             "disk", "-t", "-e", "16", "--cache=writeback", "--aio=threads", str(self.raw)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(qemu)
        _wait_for_socket(self.qemu_sock, qemu, "qemu-nbd")
        daemon = subprocess.Popen(
            [sys.executable, "-m", "blockera", "daemon", "--socket", str(self.control),
             "--nbd-socket", str(self.nbd_sock)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(daemon)
        _wait_for_socket(self.control, daemon, "blockera daemon")
        sectors = self.size_bytes // 512
        with EngineClient(self.control) as c:
            c.create("linear", f"0 {sectors} linear {self.raw} 0")
            c.create("era", f"0 {sectors} era {self.meta} {self.raw} 8")

    def message(self, *args: str) -> None:
        with EngineClient(self.control) as c:
            c.message("era", 0, list(args))

    def uri(self, server: str) -> str:
        if server == "qemu-nbd":
            return f"nbd+unix:///disk?socket={self.qemu_sock}"
        return f"nbd+unix:///{server}?socket={self.nbd_sock}"

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def fio(uri: str, job: str, size_bytes: int, rand_bytes: int, iodepth: int,
        out: Path) -> float:
    """Run one fio job against `uri`; its throughput in MiB/s (sequential) or IOPS (random)."""
    rw, bs, io_size = {
        "seq_write": ("write", "1M", size_bytes), "seq_write_fresh": ("write", "1M", size_bytes),
        "seq_read": ("read", "1M", size_bytes), "rand_read": ("randread", "4k", rand_bytes),
        "rand_write": ("randwrite", "4k", rand_bytes),
        "rand_write_fresh": ("randwrite", "4k", rand_bytes)}[job]
    cmd = [_need("fio", "fio"), "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}",
           f"--bs={bs}", f"--iodepth={iodepth}", f"--size={size_bytes}",
           f"--io_size={io_size}", "--randrepeat=0", "--output-format=json", f"--output={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"fio failed on {uri}: {proc.stderr.strip()}")
    result = json.loads(out.read_text())["jobs"][0]
    side = result["write" if "write" in rw else "read"]
    return side["bw_bytes"] / MiB if bs == "1M" else side["iops"]


def bench(servers: Servers, rounds: int, rand_mib: int, iodepth: int) -> list[dict]:
    runs: dict[tuple[str, str], list[float]] = {}
    out = servers.work / "fio.json"
    plain = ("qemu-nbd", "linear", "era")

    def run(server: str, job: str) -> None:
        value = fio(servers.uri(server), job, servers.size_bytes, rand_mib * MiB, iodepth, out)
        runs.setdefault((server, job), []).append(value)

    servers.message("checkpoint")
    fio(servers.uri("era"), "seq_write", servers.size_bytes, 0, iodepth, out)  # marks all
    for r in range(rounds):
        order = plain if r % 2 == 0 else tuple(reversed(plain))
        for job in ("seq_write", "seq_read", "rand_read", "rand_write"):
            for server in order:
                run(server, job)
        servers.message("checkpoint")
        run("era", "rand_write_fresh")
        servers.message("checkpoint")
        run("era", "seq_write_fresh")            # leaves every block marked again
    rows = []
    for job in ("seq_write", "seq_read", "rand_read", "rand_write", "rand_write_fresh",
                "seq_write_fresh"):
        base_job = job.removesuffix("_fresh")
        qemu = statistics.median(runs[("qemu-nbd", base_job)])
        unit = "MiB/s" if job.startswith("seq") else "IOPS"
        fresh = job.endswith("_fresh")
        linear = None if fresh else statistics.median(runs[("linear", job)])
        era = statistics.median(runs[("era", job)])
        goal = GOALS[job]
        rows.append({
            "operation": LABELS[job], "unit": unit, "qemu_nbd": round(qemu, 1),
            "blockera_linear": "-" if linear is None else round(linear, 1),
            "blockera_era": round(era, 1),
            "ratio_linear": "-" if linear is None else round(linear / qemu, 3),
            "ratio_era": round(era / qemu, 3),
            "goal_era": f">= {goal}",
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file-mib", type=int, default=256, help="size of the raw file")
    parser.add_argument("--rand-mib", type=int, default=32,
                        help="data moved by each 4 KiB random job")
    parser.add_argument("--iodepth", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the files go (default: a temporary directory)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nbd-bench-", dir=args.workdir) as work:
        servers = Servers(Path(work), args.file_mib)
        try:
            servers.start()
            rows = bench(servers, args.rounds, args.rand_mib, args.iodepth)
        finally:
            servers.stop()
    report("nbd export: blockera daemon vs qemu-nbd, fio nbd engine, same raw file", rows,
           {"file_mib": args.file_mib, "rand_mib": args.rand_mib, "iodepth": args.iodepth,
            "rounds": args.rounds, "client": "fio --ioengine=nbd", "era_block_sectors": 8})


if __name__ == "__main__":
    main()
