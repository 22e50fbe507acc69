"""One backup of a source at a time (docs/backup-repository.md §15.4).

A backup holds an exclusive `flock` on a small file named after the source's identity (device
and inode of an image file, the device number of a block device, the engine daemon's socket
and the device's name for an engine device — each daemon has its own /dev/mapper), in `BLOCKERA_LOCK_DIR`, else `/run/lock/blockera` when writable, else a directory
of the user's (`$XDG_RUNTIME_DIR/blockera` or the temporary directory). A second backup of
the same source, whatever path names it and whichever repository it writes to, fails at once
naming the holder's PID; backups of different sources run in parallel. The kernel drops the
lock when its holder exits, however it exits.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import stat
import tempfile
from pathlib import Path

from blockera.backup.job_errors import SourceBusyError
from blockera.errors import DeviceError

LOCK_DIR_ENV = "BLOCKERA_LOCK_DIR"
_MAPPER = "/dev/mapper/"


def lock_directory() -> Path:
    configured = os.environ.get(LOCK_DIR_ENV)
    if configured:
        return Path(configured)
    system = Path("/run/lock")
    if system.is_dir() and os.access(system, os.W_OK):
        return system / "blockera"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return Path(runtime) / "blockera"
    return Path(tempfile.gettempdir()) / f"blockera-{os.getuid()}"


def source_identity(path: str) -> str:
    """What names a source whatever path reaches it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if path.startswith(_MAPPER):
            from blockera.engine.protocol import default_socket_path

            daemon = os.path.realpath(default_socket_path())
            return f"engine:{daemon}:{path[len(_MAPPER):]}"
        raise DeviceError(f"{path}: no such file or device") from None
    except OSError as exc:
        raise DeviceError(f"{path}: {exc.strerror}") from None
    if stat.S_ISBLK(st.st_mode):
        return f"blockdev:{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    return f"file:{st.st_dev}:{st.st_ino}"


class SourceLock:
    """An exclusive, non-blocking lock on one source (a context manager)."""

    def __init__(self, source: str, directory: Path | None = None) -> None:
        self.source = source
        self.identity = source_identity(source)
        self.directory = directory or lock_directory()
        digest = hashlib.sha256(self.identity.encode()).hexdigest()[:24]
        self.path = self.directory / f"backup-{digest}.lock"
        self._fd: int | None = None

    def acquire(self) -> "SourceLock":
        try:
            self.directory.mkdir(mode=0o1777 if self.directory.parent == Path("/run/lock")
                                 else 0o700, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise DeviceError(f"cannot create the source lock {self.path}: {exc.strerror} "
                              f"(set {LOCK_DIR_ENV} to a writable directory)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = ""
            try:
                text = os.pread(fd, 64, 0).decode(errors="replace").split()
                if text:
                    holder = f" (PID {text[0]})"
            except OSError:
                pass
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise SourceBusyError(f"{self.source}: another backup of this source is "
                                      f"running{holder}; wait for it to finish") from None
            raise DeviceError(f"cannot lock {self.path}: {exc.strerror}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {self.identity}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.ftruncate(fd, 0)
            except OSError:
                pass
            os.close(fd)

    def __enter__(self) -> "SourceLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
