"""Checking persistent-data structures and their reference counts (docs/persistent-data.md §7).

`MetadataChecker` walks btrees and arrays, validating every node and array block it reaches
(location, checksum, flags, value size, key order and range, uniform depth, fill level, no
cycles; a node reached twice must fit both places), counts one reference per pointer it
follows, and finally compares those counts with the space map's: a block in use with too low a
count would be handed out again and overwritten (an error); a block counted but unreferenced is
leaked space (a warning). Findings are collected and the walk goes on after damage where it
can. A structure's own checker (era's, in blockera.era.check) says which roots to walk and what
their values point at.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from blockera.blockdev import BlockDevice
from blockera.errors import MetadataError
from blockera.pdata.array import ARRAY_HEADER_BYTES, array_block_header, array_max_entries
from blockera.pdata.block_manager import BlockManager
from blockera.pdata.btree_node import INTERNAL_NODE, LEAF_NODE, MAX_DEPTH, NODE_HEADER_BYTES, Node
from blockera.pdata.checksum import ARRAY_BLOCK, BITMAP_BLOCK, BTREE_NODE, INDEX_BLOCK
from blockera.pdata.space_map import (ENTRIES_PER_BITMAP, MAX_METADATA_BLOCKS, IndexEntry,
                                      SpaceMapRoot, decode_bitmap, nr_bitmaps)
from blockera.pdata.walkers import shrink_leftover

# Blocks the checker's block manager keeps (tree nodes are read more than once; array blocks
# are read once, so the cache does not grow with the arrays).
CACHE_BLOCKS = 1024


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


class MetadataChecker:
    """Reference-counting validation of the structures on one metadata device."""

    def __init__(self, dev: BlockDevice) -> None:
        self.dev = dev
        self.bm = BlockManager(dev, cache_blocks=CACHE_BLOCKS)
        self.report = CheckReport()
        self.refs = np.zeros(self.bm.nr_blocks, dtype=np.int64)
        self.heights: dict[int, int] = {}
        # for each validated node: the leaf value size it was validated for, and its key span
        self.validated_as: dict[int, tuple[int, int | None, int | None]] = {}
        self.in_progress: set[int] = set()
        self.subtree_leaves: dict[int, list[int]] = {}
        self.leaf_data: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.bad_array_blocks: set[int] = set()

    def error(self, message: str) -> None:
        self.report.errors.append(message)

    def warning(self, message: str) -> None:
        self.report.warnings.append(message)

    def tree(self, root: int, value_size: int, what: str
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
    def array(self, root: int, length: int, dtype: str, what: str) -> np.ndarray | None:
        """Validate a dm-array of `length` entries (counting one reference to its root and, for
        newly seen index leaves, to their array blocks); returns its values, None if damaged."""
        values = np.zeros(length, dtype=dtype)

        def keep(start: int, block_values: np.ndarray) -> None:
            values[start: start + len(block_values)] = block_values

        return values if self.scan_array(root, length, dtype, what, keep) else None

    def scan_array(self, root: int, length: int, dtype: str, what: str,
                   on_values: Callable[[int, np.ndarray], None] | None = None) -> bool:
        """`array` without holding the values: each array block's values go to
        `on_values(first index, values)` in index order as the block is validated (memory
        stays the same whatever the array's length). Returns False if the array is damaged."""
        value_size = np.dtype(dtype).itemsize
        max_entries = array_max_entries(value_size)
        nr_array_blocks = -(-length // max_entries)
        leaves = self.tree(root, 8, f"{what} index")
        if leaves is None:
            return False
        found: dict[int, tuple[int, bool]] = {}
        for new, keys, values in leaves:
            for key, loc in zip(keys.tolist(), values.view("<u8").reshape(-1).tolist()):
                found[key] = (loc, new)
        if shrink_leftover(np.array(sorted(found), dtype=np.uint64), length, max_entries):
            loc, new = found.pop(nr_array_blocks)
            if new and 0 <= loc < self.bm.nr_blocks:
                self.refs[loc] += 1
            self.warning(
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
            return False
        ok = True
        for index in range(nr_array_blocks):
            loc, new = found[index]
            if not 0 <= loc < self.bm.nr_blocks:
                self.error(f"{what}: array block {index} points beyond the device ({loc})")
                ok = False
                continue
            if new:
                self.refs[loc] += 1
            if loc in self.bad_array_blocks:
                ok = False                  # reported when it was first read
                continue
            block_values = self._array_block(loc, index, nr_array_blocks, max_entries,
                                             length, dtype, what)
            if block_values is None:
                self.bad_array_blocks.add(loc)
                ok = False
                continue
            if on_values is not None and ok:
                on_values(index * max_entries, block_values)
        return ok

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

    def space_map(self, root: SpaceMapRoot) -> None:
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
            entry = IndexEntry.unpack_from(index, i)
            blocknr, nr_free, none_free_before = (entry.blocknr, entry.nr_free,
                                                  entry.none_free_before)
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
                self.warning(
                    f"space map bitmap {i}: index says no free entries but {free} are free "
                    "(the kernel would skip them)")
            if none_free_before > n or np.any(values[: min(none_free_before, n)] == 0):
                self.warning(
                    f"space map bitmap {i}: none_free_before {none_free_before} hides free "
                    "entries")
        big: dict[int, int] = {}
        for _, keys, values in self.tree(root.ref_count_root, 4,
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
            self.warning(
                f"space map: {len(high)} blocks have more references counted than exist "
                f"(first: block {b}, count {int(counts[b])}, referenced {int(expected[b])} "
                "times); leaked space")
