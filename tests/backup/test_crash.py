"""Power cuts during a backup and during forget + prune.

Every file operation of the repository (a save: written to a temporary name, synced, renamed,
directory synced; a remove) is logged in the order it completed. The repository after a power
cut at any point is the state before the operation plus the operations completed, and, for a
save in flight, its temporary file left behind whole but not renamed, or torn: a file saved
but not yet renamed is lost. For every such state (every completed-operation boundary, and
the in-flight states of a sample covering every kind of file): restic check passes after the
stale lock is removed (as `restic unlock` would after a reboot), blockera check passes, every
snapshot listed restores exactly, and a half-written snapshot is never listed. From some
states a new backup then runs and restic still accepts the repository.
"""

from __future__ import annotations

import random
import shutil
import threading
from pathlib import Path

from blockera.backup import LocalBackend, Repository
from blockera.backup.backend import Buffer, FileType
from blockera.backup.check import check_repository
from blockera.backup.device_backup import BackupOptions, JsonSource, run_backup
from blockera.backup.forget import remove_snapshots
from blockera.backup.prune import run_prune
from blockera.blockdev import FileDevice

from .helpers import PASSWORD, Restic, need_restic
from .jobs import KiB, MiB, image_bytes, make_repo, overwrite, snapshot_image

SMALL_PACKS = {"pack_size_bytes": 256 * KiB, "index_max_blobs": 6}


