"""Locking rules, staleness, refresh and loss (with fake clocks and PIDs)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from blockera.backup import (BlobType, FileType, GoTime, LockConflictError, LockLostError,
                             Repository, RepositoryError, remove_stale_locks)
from blockera.backup.ids import hash_id
from blockera.backup.counting import CountingBackend
from blockera.backup.local import LocalBackend
from blockera.backup.locks import (RECHECK_DELAY_S, LockRecord, RepositoryLock, is_stale,
                                   list_locks)

from .helpers import PASSWORD, new_repo, start_lock_holder

MIN_NS = 60 * 1_000_000_000
NOW = 1_800_000_000 * 1_000_000_000


def _lock(minutes_old: float, host: str = "here", pid: int = 100,
          exclusive: bool = False) -> LockRecord:
    return LockRecord(GoTime(int(NOW - minutes_old * MIN_NS)), exclusive, host, "u", pid)


@pytest.mark.parametrize("minutes_old, host, alive, stale", [
    (5, "here", True, False),       # young, same host, process alive
    (5, "here", False, True),       # same host, process gone
    (5, "elsewhere", False, False),  # other host: only age counts
    (29.9, "elsewhere", True, False),
    (30.1, "elsewhere", True, True),  # older than 30 minutes
    (30.1, "here", True, True),
])
def test_staleness_rules(minutes_old: float, host: str, alive: bool, stale: bool) -> None:
    asked: list[int] = []

    def pid_exists(pid: int) -> bool:
        asked.append(pid)
        return alive

    assert is_stale(_lock(minutes_old, host), now_ns=NOW, hostname="here",
                    pid_exists=pid_exists) is stale
    if host == "elsewhere":
        assert asked == []        # never probe PIDs of another host


def test_lock_file_json() -> None:
    rec = LockRecord(GoTime.parse("2015-06-27T12:18:51.759239612+02:00"), False, "kasimir",
                     "fd0", 13607, 1000, 100)
    assert rec.encode() == (b'{"time":"2015-06-27T12:18:51.759239612+02:00","exclusive":false,'
                            b'"hostname":"kasimir","username":"fd0","pid":13607,"uid":1000,'
                            b'"gid":100}')
    assert LockRecord.decode(rec.encode(), "l") == rec
    root = LockRecord(rec.time, True, "h", "root", 1)
    assert b"uid" not in root.encode() and b'"exclusive":true' in root.encode()


def _quick(repo: Repository, exclusive: bool = False, **kw: object) -> RepositoryLock:
    return RepositoryLock(repo, exclusive, recheck_delay_s=0.01, **kw)  # type: ignore[arg-type]


def test_exclusive_conflicts_with_everything(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo")
    with _quick(repo) as shared:
        with _quick(repo):                          # shared + shared is fine
            assert len(list_locks(repo)) == 2
        with pytest.raises(LockConflictError, match="non-exclusive lock of PID") as info:
            _quick(repo, exclusive=True).acquire()
        assert info.value.exit_code == 1
        assert shared.name is not None and len(list_locks(repo)) == 1
    assert list_locks(repo) == []
    with _quick(repo, exclusive=True):
        with pytest.raises(LockConflictError, match="locked by the exclusive lock"):
            _quick(repo).acquire()
        with pytest.raises(LockConflictError):
            _quick(repo, exclusive=True).acquire()
    assert list_locks(repo) == []


def test_race_is_caught_by_the_recheck(tmp_path: Path) -> None:
    # Another process creates an exclusive lock between our check and our re-check.
    repo = new_repo(tmp_path / "repo")
    intruder = LockRecord(GoTime.now(), True, "other-host", "u", 1)
    lock = RepositoryLock(repo, False, recheck_delay_s=0.3)
    timer = threading.Timer(0.1, lambda: repo.save_unpacked(FileType.LOCK, intruder.encode()))
    timer.start()
    with pytest.raises(LockConflictError, match="other-host"):
        lock.acquire()
    timer.join()
    assert [r.hostname for _, r in list_locks(repo)] == ["other-host"]   # ours was removed


class _LaggingListings(LocalBackend):
    lists_saves_at_once = False      # as on an S3 store


def test_the_second_look_waits_only_where_listings_lag(tmp_path: Path) -> None:
    local = new_repo(tmp_path / "local")
    assert RepositoryLock(local).recheck_delay_s == 0
    assert RepositoryLock(local, recheck_delay_s=0.5).recheck_delay_s == 0.5
    counted = Repository.open(CountingBackend(local.backend), PASSWORD)
    assert RepositoryLock(counted).recheck_delay_s == 0
    lagging = Repository.open(_LaggingListings(tmp_path / "local"), PASSWORD)
    assert RepositoryLock(lagging).recheck_delay_s == RECHECK_DELAY_S == 0.2


def test_a_lock_created_just_after_ours_is_caught_without_waiting(tmp_path: Path) -> None:
    """On a local repository the second look comes at once: an exclusive lock another process
    created right after ours (its first look missed ours) is in that look's listing."""
    repo = new_repo(tmp_path / "repo")
    intruder = LockRecord(GoTime.now(), True, "other-host", "u", 1)
    save = repo.save_unpacked

    def save_then_race(ftype: FileType, raw: bytes) -> str:
        name = save(ftype, raw)
        if ftype is FileType.LOCK and b"other-host" not in raw:
            save(FileType.LOCK, intruder.encode())
        return name

    repo.save_unpacked = save_then_race  # type: ignore[method-assign]
    lock = RepositoryLock(repo, False)
    assert lock.recheck_delay_s == 0
    with pytest.raises(LockConflictError, match="other-host"):
        lock.acquire()
    assert [r.hostname for _, r in list_locks(repo)] == ["other-host"]   # ours was removed


