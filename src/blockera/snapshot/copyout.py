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
whether anything needs copying, and if so copies and writes under the exclusive lock.
"""

from __future__ import annotations

import logging

from blockera.blockdev import BlockDevice
from blockera.errors import DeviceError, NoSpaceError
from blockera.snapshot.origin_registry import OriginGroup, OriginSnapshot
from blockera.snapshot.store import StoreWriteError
from blockera.units import SECTOR_BYTES

log = logging.getLogger(__name__)

# Bound on the bytes one copy moves at a time (a run of consecutive chunks is split).
COPY_PIECE_BYTES = 4 << 20


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
    end = sector + nr_sectors
    chunks = []
    for chunk in range(sector // cs, (end - 1) // cs + 1):
        if max(chunk * cs, sector) >= snap.length_sectors:
            break
        if store.lookup(chunk) is None:
            chunks.append(chunk)
    return chunks


def copy_out_needed(group: OriginGroup, sector: int, nr_sectors: int) -> bool:
    """Whether a write of the range would trigger any copy-out (caller holds the group's lock,
    shared is enough)."""
    return any(_takes_copy_outs(snap, sector) and chunks_to_copy(snap, sector, nr_sectors)
               for snap in group.snapshots)


def write_origin(group: OriginGroup, origin: BlockDevice, sector: int,
                 data: bytes | memoryview) -> None:
    """Write to the origin after the copy-outs the write needs."""
    nr_sectors = len(data) // SECTOR_BYTES
    with group.io.shared():
        if not copy_out_needed(group, sector, nr_sectors):
            origin.write(sector * SECTOR_BYTES, data)
            return
    with group.io.exclusive():
        copy_out(group, sector, nr_sectors)
        origin.write(sector * SECTOR_BYTES, data)


def copy_out(group: OriginGroup, sector: int, nr_sectors: int) -> None:
    """Give every snapshot of the origin its copy of the range (caller holds the group's lock
    exclusively). Each snapshot's copy and commit run in their own thread, so the flushes of
    several COW devices overlap; all have finished when this returns."""
    work = []
    for snap in list(group.snapshots):
        if not _takes_copy_outs(snap, sector):
            continue
        chunks = chunks_to_copy(snap, sector, nr_sectors)
        if chunks:
            work.append((snap, chunks))
    if len(work) == 1:
        copy_chunks(*work[0])
    elif work:
        list(group.copy_pool.map(lambda item: copy_chunks(*item), work))


def copy_chunks(snap: OriginSnapshot, chunks: list[int]) -> None:
    """Allocate, copy and commit exceptions for `chunks` (ascending) of one snapshot."""
    store = snap.store
    assert store is not None
    pairs: list[tuple[int, int]] = []
    try:
        for chunk in chunks:
            pairs.append((chunk, store.allocate()))
    except NoSpaceError:
        snap.invalidate("Unable to allocate exception.")
        return
    try:
        copy_runs(snap, pairs)
        store.commit(pairs)
    except StoreWriteError:
        snap.invalidate("Error reading/writing.")     # the store has already invalidated itself
    except DeviceError as exc:
        log.error("snapshot copy-out failed: %s", exc)
        snap.invalidate("Error reading/writing.")


def copy_runs(snap: OriginSnapshot, pairs: list[tuple[int, int]]) -> None:
    """Copy the origin chunks of `pairs` (old, new) to their COW chunks, run by run (a run is
    consecutive in both fields), in pieces of at most COPY_PIECE_BYTES. Sectors past the
    origin's end are not copied."""
    cb = snap.chunk_sectors * SECTOR_BYTES
    origin, cow = snap.origin.dev, snap.cow.dev
    origin_bytes = origin.size_bytes
    i = 0
    while i < len(pairs):
        old, new = pairs[i]
        n = 1
        while i + n < len(pairs) and pairs[i + n] == (old + n, new + n):
            n += 1
        start, end = old * cb, min((old + n) * cb, origin_bytes)
        for offset in range(start, end, COPY_PIECE_BYTES):
            length = min(COPY_PIECE_BYTES, end - offset)
            cow.write(new * cb + (offset - start), origin.read(offset, length))
        i += n
