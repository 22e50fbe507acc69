"""Helpers for benchmarks: run a command and measure wall time and peak memory of that process
alone, alternate peer and blockera runs, print and save ratio tables."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SRC = Path(__file__).resolve().parents[1] / "src"


def compile_sources() -> None:
    """Byte-compile blockera's sources, as installing the package does: the benchmarks run the
    commands from the source tree, where an environment with PYTHONDONTWRITEBYTECODE would
    otherwise compile every module again in every command (~0.1 s each)."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(SRC / "blockera")],
                   check=True, stdout=subprocess.DEVNULL)


@dataclass
class Measurement:
    seconds: float
    max_rss_mb: float


def measure(cmd: list[str], stdout_path: Path | None = None) -> Measurement:
    """Run `cmd` to completion under GNU time: its own wall time and peak RSS. (Linux keeps the
    pre-exec address space's high-water mark in ru_maxrss, so a direct child of a large process
    would look large; GNU time's fresh fork does not.)"""
    gnu_time = shutil.which("time", path="/usr/bin:/bin")
    if gnu_time is None:
        raise RuntimeError("GNU time not found: apt-get install time")
    with tempfile.NamedTemporaryFile("r") as stats:
        out = open(stdout_path, "wb") if stdout_path else subprocess.DEVNULL
        try:
            r = subprocess.run([gnu_time, "-f", "%e %M", "-o", stats.name, *cmd], stdout=out,
                               stderr=subprocess.DEVNULL)
        finally:
            if stdout_path:
                out.close()
        if r.returncode != 0:
            raise RuntimeError(f"{cmd[0]} exited with {r.returncode}")
        seconds, kib = stats.read().split()[-2:]
    return Measurement(float(seconds), int(kib) / 1024)


def compare(name: str, peer: list[str], ours: list[str], rounds: int = 3,
            outputs: tuple[Path, Path] | None = None) -> dict[str, float | str]:
    """Alternate peer and blockera `rounds` times; medians and ratios (ours / peer)."""
    peer_runs, our_runs = [], []
    for _ in range(rounds):
        peer_runs.append(measure(peer, outputs[0] if outputs else None))
        our_runs.append(measure(ours, outputs[1] if outputs else None))
    p_t = statistics.median(m.seconds for m in peer_runs)
    o_t = statistics.median(m.seconds for m in our_runs)
    p_m = max(m.max_rss_mb for m in peer_runs)
    o_m = max(m.max_rss_mb for m in our_runs)
    return {"operation": name, "peer_s": round(p_t, 3), "blockera_s": round(o_t, 3),
            "time_ratio": round(o_t / p_t, 3), "peer_rss_mb": round(p_m, 1),
            "blockera_rss_mb": round(o_m, 1), "rss_ratio": round(o_m / p_m, 3)}


def report(title: str, rows: list[dict[str, float | str]], extra: dict | None = None) -> None:
    print(f"\n{title}")
    cols = list(rows[0])
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(str(r[c]).ljust(w) for c, w in zip(cols, widths)))
    RESULTS.mkdir(exist_ok=True)
    stem = title.split(":")[0].strip().replace(" ", "_").lower()
    (RESULTS / f"{stem}.json").write_text(json.dumps({"title": title, "rows": rows,
                                                      **(extra or {})}, indent=2))
