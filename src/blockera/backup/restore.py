"""Restore and dump: a snapshot's image back onto a file or device, or to a stream
(docs/backup-repository.md §16).

Blobs are loaded in parallel (`blob_fetch`) and written in image order. What is skipped:

* all-zero chunks, recognised by their blob ID without loading them: written as zeros, or
  with `sparse` left unwritten where the target is fresh (a new file, or the part a file was
  extended by) and punched out (`fallocate(PUNCH_HOLE)`, which reads back as zeros on files
  and block devices) elsewhere;
* with `delta_from` (the layout of a snapshot the target is known to hold): chunks whose blob
  ID at the same byte range is the same.

A blob that cannot be loaded (damaged, missing) stops the restore with an error naming the
byte range, unless `ignore_errors`: then zeros are written there and the ranges are returned
(the command lists them and exits 1). An image is never silently wrong.
"""

from __future__ import annotations

import ctypes
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from blockera.backup.blob_fetch import DEFAULT_THREADS, BlobFetcher
from blockera.backup.device_layout import ContentLayout
from blockera.backup.ids import hash_id, short
from blockera.backup.image_writer import ImageWriter
from blockera.backup.job_errors import BackupInputError, DamagedBackupError
from blockera.backup.repository import Repository
from blockera.blockdev import BlockDevice, FileDevice
from blockera.errors import DeviceError

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(None, use_errno=True)     # the C library the interpreter runs on
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


@dataclass
class DamagedRange:
    begin_bytes: int
    end_bytes: int
    reason: str

    def as_json(self) -> dict[str, object]:
        return {"begin": self.begin_bytes, "end": self.end_bytes, "reason": self.reason}


@dataclass
class RestoreResult:
    size_bytes: int
    chunks_total: int
    chunks_written: int = 0
    chunks_zero: int = 0
    chunks_unchanged: int = 0
    bytes_written: int = 0
    damaged: list[DamagedRange] = field(default_factory=list)

    def as_json(self) -> dict[str, object]:
        return {"size_bytes": self.size_bytes, "chunks_total": self.chunks_total,
                "chunks_written": self.chunks_written, "chunks_zero": self.chunks_zero,
                "chunks_unchanged": self.chunks_unchanged, "bytes_written": self.bytes_written,
                "damaged": [d.as_json() for d in self.damaged]}


def _merge(ranges: list[DamagedRange]) -> list[DamagedRange]:
    out: list[DamagedRange] = []
    for r in ranges:
        if out and out[-1].end_bytes == r.begin_bytes and out[-1].reason == r.reason:
            out[-1].end_bytes = r.end_bytes
        else:
            out.append(r)
    return out


def zero_ids(layout: ContentLayout) -> dict[bytes, int]:
    """Blob IDs of all-zero chunks a layout may hold (by their length): for a uniform layout,
    the chunk size and the last chunk's size."""
    if layout.uniform_chunk_bytes is None or not len(layout):
        return {}
    lengths = {layout.uniform_chunk_bytes, layout.size_bytes - (len(layout) - 1)
               * layout.uniform_chunk_bytes}
    return {hash_id(bytes(n)): n for n in lengths if n > 0}


def punch_hole(device: BlockDevice, offset_bytes: int, length_bytes: int) -> None:
    """Make a range read back as zeros, without writing data where the device allows."""
    if isinstance(device, FileDevice) and not device.direct:
        if _libc.fallocate(device.fileno(), _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
                           offset_bytes, length_bytes) == 0:
            return
    device.write_zeroes(offset_bytes, length_bytes)


@dataclass
class RestoreTarget:
    device: BlockDevice
    fresh_from_bytes: int
    """Bytes from here on are known to read as zeros (a new file or its extension)."""
    created: bool


def open_restore_target(path: str, size_bytes: int) -> RestoreTarget:
    """A file (created, or extended to `size_bytes`), a block device or an engine device at
    least `size_bytes` long."""
    from blockera.engine.client import open_path

    mapper = path.startswith("/dev/mapper/") and not os.path.exists(path)
    if mapper:
        device = open_path(path, writable=True)
        fresh, created = device.size_bytes, False
    else:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise DeviceError(f"{path}: {exc.strerror}") from None
        if st is None:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                os.close(fd)
            except OSError as exc:
                raise DeviceError(f"{path}: cannot create the target: {exc.strerror}") from None
            fresh, created = 0, True
        elif stat.S_ISREG(st.st_mode):
            fresh, created = st.st_size, False
        elif stat.S_ISBLK(st.st_mode):
            fresh, created = None, False
        else:
            raise DeviceError(f"{path}: the target must be a regular file or a block device")
        device = FileDevice(path, writable=True)
        if fresh is None:
            fresh = device.size_bytes
        elif device.size_bytes < size_bytes:
            try:
                os.ftruncate(device.fileno(), size_bytes)
            except OSError as exc:
                device.close()
                raise DeviceError(f"{path}: cannot extend the target to {size_bytes} bytes: "
                                  f"{exc.strerror}") from None
    if device.size_bytes < size_bytes:
        have = device.size_bytes
        device.close()
        raise BackupInputError(f"{path} is {have} bytes, smaller than the image "
                               f"({size_bytes} bytes); restore to a larger device")
    return RestoreTarget(device, min(fresh, size_bytes), created)


