import pytest

from blockera.blockdev import MemoryDevice
from blockera.errors import NoSpaceError
from blockera.era.metadata import EraMetadata
from blockera.era.size import appended_btree_nodes, metadata_size


@pytest.mark.parametrize("origin_sectors, block_sectors, minimum, with_snapshot", [
    (2**31, 4096, 545, 582),        # 1 TiB at 2 MiB: real-kernel bisection (§15.2)
    (2**35, 4096, 8544, 9067),      # 16 TiB
    (65536, 128, 11, None),         # 32 MiB at 64 KiB
])
def test_sizes_match_the_kernels_bisection(origin_sectors: int, block_sectors: int,
                                           minimum: int, with_snapshot: int | None) -> None:
    size = metadata_size(origin_sectors, block_sectors)
    assert size.minimum_blocks == minimum
    if with_snapshot is not None:
        assert size.with_snapshot_blocks == with_snapshot


def test_btree_node_counts_match_kernel_images() -> None:
    # §15.2: A = 516 -> 4 nodes, 8241 -> 35, 16481 -> 68; W = 258 -> 3
    assert [appended_btree_nodes(k) for k in (1, 252, 253, 516, 8241, 16481, 258)] == \
        [1, 1, 3, 4, 35, 68, 3]


def _create(blocks: int, origin_blocks: int, block_sectors: int, snapshot: bool) -> None:
    md = EraMetadata(MemoryDevice(blocks * 4096), block_sectors)
    md.resize(origin_blocks)
    md.commit()
    md.era_rollover()
    md.commit()
    if snapshot:
        md.checkpoint()
        md.commit()
        md.take_snap()
        md.commit()


@pytest.mark.parametrize("origin_blocks, block_sectors", [(512, 128), (5000, 8), (40000, 8),
                                                          (300000, 8)])
def test_minimum_is_exact_for_the_metadata_operations(origin_blocks: int,
                                                      block_sectors: int) -> None:
    size = metadata_size(origin_blocks * block_sectors, block_sectors)
    _create(size.minimum_blocks, origin_blocks, block_sectors, False)
    with pytest.raises(NoSpaceError):
        _create(size.minimum_blocks - 1, origin_blocks, block_sectors, False)
    _create(size.with_snapshot_blocks, origin_blocks, block_sectors, True)
    with pytest.raises(NoSpaceError):
        _create(size.with_snapshot_blocks - 1, origin_blocks, block_sectors, True)


def test_rejects_bad_block_size() -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        metadata_size(1 << 20, 7)
