"""Exception records and metadata areas (docs/snapshot.md §2).

Mirrors the kernel's `struct disk_exception` (u64 LE `old_chunk`, u64 LE `new_chunk`) and how
`insert_exceptions()` scans an area: records from index 0 up to the first one whose
`new_chunk` is 0 (the terminator); an area without a terminator is full. Areas are handled as
numpy arrays of shape (EPA, 2): column 0 is `old_chunk`, column 1 is `new_chunk`.
"""

from __future__ import annotations

import numpy as np

from blockera.snapshot.layout import RECORD_BYTES

RECORD_WORDS = np.dtype("<u8")


def decode_areas(raw: bytes | bytearray | memoryview, exceptions_per_area: int) -> np.ndarray:
    """View `raw` (a whole number of area chunks) as an array of shape (areas, EPA, 2)."""
    words = np.frombuffer(raw, dtype=RECORD_WORDS)
    return words.reshape(-1, exceptions_per_area, 2)


def terminators(areas: np.ndarray) -> np.ndarray:
    """Per area: index of the first record with new_chunk == 0, or EPA when the area is full."""
    zero = areas[:, :, 1] == 0
    first = np.argmax(zero, axis=1)
    return np.where(zero.any(axis=1), first, areas.shape[1])


def encode_area(old: np.ndarray, new: np.ndarray, exceptions_per_area: int,
                base: bytes | bytearray | None = None) -> bytearray:
    """An area chunk holding `old`/`new` in slots 0..len-1; the rest is `base` (default
    zeros, which is what the kernel writes after the last record)."""
    count = len(old)
    if count > exceptions_per_area:
        raise ValueError(f"{count} records do not fit in an area of {exceptions_per_area}")
    buf = bytearray(base) if base is not None else bytearray(exceptions_per_area * RECORD_BYTES)
    words = np.frombuffer(buf, dtype=RECORD_WORDS).reshape(exceptions_per_area, 2)
    words[:count, 0] = old
    words[:count, 1] = new
    return buf


def pack_record(old_chunk: int, new_chunk: int) -> bytes:
    return old_chunk.to_bytes(8, "little") + new_chunk.to_bytes(8, "little")