class RecordingBackend(LocalBackend):
    """A local backend that logs every completed save (with its bytes) and remove."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.log: list[tuple[str, FileType, str, bytes]] = []
        self._mutex = threading.Lock()

    def save(self, ftype: FileType, name: str, data: Buffer) -> None:
        super().save(ftype, name, data)
        with self._mutex:
            self.log.append(("save", ftype, name, bytes(data)))

    def remove(self, ftype: FileType, name: str) -> None:
        super().remove(ftype, name)
        with self._mutex:
            self.log.append(("remove", ftype, name, b""))


def _path(root: Path, ftype: FileType, name: str) -> Path:
    return LocalBackend(root)._file(ftype, name)


def replay(initial: Path, log: list, k: int, target: Path, in_flight: str | None = None) -> None:
    """The repository after the first `k` operations, plus the (k+1)-th save's temporary file
    left whole ("unrenamed") or torn."""
    shutil.copytree(initial, target)
    for kind, ftype, name, data in log[:k]:
        path = _path(target, ftype, name)
        if kind == "save":
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists():
                path.chmod(0o600)
            path.write_bytes(data)
            path.chmod(0o400)
        else:
            path.unlink()
    if in_flight is not None:
        kind, ftype, name, data = log[k]
        assert kind == "save"
        path = _path(target, ftype, name)
        tmp = path.parent / f"{path.name}-tmp-0123456789ab"
        tmp.write_bytes(data if in_flight == "unrenamed" else data[:len(data) // 3])


def _states(log: list, seed: int) -> list[tuple[int, str | None, bool]]:
    """(operations completed, in-flight form, run restic check): every operation boundary;
    in-flight saves for a sample that covers each file type in both forms, first and last
    saves of each type included. restic checks every in-flight state and every boundary
    where the kind of operation changes (plus every third), blockera all of them."""
    boundaries = []
    for k in range(len(log) + 1):
        before = log[k - 1][:2] if k else None
        after = log[k][:2] if k < len(log) else None
        boundaries.append((k, None, before != after or k % 3 == 0 or k in (0, len(log))))
    saves = [k for k, op in enumerate(log) if op[0] == "save"]
    chosen: set[tuple[int, str]] = set()
    by_type: dict[FileType, list[int]] = {}
    for k in saves:
        by_type.setdefault(log[k][1], []).append(k)
    for ks in by_type.values():
        chosen |= {(ks[0], "torn"), (ks[-1], "unrenamed"), (ks[0], "unrenamed"),
                   (ks[-1], "torn")}
    rnd = random.Random(seed)
    chosen |= {(k, rnd.choice(("torn", "unrenamed"))) for k in rnd.sample(saves, min(4, len(saves)))}
    return boundaries + [(k, form, True) for k, form in sorted(chosen)]


def _verify(state: Path, images: dict[str, bytes], restic: bool) -> set[str]:
    """restic check, blockera check, and every listed snapshot restores exactly; returns the
    snapshots listed."""
    for lock in (state / "locks").iterdir():      # the crashed process's lock: restic unlock
        lock.chmod(0o600)
        lock.unlink()
    if restic:
        out = Restic(state).run("check").stdout.decode()
        assert "no errors were found" in out
    repo = Repository.open(LocalBackend(state), PASSWORD)
    try:
        listed = {s.id.hex() for s in repo.list_snapshots() if s.id}
        repo.load_index()
        report = check_repository(repo)
        assert report.ok, (report.errors, report.damage)
    finally:
        repo.close()
    assert listed <= set(images), "a snapshot that was never completed is listed"
    for sid in listed:
        assert snapshot_image(state, sid) == images[sid]
    return listed


def test_power_cut_at_every_write_of_a_backup(tmp_path: Path, monkeypatch) -> None:
    need_restic()
    monkeypatch.setenv("BLOCKERA_LOCK_DIR", str(tmp_path / "locks"))
    root = make_repo(tmp_path / "repo")
    disk = tmp_path / "disk.img"
    disk.write_bytes(image_bytes(3 * MiB, seed=80))
    images: dict[str, bytes] = {}
    with Repo.open(LocalBackend(root), PASSWORD, **SMALL_PACKS) as repo:
        s = run_backup(repo, FileDevice(disk, writable=False),
                       BackupOptions(source=str(disk), chunk_bytes=64 * KiB))
        images[s.snapshot_id] = disk.read_bytes()
    initial = tmp_path / "initial"
    shutil.copytree(root, initial)
    overwrite(disk, [(100 * KiB, 300 * KiB), (2 * MiB, 70 * KiB)], seed=81)
    changed = (b'{"chunk_size": 128, "valid": true, "ranges": [[1, 7], [32, 35]]}')
    backend = RecordingBackend(root)
    with Repo.open(backend, PASSWORD, **SMALL_PACKS) as repo:
        s = run_backup(repo, FileDevice(disk, writable=False),
                       BackupOptions(source=str(disk), changes=JsonSource(changed, "c")))
        images[s.snapshot_id] = disk.read_bytes()
    kinds = {(op[0], op[1]) for op in backend.log}
    assert kinds >= {("save", FileType.PACK), ("save", FileType.INDEX),
                     ("save", FileType.SNAPSHOT), ("save", FileType.LOCK),
                     ("remove", FileType.LOCK)}
    assert sum(op[1] is FileType.INDEX for op in backend.log) >= 2
    states = _states(backend.log, seed=1)
    seen_new = 0
    for n, (k, in_flight, with_restic) in enumerate(states):
        state = tmp_path / f"state-{n}"
        replay(initial, backend.log, k, state, in_flight)
        listed = _verify(state, images, restic=with_restic)
        seen_new += s.snapshot_id in listed
        if n % 7 == 3:           # carry on after the crash
            with Repo.open(LocalBackend(state), PASSWORD) as repo:
                monkeypatch.setenv("BLOCKERA_LOCK_DIR", str(tmp_path / f"locks-{n}"))
                again = run_backup(repo, FileDevice(disk, writable=False),
                                   BackupOptions(source=str(disk)))
            assert snapshot_image(state, again.snapshot_id) == disk.read_bytes()
            assert "no errors were found" in Restic(state).run("check").stdout.decode()
        shutil.rmtree(state)
    assert 0 < seen_new < len(states)
    print(f"backup: {len(backend.log)} operations, {len(states)} power-cut states checked, "
          f"{sum(r for *_, r in states)} with restic check")


def test_power_cut_at_every_write_of_forget_and_prune(tmp_path: Path, monkeypatch) -> None:
    need_restic()
    monkeypatch.setenv("BLOCKERA_LOCK_DIR", str(tmp_path / "locks"))
    root = make_repo(tmp_path / "repo")
    disk = tmp_path / "disk.img"
    disk.write_bytes(image_bytes(3 * MiB, seed=90))
    images: dict[str, bytes] = {}
    # blobs stored one after another (no worker threads): which packs mix blobs the forgotten
    # snapshot alone used with others, and so must be repacked, does not depend on timing
    with Repo.open(LocalBackend(root), PASSWORD, threads=0, **SMALL_PACKS) as repo:
        for round_ in range(3):
            s = run_backup(repo, FileDevice(disk, writable=False),
                           BackupOptions(source=str(disk), chunk_bytes=64 * KiB))
            images[s.snapshot_id] = disk.read_bytes()
            overwrite(disk, [(round_ * 700 * KiB, 400 * KiB)], seed=91 + round_)
    initial = tmp_path / "initial"
    shutil.copytree(root, initial)
    backend = RecordingBackend(root)
    with Repo.open(backend, PASSWORD, **SMALL_PACKS) as repo:
        with repo.lock(exclusive=True) as lock:
            first = repo.list_snapshots()[0]
            remove_snapshots(repo, [first])
            result = run_prune(repo, max_unused="0", check_lock=lock.check)
    assert result.plan.repack and result.plan.remove
    kinds = {(op[0], op[1]) for op in backend.log}
    assert kinds >= {("save", FileType.PACK), ("save", FileType.INDEX),
                     ("remove", FileType.INDEX), ("remove", FileType.PACK),
                     ("remove", FileType.SNAPSHOT), ("save", FileType.LOCK)}
    states = _states(backend.log, seed=2)
    for n, (k, in_flight, with_restic) in enumerate(states):
        state = tmp_path / f"state-{n}"
        replay(initial, backend.log, k, state, in_flight)
        listed = _verify(state, images, restic=with_restic)
        assert listed >= set(images) - {first.id.hex()}
        if n % 9 == 4:           # a prune after the crash finishes the job
            with Repo.open(LocalBackend(state), PASSWORD) as repo:
                with repo.lock(exclusive=True) as lock:
                    run_prune(repo, max_unused="0", check_lock=lock.check)
            out = Restic(state).run("check", "--read-data").stdout.decode()
            assert "no errors were found" in out and "additional files" not in out
        shutil.rmtree(state)
    print(f"prune: {len(backend.log)} operations, {len(states)} power-cut states checked, "
          f"{sum(r for *_, r in states)} with restic check")


class Repo(Repository):
    """Locks re-check after 10 ms instead of restic's 200 (nothing races in these tests)."""

    def lock(self, exclusive: bool = False, **options: object):  # type: ignore[override]
        options.setdefault("recheck_delay_s", 0.01)
        return super().lock(exclusive, **options)
