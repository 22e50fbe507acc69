"""`era check`: validate dm-era metadata (specs/era-metadata.md §13.3, §5.8).

Checks what 0.9.0 `era_check` checks (superblock, writeset tree and every archived writeset,
era array, eras not above the current era) and what it does not: the current writeset, the held
metadata snapshot, and the space map. For the space map every structure is walked and each
block's expected reference count is compared with the on-disk count: a block in use with too low
a count would be handed out again by the kernel and overwritten, so that is an error; a block
with a count but no references is only leaked space, reported as a warning.

Findings are collected (the check goes on after damage where it can) and the result is
`ok` only if there are no errors.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

from blockera.blockdev import BlockDevice
from blockera.errors import MetadataError
from blockera.era.superblock import (SUPERBLOCK, SUPERBLOCK_LOCATION, Superblock,
                                     structural_problems)
from blockera.pdata.array import ARRAY_HEADER_BYTES, array_block_header, array_max_entries
from blockera.pdata.bitset import words_for_bits
from blockera.pdata.block_manager import BlockManager
from blockera.pdata.reader import shrink_leftover
from blockera.pdata.btree_node import INTERNAL_NODE, LEAF_NODE, MAX_DEPTH, NODE_HEADER_BYTES, Node
from blockera.pdata.checksum import ARRAY_BLOCK, BITMAP_BLOCK, BTREE_NODE, INDEX_BLOCK
from blockera.pdata.space_map import (ENTRIES_PER_BITMAP, MAX_METADATA_BLOCKS, SpaceMapRoot,
                                      decode_bitmap, nr_bitmaps)

KNOWN_FLAGS = 1   # bit 0: clean shutdown (thin-provisioning-tools)


@dataclass
class CheckReport:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)
    looks_like_xml: bool = False

    @property
    def ok(self) -> bool:
        return not self.errors

    def lines(self) -> list[str]:
        out: list[str] = []
        for section in self.sections:
            out.append(section)
        for e in self.errors:
            out.append(f"  error: {e}")
        for w in self.warnings:
            out.append(f"  warning: {w}")
        if self.looks_like_xml:
            out.append("This looks like XML.  era check only checks the binary metadata format.")
        return out


class _Damage(Exception):
    """A structure could not be read; the message is already recorded."""


class EraChecker:
    def __init__(self, dev: BlockDevice) -> None:
        self.dev = dev
        self.bm = BlockManager(dev)
        self.report = CheckReport()
        self.refs = np.zeros(self.bm.nr_blocks, dtype=np.int64)
        self.heights: dict[int, int] = {}
        # for each validated node: the leaf value size it was validated for, and its key span
        self.validated_as: dict[int, tuple[int, int | None, int | None]] = {}
        self.in_progress: set[int] = set()
        self.subtree_leaves: dict[int, list[int]] = {}
        self.leaf_data: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.array_values: dict[int, np.ndarray] = {}

    def error(self, message: str) -> None:
        self.report.errors.append(message)

    # -- superblock ------------------------------------------------------------------------------
    def check_superblock(self) -> Superblock | None:
        self.report.sections.append("examining superblock")
        if self.bm.nr_blocks == 0:
            self.error("metadata device/file too small (less than 4 KiB); is this binary "
                       "metadata?")
            return None
        try:
            sb = Superblock.unpack(self.bm.read(SUPERBLOCK_LOCATION, SUPERBLOCK))
        except MetadataError as exc:
            self.error(f"superblock is corrupt: {exc}")
            head = self.bm.read_raw(0)[:64].lstrip()
            self.report.looks_like_xml = head.startswith((b"<superblock", b"<?xml", b"<!DOCTYPE"))
            return None
        if sb.flags & ~KNOWN_FLAGS:
            # the kernel ignores the flags word and writes 0 at its next commit
            self.report.warnings.append(f"superblock has unknown flags {sb.flags:#x}")
        problems = structural_problems(sb, self.bm.nr_blocks)
        for p in problems:
            self.error(f"superblock is invalid: {p}")
        return None if problems else sb

    # -- generic btree walk with reference counting -------------------------------------------
    def _tree(self, root: int, value_size: int, what: str
              ) -> list[tuple[bool, np.ndarray, np.ndarray]] | None:
        """Count one reference to `root`; validate the tree below it the first time it is seen.
        Returns every leaf's (newly seen?, keys, values), or None if the root is unreadable.
        Leaves below damaged nodes are missing from the list (the damage is recorded)."""
        new_leaves: set[int] = set()
        try:
            self._node(root, value_size, what, 0, None, True, 0, new_leaves)
        except _Damage:
            return None
        return [(loc in new_leaves, *self.leaf_data[loc]) for loc in self.subtree_leaves[root]]

    def _node(self, loc: int, value_size: int, what: str, lo: int, hi: int | None,
              is_root: bool, depth: int, new_leaves: set[int]) -> int:
        if not 0 <= loc < self.bm.nr_blocks:
            self.error(f"{what}: pointer to block {loc}, beyond the end of the device")
            raise _Damage()
        self.refs[loc] += 1
        if loc in self.heights:
            # a node reached again (shared by two trees, or a corrupt pointer): it must fit
            # here as well as where it was first validated
            value_size_then, first, last = self.validated_as[loc]
            if value_size_then != value_size:
                self.error(f"{what}: block {loc} is a node of another kind of tree (leaf "
                           f"values of {value_size_then} bytes, {value_size} expected here)")
                raise _Damage()
            if first is not None and (first < lo or (hi is not None and last >= hi)):
                self.error(f"{what}: block {loc}: keys outside the range its parent gives it")
                raise _Damage()
            return self.heights[loc]
        if loc in self.in_progress or depth >= MAX_DEPTH:
            self.error(f"{what}: cycle through block {loc}")
            raise _Damage()
        try:
            block = self.bm.read(loc, BTREE_NODE)
        except MetadataError as exc:
            self.error(f"{what}: {exc}")
            raise _Damage() from None
        node = Node(block)
        n = node.nr_entries
        flags = node.flags
        problems = []
        if flags & INTERNAL_NODE and flags & LEAF_NODE:
            problems.append("marked both internal and leaf")
        if node.max_entries % 3:
            problems.append(f"max_entries {node.max_entries} is not a multiple of 3")
        if not is_root and n < node.max_entries // 3:
            problems.append(f"too few entries ({n}, at least {node.max_entries // 3} expected "
                            "in a non-root node)")
        keys = np.frombuffer(block, dtype="<u8", count=n, offset=NODE_HEADER_BYTES).copy()
        if n > 1 and not bool(np.all(keys[1:] > keys[:-1])):
            problems.append("keys out of order")
        if n and (int(keys[0]) < lo or (hi is not None and int(keys[-1]) >= hi)):
            problems.append("keys outside the range its parent gives it")
        expected_vs = 8 if flags & INTERNAL_NODE else value_size
        if node.value_size != expected_vs:
            problems.append(f"value size {node.value_size}, expected {expected_vs}")
        if flags & INTERNAL_NODE and n == 0:
            problems.append("internal node without entries")
        if problems:
            self.error(f"{what}: block {loc}: " + "; ".join(problems))
            raise _Damage()
        values_at = NODE_HEADER_BYTES + 8 * node.max_entries
        self.in_progress.add(loc)
        try:
            if flags & INTERNAL_NODE:
                children = np.frombuffer(block, dtype="<u8", count=n, offset=values_at)
                heights = set()
                leaves: list[int] = []
                for i in range(n):
                    child = int(children[i])
                    child_lo = lo if i == 0 else int(keys[i])
                    child_hi = hi if i == n - 1 else int(keys[i + 1])
                    try:
                        heights.add(self._node(child, value_size, what, child_lo, child_hi,
                                               False, depth + 1, new_leaves))
                    except _Damage:
                        continue
                    leaves.extend(self.subtree_leaves[child])
                if len(heights) > 1:
                    self.error(f"{what}: block {loc}: leaves at different depths below it")
                height = 1 + (max(heights) if heights else 0)
                self.subtree_leaves[loc] = leaves
            else:
                values = np.frombuffer(block, dtype=np.uint8, count=n * value_size,
                                       offset=values_at).reshape(n, value_size).copy()
                self.leaf_data[loc] = (keys, values)
                self.subtree_leaves[loc] = [loc]
                new_leaves.add(loc)
                height = 0
        finally:
            self.in_progress.discard(loc)
        self.heights[loc] = height
        self.validated_as[loc] = (value_size, int(keys[0]) if n else None,
                                  int(keys[-1]) if n else None)
        return height

    # -- arrays ----------------------------------------------------------------------------------
    def _array(self, root: int, length: int, dtype: str, what: str) -> np.ndarray | None:
        """Validate a dm-array of `length` entries (counting one reference to its root and, for
        newly seen index leaves, to their array blocks); returns its values, None if damaged."""
        value_size = np.dtype(dtype).itemsize
        max_entries = array_max_entries(value_size)
        nr_array_blocks = -(-length // max_entries)
        leaves = self._tree(root, 8, f"{what} index")
        if leaves is None:
            return None
        found: dict[int, tuple[int, bool]] = {}
        for new, keys, values in leaves:
            for key, loc in zip(keys.tolist(), values.view("<u8").reshape(-1).tolist()):
                found[key] = (loc, new)
        if shrink_leftover(np.array(sorted(found), dtype=np.uint64), length, max_entries):
            loc, new = found.pop(nr_array_blocks)
            if new and 0 <= loc < self.bm.nr_blocks:
                self.refs[loc] += 1
            self.report.warnings.append(
                f"{what}: one array block past the end of the array (left by the kernel when "
                f"an array shrinks to a multiple of {max_entries} entries; 0.9.0 tools reject "
                "this; it goes away when the array grows again)")
        missing = [i for i in range(nr_array_blocks) if i not in found]
        extra = [k for k in found if k >= nr_array_blocks]
        if missing or extra:
            detail = []
            if missing:
                detail.append(f"{len(missing)} array blocks missing (first {missing[0]})")
            if extra:
                detail.append(f"{len(extra)} unexpected array blocks (first {extra[0]})")
            self.error(f"{what}: " + ", ".join(detail))
            return None
        values = np.zeros(nr_array_blocks * max_entries, dtype=dtype)
        ok = True
        for index in range(nr_array_blocks):
            loc, new = found[index]
            if not 0 <= loc < self.bm.nr_blocks:
                self.error(f"{what}: array block {index} points beyond the device ({loc})")
                ok = False
                continue
            if new:
                self.refs[loc] += 1
            block_values = self.array_values.get(loc)
            if block_values is None:
                block_values = self._array_block(loc, index, nr_array_blocks, max_entries,
                                                 length, dtype, what)
                if block_values is None:
                    ok = False
                    continue
                self.array_values[loc] = block_values
            values[index * max_entries: index * max_entries + len(block_values)] = block_values
        return values[:length] if ok else None

    def _array_block(self, loc: int, index: int, nr_array_blocks: int, max_entries: int,
                     length: int, dtype: str, what: str) -> np.ndarray | None:
        value_size = np.dtype(dtype).itemsize
        try:
            block = self.bm.read(loc, ARRAY_BLOCK)
        except MetadataError as exc:
            self.error(f"{what}: array block {index}: {exc}")
            return None
        m, nr, vs = array_block_header(block)
        expected_nr = max_entries if index < nr_array_blocks - 1 else \
            length - max_entries * (nr_array_blocks - 1)
        if (m, nr, vs) != (max_entries, expected_nr, value_size):
            self.error(f"{what}: array block {index} (block {loc}) has max_entries {m}, "
                       f"nr_entries {nr}, value_size {vs}; expected {max_entries}, "
                       f"{expected_nr}, {value_size}")
            return None
        return np.frombuffer(block, dtype=dtype, count=nr, offset=ARRAY_HEADER_BYTES).copy()

    def _writeset_tree(self, root: int, what: str) -> None:
        leaves = self._tree(root, 12, what)
        for new, keys, values in leaves or []:
            if not new:
                continue   # a leaf shared with the other superblock: its writesets are counted
            for era, raw in zip(keys.tolist(), values):
                nr_bits, bitset_root = struct.unpack("<IQ", raw.tobytes())
                prefix = "snapshot " if what.startswith("snapshot") else ""
                self._array(bitset_root, words_for_bits(nr_bits), "<u8",
                            f"{prefix}writeset of era {era}")

    # -- the whole check ---------------------------------------------------------------------------
    def run(self, superblock_only: bool = False) -> CheckReport:
        sb = self.check_superblock()
        if sb is None or superblock_only:
            return self.report
        self.refs[SUPERBLOCK_LOCATION] += 1
        self.report.sections.append("examining writeset tree")
        self._writeset_tree(sb.writeset_tree_root, "writeset tree")
        self.report.sections.append("examining era array")
        eras = self._array(sb.era_array_root, sb.nr_blocks, "<u4", "era array")
        if eras is not None:
            too_great = np.flatnonzero(eras > sb.current_era)
            if len(too_great):
                b = int(too_great[0])
                self.error(f"era array: {len(too_great)} entries have an era greater than the "
                           f"current era {sb.current_era} (first: block {b}, era {int(eras[b])})")
        if sb.current_writeset.root:
            self.report.sections.append("examining current writeset")
            self._array(sb.current_writeset.root, words_for_bits(sb.current_writeset.nr_bits),
                        "<u8", "current writeset")
        if sb.metadata_snap:
            self.report.sections.append("examining metadata snapshot")
            self._snapshot(sb.metadata_snap)
        self.report.sections.append("examining space map")
        self._space_map(sb.space_map_root)
        return self.report

    def _snapshot(self, location: int) -> None:
        self.refs[location] += 1
        try:
            snap = Superblock.unpack(self.bm.read(location, SUPERBLOCK))
        except MetadataError as exc:
            self.error(f"metadata snapshot: {exc}")
            return
        self._writeset_tree(snap.writeset_tree_root, "snapshot writeset tree")
        self._array(snap.era_array_root, snap.nr_blocks, "<u4", "snapshot era array")

    def _space_map(self, root: SpaceMapRoot) -> None:
        bm = self.bm
        if root.nr_blocks > min(bm.nr_blocks, MAX_METADATA_BLOCKS):
            self.error(f"space map covers {root.nr_blocks} blocks but the device has "
                       f"{bm.nr_blocks}: metadata device too small or truncated")
            return
        for name, loc in (("index", root.bitmap_root), ("ref-count tree", root.ref_count_root)):
            if not 0 <= loc < bm.nr_blocks:
                self.error(f"space map {name} pointer {loc} is beyond the end of the device")
                return
        self.refs[root.bitmap_root] += 1
        try:
            index = bm.read(root.bitmap_root, INDEX_BLOCK)
        except MetadataError as exc:
            self.error(f"space map index: {exc}")
            return
        counts = np.zeros(root.nr_blocks, dtype=np.int64)
        for i in range(nr_bitmaps(root.nr_blocks)):
            blocknr, nr_free, none_free_before = struct.unpack_from("<QII", index, 16 + 16 * i)
            if not 0 <= blocknr < bm.nr_blocks:
                self.error(f"space map bitmap {i} pointer {blocknr} is beyond the device")
                return
            self.refs[blocknr] += 1
            try:
                bitmap = bm.read(blocknr, BITMAP_BLOCK)
            except MetadataError as exc:
                self.error(f"space map bitmap {i}: {exc}")
                return
            start = i * ENTRIES_PER_BITMAP
            n = min(ENTRIES_PER_BITMAP, root.nr_blocks - start)
            values = decode_bitmap(bitmap, n)
            counts[start: start + n] = values
            free = int(np.count_nonzero(values == 0))
            if nr_free == 0 and free:
                self.report.warnings.append(
                    f"space map bitmap {i}: index says no free entries but {free} are free "
                    "(the kernel would skip them)")
            if none_free_before > n or np.any(values[: min(none_free_before, n)] == 0):
                self.report.warnings.append(
                    f"space map bitmap {i}: none_free_before {none_free_before} hides free "
                    "entries")
        big: dict[int, int] = {}
        for _, keys, values in self._tree(root.ref_count_root, 4,
                                          "space map ref-count tree") or []:
            for b, raw in zip(keys.tolist(), values):
                big[b] = struct.unpack("<I", raw.tobytes())[0]
        for b in np.flatnonzero(counts == 3).tolist():
            if big.get(b, 0) < 3:
                self.error(f"space map: block {b} has overflow count 3 but no ref-count tree "
                           "entry of 3 or more")
            else:
                counts[b] = big[b]
        allocated = int(np.count_nonzero(counts))
        if allocated != root.nr_allocated:
            self.error(f"space map: nr_allocated is {root.nr_allocated} but {allocated} blocks "
                       "have a reference count")
        expected = self.refs[: root.nr_blocks]
        if len(self.refs) > root.nr_blocks and self.refs[root.nr_blocks:].any():
            self.error("structures use blocks beyond the space map's end")
        low = np.flatnonzero(counts < expected)
        if len(low):
            b = int(low[0])
            self.error(f"space map: {len(low)} blocks in use have too low a reference count "
                       f"(first: block {b}, count {int(counts[b])}, referenced "
                       f"{int(expected[b])} times); the kernel would reuse them")
        high = np.flatnonzero(counts > expected)
        if len(high):
            b = int(high[0])
            self.report.warnings.append(
                f"space map: {len(high)} blocks have more references counted than exist "
                f"(first: block {b}, count {int(counts[b])}, referenced {int(expected[b])} "
                "times); leaked space")


def check_era_metadata(dev: BlockDevice, *, superblock_only: bool = False) -> CheckReport:
    return EraChecker(dev).run(superblock_only)
