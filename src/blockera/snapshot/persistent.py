"""The persistent exception store, `P` and `PO` (docs/snapshot.md §2, §6).

Mirrors dm-snap-persistent.c: `persistent_read_metadata()` (header, chunk-size override,
version, invalid state, `read_exceptions()`), `persistent_prepare_exception()` (room check
against the live COW size, metadata chunks skipped), `persistent_commit_exception()` with the
kernel's durability order, `persistent_drop_snapshot()`, `persistent_usage()`,
`persistent_prepare_merge()` and `persistent_commit_merge()`.

Durability order of `commit()` (§2.6), per area write:

    [area filled: write zeros over the next area]  ->  flush  ->  write area  ->  flush

The first flush makes the caller's data chunks (and the zeroed successor) durable before any
record pointing at them can be; the second is the kernel's FUA on the area. A batch of pairs
costs one area write, plus one for every area it fills on the way, as in the kernel when
several exceptions complete while others are in flight.

One deliberate difference: a new store is created by zeroing area 0, flushing, then writing
the header and flushing (the kernel writes the header first, with no flush). The resulting
bytes are identical; the order means a crash can never leave a valid header in front of a
stale area 0, and a COW too small for area 0 is rejected before anything is written.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from blockera.blockdev import BlockDevice
from blockera.errors import DeviceError, MetadataError, NoSpaceError, TargetError
from blockera.snapshot.anomalies import AnomalyReport, find_anomalies
from blockera.snapshot.chunkmap import ChunkMap
from blockera.snapshot.header import DiskHeader, check_disk_header, chunk_size_error
from blockera.snapshot.layout import (DEFAULT_CHUNK_SECTORS, FIRST_DATA_CHUNK, HEADER_BYTES,
                                      SNAP_MAGIC, SNAPSHOT_DISK_VERSION, U64_MASK, Geometry)
from blockera.snapshot.cow_image import read_exception_table
from blockera.snapshot.records import RECORD_WORDS
from blockera.snapshot.store import (ExceptionStore, MergeBatch, StoreInvalidError,
                                     StoreWriteError)
from blockera.units import SECTOR_BYTES


class PersistentStore(ExceptionStore):
    persistent = True
    supports_merge = True

    def __init__(self, cow: BlockDevice, chunk_sectors: int, *, overflow: bool) -> None:
        """Use `PersistentStore.open()` (or `open_store()`)."""
        super().__init__(cow, chunk_sectors)
        self.kind = "PO" if overflow else "P"
        self.geometry = Geometry(chunk_sectors)
        self.next_free = FIRST_DATA_CHUNK
        self.current_area = 0
        self.current_committed = 0
        self.created = False
        self.anomalies: AnomalyReport | None = None
        self._merging = False
        self._cow_sectors = 0       # the COW's size as last read (again when a chunk won't fit)
        self._set_area(bytearray(self.geometry.chunk_bytes))

    def _set_area(self, raw: bytes | bytearray) -> None:
        self._area = bytearray(raw)
        self._words = np.frombuffer(self._area, dtype=RECORD_WORDS).reshape(
            self.geometry.exceptions_per_area, 2)

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def open(cls, cow: BlockDevice, chunk_sectors: int, *, overflow: bool = False,
             logical_block_bytes: int = SECTOR_BYTES) -> "PersistentStore":
        """`chunk_sectors` is the table's (already validated, or 0 for the default)."""
        supplied = chunk_sectors != 0
        if not supplied:
            chunk_sectors = max(DEFAULT_CHUNK_SECTORS, logical_block_bytes // SECTOR_BYTES)
        chunk_bytes = chunk_sectors * SECTOR_BYTES
        size_bytes = cow.size_bytes
        if size_bytes < chunk_bytes:
            raise DeviceError(f"Failed to read snapshot metadata: the COW device "
                              f"({size_bytes} bytes) is smaller than one {chunk_bytes}-byte "
                              "chunk, so its header cannot be read", errno_name="EIO")
        # the whole first sector: a device-mapper device cannot read 16 bytes
        header = DiskHeader.unpack(cow.read(0, SECTOR_BYTES)[:HEADER_BYTES])
        if header.is_new:
            store = cls(cow, chunk_sectors, overflow=overflow)
            store._create()
            return store
        if header.magic != SNAP_MAGIC:
            check_disk_header(header, logical_block_bytes)    # raises the magic error
        warnings = []
        if header.chunk_sectors != chunk_sectors:
            if supplied:
                warnings.append(f"chunk size {header.chunk_sectors} in device metadata "
                                f"overrides table chunk size of {chunk_sectors}.")
            reason = chunk_size_error(header.chunk_sectors, logical_block_bytes)
            if reason is not None:
                raise MetadataError(f"invalid on-disk chunk size {header.chunk_sectors}: "
                                    f"{reason}.", errno_name="EINVAL")
            chunk_sectors = header.chunk_sectors
        if header.version != SNAPSHOT_DISK_VERSION:
            raise MetadataError(f"unable to handle snapshot disk version {header.version}",
                                errno_name="EINVAL")
        store = cls(cow, chunk_sectors, overflow=overflow)
        store.warnings.extend(warnings)
        if not header.is_valid:
            store.valid = False
            store.warnings.append("Snapshot is marked invalid.")
            return store
        store._load()
        return store

    def _create(self) -> None:
        geometry = self.geometry
        size_bytes = self.cow.size_bytes
        if not geometry.area_fits(0, size_bytes):
            raise DeviceError(f"COW device too small for a new snapshot store: it needs at "
                              f"least 2 chunks (header and metadata area 0) = "
                              f"{2 * geometry.chunk_bytes} bytes, it has {size_bytes}",
                              errno_name="EIO")
        self.cow.write(geometry.area_offset_bytes(0), bytes(geometry.chunk_bytes))
        self.cow.flush()
        self.cow.write(0, DiskHeader(SNAP_MAGIC, 1, SNAPSHOT_DISK_VERSION,
                                     self.chunk_sectors).chunk())
        self.cow.flush()
        self.created = True

    def _load(self) -> None:
        table = read_exception_table(self.cow, self.geometry)
        self._map = ChunkMap(table.old, table.new)
        self.current_area = table.current_area
        self.current_committed = table.current_committed
        self.next_free = table.next_free()
        assert table.current_area_bytes is not None
        self._set_area(table.current_area_bytes)
        self.anomalies = find_anomalies(table, self.cow.size_bytes)

    # -- allocation and commit -------------------------------------------------------------

    def allocate(self) -> int:
        return self.allocate_many(1)[0]

    def allocate_many(self, count: int) -> list[int]:
        with self._lock:
            self._require_valid()
            if self._merging:
                raise TargetError("the store is being merged: no new exceptions")
            chunks = self.geometry.next_chunks(self.next_free, count)
            fits = self._fitting(chunks)
            if fits < count:    # read the size again only when it matters (a system call)
                self._cow_sectors = self.cow.size_bytes // SECTOR_BYTES
                fits = self._fitting(chunks)
            size_sectors, cs = self._cow_sectors, self.chunk_sectors
            self._pending.extend(chunks[:fits])
            if fits < count:   # what fitted stays allocated, as one allocation at a time did
                full = chunks[fits]
                self.next_free = full
                raise NoSpaceError(f"COW device full: chunk {full} would end at sector "
                                   f"{(full + 1) * cs}, the COW has {size_sectors} sectors",
                                   errno_name="ENOSPC")
            if chunks:
                self.next_free = self.geometry.skip_metadata(chunks[-1] + 1)
            return chunks

    def _fitting(self, chunks: list[int]) -> int:
        """How many of the ascending `chunks` end within the COW as last measured."""
        fits, end_sectors = len(chunks), self._cow_sectors
        while fits and end_sectors < (chunks[fits - 1] + 1) * self.chunk_sectors:
            fits -= 1
        return fits

    def commit(self, pairs: Iterable[tuple[int, int]]) -> None:
        """Append `pairs` (in allocation order) to the current area and make them durable.
        Returns once every record is on stable storage. On a write failure the store
        invalidates itself and raises StoreWriteError."""
        pairs = [(int(old), int(new)) for old, new in pairs]
        if not pairs:
            return
        with self._lock:
            self._require_valid()
            self._take_pending(pairs)
            epa = self.geometry.exceptions_per_area
            durable = 0
            try:
                while len(pairs) - durable >= epa - self.current_committed:   # fills the area
                    end = durable + epa - self.current_committed
                    self._words[self.current_committed:] = pairs[durable:end]
                    self.current_committed = epa
                    self._write_area(fills=True)
                    self._publish(pairs[durable:end])
                    durable = end
                    self.current_area += 1
                    self.current_committed = 0
                    self._set_area(bytearray(self.geometry.chunk_bytes))
                if durable < len(pairs):
                    rest = pairs[durable:]
                    self._words[self.current_committed:self.current_committed + len(rest)] = rest
                    self.current_committed += len(rest)
                    self._write_area(fills=False)
                    self._publish(rest)
            except DeviceError as exc:
                self._fail_commit(exc, durable)

    def _publish(self, pairs: list[tuple[int, int]]) -> None:
        del self._pending[: len(pairs)]
        self._map.append(pairs)

    def _write_area(self, *, fills: bool) -> None:
        geometry = self.geometry
        if fills:
            successor = self.current_area + 1
            if not geometry.area_fits(successor, self.cow.size_bytes):
                start = geometry.area_offset_bytes(successor)
                raise DeviceError(f"zeroing metadata area {successor} needs bytes [{start}, "
                                  f"{start + geometry.chunk_bytes}) but the COW device ends at "
                                  f"byte {self.cow.size_bytes}")
            self.cow.write(geometry.area_offset_bytes(successor), bytes(geometry.chunk_bytes))
        self.cow.flush()
        self.cow.write(geometry.area_offset_bytes(self.current_area), bytes(self._area))
        self.cow.flush()

    def _fail_commit(self, exc: DeviceError, durable: int) -> None:
        self._pending.clear()
        self._drop()
        raise StoreWriteError(f"Invalidating snapshot: Error reading/writing: {exc}",
                              committed=durable) from None

    # -- invalidation ----------------------------------------------------------------------

    def invalidate(self) -> bool:
        with self._lock:
            return self._drop()

    def _drop(self) -> bool:
        """persistent_drop_snapshot(): valid=0 in memory, then rewrite the header chunk."""
        self.valid = False
        self._pending.clear()
        header = DiskHeader(SNAP_MAGIC, 0, SNAPSHOT_DISK_VERSION, self.chunk_sectors)
        try:
            self.cow.write(0, header.chunk())
            self.cow.flush()
        except DeviceError as exc:
            self.warnings.append(f"write header failed: {exc}")
            return False
        return True

    # -- status ----------------------------------------------------------------------------

    def status_fields(self) -> tuple[int, int, int]:
        with self._lock:
            return (self.next_free * self.chunk_sectors,
                    self.cow.size_bytes // SECTOR_BYTES,
                    self.geometry.metadata_sectors(self.current_area))

    # -- merging ---------------------------------------------------------------------------

    def prepare_merge(self) -> MergeBatch | None:
        with self._lock:
            if not self.valid:
                raise StoreInvalidError("Snapshot is invalid: can't merge")
            if self._pending:
                raise TargetError("cannot merge while exceptions are pending")
            self._merging = True
            epa = self.geometry.exceptions_per_area
            if self.current_committed == 0:
                if self.current_area == 0:
                    return None
                area = self.current_area - 1
                raw = self.cow.read(self.geometry.area_offset_bytes(area),
                                    self.geometry.chunk_bytes)
                self._set_area(raw)
                if not self._words[:, 1].all():
                    raise MetadataError(f"metadata area {area} changed on disk while merging: "
                                        "it is no longer full", errno_name="EIO")
                self.current_area = area
                self.current_committed = epa
            committed = self.current_committed
            last_old, last_new = (int(v) for v in self._words[committed - 1])
            count = 1
            while count < committed:
                old, new = (int(v) for v in self._words[committed - 1 - count])
                if old != (last_old - count) & U64_MASK or new != (last_new - count) & U64_MASK:
                    break
                count += 1
            return MergeBatch((last_old - count + 1) & U64_MASK,
                              (last_new - count + 1) & U64_MASK, count)

    def commit_merge(self, count: int) -> None:
        with self._lock:
            if not 1 <= count <= self.current_committed:
                raise ValueError(f"commit_merge({count}): the current area holds "
                                 f"{self.current_committed} exceptions")
            committed = self.current_committed
            saved = self._words[committed - count: committed].copy()
            self._words[committed - count: committed] = 0
            try:
                self.cow.flush()
                self.cow.write(self.geometry.area_offset_bytes(self.current_area),
                               bytes(self._area))
                self.cow.flush()
            except DeviceError as exc:
                self._words[committed - count: committed] = saved
                raise StoreWriteError(f"Write error in exception store: {exc}") from None
            self.current_committed -= count
            self.next_free = (self.geometry.area_location(self.current_area)
                              + self.current_committed + 1)
            self._map.pop_tail(count)
