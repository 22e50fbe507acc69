"""Block devices: the one interface every layer reads and writes through.

`BlockDevice` is byte-addressed (offsets and lengths in bytes) over an image file, a real block
device or memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import stat
import struct
import threading
from abc import ABC, abstractmethod
from pathlib import Path

from blockera.direct_io import ALIGN_BYTES, aligned_buffer
from blockera.errors import DeviceError, NoSpaceError

_BLKGETSIZE64 = 0x80081272
_BLKDISCARD = 0x1277
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


class BlockDevice(ABC):
    """A fixed-size, byte-addressed device. Implementations are safe to call from several
    threads at once (each call is one positional I/O)."""

    name: str = "device"

    @property
    @abstractmethod
    def size_bytes(self) -> int:
        """Current size in bytes."""

    @abstractmethod
    def read(self, offset_bytes: int, length_bytes: int) -> bytes:
        """Read exactly `length_bytes` at `offset_bytes`."""

    @abstractmethod
    def write(self, offset_bytes: int, data: bytes | bytearray | memoryview) -> None:
        """Write all of `data` at `offset_bytes`."""

    @abstractmethod
    def flush(self) -> None:
        """Make every completed write durable."""

    def discard(self, offset_bytes: int, length_bytes: int) -> None:
        """Forget a range; later reads of it return zeros."""
        self.write_zeroes(offset_bytes, length_bytes)

    def write_zeroes(self, offset_bytes: int, length_bytes: int) -> None:
        chunk = 1 << 20
        zero = bytes(min(chunk, length_bytes))
        end = offset_bytes + length_bytes
        while offset_bytes < end:
            n = min(chunk, end - offset_bytes)
            self.write(offset_bytes, zero[:n])
            offset_bytes += n

    def close(self) -> None:
        """Release the device; further calls are errors."""

    def check_range(self, offset_bytes: int, length_bytes: int) -> None:
        if offset_bytes < 0 or length_bytes < 0 or offset_bytes + length_bytes > self.size_bytes:
            raise DeviceError(
                f"{self.name}: I/O at bytes [{offset_bytes}, {offset_bytes + length_bytes}) "
                f"is beyond the end of the device ({self.size_bytes} bytes)")

    def __enter__(self) -> "BlockDevice":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _errno_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, "EIO")


def write_error(name: str, offset_bytes: int, exc: OSError) -> DeviceError:
    """The error for a failed write of device `name` at `offset_bytes`: `NoSpaceError` when
    the device or file system is full."""
    if exc.errno == errno.ENOSPC:
        return NoSpaceError(f"{name}: no space left for a write at byte {offset_bytes}")
    return DeviceError(f"{name}: write failed at byte {offset_bytes}: {exc.strerror}",
                       errno_name=_errno_name(exc))


def _device_size(fd: int, mode: int) -> int:
    if stat.S_ISBLK(mode):
        buf = fcntl.ioctl(fd, _BLKGETSIZE64, b"\0" * 8)
        return struct.unpack("<Q", buf)[0]
    return os.fstat(fd).st_size


class FileDevice(BlockDevice):
    """An image file or a block device node.

    `direct=True` uses O_DIRECT for block devices, bypassing a page cache that another writer
    (the kernel's device-mapper) may have made stale."""

    def __init__(self, path: str | os.PathLike[str], *, writable: bool = True,
                 direct: bool = False, exclusive: bool = False) -> None:
        self.path = Path(path)
        self.name = str(path)
        flags = os.O_RDWR if writable else os.O_RDONLY
        flags |= os.O_CLOEXEC
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise DeviceError(f"{self.path}: no such file or device") from None
        except OSError as exc:
            raise DeviceError(f"{self.path}: {exc.strerror}") from None
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise DeviceError(f"{self.path}: not a block device or regular file")
        self.is_block_device = stat.S_ISBLK(st.st_mode)
        self.direct = bool(direct and self.is_block_device)
        if self.direct:
            flags |= os.O_DIRECT
        if exclusive and self.is_block_device:
            flags |= os.O_EXCL
        try:
            self._fd = os.open(self.path, flags)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise DeviceError(f"{self.path}: device is busy (in use by another program); "
                                  "tools cannot run on live metadata without a snapshot") from None
            raise DeviceError(f"{self.path}: cannot open: {exc.strerror}") from None
        self.writable = writable
        self._size = _device_size(self._fd, st.st_mode)
        self._closed = False

    @property
    def size_bytes(self) -> int:
        if not self.is_block_device:
            self._size = os.fstat(self._fd).st_size
        return self._size

    def fileno(self) -> int:
        return self._fd

    def check_range(self, offset_bytes: int, length_bytes: int) -> None:
        # Within the size last seen no fstat is needed (each one is a system call on every
        # write); past it the size is read again, so a file that grew is followed.
        if 0 <= offset_bytes and 0 <= length_bytes and offset_bytes + length_bytes <= self._size:
            return
        super().check_range(offset_bytes, length_bytes)

    def read(self, offset_bytes: int, length_bytes: int) -> bytes:
        self.check_range(offset_bytes, length_bytes)
        try:
            if self.direct:
                return self._direct_read(offset_bytes, length_bytes)
            data = os.pread(self._fd, length_bytes, offset_bytes)
            while len(data) < length_bytes:  # short reads only happen at EOF races or signals
                more = os.pread(self._fd, length_bytes - len(data), offset_bytes + len(data))
                if not more:
                    raise DeviceError(f"{self.name}: short read at byte "
                                      f"{offset_bytes + len(data)}")
                data += more
            return data
        except OSError as exc:
            raise DeviceError(f"{self.name}: read failed at byte {offset_bytes}: "
                              f"{exc.strerror}", errno_name=_errno_name(exc)) from None

    def _direct_read(self, offset_bytes: int, length_bytes: int) -> bytes:
        start = offset_bytes - offset_bytes % ALIGN_BYTES
        end = -(-(offset_bytes + length_bytes) // ALIGN_BYTES) * ALIGN_BYTES
        end = min(end, max(self._size, start))
        length = max(end - start, ALIGN_BYTES)
        view = memoryview(aligned_buffer(length))[:length]
        try:
            got = os.preadv(self._fd, [view], start)
            if got < offset_bytes + length_bytes - start:
                raise DeviceError(f"{self.name}: short read at byte {start + got}")
            return bytes(view[offset_bytes - start: offset_bytes - start + length_bytes])
        finally:
            view.release()

    def write(self, offset_bytes: int, data: bytes | bytearray | memoryview) -> None:
        if not self.writable:
            raise DeviceError(f"{self.name}: opened read-only")
        length = len(data)
        self.check_range(offset_bytes, length)
        if self.direct:
            self._direct_write(offset_bytes, data)
            return
        view = memoryview(data)
        done = 0
        try:
            while done < length:
                done += os.pwrite(self._fd, view[done:], offset_bytes + done)
        except OSError as exc:
            raise write_error(self.name, offset_bytes + done, exc) from None

    def _direct_write(self, offset_bytes: int, data: bytes | bytearray | memoryview) -> None:
        start = offset_bytes - offset_bytes % ALIGN_BYTES
        end = -(-(offset_bytes + len(data)) // ALIGN_BYTES) * ALIGN_BYTES
        around = None       # the partial blocks' other bytes, read before the buffer is taken
        if start != offset_bytes or end != offset_bytes + len(data):
            around = self._direct_read(start, min(end, self._size) - start).ljust(end - start,
                                                                                   b"\0")
        view = memoryview(aligned_buffer(end - start))[:end - start]
        try:
            if around is not None:
                view[:] = around
            view[offset_bytes - start: offset_bytes - start + len(data)] = data
            os.pwritev(self._fd, [view], start)
        except OSError as exc:
            raise write_error(self.name, offset_bytes, exc) from None
        finally:
            view.release()

    def flush(self) -> None:
        if self.writable:
            try:
                os.fdatasync(self._fd)
            except OSError as exc:
                raise DeviceError(f"{self.name}: flush failed: {exc.strerror}") from None

    def discard(self, offset_bytes: int, length_bytes: int) -> None:
        self.check_range(offset_bytes, length_bytes)
        try:
            if self.is_block_device:
                fcntl.ioctl(self._fd, _BLKDISCARD, struct.pack("<QQ", offset_bytes, length_bytes))
            else:
                _punch_hole(self._fd, offset_bytes, length_bytes)
            return
        except OSError:
            pass  # no discard / hole punching here: fall back to writing zeros
        self.write_zeroes(offset_bytes, length_bytes)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._fd)


_LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _punch_hole(fd: int, offset_bytes: int, length_bytes: int) -> None:
    mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    if _LIBC.fallocate(fd, mode, ctypes.c_long(offset_bytes), ctypes.c_long(length_bytes)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class MemoryDevice(BlockDevice):
    """A device held in memory (tests, crash replays, transient stores)."""

    def __init__(self, size_bytes: int = 0, *, data: bytes | bytearray | None = None,
                 name: str = "memory") -> None:
        self.name = name
        self.data = bytearray(data) if data is not None else bytearray(size_bytes)
        self._lock = threading.Lock()

    @property
    def size_bytes(self) -> int:
        return len(self.data)

    def read(self, offset_bytes: int, length_bytes: int) -> bytes:
        self.check_range(offset_bytes, length_bytes)
        with self._lock:
            return bytes(self.data[offset_bytes: offset_bytes + length_bytes])

    def write(self, offset_bytes: int, data: bytes | bytearray | memoryview) -> None:
        self.check_range(offset_bytes, len(data))
        with self._lock:
            self.data[offset_bytes: offset_bytes + len(data)] = data

    def flush(self) -> None:
        pass

    def resize(self, size_bytes: int) -> None:
        with self._lock:
            if size_bytes < len(self.data):
                del self.data[size_bytes:]
            else:
                self.data.extend(bytes(size_bytes - len(self.data)))
