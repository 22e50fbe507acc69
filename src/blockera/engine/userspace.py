"""The userspace device-mapper engine: named devices running blockera's targets over image files,
block devices or each other, with the kernel's life cycle and dmsetup's output formats.

All control operations (create, load, suspend, resume, remove, message, status...) are
serialised; I/O on devices runs concurrently. Devices are referenced in tables by path, as
`/dev/mapper/NAME`, or as `MAJ:MIN`; a device in use by another table cannot be removed.

See docs/engine.md §1.
"""

from __future__ import annotations

import os
import re
import stat
import threading
from pathlib import Path
from typing import Callable

from blockera.blockdev import BlockDevice, FileDevice
from blockera.dm.devref import DeviceRef
from blockera.dm.table import parse_table
from blockera.dm.target import TargetTypes, construct
from blockera.engine.mapped import MappedDevice, Table
from blockera.engine.standard_targets import STANDARD_TARGETS
from blockera.errors import BlockeraError, DeviceError, DeviceMapperError, TableError

DM_MAJOR = 253
MAPPER_PREFIX = "/dev/mapper/"
_NAME_RE = re.compile(r"^[^/\s]{1,127}$")
_DEVT_RE = re.compile(r"^(\d+):(\d+)$")

FileOpener = Callable[[str, bool], BlockDevice]


def _default_file_opener(path: str, writable: bool) -> BlockDevice:
    return FileDevice(path, writable=writable, direct=False)


