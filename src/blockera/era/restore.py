"""`era restore`: write fresh era metadata from an `EraDescription` (specs/era-metadata.md §14.2).

The image is built bottom-up in memory, then written: superblock at 0, space-map index at 1, the
ref-count root at 2, bitmaps, then each writeset's bitset (array blocks and their btree), the
writeset tree, and the era array (array blocks and btree). Every block holds exactly one
reference. Like 0.9.0 `era_restore`, the superblock gets no current writeset (the kernel creates
one on resume), a zero uuid and flags 0.

Crash safety: block 0 is zeroed first (a half-written image is then "unformatted", never an old
superblock pointing at overwritten blocks), the other blocks are written and flushed, and the new
superblock is written and flushed last.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import crc32c
import numpy as np

from blockera.blockdev import BlockDevice
from blockera.errors import NoSpaceError
from blockera.era.superblock import SUPERBLOCK, Superblock, Writeset
from blockera.era.xml_parse import EraDescription
from blockera.pdata.array import ARRAY_HEADER_BYTES, array_max_entries
from blockera.pdata.btree_node import INTERNAL_NODE, LEAF_NODE, NODE_HEADER_BYTES, calc_max_entries
from blockera.pdata.checksum import (ARRAY_CSUM_XOR, BITMAP_BLOCK, BTREE_NODE, INDEX_BLOCK,
                                     Validator)
from blockera.progress import progress
from blockera.pdata.space_map import (ENTRIES_PER_BITMAP, MAX_METADATA_BLOCKS, SpaceMapRoot,
                                      encode_bitmap, nr_bitmaps)
from blockera.units import METADATA_BLOCK_BYTES

BLOCK = METADATA_BLOCK_BYTES
RUN_WRITE_BLOCKS = 2048        # array blocks per write (8 MiB)


@dataclass
class _Layout:
    """Blocks of the image being built: single blocks (with their validator) and runs of array
    blocks already checksummed."""

    next_location: int
    singles: dict[int, tuple[bytearray, Validator]] = field(default_factory=dict)
    runs: list[tuple[int, np.ndarray]] = field(default_factory=list)

    def alloc(self, count: int = 1) -> int:
        first = self.next_location
        self.next_location += count
        return first


def _array_blocks(values: np.ndarray, first_location: int) -> np.ndarray:
    """Array blocks for `values`, numbered from `first_location`, checksums included."""
    value_size = values.dtype.itemsize
    max_entries = array_max_entries(value_size)
    n = len(values)
    k = -(-n // max_entries)
    blocks = np.zeros((k, BLOCK), dtype=np.uint8)
    if not k:
        return blocks
    payload = np.zeros(k * max_entries, dtype=values.dtype)
    payload[:n] = values
    blocks[:, ARRAY_HEADER_BYTES: ARRAY_HEADER_BYTES + max_entries * value_size] = \
        payload.view(np.uint8).reshape(k, max_entries * value_size)
    header = np.empty((k, 3), dtype="<u4")
    header[:, 0] = max_entries
    header[:, 1] = max_entries
    header[-1, 1] = n - max_entries * (k - 1)
    header[:, 2] = value_size
    blocks[:, 4:16] = header.view(np.uint8)
    blocks[:, 16:24] = (np.arange(k, dtype="<u8") + first_location).view(np.uint8).reshape(k, 8)
    checksums = np.empty(k, dtype="<u4")
    for i in range(k):
        checksums[i] = crc32c.crc32c(blocks[i, 4:]) ^ 0xFFFFFFFF ^ ARRAY_CSUM_XOR
    blocks[:, 0:4] = checksums.view(np.uint8).reshape(k, 4)
    return blocks


def _btree(layout: _Layout, keys: list[int], values: list[bytes], value_size: int) -> int:
    """Build a btree bottom-up with full nodes; returns the root's location."""
    def node(flags: int, vsize: int, entries: list[tuple[int, bytes]]) -> int:
        max_entries = calc_max_entries(vsize)
        location = layout.alloc()
        buf = bytearray(BLOCK)
        struct.pack_into("<IQIII", buf, 4, flags, location, len(entries), max_entries, vsize)
        for i, (key, value) in enumerate(entries):
            struct.pack_into("<Q", buf, NODE_HEADER_BYTES + 8 * i, key)
            off = NODE_HEADER_BYTES + 8 * max_entries + i * vsize
            buf[off: off + vsize] = value
        layout.singles[location] = (buf, BTREE_NODE)
        return location

    entries = list(zip(keys, values))
    level = [(chunk[0][0] if chunk else 0, node(LEAF_NODE, value_size, chunk))
             for chunk in _balanced(entries, calc_max_entries(value_size))]
    while len(level) > 1:
        level = [(chunk[0][0], node(INTERNAL_NODE, 8,
                                    [(k, struct.pack("<Q", loc)) for k, loc in chunk]))
                 for chunk in _balanced(level, calc_max_entries(8))]
    return level[0][1]


