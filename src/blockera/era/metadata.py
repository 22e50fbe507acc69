"""dm-era metadata: open or format, and every metadata-level operation the era target performs
(docs/era.md §1, §2, §3; the kernel's `struct era_metadata` and metadata_* functions).

Open/format, resize, rollover (archive + new era), commit (bitset flush, space-map commit, write
all blocks, flush, superblock, flush), take/drop of the metadata snapshot, and digestion of
archived writesets into the era array, step by step as the kernel's worker does it. The in-core
writesets (two bitmaps of nr_blocks bits) live here too, as numpy words.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from blockera.blockdev import BlockDevice
from blockera.errors import MetadataError, TargetError
from blockera.pdata.array import Array
from blockera.pdata.bitset import Bitset, words_for_bits
from blockera.pdata.block_manager import BlockManager
from blockera.pdata.btree import BTree, ValueType
from blockera.pdata.space_map import format_metadata, open_metadata
from blockera.era.superblock import (MAX_ORIGIN_BLOCKS, SUPERBLOCK, SUPERBLOCK_LOCATION,
                                     Superblock, Writeset)
from blockera.units import METADATA_BLOCK_BYTES

INSERTS_PER_STEP = 100
_U32 = struct.Struct("<I")


class InCoreWriteset:
    """A writeset: its on-disk record plus an in-memory copy of its bits."""

    def __init__(self) -> None:
        self.md = Writeset()
        self.words = np.zeros(0, dtype=np.uint64)

    def alloc(self, nr_blocks: int) -> None:
        self.words = np.zeros(words_for_bits(nr_blocks), dtype=np.uint64)

    def marked(self, block: int) -> bool:
        return bool((int(self.words[block >> 6]) >> (block & 63)) & 1)

    def mark(self, block: int) -> None:
        self.words[block >> 6] |= np.uint64(1 << (block & 63))

    def mark_many(self, blocks: list[int]) -> None:
        if len(blocks) < 8:         # numpy's set-up costs more than a few single marks
            for block in blocks:
                self.mark(block)
            return
        b = np.asarray(blocks, dtype=np.uint64)
        np.bitwise_or.at(self.words, b >> np.uint64(6),
                         np.left_shift(np.uint64(1), b & np.uint64(63)))


@dataclass
class Stats:
    used: int
    total: int
    snap: int
    era: int


class DigestProgress:
    """The digestion coroutine: lookup -> transcribe (100 bits per step) -> remove -> lookup."""

    def __init__(self) -> None:
        self.step: str | None = None
        self.era = 0
        self.nr_bits = 0
        self.current_bit = 0
        self.writeset = Writeset()


class EraMetadata:
    """Open (or format) era metadata on `dev` for origin blocks of `block_size` sectors."""

    def __init__(self, dev: BlockDevice, block_size: int, *, may_format: bool = True) -> None:
        self.dev = dev
        self.block_size = block_size
        self.bm = BlockManager(dev)
        if self.bm.nr_blocks == 0:
            raise MetadataError(f"metadata device {dev.name} is smaller than one 4 KiB block")
        self.writesets = [InCoreWriteset(), InCoreWriteset()]
        self.current_writeset = self.writesets[0]
        self.nr_blocks = 0
        self.current_era = 0
        self.writeset_tree_root = 0
        self.era_array_root = 0
        self.metadata_snap = 0
        self.archived_writesets = False
        block0 = self.bm.read_raw(SUPERBLOCK_LOCATION)
        self._known_superblock = bytes(block0)
        if block0 == bytes(METADATA_BLOCK_BYTES):
            if not may_format:
                raise MetadataError("metadata device is unformatted (block 0 is all zeros)",
                                    block=0, errno_name="EPERM")
            self._format()
        else:
            self._open()

    # -- setup ---------------------------------------------------------------------------------
    def _setup_infos(self) -> None:
        self.bitset_info = Bitset(self.tm)
        self.writeset_tree = BTree(self.tm, ValueType(12, self._ws_inc, self._ws_dec,
                                                      lambda a, b: a == b))
        self.era_array = Array(self.tm, 4)

    def _ws_inc(self, values: bytes, count: int) -> None:
        for i in range(count):
            self.tm.inc(Writeset.unpack(values, 12 * i).root)

    def _ws_dec(self, values: bytes, count: int) -> None:
        for i in range(count):
            Bitset(self.tm).delete(Writeset.unpack(values, 12 * i).root)

    def _format(self) -> None:
        self.tm, self.sm = format_metadata(self.bm, SUPERBLOCK_LOCATION)
        self._setup_infos()
        self.writeset_tree_root = self.writeset_tree.empty()
        self.era_array_root = self.era_array.empty()
        # The kernel writes its first superblock without committing the space map again, which
        # leaves the index lagging the bitmap; committing it keeps the two consistent.
        self.tm.pre_commit()
        sb = self._superblock_fields(bytearray(METADATA_BLOCK_BYTES))
        self._commit_superblock(sb)

    def _open(self) -> None:
        data = self.bm.read(SUPERBLOCK_LOCATION, SUPERBLOCK)
        sb = Superblock.unpack(data)
        if self.block_size and sb.data_block_size != self.block_size:
            raise MetadataError(
                f"changing the data block size (from {sb.data_block_size} to "
                f"{self.block_size}) is not supported", errno_name="EINVAL")
        try:
            self.tm, self.sm = open_metadata(self.bm, sb.space_map_root)
        except MetadataError as exc:
            raise MetadataError(f"couldn't open metadata space map: {exc}") from None
        self._setup_infos()
        self.block_size = sb.data_block_size
        self.nr_blocks = sb.nr_blocks
        self.current_era = sb.current_era
        self.current_writeset.md = Writeset(sb.current_writeset.nr_bits, sb.current_writeset.root)
        self.writeset_tree_root = sb.writeset_tree_root
        self.era_array_root = sb.era_array_root
        self.metadata_snap = sb.metadata_snap
        self.archived_writesets = True

    def committed_elsewhere(self) -> bool:
        """True if the superblock on disk is neither the one this instance opened nor the last
        one it committed: another instance (the previous table of a reloaded device) committed
        after this one was opened, so this one's view of the metadata is stale."""
        return bytes(self.bm.read_raw(SUPERBLOCK_LOCATION)) != self._known_superblock

    # -- superblock and commit -----------------------------------------------------------------
    def _superblock_fields(self, block: bytearray) -> bytearray:
        sb = Superblock(
            sm_root=self.sm.root().pack(),
            data_block_size=self.block_size,
            nr_blocks=self.nr_blocks,
            current_era=self.current_era,
            current_writeset=Writeset(self.current_writeset.md.nr_bits,
                                      self.current_writeset.md.root),
            writeset_tree_root=self.writeset_tree_root,
            era_array_root=self.era_array_root,
            metadata_snap=self.metadata_snap,
        )
        sb.pack_into(block)
        return block

    def commit(self) -> None:
        """metadata_commit: flush the cached bitset word, commit the space map, write all
        changed blocks and flush, then write the superblock and flush."""
        ws = self.current_writeset.md
        if ws.root:
            ws.root = self.bitset_info.flush(ws.root)
        self.tm.pre_commit()
        existing = bytearray(self.bm.read(SUPERBLOCK_LOCATION, SUPERBLOCK))
        self._commit_superblock(self._superblock_fields(existing))

    def _commit_superblock(self, block: bytearray) -> None:
        self.tm.commit(SUPERBLOCK, block)     # stamps `block` (checksum) as written
        self._known_superblock = bytes(block)

    def abort(self) -> None:
        """Forget everything since the last commit and reload the committed state (used after
        a failed transaction, e.g. a full metadata device)."""
        self.tm.abort()
        self.bitset_info.forget()
        self.bm.forget_cache()
        keep = [ws.words for ws in self.writesets]
        current = self.writesets.index(self.current_writeset)
        self._open()
        for ws, words in zip(self.writesets, keep):
            ws.words = words
        self.current_writeset = self.writesets[current]
        self.archived_writesets = True

    # -- operations ------------------------------------------------------------------------------
    def resize(self, new_nr_blocks: int) -> None:
        if new_nr_blocks >= MAX_ORIGIN_BLOCKS:
            raise TargetError(f"Invalid number of origin blocks {new_nr_blocks}")
        for ws in self.writesets:
            ws.alloc(new_nr_blocks)
        self.era_array_root = self.era_array.resize(self.era_array_root, self.nr_blocks,
                                                    new_nr_blocks, bytes(4))
        self.nr_blocks = new_nr_blocks

    def era_archive(self) -> None:
        ws = self.current_writeset.md
        ws.root = self.bitset_info.flush(ws.root)
        self.writeset_tree_root, _ = self.writeset_tree.insert(
            self.writeset_tree_root, self.current_era, ws.pack())
        ws.root = 0
        self.archived_writesets = True

    def new_era(self) -> None:
        new = self.writesets[1] if self.current_writeset is self.writesets[0] else self.writesets[0]
        new.words[:] = 0
        new.md.nr_bits = self.nr_blocks
        root = self.bitset_info.empty()
        new.md.root = self.bitset_info.resize(root, 0, self.nr_blocks, False)
        self.current_writeset = new
        self.current_era += 1

    def era_rollover(self) -> None:
        if self.current_writeset.md.root:
            self.era_archive()
        self.new_era()

    def checkpoint(self) -> None:
        self.era_rollover()

    def take_snap(self) -> None:
        if self.metadata_snap:
            raise TargetError("metadata snapshot already exists")
        self.era_rollover()
        self.commit()
        self.tm.inc(SUPERBLOCK_LOCATION)
        clone, _, inc = self.tm.shadow(SUPERBLOCK_LOCATION, SUPERBLOCK)
        assert inc, "superblock shadow did not copy"
        self.tm.inc(self.writeset_tree_root)
        self.tm.inc(self.era_array_root)
        self.metadata_snap = clone

    def drop_snap(self) -> None:
        if not self.metadata_snap:
            raise TargetError("no snap to drop")
        clone = Superblock.unpack(self.tm.read(self.metadata_snap, SUPERBLOCK))
        location = self.metadata_snap
        self.metadata_snap = 0
        self.writeset_tree.delete(clone.writeset_tree_root)
        self.era_array.delete(clone.era_array_root)
        self.tm.dec(location)

    def stats(self) -> Stats:
        return Stats(self.sm.used(), self.sm.nr_blocks, self.metadata_snap, self.current_era)

    # -- the write path ------------------------------------------------------------------------
    def current_marked(self, block: int) -> bool:
        return self.current_writeset.marked(block)

    def writeset_test_and_set(self, block: int) -> bool:
        """Set `block` in the on-disk current writeset unless the in-core copy already has it;
        returns True if it was already marked (the in-core bit is set by the caller only after
        the metadata commit succeeds)."""
        ws = self.current_writeset
        if ws.marked(block):
            return True
        ws.md.root = self.bitset_info.set_bit(ws.md.root, block)
        return False

    def writeset_set_many(self, blocks: list[int]) -> list[int]:
        """`writeset_test_and_set` for a batch: set, in the on-disk current writeset, every
        block of `blocks` the in-core copy does not have, with one write per bitset word (the
        same metadata changes, in the same order, as setting them one by one). Returns the
        blocks that were not marked yet, in order (the caller marks them in core once the
        commit has succeeded)."""
        ws = self.current_writeset
        words = ws.words
        fresh = [b for b in blocks if not (int(words[b >> 6]) >> (b & 63)) & 1]
        if fresh:
            ws.md.root = self.bitset_info.set_bits(ws.md.root, fresh)
        return fresh

    # -- digestion -------------------------------------------------------------------------------
    def digest_start(self, digest: DigestProgress) -> None:
        if digest.step is None:
            digest.__init__()
            digest.step = "lookup"

    def digest_step(self, digest: DigestProgress) -> None:
        """Run one step of digestion (the kernel's metadata_digest_* functions)."""
        if digest.step == "lookup":
            key = self.writeset_tree.find_lowest_key(self.writeset_tree_root)
            value = None if key is None else self.writeset_tree.lookup(self.writeset_tree_root, key)
            if value is None:
                digest.step = None
                return
            digest.era = key
            digest.writeset = Writeset.unpack(value)
            digest.nr_bits = min(digest.writeset.nr_bits, self.nr_blocks)
            digest.current_bit = 0
            digest.step = "transcribe"
        elif digest.step == "transcribe":
            begin = digest.current_bit
            end = min(begin + INSERTS_PER_STEP, digest.nr_bits)
            value = _U32.pack(digest.era & 0xFFFFFFFF)
            self.era_array_root = self.era_array.set_many(
                self.era_array_root, self._marked_bits(digest.writeset.root, begin, end), value)
            if end == digest.nr_bits:
                digest.step = "remove"
            else:
                digest.current_bit = end
        elif digest.step == "remove":
            self.writeset_tree_root = self.writeset_tree.remove(self.writeset_tree_root,
                                                                digest.era)
            digest.step = "lookup"

    def _marked_bits(self, root: int, begin: int, end: int) -> list[int]:
        """Bits set in [begin, end) of an archived (flushed) bitset, read word by word."""
        bits: list[int] = []
        array = self.bitset_info.array
        word_index = begin >> 6
        while (word_index << 6) < end:
            word = struct.unpack("<Q", array.get(root, word_index))[0]
            base = word_index << 6
            lo = max(begin - base, 0)
            hi = min(end - base, 64)
            word >>= lo
            bit = lo
            while word and bit < hi:
                if word & 1:
                    bits.append(base + bit)
                word >>= 1
                bit += 1
            word_index += 1
        return bits

    def digest_all(self) -> None:
        """Digest every archived writeset now (tools and tests; the target steps instead)."""
        digest = DigestProgress()
        self.digest_start(digest)
        while digest.step is not None:
            self.digest_step(digest)

    def close(self) -> None:
        self.dev.flush()
