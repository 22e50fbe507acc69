"""The local directory backend: restic's layout, atomic durable saves, ranges, errors."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from blockera.backup import BackendError, BackendNotFoundError, FileType, LocalBackend

NAME = "ab" + "0" * 62


def test_create_makes_restics_layout(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "repo")
    backend.create()
    root = tmp_path / "repo"
    assert sorted(p.name for p in root.iterdir()) == ["data", "index", "keys", "locks",
                                                      "snapshots"]
    assert sorted(p.name for p in (root / "data").iterdir()) == [f"{i:02x}" for i in range(256)]
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    backend.save(FileType.CONFIG, "", b"cfg")
    with pytest.raises(BackendError, match="already exists"):
        backend.create()


def test_save_load_stat_list_remove(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "repo")
    backend.create()
    backend.save(FileType.PACK, NAME, b"0123456789")
    backend.save(FileType.SNAPSHOT, NAME, memoryview(b"snap"))
    backend.save(FileType.CONFIG, "", b"config!")
    assert (tmp_path / "repo" / "data" / "ab" / NAME).read_bytes() == b"0123456789"
    assert stat.S_IMODE((tmp_path / "repo" / "data" / "ab" / NAME).stat().st_mode) == 0o400
    assert backend.load(FileType.PACK, NAME) == b"0123456789"
    assert backend.load(FileType.PACK, NAME, 3, 4) == b"3456"
    assert backend.load(FileType.PACK, NAME, 7) == b"789"
    assert backend.load(FileType.CONFIG, "") == b"config!"
    assert backend.stat(FileType.PACK, NAME).size_bytes == 10
    assert [(f.name, f.size_bytes) for f in backend.list(FileType.PACK)] == [(NAME, 10)]
    assert [f.name for f in backend.list(FileType.SNAPSHOT)] == [NAME]
    assert list(backend.list(FileType.INDEX)) == []
    assert backend.exists(FileType.PACK, NAME) and not backend.exists(FileType.INDEX, NAME)
    backend.save(FileType.PACK, NAME, b"replaced")  # read-only files are still replaceable
    assert backend.load(FileType.PACK, NAME) == b"replaced"
    backend.remove(FileType.PACK, NAME)
    assert list(backend.list(FileType.PACK)) == []
    with pytest.raises(BackendNotFoundError):
        backend.remove(FileType.PACK, NAME)


def test_short_reads_and_missing_files_are_errors(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "repo")
    backend.create()
    backend.save(FileType.INDEX, NAME, b"short")
    with pytest.raises(BackendError, match="shorter than expected"):
        backend.load(FileType.INDEX, NAME, 2, 10)
    with pytest.raises(BackendNotFoundError, match="no such file"):
        backend.load(FileType.INDEX, "cd" * 32)
    with pytest.raises(BackendNotFoundError):
        backend.stat(FileType.KEY, "cd" * 32)
    with pytest.raises(BackendError, match="invalid"):
        backend.load(FileType.INDEX, "../config")


def test_temporary_files_are_not_listed(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "repo")
    backend.create()
    (tmp_path / "repo" / "locks" / f"{NAME}-tmp-123456").write_bytes(b"half")
    (tmp_path / "repo" / "data" / "ab" / f"{NAME}-tmp-abc").write_bytes(b"half")
    assert list(backend.list(FileType.LOCK)) == []
    assert list(backend.list(FileType.PACK)) == []


def test_failed_save_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = LocalBackend(tmp_path / "repo")
    backend.create()

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(BackendError, match="Input/output error") as info:
        backend.save(FileType.INDEX, NAME, b"x")
    assert info.value.errno_name == "EIO"
    assert list((tmp_path / "repo" / "index").iterdir()) == []


def test_a_file_is_not_a_repository_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"not a directory")
    backend = LocalBackend(tmp_path / "file")
    with pytest.raises(BackendError):
        backend.load(FileType.CONFIG, "")
    with pytest.raises(BackendError, match="not a directory"):
        backend.create()
