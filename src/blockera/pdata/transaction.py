"""The transaction manager (the kernel's dm-transaction-manager).

Copy-on-write with reference counts: to change a block that the last commit can reach, `shadow`
copies it to a newly allocated block and drops a reference to the original; a block allocated or
already shadowed in this transaction is changed in place. A commit writes every changed block,
flushes, then writes the superblock and flushes again, so a crash leaves either the old or the
new superblock, each pointing only at fully written blocks (docs/persistent-data.md §2).
"""

from __future__ import annotations

from typing import Protocol

from blockera.pdata.block_manager import BlockManager
from blockera.pdata.checksum import Validator


class SpaceMap(Protocol):
    """What the transaction manager needs of its space map (the metadata space map, whose own
    structures are in turn changed through this transaction manager)."""

    def new_block(self) -> int: ...
    def inc(self, b: int) -> None: ...
    def dec(self, b: int) -> None: ...
    def get_count(self, b: int) -> int: ...
    def count_is_more_than_one(self, b: int) -> bool: ...
    def commit(self) -> None: ...


class TransactionManager:
    """Shadowing and reference counting over a block manager and a metadata space map. The two
    are made together (`blockera.pdata.space_map.format_metadata` / `open_metadata`): `sm` is
    set right after construction, before any block is allocated."""

    def __init__(self, bm: BlockManager) -> None:
        self.bm = bm
        self.sm: SpaceMap
        self._shadows: set[int] = set()

    # -- reads -----------------------------------------------------------------------------
    def read(self, location: int, validator: Validator) -> bytes | bytearray:
        return self.bm.read(location, validator)

    # -- allocation and shadowing ------------------------------------------------------------
    def new_block(self, validator: Validator) -> tuple[int, bytearray]:
        """Allocate a zeroed block; it counts as a shadow (changed in place until commit)."""
        location = self.sm.new_block()
        buf = self.bm.write_lock_zero(location, validator)
        self._shadows.add(location)
        return location, buf

    def shadow(self, location: int, validator: Validator) -> tuple[int, bytearray, bool]:
        """A writable version of `location`. Returns (new location, buffer, inc_children):
        when the original was shared, the caller must take references to everything the copy
        points at."""
        shared = self.sm.count_is_more_than_one(location)
        if location in self._shadows and not shared:
            return location, self.bm.write_lock(location, validator), False
        new_location = self.sm.new_block()
        self.sm.dec(location)
        original = self.bm.read(location, validator)
        buf = self.bm.write_lock_zero(new_location, validator)
        buf[:] = original
        self._shadows.add(new_location)
        return new_location, buf, shared

    def relocate(self, location: int) -> int:
        """Shadow a space-map block whose contents the space map regenerates at commit: same
        allocation and reference changes as `shadow`, without copying the data."""
        if location in self._shadows and not self.sm.count_is_more_than_one(location):
            return location
        new_location = self.sm.new_block()
        self.sm.dec(location)
        self._shadows.add(new_location)
        return new_location

    def is_shadow(self, location: int) -> bool:
        return location in self._shadows

    # -- reference counts --------------------------------------------------------------------
    def inc(self, location: int) -> None:
        self.sm.inc(location)

    def dec(self, location: int) -> None:
        self.sm.dec(location)

    def ref(self, location: int) -> int:
        return self.sm.get_count(location)

    def is_shared(self, location: int) -> bool:
        return self.sm.count_is_more_than_one(location)

    # -- commit ------------------------------------------------------------------------------
    def pre_commit(self) -> None:
        """Commit the space map, write every changed block and flush the device."""
        self.sm.commit()
        self.bm.flush()

    def commit(self, superblock_validator: Validator, superblock: bytearray,
               superblock_location: int = 0) -> None:
        """Write the superblock (after `pre_commit`) and flush: the transaction is durable."""
        self._shadows.clear()
        self.bm.write_now(superblock_location, superblock_validator, superblock)

    def abort(self) -> None:
        """Drop everything changed since the last commit (callers then reopen from disk)."""
        self._shadows.clear()
        self.bm.discard_dirty()
