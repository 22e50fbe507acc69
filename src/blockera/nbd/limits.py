"""Size constraints the server advertises (NBD_INFO_BLOCK_SIZE) and enforces.

The minimum block size is the alignment every READ, WRITE, TRIM and WRITE_ZEROES must have
(512 bytes by default, so sector-aligned clients such as qemu or a loop device work and
device-mapper devices, which address 512-byte sectors, are not sent partial sectors by clients
that agreed to the constraints); the preferred block size is the size below which I/O costs a
read-modify-write; the maximum payload bounds the memory one READ or WRITE can make the server
allocate.

See docs/nbd.md §2.
"""

from __future__ import annotations

from dataclasses import dataclass

from blockera.errors import UsageError

_MAX_MIN_BLOCK_BYTES = 1 << 16


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass(frozen=True)
class BlockLimits:
    """Block size constraints, in bytes."""

    min_block_bytes: int = 512
    preferred_block_bytes: int = 4096
    max_payload_bytes: int = 32 << 20

    def __post_init__(self) -> None:
        if not _is_power_of_two(self.min_block_bytes) or \
                self.min_block_bytes > _MAX_MIN_BLOCK_BYTES:
            raise UsageError(f"minimum block size {self.min_block_bytes} bytes: must be a power "
                             f"of two no larger than {_MAX_MIN_BLOCK_BYTES}")
        if not _is_power_of_two(self.preferred_block_bytes) or \
                self.preferred_block_bytes < max(self.min_block_bytes, 512):
            raise UsageError(f"preferred block size {self.preferred_block_bytes} bytes: must be "
                             "a power of two at least 512 and at least the minimum block size "
                             f"({self.min_block_bytes})")
        if not self.preferred_block_bytes <= self.max_payload_bytes <= 0xFFFFFFFF:
            raise UsageError(f"maximum payload {self.max_payload_bytes} bytes: must be at least "
                             f"the preferred block size ({self.preferred_block_bytes}) and fit "
                             "in 32 bits")

    def misaligned(self, offset_bytes: int, length_bytes: int, export_size_bytes: int) -> bool:
        """True if a request breaks the minimum block alignment. A request that ends exactly
        at the end of an export whose size is not a multiple of the minimum block may have an
        unaligned length (otherwise the last bytes could not be reached)."""
        mask = self.min_block_bytes - 1
        if offset_bytes & mask:
            return True
        return bool(length_bytes & mask) and offset_bytes + length_bytes != export_size_bytes
