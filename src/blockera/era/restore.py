"""`era restore`: write fresh era metadata from an `EraDescription` (docs/era.md §5).

The image is built bottom-up with the persistent-data builder (docs/persistent-data.md §7):
superblock at 0, the space map, then each writeset's bitset (an array and its btree), the
writeset tree, and the era array. Every block holds exactly one reference. Like 0.9.0
`era_restore`, the superblock gets no current writeset (the kernel creates one on resume), a
zero uuid and flags 0. The builder writes the superblock last.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from blockera.blockdev import BlockDevice
from blockera.era.superblock import SUPERBLOCK, WRITESET_RECORD, Superblock, Writeset
from blockera.era.xml_parse import EraDescription, EraXmlSource
from blockera.pdata.builder import ArrayProducer, MetadataBuilder
from blockera.units import METADATA_BLOCK_BYTES


def plan_image(desc: EraDescription, device_blocks: int,
               eras: ArrayProducer | None = None) -> tuple[MetadataBuilder, Superblock]:
    """Lay out every block of the image for a metadata device of `device_blocks` blocks. With
    `eras`, the era array's entries come from it while the image is written (`desc` holds
    none)."""
    builder = MetadataBuilder(device_blocks)
    writeset_roots: list[tuple[int, bytes]] = []
    for ws in sorted(desc.writesets, key=lambda w: w.era):
        root = builder.streamed_array(len(ws.words), "<u8", _slices(ws.words))
        writeset_roots.append((ws.era, Writeset(ws.nr_bits, root).pack()))
    tree_root = builder.btree([era for era, _ in writeset_roots],
                              [rec for _, rec in writeset_roots], WRITESET_RECORD.size)
    if eras is None:
        era_root = builder.array(desc.era_array.astype("<u4"))
    else:
        era_root = builder.streamed_array(desc.nr_blocks, "<u4", eras)
    sm_root = builder.space_map()
    sb = Superblock(
        sm_root=sm_root.pack(),
        data_block_size=desc.block_size,
        nr_blocks=desc.nr_blocks,
        current_era=desc.current_era,
        current_writeset=Writeset(0, 0),
        writeset_tree_root=tree_root,
        era_array_root=era_root,
    )
    return builder, sb


def _slices(values: np.ndarray, per_slice: int = 1 << 15) -> ArrayProducer:
    """A producer handing `values` over a slice at a time (no copy of the whole array)."""
    def produce(put: Callable[[np.ndarray, np.ndarray], None]) -> None:
        for start in range(0, len(values), per_slice):
            part = values[start: start + per_slice]
            put(np.arange(start, start + len(part), dtype=np.int64), part)
    return produce


def restore_xml(dev: BlockDevice, path: str | Path) -> tuple[EraDescription, int]:
    """Parse era XML from `path` ("-" = standard input) and write it to `dev` as fresh era
    metadata; returns the description (without its era array when that was streamed) and the
    number of blocks used. The whole input is checked before anything is written; from a
    regular file with the era entries in ascending order (as era_dump writes them), the era
    array is then parsed a second time straight into its blocks, so memory does not grow with
    the number of blocks (the writesets are held as bits, 1 bit per block)."""
    with EraXmlSource(path) as source:
        device_blocks = dev.size_bytes // METADATA_BLOCK_BYTES
        desc = source.describe(metadata_blocks=device_blocks)
        builder, sb = plan_image(desc, device_blocks,
                                 source.replay_eras if source.eras_streamed else None)
        builder.write(dev, sb.to_block(), SUPERBLOCK, "era restore")
        return desc, builder.next_location


def write_image(dev: BlockDevice, desc: EraDescription) -> int:
    """Write `desc` to `dev` as fresh era metadata; returns the number of blocks used."""
    builder, sb = plan_image(desc, dev.size_bytes // METADATA_BLOCK_BYTES)
    builder.write(dev, sb.to_block(), SUPERBLOCK, "era restore")
    return builder.next_location
