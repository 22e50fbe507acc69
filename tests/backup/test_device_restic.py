"""The real restic (0.14) on device backups blockera made, and blockera on what restic made:
check, snapshots, ls, dump and restore of every snapshot (full, and incrementals from era
metadata, a COW store and a JSON change list); restic's forget --prune; blockera's prune and
forget --prune leaving a repository restic accepts; the same retention decisions as restic's
forget; restic's prune refused while a blockera backup runs."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from blockera.backup import GoTime, LocalBackend, Node, Repository, Snapshot, Tree
from blockera.backup.device_backup import BackupOptions, run_backup
from blockera.backup.ids import BlobType
from blockera.blockdev import BlockDevice, FileDevice
from blockera.engine.userspace import Engine

from .helpers import PASSWORD, Restic, need_restic, new_repo
from .jobs import KiB, MiB, Cli, image_bytes, make_repo, overwrite, snapshot_image

SIZE = 6 * MiB


class Made:
    """A repository with four snapshots of one image: full, then incrementals from a JSON
    change list, from era metadata and from a COW store, all through the command line."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.repo = make_repo(root / "repo")
        self.cli = Cli(self.repo, root / "locks")
        disk = root / "disk.img"
        disk.write_bytes(image_bytes(SIZE, seed=31))
        self.disk = disk
        self.images: list[tuple[str, bytes]] = []
        meta = root / "meta.img"
        with open(meta, "wb") as f:
            f.truncate(4 * MiB)
        engine = Engine()
        try:
            engine.create("era", f"0 {SIZE // 512} era {meta} {disk} 128")
            engine.message("era", 0, ["take_metadata_snap"])
            self._keep(self.cli.backup(disk, "--chunk-size", "128K", "--era-metadata",
                                       str(meta), "--metadata-snapshot", "--full"))
            engine.message("era", 0, ["drop_metadata_snap"])
            # 1. a JSON change list (written outside the era device: era does not see it,
            #    the list does)
            engine.suspend("era")
            overwrite(disk, [(300 * KiB, 8 * KiB)], seed=32)
            engine.resume("era")
            (root / "changed.json").write_text(json.dumps(
                {"chunk_size": 16, "valid": True, "ranges": [[37, 39]]}))
            self._keep(self.cli.backup(disk, "--changed", str(root / "changed.json")))
            # 2. era metadata (writes through the era device)
            engine.device("era").write(2 * MiB, random.Random(33).randbytes(200 * KiB))
            engine.device("era").write(SIZE - 4096, b"\x07" * 4096)
            engine.settle()
            engine.message("era", 0, ["take_metadata_snap"])
            self._keep(self.cli.backup(disk, "--era-metadata", str(meta),
                                       "--metadata-snapshot", "--since", "2"))
            engine.message("era", 0, ["drop_metadata_snap"])
            engine.remove("era")
            # 3. a COW store of a snapshot of the image
            cow = root / "cow.img"
            with open(cow, "wb") as f:
                f.truncate(2 * MiB)
            engine.create("real", f"0 {SIZE // 512} linear {disk} 0")
            engine.create("origin", f"0 {SIZE // 512} snapshot-origin /dev/mapper/real")
            engine.suspend("origin")
            engine.create("snap", f"0 {SIZE // 512} snapshot /dev/mapper/real {cow} P 8")
            engine.resume("origin")
            engine.device("origin").write(5 * MiB + 512, random.Random(34).randbytes(3 * 4096))
            engine.settle()
            self._keep(self.cli.backup(disk, "--cow", str(cow)))
        finally:
            engine.shutdown()
        assert [self.cli.json("snapshots")[i]["made_from"] for i in range(4)] == \
            ["full", "changed", "era", "cow"]

    def _keep(self, summary: dict) -> None:
        self.images.append((summary["snapshot_id"], self.disk.read_bytes()))

    def copy(self, target: Path) -> Path:
        shutil.copytree(self.repo, target)
        return target


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Made:
    need_restic()
    return Made(tmp_path_factory.mktemp("device-repo"))


def test_restic_checks_lists_and_dumps_every_snapshot(made: Made, tmp_path: Path) -> None:
    restic = Restic(made.repo)
    assert "no errors were found" in restic.run("check", "--read-data").stdout.decode()
    listed = json.loads(restic.run("snapshots", "--json").stdout)
    assert [s["id"] for s in sorted(listed, key=lambda s: s["time"])] == \
        [sid for sid, _ in made.images]
    by_id = {s["id"]: s for s in listed}
    for (sid, _), (parent, _) in zip(made.images[1:], made.images):
        assert by_id[sid]["parent"] == parent
        assert by_id[sid]["paths"] == [str(made.disk)]
        assert "blockera" in by_id[sid]["tags"] and f"blockera:size={SIZE}" in by_id[sid]["tags"]
    nodes = [json.loads(line) for line in
             restic.run("ls", "--json", made.images[-1][0]).stdout.splitlines()]
    files = [n for n in nodes if n.get("struct_type") == "node"]
    assert [(n["path"], n["type"], n["size"]) for n in files] == [("/disk.img", "file", SIZE)]
    for sid, image in made.images:
        assert restic.run("dump", sid, "/disk.img").stdout == image
    restic.run("restore", made.images[2][0], "--target", str(tmp_path / "out"))
    assert (tmp_path / "out" / "disk.img").read_bytes() == made.images[2][1]


