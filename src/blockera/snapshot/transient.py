"""The transient exception store, `N` (docs/snapshot.md §5).

Mirrors dm-snap-transient.c: nothing but data goes to the COW; the table lives in memory only;
allocation is a bump pointer in sectors from COW chunk 0 (room check
`cow_sectors < next_free_sectors + chunk_sectors` fails); commit completes at once; usage is
`next_free_sectors / cow_sectors 0`; there is no drop_snapshot (invalidation writes nothing)
and no merge support.
"""

from __future__ import annotations

from typing import Iterable

from blockera.blockdev import BlockDevice
from blockera.errors import NoSpaceError, TableError, TargetError
from blockera.snapshot.store import ExceptionStore, MergeBatch
from blockera.units import SECTOR_BYTES

_NO_MERGE = "Snapshot exception store does not support snapshot-merge."


class TransientStore(ExceptionStore):
    kind = "N"
    persistent = False
    supports_merge = False

    def __init__(self, cow: BlockDevice, chunk_sectors: int) -> None:
        """`chunk_sectors` is the table's, already validated; 0 is rejected as by the kernel."""
        if chunk_sectors == 0:
            raise TableError("Chunk size not set")
        super().__init__(cow, chunk_sectors)
        self.next_free_sectors = 0

    def allocate(self) -> int:
        with self._lock:
            self._require_valid()
            size_sectors = self.cow.size_bytes // SECTOR_BYTES
            if size_sectors < self.next_free_sectors + self.chunk_sectors:
                raise NoSpaceError(
                    f"COW device full: {self.next_free_sectors} of {size_sectors} sectors used, "
                    f"a chunk needs {self.chunk_sectors} more", errno_name="ENOSPC")
            new_chunk = self.next_free_sectors // self.chunk_sectors
            self.next_free_sectors += self.chunk_sectors
            self._pending.append(new_chunk)
            return new_chunk

    def commit(self, pairs: Iterable[tuple[int, int]]) -> None:
        """Nothing is written: the exceptions are registered in memory at once."""
        pairs = [(int(old), int(new)) for old, new in pairs]
        if not pairs:
            return
        with self._lock:
            self._require_valid()
            self._take_pending(pairs)
            del self._pending[: len(pairs)]
            self._map.append(pairs)

    def invalidate(self) -> bool:
        with self._lock:
            self.valid = False
            self._pending.clear()
            return True

    def status_fields(self) -> tuple[int, int, int]:
        with self._lock:
            return self.next_free_sectors, self.cow.size_bytes // SECTOR_BYTES, 0

    def prepare_merge(self) -> MergeBatch | None:
        raise TargetError(_NO_MERGE)

    def commit_merge(self, count: int) -> None:
        raise TargetError(_NO_MERGE)
