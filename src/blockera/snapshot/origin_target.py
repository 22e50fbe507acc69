"""The `snapshot-origin` target (docs/snapshot.md §6; the kernel's origin_ctr,
origin_map and origin_status in dm-snap.c, target version 1.9.0).

    snapshot-origin <origin dev>

Reads and flushes pass straight to the origin. A write first gives every active snapshot of
that origin its copy of the chunks it changes (see `copyout`), then reaches the origin. The
target declares no discard support. Status is empty; the table shows the device.
"""

from __future__ import annotations

from blockera.dm.devref import Opener
from blockera.dm.target import Target
from blockera.errors import DeviceError, TableError
from blockera.snapshot.copyout import write_origin
from blockera.snapshot.origin_registry import registry_for
from blockera.units import SECTOR_BYTES


class SnapshotOriginTarget(Target):
    name = "snapshot-origin"
    version = (1, 9, 0)

    def __init__(self, opener: Opener, length_sectors: int, args: list[str]) -> None:
        super().__init__(opener, length_sectors, args)
        if len(args) != 1:
            raise TableError("origin: incorrect number of arguments")
        try:
            self.ref = self.get_device(args[0], writable=True, what="origin device")
        except DeviceError as exc:
            raise TableError(f"Cannot get target device ({exc})") from None
        self.registry = registry_for(opener)
        self.group = self.registry.acquire(self.ref.identity)

    def read(self, sector: int, nr_sectors: int) -> bytes:
        return self.ref.dev.read(sector * SECTOR_BYTES, nr_sectors * SECTOR_BYTES)

    def write(self, sector: int, data: bytes | memoryview) -> None:
        write_origin(self.group, self.ref.dev, sector, data)

    def flush(self) -> None:
        self.ref.dev.flush()

    def destroy(self) -> None:
        if hasattr(self, "group"):
            self.registry.release(self.group)
        super().destroy()

    def status(self) -> str:
        return ""

    def table_args(self) -> str:
        return self.ref.table_name