def test_restic_forget_prune_then_blockera_restores_the_rest(made: Made, tmp_path: Path) -> None:
    root = made.copy(tmp_path / "repo")
    restic = Restic(root)
    restic.run("forget", "--keep-last", "2", "--prune", "--max-unused", "0")
    assert "no errors were found" in restic.run("check", "--read-data").stdout.decode()
    for sid, image in made.images[2:]:
        assert snapshot_image(root, sid) == image
    cli = Cli(root, tmp_path / "locks")
    assert [s["id"] for s in cli.json("snapshots")] == [sid for sid, _ in made.images[2:]]
    # and an incremental continues on the pruned repository
    overwrite(made.disk, [], seed=0)
    r = cli.json("backup", str(made.disk), "--changed", "-",
                 input=b'{"chunk_size": 8, "valid": true, "ranges": []}')
    assert r["chunks_read"] == 0 and r["parent_id"] == made.images[-1][0]
    assert "no errors were found" in restic.run("check").stdout.decode()


@pytest.mark.parametrize("command", [["prune", "--max-unused", "0"],
                                     ["forget", "--keep-last", "2", "--prune"]])
def test_blockera_prune_leaves_what_restic_accepts(made: Made, tmp_path: Path,
                                                   command: list[str]) -> None:
    root = made.copy(tmp_path / "repo")
    cli = Cli(root, tmp_path / "locks")
    restic = Restic(root)
    if command[0] == "prune":
        # forget two snapshots with restic, then prune with blockera
        restic.run("forget", made.images[0][0], made.images[2][0])
        keep = [made.images[1], made.images[3]]
        result = cli.json(*command)
    else:
        keep = made.images[2:]
        result = cli.json(*command, "--max-unused", "0")["prune"]
    assert result["packs_repacked"] + result["packs_removed"] > 0
    assert result["index_files_written"] >= 1
    out = restic.run("check", "--read-data").stdout.decode()
    assert "no errors were found" in out and "additional files" not in out
    assert sorted(s["id"] for s in json.loads(restic.run("snapshots", "--json").stdout)) == \
        sorted(sid for sid, _ in keep)
    for sid, image in keep:
        assert restic.run("dump", sid, "/disk.img").stdout == image
        assert snapshot_image(root, sid) == image
    assert cli.json("check", "--read-data")["ok"]
    again = cli.json("prune", "--max-unused", "0")
    assert again["packs_repacked"] == again["packs_removed"] == again["packs_deleted"] == 0


def test_blockera_restores_a_file_restic_backed_up(tmp_path: Path) -> None:
    need_restic()
    root = tmp_path / "repo"
    restic = Restic(root)
    restic.run("init")
    src = tmp_path / "src"
    src.mkdir()
    image = image_bytes(5 * MiB, seed=40) + bytes(3 * MiB) + image_bytes(MiB + 123, seed=41)
    (src / "vm.img").write_bytes(image)
    restic.run("backup", str(src / "vm.img"))
    cli = Cli(root, tmp_path / "locks")
    out = tmp_path / "restored.img"
    r = cli.json("restore", "latest", str(out))
    assert out.read_bytes() == image and r["size_bytes"] == len(image)
    assert cli.run("dump", "latest").stdout == image
    listed = cli.json("snapshots")
    assert listed[0]["device"] is False and listed[0]["paths"] == [str(src / "vm.img")]
    # a blockera backup into restic's repository, then an incremental: restic accepts both
    disk = tmp_path / "disk.img"
    disk.write_bytes(image_bytes(3 * MiB, seed=42))
    cli.backup(disk)
    overwrite(disk, [(MiB, 10)], seed=43)
    cli.json("backup", str(disk), "--changed", "-",
             input=b'{"chunk_size": 8, "valid": true, "ranges": [[256, 257]]}')
    assert "no errors were found" in restic.run("check", "--read-data").stdout.decode()
    assert restic.run("dump", "latest", "/disk.img").stdout == disk.read_bytes()


class _Gate(BlockDevice):
    """A file whose first read runs `hook` (while the backup holds its locks)."""

    def __init__(self, path: Path, hook) -> None:  # type: ignore[no-untyped-def]
        self.inner = FileDevice(path, writable=False)
        self.name = str(path)
        self.hook = hook
        self.fired = False

    @property
    def size_bytes(self) -> int:
        return self.inner.size_bytes

    def read(self, offset_bytes: int, length_bytes: int) -> bytes:
        if not self.fired:
            self.fired = True
            self.hook()
        return self.inner.read(offset_bytes, length_bytes)

    def write(self, offset_bytes: int, data: bytes | bytearray | memoryview) -> None:
        raise AssertionError("read-only")

    def flush(self) -> None:
        pass


