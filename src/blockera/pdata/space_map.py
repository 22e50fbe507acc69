"""The metadata space map: reference counts of the metadata device's own blocks
(docs/persistent-data.md §3; the kernel's dm-space-map-metadata.c and dm-space-map-common.c).

On disk: a 32-byte root in the superblock (nr_blocks, nr_allocated, index block, ref-count btree
root); one index block of up to 255 entries {bitmap block, nr_free, none_free_before}; bitmap
blocks of 16320 two-bit counts (0-2, or 3 = "look in the ref-count btree", whose u32 values hold
counts >= 3).

In memory every count lives in a numpy array. The kernel's transaction behaviour is kept exactly:
a bitmap is shadowed the first time one of its counts changes in a transaction, the index block
is shadowed at commit, updates made while the space map is itself allocating are queued and
applied afterwards, a new block must be free in both the committed and the current counts, and
`allocated_this_transaction` feeds the status line's `used` figure.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass

import numpy as np

from blockera.errors import MetadataError, NoSpaceError
from blockera.pdata.block_manager import BlockManager
from blockera.pdata.btree import BTree, ValueType
from blockera.pdata.checksum import BITMAP_BLOCK, INDEX_BLOCK
from blockera.pdata.transaction import TransactionManager

ENTRIES_PER_BITMAP = 16320  # (4096 - 16) * 4
MAX_BITMAPS = 255
MAX_METADATA_BLOCKS = MAX_BITMAPS * ENTRIES_PER_BITMAP

_ROOT = struct.Struct("<QQQQ")
_INDEX_ENTRY = struct.Struct("<QII")


@dataclass
class SpaceMapRoot:
    nr_blocks: int
    nr_allocated: int
    bitmap_root: int
    ref_count_root: int

    @classmethod
    def unpack(cls, data: bytes | bytearray) -> "SpaceMapRoot":
        return cls(*_ROOT.unpack_from(data, 0))

    def pack(self) -> bytes:
        return _ROOT.pack(self.nr_blocks, self.nr_allocated, self.bitmap_root,
                          self.ref_count_root)


@dataclass
class IndexEntry:
    """One bitmap's entry in the space map's index block (16 bytes at 16 + 16 * i)."""

    blocknr: int
    nr_free: int
    none_free_before: int

    @classmethod
    def unpack_from(cls, index_block: bytes | bytearray, i: int) -> "IndexEntry":
        return cls(*_INDEX_ENTRY.unpack_from(index_block, 16 + 16 * i))

    def pack_into(self, index_block: bytearray, i: int) -> None:
        _INDEX_ENTRY.pack_into(index_block, 16 + 16 * i, self.blocknr, self.nr_free,
                               self.none_free_before)


def nr_bitmaps(nr_blocks: int) -> int:
    return -(-nr_blocks // ENTRIES_PER_BITMAP)


def decode_bitmap(block: bytes | bytearray | memoryview, count: int = ENTRIES_PER_BITMAP
                  ) -> np.ndarray:
    """The first `count` two-bit entries of a bitmap block as uint8 values 0..3. Entry e sits
    in byte e // 4 at bits 2 * (e % 4) and up, its high bit first (the kernel's test_bit_le of
    bit 2e is the high bit, of 2e + 1 the low bit)."""
    data = np.frombuffer(block, dtype=np.uint8, count=ENTRIES_PER_BITMAP // 4, offset=16)
    pairs = np.empty((len(data), 4), dtype=np.uint8)
    for i, shift in enumerate((0, 2, 4, 6)):
        pairs[:, i] = (data >> shift) & 3
    pairs = pairs.reshape(-1)[:count]
    return ((pairs & 1) << 1) | (pairs >> 1)


def encode_bitmap(values: np.ndarray) -> bytes:
    """Pack up to 16320 counts (clipped to 3) into a bitmap block's 4080 data bytes."""
    v = np.zeros(ENTRIES_PER_BITMAP, dtype=np.uint8)
    v[: len(values)] = np.minimum(values, 3)
    pairs = (((v >> 1) & 1) | ((v & 1) << 1)).reshape(-1, 4)
    return (pairs[:, 0] | (pairs[:, 1] << 2) | (pairs[:, 2] << 4) | (pairs[:, 3] << 6)).tobytes()


