"""Writing a whole persistent store in one go (docs/snapshot.md §3, §2).

`write_store()` lays out the exact bytes a kernel leaves on the COW after creating a store and
committing the given exceptions in order without interruption: the header chunk, every area
with its records (zeros after the last one), and, when the last area is exactly full, its
zeroed successor. Data chunks are not touched. For building images in bulk (tests, benchmarks,
conversions); the online path is `PersistentStore.commit()`.
"""

from __future__ import annotations

import numpy as np

from blockera.blockdev import BlockDevice
from blockera.errors import NoSpaceError
from blockera.snapshot.header import DiskHeader, check_table_chunk_size
from blockera.snapshot.layout import SNAP_MAGIC, SNAPSHOT_DISK_VERSION, Geometry
from blockera.snapshot.records import encode_area


def write_store(cow: BlockDevice, chunk_sectors: int, old_chunks: np.ndarray,
                new_chunks: np.ndarray | None = None, *, valid: int = 1) -> Geometry:
    """Write header and areas for `old_chunks[j] -> new_chunks[j]` (list order). Without
    `new_chunks` the kernel's allocation order is used (`2 + j + j // EPA`)."""
    check_table_chunk_size(chunk_sectors)
    geometry = Geometry(chunk_sectors)
    epa = geometry.exceptions_per_area
    old = np.asarray(old_chunks, dtype=np.uint64)
    new = (geometry.allocation_chunks(len(old)) if new_chunks is None
           else np.asarray(new_chunks, dtype=np.uint64))
    if len(old) != len(new):
        raise ValueError(f"{len(old)} old chunks but {len(new)} new chunks")
    if len(new) and not new.all():
        raise ValueError("a new_chunk of 0 would end the exception list")
    last_area = len(old) // epa          # the area holding the terminator
    if not geometry.area_fits(last_area, cow.size_bytes):
        raise NoSpaceError(f"{len(old)} exceptions need metadata area {last_area} at chunk "
                           f"{geometry.area_location(last_area)}, beyond the end of the COW "
                           f"device ({cow.size_bytes} bytes)")
    cow.write(0, DiskHeader(SNAP_MAGIC, valid, SNAPSHOT_DISK_VERSION, chunk_sectors).chunk())
    for area in range(last_area + 1):
        part = slice(area * epa, min(len(old), (area + 1) * epa))
        cow.write(geometry.area_offset_bytes(area), encode_area(old[part], new[part], epa))
    cow.flush()
    return geometry