def test_restic_prune_and_a_second_backup_wait_for_a_running_backup(tmp_path: Path,
                                                                    monkeypatch) -> None:
    need_restic()
    monkeypatch.setenv("BLOCKERA_LOCK_DIR", str(tmp_path / "locks"))
    root = make_repo(tmp_path / "repo")
    disk = tmp_path / "disk.img"
    image = image_bytes(4 * MiB, seed=50)
    disk.write_bytes(image)
    cli = Cli(root, tmp_path / "locks")
    seen: dict[str, subprocess.CompletedProcess] = {}

    def while_running() -> None:
        seen["prune"] = Restic(root).run("prune", check=False)
        seen["second"] = cli.run("backup", str(disk), check=False)

    repo = Repository.open(LocalBackend(root), PASSWORD)
    try:
        summary = run_backup(repo, _Gate(disk, while_running),
                             BackupOptions(source=str(disk), chunk_bytes=MiB))
    finally:
        repo.close()
    assert seen["prune"].returncode != 0
    assert b"repository is already locked by PID" in seen["prune"].stderr
    assert seen["second"].returncode == 1
    assert b"another backup of this source is running" in seen["second"].stderr
    assert snapshot_image(root, summary.snapshot_id) == image
    assert Restic(root).run("prune").returncode == 0
    assert "no errors were found" in Restic(root).run("check").stdout.decode()


def _policy_repo(root: Path) -> list[str]:
    """Snapshots at chosen times (two hosts, two paths, two time zones) over one tree."""
    repo = new_repo(root)
    rnd = random.Random(60)
    times = []
    base = GoTime.parse("2025-11-20T23:30:00Z").unix_ns
    for _ in range(45):
        times.append(base + rnd.randrange(0, 70 * 24 * 3600) * 10**9)
    ids = []
    with repo.lock(recheck_delay_s=0.01):
        blob = repo.save_blob(BlobType.DATA, b"data")
        tree = repo.save_tree(Tree([Node.file("vda", 4, [blob])]))
        for k, t in enumerate(times):
            offset = 0 if k % 3 else 2 * 3600 if k % 2 else -5 * 3600
            snap = Snapshot.new(tree, ["/dev/vda" if k % 4 else "/dev/vdb"],
                                hostname="alpha" if k % 5 else "beta", time=GoTime(t, offset))
            ids.append(repo.save_snapshot(snap).hex())
    repo.close()
    return ids


@pytest.mark.parametrize("policy", [
    ["--keep-last", "3"],
    ["--keep-daily", "4", "--keep-weekly", "3"],
    ["--keep-hourly", "5", "--keep-monthly", "2", "--keep-yearly", "1"],
    ["--keep-last", "1", "--keep-daily", "9", "--keep-weekly", "5", "--keep-monthly", "3"],
])
def test_forget_decides_as_restic_does(tmp_path: Path, policy: list[str]) -> None:
    need_restic()
    root = tmp_path / "repo"
    _policy_repo(root)
    restic_groups = json.loads(Restic(root).run("forget", "--dry-run", "--json",
                                                *policy).stdout)
    restic_removed = {s["id"] for g in restic_groups for s in g["remove"] or []}
    restic_kept = {s["id"] for g in restic_groups for s in g["keep"] or []}
    ours = Cli(root, tmp_path / "locks").json("forget", "--dry-run", *policy)
    assert set(ours["removed"]) == restic_removed
    assert {s["id"] for g in ours["groups"] for s in g["keep"]} == restic_kept
    assert len(ours["groups"]) == len(restic_groups) == 4
    assert restic_removed and restic_kept


def test_forget_removes_and_restic_agrees(tmp_path: Path) -> None:
    need_restic()
    root = tmp_path / "repo"
    ids = _policy_repo(root)
    cli = Cli(root, tmp_path / "locks")
    result = cli.json("forget", "--keep-weekly", "2", "--host", "alpha")
    remaining = {s["id"] for s in json.loads(Restic(root).run("snapshots", "--json").stdout)}
    assert remaining == set(ids) - set(result["removed"])
    assert all(g["host"] == "alpha" for g in result["groups"])
    r = cli.run("forget", check=False)
    assert r.returncode == 2 and b"no policy" in r.stderr
    named = sorted(remaining)[:2]
    gone = cli.json("forget", named[0][:10], named[1])["removed"]
    assert sorted(gone) == named
    left = {s["id"] for s in json.loads(Restic(root).run("snapshots", "--json").stdout)}
    assert left == remaining - set(named)
