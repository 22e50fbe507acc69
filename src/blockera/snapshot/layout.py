"""Where things live on a persistent COW device (docs/snapshot.md §1, §2).

Mirrors the kernel's `area_location()`, `skip_metadata()` and the room check of
`persistent_prepare_exception()` in dm-snap-persistent.c. Everything is counted in chunks of
`chunk_sectors` sectors: chunk 0 is the header, metadata area `a` sits at chunk
`1 + a * (EPA + 1)` and the `EPA = chunk_bytes / 16` chunks after each area hold data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from blockera.units import SECTOR_BYTES

SNAP_MAGIC = 0x70416E53            # "SnAp" little-endian
SNAPSHOT_DISK_VERSION = 1
HEADER_BYTES = 16
RECORD_BYTES = 16
NUM_HEADER_CHUNKS = 1
FIRST_DATA_CHUNK = 2               # header + area 0
DEFAULT_CHUNK_SECTORS = 32         # the kernel's default for `P 0` on a new store
MAX_CHUNK_SECTORS = (2**31 - 1) >> 9   # INT_MAX >> SECTOR_SHIFT
RUN_LENGTH_SHIFT = 56              # the kernel keeps a run length in new_chunk's top 8 bits
U64_MASK = (1 << 64) - 1


@dataclass(frozen=True)
class Geometry:
    """Chunk arithmetic of one persistent store."""

    chunk_sectors: int

    @property
    def chunk_bytes(self) -> int:
        return self.chunk_sectors * SECTOR_BYTES

    @property
    def exceptions_per_area(self) -> int:
        return self.chunk_bytes // RECORD_BYTES

    @property
    def stride_chunks(self) -> int:
        """Distance between two metadata areas: the area itself plus its EPA data chunks."""
        return self.exceptions_per_area + 1

    def area_location(self, area: int) -> int:
        """Chunk index of metadata area `area`."""
        return NUM_HEADER_CHUNKS + area * self.stride_chunks

    def area_offset_bytes(self, area: int) -> int:
        return self.area_location(area) * self.chunk_bytes

    def is_metadata_chunk(self, chunk: "int | np.ndarray") -> "bool | np.ndarray":
        """True for the chunks that hold metadata areas (works element-wise on arrays)."""
        if isinstance(chunk, np.ndarray):
            c = chunk.astype(np.uint64, copy=False)
            return (c >= 1) & ((c - np.uint64(1)) % np.uint64(self.stride_chunks) == 0)
        return chunk >= 1 and (chunk - 1) % self.stride_chunks == 0

    def skip_metadata(self, next_free: int) -> int:
        """The kernel's skip_metadata(): step over a metadata chunk."""
        if next_free % self.stride_chunks == NUM_HEADER_CHUNKS:
            return next_free + 1
        return next_free

    def next_chunks(self, next_free: int, count: int) -> list[int]:
        """The `count` data chunks allocated from `next_free` on, one after another (each
        followed by `skip_metadata`); the chunk after the last is `skip_metadata(last + 1)`."""
        stride = self.stride_chunks
        chunks: list[int] = []
        while count:
            # the chunks up to the next metadata chunk after next_free go in one range
            before_area = stride - (next_free - NUM_HEADER_CHUNKS) % stride
            take = min(count, before_area)
            chunks.extend(range(next_free, next_free + take))
            next_free += take
            count -= take
            if take == before_area:
                next_free += 1
        return chunks

    def allocation_chunk(self, index: int) -> int:
        """COW chunk of the `index`-th (0-based) exception of a store that was never
        interrupted: `2 + j + j // EPA`."""
        return FIRST_DATA_CHUNK + index + index // self.exceptions_per_area

    def allocation_chunks(self, count: int) -> np.ndarray:
        j = np.arange(count, dtype=np.uint64)
        return np.uint64(FIRST_DATA_CHUNK) + j + j // np.uint64(self.exceptions_per_area)

    def whole_chunks(self, size_bytes: int) -> int:
        """Complete chunks on a device of `size_bytes` (a trailing partial chunk is unused)."""
        return size_bytes // self.chunk_bytes

    def area_fits(self, area: int, size_bytes: int) -> bool:
        """Whether the whole chunk of area `area` lies inside a device of `size_bytes`."""
        return (self.area_location(area) + 1) * self.chunk_bytes <= size_bytes

    def areas_within(self, size_bytes: int) -> int:
        """How many metadata areas lie entirely inside a device of `size_bytes`."""
        chunks = self.whole_chunks(size_bytes)
        if chunks <= NUM_HEADER_CHUNKS:
            return 0
        return (chunks - NUM_HEADER_CHUNKS - 1) // self.stride_chunks + 1

    def capacity(self, cow_sectors: int) -> int:
        """Exceptions a fresh store on a COW of `cow_sectors` can commit before the next one
        fails (§2.7). When `r == 0` the last allocation succeeds but filling the area needs a
        successor area that does not exist, so that commit invalidates the store."""
        nr_chunks = cow_sectors // self.chunk_sectors
        if nr_chunks < FIRST_DATA_CHUNK:
            return 0
        q, r = divmod(nr_chunks - 1, self.stride_chunks)
        epa = self.exceptions_per_area
        if r >= 2:
            return q * epa + r - 1
        if r == 1:
            return q * epa
        return q * epa - 1

    def metadata_sectors(self, current_area: int) -> int:
        """The status line's metadata figure: header plus areas 0..current_area (§4.3)."""
        return (current_area + 1 + NUM_HEADER_CHUNKS) * self.chunk_sectors
