"""A repository in a local directory, in restic's layout (docs/backup-repository.md §1.1).

    config                  the encrypted config
    keys/<id>               key files
    locks/<id>              lock files
    snapshots/<id>          snapshot files
    index/<id>              index files
    data/<id[:2]>/<id>      pack files, under 256 subdirectories 00 … ff made at creation

Directories are created mode 0700 and files end up read-only (0400), as restic leaves them.
A save writes `<name>-tmp-<random>` in the final directory, fsyncs it, renames it into place
and fsyncs the directory, so a file is either absent or complete and durable. Files of 1 MiB
or more (packs) are written with O_DIRECT where the file system allows it: they are written
once and rarely read soon, and need no page cache. Temporary files
left by a crash are never listed (and restic ignores them too: their names are not IDs).
"""

from __future__ import annotations

import errno
import os
import secrets
import stat as stat_mod
from collections.abc import Iterator
from pathlib import Path

from blockera.backup.backend import Backend, Buffer, FileInfo, FileType
from blockera.backup.errors import BackendError, BackendNotFoundError
from blockera.direct_io import write_new_file

DIR_MODE = 0o700
FILE_MODE = 0o400
DIRECT_MIN_BYTES = 1 << 20
"""Files this large (packs) are written with O_DIRECT (`blockera.direct_io`)."""
_TMP_MARK = "-tmp-"


class LocalBackend(Backend):
    """Files under one directory."""

    lists_saves_at_once = True

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @property
    def location(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"LocalBackend({str(self.path)!r})"

    # -- layout -----------------------------------------------------------------------------

    def _dir(self, ftype: FileType, name: str) -> Path:
        if ftype is FileType.CONFIG:
            return self.path
        if ftype is FileType.PACK:
            if len(name) < 2:
                raise BackendError(f"{self.location}: invalid pack name {name!r}")
            return self.path / "data" / name[:2]
        return self.path / ftype.value

    def _file(self, ftype: FileType, name: str) -> Path:
        if ftype is FileType.CONFIG:
            return self.path / "config"
        if not name or "/" in name or name.startswith("."):
            raise BackendError(f"{self.location}: invalid {ftype.value} file name {name!r}")
        return self._dir(ftype, name) / name

    def _error(self, exc: OSError, action: str, path: Path) -> BackendError:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):  # ENOTDIR: a file where a directory is
            return BackendNotFoundError(f"{self.location}: {action} {path}: no such file")
        name = errno.errorcode.get(exc.errno or 0, "EIO")
        return BackendError(f"{self.location}: {action} {path}: {exc.strerror or exc}",
                            errno_name=name)

    def create(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise BackendError(f"{self.location}: exists and is not a directory")
        if (self.path / "config").exists():
            raise BackendError(f"{self.location}: a repository already exists here (config "
                               "file present)")
        try:
            self.path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            for sub in ("keys", "locks", "snapshots", "index", "data"):
                (self.path / sub).mkdir(mode=DIR_MODE, exist_ok=True)
            for i in range(256):
                (self.path / "data" / f"{i:02x}").mkdir(mode=DIR_MODE, exist_ok=True)
            _fsync_dir(self.path / "data")
            _fsync_dir(self.path)
        except OSError as exc:
            raise self._error(exc, "creating the repository layout in", self.path) from None

    # -- files ------------------------------------------------------------------------------

    def save(self, ftype: FileType, name: str, data: Buffer) -> None:
        final = self._file(ftype, name)
        directory = final.parent
        tmp = directory / f"{final.name}{_TMP_MARK}{secrets.token_hex(6)}"
        try:
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileNotFoundError:
                if not self.path.is_dir():
                    raise
                directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                if len(data) >= DIRECT_MIN_BYTES:
                    write_new_file(fd, data)
                else:
                    view = memoryview(data)
                    while view:
                        written = os.write(fd, view)
                        view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.chmod(tmp, FILE_MODE)
            os.replace(tmp, final)
            _fsync_dir(directory)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise self._error(exc, "writing", final) from None

    def load(self, ftype: FileType, name: str, offset_bytes: int = 0,
             length_bytes: int | None = None) -> bytes:
        path = self._file(ftype, name)
        if offset_bytes < 0 or (length_bytes is not None and length_bytes < 0):
            raise BackendError(f"{self.location}: invalid range {offset_bytes}+{length_bytes} "
                               f"for {path}")
        try:
            with open(path, "rb", buffering=0) as f:
                if length_bytes is None:
                    f.seek(offset_bytes)
                    return f.read()
                data = os.pread(f.fileno(), length_bytes, offset_bytes)
                while len(data) < length_bytes:
                    more = os.pread(f.fileno(), length_bytes - len(data),
                                    offset_bytes + len(data))
                    if not more:
                        break
                    data += more
        except OSError as exc:
            raise self._error(exc, "reading", path) from None
        if len(data) != length_bytes:
            raise BackendError(f"{self.location}: {path} is shorter than expected: wanted "
                               f"{length_bytes} bytes at offset {offset_bytes}, got {len(data)}")
        return data

    def stat(self, ftype: FileType, name: str) -> FileInfo:
        path = self._file(ftype, name)
        try:
            st = os.stat(path)
        except OSError as exc:
            raise self._error(exc, "looking up", path) from None
        if not stat_mod.S_ISREG(st.st_mode):
            raise BackendError(f"{self.location}: {path} is not a regular file")
        return FileInfo(name if ftype is not FileType.CONFIG else "config", st.st_size)

    def list(self, ftype: FileType) -> Iterator[FileInfo]:
        if ftype is FileType.CONFIG:
            if self.exists(FileType.CONFIG, ""):
                yield self.stat(FileType.CONFIG, "")
            return
        base = self.path / ftype.value
        if ftype is FileType.PACK:
            try:
                subdirs = sorted(e.path for e in os.scandir(base) if e.is_dir())
            except FileNotFoundError:
                return
            except OSError as exc:
                raise self._error(exc, "listing", base) from None
            for sub in subdirs:
                yield from self._list_files(Path(sub))
        else:
            yield from self._list_files(base)

    def _list_files(self, directory: Path) -> Iterator[FileInfo]:
        try:
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            return
        except OSError as exc:
            raise self._error(exc, "listing", directory) from None
        for entry in entries:
            if _TMP_MARK in entry.name or entry.name.startswith("."):
                continue
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue  # removed since the directory was read
            except OSError as exc:
                raise self._error(exc, "looking up", Path(entry.path)) from None
            if stat_mod.S_ISREG(st.st_mode):
                yield FileInfo(entry.name, st.st_size)

    def remove(self, ftype: FileType, name: str) -> None:
        path = self._file(ftype, name)
        try:
            os.unlink(path)
            _fsync_dir(path.parent)
        except OSError as exc:
            raise self._error(exc, "removing", path) from None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:  # some file systems cannot sync directories
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)
