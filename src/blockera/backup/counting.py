"""A backend wrapper that counts what is written and read (docs/backup-repository.md §15.1:
the "stored" bytes of a backup's summary are the bytes its packs, index files and snapshot
took in the repository)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from blockera.backup.backend import Backend, Buffer, FileInfo, FileType


class CountingBackend(Backend):
    """Passes everything to `inner`; counts bytes saved and loaded per file type."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self._mutex = threading.Lock()
        self.saved_bytes: dict[FileType, int] = {t: 0 for t in FileType}
        self.loaded_bytes: dict[FileType, int] = {t: 0 for t in FileType}

    @property
    def location(self) -> str:
        return self.inner.location

    @property
    def lists_saves_at_once(self) -> bool:  # type: ignore[override]
        return self.inner.lists_saves_at_once

    def create(self) -> None:
        self.inner.create()

    def save(self, ftype: FileType, name: str, data: Buffer) -> None:
        self.inner.save(ftype, name, data)
        with self._mutex:
            self.saved_bytes[ftype] += len(data)

    def load(self, ftype: FileType, name: str, offset_bytes: int = 0,
             length_bytes: int | None = None) -> bytes:
        data = self.inner.load(ftype, name, offset_bytes, length_bytes)
        with self._mutex:
            self.loaded_bytes[ftype] += len(data)
        return data

    def stat(self, ftype: FileType, name: str) -> FileInfo:
        return self.inner.stat(ftype, name)

    def list(self, ftype: FileType) -> Iterator[FileInfo]:
        return self.inner.list(ftype)

    def remove(self, ftype: FileType, name: str) -> None:
        self.inner.remove(ftype, name)

    def exists(self, ftype: FileType, name: str) -> bool:
        return self.inner.exists(ftype, name)

    def close(self) -> None:
        self.inner.close()

    def stored_bytes(self) -> int:
        """Bytes of packs, index files and snapshots saved (locks and keys not counted)."""
        with self._mutex:
            return sum(self.saved_bytes[t] for t in (FileType.PACK, FileType.INDEX,
                                                     FileType.SNAPSHOT))
