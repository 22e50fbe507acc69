"""Which engine runs a tracked device, and the few things the live workflows need of one beyond
the common interface (`Engine`, `EngineClient` and `KernelEngine` all offer create, load,
suspend, resume, remove, message, status, table, info, ls and device): whether a device exists,
its table lines, its era status, whether it is suspended; holding the usual stop signals while a
device is suspended. See docs/live-devices.md §1 and §3."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from blockera.blockdev import BlockDevice
from blockera.errors import DeviceMapperError, UsageError

MAPPER = "/dev/mapper/"


class DmControl(Protocol):
    def create(self, name: str, table: str | None = None) -> object: ...
    def load(self, name: str, table: str) -> None: ...
    def clear(self, name: str) -> None: ...
    def suspend(self, name: str) -> None: ...
    def resume(self, name: str) -> None: ...
    def remove(self, name: str) -> None: ...
    def message(self, name: str, sector: int, args: list[str]) -> str: ...
    def status(self, name: str | None = None) -> str: ...
    def table(self, name: str | None = None) -> str: ...
    def info(self, name: str | None = None) -> str: ...
    def ls(self) -> str: ...
    def device(self, name: str) -> BlockDevice: ...


def open_engine(kind: str, socket: str | None) -> DmControl:
    """The kernel's device-mapper (dmsetup) or the engine daemon at `socket`."""
    if kind == "kernel":
        from blockera.engine.kernel import KernelEngine
        return KernelEngine()
    from blockera.engine.client import EngineClient
    return EngineClient(socket, resume_if_gone=True)


def engine_kind_for(device: str) -> str:
    """"kernel" for a block device or a kernel /dev/mapper node, "userspace" for an image file
    or a /dev/mapper/NAME that only the engine daemon has."""
    if device.startswith(MAPPER) and not os.path.exists(device):
        return "userspace"
    try:
        mode = os.stat(device).st_mode
    except OSError as exc:
        raise UsageError(f"{device}: {exc.strerror}") from None
    if stat.S_ISBLK(mode):
        return "kernel"
    if stat.S_ISREG(mode):
        return "userspace"
    raise UsageError(f"{device}: not a block device, an image file or /dev/mapper/NAME")


def exists(engine: DmControl, name: str) -> bool:
    listing = engine.ls()
    return any(line.split("\t")[0].split(" ")[0] == name for line in listing.splitlines())


def table_lines(engine: DmControl, name: str) -> list[list[str]]:
    return [line.split() for line in engine.table(name).splitlines() if line.strip()]


def size_sectors(engine: DmControl, name: str) -> int:
    lines = table_lines(engine, name)
    if not lines:
        raise DeviceMapperError(f"{name} has no live table", errno_name="ENXIO")
    return int(lines[-1][0]) + int(lines[-1][1])


def open_count(engine: DmControl, name: str) -> int:
    for line in engine.info(name).splitlines():
        if line.startswith("Open count:"):
            return int(line.split(":", 1)[1])
    return 0


def is_suspended(engine: DmControl, name: str) -> bool:
    for line in engine.info(name).splitlines():
        if line.startswith("State:"):
            return "SUSPENDED" in line
    return False


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP while a device is suspended under its users: a Ctrl-C
    or a service stop lands after the resume, never between. (SIGKILL cannot be held: the
    engine daemon resumes a device whose client went away; on the kernel `blockera activate`
    or the next job resumes it.)"""
    held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def dev_t(engine: DmControl, name: str) -> str:
    """MAJ:MIN of a device, as tables print it."""
    for line in engine.info(name).splitlines():
        if line.startswith("Major, minor:"):
            major, minor = line.split(":", 1)[1].split(",")
            return f"{int(major)}:{int(minor)}"
    raise DeviceMapperError(f"{name}: no device number in its info")


def era_status(engine: DmControl, name: str) -> tuple[int, int | None]:
    """(current era, held metadata snapshot block or None) of an era device."""
    words = engine.status(name).split()
    if len(words) < 7 or words[2] != "era":
        raise DeviceMapperError(f"{name} is not an era device (status: {' '.join(words)})")
    return int(words[5]), None if words[6] == "-" else int(words[6])


def device_path(name: str) -> str:
    return f"{MAPPER}{name}"


def source_size_sectors(path: str) -> int:
    """Size of a block device or image file in 512-byte sectors (a partial sector is dropped)."""
    from blockera.blockdev import FileDevice
    with FileDevice(Path(path), writable=False) as dev:
        return dev.size_bytes // 512
