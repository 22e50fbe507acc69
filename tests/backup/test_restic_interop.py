"""The real restic (0.14 on Debian 12) reads, checks, restores and prunes what blockera writes,
and blockera reads and continues what restic wrote; the two respect each other's locks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from blockera.backup import (BlobType, GoTime, IntegrityError, LocalBackend,
                             LockConflictError, LockLostError, Node, Repository, Snapshot, Tree)
from blockera.backup.ids import hash_id
from blockera.backup.keys import current_username
from blockera.backup.locks import RepositoryLock

from .helpers import (FAST_KDF, PASSWORD, MiB, Restic, compressible_bytes, image_chunks,
                      need_restic, new_repo, random_bytes, start_lock_holder)


class Written:
    """A repository written by blockera: two snapshots of a 6 MiB image, the second one
    changing one chunk and nesting the file in a directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        repo = new_repo(root)
        self.config = repo.config
        self.image1_chunks = image_chunks(seed=11)
        self.image2_chunks = list(self.image1_chunks)
        self.image2_chunks[2] = random_bytes(MiB, 77)
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
            s2 = Snapshot.new(root2, ["/dev/vda"], tags=["blockera", "incremental"],
                              parent=self.snap1)
            self.snap2 = repo.save_snapshot(s2)
        self.times = (s1.time.format(), s2.time.format())
        self.key_name = repo.key_name
        repo.close()


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Written:
    need_restic()
    return Written(tmp_path_factory.mktemp("blockera-repo") / "repo")


@pytest.fixture
def restic(written: Written) -> Restic:
    return Restic(written.root)


