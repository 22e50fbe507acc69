"""`era metadata-size`: the metadata device a dm-era target needs, computed from the on-disk
structures (docs/era.md §6) rather than fitted to measurements.

For N origin blocks: the era array takes A = ceil(N/1018) array blocks, each writeset
W = ceil(ceil(N/64)/509); their btrees grow by the kernel's append pattern (leaves of 248 except
the last two). `dmsetup create` needs superblock + space-map index + bitmaps + ref-count root +
writeset-tree leaf + era array + one writeset, plus two blocks the kernel shadows inside a
transaction before it may free the old ones.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from blockera.era.superblock import MAX_ORIGIN_BLOCKS
from blockera.pdata.array import array_max_entries
from blockera.pdata.btree_node import calc_max_entries
from blockera.pdata.space_map import MAX_METADATA_BLOCKS, nr_bitmaps
from blockera.units import METADATA_BLOCK_BYTES, METADATA_BLOCK_SECTORS, SECTOR_BYTES, div_up

ERA_ENTRIES_PER_BLOCK = array_max_entries(4)       # 1018
WORDS_PER_BLOCK = array_max_entries(8)             # 509
NODE_MAX = calc_max_entries(8)                     # 252, leaves of array btrees and internal nodes
APPEND_FILL = NODE_MAX - 4                         # 248: leaves left behind by appending
TRANSACTION_SLACK = 2                              # bitmap and index shadows of a transaction


def appended_btree_nodes(nr_entries: int) -> int:
    """Nodes of a btree built by appending keys 0, 1, 2, ... with the kernel's insert."""
    total = 0
    level = nr_entries
    while True:
        if level <= NODE_MAX:
            return total + 1
        nodes = div_up(level - NODE_MAX, APPEND_FILL) + 1
        total += nodes
        level = nodes


@dataclass
class MetadataSize:
    origin_blocks: int
    era_array_blocks: int
    era_array_nodes: int
    writeset_blocks: int
    writeset_nodes: int
    minimum_blocks: int
    with_snapshot_blocks: int | None      # None: more than a metadata device can address
    recommended_blocks: int | None
    checkpoints: int

    def as_dict(self) -> dict[str, int | None]:
        d = asdict(self)
        for key in ("minimum", "with_snapshot", "recommended"):
            blocks = d[f"{key}_blocks"]
            d[f"{key}_bytes"] = None if blocks is None else blocks * METADATA_BLOCK_BYTES
            d[f"{key}_sectors"] = None if blocks is None else blocks * METADATA_BLOCK_SECTORS
        return d


def _fit(structure_blocks: int) -> int | None:
    """Smallest device (in blocks) holding `structure_blocks` plus its own space-map bitmaps
    and the transaction slack; None beyond what the metadata space map can address. (The
    iteration climbs to the least fixed point of a monotone function: a few steps.)"""
    m = structure_blocks + 1 + TRANSACTION_SLACK
    while (need := structure_blocks + nr_bitmaps(m) + TRANSACTION_SLACK) > m:
        m = need
    return m if m <= MAX_METADATA_BLOCKS else None


def metadata_size(origin_sectors: int, block_sectors: int, checkpoints: int = 2) -> MetadataSize:
    """Sizes for an era device of `origin_sectors` tracked in blocks of `block_sectors`.

    minimum: `dmsetup create` succeeds. with_snapshot: create, checkpoint and
    take_metadata_snap succeed. recommended: a metadata snapshot held while the whole era
    array is rewritten and `checkpoints` further checkpoints wait to be digested."""
    if block_sectors <= 0 or block_sectors % 8:
        raise ValueError("the era block size must be a positive multiple of 8 sectors")
    n = div_up(origin_sectors, block_sectors)
    if n >= MAX_ORIGIN_BLOCKS:
        smallest = div_up(div_up(origin_sectors, MAX_ORIGIN_BLOCKS - 1), 8) * 8
        raise ValueError(f"the origin has {n} blocks of {block_sectors} sectors; the era target "
                         f"tracks at most {MAX_ORIGIN_BLOCKS - 1} blocks: use a block size of "
                         f"at least {smallest} sectors")
    a = div_up(n, ERA_ENTRIES_PER_BLOCK)
    na = appended_btree_nodes(a)
    w = div_up(div_up(n, 64), WORDS_PER_BLOCK)
    nw = appended_btree_nodes(w)
    # superblock, index, ref-count root, writeset-tree leaf (bitmaps are added by _fit)
    create = 4 + a + na + w + nw
    snapshot = create + 2 * (w + nw) + 1
    recommended = create + (2 + checkpoints) * (w + nw) + 1 + a + na
    minimum = _fit(create)
    if minimum is None:
        raise ValueError(f"{n} blocks of {block_sectors} sectors need more metadata than a "
                         f"metadata device can address ({MAX_METADATA_BLOCKS} blocks of 4 KiB): "
                         "use a larger block size")
    return MetadataSize(n, a, na, w, nw, minimum, _fit(snapshot), _fit(recommended),
                        checkpoints)


def describe(size: MetadataSize, origin_sectors: int, block_sectors: int) -> str:
    def line(label: str, blocks: int | None) -> str:
        if blocks is None:
            return (f"{label:<58} not possible: more than a metadata device can address "
                    f"({MAX_METADATA_BLOCKS} blocks); use a larger block size")
        return (f"{label:<58} {blocks:>9} blocks = {blocks * 4:>10} KiB = "
                f"{blocks * METADATA_BLOCK_SECTORS:>11} sectors")

    return "\n".join([
        f"origin: {origin_sectors} sectors ({origin_sectors * SECTOR_BYTES} bytes) in "
        f"{size.origin_blocks} blocks of {block_sectors} sectors",
        f"era array: {size.era_array_blocks} array blocks + {size.era_array_nodes} btree nodes; "
        f"each writeset: {size.writeset_blocks} array blocks + {size.writeset_nodes} btree nodes",
        line("minimum (dmsetup create succeeds)", size.minimum_blocks),
        line("with checkpoint + take_metadata_snap", size.with_snapshot_blocks),
        line(f"recommended (snapshot held, {size.checkpoints} checkpoints pending)",
             size.recommended_blocks),
    ])
