"""blockera's era tools against thin-provisioning-tools 0.9.0 on a large image.

The image: 8 Mi origin blocks (16 TiB at 2 MiB blocks), an era array of random eras 0..99, and
two archived writesets (eras 99 and 100) with 1 % of their bits set; built by 0.9.0 era_restore
from XML. Each operation alternates the peer and blockera `--rounds` times (median time, peak
RSS of the process).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import compare, measure, report  # noqa: E402


def write_xml(path: Path, nr_blocks: int, seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    eras = rng.integers(0, 100, nr_blocks, dtype=np.uint32)
    with open(path, "w") as f:
        f.write(f'<superblock uuid="" block_size="4096" nr_blocks="{nr_blocks}" '
                'current_era="101">\n')
        for era in (99, 100):
            values = np.where(rng.random(nr_blocks) < 0.01, "true", "false").tolist()
            f.write(f'  <writeset era="{era}" nr_bits="{nr_blocks}">\n')
            for start in range(0, nr_blocks, 1 << 20):
                f.write("".join(f'    <bit block="{i}" value="{v}"/>\n' for i, v in
                                enumerate(values[start: start + (1 << 20)], start)))
            f.write("  </writeset>\n")
        f.write("  <era_array>\n")
        values = eras.tolist()
        for start in range(0, nr_blocks, 1 << 20):
            f.write("".join(f'    <era block="{i}" era="{e}"/>\n'
                            for i, e in enumerate(values[start: start + (1 << 20)], start)))
        f.write("  </era_array>\n</superblock>\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--blocks", type=int, default=8 << 20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    for tool in ("era_restore", "era_dump", "era_invalidate", "era_check", "blockera"):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found: install thin-provisioning-tools and blockera")
    work = Path(tempfile.mkdtemp(prefix="era-bench-", dir=args.workdir))
    try:
        xml = work / "era.xml"
        write_xml(xml, args.blocks)
        image = work / "meta.img"
        ours_image = work / "ours.img"
        for p in (image, ours_image):
            with open(p, "wb") as f:
                f.truncate(64 << 20)
        measure(["era_restore", "-i", str(xml), "-o", str(image)])
        rows = [
            compare("invalidate --written-since 50",
                    ["era_invalidate", "--written-since", "50", str(image)],
                    ["blockera", "era", "invalidate", "--written-since", "50", str(image)],
                    args.rounds, (work / "inv.theirs", work / "inv.ours")),
            compare("dump", ["era_dump", str(image)], ["blockera", "era", "dump", str(image)],
                    args.rounds, (work / "dump.theirs", work / "dump.ours")),
            compare("check", ["era_check", str(image)],
                    ["blockera", "era", "check", str(image)], args.rounds),
            compare("restore", ["era_restore", "-i", str(xml), "-o", str(image)],
                    ["blockera", "era", "restore", "-q", "-i", str(xml), "-o", str(ours_image)],
                    max(1, args.rounds - 1)),
        ]
        same = {name: (work / f"{name}.theirs").read_bytes() == (work / f"{name}.ours").read_bytes()
                for name in ("inv", "dump")}
        report(f"era tools: {args.blocks} blocks, blockera vs thin-provisioning-tools 0.9.0",
               rows, {"identical_output": same, "blocks": args.blocks})
        print(f"outputs identical: {same}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
