"""`era restore`: write fresh era metadata from an `EraDescription` (docs/era.md §5).

The image is built bottom-up with the persistent-data builder (docs/persistent-data.md §7):
superblock at 0, the space map, then each writeset's bitset (an array and its btree), the
writeset tree, and the era array. Every block holds exactly one reference. Like 0.9.0
`era_restore`, the superblock gets no current writeset (the kernel creates one on resume), a
zero uuid and flags 0. The builder writes the superblock last.
"""

from __future__ import annotations

from blockera.blockdev import BlockDevice
from blockera.era.superblock import SUPERBLOCK, WRITESET_RECORD, Superblock, Writeset
from blockera.era.xml_parse import EraDescription
from blockera.pdata.builder import MetadataBuilder
from blockera.units import METADATA_BLOCK_BYTES


def plan_image(desc: EraDescription, device_blocks: int) -> tuple[MetadataBuilder, Superblock]:
    """Lay out every block of the image for a metadata device of `device_blocks` blocks."""
    builder = MetadataBuilder(device_blocks)
    writeset_roots: list[tuple[int, bytes]] = []
    for ws in sorted(desc.writesets, key=lambda w: w.era):
        root = builder.array(ws.words.astype("<u8"))
        writeset_roots.append((ws.era, Writeset(ws.nr_bits, root).pack()))
    tree_root = builder.btree([era for era, _ in writeset_roots],
                              [rec for _, rec in writeset_roots], WRITESET_RECORD.size)
    era_root = builder.array(desc.era_array.astype("<u4"))
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


def write_image(dev: BlockDevice, desc: EraDescription) -> int:
    """Write `desc` to `dev` as fresh era metadata; returns the number of blocks used."""
    builder, sb = plan_image(desc, dev.size_bytes // METADATA_BLOCK_BYTES)
    builder.write(dev, sb.to_block(), SUPERBLOCK, "era restore")
    return builder.next_location
