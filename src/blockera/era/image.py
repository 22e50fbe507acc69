"""Read-only, validating access to dm-era metadata for the tools (docs/era.md §2,
§5).

`EraImage` opens the live superblock or, on request, the held metadata snapshot, and returns the
writeset tree, each writeset's bits and the era array as numpy arrays. The derived views are the
ones users need: which blocks changed since an era (`changed_since`) and the era in which each
block was last written (`logical_eras`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from blockera.blockdev import BlockDevice
from blockera.errors import MetadataError
from blockera.era.superblock import (SUPERBLOCK, SUPERBLOCK_LOCATION, Superblock, Writeset,
                                     structural_problems)
from blockera.pdata.bitset import words_for_bits
from blockera.pdata.block_manager import BlockManager
from blockera.pdata.walkers import ArrayReader, read_array, walk_btree


@dataclass
class WritesetBits:
    """One writeset: its era, size in bits, bitset root, and words (bits >= nr_bits cleared)."""

    era: int
    nr_bits: int
    root: int
    words: np.ndarray

    def bools(self) -> np.ndarray:
        """One bool per bit, length nr_bits."""
        raw = np.unpackbits(self.words.view(np.uint8), bitorder="little")
        return raw[: self.nr_bits].astype(bool)


def _mask_tail(words: np.ndarray, nr_bits: int) -> np.ndarray:
    tail = nr_bits % 64
    if tail and len(words):
        words[-1] &= np.uint64((1 << tail) - 1)
    return words


class EraImage:
    """dm-era metadata opened for reading. With `use_snapshot`, the writeset tree and era array
    come from the held metadata snapshot instead of the live superblock."""

    def __init__(self, dev: BlockDevice, *, use_snapshot: bool = False) -> None:
        self.bm = BlockManager(dev)
        if self.bm.nr_blocks == 0:
            raise MetadataError(f"{dev.name}: metadata device/file too small (less than one "
                                "4 KiB block); is this binary era metadata?")
        self.live = Superblock.unpack(self.bm.read(SUPERBLOCK_LOCATION, SUPERBLOCK))
        _refuse_unusable(self.live, self.bm.nr_blocks, "superblock")
        self.from_snapshot = use_snapshot
        if use_snapshot:
            if not self.live.metadata_snap:
                raise MetadataError("no metadata snapshot taken: send take_metadata_snap to the "
                                    "era device first")
            self.bm.check_location(self.live.metadata_snap, "metadata snapshot")
            self.sb = Superblock.unpack(self.bm.read(self.live.metadata_snap, SUPERBLOCK))
            _refuse_unusable(self.sb, self.bm.nr_blocks, "metadata snapshot")
        else:
            self.sb = self.live

    @property
    def nr_blocks(self) -> int:
        return self.sb.nr_blocks

    @property
    def current_era(self) -> int:
        return self.sb.current_era

    def writeset_records(self, seen: set[int] | None = None) -> list[tuple[int, Writeset]]:
        """(era, record) of every archived writeset, ascending era."""
        leaves = walk_btree(self.bm, self.sb.writeset_tree_root, 12, "writeset tree", seen)
        return [(int(era), Writeset.unpack(bytes(value)))
                for era, value in zip(leaves.keys.tolist(), leaves.values)]

    def read_writeset(self, era: int, record: Writeset,
                      seen: set[int] | None = None) -> WritesetBits:
        contents = read_array(self.bm, record.root, words_for_bits(record.nr_bits), "<u8",
                              f"writeset of era {era}", seen)
        return WritesetBits(era, record.nr_bits, record.root,
                            _mask_tail(contents.values, record.nr_bits))

    def writeset_reader(self, era: int, record: Writeset) -> ArrayReader:
        """The words of a writeset, read on demand (see `bits`)."""
        return ArrayReader(self.bm, record.root, words_for_bits(record.nr_bits), "<u8",
                           f"writeset of era {era}")

    def era_array_reader(self) -> ArrayReader:
        """The era array, read on demand."""
        return ArrayReader(self.bm, self.sb.era_array_root, self.sb.nr_blocks, "<u4",
                           "era array")

    def writesets(self) -> list[WritesetBits]:
        return [self.read_writeset(era, rec) for era, rec in self.writeset_records()]

    def current_writeset(self) -> WritesetBits | None:
        """The live current writeset, if the superblock has one (never from a snapshot, whose
        current writeset is not reference counted and may have been reused)."""
        if self.from_snapshot or not self.live.current_writeset.root:
            return None
        return self.read_writeset(self.live.current_era, self.live.current_writeset)

    def era_array(self, seen: set[int] | None = None) -> np.ndarray:
        return read_array(self.bm, self.sb.era_array_root, self.sb.nr_blocks, "<u4",
                          "era array", seen).values

    # -- derived views ---------------------------------------------------------------------------
    def changed_since(self, threshold: int) -> np.ndarray:
        """Bool mask of blocks written in era `threshold` or later: era array entries >=
        threshold, plus every bit of archived writesets whose era >= threshold, plus the bits
        of the live current writeset (committed before their writes reached the origin, so on
        metadata copied from an active device or left by a crash they are the only record of
        those writes). A writeset larger than the era array extends the mask."""
        eras = self.era_array()
        sets = [ws for ws in self.writesets() if ws.era >= threshold]
        current = self.current_writeset()
        if current is not None and current.era >= threshold:
            sets.append(current)
        length = max([len(eras)] + [ws.nr_bits for ws in sets])
        mask = np.zeros(length, dtype=bool)
        np.greater_equal(eras, threshold, out=mask[: len(eras)])
        for ws in sets:
            mask[: ws.nr_bits] |= ws.bools()
        return mask

    def logical_eras(self) -> np.ndarray:
        """The era each block was last written in: the highest writeset containing it (archived,
        or the live current writeset), if that is newer than the era array's entry, else the era
        array's entry."""
        eras = self.era_array().copy()
        n = len(eras)
        sets = self.writesets()
        current = self.current_writeset()
        if current is not None:
            sets.append(current)
        for ws in sets:
            bits = ws.bools()[:n]
            np.maximum(eras[: len(bits)], np.where(bits, ws.era, 0).astype(np.uint32),
                       out=eras[: len(bits)])
        return eras


def bits(reader: ArrayReader, nr_bits: int, start: int, stop: int) -> np.ndarray:
    """Bits [start, stop) of a writeset of `nr_bits` bits read through `reader`, as bools
    (bits at or past nr_bits are not returned)."""
    stop = min(stop, nr_bits)
    if start >= stop:
        return np.zeros(0, dtype=bool)
    first_word = start // 64
    words = reader.values(first_word, -(-stop // 64))
    raw = np.unpackbits(words.view(np.uint8), bitorder="little")
    offset = start - first_word * 64
    return raw[offset: offset + stop - start].astype(bool)


def _refuse_unusable(sb: Superblock, device_blocks: int, what: str) -> None:
    problems = structural_problems(sb, device_blocks)
    if what != "superblock":     # a snapshot's current writeset is not used
        problems = [p for p in problems if "current writeset" not in p]
    if problems:
        raise MetadataError(f"{what} is invalid: {'; '.join(problems)} (see era check)")


def mask_to_ranges(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Maximal runs of True as (begins, ends) with exclusive ends."""
    padded = np.zeros(len(mask) + 2, dtype=np.int8)
    padded[1:-1] = mask
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return edges[0::2].astype(np.uint64), edges[1::2].astype(np.uint64)
