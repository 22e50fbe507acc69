"""Block checksums and validators (docs/persistent-data.md §1).

Every persistent-data block stores at offset 0 a CRC32C of bytes 4..4095 (seed 0xFFFFFFFF, no final
inversion) XORed with a per-type constant, and stores its own location (`blocknr`) so that a
misdirected write is caught. A `Validator` checks both on read and fills both in before a write.
"""

from __future__ import annotations

import struct

import crc32c as _crc32c

from blockera.errors import MetadataError
from blockera.units import METADATA_BLOCK_BYTES

SUPERBLOCK_CSUM_XOR = 146538381
BTREE_CSUM_XOR = 121107
INDEX_CSUM_XOR = 160478
BITMAP_CSUM_XOR = 240779
ARRAY_CSUM_XOR = 595846735

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


def block_checksum(block: bytes | bytearray | memoryview, xor: int) -> int:
    """The on-disk checksum of a 4 KiB block for a structure with constant `xor`."""
    return _crc32c.crc32c(memoryview(block)[4:METADATA_BLOCK_BYTES]) ^ 0xFFFFFFFF ^ xor


def stored_checksum(block: bytes | bytearray | memoryview) -> int:
    return _U32.unpack_from(block, 0)[0]


class Validator:
    """Checks and prepares one kind of metadata block.

    `blocknr_offset` is where the block's own location is stored (8 for most types, 16 for
    array blocks)."""

    def __init__(self, name: str, xor: int, blocknr_offset: int = 8) -> None:
        self.name = name
        self.xor = xor
        self.blocknr_offset = blocknr_offset

    def check(self, location: int, block: bytes | bytearray | memoryview) -> None:
        """Raise MetadataError if `block` (read from `location`) is not a valid block of this
        type. The order of checks is the kernel's: location, checksum, then structure."""
        stored_location = _U64.unpack_from(block, self.blocknr_offset)[0]
        if stored_location != location:
            raise MetadataError(
                f"{self.name} block records location {stored_location} (misdirected or "
                "stale write)", block=location, errno_name="ENOTBLK")
        computed = block_checksum(block, self.xor)
        stored = stored_checksum(block)
        if computed != stored:
            raise MetadataError(
                f"bad checksum in {self.name} block (stored {stored:#010x}, "
                f"computed {computed:#010x})", block=location)
        self.check_structure(location, block)

    def check_structure(self, location: int, block: bytes | bytearray | memoryview) -> None:
        """Type-specific checks after location and checksum; none by default."""

    def prepare(self, location: int, block: bytearray) -> None:
        """Stamp `location` and the checksum into `block` before it is written."""
        _U64.pack_into(block, self.blocknr_offset, location)
        _U32.pack_into(block, 0, block_checksum(block, self.xor))


class BtreeNodeValidator(Validator):
    """Btree nodes: after checksum, the kernel checks that the node's entries fit in a block,
    that nr_entries <= max_entries and that it is an internal node or a leaf."""

    def __init__(self) -> None:
        super().__init__("btree node", BTREE_CSUM_XOR)

    def check_structure(self, location: int, block: bytes | bytearray | memoryview) -> None:
        flags, _, nr_entries, max_entries, value_size = struct.unpack_from("<IQIII", block, 4)
        if 32 + (8 + value_size) * max_entries > METADATA_BLOCK_BYTES:
            raise MetadataError(f"btree node: {max_entries} entries of {value_size}-byte values "
                                "do not fit in a block", block=location)
        if nr_entries > max_entries:
            raise MetadataError(f"btree node: nr_entries {nr_entries} exceeds max_entries "
                                f"{max_entries}", block=location)
        if not flags & 3:
            raise MetadataError(f"btree node: flags {flags:#x} mark neither internal node nor "
                                "leaf", block=location)


BTREE_NODE = BtreeNodeValidator()
INDEX_BLOCK = Validator("space map index", INDEX_CSUM_XOR)
BITMAP_BLOCK = Validator("space map bitmap", BITMAP_CSUM_XOR)
ARRAY_BLOCK = Validator("array", ARRAY_CSUM_XOR, blocknr_offset=16)
