"""Repository locks (docs/backup-repository.md §10).

A lock is an unpacked file `locks/<id>` (encrypted, `0x02 || zstd(JSON)` in version 2):

    {"time":"…","exclusive":false,"hostname":"…","username":"…","pid":1234,"uid":0,"gid":0}

(`uid` and `gid` left out when 0). The rules are restic's:

* any number of non-exclusive locks may coexist; an exclusive lock conflicts with every other
  lock, so taking one fails if any lock exists, and taking any lock fails if an exclusive one
  exists;
* a lock is created only after checking the others, and the others are checked again after
  creating it, so of two processes racing at least one notices; it removes its lock. restic
  waits 200 ms before that second look, for stores whose listings lag their writes; blockera
  waits as long on such a backend, and not at all where every listing begun after a save
  includes the file (`Backend.lists_saves_at_once`, a local directory): there, if A created
  its lock first, B's second look (after B's creation) lists A's, whatever B's wait (restic's
  200 ms included). A backup defers that second look to its first write
  (`acquire(defer_recheck=True)`): it loads the index and reads its source meanwhile, and
  writes nothing before the check passed;
* a lock is stale when its time is more than 30 minutes old, or when it was made on this host
  by a process that no longer exists. Stale locks still conflict (restic keeps them until
  `restic unlock` removes them: `remove_stale_locks` here); the error says they are stale;
* a holder refreshes its lock every 5 minutes (a new file with a new time, then the old file is
  removed). If its lock vanished (someone ran `unlock --remove-all`) or could not be refreshed
  for 22.5 minutes (30 minus one and a half refresh intervals, a margin for clock drift), the
  lock is lost: `check()` raises `LockLostError` and every write of the repository stops, since a
  prune elsewhere may already be deleting packs this process has not indexed yet.

restic decides whether a lock's process is alive by sending it SIGHUP (and ignores SIGHUP
itself). Python's default for SIGHUP is to terminate, so while a lock is held this module
installs a handler that ignores it (in the main thread, when SIGHUP still has its default
disposition; restored on release): otherwise `restic unlock` on the same host would kill the
backup that holds the lock.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from blockera.backup import gojson
from blockera.backup.backend import Backend, FileType
from blockera.backup.errors import (BackendError, BackendNotFoundError, IntegrityError,
                                    LockConflictError, LockLostError, RepositoryFormatError)
from blockera.backup.gojson import GoTime
from blockera.backup.ids import is_id_hex
from blockera.backup.keys import current_username

log = logging.getLogger(__name__)

STALE_AFTER_S = 30 * 60
REFRESH_INTERVAL_S = 5 * 60
REFRESHABILITY_S = STALE_AFTER_S - REFRESH_INTERVAL_S * 3 / 2
RECHECK_DELAY_S = 0.2
_NS = 1_000_000_000


@dataclass(frozen=True)
class LockRecord:
    time: GoTime
    exclusive: bool
    hostname: str
    username: str
    pid: int
    uid: int = 0
    gid: int = 0

    def encode(self) -> bytes:
        f = [("time", self.time.json()), ("exclusive", gojson.boolean(self.exclusive)),
             ("hostname", gojson.string(self.hostname)),
             ("username", gojson.string(self.username)), ("pid", str(self.pid))]
        if self.uid:
            f.append(("uid", str(self.uid)))
        if self.gid:
            f.append(("gid", str(self.gid)))
        return gojson.obj(f).encode("utf-8")

    @classmethod
    def decode(cls, raw: bytes, what: str) -> "LockRecord":
        try:
            doc = json.loads(raw)
            return cls(time=GoTime.parse(doc["time"]), exclusive=bool(doc.get("exclusive")),
                       hostname=doc.get("hostname") or "", username=doc.get("username") or "",
                       pid=int(doc.get("pid") or 0), uid=int(doc.get("uid") or 0),
                       gid=int(doc.get("gid") or 0))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise RepositoryFormatError(f"{what}: not a valid lock ({exc})") from None

    def describe(self, now_ns: int) -> str:
        age_s = max(0, (now_ns - self.time.unix_ns) // _NS)
        kind = "exclusive" if self.exclusive else "non-exclusive"
        return (f"{kind} lock of PID {self.pid} on {self.hostname} by {self.username} "
                f"(UID {self.uid}, GID {self.gid}), created {self.time.format()} "
                f"({age_s // 60} min {age_s % 60} s ago)")


def process_exists(pid: int) -> bool:
    """Is there a process with this PID on this host?"""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale(lock: LockRecord, *, now_ns: int, hostname: str,
             pid_exists: Callable[[int], bool] = process_exists,
             stale_after_s: float = STALE_AFTER_S) -> bool:
    """restic's staleness rule: older than 30 minutes, or made on this host by a process that
    is gone. A lock from another host is only ever stale by age."""
    if now_ns - lock.time.unix_ns > stale_after_s * _NS:
        return True
    if lock.hostname != hostname:
        return False
    return not pid_exists(lock.pid)


def _ignore_sighup(signum: int, frame: object) -> None:
    """restic's liveness probe: being asked is the answer."""


