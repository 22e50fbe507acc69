"""Damage is found, named and never restored silently: a bit flip in a blob, in a pack header,
a missing or truncated pack. `check` names the snapshots and the byte ranges of their images;
restore and dump fail loudly, or with --ignore-errors write zeros there and list the ranges."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from blockera.backup import BlobType, LocalBackend, Repository

from .helpers import PASSWORD, Restic
from .jobs import KiB, MiB, Cli, image_bytes, make_repo, overwrite

CHUNK = 256 * KiB


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Cli, Path, list[dict], list[bytes]]:
    cli = Cli(make_repo(tmp_path / "repo"), tmp_path / "locks")
    disk = tmp_path / "disk.img"
    disk.write_bytes(image_bytes(4 * MiB, seed=70).replace(bytes(1000), b"\x01" * 1000))
    images = [disk.read_bytes()]
    snaps = [cli.backup(disk, "--chunk-size", "256K")]
    overwrite(disk, [(9 * CHUNK + 5, 100)], seed=71)
    images.append(disk.read_bytes())
    (tmp_path / "c.json").write_text(json.dumps({"chunk_size": 8, "valid": True,
                                                 "ranges": [[576, 577]]}))
    snaps.append(cli.backup(disk, "--changed", str(tmp_path / "c.json")))
    return cli, disk, snaps, images


def _pack_path(repo: Path, chunk: bytes) -> tuple[Path, int, int]:
    r = Repository.open(LocalBackend(repo), PASSWORD)
    found = r.index.lookup(hashlib.sha256(chunk).digest(), BlobType.DATA)
    r.close()
    assert found is not None
    name = found.pack_id.hex()
    return repo / "data" / name[:2] / name, found.offset_bytes, found.length_bytes


def _flip(path: Path, offset: int) -> None:
    path.chmod(0o600)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def test_bit_flip_in_a_blob(setup, tmp_path: Path) -> None:
    cli, disk, snaps, images = setup
    chunk3 = images[0][3 * CHUNK:4 * CHUNK]              # in both snapshots
    pack, offset, length = _pack_path(cli.repo, chunk3)
    _flip(pack, offset + length // 2)

    assert cli.run("check").returncode == 0              # headers and index still agree
    r = cli.run("check", "--read-data", check=False)
    assert r.returncode == 1
    out = r.stdout.decode()
    for s in snaps:
        assert f"damaged: snapshot {s['snapshot_id'][:8]} ({disk}" in out
    assert f"/disk.img bytes [{3 * CHUNK}, {4 * CHUNK})" in out
    assert "MAC verification failed" in out
    report = cli.json("check", "--read-data", check=False)
    assert not report["ok"]
    assert {d["snapshot"] for d in report["damage"]} == {s["snapshot_id"] for s in snaps}
    assert all(d["ranges"] == [[3 * CHUNK, 4 * CHUNK]] for d in report["damage"])
    if shutil.which("restic"):                           # restic agrees
        assert Restic(cli.repo).run("check", "--read-data", check=False).returncode != 0

    target = tmp_path / "out.img"
    r = cli.run("restore", "latest", str(target), check=False)
    assert r.returncode == 1
    assert f"bytes [{3 * CHUNK}, {4 * CHUNK}) cannot be restored".encode() in r.stderr
    assert b"MAC verification failed" in r.stderr and b"Traceback" not in r.stderr
    r = cli.run("dump", snaps[0]["snapshot_id"], check=False)
    assert r.returncode == 1 and b"cannot be read" in r.stderr
    r = cli.run("dump", snaps[0]["snapshot_id"], "--ignore-errors", check=False)
    assert r.returncode == 1 and r.stdout == \
        images[0][:3 * CHUNK] + bytes(CHUNK) + images[0][4 * CHUNK:]

    r = cli.run("restore", "latest", str(target), "--ignore-errors", "--json", check=False)
    assert r.returncode == 1
    assert f"damaged: bytes [{3 * CHUNK}, {4 * CHUNK}) written as zeros".encode() in r.stderr
    result = json.loads(r.stdout)
    assert [(d["begin"], d["end"]) for d in result["damaged"]] == [(3 * CHUNK, 4 * CHUNK)]
    restored = target.read_bytes()
    expected = images[1][:3 * CHUNK] + bytes(CHUNK) + images[1][4 * CHUNK:]
    assert restored == expected


def test_damaged_header_missing_and_truncated_packs(setup) -> None:
    cli, disk, snaps, images = setup
    only_first = images[0][9 * CHUNK:10 * CHUNK]          # replaced in the second snapshot
    pack, _, _ = _pack_path(cli.repo, only_first)
    _flip(pack, pack.stat().st_size - 10)                 # inside the encrypted header
    r = cli.run("check", check=False)
    assert r.returncode == 1
    out = r.stdout.decode()
    assert "the header cannot be read" in out
    assert f"damaged: snapshot {snaps[0]['snapshot_id'][:8]}" in out

    pack.unlink()
    report = cli.json("check", check=False)
    assert any("is missing" in e for e in report["errors"])
    damaged = {d["snapshot"]: d["ranges"] for d in report["damage"]}
    # the first backup's blobs are all in that pack; the second stored chunk 9 elsewhere
    assert damaged == {snaps[0]["snapshot_id"]: [[0, 4 * MiB]],
                       snaps[1]["snapshot_id"]: [[0, 9 * CHUNK], [10 * CHUNK, 4 * MiB]]}


def test_truncated_pack_and_broken_index(setup) -> None:
    cli, disk, snaps, images = setup
    pack, _, _ = _pack_path(cli.repo, images[1][9 * CHUNK:10 * CHUNK])
    pack.chmod(0o600)
    with open(pack, "r+b") as f:
        f.truncate(pack.stat().st_size - 1)
    report = cli.json("check", check=False)
    assert any("the index implies" in e for e in report["errors"])
    assert snaps[1]["snapshot_id"] in {d["snapshot"] for d in report["damage"]}
    r = cli.run("prune", check=False)
    assert r.returncode == 1 and b"refusing to prune" in r.stderr
    index = next((cli.repo / "index").iterdir())
    _flip(index, 40)
    report = cli.json("check", check=False)
    assert any("cannot be read" in e for e in report["errors"])
