"""restic 0.14 and blockera share repositories on a real S3 server (radosgw): restic checks,
lists, dumps and restores what blockera wrote to `s3:http://...`, and blockera reads and
extends what restic wrote there."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from blockera.backup import BlobType, GoTime, Node, Repository, Snapshot, Tree

from ..helpers import (FAST_KDF, PASSWORD, MiB, compressible_bytes, image_chunks,
                       need_restic, random_bytes)
from .cluster import RadosGW
from .conftest import ResticS3, make_backend, s3_url

pytestmark = pytest.mark.xdist_group("s3")


class WrittenS3:
    """A repository written by blockera under a prefix of a bucket: two snapshots of a 6 MiB
    image (the second changes one chunk and nests the file in a directory)."""

    def __init__(self, url: str) -> None:
        self.url = url
        repo = Repository.init(make_backend(url), PASSWORD, kdf_params=FAST_KDF,
                               pack_size_bytes=2 * MiB)
        self.config = repo.config
        self.image1_chunks = image_chunks(seed=31)
        self.image2_chunks = list(self.image1_chunks)
        self.image2_chunks[4] = random_bytes(MiB, 97)
        self.image1 = b"".join(self.image1_chunks)
        self.image2 = b"".join(self.image2_chunks)
        with repo.lock(recheck_delay_s=0.01):
            ids1 = [repo.save_blob(BlobType.DATA, c) for c in self.image1_chunks]
            root1 = repo.save_tree(Tree([Node.file("vda.img", len(self.image1), ids1)]))
            s1 = Snapshot.new(root1, ["/dev/vda"], tags=["blockera", "full"],
                              time=GoTime.parse("2025-06-01T12:00:00.123456789+02:00"))
            self.snap1 = repo.save_snapshot(s1)
            ids2 = [repo.save_blob(BlobType.DATA, c) for c in self.image2_chunks]
            inner = repo.save_tree(Tree([Node.file("vda", len(self.image2), ids2)]))
            root2 = repo.save_tree(Tree([Node.directory("dev", inner)]))
            self.snap2 = repo.save_snapshot(Snapshot.new(root2, ["/dev/vda"],
                                                         tags=["blockera", "incremental"],
                                                         parent=self.snap1))
        self.time1 = s1.time.format()
        repo.close()


@pytest.fixture(scope="module")
def written(radosgw: RadosGW) -> WrittenS3:
    need_restic()
    return WrittenS3(s3_url(radosgw, "written-by-blockera", "backups/vm1"))


@pytest.fixture
def restic(written: WrittenS3) -> ResticS3:
    return ResticS3(written.url)


def test_restic_check_read_data(restic: ResticS3) -> None:
    out = restic.run("check", "--read-data").stdout.decode()
    assert "no errors were found" in out


def test_restic_snapshots_and_config(restic: ResticS3, written: WrittenS3) -> None:
    snaps = {s["id"]: s for s in json.loads(restic.run("snapshots", "--json").stdout)}
    assert set(snaps) == {written.snap1.hex(), written.snap2.hex()}
    s1, s2 = snaps[written.snap1.hex()], snaps[written.snap2.hex()]
    assert s1["tags"] == ["blockera", "full"] and s1["time"] == written.time1
    assert s2["parent"] == written.snap1.hex() and s2["paths"] == ["/dev/vda"]
    assert s1["hostname"] == socket.gethostname()
    cfg = json.loads(restic.run("cat", "config").stdout)
    assert cfg["id"] == written.config.id and cfg["version"] == 2


def test_restic_dump_and_restore(restic: ResticS3, written: WrittenS3, tmp_path: Path) -> None:
    assert restic.run("dump", written.snap1.hex(), "/vda.img").stdout == written.image1
    assert restic.run("dump", "latest", "/dev/vda").stdout == written.image2
    restic.run("restore", written.snap2.hex(), "--target", str(tmp_path / "out"))
    assert (tmp_path / "out" / "dev" / "vda").read_bytes() == written.image2


def test_objects_where_restic_puts_them(written: WrittenS3, radosgw: RadosGW) -> None:
    """The bucket holds exactly restic's names under the prefix, nothing else."""
    be = make_backend(s3_url(radosgw, "written-by-blockera"))
    keys = [k for k, _ in be._list_keys("")]
    assert "backups/vm1/config" in keys
    for key in keys:
        parts = key.split("/")
        assert parts[:2] == ["backups", "vm1"], key
        rest = parts[2:]
        if rest == ["config"]:
            continue
        assert rest[0] in ("keys", "snapshots", "index", "data"), key
        if rest[0] == "data":
            assert len(rest) == 3 and rest[2].startswith(rest[1]) and len(rest[2]) == 64, key
        else:
            assert len(rest) == 2 and len(rest[1]) == 64, key   # no locks left behind


def test_restic_repository_read_and_extended_by_blockera(radosgw: RadosGW, bucket: str,
                                                          tmp_path: Path) -> None:
    """restic creates the bucket and backs up a file; blockera reassembles it exactly, adds a
    snapshot of its own, and restic checks and dumps that."""
    need_restic()
    url = s3_url(radosgw, bucket)        # the top of the bucket, no prefix
    restic = ResticS3(url)
    restic.run("init")
    src = tmp_path / "src"
    src.mkdir()
    content = compressible_bytes(3 * MiB, 4) + random_bytes(5 * MiB + 12345, 5)
    (src / "disk.img").write_bytes(content)
    restic.run("backup", str(src))

    repo = Repository.open(make_backend(url), PASSWORD)
    snap = repo.find_snapshot("latest")
    assert snap.paths == [str(src)]
    node = None
    tree = repo.load_tree(snap.tree)
    for part in [*src.parts[1:], "disk.img"]:
        node = tree.find(part)
        assert node is not None, part
        if node.subtree is not None:
            tree = repo.load_tree(node.subtree)
    assert node is not None and node.size == len(content)
    assert b"".join(repo.load_blob(i) for i in node.content) == content

    extra = [random_bytes(MiB, 6), compressible_bytes(MiB, 7)]
    with repo.lock(recheck_delay_s=0.01):
        ids = list(node.content) + [repo.save_blob(BlobType.DATA, c) for c in extra]
        root = repo.save_tree(Tree([Node.file("grown.img", len(content) + 2 * MiB, ids)]))
        mine = repo.save_snapshot(Snapshot.new(root, ["/grown.img"], parent=snap.id))
    repo.close()

    assert "no errors were found" in restic.run("check", "--read-data").stdout.decode()
    assert restic.run("dump", mine.hex(), "/grown.img").stdout == content + b"".join(extra)
    assert len(json.loads(restic.run("snapshots", "--json").stdout)) == 2
