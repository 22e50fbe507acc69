"""The `era` target (docs/era.md §3; the kernel's dm-era-target.c, version 1.0.0).

`era <metadata dev> <origin dev> <block size>`: a linear mapping onto the origin that records,
per block of `block size` sectors, the era in which it was last written.

As in the kernel, one worker thread owns the metadata. Each pass of it: starts digestion if a
writeset was archived, runs one digestion step (100 bits), processes the writes waiting for their
first mark in this era, then the queued calls (messages, status, archive, rollover).
A write to a block already marked in this era goes straight to the origin. Any other write waits
for the worker: it sets the bits of a whole batch of such writes, commits the metadata once, and
only then lets the writes reach the origin, so a crash can never lose the record of an
acknowledged write. If the commit fails (metadata device full), the batch fails and the
transaction is rolled back: nothing already tracked is lost.

Differences from the kernel, on purpose:
* A discard marks every block it covers (6.1 marks only the first, which would let a backup
  miss the others).
* `dmsetup status` and messages on a suspended era device fail at once with a clear error; the
  kernel's worker is stopped then and the caller hangs until a resume.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from blockera.blocking import about_to_wait, reports_together
from blockera.dm.devref import Opener
from blockera.dm.target import Target
from blockera.era.metadata import DigestProgress, EraMetadata, Stats
from blockera.errors import (BlockeraError, DeviceError, MetadataError, NoSpaceError,
                             TableError, TargetError)
from blockera.units import METADATA_BLOCK_SECTORS, SECTOR_BYTES, div_up

log = logging.getLogger(__name__)
_UINT_RE = re.compile(r"^\s*\+?\d+$", re.ASCII)

# Gathering submitted writes before a pass: the worker waits at most this share of the last
# commit's duration (and never more than _GATHER_MAX_S) for as many as its last pass took.
_GATHER_SHARE = 0.25
_GATHER_MAX_S = 0.005


@dataclass(eq=False)
class _Mark:
    """The blocks of one write waiting for their first mark in this era (the kernel's deferred
    bio). `done` is set, under the worker's lock, by the pass that recorded them; `wake` (a
    condition on that lock) wakes only this write's thread: when its mark is done, or when it
    is to run the next pass."""

    blocks: list[int]
    done: bool = False
    error: BlockeraError | None = None
    wake: threading.Condition | None = None
    deferred: "_DeferredWrite | None" = None


@dataclass(eq=False)
class _DeferredWrite:
    """A submitted write held back until its mark is committed: the pass that recorded the
    mark then writes it to the origin and reports (`Target.submit_write`)."""

    sector: int
    data: bytes
    done: Callable[[BlockeraError | None], None]


@dataclass
class _Call:
    """A function to run on the worker (the kernel's rpc)."""

    fn: Callable[[EraMetadata], object]
    result: object = None
    error: BlockeraError | None = None
    done: threading.Event = field(default_factory=threading.Event)


class _Worker:
    """Runs the passes over the metadata, one at a time. Background work (digestion steps,
    calls) runs on the worker thread; a pass for waiting writes runs on a waiting writer that
    finds no pass in progress and no digestion due (group commit: the pass carries every write
    queued when it starts; writes that arrive meanwhile wait for the next one). Either way a
    pass is the kernel's do_work, and passes follow one another as they would on one thread.
    The end of a pass wakes the threads of the writes it recorded and, when more writes wait,
    the thread of the oldest of them to run the next pass -- no other waiting writer.
    Submitted writes (`defer`) have no thread waiting: the worker thread runs the passes while
    any is queued, and the pass that records one writes it to the origin and reports.
    A client's writes arrive one by one, so a pass started at the first would commit it alone
    and the rest would wait for the next commit: when fewer submitted writes are queued than
    its last pass took, the worker first gathers -- it waits until that many are queued, but
    no longer than a quarter of the last commit's duration (a group commit delay)."""

    def __init__(self, target: "EraTarget") -> None:
        self.target = target
        self.cv = threading.Condition()
        # the worker thread waits on its own condition (same lock), so the end of every
        # writer's pass does not wake it for nothing
        self.thread_cv = threading.Condition(self.cv._lock)  # type: ignore[attr-defined]
        self.marks: list[_Mark] = []
        self.recorded: list[_Mark] = []     # the marks taken by the pass under way
        self.deferred = 0                   # queued marks of submitted writes
        self.expected = 0                   # submitted writes the worker's last pass took
        self.commit_s = 0.0                 # how long the last commit of marks took
        self.gathering = False
        self.calls: list[_Call] = []
        self.suspended = False
        self.requeue = False
        self.busy = False
        self.exiting = False
        self.digest = DigestProgress()
        self.thread = threading.Thread(target=self._run, name="era-worker", daemon=True)
        self.thread.start()

    # -- scheduling -------------------------------------------------------------------------------
    def _has_work(self) -> bool:
        return bool(self.marks or self.calls or self.requeue)

    def _digesting(self) -> bool:
        """Digestion is due or under way. Its steps then stay on the worker thread, writes
        included, as with the kernel's single worker: which step a commit comes after decides
        which blocks it allocates, and the thread runs the steps back to back."""
        return self.requeue or self.digest.step is not None or self.target.md.archived_writesets

    def _due(self) -> bool:
        """Work for the worker thread (under the lock): waiting writes run their own passes
        unless digestion is under way; the thread takes calls, digestion, submitted writes and
        the writes that arrive meanwhile."""
        return bool(self.calls or self.requeue or self.deferred or
                    (self.marks and self._digesting()))

    def _run(self) -> None:
        while True:
            with self.cv:
                while True:
                    while not self.exiting and (self.suspended or self.busy or not self._due()):
                        self.thread_cv.wait()
                    if self.exiting:
                        return
                    if not self._gather() or not (self.suspended or self.busy or self.exiting):
                        break
                self.busy = True
                self.requeue = False
            self._pass()

    def _gather(self) -> bool:
        """Under the lock, before a pass of the worker thread: wait a little for as many
        submitted writes as the last pass took (see the class). True if it waited."""
        if not 0 < self.deferred < self.expected or self.calls or self.requeue or \
                self._digesting():
            return False
        deadline = time.monotonic() + min(self.commit_s * _GATHER_SHARE, _GATHER_MAX_S)
        self.gathering = True
        try:
            while self.deferred < self.expected and not (
                    self.exiting or self.suspended or self.busy or self.calls):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.thread_cv.wait(left)
        finally:
            self.gathering = False
        return True

    def _pass(self) -> None:
        """One pass; the caller has set `busy`. Then the submitted writes it recorded go to
        the origin (outside the pass: the next one may start meanwhile)."""
        try:
            with self.target.md_lock:
                self._do_work()
        except Exception:   # a bug must not kill the thread silently with callers waiting
            log.exception("era worker pass failed")
        finally:
            with self.cv:
                self.busy = False
                self.cv.notify_all()        # stop() and wait_idle()
                recorded, self.recorded = self.recorded, []
                for mark in recorded:
                    self._wake(mark)
                self._wake_next_pass()
                if self.calls or self.requeue:
                    self.thread_cv.notify()
            with reports_together():
                for mark in recorded:
                    if mark.deferred is not None:
                        self._complete(mark, mark.deferred)

    def _complete(self, mark: _Mark, write: _DeferredWrite) -> None:
        error = mark.error
        if error is None and not mark.done:
            error = DeviceError("era: the metadata pass failed")
        if error is None:
            try:
                self.target.origin.dev.write(write.sector * SECTOR_BYTES, write.data)
            except BlockeraError as exc:
                error = exc
        try:
            write.done(error)
        except Exception:
            log.exception("era: reporting a completed write failed")

    @staticmethod
    def _wake(mark: _Mark) -> None:
        if mark.wake is not None:
            mark.wake.notify()

    def _wake_next_pass(self) -> None:
        """Under the lock, with no pass running: have the writes still waiting recorded."""
        if not self.marks or self.suspended or self.exiting:
            return
        if self.deferred or self._digesting():
            self.thread_cv.notify()
        else:
            self._wake(self.marks[0])

    def defer(self, mark: _Mark) -> None:
        """Queue the mark of a submitted write (`mark.deferred`); a pass of the worker thread
        records it, then writes and reports."""
        with self.cv:
            self.marks.append(mark)
            self.deferred += 1
            if not self.busy and (not self.gathering or self.deferred >= self.expected):
                self.thread_cv.notify()

    def mark(self, mark: _Mark) -> None:
        """Queue `mark` and return once a pass has recorded it (or failed to: `mark.error`),
        running that pass on this thread when no other pass is in progress."""
        with self.cv:
            mark.wake = threading.Condition(self.cv._lock)  # type: ignore[attr-defined]
            self.marks.append(mark)
            while not mark.done:
                if self._digesting():
                    self.thread_cv.notify()
                elif not (self.busy or self.suspended or self.exiting):
                    self.busy = True
                    self.requeue = False
                    break
                mark.wake.wait()
            else:
                return
        self._pass()            # `mark` was queued before this pass began: it is done now
        if not mark.done:       # the pass failed on a bug (logged): refuse the write
            mark.error = DeviceError("era: the metadata pass failed")

    def call(self, fn: Callable[[EraMetadata], object]) -> object:
        call = _Call(fn)
        with self.cv:
            if self.suspended:
                raise TargetError("era: the device is suspended and its worker is stopped; "
                                  "status and messages need a resume first (the kernel would "
                                  "hang here)", errno_name="EBUSY")
            self.calls.append(call)
            self.thread_cv.notify()
        call.done.wait()
        if call.error is not None:
            raise call.error
        return call.result

    def start(self) -> None:
        with self.cv:
            self.suspended = False
            self.cv.notify_all()
            self.thread_cv.notify()
            if not self.busy:
                self._wake_next_pass()

    def stop(self) -> None:
        with self.cv:
            self.suspended = True
            while self.busy:
                self.cv.wait()

    def wait_idle(self) -> None:
        with self.cv:
            while not self.suspended and (self.busy or self._has_work()):
                self.cv.wait()

    def exit(self) -> None:
        with self.cv:
            self.exiting = True
            self.cv.notify_all()
            self.thread_cv.notify()
        self.thread.join()

    # -- one pass (the kernel's do_work) -----------------------------------------------------------
    def _do_work(self) -> None:
        md = self.target.md
        if md.archived_writesets:
            md.archived_writesets = False
            md.digest_start(self.digest)
        self._digest_step(md)
        self._process_marks(md)
        self._process_calls(md)

    def _digest_step(self, md: EraMetadata) -> None:
        if self.digest.step is None:
            return
        try:
            md.digest_step(self.digest)
        except BlockeraError as exc:
            log.error("era: digest step failed, stopping digestion: %s", exc)
            self.digest.step = None
            return
        if self.digest.step is not None:
            with self.cv:
                self.requeue = True

    def _rollback(self, md: EraMetadata) -> None:
        md.abort()
        self.digest = DigestProgress()

    def _process_marks(self, md: EraMetadata) -> None:
        with self.cv:
            batch, self.marks = self.marks, []
            self.recorded = batch       # woken at the end of the pass, done or not
            if threading.current_thread() is self.thread:
                self.expected = self.deferred
            self.deferred = 0
        if not batch:
            return
        ws = md.current_writeset
        error: BlockeraError | None = None
        fresh: list[int] = []
        try:
            fresh = md.writeset_set_many([b for mark in batch for b in mark.blocks])
            if fresh:
                started = time.monotonic()
                md.commit()
                self.commit_s = time.monotonic() - started
        except BlockeraError as exc:
            error = exc
        if error is not None:
            self._rollback(md)
            failure = _write_failure(error)
            for mark in batch:
                mark.error = failure
        elif fresh:
            ws.mark_many(fresh)
        with self.cv:
            for mark in batch:
                mark.done = True

    def _process_calls(self, md: EraMetadata) -> None:
        with self.cv:
            calls, self.calls = self.calls, []
        if not calls:
            return
        rolled_back = False
        for call in calls:
            try:
                call.result = call.fn(md)
            except TargetError as exc:    # refused before changing anything
                call.error = exc
            except BlockeraError as exc:  # failed part-way: drop the partial transaction
                call.error = exc
                self._rollback(md)
                rolled_back = True
        if not rolled_back:
            try:
                md.commit()
            except BlockeraError as exc:
                self._rollback(md)
                for call in calls:
                    call.error = call.error or exc
        for call in calls:
            call.done.set()


def _write_failure(error: BlockeraError) -> BlockeraError:
    if isinstance(error, NoSpaceError):
        return NoSpaceError(f"era: cannot record the write: {error}")
    return DeviceError(f"era: cannot record the write: {error}")


class EraTarget(Target):
    name = "era"
    version = (1, 0, 0)
    supports_discard = True

    def __init__(self, opener: Opener, length_sectors: int, args: list[str]) -> None:
        super().__init__(opener, length_sectors, args)
        if len(args) != 3:
            raise TableError("Invalid argument count")
        try:
            self.metadata = self.get_device(args[0], writable=True, what="metadata device")
        except DeviceError as exc:
            raise TableError(f"Error opening metadata device ({exc})") from None
        try:
            self.origin = self.get_device(args[1], writable=True, what="data device")
        except DeviceError as exc:
            raise TableError(f"Error opening data device ({exc})") from None
        if not _UINT_RE.match(args[2]) or int(args[2]) >= 1 << 32:
            raise TableError("Error parsing block size")
        self.block_sectors = int(args[2])
        if self.block_sectors == 0 or self.block_sectors % 8:
            raise TableError("Invalid block size")
        try:
            self.md = EraMetadata(self.metadata.dev, self.block_sectors, may_format=True)
        except (MetadataError, DeviceError) as exc:
            raise TableError(f"Error reading metadata ({exc})") from None
        self.nr_blocks = 0
        self.resumed_before = False
        self.md_lock = threading.RLock()
        self.worker = _Worker(self)

    # -- I/O --------------------------------------------------------------------------------------
    def _blocks(self, sector: int, nr_sectors: int) -> range:
        return range(sector // self.block_sectors, div_up(sector + nr_sectors, self.block_sectors))

    def _mark(self, blocks: range | list[int]) -> None:
        """Make sure every block is marked in this era before returning."""
        writeset = self.md.current_writeset
        unmarked = [b for b in blocks if not writeset.marked(b)]
        if not unmarked:
            return
        mark = _Mark(unmarked)
        about_to_wait()             # a metadata commit at least: let the server read on
        self.worker.mark(mark)
        if mark.error is not None:
            raise mark.error

    def read(self, sector: int, nr_sectors: int) -> bytes:
        return self.origin.dev.read(sector * SECTOR_BYTES, nr_sectors * SECTOR_BYTES)

    def write(self, sector: int, data: bytes | memoryview) -> None:
        self._mark(self._blocks(sector, len(data) // SECTOR_BYTES))
        self.origin.dev.write(sector * SECTOR_BYTES, data)

    def submit_write(self, sector: int, data: bytes | bytearray | memoryview,
                     done: Callable[[BlockeraError | None], None]) -> None:
        """A write to marked blocks goes to the origin at once; any other is held back (the
        kernel's deferred bio) until a pass of the worker has committed its mark."""
        writeset = self.md.current_writeset
        unmarked = [b for b in self._blocks(sector, len(data) // SECTOR_BYTES)
                    if not writeset.marked(b)]
        if not unmarked:
            self.origin.dev.write(sector * SECTOR_BYTES, data)
            done(None)
            return
        self.worker.defer(_Mark(unmarked, deferred=_DeferredWrite(sector, bytes(data), done)))

    def discard(self, sector: int, nr_sectors: int) -> None:
        self._mark(self._blocks(sector, nr_sectors))
        self.origin.dev.discard(sector * SECTOR_BYTES, nr_sectors * SECTOR_BYTES)

    def write_zeroes(self, sector: int, nr_sectors: int) -> None:
        self._mark(self._blocks(sector, nr_sectors))
        self.origin.dev.write_zeroes(sector * SECTOR_BYTES, nr_sectors * SECTOR_BYTES)

    def flush(self) -> None:
        self.origin.dev.flush()

    # -- life cycle ---------------------------------------------------------------------------------
    def postsuspend(self) -> None:
        try:
            self.worker.call(_archive)
        except BlockeraError as exc:
            log.error("era: couldn't archive current era: %s", exc)
        self.worker.stop()
        with self.md_lock:
            try:
                self.md.commit()
            except BlockeraError as exc:
                log.error("era: metadata_commit failed: %s", exc)

    def preresume(self) -> None:
        self._reopen_if_stale()
        new_size = div_up(self.length_sectors, self.block_sectors)
        if self.nr_blocks != new_size:
            with self.md_lock:
                try:
                    self.md.resize(new_size)
                    self.md.commit()
                except BlockeraError as exc:
                    self.md.abort()
                    raise TargetError(f"era: metadata_resize failed: {exc}",
                                      errno_name=exc.errno_name) from None
            self.nr_blocks = new_size
        self.worker.start()
        try:
            self.worker.call(lambda md: md.era_rollover())
        except BlockeraError as exc:
            raise TargetError(f"era: metadata_era_rollover failed: {exc}",
                              errno_name=exc.errno_name) from None

    def _reopen_if_stale(self) -> None:
        """A table loaded while another era table was live on the same metadata read the
        superblock before that table's last commits (its postsuspend archive at the latest).
        The kernel goes on with the stale view, which drops the bits set in between and can
        reuse blocks the newer commits still reference; this target reads the metadata again
        before it first resumes."""
        if self.resumed_before:     # every commit since was this instance's own
            return
        with self.md_lock:
            if self.md.committed_elsewhere():
                try:
                    self.md = EraMetadata(self.metadata.dev, self.block_sectors,
                                          may_format=False)
                except (MetadataError, DeviceError) as exc:
                    raise TargetError(f"era: couldn't reopen metadata: {exc}",
                                      errno_name=exc.errno_name) from None
        self.resumed_before = True

    def settle(self) -> None:
        self.worker.wait_idle()

    def destroy(self) -> None:
        if hasattr(self, "worker"):
            self.worker.exit()
        super().destroy()

    # -- reporting ----------------------------------------------------------------------------------
    def status(self) -> str:
        stats = self.worker.call(lambda md: md.stats())
        assert isinstance(stats, Stats)
        snap = str(stats.snap) if stats.snap else "-"
        return f"{METADATA_BLOCK_SECTORS} {stats.used}/{stats.total} {stats.era} {snap}"

    def table_args(self) -> str:
        return f"{self.metadata.table_name} {self.origin.table_name} {self.block_sectors}"

    def message(self, args: list[str]) -> str | None:
        if len(args) != 1:
            raise TargetError("incorrect number of message arguments")
        operation = _MESSAGES.get(args[0].lower())
        if operation is None:
            raise TargetError(f"unsupported message '{args[0]}'")
        self.worker.call(operation)
        return None


def _archive(md: EraMetadata) -> None:
    if md.current_writeset.md.root:
        md.era_archive()


_MESSAGES: dict[str, Callable[[EraMetadata], object]] = {
    "checkpoint": lambda md: md.checkpoint(),
    "take_metadata_snap": lambda md: md.take_snap(),
    "drop_metadata_snap": lambda md: md.drop_snap(),
}