def _copy(written: Written, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(written.root, target)
    return target


# -- restic reads what blockera wrote ------------------------------------------------------

def test_restic_check_read_data(restic: Restic) -> None:
    out = restic.run("check", "--read-data").stdout.decode()
    assert "no errors were found" in out


def test_restic_snapshots(restic: Restic, written: Written) -> None:
    snaps = json.loads(restic.run("snapshots", "--json").stdout)
    by_id = {s["id"]: s for s in snaps}
    assert set(by_id) == {written.snap1.hex(), written.snap2.hex()}
    s1, s2 = by_id[written.snap1.hex()], by_id[written.snap2.hex()]
    assert s1["paths"] == s2["paths"] == ["/dev/vda"]
    assert s1["tags"] == ["blockera", "full"] and s2["tags"] == ["blockera", "incremental"]
    assert s2["parent"] == written.snap1.hex() and "parent" not in s1
    assert (s1["time"], s2["time"]) == written.times
    assert s1["hostname"] == socket.gethostname()


def test_restic_ls(restic: Restic, written: Written) -> None:
    lines = [json.loads(line) for line in
             restic.run("ls", "--json", written.snap2.hex()).stdout.splitlines()]
    nodes = {n["path"]: n for n in lines if n.get("struct_type") == "node"}
    assert set(nodes) == {"/dev", "/dev/vda"}
    assert nodes["/dev"]["type"] == "dir"
    assert nodes["/dev/vda"]["type"] == "file" and nodes["/dev/vda"]["size"] == 6 * MiB


def test_restic_dump_both_snapshots(restic: Restic, written: Written) -> None:
    assert restic.run("dump", written.snap1.hex(), "/vda.img").stdout == written.image1
    assert restic.run("dump", "latest", "/dev/vda").stdout == written.image2


def test_restic_restore(restic: Restic, written: Written, tmp_path: Path) -> None:
    restic.run("restore", written.snap2.hex(), "--target", str(tmp_path / "out"))
    assert (tmp_path / "out" / "dev" / "vda").read_bytes() == written.image2
    restic.run("restore", written.snap1.hex(), "--target", str(tmp_path / "out1"))
    assert (tmp_path / "out1" / "vda.img").read_bytes() == written.image1


def test_restic_cat_config_and_key_list(restic: Restic, written: Written) -> None:
    cfg = json.loads(restic.run("cat", "config").stdout)
    assert cfg == {"version": 2, "id": written.config.id,
                   "chunker_polynomial": f"{written.config.chunker_polynomial:x}"}
    keys = json.loads(restic.run("key", "list", "--json").stdout)
    assert [k["id"] for k in keys] == [written.key_name[:8]]
    assert keys[0]["current"] is True


def test_key_added_by_blockera_opens_in_restic(written: Written, tmp_path: Path) -> None:
    root = _copy(written, tmp_path)
    repo = Repository.open(LocalBackend(root), PASSWORD)
    repo.add_key("another password", kdf_params=FAST_KDF)
    repo.close()
    out = Restic(root, "another password").run("key", "list", "--json").stdout
    assert len(json.loads(out)) == 2
    assert Restic(root).run("cat", "config").returncode == 0


def test_restic_forget_prune_then_blockera_reads_on(written: Written, tmp_path: Path) -> None:
    root = _copy(written, tmp_path)
    restic = Restic(root)
    restic.run("forget", "--keep-last", "1", "--prune")
    assert "no errors were found" in restic.run("check", "--read-data").stdout.decode()
    snaps = json.loads(restic.run("snapshots", "--json").stdout)
    assert [s["id"] for s in snaps] == [written.snap2.hex()]
    # restic rewrote the index (and dropped the chunk only the first snapshot used)
    repo = Repository.open(LocalBackend(root), PASSWORD)
    assert [s.id for s in repo.list_snapshots()] == [written.snap2]
    dev = repo.load_tree(repo.find_snapshot("latest").tree).find("dev")
    vda = repo.load_tree(dev.subtree).find("vda")
    assert b"".join(repo.load_blob(i) for i in vda.content) == written.image2
    assert not repo.index.has(Tree([]).id(), BlobType.TREE)
    # and blockera continues after restic's prune
    with repo.lock(recheck_delay_s=0.01):
        ids = [repo.save_blob(BlobType.DATA, c) for c in written.image1_chunks]
        tree = repo.save_tree(Tree([Node.file("again.img", len(written.image1), ids)]))
        repo.save_snapshot(Snapshot.new(tree, ["/dev/vda"]))
    repo.close()
    assert "no errors were found" in restic.run("check", "--read-data").stdout.decode()
    assert restic.run("dump", "latest", "/again.img").stdout == written.image1


def test_many_packs_and_index_files(tmp_path: Path) -> None:
    need_restic()
    repo = new_repo(tmp_path / "repo", pack_size_bytes=MiB, index_max_blobs=4)
    chunks = [random_bytes(300 << 10, i) for i in range(20)] + \
        [compressible_bytes(300 << 10, i) for i in range(20)]
    with repo.lock(recheck_delay_s=0.01):
        ids = [repo.save_blob(BlobType.DATA, c) for c in chunks]
        tree = repo.save_tree(Tree([Node.file("img", sum(map(len, chunks)), ids)]))
        repo.save_snapshot(Snapshot.new(tree, ["/img"]))
    repo.close()
    assert len(list((tmp_path / "repo" / "index").iterdir())) >= 8
    restic = Restic(tmp_path / "repo")
    assert "no errors were found" in restic.run("check", "--read-data").stdout.decode()
    assert restic.run("dump", "latest", "/img").stdout == b"".join(chunks)


def test_version_1_repository_from_blockera(tmp_path: Path) -> None:
    need_restic()
    repo = new_repo(tmp_path / "repo", version=1)
    chunks = image_chunks(seed=21)
    with repo.lock(recheck_delay_s=0.01):
        ids = [repo.save_blob(BlobType.DATA, c) for c in chunks]
        repo.save_snapshot(Snapshot.new(repo.save_tree(Tree([Node.file("v1.img", 6 * MiB, ids)])),
                                        ["/v1.img"]))
    repo.close()
    restic = Restic(tmp_path / "repo")
    assert json.loads(restic.run("cat", "config").stdout)["version"] == 1
    assert "no errors were found" in restic.run("check", "--read-data").stdout.decode()
    assert restic.run("dump", "latest", "/v1.img").stdout == b"".join(chunks)


def test_damage_found_by_both(written: Written, tmp_path: Path) -> None:
    root = _copy(written, tmp_path)
    repo = Repository.open(LocalBackend(root), PASSWORD)
    blob = repo.index.lookup(hash_id(written.image1_chunks[0]), BlobType.DATA)
    pack = root / "data" / blob.pack_id.hex()[:2] / blob.pack_id.hex()
    pack.chmod(0o600)
    data = bytearray(pack.read_bytes())
    data[blob.offset_bytes + 100] ^= 1
    pack.write_bytes(bytes(data))
    r = Restic(root).run("check", "--read-data", check=False)
    assert r.returncode != 0
    with pytest.raises(IntegrityError, match="MAC verification failed"):
        repo.load_blob(blob.blob_id)
    repo.close()


# -- blockera reads and continues what restic wrote ----------------------------------------

def _walk_trees(repo: Repository, tree_id: bytes, path: str = ""):
    raw = repo.load_blob(tree_id, BlobType.TREE)
    yield tree_id, raw
    for node in Tree.decode(raw, "t").nodes:
        if node.type == "dir" and node.subtree is not None:
            yield from _walk_trees(repo, node.subtree, f"{path}/{node.name}")


def _find(repo: Repository, tree_id: bytes, path: str) -> Node:
    """The node at `path`, wherever restic rooted the backup (the whole absolute path or its
    last component)."""
    parts = path.strip("/").split("/")
    for start in range(len(parts)):
        node, tree = None, tree_id
        for part in parts[start:]:
            node = repo.load_tree(tree).find(part) if tree is not None else None
            if node is None:
                break
            tree = node.subtree
        if node is not None:
            return node
    raise AssertionError(f"{path} not in the snapshot")


@pytest.mark.parametrize("version", ["2", "1"])
def test_blockera_reads_and_extends_a_restic_repository(tmp_path: Path, version: str) -> None:
    need_restic()
    src = tmp_path / "src"
    (src / "inner").mkdir(parents=True)
    content = compressible_bytes(3 * MiB, 5) + random_bytes(2 * MiB + 12345, 6) + bytes(MiB)
    (src / "inner" / "disk.img").write_bytes(content)
    (src / "note <&>.txt").write_text("hello")
    root = tmp_path / "repo"
    restic = Restic(root)
    restic.run("init", "--repository-version", version)
    restic.run("backup", str(src), "--tag", "from-restic")

    repo = Repository.open(LocalBackend(root), PASSWORD)
    assert repo.config.version == int(version)
    (snap,) = repo.list_snapshots()
    restic_snap = json.loads(restic.run("snapshots", "--json").stdout)[0]
    assert snap.id.hex() == restic_snap["id"] and snap.time.format() == restic_snap["time"]
    assert snap.paths == [str(src)] and snap.tags == ["from-restic"]
    # every tree re-encodes to restic's exact bytes
    trees = list(_walk_trees(repo, snap.tree))
    for tree_id, raw in trees:
        assert Tree.decode(raw, "t").encode() == raw
    disk = _find(repo, snap.tree, f"{src}/inner/disk.img")
    assert disk.size == len(content)
    assert b"".join(repo.load_blob(i) for i in disk.content) == content

    # a new snapshot from blockera reusing restic's blobs, with one new chunk
    with repo.lock(recheck_delay_s=0.01):
        extra = repo.save_blob(BlobType.DATA, b"appended by blockera")
        assert all(repo.has_blob(i, BlobType.DATA) for i in disk.content)
        tree = repo.save_tree(Tree([Node.file("disk.img", len(content) + 20,
                                              disk.content + [extra])]))
        new = repo.save_snapshot(Snapshot.new(tree, ["/disk.img"], parent=snap.id))
    repo.close()
    assert "no errors were found" in restic.run("check", "--read-data").stdout.decode()
    assert restic.run("dump", new.hex(), "/disk.img").stdout == content + b"appended by blockera"
    assert len(json.loads(restic.run("snapshots", "--json").stdout)) == 2


# -- locks between the two ----------------------------------------------------------------

def test_restic_prune_refuses_while_blockera_holds_a_lock(written: Written,
                                                           tmp_path: Path) -> None:
    root = _copy(written, tmp_path)
    restic = Restic(root)
    repo = Repository.open(LocalBackend(root), PASSWORD)
    with repo.lock(recheck_delay_s=0.01):
        r = restic.run("prune", check=False)
        assert r.returncode != 0
        assert b"repository is already locked by PID" in r.stderr
        # a non-exclusive restic operation runs alongside
        restic.run("backup", "--stdin", "--stdin-filename", "side.bin", input=b"side by side")
    assert restic.run("prune").returncode == 0
    repo.close()


def test_restic_refuses_while_blockera_holds_an_exclusive_lock(written: Written,
                                                               tmp_path: Path) -> None:
    root = _copy(written, tmp_path)
    repo = Repository.open(LocalBackend(root), PASSWORD)
    with repo.lock(exclusive=True, recheck_delay_s=0.01):
        r = Restic(root).run("backup", "--stdin", input=b"x", check=False)
        assert r.returncode != 0 and b"already locked exclusively" in r.stderr
    repo.close()


def test_blockera_exclusive_lock_fails_while_restic_holds_one(written: Written,
                                                              tmp_path: Path) -> None:
    root = _copy(written, tmp_path)
    before = {p.name for p in (root / "locks").iterdir()}
    # `restic backup --stdin` holds its (non-exclusive) lock until its input ends.
    proc = Restic(root).popen("backup", "--stdin", "--stdin-filename", "held.bin",
                              stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while {p.name for p in (root / "locks").iterdir()} == before:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "restic did not create its lock"
            time.sleep(0.05)
        repo = Repository.open(LocalBackend(root), PASSWORD)
        with pytest.raises(LockConflictError, match=f"non-exclusive lock of PID {proc.pid} "):
            repo.lock(exclusive=True, recheck_delay_s=0.01)
        assert {p.name for p in (root / "locks").iterdir()} - before != set()  # restic's only
        with repo.lock(recheck_delay_s=0.01):                 # shared locks coexist
            pass
        repo.close()
        proc.stdin.write(b"data that keeps restic busy")
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
    assert {p.name for p in (root / "locks").iterdir()} == before


def test_restic_unlock_judges_blockeras_lock_stale_and_blockera_notices(written: Written,
                                                                        tmp_path: Path) -> None:
    root = _copy(written, tmp_path)
    dead = subprocess.Popen(["true"])
    dead.wait()                                              # a PID that no longer runs
    repo = Repository.open(LocalBackend(root), PASSWORD)
    lock = RepositoryLock(repo, pid=dead.pid, recheck_delay_s=0.01, refresh_interval_s=3600)
    lock.acquire()
    restic = Restic(root)
    assert restic.run("prune", check=False).returncode != 0   # restic 0.14 waits for unlock
    restic.run("unlock")                                      # ... which finds it stale
    assert list((root / "locks").iterdir()) == []
    lock.refresh()
    with pytest.raises(LockLostError, match="removed by someone else"):
        lock.check()
    lock.release()
    repo.close()


def test_restic_unlock_leaves_a_live_blockera_lock_alone(written: Written,
                                                         tmp_path: Path) -> None:
    # restic probes the holder with SIGHUP: the holder must survive and keep its lock.
    root = _copy(written, tmp_path)
    holder = start_lock_holder(root)
    try:
        first = holder.stdout.readline().split()
        assert first[0] == "locked", holder.stderr.read()
        Restic(root).run("unlock")
        time.sleep(0.2)
        assert holder.poll() is None
        assert [p.name for p in (root / "locks").iterdir()] == [first[1]]
        assert Restic(root).run("prune", check=False).returncode != 0
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert holder.stdout.readline().split()[0] == "released"
        assert holder.wait(timeout=30) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert list((root / "locks").iterdir()) == []


def test_restic_reads_every_field_of_blockeras_lock(written: Written, tmp_path: Path) -> None:
    # restic's conflict message repeats our lock's fields back.
    root = _copy(written, tmp_path)
    repo = Repository.open(LocalBackend(root), PASSWORD)
    lock = RepositoryLock(repo, exclusive=True, recheck_delay_s=0.01, pid=4242,
                          clock_ns=lambda: GoTime.parse("2030-01-02T03:04:05.5Z").unix_ns)
    with lock:
        r = Restic(root).run("backup", "--stdin", input=b"x", check=False)
        expected = (f"repository is already locked exclusively by PID 4242 on "
                    f"{socket.gethostname()} by {current_username()} (UID {os.getuid()}, "
                    f"GID {os.getgid()})\nlock was created at 2030-01-02 03:04:05 ").encode()
        assert expected in r.stderr
        assert f"storage ID {lock.name[:8]}".encode() in r.stderr
    repo.close()
