"""Building fresh persistent-data metadata bottom-up, in memory, then writing it in a crash-safe
order (docs/persistent-data.md §7): btrees with evenly filled nodes, arrays whose blocks are made
in bulk with numpy, and a space map in which every used block has a count of one.

The layout follows the kernel's bootstrap: the superblock at 0, the space map's index at 1, its
(empty) reference-count tree at 2, the bitmaps from 3, then whatever the caller builds. `write`
zeroes the superblock first (an interrupted write leaves an unformatted device, never an old
superblock over new blocks), writes every other block, flushes, and writes the superblock last.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import crc32c
import numpy as np

from blockera.blockdev import BlockDevice
from blockera.errors import NoSpaceError
from blockera.pdata.array import ARRAY_HEADER_BYTES, array_max_entries
from blockera.pdata.btree_node import INTERNAL_NODE, LEAF_NODE, calc_max_entries, pack_node
from blockera.pdata.checksum import (ARRAY_CSUM_XOR, BITMAP_BLOCK, BTREE_NODE, INDEX_BLOCK,
                                     Validator)
from blockera.pdata.space_map import (ENTRIES_PER_BITMAP, MAX_METADATA_BLOCKS, IndexEntry,
                                      SpaceMapRoot, encode_bitmap, nr_bitmaps)
from blockera.progress import progress
from blockera.units import METADATA_BLOCK_BYTES

BLOCK = METADATA_BLOCK_BYTES
INDEX_LOCATION = 1
REF_COUNT_ROOT_LOCATION = 2
FIRST_BITMAP_LOCATION = 3
RUN_WRITE_BLOCKS = 2048        # array blocks per write (8 MiB)
_U64 = np.dtype("<u8")


def array_blocks(values: np.ndarray, first_location: int) -> np.ndarray:
    """The array blocks holding `values` (their dtype gives the value size), numbered from
    `first_location`, checksums stamped: shape (blocks, 4096), uint8."""
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
    blocks[:, 16:24] = (np.arange(k, dtype=_U64) + first_location).view(np.uint8).reshape(k, 8)
    checksums = np.empty(k, dtype="<u4")
    for i in range(k):
        checksums[i] = crc32c.crc32c(blocks[i, 4:]) ^ 0xFFFFFFFF ^ ARRAY_CSUM_XOR
    blocks[:, 0:4] = checksums.view(np.uint8).reshape(k, 4)
    return blocks


ArrayProducer = Callable[[Callable[[np.ndarray, np.ndarray], None]], None]
STREAM_GROUP_BLOCKS = 64       # array blocks assembled and written at a time (256 KiB)


class _StreamedArrayWriter:
    """Assembles a streamed array's blocks a group at a time from ascending (index, value)
    pairs and writes each group as soon as no later pair can fall in it."""

    def __init__(self, dev: BlockDevice, location: int, length: int, dtype: str,
                 on_bytes: Callable[[int], object]) -> None:
        self.dev = dev
        self.location = location
        self.length = length
        self.on_bytes = on_bytes
        self.max_entries = array_max_entries(np.dtype(dtype).itemsize)
        self.group_entries = STREAM_GROUP_BLOCKS * self.max_entries
        self.group_start = 0
        self.buffer = np.zeros(self.group_entries, dtype=dtype)

    def put(self, indexes: np.ndarray, values: np.ndarray) -> None:
        indexes = indexes.astype(np.int64)
        i, n = 0, len(indexes)
        while i < n:
            if int(indexes[i]) < self.group_start:
                raise ValueError("streamed array entries must come in ascending order")
            end = self.group_start + self.group_entries
            j = int(np.searchsorted(indexes, end, side="left"))
            if j > i:
                self.buffer[indexes[i:j] - self.group_start] = values[i:j]
                i = j
            if i < n:
                self._write_group()

    def _write_group(self) -> None:
        count = min(self.group_entries, self.length - self.group_start)
        first_block = self.group_start // self.max_entries
        blocks = array_blocks(self.buffer[:count], self.location + first_block)
        self.dev.write((self.location + first_block) * BLOCK, blocks.tobytes())
        self.on_bytes(blocks.nbytes)
        self.buffer[:] = 0
        self.group_start += self.group_entries

    def finish(self) -> None:
        while self.group_start < self.length:
            self._write_group()


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


@dataclass
class MetadataBuilder:
    """Blocks of a fresh metadata image for a device of `device_blocks` 4 KiB blocks: single
    blocks (with their validator) and runs of array blocks already checksummed."""

    device_blocks: int
    singles: dict[int, tuple[bytearray, Validator]] = field(default_factory=dict)
    runs: list[tuple[int, np.ndarray]] = field(default_factory=list)
    streams: list[tuple[int, int, str, "ArrayProducer"]] = field(default_factory=list)
    next_location: int = 0

    def __post_init__(self) -> None:
        self.space_map_blocks = min(self.device_blocks, MAX_METADATA_BLOCKS)
        self.next_location = FIRST_BITMAP_LOCATION + nr_bitmaps(self.space_map_blocks)

    def alloc(self, count: int = 1) -> int:
        first = self.next_location
        self.next_location += count
        return first

    def btree(self, keys: list[int], values: list[bytes], value_size: int) -> int:
        """A single-level btree of `keys` (ascending) and packed `values`; returns its root."""
        def node(flags: int, vsize: int, entries: list[tuple[int, bytes]]) -> int:
            location = self.alloc()
            self.singles[location] = (pack_node(location, flags, vsize, entries), BTREE_NODE)
            return location

        entries = list(zip(keys, values))
        level = [(chunk[0][0] if chunk else 0, node(LEAF_NODE, value_size, chunk))
                 for chunk in _balanced(entries, calc_max_entries(value_size))]
        while len(level) > 1:
            level = [(chunk[0][0], node(INTERNAL_NODE, 8,
                                        [(k, np.uint64(loc).astype(_U64).tobytes())
                                         for k, loc in chunk]))
                     for chunk in _balanced(level, calc_max_entries(8))]
        return level[0][1]

    def array(self, values: np.ndarray) -> int:
        """A dm-array of `values`; returns its btree root."""
        k = -(-len(values) // array_max_entries(values.dtype.itemsize))
        first = self.alloc(k)
        if k:
            self.runs.append((first, array_blocks(values, first)))
        return self.btree(list(range(k)), [np.uint64(first + i).astype(_U64).tobytes()
                                           for i in range(k)], 8)

    def streamed_array(self, length: int, dtype: str, produce: "ArrayProducer") -> int:
        """A dm-array of `length` values of `dtype` whose values are produced only while the
        image is written: `produce(put)` calls `put(indexes, values)` with ascending indexes
        (entries never given are 0). Its blocks go where `array` would put them; returns the
        btree root."""
        k = -(-length // array_max_entries(np.dtype(dtype).itemsize))
        first = self.alloc(k)
        if k:
            self.streams.append((first, length, dtype, produce))
        return self.btree(list(range(k)), [np.uint64(first + i).astype(_U64).tobytes()
                                           for i in range(k)], 8)

    def space_map(self) -> SpaceMapRoot:
        """Lay out the space map for everything allocated so far (each block counted once,
        the superblock included); NoSpaceError if it does not fit the device."""
        used = self.next_location
        sm_blocks = self.space_map_blocks
        if used > sm_blocks:
            raise NoSpaceError(
                f"metadata device too small: this metadata needs {used} blocks ({used * 4} KiB) "
                f"but the device holds {self.device_blocks} ({self.device_blocks * 4} KiB)")
        self.singles[REF_COUNT_ROOT_LOCATION] = (
            pack_node(REF_COUNT_ROOT_LOCATION, LEAF_NODE, 4, []), BTREE_NODE)
        index = bytearray(BLOCK)
        for i in range(nr_bitmaps(sm_blocks)):
            start = i * ENTRIES_PER_BITMAP
            valid = min(ENTRIES_PER_BITMAP, sm_blocks - start)
            allocated = max(0, min(valid, used - start))
            counts = np.zeros(valid, dtype=np.uint32)
            counts[:allocated] = 1
            bitmap = bytearray(BLOCK)
            bitmap[16:] = encode_bitmap(counts)
            location = FIRST_BITMAP_LOCATION + i
            self.singles[location] = (bitmap, BITMAP_BLOCK)
            IndexEntry(location, valid - allocated,
                       allocated if allocated < valid else 0).pack_into(index, i)
        self.singles[INDEX_LOCATION] = (index, INDEX_BLOCK)
        return SpaceMapRoot(sm_blocks, used, INDEX_LOCATION, REF_COUNT_ROOT_LOCATION)

    def write(self, dev: BlockDevice, superblock: bytearray, validator: Validator,
              description: str) -> None:
        """Write the image: block 0 zeroed and flushed, every other block, flush, then the
        superblock (stamped by `validator`) and flush."""
        dev.write(0, bytes(BLOCK))
        dev.flush()
        with progress(self.next_location * BLOCK, description) as bar:
            for location, blocks in self.runs:
                for first in range(0, len(blocks), RUN_WRITE_BLOCKS):
                    part = blocks[first: first + RUN_WRITE_BLOCKS]
                    dev.write((location + first) * BLOCK, part.tobytes())
                    bar.update(part.nbytes)
            for location, length, dtype, produce in self.streams:
                writer = _StreamedArrayWriter(dev, location, length, dtype, bar.update)
                produce(writer.put)
                writer.finish()
            for location in sorted(self.singles):
                buf, block_validator = self.singles[location]
                block_validator.prepare(location, buf)
                dev.write(location * BLOCK, buf)
                bar.update(BLOCK)
        dev.flush()
        validator.prepare(0, superblock)
        dev.write(0, superblock)
        dev.flush()