def _plan(layout: ContentLayout, delta_from: ContentLayout | None,
          zeros: dict[bytes, int]) -> Iterator[tuple[int, str]]:
    """(blob index, action) with action one of "fetch", "zero", "same"."""
    same_layout = (delta_from is not None and delta_from.uniform_chunk_bytes is not None
                   and delta_from.uniform_chunk_bytes == layout.uniform_chunk_bytes)
    old_at: dict[tuple[int, int], bytes] = {}
    if delta_from is not None and not same_layout:
        old_at = {delta_from.range_of(i): delta_from.ids[i] for i in range(len(delta_from))}
    for i, blob_id in enumerate(layout.ids):
        if delta_from is not None:
            if same_layout:
                old = delta_from.ids[i] if i < len(delta_from) else None
                if old is not None and delta_from.range_of(i) != layout.range_of(i):
                    old = None
            else:
                old = old_at.get(layout.range_of(i))
            if old == blob_id:
                yield i, "same"
                continue
        if blob_id in zeros and zeros[blob_id] == layout.range_of(i)[1] - layout.range_of(i)[0]:
            yield i, "zero"
        else:
            yield i, "fetch"


def restore_to_device(repo: Repository, layout: ContentLayout, target: RestoreTarget, *,
                      sparse: bool = False, delta_from: ContentLayout | None = None,
                      ignore_errors: bool = False, threads: int = DEFAULT_THREADS,
                      on_progress: Callable[[int], None] | None = None,
                      what: str = "image") -> RestoreResult:
    """Write the image of `layout` onto `target` (see the module docstring)."""
    device = target.device
    result = RestoreResult(layout.size_bytes, len(layout))
    zero_buffer = bytes(layout.uniform_chunk_bytes or (1 << 20))
    writer = ImageWriter(device)

    def write_zeros(begin: int, end: int) -> None:
        if sparse:
            if begin < target.fresh_from_bytes:  # a fresh range reads as zeros already
                punch_hole(device, begin, min(end, target.fresh_from_bytes) - begin)
            return
        for at in range(begin, end, len(zero_buffer)):
            writer.write(at, zero_buffer[:min(end - at, len(zero_buffer))])
        result.bytes_written += end - begin

    actions = [action for _, action in _plan(layout, delta_from, zero_ids(layout))]
    items = ((i, layout.ids[i] if actions[i] == "fetch" else None,
              layout.range_of(i)[1] - layout.range_of(i)[0]) for i in range(len(layout)))
    try:
        for i, data in BlobFetcher[int](repo, threads=threads).fetch(items):
            begin, end = layout.range_of(i)
            if actions[i] == "same":
                result.chunks_unchanged += 1
            elif actions[i] == "zero":
                result.chunks_zero += 1
                write_zeros(begin, end)
            elif isinstance(data, BaseException):
                reason = f"blob {short(layout.ids[i])}: {data}"
                if not ignore_errors:
                    raise DamagedBackupError(
                        f"{what}: bytes [{begin}, {end}) cannot be restored ({reason}); the "
                        "target is incomplete. Restore with --ignore-errors to write zeros there and "
                        "carry on, and run `blockera check --read-data`") from None
                result.damaged.append(DamagedRange(begin, end, reason))
                write_zeros(begin, end)
            else:
                assert data is not None
                if sparse and _all_zero(data, zero_buffer):
                    result.chunks_zero += 1
                    write_zeros(begin, end)
                else:
                    writer.write(begin, data)
                    result.chunks_written += 1
                    result.bytes_written += len(data)
            if on_progress:
                on_progress(end - begin)
        writer.finish()
    finally:
        writer.close()
    result.damaged = _merge(result.damaged)
    return result


def _all_zero(data: bytes, zero_buffer: bytes) -> bool:
    if len(data) <= len(zero_buffer):
        return data == zero_buffer[:len(data)]
    return data.count(0) == len(data)


def dump_to_stream(repo: Repository, layout: ContentLayout, out: BinaryIO, *,
                   ignore_errors: bool = False, threads: int = DEFAULT_THREADS,
                   on_progress: Callable[[int], None] | None = None,
                   what: str = "image") -> RestoreResult:
    """The whole image, in order, to `out` (all-zero chunks written without loading them)."""
    result = RestoreResult(layout.size_bytes, len(layout))
    zeros = zero_ids(layout)
    zero_buffer = bytes(layout.uniform_chunk_bytes or 0)
    items = ((i, None if blob_id in zeros else blob_id,
              layout.range_of(i)[1] - layout.range_of(i)[0])
             for i, blob_id in enumerate(layout.ids))
    for i, data in BlobFetcher[int](repo, threads=threads).fetch(items):
        begin, end = layout.range_of(i)
        if data is None:
            result.chunks_zero += 1
            out.write(zero_buffer[:end - begin])
        elif isinstance(data, BaseException):
            reason = f"blob {short(layout.ids[i])}: {data}"
            if not ignore_errors:
                raise DamagedBackupError(f"{what}: bytes [{begin}, {end}) cannot be read "
                                         f"({reason}); the output is incomplete") from None
            result.damaged.append(DamagedRange(begin, end, reason))
            out.write(bytes(end - begin))
        else:
            out.write(data)
            result.chunks_written += 1
        result.bytes_written += end - begin
        if on_progress:
            on_progress(end - begin)
    out.flush()
    result.damaged = _merge(result.damaged)
    return result
