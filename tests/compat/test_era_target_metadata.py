"""The era target's metadata stays readable by thin-provisioning-tools 0.9.0 at every commit
point of random operation sequences (era_dump exits 0 and prints what blockera prints)."""

from __future__ import annotations

import io
import random
from pathlib import Path

import pytest

from blockera.blockdev import FileDevice, MemoryDevice
from blockera.engine.userspace import Engine
from blockera.era.dump import dump_xml
from blockera.era.image import EraImage
from blockera.era.superblock import Superblock
from tests.write_log import WriteLogDevice
from tests.conftest import EraTools, sparse_file

pytestmark = pytest.mark.compat


@pytest.mark.parametrize("seed", [11, 12])
def test_era_dump_reads_every_commit_point(seed: int, era_tools: EraTools,
                                           tmp_path: Path) -> None:
    meta = sparse_file(tmp_path / "meta.img", 1 << 20)
    origin = sparse_file(tmp_path / "origin.img", 8 << 20)
    log: list = []

    def opener(path: str, writable: bool):
        dev = FileDevice(path, writable=True)
        return WriteLogDevice(dev, log, "meta") if path.endswith("meta.img") else dev

    engine = Engine(file_opener=opener)
    rng = random.Random(seed)
    try:
        engine.create("era", f"0 16384 era {meta} {origin} 8")
        for _ in range(150):
            op = rng.random()
            if op < 0.6:
                block = rng.randrange(2048)
                engine.device("era").write(block * 4096, b"\x07" * 4096 * min(3, 2048 - block))
            elif op < 0.75:
                engine.message("era", 0, ["checkpoint"])
            elif op < 0.85:
                engine.settle()
                engine.status("era")
            elif op < 0.95:
                snap = engine.status("era").split()[-1]
                engine.message("era", 0, ["drop_metadata_snap" if snap != "-" else
                                          "take_metadata_snap"])
            else:
                engine.suspend("era")
                engine.resume("era")
    finally:
        engine.shutdown()
    image = bytearray(1 << 20)
    commits = 0
    for _, record in log:
        if record.kind != "write":
            continue
        image[record.offset_bytes: record.offset_bytes + len(record.data)] = record.data
        if record.offset_bytes != 0 or not Superblock.unpack(image[:4096]).nr_blocks:
            continue      # not a commit point (or the never-resumed format 0.9.0 rejects)
        path = tmp_path / "commit.img"
        path.write_bytes(bytes(image))
        theirs = era_tools.run("era_dump", str(path))
        assert theirs.returncode == 0, theirs.stderr
        ours = io.BytesIO()
        dump_xml(EraImage(MemoryDevice(data=bytes(image))), ours)
        assert ours.getvalue() == theirs.stdout
        commits += 1
    assert commits >= 100