def _set_entry(encoded: bytearray, entry: int, value: int) -> None:
    """Store a two-bit count (0..3) as entry `entry` of a bitmap's encoded data bytes, in
    `encode_bitmap`'s layout (high bit of the count in the lower bit position)."""
    shift = 2 * (entry & 3)
    pair = ((value >> 1) & 1) | ((value & 1) << 1)
    byte = entry >> 2
    encoded[byte] = (encoded[byte] & ~(3 << shift) & 0xFF) | (pair << shift)


def _u32_value(count: int) -> bytes:
    return struct.pack("<I", count)


class MetadataSpaceMap:
    """Reference counts for every block of a metadata device, kernel-compatible on disk and in
    its allocation accounting."""

    def __init__(self, tm: TransactionManager) -> None:
        self.tm = tm
        self.ref_tree = BTree(tm, ValueType(4))
        self.nr_blocks = 0
        self.counts = np.zeros(0, dtype=np.uint32)
        self.nr_allocated = 0
        self.committed_nr_allocated = 0
        self.allocated_this_transaction = 0
        self.index: list[IndexEntry] = []
        self.index_changed = False
        self.bitmap_root = 0
        self.ref_count_root = 0
        self.cursor = 0
        self._committed: dict[int, int] = {}   # counts at the last commit, for changed blocks
        self._depth = 0
        self._pending: deque[tuple[int, int]] = deque()
        self._bootstrap = False
        # Encoded data bytes of bitmap blocks, kept in step with `counts` once made, so that a
        # commit copies a bitmap instead of encoding 16320 counts again.
        self._encoded: dict[int, bytearray] = {}

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def _create(cls, tm: TransactionManager, nr_blocks: int, superblock: int
                ) -> "MetadataSpaceMap":
        """Format a space map over `nr_blocks` (capped at 255 bitmaps), with the kernel's
        bootstrap layout: index, ref-count root and bitmaps follow the superblock."""
        sm = cls(tm)
        tm.sm = sm
        nr_blocks = min(nr_blocks, MAX_METADATA_BLOCKS)
        sm.nr_blocks = nr_blocks
        sm.counts = np.zeros(nr_blocks, dtype=np.uint32)
        sm.cursor = superblock + 1
        sm._bootstrap = True
        sm.bitmap_root, _ = tm.new_block(INDEX_BLOCK)
        sm.ref_count_root = sm.ref_tree.empty()
        for _ in range(nr_bitmaps(nr_blocks)):
            location, _ = tm.new_block(BITMAP_BLOCK)
            sm.index.append(IndexEntry(location, ENTRIES_PER_BITMAP, 0))
        sm.index_changed = True
        sm._bootstrap = False
        end = sm.cursor
        for b in range(superblock, end):
            sm.inc(b)
        sm.commit()
        return sm

    @classmethod
    def _open(cls, tm: TransactionManager, root: SpaceMapRoot) -> "MetadataSpaceMap":
        """Load a committed space map, validating the index, bitmaps and ref-count tree."""
        sm = cls(tm)
        tm.sm = sm
        bm = tm.bm
        if root.nr_blocks > MAX_METADATA_BLOCKS or nr_bitmaps(root.nr_blocks) > MAX_BITMAPS:
            raise MetadataError(f"space map claims {root.nr_blocks} blocks, more than the "
                                f"maximum {MAX_METADATA_BLOCKS}")
        if root.nr_blocks > bm.nr_blocks:
            raise MetadataError(f"space map covers {root.nr_blocks} blocks but the metadata "
                                f"device has only {bm.nr_blocks}: it is too small for this "
                                "metadata (truncated copy?)")
        sm.nr_blocks = root.nr_blocks
        sm.nr_allocated = sm.committed_nr_allocated = root.nr_allocated
        sm.bitmap_root = root.bitmap_root
        sm.ref_count_root = root.ref_count_root
        bm.check_location(root.bitmap_root, "space map index")
        index_block = tm.read(root.bitmap_root, INDEX_BLOCK)
        counts = np.zeros(sm.nr_blocks, dtype=np.uint32)
        for i in range(nr_bitmaps(sm.nr_blocks)):
            entry = IndexEntry.unpack_from(index_block, i)
            sm.index.append(entry)
            bm.check_location(entry.blocknr, f"space map bitmap {i}")
            bitmap = tm.read(entry.blocknr, BITMAP_BLOCK)
            start = i * ENTRIES_PER_BITMAP
            n = min(ENTRIES_PER_BITMAP, sm.nr_blocks - start)
            counts[start: start + n] = decode_bitmap(bitmap, n)
        overflow = np.flatnonzero(counts == 3)
        if len(overflow):
            bm.check_location(root.ref_count_root, "ref-count tree root")
            big = dict((k, struct.unpack("<I", v)[0])
                       for k, v in sm.ref_tree.walk(root.ref_count_root))
            for b in overflow.tolist():
                if b not in big or big[b] < 3:
                    raise MetadataError(f"space map: count of block {b} is in the overflow "
                                        "tree but the tree has no valid entry for it")
                counts[b] = big[b]
        sm.counts = counts
        sm.cursor = 0
        return sm

    def root(self) -> SpaceMapRoot:
        return SpaceMapRoot(self.nr_blocks, self.nr_allocated, self.bitmap_root,
                            self.ref_count_root)

    # -- queries ---------------------------------------------------------------------------------
    def _pending_adjustment(self, b: int) -> int:
        if not self._pending:
            return 0
        return sum(delta for block, delta in self._pending if block == b)

    def get_count(self, b: int) -> int:
        self._check(b)
        return int(self.counts[b]) + self._pending_adjustment(b)

    def count_is_more_than_one(self, b: int) -> bool:
        self._check(b)
        adjustment = self._pending_adjustment(b)
        if adjustment > 1:
            return True
        count = int(self.counts[b])
        return count >= 3 or count + adjustment > 1

    def nr_free(self) -> int:
        """Free blocks as the status line reports them: committed free minus the blocks
        allocated in this transaction (blocks freed in it are not free until commit)."""
        return self.nr_blocks - self.committed_nr_allocated - self.allocated_this_transaction

    def used(self) -> int:
        return self.nr_blocks - self.nr_free()


    def _check(self, b: int) -> None:
        if not 0 <= b < self.nr_blocks:
            raise MetadataError(f"reference to block {b}, beyond the {self.nr_blocks} blocks "
                                "the space map covers")

    # -- updates ---------------------------------------------------------------------------------
    def inc(self, b: int) -> None:
        self._update(b, 1)

    def dec(self, b: int) -> None:
        self._update(b, -1)

    def _update(self, b: int, delta: int) -> None:
        self._check(b)
        if self._depth or self._bootstrap:
            self._pending.append((b, delta))
            return
        self._depth += 1
        try:
            self._mutate(b, delta)
            while self._pending:
                pb, pd = self._pending.popleft()
                self._mutate(pb, pd)
        finally:
            self._depth -= 1

    def _mutate(self, b: int, delta: int) -> None:
        i, bit = divmod(b, ENTRIES_PER_BITMAP)
        entry = self.index[i]
        entry.blocknr = self.tm.relocate(entry.blocknr)
        old = int(self.counts[b])
        new = old + delta
        if new < 0:
            raise MetadataError("unable to decrement a reference count below 0", block=b)
        if b not in self._committed:
            self._committed[b] = old
        self.counts[b] = new
        encoded = self._encoded.get(i)
        if encoded is not None and min(old, 3) != min(new, 3):
            _set_entry(encoded, bit, min(new, 3))
        if new > 2:
            self.ref_count_root, _ = self.ref_tree.insert(self.ref_count_root, b, _u32_value(new))
        elif old > 2:
            self.ref_count_root = self.ref_tree.remove(self.ref_count_root, b)
        if new and not old:
            self.nr_allocated += 1
            entry.nr_free -= 1
            if entry.none_free_before == bit:
                entry.none_free_before = bit + 1
        elif old and not new:
            self.nr_allocated -= 1
            entry.nr_free += 1
            entry.none_free_before = min(entry.none_free_before, bit)
        self.index_changed = True

    def new_block(self) -> int:
        """Allocate a block free in both the committed and the current counts, searching from
        a cursor that moves up and wraps (the 6.1 kernel's policy)."""
        if self._bootstrap:
            if self.cursor >= self.nr_blocks:
                raise NoSpaceError("metadata device is too small for a space map")
            b = self.cursor
            self.cursor += 1
            return b
        b = self._find_free(self.cursor, self.nr_blocks)
        if b is None:
            b = self._find_free(0, self.cursor)
        if b is None:
            raise NoSpaceError(
                f"metadata device is full: all {self.nr_blocks} metadata blocks are in use "
                "(unable to allocate new metadata block); give it a larger metadata device")
        self.cursor = b + 1
        self._update(b, 1)
        self.allocated_this_transaction += 1
        return b

    def _find_free(self, begin: int, end: int) -> int | None:
        """First block in [begin, end) free now and at the last commit (and not about to be
        counted by a queued update). Searches a small window first, since the next free block
        is usually right after the cursor."""
        pending = {blk for blk, d in self._pending if d > 0} if self._pending else ()

        def free_since_commit(b: int) -> bool:      # (its current count is known to be 0)
            return self._committed.get(b, 0) == 0 and b not in pending

        if begin < end and self.counts[begin] == 0 and free_since_commit(begin):
            return begin            # the usual case: the block at the cursor
        window = 64
        pos = begin
        while pos < end:
            stop = min(end, pos + window)
            for off in np.flatnonzero(self.counts[pos:stop] == 0).tolist():
                if free_since_commit(pos + off):
                    return pos + off
            pos = stop
            window = min(window * 8, 1 << 16)
        return None

    # -- commit ----------------------------------------------------------------------------------
    def _bitmap_bytes(self, i: int) -> bytearray:
        """The data bytes of bitmap `i` for the current counts (encoded once, then updated
        entry by entry in `_mutate`)."""
        encoded = self._encoded.get(i)
        if encoded is None:
            start = i * ENTRIES_PER_BITMAP
            values = self.counts[start: min(start + ENTRIES_PER_BITMAP, self.nr_blocks)]
            encoded = self._encoded[i] = bytearray(encode_bitmap(values))
        return encoded

    def commit(self) -> None:
        """Write changed bitmaps and the index (shadowing the index first, as the kernel's
        metadata_ll_commit does); afterwards the current counts are the committed ones."""
        if self.index_changed:
            self.bitmap_root = self.tm.relocate(self.bitmap_root)
            self.index_changed = False
            bm = self.tm.bm
            for i, entry in enumerate(self.index):
                if not self.tm.is_shadow(entry.blocknr):
                    continue
                buf = bm.write_lock_zero(entry.blocknr, BITMAP_BLOCK)
                buf[16:] = self._bitmap_bytes(i)
            buf = bm.write_lock_zero(self.bitmap_root, INDEX_BLOCK)
            for i, entry in enumerate(self.index):
                entry.pack_into(buf, i)
        self._committed.clear()
        self.committed_nr_allocated = self.nr_allocated
        self.allocated_this_transaction = 0


def format_metadata(bm: BlockManager, superblock: int = 0
                    ) -> tuple[TransactionManager, MetadataSpaceMap]:
    """A transaction manager and a new space map over the whole device (the kernel's
    dm_tm_create_with_sm): the space map's blocks follow the superblock."""
    tm = TransactionManager(bm)
    return tm, MetadataSpaceMap._create(tm, bm.nr_blocks, superblock)


def open_metadata(bm: BlockManager, root: SpaceMapRoot
                  ) -> tuple[TransactionManager, MetadataSpaceMap]:
    """A transaction manager and the committed space map `root` describes (the kernel's
    dm_tm_open_with_sm)."""
    tm = TransactionManager(bm)
    return tm, MetadataSpaceMap._open(tm, root)
