"""A mapped device: a name, a device number, a live and an inactive table, and the kernel's
life cycle (load into the inactive slot; suspend: presuspend hooks, block new I/O, wait for I/O
in flight, postsuspend hooks; resume: swap in the inactive table, preresume and resume hooks,
release I/O; remove: suspend if needed, destroy the tables).

It is itself a `BlockDevice`: I/O is split at target boundaries and handed to each target with
sectors relative to the target's start. While the device is suspended, I/O waits, as it does in
the kernel.

See docs/engine.md §1.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable
from dataclasses import dataclass

from blockera.blockdev import BlockDevice
from blockera.blocking import about_to_wait
from blockera.dm.table import TableLine
from blockera.dm.target import Target
from blockera.errors import BlockeraError, DeviceError, DeviceMapperError
from blockera.units import SECTOR_BYTES


@dataclass
class Table:
    lines: list[TableLine]
    targets: list[Target]

    @property
    def size_sectors(self) -> int:
        last = self.lines[-1]
        return last.start_sectors + last.length_sectors

    def destroy(self) -> None:
        for target in self.targets:
            target.destroy()


class MappedDevice(BlockDevice):
    def __init__(self, name: str, major: int, minor: int, uuid: str = "",
                 read_only: bool = False) -> None:
        self.name = name
        self.major = major
        self.minor = minor
        self.uuid = uuid
        self.read_only = read_only
        self.live: Table | None = None
        self.inactive: Table | None = None
        self.suspended = False
        self.open_count = 0
        self.event_nr = 0
        self._io = threading.Condition()
        self._in_flight = 0
        self._starts: list[int] = []

    @property
    def dev_t(self) -> str:
        return f"{self.major}:{self.minor}"

    @property
    def size_bytes(self) -> int:
        return self.live.size_sectors * SECTOR_BYTES if self.live else 0

    # -- I/O ------------------------------------------------------------------------------------
    def _enter(self) -> Table:
        with self._io:
            if self.suspended:
                about_to_wait()
            while self.suspended:
                self._io.wait()
            if self.live is None:
                raise DeviceError(f"{self.name}: device has no live table")
            self._in_flight += 1
            return self.live

    def _leave(self) -> None:
        with self._io:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._io.notify_all()

    def _pieces(self, table: Table, offset_bytes: int, length_bytes: int
                ) -> list[tuple[Target, int, int, int]]:
        """(target, relative sector, sectors, byte offset into the request) per target."""
        if offset_bytes % SECTOR_BYTES or length_bytes % SECTOR_BYTES:
            raise DeviceError(f"{self.name}: I/O must be aligned to 512-byte sectors "
                              f"(offset {offset_bytes}, length {length_bytes})",
                              errno_name="EINVAL")
        self.check_range(offset_bytes, length_bytes)
        sector = offset_bytes // SECTOR_BYTES
        end = sector + length_bytes // SECTOR_BYTES
        pieces = []
        i = bisect.bisect_right(self._starts, sector) - 1
        while sector < end:
            line = table.lines[i]
            stop = min(end, line.start_sectors + line.length_sectors)
            pieces.append((table.targets[i], sector - line.start_sectors, stop - sector,
                           (sector * SECTOR_BYTES) - offset_bytes))
            sector = stop
            i += 1
        return pieces

    def read(self, offset_bytes: int, length_bytes: int) -> bytes:
        table = self._enter()
        try:
            parts = [t.read(s, n) for t, s, n, _ in self._pieces(table, offset_bytes, length_bytes)]
            return parts[0] if len(parts) == 1 else b"".join(parts)
        finally:
            self._leave()

    def write(self, offset_bytes: int, data: bytes | bytearray | memoryview) -> None:
        if self.read_only:
            raise DeviceError(f"{self.name}: device is read-only", errno_name="EROFS")
        table = self._enter()
        try:
            view = memoryview(data)
            for t, s, n, off in self._pieces(table, offset_bytes, len(data)):
                t.write(s, view[off: off + n * SECTOR_BYTES])
        finally:
            self._leave()

    def submit_write(self, offset_bytes: int, data: bytes | bytearray | memoryview,
                     done: Callable[[BlockeraError | None], None]) -> None:
        """`write` with a completion (see `Target.submit_write`): a write within one target
        is handed to it and counts as in flight until `done` is called; one that spans
        targets is written here. An error raised here means `done` will not be called."""
        if self.read_only:
            raise DeviceError(f"{self.name}: device is read-only", errno_name="EROFS")
        table = self._enter()
        try:
            pieces = self._pieces(table, offset_bytes, len(data))
            if len(pieces) > 1:
                view = memoryview(data)
                for t, s, n, off in pieces:
                    t.write(s, view[off: off + n * SECTOR_BYTES])
        except BaseException:
            self._leave()
            raise
        if len(pieces) > 1:
            self._leave()
            done(None)
            return

        def finished(error: BlockeraError | None) -> None:
            self._leave()
            done(error)

        target, sector, _, _ = pieces[0]
        try:
            target.submit_write(sector, data, finished)
        except BaseException:
            self._leave()
            raise

    def discard(self, offset_bytes: int, length_bytes: int) -> None:
        table = self._enter()
        try:
            for t, s, n, _ in self._pieces(table, offset_bytes, length_bytes):
                t.discard(s, n)
        finally:
            self._leave()

    def write_zeroes(self, offset_bytes: int, length_bytes: int) -> None:
        table = self._enter()
        try:
            for t, s, n, _ in self._pieces(table, offset_bytes, length_bytes):
                t.write_zeroes(s, n)
        finally:
            self._leave()

    def flush(self) -> None:
        table = self._enter()
        try:
            for target in table.targets:
                target.flush()
        finally:
            self._leave()

    @property
    def supports_discard(self) -> bool:
        return bool(self.live) and all(t.supports_discard for t in self.live.targets)

    # -- life cycle -----------------------------------------------------------------------------
    def load(self, table: Table) -> None:
        if self.inactive is not None:
            self.inactive.destroy()
        self.inactive = table

    def clear(self) -> None:
        if self.inactive is not None:
            self.inactive.destroy()
            self.inactive = None

    def suspend(self) -> None:
        if self.suspended or self.live is None:
            self.suspended = True
            return
        for target in self.live.targets:
            target.presuspend()
        with self._io:
            self.suspended = True
            while self._in_flight:
                self._io.wait()
        for target in self.live.targets:
            target.postsuspend()

    def resume(self) -> None:
        old: Table | None = None
        if self.inactive is not None:
            if not self.suspended:
                self.suspend()
            old, self.live, self.inactive = self.live, self.inactive, None
            self._starts = [line.start_sectors for line in self.live.lines]
        try:
            if self.suspended and self.live is not None:
                for target in self.live.targets:
                    target.preresume()
                for target in self.live.targets:
                    target.resume()
                with self._io:
                    self.suspended = False
                    self._io.notify_all()
            elif self.live is None:
                self.suspended = False
        finally:
            if old is not None:
                old.destroy()

    def destroy(self) -> None:
        """Remove: suspend (running the hooks) if live, then destroy both tables."""
        if self.live is not None and not self.suspended:
            self.suspend()
        for table in (self.live, self.inactive):
            if table is not None:
                table.destroy()
        self.live = self.inactive = None
        with self._io:
            self._io.notify_all()

    # -- reporting ------------------------------------------------------------------------------
    def find_target(self, sector: int) -> Target:
        if self.live is None:
            raise DeviceMapperError(f"{self.name}: device has no live table")
        i = bisect.bisect_right(self._starts, sector) - 1
        if i < 0 or sector >= self.live.size_sectors:
            raise DeviceMapperError(f"{self.name}: no target at sector {sector}")
        return self.live.targets[i]

    def status_lines(self, kind: str) -> list[str]:
        """'status' or 'table' lines, formatted as dmsetup prints them."""
        if self.live is None:
            return []
        out = []
        for line, target in zip(self.live.lines, self.live.targets):
            text = target.status() if kind == "status" else target.table_args()
            out.append(f"{line.start_sectors} {line.length_sectors} {line.target} {text}")
        return out
