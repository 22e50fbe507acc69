"""Incrementals driven by the project's own change tracking are exact: era metadata written by
the era target of the userspace engine (any era block size against any chunk size), the
`era invalidate --json` of it, and the COW store of a snapshot in a snapshot-origin stack.
Each incremental reads exactly the chunks covering what was written and restores to the
device's content at that time."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from blockera.engine.client import open_path
from blockera.engine.userspace import Engine

from .jobs import KiB, MiB, Cli, image_bytes, make_repo, snapshot_image

SIZE = 8 * MiB + 12 * KiB      # not a multiple of any chunk or era block size used here


def _chunks_covering(ranges: list[tuple[int, int]], unit: int, chunk: int) -> int:
    """How many chunks cover the era blocks (of `unit` bytes) the byte ranges touch."""
    blocks = {b for s, e in ranges for b in range(s // unit, -(-e // unit))}
    chunks = {c for b in blocks for c in range(b * unit // chunk,
                                                 -(-min((b + 1) * unit, SIZE) // chunk))}
    return len(chunks)


def _random_writes(rnd: random.Random, count: int) -> list[tuple[int, bytes]]:
    writes = []
    for _ in range(count):
        length = rnd.choice((512, 4096, 5120, 70 * KiB))     # the engine takes whole sectors
        offset = rnd.randrange(0, SIZE - length) // 512 * 512
        writes.append((offset, rnd.randbytes(length)))
    writes.append((SIZE - 512, rnd.randbytes(512)))      # the partial last block and chunk
    return writes


@pytest.mark.parametrize("block_sectors, chunk", [(8, 64 * KiB), (24, 64 * KiB),
                                                  (128, MiB), (8192, 256 * KiB)])
def test_era_incrementals_are_exact(tmp_path: Path, block_sectors: int, chunk: int) -> None:
    meta, origin = tmp_path / "meta.img", tmp_path / "origin.img"
    with open(meta, "wb") as f:
        f.truncate(4 * MiB)
    origin.write_bytes(image_bytes(SIZE, seed=block_sectors))
    cli = Cli(make_repo(tmp_path / "repo"), tmp_path / "locks")
    engine = Engine()
    rnd = random.Random(block_sectors * chunk)
    try:
        engine.create("era", f"0 {SIZE // 512} era {meta} {origin} {block_sectors}")
        era = engine.device("era")
        engine.message("era", 0, ["take_metadata_snap"])
        full = cli.backup(origin, "--chunk-size", str(chunk), "--era-metadata", str(meta),
                          "--metadata-snapshot", "--full")
        assert full["made_from"] == "full" and full["chunks_read"] == -(-SIZE // chunk)
        tags = cli.json("snapshots")[0]["tags"]
        assert "blockera:era=2" in tags and f"blockera:era-id={'0' * 32}-{block_sectors}" in tags
        engine.message("era", 0, ["drop_metadata_snap"])
        images = {full["snapshot_id"]: origin.read_bytes()}
        for round_ in range(2):
            writes = _random_writes(rnd, 6)
            for offset, data in writes:
                era.write(offset, data)
            engine.settle()
            engine.message("era", 0, ["take_metadata_snap"])
            if round_ == 0:
                s = cli.backup(origin, "--era-metadata", str(meta), "--metadata-snapshot")
            else:     # the same through `era invalidate --json`, at the recorded era
                since = str(cli.json("snapshots")[-1]["era"])
                listed = cli.run("era", "invalidate", "--written-since", since,
                                 "--metadata-snapshot", "--json", str(meta)).stdout
                s = cli.json("backup", str(origin), "--changed", "-", input=listed)
            engine.message("era", 0, ["drop_metadata_snap"])
            expected = _chunks_covering([(o, o + len(d)) for o, d in writes],
                                        block_sectors * 512, chunk)
            assert s["chunks_read"] == expected, (s, expected)
            assert s["chunks_reused"] == s["chunks_total"] - expected
            images[s["snapshot_id"]] = origin.read_bytes()
        for snapshot_id, image in images.items():
            assert snapshot_image(cli.repo, snapshot_id) == image
    finally:
        engine.shutdown()


def test_era_continuity_is_checked(tmp_path: Path) -> None:
    meta, origin = tmp_path / "meta.img", tmp_path / "origin.img"
    with open(meta, "wb") as f:
        f.truncate(4 * MiB)
    origin.write_bytes(image_bytes(2 * MiB, seed=3))
    cli = Cli(make_repo(tmp_path / "repo"), tmp_path / "locks")
    engine = Engine()
    try:
        engine.create("era", f"0 4096 era {meta} {origin} 128")
        for _ in range(3):
            engine.message("era", 0, ["checkpoint"])
        cli.backup(origin, "--era-metadata", str(meta), "--full")       # records era 4
        r = cli.run("backup", str(origin), "--era-metadata", str(meta), "--since", "9",
                    check=False)
        assert r.returncode == 1 and b"era 9 is after its current era 4" in r.stderr
    finally:
        engine.shutdown()
    # metadata made afresh (a new era device): era 1 < 4, the history is gone
    meta.unlink()
    with open(meta, "wb") as f:
        f.truncate(4 * MiB)
    engine = Engine()
    try:
        engine.create("era", f"0 4096 era {meta} {origin} 128")
        engine.device("era").write(0, b"x" * 4096)
        engine.settle()
        r = cli.run("backup", str(origin), "--era-metadata", str(meta), check=False)
        assert r.returncode == 1
        assert b"is at era 1, before era 4 that the parent backup recorded" in r.stderr
        engine.remove("era")
        engine.create("era2", f"0 4096 era {meta} {origin} 128")
    finally:
        engine.shutdown()
    # metadata with another block size
    other = tmp_path / "other-meta.img"
    with open(other, "wb") as f:
        f.truncate(4 * MiB)
    engine = Engine()
    try:
        engine.create("era", f"0 4096 era {other} {origin} 256")
        for _ in range(5):
            engine.message("era", 0, ["checkpoint"])
        engine.settle()
        r = cli.run("backup", str(origin), "--era-metadata", str(other), check=False)
        assert r.returncode == 1 and b"is not the metadata the parent backup was taken with" \
            in r.stderr
    finally:
        engine.shutdown()


def test_cow_incrementals_from_a_snapshot_origin_stack(daemon, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The consistent live backup: each snapshot device is a frozen source; the COW of the
    previous snapshot lists every chunk written since it was taken."""
    size = 6 * MiB
    base = tmp_path / "base.img"
    image = bytearray(image_bytes(size, seed=21))
    base.write_bytes(bytes(image))
    cows = [tmp_path / f"cow{i}.img" for i in range(3)]
    for c in cows:
        with open(c, "wb") as f:
            f.truncate(4 * MiB)
    d = daemon.run
    env = {"BLOCKERA_SOCKET": str(daemon.socket_path)}
    cli = Cli(make_repo(tmp_path / "repo"), tmp_path / "locks")
    sectors = size // 512
    d("dmsetup", "create", "base-real", "--table", f"0 {sectors} linear {base} 0")
    d("dmsetup", "create", "base", "--table", f"0 {sectors} snapshot-origin /dev/mapper/base-real")
    rnd = random.Random(5)
    monkeypatch.setenv("BLOCKERA_SOCKET", str(daemon.socket_path))
    live = open_path("/dev/mapper/base", writable=True)

    def snapshot(i: int) -> None:
        d("dmsetup", "suspend", "base")
        d("dmsetup", "create", f"snap{i}", "--table",
          f"0 {sectors} snapshot /dev/mapper/base-real {cows[i]} P 16")
        d("dmsetup", "resume", "base")

    def write(count: int) -> None:
        for _ in range(count):
            length = rnd.choice((512, 4096, 20 * KiB))
            offset = rnd.randrange(0, size - length) // 512 * 512
            data = rnd.randbytes(length)
            live.write(offset, data)
            image[offset:offset + length] = data

    snapshot(0)
    first = json.loads(cli.run("backup", "/dev/mapper/snap0", "--chunk-size", "64K", "--json",
                               env=env).stdout)
    frozen = {first["snapshot_id"]: bytes(image)}
    parent = first["snapshot_id"]
    for i in (1, 2):
        write(5)
        snapshot(i)
        at_snapshot = bytes(image)
        write(2)                          # after the snapshot: not in this backup
        s = json.loads(cli.run("backup", f"/dev/mapper/snap{i}", "--cow", str(cows[i - 1]),
                               "--parent", parent, "--json", env=env).stdout)
        assert s["made_from"] == "cow" and s["parent_id"] == parent
        assert 0 < s["chunks_read"] < s["chunks_total"]
        d("dmsetup", "remove", f"snap{i - 1}")
        frozen[s["snapshot_id"]] = at_snapshot
        parent = s["snapshot_id"]
    snap2 = open_path("/dev/mapper/snap2", writable=False)
    assert snap2.read(0, size) == frozen[parent]
    snap2.close()
    live.close()
    for snapshot_id, expected in frozen.items():
        assert snapshot_image(cli.repo, snapshot_id) == expected
    assert "blockera:cow-chunk=16" in cli.json("snapshots")[-1]["tags"]
    assert np.frombuffer(bytes(image), np.uint8).any()


