"""References from tables to the devices they name.

A table names a device by path (an image file or a block device), as `/dev/mapper/NAME` (another
device of the same engine) or as `MAJ:MIN`. A `DeviceRef` is one open of such a device: the
`BlockDevice` to do I/O on, the name the TABLE status prints (MAJ:MIN like the kernel; image
files, which have no device number, print their path), and an identity so that targets can tell
when two tables name the same device (snapshots pair with their origin that way).

See docs/engine.md §1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Hashable, Protocol

from blockera.blockdev import BlockDevice
from blockera.units import SECTOR_BYTES


@dataclass(eq=False)
class DeviceRef:
    dev: BlockDevice
    table_name: str
    identity: Hashable
    on_close: Callable[[], None] = field(default=lambda: None)
    closed: bool = False

    @property
    def size_sectors(self) -> int:
        return self.dev.size_bytes // SECTOR_BYTES

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.on_close()


class Opener(Protocol):
    def open(self, path: str, *, writable: bool, what: str) -> DeviceRef:
        """Open the device `path` names; raise DeviceError if it cannot be opened."""
