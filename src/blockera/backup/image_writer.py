"""Writing a restored image onto a file or block device (docs/backup-repository.md §16.1).

A restore writes ranges mostly in ascending order. `ImageWriter` gathers consecutive ranges
into a batch of up to `BATCH_BYTES` in a reused, page-aligned buffer and hands full batches to
one writer thread, which writes them with `O_DIRECT` while the next batch is gathered (two
buffers: one filling, one writing). The target's page cache is bypassed: a restore of a large
image neither evicts what the machine has cached nor leaves gigabytes of dirty pages for the
final flush, and no page cache has to be allocated for data nobody reads back.

Direct I/O moves only whole aligned blocks (`ALIGN_BYTES`). The parts of a run that do not
cover a whole aligned block (a run that starts or ends mid-block, as content-defined chunks
of a restic-made file can, or an image whose size is not a multiple of the block) are written
through the page cache; direct and buffered writes never touch the same block. Where the file
system refuses `O_DIRECT` (at open or at the first write) everything goes through the page
cache, which is asked to start writing back every `WRITEBACK_STEP_BYTES`
(`sync_file_range(SYNC_FILE_RANGE_WRITE)`, which does not wait). `finish()` waits for the
writes and flushes the target: the image is durable when it returns.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
from collections.abc import Callable

from blockera.blockdev import BlockDevice, FileDevice, write_error
from blockera.direct_io import ALIGN_BYTES
from blockera.errors import DeviceError

BATCH_BYTES = 8 << 20
WRITEBACK_STEP_BYTES = 32 << 20

_SYNC_FILE_RANGE_WRITE = 0x02
_libc = ctypes.CDLL(None, use_errno=True)     # the C library the interpreter runs on
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                                  ctypes.c_uint]


class _DirectWriter:
    """One thread writing aligned batches with O_DIRECT; `submit` waits while the previous
    batch is still being written, so one buffer can be filled while the other is written."""

    def __init__(self, fd: int, name: str, fallback: Callable[[int, memoryview], None]) -> None:
        self.fd = fd
        self.name = name
        self.fallback = fallback
        self.direct_works = True
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def submit(self, offset_bytes: int, data: memoryview) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._write, args=(offset_bytes, data),
                                        name="restore-write", daemon=True)
        self._thread.start()

    def _write(self, offset_bytes: int, data: memoryview) -> None:
        done = 0
        try:
            while done < len(data):
                if not self.direct_works:
                    self.fallback(offset_bytes + done, data[done:])
                    return
                try:
                    wrote = os.pwritev(self.fd, [data[done:]], offset_bytes + done)
                except OSError as exc:
                    if exc.errno == errno.EINVAL and done == 0:
                        self.direct_works = False   # the file system refuses O_DIRECT here
                        continue
                    raise write_error(self.name, offset_bytes + done, exc) from None
                if wrote <= 0 or wrote % ALIGN_BYTES:
                    raise DeviceError(f"{self.name}: short direct write at byte "
                                      f"{offset_bytes + done}")
                done += wrote
        except BaseException as exc:  # handed to the caller at its next call
            exc.__context__ = None      # (the frames it refers to would pin the buffer)
            self.error = exc.with_traceback(None)

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error


class ImageWriter:
    """Ranges written onto `device` (see the module docstring); `finish()` makes them
    durable, `close()` releases the buffers and descriptors (after `finish()` or an error)."""

    def __init__(self, device: BlockDevice, *, batch_bytes: int = BATCH_BYTES) -> None:
        self.device = device
        self.batch_bytes = batch_bytes
        self._direct: _DirectWriter | None = None
        self._direct_fd: int | None = None
        if isinstance(device, FileDevice) and device.writable and not device.direct:
            try:
                self._direct_fd = os.open(device.path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
            except OSError:
                self._direct_fd = None          # no O_DIRECT here: the page cache it is
        if self._direct_fd is not None:
            self._direct = _DirectWriter(self._direct_fd, device.name, self._buffered)
            self._buffers = [mmap.mmap(-1, batch_bytes), mmap.mmap(-1, batch_bytes)]
        self._filling = 0
        self._start: int | None = None     # image offset of the batch's first byte
        self._length = 0                   # bytes gathered in the batch
        self._writeback_fd = device.fileno() if isinstance(device, FileDevice) else None
        self._writeback_from = 0

    def write(self, offset_bytes: int, data: bytes | bytearray | memoryview) -> None:
        if self._direct is None or not self._direct.direct_works:
            self._flush_batch()
            self._buffered(offset_bytes, memoryview(data))
            return
        if self._start is None or offset_bytes != self._start + self._length:
            self._flush_batch()
            head = -offset_bytes % ALIGN_BYTES      # up to the next aligned block: buffered
            if head:
                self._buffered(offset_bytes, memoryview(data)[:head])
                data, offset_bytes = memoryview(data)[head:], offset_bytes + head
                if not len(data):
                    return
            self._start = offset_bytes
        view = memoryview(data)
        while len(view):
            room = self.batch_bytes - self._length
            take = min(room, len(view))
            self._buffers[self._filling][self._length:self._length + take] = view[:take]
            self._length += take
            view = view[take:]
            if self._length == self.batch_bytes:
                self._submit(self._length)

    def _submit(self, aligned_bytes: int) -> None:
        """Hand the batch's first `aligned_bytes` to the writer; the rest starts the next."""
        assert self._direct is not None and self._start is not None
        buffer = self._buffers[self._filling]
        self._direct.submit(self._start, memoryview(buffer)[:aligned_bytes])
        self._filling ^= 1
        rest = self._length - aligned_bytes
        if rest:
            self._buffers[self._filling][:rest] = buffer[aligned_bytes:self._length]
        self._start += aligned_bytes
        self._length = rest

    def _flush_batch(self) -> None:
        """Write what the batch holds: the aligned part directly, a partial last block
        through the page cache; the next write starts a new batch."""
        if self._start is None:
            return
        aligned = self._length - self._length % ALIGN_BYTES
        if aligned:
            self._submit(aligned)
        if self._length:
            self._buffered(self._start,
                           memoryview(self._buffers[self._filling])[:self._length])
        self._start, self._length = None, 0

    def _buffered(self, offset_bytes: int, data: memoryview) -> None:
        self.device.write(offset_bytes, data)
        end = offset_bytes + len(data)
        if self._writeback_fd is not None and end - self._writeback_from >= WRITEBACK_STEP_BYTES:
            if _libc.sync_file_range(self._writeback_fd, self._writeback_from,
                                     end - self._writeback_from, _SYNC_FILE_RANGE_WRITE) != 0:
                self._writeback_fd = None   # not supported here: the final flush does it all
            self._writeback_from = end

    def finish(self) -> None:
        """Write everything gathered, wait for it, and flush the target."""
        self._flush_batch()
        if self._direct is not None:
            self._direct.wait()
        self.device.flush()

    def close(self) -> None:
        """After an error: what was gathered is still written (not flushed)."""
        if self._direct is not None:
            try:
                self._flush_batch()
                self._direct.wait()
            except (DeviceError, OSError):
                pass                # the caller is already reporting the error it met
            self._direct = None
            for buffer in self._buffers:
                try:
                    buffer.close()
                except BufferError:
                    pass            # still viewed from an error's frames: freed with them
        if self._direct_fd is not None:
            os.close(self._direct_fd)
            self._direct_fd = None
