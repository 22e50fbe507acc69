"""The storage interface under a repository (docs/backup-repository.md §1).

A backend stores opaque byte strings by (file type, name). It knows nothing of encryption,
packs or indexes: the repository layer above turns every object into bytes before `save` and
checks what `load` returns. Names are storage IDs (64 hex digits), except the config file,
which has none (pass any name; `""` is conventional).

The contract every backend (local directory, S3, ...) keeps:

* `save` is atomic and durable when it returns: a reader sees either nothing or the whole
  file, and a crash after `save` returned loses nothing. Saving a name that exists replaces it
  (content-addressed names make that harmless).
* `load` returns exactly the bytes asked for (`length_bytes=None`: to the end), or raises.
* `list` yields every stored file of a type with its size; temporary files of unfinished
  saves are not listed.
* Errors are `BackendError`s; a missing file is `BackendNotFoundError`.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

from blockera.backup.errors import BackendNotFoundError


class FileType(enum.Enum):
    """The kinds of files in a repository; the value is restic's directory name."""

    CONFIG = "config"
    KEY = "keys"
    LOCK = "locks"
    SNAPSHOT = "snapshots"
    INDEX = "index"
    PACK = "data"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class FileInfo:
    name: str
    size_bytes: int


Buffer = bytes | bytearray | memoryview


class Backend(ABC):
    """Byte storage for one repository."""

    lists_saves_at_once: bool = False
    """Does every listing begun after a `save` returned include that file, in every process?
    True for a local directory (files are renamed into place; a directory read after the
    rename sees them); False where a listing may lag a write (S3-compatible stores in
    general). A lock's second look at the others waits out the lag (locks.py)."""

    @property
    @abstractmethod
    def location(self) -> str:
        """Where the repository is, for messages (a path, a URL)."""

    @abstractmethod
    def create(self) -> None:
        """Prepare empty storage for a new repository (restic's directory layout). Fails with
        `BackendError` if a repository config is already there."""

    @abstractmethod
    def save(self, ftype: FileType, name: str, data: Buffer) -> None:
        """Store `data` atomically and durably under (ftype, name)."""

    @abstractmethod
    def load(self, ftype: FileType, name: str, offset_bytes: int = 0,
             length_bytes: int | None = None) -> bytes:
        """`length_bytes` bytes at `offset_bytes` (None: to the end of the file)."""

    @abstractmethod
    def stat(self, ftype: FileType, name: str) -> FileInfo:
        """Name and size of a stored file."""

    @abstractmethod
    def list(self, ftype: FileType) -> Iterator[FileInfo]:
        """Every stored file of `ftype` (any order)."""

    @abstractmethod
    def remove(self, ftype: FileType, name: str) -> None:
        """Delete a stored file (`BackendNotFoundError` if it is not there)."""

    def exists(self, ftype: FileType, name: str) -> bool:
        try:
            self.stat(ftype, name)
        except BackendNotFoundError:
            return False
        return True

    def close(self) -> None:
        """Release connections or handles."""

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