def test_stale_locks_conflict_until_removed(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo")
    dead = LockRecord(GoTime.now(), True, "here", "u", 99999)
    repo.save_unpacked(FileType.LOCK, dead.encode())
    lock = _quick(repo, hostname="here", pid_exists=lambda pid: pid != 99999)
    with pytest.raises(LockConflictError, match="That lock is stale"):
        lock.acquire()
    assert remove_stale_locks(repo, hostname="here", pid_exists=lambda pid: pid != 99999)
    with lock:
        pass


def test_refresh_replaces_the_file_with_a_newer_time(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo")
    now = [time.time_ns()]
    with _quick(repo, clock_ns=lambda: now[0]) as lock:
        first_name, first_time = lock.name, lock.record.time
        now[0] += 5 * MIN_NS
        lock.refresh()
        assert lock.name != first_name
        assert [name for name, _ in list_locks(repo)] == [lock.name]
        assert lock.record.time.unix_ns - first_time.unix_ns == 5 * MIN_NS
        lock.check()


def test_background_refresh_keeps_one_current_lock(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo")
    with RepositoryLock(repo, refresh_interval_s=0.05, recheck_delay_s=0.01) as lock:
        first = lock.name
        deadline = time.monotonic() + 10
        while lock.name == first and time.monotonic() < deadline:
            time.sleep(0.02)
        assert lock.name != first
        lock._stop.set()                                # hold still to look
        lock._thread.join()
        assert [name for name, _ in list_locks(repo)] == [lock.name]
        lock.check()
    assert list_locks(repo) == []


def test_a_removed_lock_is_lost(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo")
    with _quick(repo) as lock:
        repo.backend.remove(FileType.LOCK, lock.name)     # restic unlock --remove-all
        lock.refresh()
        with pytest.raises(LockLostError, match="removed by someone else"):
            lock.check()
        assert list_locks(repo) == []                    # no replacement was written


def test_a_lock_not_refreshed_in_time_is_lost(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo")
    now = [time.time_ns()]
    with _quick(repo, clock_ns=lambda: now[0]) as lock:
        now[0] += 22 * MIN_NS
        lock.check()
        now[0] += 1 * MIN_NS                            # 23 > 22.5 minutes since refresh
        with pytest.raises(LockLostError, match="last refreshed 23.0 minutes ago"):
            lock.check()
        lock.refresh()                                  # too late: lost stays lost
        with pytest.raises(LockLostError):
            lock.check()


def test_writes_need_a_live_lock(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo", threads=0)
    with pytest.raises(RepositoryError, match="writing needs a lock"):
        repo.save_blob(BlobType.DATA, b"x")
    now = [time.time_ns()]
    lock = repo.lock(clock_ns=lambda: now[0], recheck_delay_s=0.01)
    repo.save_blob(BlobType.DATA, b"first")
    repo.flush()
    now[0] += 31 * MIN_NS
    packs_before = list(repo.backend.list(FileType.PACK))
    with pytest.raises(LockLostError):
        repo.save_blob(BlobType.DATA, b"second")
    with pytest.raises(LockLostError):
        repo.flush()
    assert list(repo.backend.list(FileType.PACK)) == packs_before
    lock.release()
    repo.close()


def test_an_unreadable_lock_blocks_until_removed(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo")
    junk = repo.key.encrypt(b"\x02not zstd")
    repo.backend.save(FileType.LOCK, hash_id(junk).hex(), junk)
    with pytest.raises(LockConflictError, match="restic unlock --remove-all"):
        _quick(repo).acquire()
    assert remove_stale_locks(repo) == []        # skipped, not removed, by the stale cleanup
    assert len(list(repo.backend.list(FileType.LOCK))) == 1


def test_a_lock_holder_survives_restics_liveness_probe(tmp_path: Path) -> None:
    # restic probes a lock's process with SIGHUP; Python's default would end it.
    new_repo(tmp_path / "repo").close()
    holder = start_lock_holder(tmp_path / "repo")
    try:
        first = holder.stdout.readline().split()
        assert first[0] == "locked", holder.stderr.read()
        os.kill(holder.pid, signal.SIGHUP)
        time.sleep(0.2)
        assert holder.poll() is None
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert holder.stdout.readline().split() == ["released", "True"]  # default restored
        assert holder.wait(timeout=30) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_a_deferred_recheck_finds_a_racing_exclusive_lock_before_any_write(
        tmp_path: Path) -> None:
    """A backup's recheck waits for its first write: an exclusive lock taken in the moment
    after ours (a racing prune) stops the backup there, before any file is written, and
    our lock is gone."""
    repo = new_repo(tmp_path / "repo", threads=0)
    before_lock = time.monotonic()          # the moment is counted from the lock's creation
    lock = repo.lock(defer_recheck=True, recheck_delay_s=0.3)
    repo.save_blob(BlobType.DATA, b"in memory only")       # no file yet: no recheck
    assert lock._recheck_at is not None                    # (so no wait either)
    racing = LockRecord(GoTime.now(), True, "elsewhere", "u", 4242)
    racing_name = repo.save_unpacked(FileType.LOCK, racing.encode())
    with pytest.raises(LockConflictError, match="exclusive"):
        repo.flush()
    assert time.monotonic() - before_lock >= 0.3           # the full moment was waited
    assert list(repo.backend.list(FileType.PACK)) == []
    assert [name for name, _ in list_locks(repo)] == [racing_name]
    lock.release()
    repo.close()


def test_a_deferred_recheck_that_passes_lets_writes_through(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo", threads=0)
    with repo.lock(defer_recheck=True, recheck_delay_s=0.05) as lock:
        repo.save_blob(BlobType.DATA, b"data")
        repo.flush()
        assert len(list(repo.backend.list(FileType.PACK))) == 1
        assert lock._recheck_at is None and lock.held
    assert list_locks(repo) == []
    repo.close()
