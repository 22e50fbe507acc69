"""The persistent store's header and the chunk-size rules (docs/snapshot.md §1, §2).

Mirrors the kernel's `struct disk_header` (four little-endian u32: magic, valid, version,
chunk_size at COW byte 0; the rest of chunk 0 is written as zeros), `read_header()` /
`write_header()` in dm-snap-persistent.c and `dm_exception_store_set_chunk_size()` in
dm-exception-store.c, including their error strings.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from blockera.errors import MetadataError, TableError
from blockera.snapshot.layout import (HEADER_BYTES, MAX_CHUNK_SECTORS, SNAP_MAGIC,
                                      SNAPSHOT_DISK_VERSION)
from blockera.units import SECTOR_BYTES

_HEADER = struct.Struct("<IIII")
assert _HEADER.size == HEADER_BYTES


@dataclass(frozen=True)
class DiskHeader:
    """The 16 header bytes. `valid` is any u32: the kernel treats every non-zero value as
    valid; `magic == 0` means "no store yet"."""

    magic: int = SNAP_MAGIC
    valid: int = 1
    version: int = SNAPSHOT_DISK_VERSION
    chunk_sectors: int = 0

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> "DiskHeader":
        if len(data) < HEADER_BYTES:
            raise MetadataError(f"COW header is truncated: {len(data)} of {HEADER_BYTES} bytes",
                                errno_name="EIO")
        return cls(*_HEADER.unpack_from(data, 0))

    def pack(self) -> bytes:
        return _HEADER.pack(self.magic, self.valid, self.version, self.chunk_sectors)

    def chunk(self) -> bytes:
        """The whole header chunk as the kernel writes it: 16 bytes, then zeros."""
        return self.pack().ljust(self.chunk_sectors * SECTOR_BYTES, b"\0")

    @property
    def is_new(self) -> bool:
        return self.magic == 0

    @property
    def is_valid(self) -> bool:
        return self.valid != 0

    def describe(self) -> str:
        magic = f"{self.magic:#010x}" + (" (SnAp)" if self.magic == SNAP_MAGIC else "")
        return (f"magic {magic}, valid {self.valid}, version {self.version}, "
                f"chunk_size {self.chunk_sectors} sectors")


def chunk_size_error(chunk_sectors: int, logical_block_bytes: int = SECTOR_BYTES) -> str | None:
    """The kernel's reason for rejecting a chunk size, or None if it is acceptable.
    `logical_block_bytes` is the larger logical block size of the COW and origin devices."""
    if chunk_sectors <= 0 or chunk_sectors & (chunk_sectors - 1):
        return "Chunk size is not a power of 2"
    if chunk_sectors % max(1, logical_block_bytes // SECTOR_BYTES):
        return "Chunk size is not a multiple of device blocksize"
    if chunk_sectors > MAX_CHUNK_SECTORS:
        return "Chunk size is too high"
    return None


def check_table_chunk_size(chunk_sectors: int, logical_block_bytes: int = SECTOR_BYTES) -> None:
    """Validate a non-zero chunk size from a table line (TableError with the kernel's text)."""
    reason = chunk_size_error(chunk_sectors, logical_block_bytes)
    if reason is not None:
        raise TableError(reason)


def check_disk_header(header: DiskHeader, logical_block_bytes: int = SECTOR_BYTES) -> None:
    """The checks the kernel applies to an existing store's header, in its order: magic, the
    on-disk chunk size (when it is used), then the version. Raises MetadataError."""
    if header.magic != SNAP_MAGIC:
        raise MetadataError(
            f"Invalid or corrupt snapshot: header magic is {header.magic:#010x}, expected "
            f"{SNAP_MAGIC:#010x} ('SnAp'); this is not a dm-snapshot COW device",
            errno_name="ENXIO")
    reason = chunk_size_error(header.chunk_sectors, logical_block_bytes)
    if reason is not None:
        raise MetadataError(f"invalid on-disk chunk size {header.chunk_sectors}: {reason}.",
                            errno_name="EINVAL")
    if header.version != SNAPSHOT_DISK_VERSION:
        raise MetadataError(f"unable to handle snapshot disk version {header.version}",
                            errno_name="EINVAL")
