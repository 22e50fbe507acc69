"""dm-bitset (docs/persistent-data.md §6; the kernel's dm-bitset.c).

A bitset of n bits is a dm-array of ceil(n/64) little-endian u64 words; bit i is bit i%64 of word
i//64. Like the kernel, one word is cached: `set_bit` changes only the cached word, which is
written back into the array when another word is touched or at `flush` (dm-era flushes before
every commit, so committed metadata holds every bit that was acted on).
"""

from __future__ import annotations

import struct
from typing import Iterable

from blockera.pdata.array import Array
from blockera.pdata.transaction import TransactionManager

BITS_PER_WORD = 64
_U64 = struct.Struct("<Q")


def words_for_bits(nr_bits: int) -> int:
    return -(-nr_bits // BITS_PER_WORD)


class Bitset:
    """A cached-word view of on-disk bitsets (one cache per instance, as per dm_disk_bitset)."""

    def __init__(self, tm: TransactionManager) -> None:
        self.array = Array(tm, 8)
        self._index: int | None = None
        self._bits = 0
        self._dirty = False

    def empty(self) -> int:
        return self.array.empty()

    def resize(self, root: int, old_nr_bits: int, new_nr_bits: int, default: bool) -> int:
        word = b"\xff" * 8 if default else bytes(8)
        return self.array.resize(root, words_for_bits(old_nr_bits), words_for_bits(new_nr_bits),
                                 word)

    def delete(self, root: int) -> None:
        self.array.delete(root)

    def flush(self, root: int) -> int:
        """Write the cached word back if it changed; returns the (possibly new) root."""
        if self._index is None or not self._dirty:
            return root
        root = self.array.set(root, self._index, _U64.pack(self._bits))
        self._index = None
        self._dirty = False
        return root

    def _load(self, root: int, bit: int) -> int:
        index = bit // BITS_PER_WORD
        if self._index is not None:
            if self._index == index:
                return root
            root = self.flush(root)
        self._bits = _U64.unpack(self.array.get(root, index))[0]
        self._index = index
        self._dirty = False
        return root

    def set_bit(self, root: int, bit: int) -> int:
        root = self._load(root, bit)
        self._bits |= 1 << (bit % BITS_PER_WORD)
        self._dirty = True
        return root


    def set_bits(self, root: int, bits: Iterable[int]) -> int:
        """Set every bit of `bits` and write the words back (no word stays cached); returns
        the new root. The array sees the same changes in the same order as `set_bit` on each
        bit followed by `flush`: each word is written once, its array block shadowed when the
        cache would first have written a word of it, so a batch allocates exactly the blocks,
        in the order, that bit-by-bit setting would."""
        masks: dict[int, int] = {}
        if self._index is not None and self._dirty:
            masks[self._index] = self._bits     # the cached word is written first
        self._index = None
        self._dirty = False
        for bit in bits:
            index = bit // BITS_PER_WORD
            masks[index] = masks.get(index, 0) | (1 << (bit % BITS_PER_WORD))
        if not masks:
            return root
        return self.array.or_words(root, masks)

    def forget(self) -> None:
        """Drop the cached word without writing it (after an aborted transaction)."""
        self._index = None
        self._dirty = False
