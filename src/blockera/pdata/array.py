"""dm-array (docs/persistent-data.md §5; the kernel's dm-array.c).

An array of fixed-size values is stored as array blocks (header: csum, max_entries, nr_entries,
value_size, blocknr; values from byte 24), all full except the last, indexed by a btree that maps
array-block index -> block location. The array's length is not stored: the caller knows it.
Values here are plain integers (era numbers, bitset words), so array blocks hold no references.
Resizing and updates follow the kernel's steps so allocation counts match.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from blockera.errors import MetadataError
from blockera.pdata.btree import BTree, ValueType
from blockera.pdata.checksum import ARRAY_BLOCK
from blockera.pdata.transaction import TransactionManager
from blockera.units import METADATA_BLOCK_BYTES

ARRAY_HEADER_BYTES = 24
_HEADER = struct.Struct("<IIII")   # csum max_entries nr_entries value_size (blocknr at 16)
_U64 = struct.Struct("<Q")


def array_max_entries(value_size: int) -> int:
    return (METADATA_BLOCK_BYTES - ARRAY_HEADER_BYTES) // value_size


def array_block_header(block: bytes | bytearray) -> tuple[int, int, int]:
    """(max_entries, nr_entries, value_size) of an array block."""
    _, max_entries, nr_entries, value_size = _HEADER.unpack_from(block, 0)
    return max_entries, nr_entries, value_size


class Array:
    """Arrays of `value_size`-byte integers over a transaction manager."""

    def __init__(self, tm: TransactionManager, value_size: int) -> None:
        self.tm = tm
        self.value_size = value_size
        self.max_entries = array_max_entries(value_size)
        self.btree = BTree(tm, ValueType(8, self._block_inc, self._block_dec,
                                         lambda a, b: a == b))

    # -- value type of the index btree: references to array blocks ---------------------------
    def _block_inc(self, values: bytes, count: int) -> None:
        for (b,) in struct.iter_unpack("<Q", values[: 8 * count]):
            self.tm.inc(b)

    def _block_dec(self, values: bytes, count: int) -> None:
        for (b,) in struct.iter_unpack("<Q", values[: 8 * count]):
            self.tm.dec(b)

    # -- blocks --------------------------------------------------------------------------------
    def _new_ablock(self) -> tuple[int, bytearray]:
        location, buf = self.tm.new_block(ARRAY_BLOCK)
        struct.pack_into("<III", buf, 4, self.max_entries, 0, self.value_size)
        return location, buf

    def _fill(self, buf: bytearray, value: bytes, new_nr: int) -> None:
        _, _, nr, _ = _HEADER.unpack_from(buf, 0)
        vs = self.value_size
        if new_nr > nr:
            buf[ARRAY_HEADER_BYTES + nr * vs: ARRAY_HEADER_BYTES + new_nr * vs] = value * (new_nr - nr)
        struct.pack_into("<I", buf, 8, new_nr)

    def _lookup_block(self, root: int, block_index: int) -> int:
        value = self.btree.lookup(root, block_index)
        if value is None:
            raise MetadataError(f"array block {block_index} is missing from the array's btree",
                                block=root)
        return _U64.unpack(value)[0]

    def _shadow_ablock(self, root: int, block_index: int) -> tuple[int, bytearray]:
        """Shadow array block `block_index`, repointing the btree; returns (root, buffer)."""
        b = self._lookup_block(root, block_index)
        new_location, buf, _ = self.tm.shadow(b, ARRAY_BLOCK)
        if new_location != b:
            self.tm.inc(b)
            root, _ = self.btree.insert(root, block_index, _U64.pack(new_location))
        return root, buf

    def _insert_new_ablock(self, root: int, block_index: int, nr: int, value: bytes) -> int:
        location, buf = self._new_ablock()
        self._fill(buf, value, nr)
        root, _ = self.btree.insert(root, block_index, _U64.pack(location))
        return root

    # -- operations ----------------------------------------------------------------------------
    def empty(self) -> int:
        return self.btree.empty()

    def resize(self, root: int, old_size: int, new_size: int, default: bytes) -> int:
        """Grow (new entries = `default`) or shrink to `new_size` entries; returns the root."""
        if old_size == new_size:
            return root
        m = self.max_entries
        old_full, old_last = divmod(old_size, m)
        new_full, new_last = divmod(new_size, m)
        if new_size > old_size:
            if new_full > old_full:
                old_blocks = old_full
                if old_last:
                    old_blocks += 1
                    root, buf = self._shadow_ablock(root, old_full)
                    self._fill(buf, default, m)
                for index in range(old_blocks, new_full):
                    root = self._insert_new_ablock(root, index, m, default)
                if new_last:
                    root = self._insert_new_ablock(root, new_full, new_last, default)
            elif old_last:
                root, buf = self._shadow_ablock(root, old_full)
                self._fill(buf, default, new_last)
            else:
                root = self._insert_new_ablock(root, new_full, new_last, default)
            return root
        if new_full < old_full:
            begin = new_full + (1 if new_last else 0)
            end = old_full + (1 if old_last else 0)
            for index in range(begin, end):
                root = self.btree.remove(root, index)
        if new_last:
            root, buf = self._shadow_ablock(root, new_full)
            struct.pack_into("<I", buf, 8, new_last)
        return root

    def get(self, root: int, index: int) -> bytes:
        block_index, entry = divmod(index, self.max_entries)
        block = self.tm.read(self._lookup_block(root, block_index), ARRAY_BLOCK)
        _, _, nr, _ = _HEADER.unpack_from(block, 0)
        if entry >= nr:
            raise MetadataError(f"array index {index} is beyond the array's last block")
        off = ARRAY_HEADER_BYTES + entry * self.value_size
        return bytes(block[off: off + self.value_size])

    def set(self, root: int, index: int, value: bytes) -> int:
        """Store `value` at `index`; returns the new root."""
        block_index, entry = divmod(index, self.max_entries)
        root, buf = self._shadow_ablock(root, block_index)
        _, _, nr, _ = _HEADER.unpack_from(buf, 0)
        if entry >= nr:
            raise MetadataError(f"array index {index} is beyond the array's last block")
        off = ARRAY_HEADER_BYTES + entry * self.value_size
        buf[off: off + self.value_size] = value
        return root

    def _entries(self, root: int, indexes: Iterable[int]
                 ) -> tuple[int, list[tuple[bytearray, int]]]:
        """The new root and, for each index in order, its block's buffer and byte offset there.
        Every array block is shadowed once, the first time one of its indexes comes up, so
        allocations happen in the same order as a `set` per index in that order would make
        them (the later sets of a block already shadowed change it in place)."""
        vs = self.value_size
        buffers: dict[int, bytearray] = {}
        out = []
        for index in indexes:
            block_index, entry = divmod(index, self.max_entries)
            buf = buffers.get(block_index)
            if buf is None:
                root, buf = self._shadow_ablock(root, block_index)
                buffers[block_index] = buf
            _, _, nr, _ = _HEADER.unpack_from(buf, 0)
            if entry >= nr:
                raise MetadataError(f"array index {index} is beyond the array's last block")
            out.append((buf, ARRAY_HEADER_BYTES + entry * vs))
        return root, out

    def set_many(self, root: int, indexes: list[int], value: bytes) -> int:
        """Store `value` at each of `indexes`, in their order; returns the new root (the
        allocations of one `set` per index, see `_entries`)."""
        root, entries = self._entries(root, indexes)
        vs = self.value_size
        for buf, off in entries:
            buf[off: off + vs] = value
        return root

    def or_words(self, root: int, masks: dict[int, int]) -> int:
        """OR each mask of `masks` (index -> integer) into the value at that index, visiting
        the indexes in the dict's order; returns the new root (the allocations of one `set`
        per index, see `_entries`)."""
        root, entries = self._entries(root, masks)
        vs = self.value_size
        for (buf, off), mask in zip(entries, masks.values()):
            old = int.from_bytes(buf[off: off + vs], "little")
            buf[off: off + vs] = (old | mask).to_bytes(vs, "little")
        return root

    def delete(self, root: int) -> None:
        self.btree.delete(root)

