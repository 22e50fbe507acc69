import struct

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from blockera.pdata.array import Array
from blockera.pdata.bitset import Bitset
from blockera.pdata.walkers import read_array
from tests.pdata.helpers import commit, fresh_tm, node_refs, space_map_refs


@pytest.mark.parametrize("length, blocks", [(1024, [1018, 6]), (2731, [1018, 1018, 695]),
                                            (1018, [1018]), (0, [])])
def test_array_block_fill_matches_kernel(length: int, blocks: list[int]) -> None:
    # docs/persistent-data.md §5verified on the kernel: 1024 -> 1018 + 6; 2731 -> 1018, 1018, 695
    tm, _ = fresh_tm()
    array = Array(tm, 4)
    root = array.resize(array.empty(), 0, length, bytes(4))
    commit(tm)
    contents = read_array(tm.bm, root, length, "<u4", "era array")
    sizes = [struct.unpack_from("<I", tm.read(loc, _validator()), 8)[0]
             for loc in contents.blocks.tolist()]
    assert sizes == blocks


def _validator():
    from blockera.pdata.checksum import ARRAY_BLOCK
    return ARRAY_BLOCK


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 5000), min_size=1, max_size=6),
       writes=st.lists(st.tuples(st.integers(0, 4999), st.integers(0, 2**32 - 1)), max_size=40))
def test_resize_and_set_match_a_numpy_model(sizes: list[int], writes: list[tuple[int, int]]) -> None:
    tm, sm = fresh_tm()
    array = Array(tm, 4)
    root = array.empty()
    model = np.zeros(0, dtype=np.uint32)
    length = 0
    for new_length in sizes:
        root = array.resize(root, length, new_length, bytes(4))
        model = np.concatenate([model[:new_length],
                                np.zeros(max(0, new_length - length), np.uint32)])
        length = new_length
        for index, value in writes:
            if index < length:
                root = array.set(root, index, struct.pack("<I", value))
                model[index] = value
        commit(tm)
        assert np.array_equal(read_array(tm.bm, root, length, "<u4", "array").values, model)
    refs = np.zeros(sm.nr_blocks, dtype=np.int64)
    space_map_refs(sm, refs)

    def array_block(value: bytes, refs: np.ndarray, visited: set[int]) -> None:
        refs[struct.unpack("<Q", value)[0]] += 1

    node_refs(tm, root, refs, set(), array_block)
    assert np.array_equal(refs, sm.counts.astype(np.int64))


def test_bitset_cached_word_is_written_on_flush() -> None:
    tm, _ = fresh_tm()
    bitset = Bitset(tm)
    root = bitset.resize(bitset.empty(), 0, 512, False)
    for bit in (3, 200, 201):
        root = bitset.set_bit(root, bit)
    root = bitset.flush(root)
    commit(tm)
    words = read_array(tm.bm, root, 8, "<u8", "bitset").values
    # docs/persistent-data.md §6: bits {3, 200, 201} -> word 0 = 0x8, word 3 = 0x300
    assert words[0] == 0x8 and words[3] == 0x300 and words.sum() == 0x308


@settings(max_examples=40, deadline=None)
@given(length=st.one_of(st.integers(1, 2000), st.integers(33000, 100000)),   # 1 to 4 blocks
       batches=st.lists(st.lists(st.integers(0, 99999), max_size=60), min_size=1, max_size=4),
       cached=st.one_of(st.none(), st.integers(0, 99999)))
def test_bitset_set_bits_makes_the_same_metadata_as_bit_by_bit(
        length: int, batches: list[list[int]], cached: int | None) -> None:
    """Setting a batch at once allocates the same blocks in the same order as set_bit on each
    bit then flush: the two metadata devices end up byte for byte identical."""
    devices = []
    for bulk in (False, True):
        tm, _ = fresh_tm()
        bitset = Bitset(tm)
        root = bitset.resize(bitset.empty(), 0, length, False)
        commit(tm)
        if cached is not None and cached < length:
            root = bitset.set_bit(root, cached)        # a dirty cached word before the batch
        for batch in batches:
            bits = [b for b in batch if b < length]
            if bulk:
                root = bitset.set_bits(root, bits)
            else:
                for bit in bits:
                    root = bitset.set_bit(root, bit)
                root = bitset.flush(root)
            commit(tm)
        devices.append((root, bytes(tm.bm.dev.data)))
        words = read_array(tm.bm, root, -(-length // 64), "<u8", "bitset").values
        expected = np.zeros(len(words), dtype=np.uint64)
        for bit in [b for batch in batches for b in batch if b < length] + (
                [cached] if cached is not None and cached < length else []):
            expected[bit // 64] |= np.uint64(1 << (bit % 64))
        assert np.array_equal(words, expected)
    assert devices[0] == devices[1]


@settings(max_examples=40, deadline=None)
@given(length=st.one_of(st.integers(1, 2000), st.integers(2000, 3000)),
       batches=st.lists(st.lists(st.integers(0, 2999), max_size=120), min_size=1, max_size=4),
       value=st.integers(0, 2**32 - 1))
def test_set_many_makes_the_same_metadata_as_one_set_per_index(
        length: int, batches: list[list[int]], value: int) -> None:
    """The era digest's bulk set allocates the same blocks in the same order as one `set`
    per index: the two metadata devices end up byte for byte identical."""
    devices = []
    packed = struct.pack("<I", value)
    for bulk in (False, True):
        tm, _ = fresh_tm()
        array = Array(tm, 4)
        root = array.resize(array.empty(), 0, length, bytes(4))
        commit(tm)
        for batch in batches:
            indexes = sorted({i for i in batch if i < length})
            if bulk:
                root = array.set_many(root, indexes, packed)
            else:
                for index in indexes:
                    root = array.set(root, index, packed)
            commit(tm)
        devices.append((root, bytes(tm.bm.dev.data)))
    assert devices[0] == devices[1]
