"""Independent re-walk of persistent-data structures for tests: expected reference counts."""

from __future__ import annotations

import struct

import numpy as np

from blockera.blockdev import MemoryDevice
from blockera.pdata.block_manager import BlockManager
from blockera.pdata.checksum import BTREE_NODE, Validator
from blockera.pdata.space_map import MetadataSpaceMap, format_metadata
from blockera.pdata.transaction import TransactionManager

TEST_SUPERBLOCK = Validator("test superblock", 0x1234)


def fresh_tm(nr_blocks: int = 4096) -> tuple[TransactionManager, MetadataSpaceMap]:
    tm, sm = format_metadata(BlockManager(MemoryDevice(nr_blocks * 4096)))
    return tm, sm


def commit(tm: TransactionManager) -> None:
    tm.pre_commit()
    tm.commit(TEST_SUPERBLOCK, bytearray(4096))


def node_refs(tm: TransactionManager, root: int, refs: np.ndarray, visited: set[int],
              on_leaf_value=None) -> None:
    """Add one reference to `root` and, if not yet visited, to everything below it."""
    refs[root] += 1
    if root in visited:
        return
    visited.add(root)
    block = tm.read(root, BTREE_NODE)
    flags, _, n, max_entries, value_size = struct.unpack_from("<IQIII", block, 4)
    values_at = 32 + 8 * max_entries
    for i in range(n):
        value = bytes(block[values_at + i * value_size: values_at + (i + 1) * value_size])
        if flags & 1:
            node_refs(tm, struct.unpack("<Q", value)[0], refs, visited, on_leaf_value)
        elif on_leaf_value is not None:
            on_leaf_value(value, refs, visited)


def space_map_refs(sm: MetadataSpaceMap, refs: np.ndarray) -> None:
    refs[0] += 1
    refs[sm.bitmap_root] += 1
    for entry in sm.index:
        refs[entry.blocknr] += 1
    node_refs(sm.tm, sm.ref_count_root, refs, set())
