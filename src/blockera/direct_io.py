"""Direct I/O (`O_DIRECT`) writes that bypass the page cache (docs/backup-repository.md §1.1
and §16.1): large files written once and not read back soon — a repository's pack files, a
restored image — need no page cache, and filling it costs more than the write itself where
memory is fresh (a virtual machine whose host takes back free pages) and evicts what the
machine had cached.

Direct I/O moves whole aligned blocks from and to aligned memory: `ALIGN_BYTES` covers every
Linux block device's logical block and the page size. Each thread keeps one page-aligned
buffer, reused and grown as needed, so no fresh memory is touched per write (or per direct read
of a block device, `blockera.blockdev`).
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import threading

ALIGN_BYTES = 4096

_local = threading.local()


def aligned_buffer(length_bytes: int) -> mmap.mmap:
    """This thread's page-aligned buffer, at least `length_bytes` long (its contents are
    whatever the last user left)."""
    buffer: mmap.mmap | None = getattr(_local, "buffer", None)
    if buffer is None or len(buffer) < length_bytes:
        if buffer is not None:
            try:
                buffer.close()
            except BufferError:
                pass        # still viewed from an error's frames: freed with them
        buffer = mmap.mmap(-1, max(1 << 20, -(-length_bytes // (1 << 20)) * (1 << 20)))
        _local.buffer = buffer
    return buffer


def write_new_file(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write `data` as the whole content of the empty file open for writing at `fd`, with
    `O_DIRECT` where the file system allows it and through the page cache where it does not.
    The last block is padded for the direct write and the file truncated back to the length
    of `data`. Does not sync: the caller does."""
    length = len(data)
    padded = -(-length // ALIGN_BYTES) * ALIGN_BYTES
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
    except OSError:
        _write_all(fd, memoryview(data), 0)
        return
    buffer = aligned_buffer(padded)
    buffer[:length] = data
    buffer[length:padded] = bytes(padded - length)
    try:
        _write_all(fd, memoryview(buffer)[:padded], 0)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)       # refused at the first write: buffered
        _write_all(fd, memoryview(data), 0)
        return
    finally:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)
    if padded != length:
        os.ftruncate(fd, length)


def _write_all(fd: int, view: memoryview, offset_bytes: int) -> None:
    while view:
        written = os.pwrite(fd, view, offset_bytes)
        view, offset_bytes = view[written:], offset_bytes + written
