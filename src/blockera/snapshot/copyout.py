"""The origin-write path: before a range of the origin is overwritten, every snapshot that
still shares a chunk of it gets its own copy (the kernel's do_origin() / __origin_write() and
origin_write_extent() in dm-snap.c; docs/snapshot.md §3 and §6).

A snapshot takes part when it is active (resumed at least once), valid, not the merging
snapshot, and the write starts inside its length. For each such snapshot, the chunks of the
range that have no exception yet are allocated in ascending order, the old origin data is
copied to the COW (only the sectors that exist for the origin's partial last chunk), and the
whole batch is committed with one area write: data, flush, records, flush. Only then may the
origin write go ahead. A snapshot whose COW is full, or whose copy or commit fails, is
invalidated; the others carry on, and so does the origin write.

`write_origin()` is the whole path (do_origin): it checks under the origin group's shared lock
whether anything needs copying, and if so (or if a batch is running, which holds that lock
exclusively) queues the write for a copy-out batch; a write that turns out to need no copy
is simply made with the batch. Like the
kernel's pending exceptions, which complete together, the origin writes that need copy-outs
while a batch is in progress wait for the next one, and one batch serves all of them: under
the exclusive lock, the batch's chunks of each snapshot are allocated in the order the writes
came, the old chunks are read in parallel and written to the COW, one commit (one data flush,
one area write, one flush) records them all, and then the batch's origin writes go ahead. The
first waiting write runs the batch (no hand-off to another thread).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from blockera.blockdev import BlockDevice
from blockera.blocking import about_to_wait
from blockera.errors import BlockeraError, DeviceError, NoSpaceError
from blockera.snapshot.origin_registry import OriginGroup, OriginSnapshot
from blockera.snapshot.store import StoreWriteError
from blockera.units import SECTOR_BYTES

log = logging.getLogger(__name__)

# Bound on the bytes one copy moves at a time (a run of consecutive chunks is split).
COPY_PIECE_BYTES = 4 << 20
# Bound on the bytes of old chunks read ahead of one COW write.
READ_AHEAD_BYTES = 16 << 20
# Old chunks are read by several threads when a COW write gathers at least this much.
PARALLEL_READ_BYTES = 1 << 20


def _takes_copy_outs(snap: OriginSnapshot, sector: int) -> bool:
    return not snap.is_merge and snap.active and snap.valid and sector < snap.length_sectors


def chunks_to_copy(snap: OriginSnapshot, sector: int, nr_sectors: int) -> list[int]:
    """Chunks of `snap` (in its chunk size) that the write of [sector, sector + nr_sectors)
    would change and that have no exception yet. As in the kernel, which splits origin writes
    at the smallest chunk size, a chunk counts when the part of the write inside it starts
    before the snapshot's end."""
    cs = snap.chunk_sectors
    store = snap.store
    assert store is not None
    if sector >= snap.length_sectors:
        return []
    # the first chunk starts inside the snapshot (at `sector`); a later one counts while its
    # start is before the snapshot's end
    first = sector // cs
    stop = min((sector + nr_sectors - 1) // cs + 1, -(-snap.length_sectors // cs))
    return store.missing(first, stop)


def copy_out_needed(group: OriginGroup, sector: int, nr_sectors: int) -> bool:
    """Whether a write of the range would trigger any copy-out (caller holds the group's lock,
    shared is enough)."""
    return any(_takes_copy_outs(snap, sector) and chunks_to_copy(snap, sector, nr_sectors)
               for snap in group.snapshots)


@dataclass(eq=False)
class _OriginWrite:
    """An origin write waiting for its copy-outs (a bio on the kernel's pending exceptions).
    `done` is set under the group's batch condition."""

    origin: BlockDevice
    sector: int
    data: bytes | memoryview
    done: bool = False
    error: BlockeraError | None = None


def write_origin(group: OriginGroup, origin: BlockDevice, sector: int,
                 data: bytes | memoryview) -> None:
    """Write to the origin after the copy-outs the write needs."""
    nr_sectors = len(data) // SECTOR_BYTES
    batches = group.batches
    with batches.cv:
        batch_running = batches.running
    if not batch_running:     # (while one runs, the check would wait for its end anyway)
        with group.io.shared():
            if not copy_out_needed(group, sector, nr_sectors):
                origin.write(sector * SECTOR_BYTES, data)
                return
    write = _OriginWrite(origin, sector, data)
    about_to_wait()         # copy-outs and a COW commit: let the server read on
    with batches.cv:
        batches.waiting.append(write)
        while not write.done:
            if not batches.running:
                batches.running = True
                break
            batches.cv.wait()
    if not write.done:
        try:
            with group.io.exclusive():
                with batches.cv:
                    batch, batches.waiting = batches.waiting, []
                _run_batch(group, batch)
        finally:
            with batches.cv:
                batches.running = False
                batches.cv.notify_all()
    if write.error is not None:
        raise write.error


def _run_batch(group: OriginGroup, batch: list[_OriginWrite]) -> None:
    """Copy out for every write of `batch`, then make the writes (caller holds the group's
    lock exclusively). Each write gets its own error; the batch's `done` is set at the end."""
    try:
        copy_out_ranges(group, [(w.sector, len(w.data) // SECTOR_BYTES) for w in batch])
        for w in batch:
            try:
                w.origin.write(w.sector * SECTOR_BYTES, w.data)
            except BlockeraError as exc:
                w.error = exc
    except BaseException as exc:        # a bug must not leave the batch's writers waiting
        failure = exc if isinstance(exc, BlockeraError) else DeviceError(
            f"snapshot copy-out failed: {exc}")
        for w in batch:
            w.error = w.error or failure
        if not isinstance(exc, Exception):
            raise
        log.exception("snapshot copy-out batch failed")
    finally:
        with group.batches.cv:
            for w in batch:
                w.done = True


def copy_out(group: OriginGroup, sector: int, nr_sectors: int) -> None:
    """Give every snapshot of the origin its copy of the range (caller holds the group's lock
    exclusively)."""
    copy_out_ranges(group, [(sector, nr_sectors)])


def copy_out_ranges(group: OriginGroup, ranges: list[tuple[int, int]]) -> None:
    """Give every snapshot of the origin its copy of each (sector, nr_sectors) range, one
    commit per snapshot for all of them (caller holds the group's lock exclusively). Each
    snapshot's copy and commit run in their own thread, so the flushes of several COW devices
    overlap; all have finished when this returns."""
    work = []
    for snap in list(group.snapshots):
        chunks: dict[int, None] = {}       # in the order the writes came, each chunk once
        for sector, nr_sectors in ranges:
            if _takes_copy_outs(snap, sector):
                chunks.update(dict.fromkeys(chunks_to_copy(snap, sector, nr_sectors)))
        if chunks:
            work.append((snap, list(chunks)))
    if len(work) == 1:
        copy_chunks(*work[0], group.read_pool)
    elif work:
        list(group.copy_pool.map(lambda item: copy_chunks(*item, group.read_pool), work))


def copy_chunks(snap: OriginSnapshot, chunks: list[int],
                read_pool: ThreadPoolExecutor | None = None) -> None:
    """Allocate, copy and commit exceptions for `chunks` of one snapshot."""
    store = snap.store
    assert store is not None
    try:
        pairs = list(zip(chunks, store.allocate_many(len(chunks))))
    except NoSpaceError:
        snap.invalidate("Unable to allocate exception.")
        return
    try:
        copy_runs(snap, pairs, read_pool)
        store.commit(pairs)
    except StoreWriteError:
        snap.invalidate("Error reading/writing.")     # the store has already invalidated itself
    except DeviceError as exc:
        log.error("snapshot copy-out failed: %s", exc)
        snap.invalidate("Error reading/writing.")


def _runs(pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(first index, length) of each run of `pairs` consecutive in both fields."""
    if len(pairs) < 2:
        return [(0, len(pairs))] if pairs else []
    a = np.array(pairs, dtype=np.uint64)
    steps = np.diff(a, axis=0)
    bounds = [0, *(np.flatnonzero((steps != 1).any(axis=1)) + 1).tolist(), len(pairs)]
    return [(b, e - b) for b, e in zip(bounds, bounds[1:])]


def copy_runs(snap: OriginSnapshot, pairs: list[tuple[int, int]],
              read_pool: ThreadPoolExecutor | None = None) -> None:
    """Copy the origin chunks of `pairs` (old, new) to their COW chunks, run by run (a run is
    consecutive in both fields), in pieces of at most COPY_PIECE_BYTES. Sectors past the
    origin's end are not copied. Pieces that follow one another in the COW (a batch's chunks
    are allocated consecutively) are written together, up to READ_AHEAD_BYTES at a time; with
    `read_pool`, the old data of such a group is read in parallel when it is at least
    PARALLEL_READ_BYTES (below that, handing reads to threads costs more than it saves)."""
    cb = snap.chunk_sectors * SECTOR_BYTES
    origin, cow = snap.origin.dev, snap.cow.dev
    origin_bytes = origin.size_bytes
    pieces: list[tuple[int, int, int]] = []        # (origin offset, length, COW offset)
    for i, n in _runs(pairs):
        old, new = pairs[i]
        start, end = old * cb, min((old + n) * cb, origin_bytes)
        for offset in range(start, end, COPY_PIECE_BYTES):
            pieces.append((offset, min(COPY_PIECE_BYTES, end - offset),
                           new * cb + (offset - start)))
    first = 0
    while first < len(pieces):
        last, size = first + 1, pieces[first][1]
        while (last < len(pieces) and size + pieces[last][1] <= READ_AHEAD_BYTES
               and pieces[last][2] == pieces[last - 1][2] + pieces[last - 1][1]):
            size += pieces[last][1]
            last += 1
        group = pieces[first:last]
        if read_pool is not None and len(group) > 1 and size >= PARALLEL_READ_BYTES:
            datas = list(read_pool.map(lambda p: origin.read(p[0], p[1]), group))
        else:
            datas = [origin.read(offset, length) for offset, length, _ in group]
        cow.write(group[0][2], datas[0] if len(datas) == 1 else b"".join(datas))
        first = last
