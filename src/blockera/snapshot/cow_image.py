"""Reading a persistent store's exception table in bulk (docs/snapshot.md §2).

Mirrors the kernel's `read_exceptions()` / `insert_exceptions()` in dm-snap-persistent.c:
areas are read in order from area 0; inside an area records are taken up to the first
`new_chunk == 0`; a full area (no terminator) means the list continues in the next area; the
first area that is not full is the last one read (it becomes `current_area`, and its
terminator index `current_committed`). Bytes after a terminator and areas after the first
non-full area are never looked at. A full area whose successor does not lie entirely inside the
device makes activation fail with EIO.

Areas are read in growing batches (1, 4, 16, ... areas, at most `MAX_BATCH_BYTES` per batch)
and scanned with numpy, so a table of millions of records costs one read per area and no
per-record Python work. `read_cow()` is the tools' entry point: header checks plus the table,
optionally lenient (return what could be read and why reading stopped, for `cow dump`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from blockera.blockdev import BlockDevice
from blockera.errors import MetadataError
from blockera.snapshot.header import DiskHeader, check_disk_header
from blockera.snapshot.layout import (FIRST_DATA_CHUNK, HEADER_BYTES, U64_MASK, Geometry)
from blockera.snapshot.records import decode_areas, terminators
from blockera.units import SECTOR_BYTES

MAX_BATCH_BYTES = 32 << 20
_EMPTY = np.zeros(0, dtype=np.uint64)


@dataclass
class ExceptionTable:
    """The records of a persistent store in list order, and where the list ends."""

    geometry: Geometry
    old: np.ndarray
    new: np.ndarray
    current_area: int
    current_committed: int
    current_area_bytes: bytes | None
    error: str | None = None

    def __len__(self) -> int:
        return len(self.old)

    def area_and_slot(self, index: int) -> tuple[int, int]:
        """Every area before the last is full, so record j sits in area j // EPA."""
        return divmod(index, self.geometry.exceptions_per_area)

    def next_free(self) -> int:
        """The kernel's `next_free` after loading this table: 2, raised past every
        `new_chunk` in list order (u64 arithmetic), then stepped over a metadata chunk."""
        next_free = FIRST_DATA_CHUNK
        if len(self.new):
            top = int(self.new.max())
            if top < U64_MASK:
                next_free = max(next_free, top + 1)
            else:   # new_chunk + 1 wraps to 0 in the kernel: replay the scan exactly
                for value in self.new.tolist():
                    if next_free <= value:
                        next_free = (value + 1) & U64_MASK
        return self.geometry.skip_metadata(next_free)


def _beyond_end_message(geometry: Geometry, area: int, size_bytes: int) -> str:
    start = geometry.area_offset_bytes(area)
    why = (f"area {area - 1} is full, so the list continues in area {area}" if area
           else "area 0 is always read")
    return (f"Failed to read snapshot metadata: metadata area {area} at chunk "
            f"{geometry.area_location(area)} (bytes [{start}, {start + geometry.chunk_bytes})) "
            f"lies beyond the end of the COW device ({size_bytes} bytes); {why} "
            f"(truncated or shrunken COW?)")


def read_exception_table(dev: BlockDevice, geometry: Geometry, *,
                         lenient: bool = False) -> ExceptionTable:
    """Read every area the kernel would read. A missing area raises MetadataError (errno
    EIO), or with `lenient=True` ends the table early with `error` set."""
    epa = geometry.exceptions_per_area
    chunk_bytes = geometry.chunk_bytes
    size_bytes = dev.size_bytes
    available = geometry.areas_within(size_bytes)
    per_batch_cap = max(1, MAX_BATCH_BYTES // chunk_bytes)
    olds: list[np.ndarray] = []
    news: list[np.ndarray] = []
    area = 0
    batch = 1
    while True:
        if area >= available:
            message = _beyond_end_message(geometry, area, size_bytes)
            if not lenient:
                raise MetadataError(message, errno_name="EIO")
            return ExceptionTable(geometry, _concat(olds), _concat(news), max(area - 1, 0),
                                  epa if area else 0, None, message)
        count = min(batch, available - area, per_batch_cap)
        raw = b"".join(dev.read(geometry.area_offset_bytes(area + i), chunk_bytes)
                       for i in range(count))
        areas = decode_areas(raw, epa)
        ends = terminators(areas)
        not_full = np.flatnonzero(ends < epa)
        if len(not_full):
            last = int(not_full[0])
            committed = int(ends[last])
            olds.append(areas[:last, :, 0].reshape(-1))
            news.append(areas[:last, :, 1].reshape(-1))
            olds.append(areas[last, :committed, 0])
            news.append(areas[last, :committed, 1])
            return ExceptionTable(geometry, _concat(olds), _concat(news), area + last,
                                  committed, raw[last * chunk_bytes:(last + 1) * chunk_bytes])
        olds.append(areas[:, :, 0].reshape(-1))
        news.append(areas[:, :, 1].reshape(-1))
        area += count
        batch *= 4


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    if not parts:
        return _EMPTY.copy()
    return np.concatenate(parts).astype(np.uint64, copy=False)


@dataclass
class CowImage:
    """What the tools know about a COW device: its header, size and exception table.
    `table` is None when the header could not be used; `error` says why reading stopped."""

    header: DiskHeader | None
    size_bytes: int
    table: ExceptionTable | None
    error: str | None = None

    @property
    def geometry(self) -> Geometry:
        assert self.header is not None
        return Geometry(self.header.chunk_sectors)

    @property
    def chunk_sectors(self) -> int:
        assert self.header is not None
        return self.header.chunk_sectors

    @property
    def valid(self) -> bool:
        return self.header is not None and self.header.is_valid


def read_cow(dev: BlockDevice, *, lenient: bool = False) -> CowImage:
    """Header checks as the kernel makes them for an existing store, then the exception table
    (read even when the header says invalid, unlike the kernel). Strict mode raises
    MetadataError; lenient mode returns what it could read with `error` set."""
    size_bytes = dev.size_bytes

    def fail(message: str, header: DiskHeader | None = None,
             errno_name: str = "EIO") -> CowImage:
        if not lenient:
            raise MetadataError(message, errno_name=errno_name)
        return CowImage(header, size_bytes, None, message)

    if size_bytes < HEADER_BYTES:
        return fail(f"COW device is {size_bytes} bytes, too small to hold the "
                    f"{HEADER_BYTES}-byte header (truncated?)")
    # one whole sector: devices that address sectors cannot read 16 bytes
    header = DiskHeader.unpack(dev.read(0, min(SECTOR_BYTES, size_bytes))[:HEADER_BYTES])
    if header.is_new:
        return fail("COW device is not initialised (header magic is 0): it holds no snapshot "
                    "store yet; the kernel would create a new, empty store here", header,
                    "ENODATA")
    try:
        check_disk_header(header)
    except MetadataError as exc:
        if not lenient:
            raise
        return CowImage(header, size_bytes, None, str(exc))
    geometry = Geometry(header.chunk_sectors)
    if size_bytes < geometry.chunk_bytes:
        return fail(f"COW device is {size_bytes} bytes, smaller than its own header chunk "
                    f"({geometry.chunk_bytes} bytes at chunk size {header.chunk_sectors}): "
                    "truncated", header)
    table = read_exception_table(dev, geometry, lenient=lenient)
    return CowImage(header, size_bytes, table, table.error)
