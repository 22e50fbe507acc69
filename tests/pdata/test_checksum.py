import crc32c
import pytest

from blockera.errors import MetadataError
from blockera.pdata.checksum import (ARRAY_BLOCK, ARRAY_CSUM_XOR, BITMAP_CSUM_XOR, BTREE_CSUM_XOR,
                                     BTREE_NODE, INDEX_CSUM_XOR, SUPERBLOCK_CSUM_XOR,
                                     block_checksum)


def test_crc32c_test_vector() -> None:
    assert crc32c.crc32c(b"123456789") == 0xE3069283


@pytest.mark.parametrize("xor, expected", [
    (SUPERBLOCK_CSUM_XOR, 0x5076581C),
    (BTREE_CSUM_XOR, 0x58CC7E82),
    (INDEX_CSUM_XOR, 0x58CFD54F),
    (BITMAP_CSUM_XOR, 0x58CE0B1A),
    (ARRAY_CSUM_XOR, 0x7B4E41DE),
])
def test_checksum_of_zero_block_per_type(xor: int, expected: int) -> None:
    # docs/persistent-data.md §1last column
    assert block_checksum(bytes(4096), xor) == expected


def test_prepare_then_check_round_trip_and_detects_damage() -> None:
    block = bytearray(4096)
    block[4:8] = (2).to_bytes(4, "little")          # leaf flag
    block[20:24] = (252).to_bytes(4, "little")      # max_entries
    block[24:28] = (8).to_bytes(4, "little")        # value_size
    BTREE_NODE.prepare(17, block)
    BTREE_NODE.check(17, block)
    with pytest.raises(MetadataError, match="block 18: .*location 17"):
        BTREE_NODE.check(18, block)
    block[100] ^= 1
    with pytest.raises(MetadataError, match="bad checksum in btree node"):
        BTREE_NODE.check(17, block)


def test_array_block_location_is_at_offset_16() -> None:
    block = bytearray(4096)
    ARRAY_BLOCK.prepare(5, block)
    assert int.from_bytes(block[16:24], "little") == 5
    ARRAY_BLOCK.check(5, block)


def test_btree_structure_checks() -> None:
    block = bytearray(4096)
    block[4:8] = (2).to_bytes(4, "little")
    block[16:20] = (300).to_bytes(4, "little")      # nr_entries > max
    block[20:24] = (252).to_bytes(4, "little")
    block[24:28] = (8).to_bytes(4, "little")
    BTREE_NODE.prepare(3, block)
    with pytest.raises(MetadataError, match="exceeds max_entries"):
        BTREE_NODE.check(3, block)