def _balanced(items: list, max_per_node: int) -> list[list]:
    """Split `items` over as few nodes as possible, evenly, so that every node of a multi-node
    level holds at least half of `max_per_node` (checkers reject non-root nodes below a
    third)."""
    if not items:
        return [[]]
    nodes = -(-len(items) // max_per_node)
    base, extra = divmod(len(items), nodes)
    out, start = [], 0
    for i in range(nodes):
        size = base + (1 if i < extra else 0)
        out.append(items[start: start + size])
        start += size
    return out


def _array(layout: _Layout, values: np.ndarray) -> int:
    """Lay out a dm-array of `values`; returns its btree root."""
    max_entries = array_max_entries(values.dtype.itemsize)
    k = -(-len(values) // max_entries)
    first = layout.alloc(k)
    if k:
        layout.runs.append((first, _array_blocks(values, first)))
    return _btree(layout, list(range(k)), [struct.pack("<Q", first + i) for i in range(k)], 8)


def plan_image(desc: EraDescription, device_blocks: int) -> tuple[_Layout, Superblock]:
    """Lay out every block of the image for a metadata device of `device_blocks` blocks."""
    sm_blocks = min(device_blocks, MAX_METADATA_BLOCKS)
    nb = nr_bitmaps(sm_blocks)
    layout = _Layout(next_location=3 + nb)
    writeset_roots: list[tuple[int, bytes]] = []
    for ws in sorted(desc.writesets, key=lambda w: w.era):
        root = _array(layout, ws.words.astype("<u8"))
        writeset_roots.append((ws.era, Writeset(ws.nr_bits, root).pack()))
    tree_root = _btree(layout, [era for era, _ in writeset_roots],
                       [rec for _, rec in writeset_roots], 12)
    era_root = _array(layout, desc.era_array.astype("<u4"))
    used = layout.next_location
    if used > sm_blocks:
        raise NoSpaceError(
            f"metadata device too small: this metadata needs {used} blocks ({used * 4} KiB) but "
            f"the device holds {device_blocks} ({device_blocks * 4} KiB)")
    # reference-count tree: an empty leaf at block 2 (every count is 1)
    ref_root = 2
    buf = bytearray(BLOCK)
    struct.pack_into("<IQIII", buf, 4, LEAF_NODE, ref_root, 0, calc_max_entries(4), 4)
    layout.singles[ref_root] = (buf, BTREE_NODE)
    # bitmaps and index: blocks [0, used) have count 1
    index = bytearray(BLOCK)
    for i in range(nb):
        start = i * ENTRIES_PER_BITMAP
        valid = min(ENTRIES_PER_BITMAP, sm_blocks - start)
        allocated = max(0, min(valid, used - start))
        counts = np.zeros(valid, dtype=np.uint32)
        counts[:allocated] = 1
        bitmap = bytearray(BLOCK)
        bitmap[16:] = encode_bitmap(counts)
        layout.singles[3 + i] = (bitmap, BITMAP_BLOCK)
        none_free_before = allocated if allocated < valid else 0
        struct.pack_into("<QII", index, 16 + 16 * i, 3 + i, valid - allocated, none_free_before)
    layout.singles[1] = (index, INDEX_BLOCK)
    sb = Superblock(
        sm_root=SpaceMapRoot(sm_blocks, used, 1, ref_root).pack(),
        data_block_size=desc.block_size,
        nr_blocks=desc.nr_blocks,
        current_era=desc.current_era,
        current_writeset=Writeset(0, 0),
        writeset_tree_root=tree_root,
        era_array_root=era_root,
    )
    return layout, sb


def write_image(dev: BlockDevice, desc: EraDescription) -> int:
    """Write `desc` to `dev` as fresh era metadata; returns the number of blocks used."""
    device_blocks = dev.size_bytes // BLOCK
    layout, sb = plan_image(desc, device_blocks)
    dev.write(0, bytes(BLOCK))
    dev.flush()
    with progress(layout.next_location * BLOCK, "era restore") as bar:
        for location, blocks in layout.runs:
            for first in range(0, len(blocks), RUN_WRITE_BLOCKS):
                part = blocks[first: first + RUN_WRITE_BLOCKS]
                dev.write((location + first) * BLOCK, part.tobytes())
                bar.update(part.nbytes)
        for location in sorted(layout.singles):
            buf, validator = layout.singles[location]
            validator.prepare(location, buf)
            dev.write(location * BLOCK, buf)
            bar.update(BLOCK)
    dev.flush()
    block0 = sb.to_block()
    SUPERBLOCK.prepare(0, block0)
    dev.write(0, block0)
    dev.flush()
    return layout.next_location
