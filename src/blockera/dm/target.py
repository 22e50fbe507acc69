"""Targets: the behaviour behind each table line, and the registry of target types.

A target sees I/O relative to its own start, in sectors (the kernel's dm_target_offset). Its
life cycle hooks mirror the kernel's: constructed at table load, `presuspend`/`postsuspend`
around suspension, `preresume`/`resume` when the table goes live, `destroy` when the table is
dropped. `status()` is the INFO status text, `table_args()` the TABLE text, `message()` answers
`dmsetup message`. Targets do not register anywhere: whoever assembles an engine hands it
the target types it runs (`TargetTypes`, by name).

`submit_write` is a write with a completion: the base class writes at once and reports; a
target that holds writes back (era, until their blocks' marks are committed) reports later,
from its own thread, so a caller serving many requests need not block a thread per write.

See docs/engine.md §1.
"""

from __future__ import annotations

from abc import ABC
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, ClassVar

from blockera.errors import BlockeraError, DeviceError, TableError, TargetError

if TYPE_CHECKING:
    from blockera.dm.devref import DeviceRef, Opener


class Target(ABC):
    """Base class. Subclasses set `name` and implement what they support."""

    name: ClassVar[str]
    version: ClassVar[tuple[int, int, int]] = (1, 0, 0)
    supports_discard: ClassVar[bool] = False

    def __init__(self, opener: "Opener", length_sectors: int, args: list[str]) -> None:
        self.opener = opener
        self.length_sectors = length_sectors
        self.args = args
        self.held: list[DeviceRef] = []

    # -- construction helpers -----------------------------------------------------------------
    def get_device(self, path: str, *, writable: bool, what: str,
                   start_sectors: int = 0, length_sectors: int | None = None) -> "DeviceRef":
        """Open a device the table names; the kernel's dm_get_device (+ area check)."""
        ref = self.opener.open(path, writable=writable, what=what)
        self.held.append(ref)
        need = start_sectors + (length_sectors if length_sectors is not None else 0)
        if length_sectors is not None and need > ref.size_sectors:
            raise TableError(f"{ref.table_name} too small for target: start={start_sectors}, "
                             f"len={length_sectors}, dev_size={ref.size_sectors}")
        return ref

    # -- I/O (sectors relative to the target's start) -------------------------------------------
    def read(self, sector: int, nr_sectors: int) -> bytes:
        raise DeviceError(f"{self.name}: reads are not supported")

    def write(self, sector: int, data: bytes | memoryview) -> None:
        raise DeviceError(f"{self.name}: writes are not supported")

    def submit_write(self, sector: int, data: bytes | bytearray | memoryview,
                     done: Callable[[BlockeraError | None], None]) -> None:
        """Write `data` and call `done` once, with None or the write's error, possibly later
        and from another thread. The caller may reuse `data` once this returns (a target that
        holds the write back keeps a copy). An error raised here instead means the write was
        refused and `done` will not be called."""
        self.write(sector, data)
        done(None)

    def discard(self, sector: int, nr_sectors: int) -> None:
        raise DeviceError(f"{self.name}: discard is not supported", errno_name="EOPNOTSUPP")

    def write_zeroes(self, sector: int, nr_sectors: int) -> None:
        self.write(sector, bytes(nr_sectors * 512))

    def flush(self) -> None:
        """Make completed writes durable on the devices underneath."""

    # -- life cycle ---------------------------------------------------------------------------
    def presuspend(self) -> None:
        pass

    def postsuspend(self) -> None:
        pass

    def preresume(self) -> None:
        pass

    def resume(self) -> None:
        pass

    def settle(self) -> None:
        """Wait until background work the target started (e.g. era digestion) is done."""

    def destroy(self) -> None:
        for ref in self.held:
            ref.close()
        self.held.clear()

    # -- reporting ----------------------------------------------------------------------------
    def status(self) -> str:
        return ""

    def table_args(self) -> str:
        return " ".join(self.args)

    def message(self, args: list[str]) -> str | None:
        raise TargetError(f"{self.name}: target does not accept messages")


TargetTypes = Mapping[str, type[Target]]


def construct(target_types: TargetTypes, name: str, opener: "Opener", length_sectors: int,
              args: list[str]) -> Target:
    """Build a target of type `name` (its constructor), from the types an engine was given;
    on failure every device it opened is released."""
    cls = target_types.get(name)
    if cls is None:
        raise TableError(f"unknown target type {name!r} (known: {', '.join(sorted(target_types))})")
    target = cls.__new__(cls)
    try:
        target.__init__(opener, length_sectors, args)  # type: ignore[misc]
    except BaseException:
        if hasattr(target, "held"):
            Target.destroy(target)
        raise
    return target
