"""The devices of a userspace device-mapper engine as NBD exports: export name = device name.

`EngineExports(engine)` is an export source (see `blockera.nbd.exports`). It is consulted for
every NBD_OPT_LIST, INFO, GO and EXPORT_NAME, so a device created after the server started is
exported at once and a removed one is gone. Clients read and write the engine's
`MappedDevice` itself, through its live table: an era device records the writes, a
snapshot-origin copies out before them, and a suspended device holds requests until it is
resumed, as it does for any I/O in the engine.

A client in the transmission phase holds its device open (it counts in the device's open
count, which `dmsetup info` shows), as a process holding /dev/mapper/NAME open does with the
kernel's device-mapper: the device cannot be removed while a client uses it. A device without
a live table is listed, with size 0, but a client cannot connect to it.

See docs/nbd.md §5.
"""

from __future__ import annotations

from blockera.engine.userspace import Engine
from blockera.engine.mapped import MappedDevice
from blockera.nbd.errors import UnknownExportError
from blockera.nbd.exports import Export, Release


class EngineExports:
    """Export source over `engine`: call it for the current {device name: Export}."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def __call__(self) -> dict[str, Export]:
        with self._engine.lock:
            devices = list(self._engine.devices.items())
            return {name: Export(dev, description=_describe(dev),
                                 claim=lambda name=name, dev=dev: self._claim(name, dev))
                    for name, dev in devices}

    def _claim(self, name: str, dev: MappedDevice) -> Release:
        """Hold `dev` open for one connection; the returned function lets it go."""
        with self._engine.lock:
            if self._engine.devices.get(name) is not dev:
                raise UnknownExportError(f"device {name!r} was removed or renamed")
            if dev.live is None:
                raise UnknownExportError(f"device {name!r} has no live table: load a table "
                                         "and resume the device first")
            dev.open_count += 1
        released = False

        def release() -> None:
            nonlocal released
            with self._engine.lock:
                if not released:
                    released = True
                    dev.open_count -= 1

        return release


def _describe(dev: MappedDevice) -> str:
    table = dev.live
    if table is None:
        return f"engine device {dev.dev_t}, no live table"
    kinds = ", ".join(dict.fromkeys(line.target for line in table.lines))
    state = ", suspended" if dev.suspended else ""
    return f"engine device {dev.dev_t}, {kinds}{state}"