def test_invalid_cow_is_refused(daemon, tmp_path: Path) -> None:
    base, cow = tmp_path / "base.img", tmp_path / "cow.img"
    base.write_bytes(image_bytes(2 * MiB, seed=2))
    with open(cow, "wb") as f:
        f.truncate(64 * KiB)                 # room for a few exceptions only
    d = daemon.run
    env = {"BLOCKERA_SOCKET": str(daemon.socket_path)}
    cli = Cli(make_repo(tmp_path / "repo"), tmp_path / "locks")
    d("dmsetup", "create", "real", "--table", f"0 4096 linear {base} 0")
    d("dmsetup", "create", "origin", "--table", "0 4096 snapshot-origin /dev/mapper/real")
    d("dmsetup", "suspend", "origin")
    d("dmsetup", "create", "snap", "--table", f"0 4096 snapshot /dev/mapper/real {cow} P 8")
    d("dmsetup", "resume", "origin")
    cli.run("backup", str(base), env=env)
    d("dd", "if=/dev/zero", "of=/dev/mapper/origin", "bs=64k", "count=8", "status=none")
    assert "Invalid" in d("dmsetup", "status", "snap").stdout
    r = cli.run("backup", str(base), "--cow", str(cow), check=False)
    assert r.returncode == 1 and b"the snapshot is invalid" in r.stderr
