"""A block device that records every write, discard and flush in order, so crash tests can
rebuild a device as it would be after a power cut at any point (`replay`)."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from blockera.blockdev import BlockDevice


@dataclass(frozen=True)
class LogRecord:
    """One operation seen by a `WriteLogDevice`: kind is "write", "discard" or "flush"."""

    kind: str
    offset_bytes: int = 0
    data: bytes = b""
    length_bytes: int = 0


class WriteLogDevice(BlockDevice):
    """Passes every call to `inner` and appends writes, discards and flushes to `log`, in the
    order they completed. Several devices may share one log list (with `tag`) so that the
    relative order of metadata and data writes is preserved."""

    def __init__(self, inner: BlockDevice, log: list[tuple[str, LogRecord]] | None = None,
                 tag: str = "") -> None:
        self.inner = inner
        self.name = inner.name
        self.log: list[tuple[str, LogRecord]] = log if log is not None else []
        self.tag = tag
        self._lock = threading.Lock()

    @property
    def size_bytes(self) -> int:
        return self.inner.size_bytes

    def read(self, offset_bytes: int, length_bytes: int) -> bytes:
        return self.inner.read(offset_bytes, length_bytes)

    def write(self, offset_bytes: int, data: bytes | bytearray | memoryview) -> None:
        with self._lock:
            self.inner.write(offset_bytes, data)
            self.log.append((self.tag, LogRecord("write", offset_bytes, bytes(data))))

    def discard(self, offset_bytes: int, length_bytes: int) -> None:
        with self._lock:
            self.inner.discard(offset_bytes, length_bytes)
            self.log.append((self.tag, LogRecord("discard", offset_bytes,
                                                 length_bytes=length_bytes)))

    def write_zeroes(self, offset_bytes: int, length_bytes: int) -> None:
        with self._lock:
            self.inner.write_zeroes(offset_bytes, length_bytes)
            self.log.append((self.tag, LogRecord("write", offset_bytes, bytes(length_bytes))))

    def flush(self) -> None:
        with self._lock:
            self.inner.flush()
            self.log.append((self.tag, LogRecord("flush")))

    def close(self) -> None:
        self.inner.close()


def replay(base: bytes | bytearray, records: list[LogRecord], *,
           torn_sectors: int | None = None) -> bytearray:
    """Rebuild a device image: `base` plus `records` applied in order. With `torn_sectors`,
    only the first that many 512-byte sectors of the last record (a write) reach the device,
    as when power fails in the middle of a multi-sector write."""
    image = bytearray(base)
    for i, rec in enumerate(records):
        if rec.kind == "write":
            data = rec.data
            if torn_sectors is not None and i == len(records) - 1:
                data = data[: torn_sectors * 512]
            image[rec.offset_bytes: rec.offset_bytes + len(data)] = data
        elif rec.kind == "discard":
            image[rec.offset_bytes: rec.offset_bytes + rec.length_bytes] = bytes(rec.length_bytes)
    return image
