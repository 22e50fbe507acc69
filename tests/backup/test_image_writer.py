"""The restore's image writer: ranges in any mix of aligned and unaligned runs with gaps land
exactly (gaps keep what the target held), through O_DIRECT where the file system allows and
through the page cache where it refuses; errors name the byte; a loop device as the target."""

from __future__ import annotations

import errno
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from blockera.backup import image_writer
from blockera.backup.image_writer import ImageWriter
from blockera.direct_io import ALIGN_BYTES
from blockera.blockdev import FileDevice
from blockera.errors import DeviceError, NoSpaceError

KiB = 1024
SIZE = 3 * 1024 * KiB + 1000     # not a multiple of the aligned block


def _runs(seed: int, size: int) -> list[tuple[int, int]]:
    """Ascending (offset, length) ranges with gaps, aligned and not, some adjacent."""
    rnd = random.Random(seed)
    at, out = 0, []
    while at < size:
        if rnd.random() < 0.3:
            at += rnd.choice([ALIGN_BYTES, 1, 700, 64 * KiB, 5000])   # a gap
        length = rnd.choice([ALIGN_BYTES, 64 * KiB, 100 * KiB + 3, 1, 513, 300 * KiB])
        length = min(length, size - at)
        if length > 0:
            out.append((at, length))
        at += length
    return out


def _write_runs(path: Path, runs: list[tuple[int, int]], seed: int,
                batch_bytes: int) -> bytearray:
    """Write random data over `runs` of the file at `path`; what the file should now hold."""
    expected = bytearray(path.read_bytes())
    rnd = random.Random(seed)
    device = FileDevice(path, writable=True)
    writer = ImageWriter(device, batch_bytes=batch_bytes)
    try:
        for offset, length in runs:
            data = rnd.randbytes(length)
            writer.write(offset, data)
            expected[offset:offset + length] = data
        writer.finish()
    finally:
        writer.close()
        device.close()
    return expected


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("batch_bytes", [64 * KiB, 8 << 20])
def test_runs_with_gaps_land_exactly(tmp_path: Path, seed: int, batch_bytes: int) -> None:
    path = tmp_path / "target.img"
    path.write_bytes(random.Random(1000 + seed).randbytes(SIZE))   # gaps must keep this
    expected = _write_runs(path, _runs(seed, SIZE), seed, batch_bytes)
    assert path.read_bytes() == expected


def test_direct_io_used_where_the_file_system_allows(tmp_path: Path) -> None:
    path = tmp_path / "target.img"
    path.write_bytes(bytes(1 << 20))
    device = FileDevice(path, writable=True)
    writer = ImageWriter(device, batch_bytes=256 * KiB)
    try:
        if writer._direct is None:
            pytest.skip(f"{tmp_path} refuses O_DIRECT")
        writer.write(0, b"\xab" * (1 << 20))
        writer.finish()
        assert writer._direct.direct_works
    finally:
        writer.close()
        device.close()
    assert path.read_bytes() == b"\xab" * (1 << 20)


def test_file_system_refusing_direct_writes_gets_buffered_ones(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(fd: int, buffers: list[object], offset: int) -> int:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    monkeypatch.setattr(image_writer.os, "pwritev", refuse)
    path = tmp_path / "target.img"
    path.write_bytes(random.Random(7).randbytes(SIZE))
    expected = _write_runs(path, _runs(7, SIZE), 7, 64 * KiB)
    assert path.read_bytes() == expected


def test_write_errors_name_the_byte(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, buffers: list[object], offset: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    path = tmp_path / "target.img"
    path.write_bytes(bytes(1 << 20))
    device = FileDevice(path, writable=True)
    writer = ImageWriter(device, batch_bytes=64 * KiB)
    if writer._direct is None:
        writer.close()
        device.close()
        pytest.skip(f"{tmp_path} refuses O_DIRECT")
    monkeypatch.setattr(image_writer.os, "pwritev", full)
    try:
        with pytest.raises(NoSpaceError, match="at byte 0"):
            writer.write(0, bytes(1 << 20))
            writer.finish()
    finally:
        writer.close()
        device.close()


def test_loop_device_target(tmp_path: Path) -> None:
    if os.geteuid() != 0 or not os.path.exists("/dev/loop-control") or \
            shutil.which("losetup") is None:
        pytest.skip("loop devices need root, the loop module and losetup")
    backing = tmp_path / "backing.img"
    backing.write_bytes(random.Random(3).randbytes(4 << 20))
    loop = subprocess.run(["losetup", "--find", "--show", str(backing)], check=True,
                          capture_output=True, text=True).stdout.strip()
    try:
        runs = _runs(3, 4 << 20)
        expected = _write_runs(Path(loop), runs, 3, 64 * KiB)
        with open(loop, "rb") as f:
            assert f.read() == expected
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)
    assert backing.read_bytes() == expected


def test_unwritable_target_is_a_device_error(tmp_path: Path) -> None:
    path = tmp_path / "target.img"
    path.write_bytes(bytes(8192))
    device = FileDevice(path, writable=False)
    writer = ImageWriter(device)
    try:
        with pytest.raises(DeviceError, match="read-only"):
            writer.write(0, bytes(8192))
    finally:
        writer.close()
        device.close()
