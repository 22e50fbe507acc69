"""How the commands open what they read and write what they produce: devices and images by
path (`/dev/mapper/NAME` may be a device of the engine daemon), read-only with O_DIRECT so a
live device is not seen through a stale page cache; output to stdout, or to a file that only
replaces its target once complete and durable. An output that is one of the command's inputs
(the same file, by device and inode, whatever the path says) is refused before anything is
read or written; so is replacing a non-empty file where the command says so.
See docs/era.md §5; docs/snapshot.md §8."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import BinaryIO, Iterator

from blockera.blockdev import BlockDevice
from blockera.errors import DeviceError, UsageError


def open_for_reading(path: str) -> BlockDevice:
    from blockera.engine.client import open_path

    return open_path(path, writable=False, direct=True)


def open_output_device(path: str) -> BlockDevice:
    """An existing device, engine device (`/dev/mapper/NAME`) or file to write into."""
    from blockera.engine.client import MAPPER_PREFIX, open_path

    if not path.startswith(MAPPER_PREFIX) and not os.path.exists(path):
        raise DeviceError(f"{path}: output does not exist (create a file of the right size "
                          "first, e.g. truncate -s 4M FILE, or name a device)")
    return open_path(path, writable=True)


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def refuse_output_over_input(output: str | None, *inputs: str | None) -> None:
    """UsageError if `output` is the same file as one of `inputs` (stdout never is)."""
    if output is None or output == "-":
        return
    out_id = _identity(output)
    if out_id is None:
        return
    for path in inputs:
        if path is not None and path != "-" and _identity(path) == out_id:
            raise UsageError(f"{output}: the output is the same file as the input {path}; "
                             "refusing to overwrite an input (write somewhere else)")


@contextlib.contextmanager
def output_file(path: str | None, *, inputs: tuple[str | None, ...] = (),
                replace_nonempty: bool = True) -> Iterator[BinaryIO]:
    """stdout (None or "-"), or a new file that replaces `path` once written and synced.
    Refused when `path` is one of `inputs`, or is a non-empty file and not
    `replace_nonempty`."""
    refuse_output_over_input(path, *inputs)
    if path is None or path == "-":
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    target = Path(path)
    if target.exists() and not target.is_file():
        raise UsageError(f"{path}: output must be a regular file (it is not replaced or "
                         "written through)")
    if not replace_nonempty and target.exists() and target.stat().st_size:
        raise UsageError(f"{path}: exists and is not empty; refusing to replace it (remove it "
                         "first, or pass --force)")
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
