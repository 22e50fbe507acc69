"""Persistent-data btree nodes: the on-disk layout of one node and the entry moves the tree
operations are made of (docs/persistent-data.md §4; the kernel's btree_node).

A node is one 4 KiB block: a 32-byte header (csum, flags, blocknr, nr_entries, max_entries,
value_size), `max_entries` little-endian u64 keys, then `max_entries` packed values. Internal
nodes map the lowest key of each child to the child's block (8-byte values); leaves hold the
tree's values.
"""

from __future__ import annotations

import struct

from blockera.errors import MetadataError
from blockera.units import METADATA_BLOCK_BYTES

INTERNAL_NODE = 1
LEAF_NODE = 2
NODE_HEADER_BYTES = 32
SPACE_THRESHOLD = 8
MAX_DEPTH = 64

_HEADER = struct.Struct("<IIQIIII")  # csum flags blocknr nr_entries max_entries value_size pad
_U64 = struct.Struct("<Q")


def calc_max_entries(value_size: int) -> int:
    """Entries per node for `value_size`-byte values: a multiple of 3, as the kernel uses."""
    total = (METADATA_BLOCK_BYTES - NODE_HEADER_BYTES) // (8 + value_size)
    return 3 * (total // 3)


class Node:
    """Accessors over a node buffer (bytes for reading, bytearray for writing)."""

    __slots__ = ("buf", "max_entries", "value_size")

    def __init__(self, buf: bytes | bytearray) -> None:
        self.buf = buf
        _, _, _, _, self.max_entries, self.value_size, _ = _HEADER.unpack_from(buf, 0)

    # header fields
    @property
    def flags(self) -> int:
        return struct.unpack_from("<I", self.buf, 4)[0]

    @property
    def nr_entries(self) -> int:
        return struct.unpack_from("<I", self.buf, 16)[0]

    @nr_entries.setter
    def nr_entries(self, n: int) -> None:
        struct.pack_into("<I", self.buf, 16, n)

    @property
    def is_leaf(self) -> bool:
        return bool(self.flags & LEAF_NODE)

    @property
    def is_internal(self) -> bool:
        return bool(self.flags & INTERNAL_NODE)

    # keys and values
    def key(self, i: int) -> int:
        return _U64.unpack_from(self.buf, NODE_HEADER_BYTES + 8 * i)[0]

    def set_key(self, i: int, key: int) -> None:
        _U64.pack_into(self.buf, NODE_HEADER_BYTES + 8 * i, key)

    def value_offset(self, i: int) -> int:
        return NODE_HEADER_BYTES + 8 * self.max_entries + i * self.value_size

    def value(self, i: int) -> bytes:
        off = self.value_offset(i)
        return bytes(self.buf[off: off + self.value_size])

    def values(self, start: int, count: int) -> bytes:
        off = self.value_offset(start)
        return bytes(self.buf[off: off + count * self.value_size])

    def set_value(self, i: int, value: bytes) -> None:
        off = self.value_offset(i)
        self.buf[off: off + self.value_size] = value

    def child(self, i: int) -> int:
        return _U64.unpack_from(self.buf, self.value_offset(i))[0]

    def set_child(self, i: int, location: int) -> None:
        _U64.pack_into(self.buf, self.value_offset(i), location)

    def keys(self) -> list[int]:
        n = self.nr_entries
        return list(struct.unpack_from(f"<{n}Q", self.buf, NODE_HEADER_BYTES))

    def bsearch(self, key: int, want_hi: bool) -> int:
        lo, hi = -1, self.nr_entries
        while hi - lo > 1:
            mid = lo + (hi - lo) // 2
            mid_key = self.key(mid)
            if mid_key == key:
                return mid
            if mid_key < key:
                lo = mid
            else:
                hi = mid
        return hi if want_hi else lo

    def lower_bound(self, key: int) -> int:
        """Index of the greatest key <= `key`, or -1."""
        return self.bsearch(key, False)


    # entry moves (same value size on both sides)
    def insert_at(self, index: int, key: int, value: bytes) -> None:
        n = self.nr_entries
        if index > n or index >= self.max_entries or n >= self.max_entries:
            raise MetadataError("too many entries in btree node for insert")
        vs = self.value_size
        kb = NODE_HEADER_BYTES
        self.buf[kb + 8 * (index + 1): kb + 8 * (n + 1)] = self.buf[kb + 8 * index: kb + 8 * n]
        vo = self.value_offset(0)
        self.buf[vo + vs * (index + 1): vo + vs * (n + 1)] = self.buf[vo + vs * index: vo + vs * n]
        self.set_key(index, key)
        self.set_value(index, value)
        self.nr_entries = n + 1

    def delete_at(self, index: int) -> None:
        n = self.nr_entries
        if index >= n:
            raise MetadataError("btree delete beyond the last entry")
        vs = self.value_size
        kb = NODE_HEADER_BYTES
        self.buf[kb + 8 * index: kb + 8 * (n - 1)] = self.buf[kb + 8 * (index + 1): kb + 8 * n]
        vo = self.value_offset(0)
        self.buf[vo + vs * index: vo + vs * (n - 1)] = self.buf[vo + vs * (index + 1): vo + vs * n]
        self.nr_entries = n - 1


def init_node(buf: bytearray, flags: int, max_entries: int, value_size: int) -> Node:
    struct.pack_into("<I", buf, 4, flags)
    struct.pack_into("<III", buf, 16, 0, max_entries, value_size)
    return Node(buf)


def pack_node(location: int, flags: int, value_size: int,
              entries: list[tuple[int, bytes]]) -> bytearray:
    """A new node block (checksum not yet stamped) holding `entries` (key, packed value)."""
    buf = bytearray(METADATA_BLOCK_BYTES)
    node = init_node(buf, flags, calc_max_entries(value_size), value_size)
    _U64.pack_into(buf, 8, location)
    for i, (key, value) in enumerate(entries):
        node.set_key(i, key)
        node.set_value(i, value)
    node.nr_entries = len(entries)
    return buf


def copy_entries(dest: Node, dest_offset: int, src: Node, src_offset: int, count: int) -> None:
    """Copy `count` entries (keys and values) from `src` to `dest`, which may be the same node
    with overlapping regions (a slice is read whole before it is written)."""
    if count <= 0:
        return
    kb = NODE_HEADER_BYTES
    dest.buf[kb + 8 * dest_offset: kb + 8 * (dest_offset + count)] = \
        src.buf[kb + 8 * src_offset: kb + 8 * (src_offset + count)]
    vs = dest.value_size
    d = dest.value_offset(dest_offset)
    s = src.value_offset(src_offset)
    dest.buf[d: d + vs * count] = src.buf[s: s + vs * count]


def shift_down(node: Node, count: int) -> None:
    copy_entries(node, 0, node, count, node.nr_entries - count)


def shift_up(node: Node, count: int) -> None:
    copy_entries(node, count, node, 0, node.nr_entries)


