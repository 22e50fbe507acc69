"""Validating bulk readers for btrees and arrays (tools, checks, snapshots).

Every node is checked for location, checksum, type, value size, key order, key range against its
parent, uniform depth, and that no block is reached twice (cycles, shared nodes within one tree).
Array blocks are gathered in one read, checksummed in a tight loop and checked with numpy; values
come back as numpy arrays, never as per-entry Python objects.

See docs/persistent-data.md §7.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import crc32c
import numpy as np

from blockera.errors import MetadataError
from blockera.pdata.array import ARRAY_HEADER_BYTES, array_max_entries
from blockera.pdata.block_manager import BlockManager
from blockera.pdata.btree_node import INTERNAL_NODE, LEAF_NODE, MAX_DEPTH, NODE_HEADER_BYTES, Node
from blockera.pdata.checksum import ARRAY_CSUM_XOR, BTREE_NODE


@dataclass
class Leaves:
    """All entries of a btree: keys (uint64) and values (k, value_size) bytes, in key order,
    plus every node location visited."""

    keys: np.ndarray
    values: np.ndarray
    nodes: list[int]


def walk_btree(bm: BlockManager, root: int, value_size: int, what: str,
               seen: set[int] | None = None) -> Leaves:
    """Read and validate a whole single-level btree whose leaves hold `value_size`-byte
    values. `what` names the tree in error messages. `seen`, if given, collects node locations
    across trees so that a node shared between two trees is reported."""
    seen_here: set[int] = set()
    key_chunks: list[np.ndarray] = []
    value_chunks: list[np.ndarray] = []
    nodes: list[int] = []
    leaf_depth: int | None = None
    # (location, depth, lower key bound, upper key bound or None)
    stack: list[tuple[int, int, int, int | None]] = [(root, 0, 0, None)]
    while stack:
        location, depth, lo, hi = stack.pop()
        if depth >= MAX_DEPTH:
            raise MetadataError(f"{what}: btree deeper than {MAX_DEPTH} levels", block=location)
        bm.check_location(location, f"{what} node")
        if location in seen_here or (seen is not None and location in seen):
            raise MetadataError(f"{what}: node reached twice (a cycle or a node shared within "
                                "the tree)", block=location)
        seen_here.add(location)
        nodes.append(location)
        block = bm.read(location, BTREE_NODE)
        node = Node(block)
        flags = node.flags
        n = node.nr_entries
        if flags & INTERNAL_NODE and flags & LEAF_NODE:
            raise MetadataError(f"{what}: node is marked both internal and leaf", block=location)
        keys = np.frombuffer(block, dtype="<u8", count=n, offset=NODE_HEADER_BYTES)
        if n > 1 and not bool(np.all(keys[1:] > keys[:-1])):
            raise MetadataError(f"{what}: keys are not in ascending order", block=location)
        if n and (int(keys[0]) < lo or (hi is not None and int(keys[-1]) >= hi)):
            raise MetadataError(f"{what}: keys [{int(keys[0])}, {int(keys[-1])}] lie outside "
                                f"the range its parent gives it", block=location)
        values_offset = NODE_HEADER_BYTES + 8 * node.max_entries
        if flags & INTERNAL_NODE:
            if node.value_size != 8:
                raise MetadataError(f"{what}: internal node has value size {node.value_size}, "
                                    "expected 8", block=location)
            if n == 0:
                raise MetadataError(f"{what}: internal node has no entries", block=location)
            children = np.frombuffer(block, dtype="<u8", count=n, offset=values_offset)
            for i in range(n - 1, -1, -1):
                child_lo = lo if i == 0 else int(keys[i])
                child_hi = hi if i == n - 1 else int(keys[i + 1])
                stack.append((int(children[i]), depth + 1, child_lo, child_hi))
        else:
            if node.value_size != value_size:
                raise MetadataError(f"{what}: leaf has value size {node.value_size}, expected "
                                    f"{value_size}", block=location)
            if leaf_depth is None:
                leaf_depth = depth
            elif leaf_depth != depth:
                raise MetadataError(f"{what}: leaves at different depths ({leaf_depth} and "
                                    f"{depth})", block=location)
            key_chunks.append(keys.copy())
            value_chunks.append(np.frombuffer(block, dtype=np.uint8, count=n * value_size,
                                              offset=values_offset).reshape(n, value_size))
    if seen is not None:
        seen.update(seen_here)
    keys_all = np.concatenate(key_chunks) if key_chunks else np.zeros(0, dtype=np.uint64)
    values_all = (np.concatenate(value_chunks) if value_chunks
                  else np.zeros((0, value_size), dtype=np.uint8))
    return Leaves(keys_all, values_all, nodes)


@dataclass
class ArrayContents:
    values: np.ndarray      # decoded values, length = the array's length
    blocks: np.ndarray      # array block locations in index order
    nodes: list[int]        # btree node locations


def read_array(bm: BlockManager, root: int, length: int, dtype: str, what: str,
               seen: set[int] | None = None) -> ArrayContents:
    """Read and validate a whole dm-array of `length` values of numpy `dtype` ('<u4', '<u8')."""
    reader = ArrayReader(bm, root, length, dtype, what, seen)
    values = reader.read(0, reader.nr_array_blocks)
    reader.mark_seen()
    return ArrayContents(values[:length].copy(), reader.locations, reader.nodes)


class ArrayReader:
    """A dm-array whose index is read and validated up front (ArrayContents' checks on the
    btree and the block locations) and whose array blocks are read, and validated, on demand:
    values of a range of blocks at a time, so a reader holds what it is asked for and the
    index (8 bytes per array block), whatever the array's length."""

    def __init__(self, bm: BlockManager, root: int, length: int, dtype: str, what: str,
                 seen: set[int] | None = None) -> None:
        self.bm = bm
        self.length = length
        self.dtype = dtype
        self.what = what
        self.seen = seen
        self.value_size = np.dtype(dtype).itemsize
        self.max_entries = array_max_entries(self.value_size)
        leaves = walk_btree(bm, root, 8, f"{what} index", seen)
        self.nodes = leaves.nodes
        self.nr_array_blocks = nr_array_blocks = -(-length // self.max_entries)
        keys = leaves.keys
        locations = (leaves.values.view("<u8").reshape(-1) if len(keys)
                     else np.zeros(0, np.uint64))
        if shrink_leftover(keys, length, self.max_entries):
            keys, locations = keys[:-1], locations[:-1]
        expected = np.arange(nr_array_blocks, dtype=np.uint64)
        if len(keys) != nr_array_blocks or not np.array_equal(keys, expected):
            missing = np.setdiff1d(expected, keys)
            extra = np.setdiff1d(keys, expected)
            detail = []
            if len(missing):
                detail.append(f"array blocks {_ranges_text(missing)} missing")
            if len(extra):
                detail.append(f"unexpected array blocks {_ranges_text(extra)}")
            raise MetadataError(f"{what}: array of {length} entries needs array blocks "
                                f"[0, {nr_array_blocks}); " + ", ".join(detail), block=root)
        if len(locations):
            too_far = np.flatnonzero(locations >= bm.nr_blocks)
            if len(too_far):
                loc = int(locations[too_far[0]])
                raise MetadataError(f"{what}: array block {int(too_far[0])} points at block "
                                    f"{loc}, beyond the end of the metadata device "
                                    f"({bm.nr_blocks} blocks)")
            uniq, counts = np.unique(locations, return_counts=True)
            if len(uniq) != len(locations):
                raise MetadataError(f"{what}: an array block is referenced twice",
                                    block=int(uniq[counts > 1][0]))
            if seen is not None:
                shared = [int(b) for b in locations.tolist() if b in seen]
                if shared:
                    raise MetadataError(f"{what}: array block is also used by another "
                                        "structure", block=shared[0])
        self.locations = locations

    def mark_seen(self) -> None:
        """Add the array blocks to `seen` (after reading, as `read_array` does)."""
        if self.seen is not None:
            self.seen.update(int(b) for b in self.locations.tolist())

    def read(self, first_block: int, stop_block: int) -> np.ndarray:
        """The values held by array blocks [first_block, stop_block), validated: the last
        block's values are cut at the array's length."""
        stop_block = min(stop_block, self.nr_array_blocks)
        if first_block >= stop_block:
            return np.zeros(0, dtype=self.dtype)
        locations = self.locations[first_block: stop_block]
        blocks = self.bm.read_many(locations)
        _check_array_blocks(blocks, locations, self.max_entries, self.value_size, self.length,
                            self.what, first_block, self.nr_array_blocks)
        width = self.max_entries * self.value_size
        payload = blocks[:, ARRAY_HEADER_BYTES: ARRAY_HEADER_BYTES + width]
        values = np.ascontiguousarray(payload).view(self.dtype).reshape(-1)
        return values[: self.length - first_block * self.max_entries]

    def values(self, start: int, stop: int) -> np.ndarray:
        """Entries [start, stop) (clipped to the array's length)."""
        stop = min(stop, self.length)
        if start >= stop:
            return np.zeros(0, dtype=self.dtype)
        first = start // self.max_entries
        values = self.read(first, -(-stop // self.max_entries))
        base = first * self.max_entries
        return values[start - base: stop - base]

    def chunks(self, blocks_per_chunk: int = 256) -> Iterator[tuple[int, np.ndarray]]:
        """(first index, values) for every run of `blocks_per_chunk` array blocks, in order."""
        for first in range(0, self.nr_array_blocks, blocks_per_chunk):
            yield first * self.max_entries, self.read(first, first + blocks_per_chunk)


def shrink_leftover(keys: np.ndarray, length: int, max_entries: int) -> bool:
    """True if the index holds exactly one block past the array's end, left there by the
    kernel's dm_array_resize: shrinking to a multiple of the per-block count drops only whole
    blocks, never the old partial tail block. Its entries lie beyond the array and are ignored."""
    k = -(-length // max_entries)
    return (length % max_entries == 0 and len(keys) == k + 1
            and bool(np.array_equal(keys, np.arange(k + 1, dtype=np.uint64))))


def _check_array_blocks(blocks: np.ndarray, locations: np.ndarray, max_entries: int,
                        value_size: int, length: int, what: str, first_block: int = 0,
                        nr_array_blocks: int | None = None) -> None:
    """Validate array blocks [first_block, first_block + len(blocks)) of an array of
    `nr_array_blocks` blocks (default: exactly these)."""
    k = len(locations)
    if not k:
        return
    total = first_block + k if nr_array_blocks is None else nr_array_blocks
    stored = blocks[:, 0:4].copy().view("<u4").reshape(-1)
    for i in range(k):
        computed = crc32c.crc32c(blocks[i, 4:]) ^ 0xFFFFFFFF ^ ARRAY_CSUM_XOR
        if computed != int(stored[i]):
            raise MetadataError(f"bad checksum in {what} array block {first_block + i} (stored "
                                f"{int(stored[i]):#010x}, computed {computed:#010x})",
                                block=int(locations[i]))
    header = blocks[:, 4:16].copy().view("<u4").reshape(k, 3)
    blocknr = blocks[:, 16:24].copy().view("<u8").reshape(-1)
    bad = np.flatnonzero(blocknr != locations)
    if len(bad):
        i = int(bad[0])
        raise MetadataError(f"{what} array block records location {int(blocknr[i])}",
                            block=int(locations[i]), errno_name="ENOTBLK")
    expected_nr = np.full(k, max_entries, dtype=np.uint32)
    if first_block + k == total:
        expected_nr[-1] = length - max_entries * (total - 1)
    for col, name, expected in ((0, "max_entries", np.full(k, max_entries, np.uint32)),
                                (1, "nr_entries", expected_nr),
                                (2, "value_size", np.full(k, value_size, np.uint32))):
        bad = np.flatnonzero(header[:, col] != expected)
        if len(bad):
            i = int(bad[0])
            raise MetadataError(f"{what} array block {first_block + i}: {name} is "
                                f"{int(header[i, col])}, "
                                f"expected {int(expected[i])}", block=int(locations[i]))


def _ranges_text(values: np.ndarray, limit: int = 4) -> str:
    vals = values.tolist()
    runs: list[str] = []
    start = prev = vals[0]
    for v in vals[1:] + [None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        runs.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    text = ", ".join(runs[:limit])
    return text + (", ..." if len(runs) > limit else "")
