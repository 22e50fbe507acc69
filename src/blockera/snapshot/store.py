"""The exception-store interface the snapshot targets use (docs/snapshot.md §1-§6; opening
one: `store_open`).

Mirrors the kernel's `struct dm_exception_store_type` (dm-exception-store.h): read_metadata,
prepare_exception, commit_exception, prepare_merge, commit_merge, drop_snapshot, usage and
status, plus the "complete" exception table that dm-snap.c keeps next to the store. The store
type word and chunk size are parsed as `dm_exception_store_create()` does.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from typing import Iterable, NamedTuple, Sequence

import numpy as np

from blockera.blockdev import BlockDevice
from blockera.errors import DeviceError, TableError
from blockera.snapshot.chunkmap import ChunkMap
from blockera.units import SECTOR_BYTES


class StoreInvalidError(DeviceError):
    """The store is invalid (header `valid=0`, or invalidated since): every snapshot I/O
    fails with EIO and nothing more is written to the store."""


class StoreWriteError(DeviceError):
    """A metadata write (or the zeroing of the next area) failed. For `commit()` the store has
    invalidated itself; `committed` of the pairs passed were made durable before the failure
    (they are in `lookup()`), the rest were not. For `commit_merge()` the store stays valid
    and nothing changed (the merge target reports "Merge failed")."""

    def __init__(self, message: str, *, committed: int = 0) -> None:
        super().__init__(message, errno_name="EIO")
        self.committed = committed


class MergeBatch(NamedTuple):
    """`count` exceptions that are consecutive in both fields: origin chunks
    `[old_first, old_first + count)` are stored in COW chunks `[new_first, new_first + count)`."""

    old_first: int
    new_first: int
    count: int


def parse_store_type(word: str) -> tuple[bool, str]:
    """Split a table's store-type word: (persistent?, option string after the first letter).
    Only the first letter counts and case is ignored, as in the kernel."""
    letter = word[:1].upper()
    if letter not in ("P", "N"):
        raise TableError("Exception store type is not P or N")
    return letter == "P", word[1:]


def persistent_overflow_option(options: str) -> bool:
    """The persistent store's option string: empty, or starting with O/o (later characters are
    ignored). Anything else is the kernel's "Unsupported persistent store option"."""
    if not options:
        return False
    if options[0].upper() != "O":
        raise TableError(f"Unsupported persistent store option: {options}")
    return True


class ExceptionStore(ABC):
    """One snapshot's exception store. See the package docstring for the contract.

    Thread safety: every method takes the store's lock, so calls from several threads are
    serialised; `lookup()` is a single dict read. Ordering (commit in allocation order, data
    written before `commit()`) is the caller's responsibility."""

    kind: str
    persistent: bool
    supports_merge: bool

    def __init__(self, cow: BlockDevice, chunk_sectors: int) -> None:
        self.cow = cow
        self.chunk_sectors = chunk_sectors
        self.valid = True
        self.overflowed = False
        self.warnings: list[str] = []
        self._map = ChunkMap()
        self._pending: list[int] = []
        self._lock = threading.RLock()

    # -- geometry helpers ------------------------------------------------------------------

    @property
    def chunk_bytes(self) -> int:
        return self.chunk_sectors * SECTOR_BYTES


    def cow_offset_bytes(self, new_chunk: int) -> int:
        """Byte offset of COW chunk `new_chunk` (where an exception's data lives)."""
        return new_chunk * self.chunk_bytes

    @property
    def overflow_capable(self) -> bool:
        """True for `PO`: a failed snapshot-write allocation overflows instead of invalidating."""
        return self.kind == "PO"

    # -- the exception table ---------------------------------------------------------------

    def lookup(self, old_chunk: int) -> int | None:
        """COW chunk holding origin chunk `old_chunk`, or None. (For N, 0 is a valid answer.)"""
        return self._map.lookup(old_chunk)

    def missing(self, first_chunk: int, stop_chunk: int) -> list[int]:
        """The origin chunks in [first_chunk, stop_chunk) that have no exception."""
        return self._map.missing(first_chunk, stop_chunk)

    def __len__(self) -> int:
        return len(self._map)

    def exceptions(self) -> tuple[np.ndarray, np.ndarray]:
        """Committed exceptions as uint64 arrays (old_chunks, new_chunks), in list order."""
        with self._lock:
            return self._map.arrays()

    @property
    def pending(self) -> tuple[int, ...]:
        """Allocated chunks not committed yet, oldest first."""
        return tuple(self._pending)

    # -- allocation and commit -------------------------------------------------------------

    @abstractmethod
    def allocate(self) -> int:
        """Reserve the next COW chunk (re-reading the COW size). NoSpaceError when full."""

    def allocate_many(self, count: int) -> list[int]:
        """`allocate()` `count` times (a store may read the COW size once for all of them).
        NoSpaceError when full; the chunks allocated before stay pending."""
        return [self.allocate() for _ in range(count)]

    @abstractmethod
    def commit(self, pairs: Iterable[tuple[int, int]]) -> None:
        """Record exceptions whose data the caller has already written to the COW."""

    def _take_pending(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Check that `pairs` are the oldest pending allocations, in order, with 64-bit
        old_chunks (before anything is changed)."""
        bad = next((old for old, _ in pairs if not 0 <= old < 1 << 64), None)
        if bad is not None:
            raise ValueError(f"old_chunk {bad} is not a 64-bit chunk number")
        chunks = [new for _, new in pairs]
        if chunks != self._pending[: len(chunks)]:
            raise ValueError(f"commit() of COW chunks {chunks[:8]}... is not the next "
                             f"allocations in order (pending: {self._pending[:8]}...); "
                             "exceptions must be committed in allocation order")

    def _require_valid(self) -> None:
        if not self.valid:
            raise StoreInvalidError("snapshot is invalid: the exception store accepts no more "
                                    "exceptions", errno_name="EIO")

    # -- state changes ---------------------------------------------------------------------

    @abstractmethod
    def invalidate(self) -> bool:
        """Mark the snapshot invalid (the kernel's drop_snapshot). Returns False if the header
        could not be written (the store is invalid in memory regardless)."""

    def mark_overflowed(self) -> None:
        """Enter the in-memory Overflow state (PO only; not persistent)."""
        if not self.overflow_capable:
            raise ValueError(f"a {self.kind} store cannot overflow: the snapshot must be "
                             "invalidated instead")
        self.overflowed = True

    # -- status ----------------------------------------------------------------------------

    @abstractmethod
    def status_fields(self) -> tuple[int, int, int]:
        """(sectors_allocated, total_sectors, metadata_sectors) as the status line shows."""

    def status_text(self, merge_failed: bool = False) -> str:
        """The snapshot status text: Invalid, Merge failed, Overflow, or `A/T M`."""
        if not self.valid:
            return "Invalid"
        if merge_failed:
            return "Merge failed"
        if self.overflowed:
            return "Overflow"
        allocated, total, metadata = self.status_fields()
        return f"{allocated}/{total} {metadata}"

    def table_text(self) -> str:
        """The store's part of the table line: `P 8`, `PO 8` or `N 8` (chunk size in force)."""
        return f"{self.kind} {self.chunk_sectors}"

    # -- merging ---------------------------------------------------------------------------

    @abstractmethod
    def prepare_merge(self) -> MergeBatch | None:
        """The next batch to merge (from the end of the list), or None when done."""

    @abstractmethod
    def commit_merge(self, count: int) -> None:
        """Forget the last `count` exceptions after their data reached the origin."""