class _SighupGuard:
    """Ignore SIGHUP while at least one lock is held in this process."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._holders = 0
        self._installed = False

    def enter(self) -> None:
        with self._mutex:
            self._holders += 1
            if self._installed or signal.getsignal(signal.SIGHUP) != signal.SIG_DFL:
                return  # already ignored, or the program handles SIGHUP itself
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGHUP, _ignore_sighup)
                self._installed = True
            else:
                log.warning("a repository lock is held outside the main thread with SIGHUP at "
                            "its default: `restic unlock` on this host would end this process "
                            "(have the program ignore SIGHUP)")

    def leave(self) -> None:
        with self._mutex:
            self._holders -= 1
            if (self._holders == 0 and self._installed
                    and threading.current_thread() is threading.main_thread()):
                if signal.getsignal(signal.SIGHUP) is _ignore_sighup:
                    signal.signal(signal.SIGHUP, signal.SIG_DFL)
                self._installed = False


_sighup_guard = _SighupGuard()


class LockFiles(Protocol):
    """What a lock needs from the repository: encrypted unpacked files and the backend."""

    backend: Backend

    def save_unpacked(self, ftype: FileType, json_bytes: bytes) -> str: ...

    def load_unpacked(self, ftype: FileType, name: str) -> bytes: ...


def list_locks(repo: LockFiles, *, exclude: set[str] | frozenset[str] = frozenset(),
               skip_invalid: bool = False) -> list[tuple[str, LockRecord]]:
    """Every lock. A lock that disappears while being read is skipped (its holder just
    refreshed or released it). One that cannot be decrypted or parsed is skipped with
    `skip_invalid`, else it is a `LockConflictError`: whether it still protects something
    cannot be known."""
    out = []
    for fi in repo.backend.list(FileType.LOCK):
        if not is_id_hex(fi.name) or fi.name in exclude:
            continue
        what = f"lock {fi.name[:8]} in {repo.backend.location}"
        try:
            out.append((fi.name, LockRecord.decode(repo.load_unpacked(FileType.LOCK, fi.name),
                                                   what)))
        except BackendNotFoundError:
            continue
        except (IntegrityError, RepositoryFormatError) as exc:
            if skip_invalid:
                log.warning("ignoring unreadable %s: %s", what, exc)
                continue
            raise LockConflictError(f"{exc}. If no other process uses the repository, remove "
                                    "all locks (restic unlock --remove-all)") from None
    return out


def remove_stale_locks(repo: LockFiles, *, now_ns: int | None = None,
                       hostname: str | None = None,
                       pid_exists: Callable[[int], bool] = process_exists) -> list[str]:
    """Remove the stale locks (what `restic unlock` does); returns their names."""
    now = time.time_ns() if now_ns is None else now_ns
    host = socket.gethostname() if hostname is None else hostname
    removed = []
    for name, lock in list_locks(repo, skip_invalid=True):
        if is_stale(lock, now_ns=now, hostname=host, pid_exists=pid_exists):
            try:
                repo.backend.remove(FileType.LOCK, name)
            except BackendNotFoundError:
                continue
            removed.append(name)
    return removed


class RepositoryLock:
    """A lock held on a repository, refreshed in a background thread while held.

    Use as a context manager, or `acquire()` / `release()`. `check()` raises `LockLostError`
    once the lock can no longer be trusted; the repository calls it before every write. The
    clock, host name, PID test and intervals can be replaced for tests."""

    def __init__(self, repo: LockFiles, exclusive: bool = False, *,
                 refresh_interval_s: float = REFRESH_INTERVAL_S,
                 refreshability_s: float = REFRESHABILITY_S,
                 stale_after_s: float = STALE_AFTER_S,
                 recheck_delay_s: float | None = None,
                 clock_ns: Callable[[], int] = time.time_ns,
                 hostname: str | None = None,
                 pid: int | None = None,
                 pid_exists: Callable[[int], bool] = process_exists) -> None:
        self.repo = repo
        self.exclusive = exclusive
        self.refresh_interval_s = refresh_interval_s
        self.refreshability_s = refreshability_s
        self.stale_after_s = stale_after_s
        if recheck_delay_s is None:
            recheck_delay_s = 0.0 if repo.backend.lists_saves_at_once else RECHECK_DELAY_S
        self.recheck_delay_s = recheck_delay_s
        self.clock_ns = clock_ns
        self.hostname = socket.gethostname() if hostname is None else hostname
        self.pid = os.getpid() if pid is None else pid
        self.pid_exists = pid_exists
        self.name: str | None = None
        self.record: LockRecord | None = None
        self._last_refresh_ns = 0
        self._lost: str | None = None
        self._mutex = threading.Lock()
        self._recheck_mutex = threading.Lock()
        self._recheck_at: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- life cycle --------------------------------------------------------------------

    def _new_record(self) -> LockRecord:
        ns = self.clock_ns()
        offset = time.localtime(ns // _NS).tm_gmtoff
        return LockRecord(GoTime(ns, offset), self.exclusive, self.hostname,
                          current_username(), self.pid, os.getuid(), os.getgid())

    def _conflicts(self) -> None:
        own = {self.name} if self.name else set()
        now = self.clock_ns()
        for name, other in list_locks(self.repo, exclude=own):
            if not (self.exclusive or other.exclusive):
                continue
            stale = is_stale(other, now_ns=now, hostname=self.hostname,
                             pid_exists=self.pid_exists, stale_after_s=self.stale_after_s)
            wanted = "an exclusive" if self.exclusive else "a non-exclusive"
            hint = (" That lock is stale: if its process is really gone, remove stale locks "
                    "(restic unlock) and try again." if stale else
                    " Wait for that process to finish, then try again.")
            raise LockConflictError(f"{self.repo.backend.location}: cannot take {wanted} lock: "
                                    f"the repository is locked by the {other.describe(now)} "
                                    f"(lock {name[:8]}).{hint}")

    def acquire(self, *, defer_recheck: bool = False) -> "RepositoryLock":
        """Take the lock. The others are checked again `recheck_delay_s` after ours was
        created; with `defer_recheck` that happens at the first `check(writing=True)` instead
        (waiting for whatever is left of the delay), so a job can read the repository and
        its source meanwhile: nothing is written before the recheck passed."""
        if self.name is not None:
            raise RuntimeError("lock already held")
        self._conflicts()
        record = self._new_record()
        self.name = self.repo.save_unpacked(FileType.LOCK, record.encode())
        self.record = record
        self._last_refresh_ns = record.time.unix_ns
        self._lost = None
        self._recheck_at = time.monotonic() + self.recheck_delay_s
        if not defer_recheck:
            try:
                self._finish_recheck()
            except BaseException:
                self._remove_own(self.name)
                self.name = None
                raise
        _sighup_guard.enter()
        self._stop.clear()
        self._thread = threading.Thread(target=self._refresh_loop, daemon=True,
                                        name=f"lock refresh {self.name[:8]}")
        self._thread.start()
        return self

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            _sighup_guard.leave()
        with self._mutex:
            if self.name is not None:
                self._remove_own(self.name)
                self.name = None

    def _remove_own(self, name: str) -> None:
        try:
            self.repo.backend.remove(FileType.LOCK, name)
        except BackendNotFoundError:
            pass
        except BackendError as exc:
            log.warning("could not remove lock %s: %s", name[:8], exc)

    def __enter__(self) -> "RepositoryLock":
        if self.name is None:
            self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    @property
    def held(self) -> bool:
        return self.name is not None and self._lost is None

    # -- keeping it fresh ------------------------------------------------------------------

    def _finish_recheck(self) -> None:
        """The check of the other locks made a moment after ours was created (once)."""
        with self._recheck_mutex:
            if self._recheck_at is None:
                return
            time.sleep(max(0.0, self._recheck_at - time.monotonic()))
            self._conflicts()
            self._recheck_at = None

    def check(self, *, writing: bool = False) -> None:
        """Raise `LockLostError` unless the lock is held and fresh enough to rely on. Before
        a write (`writing`), a deferred recheck of the other locks is finished first: on a
        conflict the lock is released and `LockConflictError` raised."""
        if self.name is None:
            raise LockLostError(f"{self.repo.backend.location}: the lock is not held")
        if writing and self._recheck_at is not None:
            try:
                self._finish_recheck()
            except LockConflictError:
                self.release()
                raise
        if self._lost is None:
            age_s = (self.clock_ns() - self._last_refresh_ns) / _NS
            if age_s > self.refreshability_s:
                self._lost = (f"it was last refreshed {age_s / 60:.1f} minutes ago, too close "
                              f"to the {self.stale_after_s / 60:.0f}-minute staleness limit")
        if self._lost is not None:
            raise LockLostError(f"{self.repo.backend.location}: our lock {self.name[:8]} is "
                                f"lost ({self._lost}); stopping so that a concurrent prune "
                                "cannot delete data this operation still needs")

    def _exists(self, name: str) -> bool:
        return any(fi.name == name for fi in self.repo.backend.list(FileType.LOCK))

    def refresh(self) -> None:
        """Replace our lock file by one with the current time (restic's refresh), after
        making sure ours is still there; if it vanished, the lock is lost."""
        with self._mutex:
            if self.name is None or self._lost is not None:
                return
            old = self.name
            if not self._exists(old):
                self._lost = "its file was removed by someone else"
                return
            record = self._new_record()
            new = self.repo.save_unpacked(FileType.LOCK, record.encode())
            if (self.clock_ns() - self._last_refresh_ns) / _NS > self.refreshability_s:
                # Possibly stale already: keep it only if the old file survived the moment
                # anyone else could have taken it as stale and removed it (restic's moment:
                # a race between processes, which no listing guarantee shortens).
                time.sleep(RECHECK_DELAY_S)
                if not self._exists(old):
                    self._remove_own(new)
                    self._lost = "it went stale and was removed by someone else"
                    return
            self.name, self.record = new, record
            self._last_refresh_ns = record.time.unix_ns
            self._remove_own(old)

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.refresh_interval_s):
            try:
                self.refresh()
            except Exception as exc:  # keep trying; check() enforces the deadline
                log.warning("lock refresh failed: %s", exc)
            if self._lost is not None:
                return
