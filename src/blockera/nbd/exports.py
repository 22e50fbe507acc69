"""Which devices the server exports, looked up by name when a client asks.

The server is given an *export source*: either a mapping from export name to device, or a
callable returning such a mapping. A callable is called afresh for every NBD_OPT_LIST,
NBD_OPT_INFO, NBD_OPT_GO and NBD_OPT_EXPORT_NAME, so devices may appear and disappear while
the server runs (the device-mapper engine passes a function that lists its live devices). A
connection keeps the device it negotiated; if that device is later removed, its calls fail and
the client sees NBD_EIO.

A mapping's values are `BlockDevice` objects, or `Export` records that add a read-only flag, a
description and a `claim` hook. `claim()` is called when a client is about to enter the
transmission phase with the export (NBD_OPT_GO, NBD_OPT_EXPORT_NAME) and returns the function to
call when that connection ends; raising refuses the export (with NBD_OPT_GO the client gets
NBD_REP_ERR_UNKNOWN and the message). The device-mapper engine uses it to hold a device open
while a client uses it, so the device cannot be removed under the client, as in the kernel.

An export is read-only (NBD_FLAG_READ_ONLY; writes, trims and zeroing fail with NBD_EPERM) when
any of these holds: the server was started read-only, its `Export` says so, the device has a
true `read_only` attribute (device-mapper devices), or the device has a false `writable`
attribute (a `FileDevice` opened read-only).

Optional device attributes the server also honours:

* `supports_discard` (bool): when false, NBD_FLAG_SEND_TRIM is not advertised. A discard that
  fails as unsupported (errno EOPNOTSUPP) is answered with success anyway: TRIM is a hint.
* `fast_zero` (bool): when true, WRITE_ZEROES with NBD_CMD_FLAG_FAST_ZERO is carried out;
  otherwise such a request fails at once with NBD_ENOTSUP, as the protocol asks of a server
  that cannot zero faster than it writes.

See docs/nbd.md §2, §5.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Union

from blockera.blockdev import BlockDevice
from blockera.nbd.errors import UnknownExportError


Release = Callable[[], None]
Claim = Callable[[], Release]


def _no_release() -> None:
    pass


def _no_claim() -> Release:
    return _no_release


@dataclass(frozen=True)
class Export:
    """A device with export options (see the module docstring for `claim`)."""

    device: BlockDevice
    read_only: bool = False
    description: str = ""
    claim: Claim = _no_claim


ExportMap = Mapping[str, Union[BlockDevice, Export]]
ExportSource = Union[ExportMap, Callable[[], ExportMap]]


@dataclass(frozen=True)
class ResolvedExport:
    """An export as one connection negotiated it."""

    name: str
    device: BlockDevice
    read_only: bool
    description: str
    claim: Claim = _no_claim

    @property
    def supports_discard(self) -> bool:
        return bool(getattr(self.device, "supports_discard", True))

    @property
    def fast_zero(self) -> bool:
        return bool(getattr(self.device, "fast_zero", False))


def device_is_read_only(device: BlockDevice) -> bool:
    """True if the device itself refuses writes."""
    return bool(getattr(device, "read_only", False)) or \
        getattr(device, "writable", True) is False


class ExportResolver:
    """Resolves export names against an export source.

    `default_export` is the export a client gets when it asks for the empty name (qemu and
    libnbd do when a URI names no export); when it is None the empty name resolves only if the
    source has an export called "". `read_only` makes every export read-only."""

    def __init__(self, source: ExportSource, *, read_only: bool = False,
                 default_export: str | None = None) -> None:
        if not callable(source) and not isinstance(source, Mapping):
            raise TypeError("exports must be a mapping of name to BlockDevice/Export or a "
                            f"callable returning one, not {type(source).__name__}")
        self._source = source
        self.read_only = read_only
        self.default_export = default_export

    def current(self) -> ExportMap:
        exports = self._source() if callable(self._source) else self._source
        if not isinstance(exports, Mapping):
            raise TypeError("the export source returned "
                            f"{type(exports).__name__}, not a mapping of name to device")
        return exports

    def listing(self) -> list[tuple[str, str]]:
        """(name, description) of every export, for NBD_OPT_LIST."""
        out = []
        for name, entry in self.current().items():
            description = entry.description if isinstance(entry, Export) else ""
            out.append((name, description))
        return out

    def resolve(self, name: str) -> ResolvedExport:
        exports = self.current()
        canonical = name
        if name == "" and "" not in exports and self.default_export is not None:
            canonical = self.default_export
        entry = exports.get(canonical)
        if entry is None:
            if name == "":
                raise UnknownExportError("no default export: ask for an export by name "
                                         f"(available: {_names(exports)})")
            raise UnknownExportError(f"no export named {name!r} (available: {_names(exports)})")
        claim: Claim = _no_claim
        if isinstance(entry, Export):
            device, read_only, description = entry.device, entry.read_only, entry.description
            claim = entry.claim
        else:
            device, read_only, description = entry, False, ""
        if not isinstance(device, BlockDevice):
            raise TypeError(f"export {canonical!r} is a {type(device).__name__}, "
                            "not a BlockDevice")
        read_only = read_only or self.read_only or device_is_read_only(device)
        return ResolvedExport(canonical, device, read_only, description, claim)


def _names(exports: ExportMap) -> str:
    names = sorted(exports)
    if not names:
        return "none"
    shown = ", ".join(repr(n) for n in names[:20])
    return shown + (f" and {len(names) - 20} more" if len(names) > 20 else "")
