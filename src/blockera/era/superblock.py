"""The dm-era superblock (docs/era.md §1; the kernel's `struct superblock_disk`).

Block 0 of the metadata device, and also the layout of a metadata-snapshot copy (of which only
the writeset tree root and era array root are meaningful). 224 bytes of packed little-endian
fields; the rest of the block is zero and covered by the checksum.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from blockera.errors import MetadataError
from blockera.pdata.array import array_max_entries
from blockera.pdata.bitset import words_for_bits
from blockera.pdata.checksum import SUPERBLOCK_CSUM_XOR, Validator, block_checksum, stored_checksum
from blockera.pdata.space_map import SpaceMapRoot
from blockera.units import METADATA_BLOCK_BYTES, METADATA_BLOCK_SECTORS

SUPERBLOCK_LOCATION = 0
SUPERBLOCK_MAGIC = 2126579579
ERA_VERSION = 1
SM_ROOT_FIELD_BYTES = 128
MAX_ORIGIN_BLOCKS = 1 << 31       # the kernel refuses an origin of 2^31 blocks or more
_LAYOUT = struct.Struct("<IIQ16sQI128sIIIIIQQQQ")
assert _LAYOUT.size == 224
WRITESET_RECORD = struct.Struct("<IQ")   # nr_bits, bitset root (packed: 12 bytes)


@dataclass
class Writeset:
    """A writeset record: how many origin blocks it covers and its bitset's root (0 = none)."""

    nr_bits: int = 0
    root: int = 0

    def pack(self) -> bytes:
        return WRITESET_RECORD.pack(self.nr_bits, self.root)

    @classmethod
    def unpack(cls, data: bytes | bytearray, offset: int = 0) -> "Writeset":
        return cls(*WRITESET_RECORD.unpack_from(data, offset))


@dataclass
class Superblock:
    flags: int = 0
    blocknr: int = 0
    uuid: bytes = bytes(16)
    magic: int = SUPERBLOCK_MAGIC
    version: int = ERA_VERSION
    sm_root: bytes = bytes(SM_ROOT_FIELD_BYTES)
    data_block_size: int = 0
    metadata_block_size: int = METADATA_BLOCK_SECTORS
    nr_blocks: int = 0
    current_era: int = 0
    current_writeset: Writeset = field(default_factory=Writeset)
    writeset_tree_root: int = 0
    era_array_root: int = 0
    metadata_snap: int = 0

    @classmethod
    def unpack(cls, block: bytes | bytearray) -> "Superblock":
        (_, flags, blocknr, uuid, magic, version, sm_root, data_block_size, md_block_size,
         nr_blocks, current_era, ws_bits, ws_root, wt_root, ea_root, snap) = _LAYOUT.unpack_from(block, 0)
        return cls(flags, blocknr, uuid, magic, version, sm_root, data_block_size, md_block_size,
                   nr_blocks, current_era, Writeset(ws_bits, ws_root), wt_root, ea_root, snap)

    def pack_into(self, block: bytearray) -> None:
        """Write the fields over `block` (bytes past the structure are left as they are, as the
        kernel's prepare_superblock does)."""
        _LAYOUT.pack_into(block, 0, 0, self.flags, self.blocknr, self.uuid, self.magic,
                          self.version, self.sm_root.ljust(SM_ROOT_FIELD_BYTES, b"\0"),
                          self.data_block_size, self.metadata_block_size, self.nr_blocks,
                          self.current_era, self.current_writeset.nr_bits,
                          self.current_writeset.root, self.writeset_tree_root,
                          self.era_array_root, self.metadata_snap)

    def to_block(self) -> bytearray:
        block = bytearray(METADATA_BLOCK_BYTES)
        self.pack_into(block)
        return block

    @property
    def space_map_root(self) -> SpaceMapRoot:
        return SpaceMapRoot.unpack(self.sm_root)


def structural_problems(sb: Superblock, device_blocks: int) -> list[str]:
    """What makes a superblock (checksum already verified) unusable on a device of
    `device_blocks` metadata blocks: found before anything is allocated for its structures."""
    problems = []
    if sb.metadata_block_size != METADATA_BLOCK_SECTORS:
        problems.append(f"metadata block size is {sb.metadata_block_size} sectors, not "
                        f"{METADATA_BLOCK_SECTORS}")
    if not sb.writeset_tree_root:
        problems.append("writeset tree root is 0")
    if not sb.era_array_root:
        problems.append("era array root is 0")
    if sb.writeset_tree_root and sb.writeset_tree_root == sb.era_array_root:
        problems.append("writeset tree and era array share a root")
    for name, loc in (("writeset tree root", sb.writeset_tree_root),
                      ("era array root", sb.era_array_root),
                      ("current writeset root", sb.current_writeset.root),
                      ("metadata snapshot", sb.metadata_snap)):
        if loc >= device_blocks:
            problems.append(f"{name} {loc} is beyond the end of the device "
                            f"({device_blocks} blocks)")
    for name, count, entries, value_size in (
            ("nr_blocks", sb.nr_blocks, sb.nr_blocks, 4),
            ("current writeset nr_bits", sb.current_writeset.nr_bits,
             words_for_bits(sb.current_writeset.nr_bits), 8)):
        if count >= MAX_ORIGIN_BLOCKS:
            problems.append(f"{name} {count} is beyond the era target's limit "
                            f"({MAX_ORIGIN_BLOCKS - 1})")
        elif -(-entries // array_max_entries(value_size)) > device_blocks:
            problems.append(f"{name} {count} cannot fit a metadata device of {device_blocks} "
                            "blocks")
    return problems


class SuperblockValidator(Validator):
    """The kernel's sb_check: location, then magic, then checksum, then version."""

    def __init__(self) -> None:
        super().__init__("superblock", SUPERBLOCK_CSUM_XOR)

    def check(self, location: int, block: bytes | bytearray | memoryview) -> None:
        blocknr = struct.unpack_from("<Q", block, 8)[0]
        if blocknr != location:
            raise MetadataError(f"superblock records location {blocknr}, expected {location}",
                                block=location, errno_name="ENOTBLK")
        magic = struct.unpack_from("<Q", block, 32)[0]
        if magic != SUPERBLOCK_MAGIC:
            raise MetadataError(f"bad magic {magic:#x} in superblock (expected "
                                f"{SUPERBLOCK_MAGIC:#x}): not dm-era metadata", block=location)
        computed = block_checksum(block, self.xor)
        stored = stored_checksum(block)
        if computed != stored:
            raise MetadataError(f"bad checksum in superblock (stored {stored:#010x}, computed "
                                f"{computed:#010x})", block=location)
        version = struct.unpack_from("<I", block, 40)[0]
        if version != ERA_VERSION:
            raise MetadataError(f"era metadata version {version} found, but only version "
                                f"{ERA_VERSION} is supported", block=location,
                                errno_name="EINVAL")


SUPERBLOCK = SuperblockValidator()
