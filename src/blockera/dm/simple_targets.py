"""The simple targets: `linear <dev> <offset>`, `error` and `zero` (the kernel's dm-linear.c,
dm-target.c's error target and dm-zero.c), with their constructor errors and table formats.
See docs/engine.md §1."""

from __future__ import annotations

import re

from blockera.dm.devref import Opener
from blockera.dm.target import Target
from blockera.errors import DeviceError, TableError
from blockera.units import SECTOR_BYTES

_SECTOR_RE = re.compile(r"\+?[0-9]+\Z")


class LinearTarget(Target):
    name = "linear"
    version = (1, 4, 0)
    supports_discard = True

    def __init__(self, opener: Opener, length_sectors: int, args: list[str]) -> None:
        super().__init__(opener, length_sectors, args)
        if len(args) != 2:
            raise TableError("Invalid argument count")
        if not _SECTOR_RE.match(args[1]) or int(args[1]) >= 1 << 64:
            raise TableError("Invalid device sector")
        self.offset_sectors = int(args[1])
        try:
            self.ref = self.get_device(args[0], writable=True, what="device",
                                       start_sectors=self.offset_sectors,
                                       length_sectors=length_sectors)
        except DeviceError as exc:
            raise TableError(f"Device lookup failed ({exc})") from None

    def _at(self, sector: int) -> int:
        return (self.offset_sectors + sector) * SECTOR_BYTES

    def read(self, sector: int, nr_sectors: int) -> bytes:
        return self.ref.dev.read(self._at(sector), nr_sectors * SECTOR_BYTES)

    def write(self, sector: int, data: bytes | memoryview) -> None:
        self.ref.dev.write(self._at(sector), data)

    def discard(self, sector: int, nr_sectors: int) -> None:
        self.ref.dev.discard(self._at(sector), nr_sectors * SECTOR_BYTES)

    def write_zeroes(self, sector: int, nr_sectors: int) -> None:
        self.ref.dev.write_zeroes(self._at(sector), nr_sectors * SECTOR_BYTES)

    def flush(self) -> None:
        self.ref.dev.flush()

    def table_args(self) -> str:
        return f"{self.ref.table_name} {self.offset_sectors}"


class ErrorTarget(Target):
    name = "error"
    version = (1, 6, 0)
    supports_discard = True

    def _fail(self) -> DeviceError:
        return DeviceError("I/O error (error target)", errno_name="EIO")

    def read(self, sector: int, nr_sectors: int) -> bytes:
        raise self._fail()

    def write(self, sector: int, data: bytes | memoryview) -> None:
        raise self._fail()

    def discard(self, sector: int, nr_sectors: int) -> None:
        raise self._fail()

    def write_zeroes(self, sector: int, nr_sectors: int) -> None:
        raise self._fail()

    def table_args(self) -> str:
        return ""


class ZeroTarget(Target):
    name = "zero"
    version = (1, 2, 0)
    supports_discard = True

    def __init__(self, opener: Opener, length_sectors: int, args: list[str]) -> None:
        super().__init__(opener, length_sectors, args)
        if args:
            raise TableError("No arguments required")

    def read(self, sector: int, nr_sectors: int) -> bytes:
        return bytes(nr_sectors * SECTOR_BYTES)

    def write(self, sector: int, data: bytes | memoryview) -> None:
        pass

    def discard(self, sector: int, nr_sectors: int) -> None:
        pass

    def write_zeroes(self, sector: int, nr_sectors: int) -> None:
        pass

    def table_args(self) -> str:
        return ""
