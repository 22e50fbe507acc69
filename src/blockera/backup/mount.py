"""`blockera mount`: a snapshot's image as a block device, without restoring it
(docs/backup-repository.md §21).

`SnapshotDevice` is a read-only `BlockDevice` over a snapshot's file node: a read finds the
blobs covering it, loads each on first use (verified, as every blob load is) and keeps recently
used blobs in a bounded LRU cache; concurrent readers of one blob wait for a single load, and
all-zero chunks are served without loading anything. `OverlayDevice` puts a copy-on-write
overlay in front of it: writes land in memory or in a sparse temporary file (never in the
repository), in 4 KiB blocks, and reads merge the overlay with the snapshot. The command
exports either over NBD with the project's NBD server.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections import OrderedDict

import numpy as np

from blockera.backup.blob_fetch import FETCH_ERRORS, load_checked
from blockera.backup.device_layout import ContentLayout
from blockera.backup.ids import short
from blockera.backup.repository import Repository
from blockera.backup.restore import zero_ids
from blockera.blockdev import BlockDevice
from blockera.errors import DeviceError, UsageError

DEFAULT_CACHE_BYTES = 64 << 20
OVERLAY_BLOCK_BYTES = 4096


class SnapshotDevice(BlockDevice):
    """A snapshot's image, read-only, blobs fetched on demand through an LRU cache."""

    writable = False
    supports_discard = False

    def __init__(self, repo: Repository, layout: ContentLayout, *, name: str = "snapshot",
                 cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.repo = repo
        self.layout = layout
        self.name = name
        self.cache_bytes = cache_bytes
        self._zeros = zero_ids(layout)
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cached_bytes = 0
        self._loading: dict[int, threading.Event] = {}
        self._mutex = threading.Lock()
        self.loads = 0

    @property
    def size_bytes(self) -> int:
        return self.layout.size_bytes

    def _blob(self, i: int) -> bytes:
        begin, end = self.layout.range_of(i)
        blob_id = self.layout.ids[i]
        if self._zeros.get(blob_id) == end - begin:
            return bytes(end - begin)
        while True:
            with self._mutex:
                data = self._cache.get(i)
                if data is not None:
                    self._cache.move_to_end(i)
                    return data
                waiting = self._loading.get(i)
                if waiting is None:
                    event = self._loading[i] = threading.Event()
                    break
            waiting.wait()
        try:
            try:
                data = load_checked(self.repo, blob_id, end - begin)
            except FETCH_ERRORS as exc:
                raise DeviceError(f"{self.name}: bytes [{begin}, {end}) cannot be read: blob "
                                  f"{short(blob_id)}: {exc}") from None
            with self._mutex:
                self.loads += 1
                if len(data) <= self.cache_bytes:
                    self._cache[i] = data
                    self._cached_bytes += len(data)
                    while self._cached_bytes > self.cache_bytes:
                        _, old = self._cache.popitem(last=False)
                        self._cached_bytes -= len(old)
            return data
        finally:
            with self._mutex:
                del self._loading[i]
            event.set()

    def read(self, offset_bytes: int, length_bytes: int) -> bytes:
        self.check_range(offset_bytes, length_bytes)
        out = bytearray()
        position = offset_bytes
        end = offset_bytes + length_bytes
        while position < end:
            i = self.layout.blob_at(position)
            begin, blob_end = self.layout.range_of(i)
            data = self._blob(i)
            stop = min(end, blob_end)
            out += data[position - begin:stop - begin]
            position = stop
        return bytes(out)

    def write(self, offset_bytes: int, data: bytes | bytearray | memoryview) -> None:
        raise DeviceError(f"{self.name}: a snapshot is read-only (mount with --writable for a "
                          "copy-on-write overlay)", errno_name="EROFS")

    def flush(self) -> None:
        pass


class _MemoryBlocks:
    def __init__(self) -> None:
        self.blocks: dict[int, bytes] = {}

    def get(self, block: int) -> bytes:
        return self.blocks[block]

    def put(self, block: int, data: bytes) -> None:
        self.blocks[block] = data

    def close(self) -> None:
        self.blocks.clear()


class _FileBlocks:
    """A sparse, unlinked temporary file in `directory`."""

    def __init__(self, directory: str, size_bytes: int) -> None:
        try:
            self.file = tempfile.TemporaryFile(dir=directory, prefix="blockera-overlay-")
            os.ftruncate(self.file.fileno(), size_bytes)
        except OSError as exc:
            raise UsageError(f"--overlay {directory}: cannot create the overlay file there: "
                             f"{exc.strerror}") from None

    def get(self, block: int) -> bytes:
        return os.pread(self.file.fileno(), OVERLAY_BLOCK_BYTES, block * OVERLAY_BLOCK_BYTES)

    def put(self, block: int, data: bytes) -> None:
        os.pwrite(self.file.fileno(), data, block * OVERLAY_BLOCK_BYTES)

    def close(self) -> None:
        self.file.close()


class OverlayDevice(BlockDevice):
    """`base` with writes kept in an overlay (memory, or a sparse temporary file in
    `directory`), in 4 KiB blocks."""

    writable = True
    supports_discard = True

    def __init__(self, base: BlockDevice, directory: str | None = None) -> None:
        self.base = base
        self.name = f"{base.name} (overlay)"
        nr_blocks = -(-base.size_bytes // OVERLAY_BLOCK_BYTES)
        self.written = np.zeros(nr_blocks, dtype=bool)
        self.store: _MemoryBlocks | _FileBlocks = (
            _MemoryBlocks() if directory is None else
            _FileBlocks(directory, nr_blocks * OVERLAY_BLOCK_BYTES))
        self._mutex = threading.Lock()

    @property
    def size_bytes(self) -> int:
        return self.base.size_bytes

    def _base_block(self, block: int) -> bytes:
        begin = block * OVERLAY_BLOCK_BYTES
        end = min(begin + OVERLAY_BLOCK_BYTES, self.size_bytes)
        return self.base.read(begin, end - begin).ljust(OVERLAY_BLOCK_BYTES, b"\0")

    def read(self, offset_bytes: int, length_bytes: int) -> bytes:
        self.check_range(offset_bytes, length_bytes)
        if not length_bytes:
            return b""
        first = offset_bytes // OVERLAY_BLOCK_BYTES
        last = (offset_bytes + length_bytes - 1) // OVERLAY_BLOCK_BYTES
        mask = self.written[first:last + 1]
        if not mask.any():
            return self.base.read(offset_bytes, length_bytes)
        out = bytearray()
        block = first
        while block <= last:
            run_end = block
            state = bool(self.written[block])
            while run_end + 1 <= last and bool(self.written[run_end + 1]) == state:
                run_end += 1
            begin = max(offset_bytes, block * OVERLAY_BLOCK_BYTES)
            end = min(offset_bytes + length_bytes, (run_end + 1) * OVERLAY_BLOCK_BYTES)
            if state:
                with self._mutex:
                    for b in range(block, run_end + 1):
                        data = self.store.get(b)
                        lo = max(begin, b * OVERLAY_BLOCK_BYTES) - b * OVERLAY_BLOCK_BYTES
                        hi = min(end, (b + 1) * OVERLAY_BLOCK_BYTES) - b * OVERLAY_BLOCK_BYTES
                        out += data[lo:hi]
            else:
                out += self.base.read(begin, end - begin)
            block = run_end + 1
        return bytes(out)

    def write(self, offset_bytes: int, data: bytes | bytearray | memoryview) -> None:
        self.check_range(offset_bytes, len(data))
        view = memoryview(data)
        position = offset_bytes
        end = offset_bytes + len(view)
        with self._mutex:
            while position < end:
                block = position // OVERLAY_BLOCK_BYTES
                block_start = block * OVERLAY_BLOCK_BYTES
                lo = position - block_start
                hi = min(end - block_start, OVERLAY_BLOCK_BYTES)
                if lo == 0 and hi == OVERLAY_BLOCK_BYTES:
                    content = bytes(view[position - offset_bytes:position - offset_bytes + hi])
                else:
                    current = bytearray(self.store.get(block) if self.written[block]
                                        else self._base_block(block))
                    current[lo:hi] = view[position - offset_bytes:
                                          position - offset_bytes + hi - lo]
                    content = bytes(current)
                self.store.put(block, content)
                self.written[block] = True
                position = block_start + hi

    def write_zeroes(self, offset_bytes: int, length_bytes: int) -> None:
        step = 1 << 20
        zero = bytes(min(step, length_bytes))
        done = 0
        while done < length_bytes:
            n = min(step, length_bytes - done)
            self.write(offset_bytes + done, zero[:n])
            done += n

    def discard(self, offset_bytes: int, length_bytes: int) -> None:
        self.write_zeroes(offset_bytes, length_bytes)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.store.close()
        self.base.close()


def parse_tcp(text: str) -> tuple[str | None, int]:
    """`PORT`, `HOST:PORT` or `[IPV6]:PORT` (host None: the server's loopback default)."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = "", text
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise UsageError(f"--tcp {text!r}: use PORT or HOST:PORT") from None
    if not 0 <= port <= 65535:
        raise UsageError(f"--tcp {text!r}: the port must be 0 to 65535")
    return host or None, port
