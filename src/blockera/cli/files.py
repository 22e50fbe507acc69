"""How the commands open what they read and write what they produce: devices and images by
path (`/dev/mapper/NAME` may be a device of the engine daemon), read-only with O_DIRECT so a
live device is not seen through a stale page cache; output to stdout, or to a file that only
replaces its target once complete and durable."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import BinaryIO, Iterator

from blockera.blockdev import BlockDevice
from blockera.errors import DeviceError, UsageError


def open_for_reading(path: str) -> BlockDevice:
    from blockera.dm.client import open_path

    return open_path(path, writable=False, direct=True)


@contextlib.contextmanager
def output_file(path: str | None) -> Iterator[BinaryIO]:
    """stdout (None or "-"), or a new file that replaces `path` once written and synced."""
    if path is None or path == "-":
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    target = Path(path)
    if target.exists() and not target.is_file():
        raise UsageError(f"{path}: output must be a regular file (it is not replaced or "
                         "written through)")
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise DeviceError(f"{path}: cannot write output: {exc.strerror}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