class Engine:
    """Devices of one engine. `file_opener(path, writable)` opens image files and block
    devices (tests wrap it to log writes). With `allowed_paths`, tables may name only files
    and block devices inside those directories (or those exact paths), symbolic links
    resolved. Relative paths in a table are resolved against the `cwd` given with the table
    (the client's working directory), else the engine's own."""

    def __init__(self, *, file_opener: FileOpener = _default_file_opener,
                 major: int = DM_MAJOR, allowed_paths: list[str] | None = None,
                 targets: TargetTypes = STANDARD_TARGETS) -> None:
        self.file_opener = file_opener
        self.targets = targets
        self.major = major
        self.allowed_paths = (None if allowed_paths is None
                              else [Path(p).resolve() for p in allowed_paths])
        self._table_cwd: str | None = None
        self.devices: dict[str, MappedDevice] = {}
        self.lock = threading.RLock()
        self._next_minor = 0
        self._files: dict[tuple, tuple[BlockDevice, int, str]] = {}

    # -- opening devices named in tables (the Opener protocol) ------------------------------------
    def open(self, path: str, *, writable: bool, what: str) -> DeviceRef:
        mapped = self._engine_device(path)
        if mapped is not None:
            if mapped.live is None:
                raise DeviceError(f"{path}: device has no live table")
            mapped.open_count += 1

            def release(dev: MappedDevice = mapped) -> None:
                dev.open_count -= 1

            return DeviceRef(mapped, mapped.dev_t, ("dm", id(mapped)), release)
        return self._open_file(path, writable)

    def _engine_device(self, path: str) -> MappedDevice | None:
        if path.startswith(MAPPER_PREFIX):
            name = path[len(MAPPER_PREFIX):]
            if name not in self.devices:
                raise DeviceError(f"{path}: no such device in this engine")
            return self.devices[name]
        match = _DEVT_RE.match(path)
        if match and int(match.group(1)) == self.major:
            for dev in self.devices.values():
                if dev.minor == int(match.group(2)):
                    return dev
            raise DeviceError(f"{path}: no such device in this engine")
        return None

    def _open_file(self, path: str, writable: bool) -> DeviceRef:
        match = _DEVT_RE.match(path)
        if match:
            path = f"/dev/block/{path}"
        if not os.path.isabs(path):
            path = os.path.join(self._table_cwd or os.getcwd(), path)
        if self.allowed_paths is not None:
            real = Path(path).resolve()
            if not any(real == allowed or allowed in real.parents
                       for allowed in self.allowed_paths):
                raise DeviceError(f"{path}: not inside a path this engine may open "
                                  f"({', '.join(map(str, self.allowed_paths))}; see the "
                                  "daemon's --allow-path)", errno_name="EACCES")
        try:
            st = os.stat(path)
        except OSError as exc:
            raise DeviceError(f"{path}: {exc.strerror}") from None
        if stat.S_ISBLK(st.st_mode):
            key = ("block", st.st_rdev)
            table_name = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
        elif stat.S_ISREG(st.st_mode):
            key = ("file", st.st_dev, st.st_ino)
            table_name = str(Path(path).resolve())
        else:
            raise DeviceError(f"{path}: not a block device or regular file")
        shared = self._files.get(key)
        if shared is None:
            dev = self.file_opener(path, True)
            shared = (dev, 0, table_name)
        dev, count, table_name = shared
        self._files[key] = (dev, count + 1, table_name)

        def release(key: tuple = key) -> None:
            dev, count, name = self._files[key]
            if count == 1:
                del self._files[key]
                dev.close()
            else:
                self._files[key] = (dev, count - 1, name)

        return DeviceRef(dev, table_name, key, release)

    # -- control operations ------------------------------------------------------------------------
    def device(self, name: str) -> MappedDevice:
        dev = self.devices.get(name)
        if dev is None:
            raise DeviceMapperError(f"{name}: no such device", errno_name="ENXIO")
        return dev

    def _build(self, name: str, text: str, cwd: str | None) -> Table:
        lines = parse_table(text)
        targets = []
        self._table_cwd = cwd
        try:
            for line in lines:
                try:
                    targets.append(construct(self.targets, line.target, self,
                                             line.length_sectors, list(line.args)))
                except TableError as exc:
                    raise TableError(f"{line.target}: {exc}", errno_name=exc.errno_name) from None
            self._refuse_cycle(name, targets)
        except BaseException:
            for target in targets:
                target.destroy()
            raise
        finally:
            self._table_cwd = None
        return Table(lines, targets)

    def _refuse_cycle(self, name: str, targets: list) -> None:
        """A table of `name` may not use `name` itself, directly or through other devices."""
        path = [name]

        def visit(dev: MappedDevice) -> None:
            path.append(dev.name)
            if dev.name == name:
                raise TableError(f"device {name} would use itself ({' -> '.join(path)}): "
                                 "device-mapper devices cannot be stacked in a cycle")
            for table in (dev.live, dev.inactive):
                for target in table.targets if table else ():
                    for ref in target.held:
                        if isinstance(ref.dev, MappedDevice):
                            visit(ref.dev)
            path.pop()

        for target in targets:
            for ref in target.held:
                if isinstance(ref.dev, MappedDevice):
                    visit(ref.dev)

    def create(self, name: str, table: str | None = None, *, uuid: str = "",
               read_only: bool = False, cwd: str | None = None) -> MappedDevice:
        """dmsetup create: a new device; with a table, load it and resume."""
        with self.lock:
            if not _NAME_RE.match(name):
                raise DeviceMapperError(f"invalid device name {name!r}")
            if name in self.devices:
                raise DeviceMapperError(f"{name}: device already exists", errno_name="EBUSY")
            if uuid and any(d.uuid == uuid for d in self.devices.values()):
                raise DeviceMapperError(f"uuid {uuid} is already in use", errno_name="EBUSY")
            dev = MappedDevice(name, self.major, self._next_minor, uuid, read_only)
            if table is not None:
                dev.load(self._build(name, table, cwd))
            self._next_minor += 1
            self.devices[name] = dev
            if table is not None:
                try:
                    dev.resume()
                except BlockeraError:
                    self._remove_locked(name)
                    raise
            return dev

    def load(self, name: str, table: str, *, cwd: str | None = None) -> None:
        with self.lock:
            dev = self.device(name)
            dev.load(self._build(name, table, cwd))

    def clear(self, name: str) -> None:
        with self.lock:
            self.device(name).clear()

    def suspend(self, name: str) -> None:
        with self.lock:
            self.device(name).suspend()

    def resume(self, name: str) -> None:
        with self.lock:
            dev = self.device(name)
            dev.resume()

    def is_suspended(self, name: str) -> bool:
        """False too when no device has that name (any more)."""
        with self.lock:
            return name in self.devices and self.devices[name].suspended

    def remove(self, name: str) -> None:
        with self.lock:
            self._remove_locked(name)

    def _remove_locked(self, name: str) -> None:
        dev = self.device(name)
        if dev.open_count:
            raise DeviceMapperError(f"{name}: Device or resource busy (in use by "
                                    f"{dev.open_count} table(s))", errno_name="EBUSY")
        dev.destroy()
        del self.devices[name]

    def rename(self, name: str, new_name: str) -> None:
        with self.lock:
            if not _NAME_RE.match(new_name):
                raise DeviceMapperError(f"invalid device name {new_name!r}")
            if new_name in self.devices:
                raise DeviceMapperError(f"{new_name}: device already exists", errno_name="EBUSY")
            dev = self.devices.pop(self.device(name).name)
            dev.name = new_name
            self.devices[new_name] = dev

    def dev_t(self, name: str) -> str:
        return self.device(name).dev_t

    def settle(self, name: str | None = None) -> None:
        """Wait until the targets' background work (era digestion) has finished: what a
        separate dmsetup process, milliseconds later, would always see."""
        for dev in self._selected(name):
            if dev.live is not None and not dev.suspended:
                for target in dev.live.targets:
                    target.settle()

    def message(self, name: str, sector: int, args: list[str]) -> str:
        with self.lock:
            dev = self.device(name)
            if not args:
                raise DeviceMapperError("message is empty", errno_name="EINVAL")
            return dev.find_target(sector).message(args) or ""

    def shutdown(self) -> None:
        """Suspend every device, users before what they use, so targets commit their
        metadata; then remove them all."""
        with self.lock:
            for name in self._top_down():
                self.devices[name].suspend()
            for name in self._top_down():
                dev = self.devices.get(name)
                if dev is not None and dev.open_count == 0:
                    self._remove_locked(name)

    def _top_down(self) -> list[str]:
        """Device names, each before every device its tables use (a topological order)."""
        uses: dict[str, set[str]] = {}
        for name, dev in self.devices.items():
            uses[name] = {ref.dev.name for table in (dev.live, dev.inactive) if table
                          for target in table.targets for ref in target.held
                          if isinstance(ref.dev, MappedDevice)}
        order: list[str] = []
        users = {name: {u for u, used in uses.items() if name in used} for name in uses}
        ready = sorted(n for n in uses if not users[n])
        while ready:
            name = ready.pop(0)
            order.append(name)
            for used in sorted(uses[name]):
                users[used].discard(name)
                if not users[used] and used not in order and used not in ready:
                    ready.append(used)
        return order + sorted(set(uses) - set(order))

    # -- dmsetup's reports --------------------------------------------------------------------------
    def _selected(self, name: str | None) -> list[MappedDevice]:
        with self.lock:
            if name is not None:
                return [self.device(name)]
            return [self.devices[n] for n in sorted(self.devices)]

    def _report(self, name: str | None, kind: str) -> str:
        devs = self._selected(name)
        if not devs:
            return "No devices found\n"
        out = []
        for dev in devs:
            with self.lock:
                lines = dev.status_lines(kind)
            prefix = "" if name is not None else f"{dev.name}: "
            out.extend(prefix + line for line in lines)
        return "".join(line + "\n" for line in out)

    def status(self, name: str | None = None) -> str:
        return self._report(name, "status")

    def table(self, name: str | None = None) -> str:
        return self._report(name, "table")

    def info(self, name: str | None = None) -> str:
        devs = self._selected(name)
        if not devs:
            return "No devices found\n"
        blocks = []
        for dev in devs:
            state = "SUSPENDED" if dev.suspended else "ACTIVE"
            if dev.read_only:
                state += " (READ-ONLY)"
            tables = " & ".join(t for t, present in (("LIVE", dev.live), ("INACTIVE", dev.inactive))
                                if present) or "None"
            lines = [f"Name:              {dev.name}",
                     f"State:             {state}",
                     "Read Ahead:        256",
                     f"Tables present:    {tables}",
                     f"Open count:        {dev.open_count}",
                     f"Event number:      {dev.event_nr}",
                     f"Major, minor:      {dev.major}, {dev.minor}"]
            if dev.live is not None:
                lines.append(f"Number of targets: {len(dev.live.targets)}")
            if dev.uuid:
                lines.append(f"UUID: {dev.uuid}")
            blocks.append("\n".join(lines) + "\n")
        return "\n".join(blocks)

    def ls(self) -> str:
        devs = self._selected(None)
        if not devs:
            return "No devices found\n"
        return "".join(f"{d.name}\t({d.major}:{d.minor})\n" for d in devs)
