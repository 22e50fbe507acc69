import numpy as np
import pytest

from blockera.blockdev import MemoryDevice
from blockera.errors import NoSpaceError
from blockera.pdata.block_manager import BlockManager
from blockera.pdata.space_map import (ENTRIES_PER_BITMAP, MetadataSpaceMap, decode_bitmap,
                                      encode_bitmap, format_metadata, open_metadata)
from blockera.pdata.transaction import TransactionManager


def test_bitmap_bit_order_matches_kernel_examples() -> None:
    # docs/persistent-data.md §3: count 1 for entry 0 is byte 0x02; count 2 for entry 1 is 0x04;
    # entries 0..10 at count 1 give the word 0x2AAAAA.
    one = np.zeros(ENTRIES_PER_BITMAP, dtype=np.uint32)
    one[0] = 1
    assert encode_bitmap(one)[0] == 0x02
    two = np.zeros(ENTRIES_PER_BITMAP, dtype=np.uint32)
    two[1] = 2
    assert encode_bitmap(two)[0] == 0x04
    eleven = np.zeros(ENTRIES_PER_BITMAP, dtype=np.uint32)
    eleven[:11] = 1
    assert int.from_bytes(encode_bitmap(eleven)[:8], "little") == 0x2AAAAA


def test_bitmap_round_trip_clips_at_three() -> None:
    rng = np.random.default_rng(7)
    counts = rng.integers(0, 6, ENTRIES_PER_BITMAP).astype(np.uint32)
    block = bytes(16) + encode_bitmap(counts)
    assert np.array_equal(decode_bitmap(block), np.minimum(counts, 3))


def _fresh(nr_blocks: int) -> tuple[TransactionManager, MetadataSpaceMap]:
    return format_metadata(BlockManager(MemoryDevice(nr_blocks * 4096)))


def test_bootstrap_layout_is_the_kernels() -> None:
    # §5.6: 0 superblock, 1 index, 2 ref-count leaf, 3 bitmap; all with count 1
    tm, sm = _fresh(2048)
    assert (sm.bitmap_root, sm.ref_count_root, sm.index[0].blocknr) == (1, 2, 3)
    assert list(sm.counts[:5]) == [1, 1, 1, 1, 0]
    assert sm.nr_allocated == 4 and sm.used() == 4


def test_counts_above_two_use_the_overflow_tree_and_survive_reopen() -> None:
    tm, sm = _fresh(64)
    b = sm.new_block()
    for _ in range(5):
        sm.inc(b)
    tm.pre_commit()
    assert sm.get_count(b) == 6
    _, reopened = open_metadata(tm.bm, sm.root())
    assert reopened.get_count(b) == 6
    for _ in range(4):
        sm.dec(b)
    tm.pre_commit()
    assert sm.get_count(b) == 2
    _, reopened = open_metadata(tm.bm, sm.root())
    assert reopened.get_count(b) == 2
    assert dict(reopened.ref_tree.walk(reopened.ref_count_root)) == {}


def test_freed_blocks_are_not_reused_in_the_same_transaction() -> None:
    tm, sm = _fresh(64)
    first = sm.new_block()
    tm.pre_commit()
    sm.dec(first)
    again = [sm.new_block() for _ in range(10)]
    assert first not in again
    tm.pre_commit()
    sm.cursor = 0
    assert sm.new_block() == first


def test_full_device_raises_a_clear_error() -> None:
    tm, sm = _fresh(16)
    with pytest.raises(NoSpaceError, match="metadata device is full"):
        for _ in range(20):
            sm.new_block()


def test_bitmaps_kept_up_to_date_between_commits_match_a_fresh_encoding() -> None:
    """Bitmaps are encoded once and then changed entry by entry: after any mix of increments
    and decrements (through 3 and the overflow tree), every committed bitmap block holds the
    encoding of the counts, and a reopened space map reads the same counts."""
    tm, sm = _fresh(40000)
    rng = np.random.default_rng(3)
    held: list[int] = []
    for _ in range(6):
        for _ in range(200):
            if held and rng.random() < 0.4:
                sm.dec(held.pop(int(rng.integers(len(held)))))
            elif held and rng.random() < 0.3:
                b = held[int(rng.integers(len(held)))]
                sm.inc(b)
                held.append(b)
            else:
                held.append(sm.new_block())
        tm.pre_commit()
        for i, entry in enumerate(sm.index):
            start = i * ENTRIES_PER_BITMAP
            values = sm.counts[start: min(start + ENTRIES_PER_BITMAP, sm.nr_blocks)]
            assert bytes(tm.bm.read_raw(entry.blocknr))[16:] == encode_bitmap(values)
        _, reopened = open_metadata(tm.bm, sm.root())
        assert np.array_equal(reopened.counts, sm.counts)
