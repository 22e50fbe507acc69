"""The `snapshot-merge` target (docs/snapshot.md §6; the kernel's
snapshot_merge_map, snapshot_merge_next_chunks, merge_callback, snapshot_merge_resume and
snapshot_merge_presuspend in dm-snap.c, target version 1.5.0).

    snapshot-merge <origin dev> <COW dev> <P|PO> <chunk sectors> [<#features> <feature>...]

Loaded on the origin device in place of `snapshot-origin`, it copies the snapshot's exceptions
back into the origin, from the end of the list, one batch (a run consecutive in both fields)
at a time: copy-outs to the origin's other snapshots for the range first, then COW -> origin,
flush the origin, and drop the records (area write with flush). A crash mid-batch repeats
the batch, which is harmless because the COW data does not change.

Meanwhile the device shows the snapshot's view: chunks not merged yet are read from and
written to the COW (so they are merged later), the others go to the origin through the
origin-write path. Each batch holds the origin group's lock, so I/O to the chunks being merged
waits for the batch. Merging runs from resume to presuspend (suspending pauses it), in a
background thread; an I/O error stops it with "Merge failed" and leaves the records in place.
"""

from __future__ import annotations

import logging
import threading

from blockera.dm.devref import Opener
from blockera.errors import DeviceError, MetadataError
from blockera.snapshot.copyout import COPY_PIECE_BYTES, copy_out, copy_out_needed
from blockera.snapshot.snapshot_target import SnapshotTarget
from blockera.snapshot.store import MergeBatch, StoreWriteError
from blockera.units import SECTOR_BYTES

log = logging.getLogger(__name__)


class SnapshotMergeTarget(SnapshotTarget):
    name = "snapshot-merge"
    version = (1, 5, 0)
    is_merge = True

    def __init__(self, opener: Opener, length_sectors: int, args: list[str]) -> None:
        super().__init__(opener, length_sectors, args)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # -- I/O: the snapshot's view, written through --------------------------------------------
    def read(self, sector: int, nr_sectors: int) -> bytes:
        with self.group.io.shared():
            if not self.valid:
                return self.origin.dev.read(sector * SECTOR_BYTES, nr_sectors * SECTOR_BYTES)
            assert self.store is not None
            return self._read_mapped(self.store, sector, nr_sectors)

    def write(self, sector: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        with self.group.io.shared():
            if not self._needs_copy_out(sector, len(view) // SECTOR_BYTES):
                self._write_mapped(sector, view)
                return
        with self.group.io.exclusive():
            for start, count in self._origin_ranges(sector, len(view) // SECTOR_BYTES):
                copy_out(self.group, start, count)
            self._write_mapped(sector, view)

    def _origin_ranges(self, sector: int, nr_sectors: int) -> list[tuple[int, int]]:
        """(sector, count) of the parts of a request that go to the origin."""
        if not self.valid:
            return [(sector, nr_sectors)]
        assert self.store is not None
        ranges: list[tuple[int, int]] = []
        for piece in self._pieces(sector, nr_sectors):
            if self.store.lookup(piece.chunk) is not None:
                continue
            start = piece.chunk * self.chunk_sectors + piece.offset_sectors
            if ranges and ranges[-1][0] + ranges[-1][1] == start:
                ranges[-1] = (ranges[-1][0], ranges[-1][1] + piece.nr_sectors)
            else:
                ranges.append((start, piece.nr_sectors))
        return ranges

    def _needs_copy_out(self, sector: int, nr_sectors: int) -> bool:
        return any(copy_out_needed(self.group, start, count)
                   for start, count in self._origin_ranges(sector, nr_sectors))

    def _write_mapped(self, sector: int, data: memoryview) -> None:
        """Unmerged chunks to the COW, the rest to the origin (copy-outs already done)."""
        if not self.valid:
            self.origin.dev.write(sector * SECTOR_BYTES, data)
            return
        store = self.store
        assert store is not None
        for piece in self._pieces(sector, len(data) // SECTOR_BYTES):
            part = data[piece.request_sectors * SECTOR_BYTES:
                        (piece.request_sectors + piece.nr_sectors) * SECTOR_BYTES]
            new = store.lookup(piece.chunk)
            if new is None:
                at = (piece.chunk * self.chunk_sectors + piece.offset_sectors) * SECTOR_BYTES
                self.origin.dev.write(at, part)
            else:
                self.cow.dev.write(store.cow_offset_bytes(new)
                                   + piece.offset_sectors * SECTOR_BYTES, part)

    def discard(self, sector: int, nr_sectors: int) -> None:
        if not self.features.discard_zeroes_cow:
            super().discard(sector, nr_sectors)
        # once merging, discards no longer change anything

    def write_zeroes(self, sector: int, nr_sectors: int) -> None:
        self.write(sector, bytes(nr_sectors * SECTOR_BYTES))

    def flush(self) -> None:
        self.origin.dev.flush()
        self.cow.dev.flush()

    # -- the merge ------------------------------------------------------------------------------
    def resume(self) -> None:
        super().resume()
        self.start_merge()

    def presuspend(self) -> None:
        self.stop_merge()

    def start_merge(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._merge, name="snapshot-merge", daemon=True)
        self._thread.start()

    def stop_merge(self) -> bool:
        thread = self._thread
        if thread is None or not thread.is_alive():
            return False
        self._stop.set()
        thread.join()
        return True

    def settle(self) -> None:
        """Wait until the merge has finished (or stopped)."""
        thread = self._thread
        if thread is not None:
            thread.join()

    def _merge(self) -> None:
        while not self._stop.is_set():
            with self.group.io.exclusive():
                if self._stop.is_set() or not self._merge_step():
                    return

    def _fail(self, message: str) -> bool:
        log.error("snapshot-merge: %s", message)
        self.merge_failed = True
        return False

    def _merge_step(self) -> bool:
        """Merge one batch; False when the merge is over (done, invalid or failed)."""
        if not self.valid:
            log.error("snapshot-merge: Snapshot is invalid: can't merge")
            return False
        store = self.store
        assert store is not None
        try:
            batch = store.prepare_merge()
        except (MetadataError, DeviceError) as exc:
            return self._fail(f"Read error in exception store: shutting down merge ({exc})")
        if batch is None:
            return False
        cs = self.chunk_sectors
        dest_sector = batch.old_first * cs
        copy_out(self.group, dest_sector, batch.count * cs)
        if not self._copy_back(batch):
            return False
        try:
            self.origin.dev.flush()
        except DeviceError as exc:
            return self._fail(f"Flush after merge failed: shutting down merge ({exc})")
        try:
            store.commit_merge(batch.count)
        except StoreWriteError as exc:
            return self._fail(f"Write error in exception store: shutting down merge ({exc})")
        return True

    def _copy_back(self, batch: MergeBatch) -> bool:
        """COW chunks of the batch -> their origin chunks, clipped at the origin's end."""
        cb = self.chunk_sectors * SECTOR_BYTES
        start, src = batch.old_first * cb, batch.new_first * cb
        end = min(start + batch.count * cb, self.origin.dev.size_bytes)
        for offset in range(start, end, COPY_PIECE_BYTES):
            length = min(COPY_PIECE_BYTES, end - offset)
            try:
                data = self.cow.dev.read(src + offset - start, length)
            except DeviceError as exc:
                return self._fail(f"Read error: shutting down merge. ({exc})")
            try:
                self.origin.dev.write(offset, data)
            except DeviceError as exc:
                return self._fail(f"Write error: shutting down merge. ({exc})")
        return True

    def destroy(self) -> None:
        if hasattr(self, "_thread"):
            self.stop_merge()
        super().destroy()
