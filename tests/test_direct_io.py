"""Whole files written with O_DIRECT: any length lands exactly (the padded last block is
truncated away), the thread's buffer is reused, and a file system refusing direct writes
gets buffered ones."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest

from blockera import direct_io
from blockera.direct_io import ALIGN_BYTES, aligned_buffer, write_new_file


@pytest.mark.parametrize("length", [0, 1, ALIGN_BYTES - 1, ALIGN_BYTES, (1 << 20) + 3,
                                    (3 << 20) + ALIGN_BYTES])
def test_any_length_lands_exactly(tmp_path: Path, length: int) -> None:
    data = random.Random(length).randbytes(length)
    path = tmp_path / "file"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        write_new_file(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert path.read_bytes() == data


def test_the_thread_buffer_is_reused_and_grown() -> None:
    first = aligned_buffer(10)
    size = len(first)
    assert aligned_buffer(size) is first
    bigger = aligned_buffer(size + 1)
    assert len(bigger) > size and aligned_buffer(5) is bigger


def test_refused_direct_writes_fall_back_to_buffered(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    real_pwrite = os.pwrite

    def refuse_direct(fd: int, data: object, offset: int) -> int:
        if direct_io.fcntl.fcntl(fd, direct_io.fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(direct_io.os, "pwrite", refuse_direct)
    data = random.Random(5).randbytes((2 << 20) + 17)
    path = tmp_path / "file"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        write_new_file(fd, data)
        assert not direct_io.fcntl.fcntl(fd, direct_io.fcntl.F_GETFL) & os.O_DIRECT
    finally:
        os.close(fd)
    assert path.read_bytes() == data


def test_block_device_direct_reads_and_writes_at_any_offset(tmp_path: Path) -> None:
    """A block device opened with direct=True (as the tools open devices the kernel may be
    writing): unaligned reads and read-modify-write of partial blocks land exactly, through the
    thread's reused buffer."""
    import shutil
    import subprocess

    from blockera.blockdev import FileDevice

    if os.geteuid() != 0 or not os.path.exists("/dev/loop-control") or \
            shutil.which("losetup") is None:
        pytest.skip("loop devices need root, the loop module and losetup")
    backing = tmp_path / "backing.img"
    expected = bytearray(random.Random(9).randbytes(2 << 20))
    backing.write_bytes(expected)
    loop = subprocess.run(["losetup", "--find", "--show", str(backing)], check=True,
                          capture_output=True, text=True).stdout.strip()
    try:
        rnd = random.Random(10)
        with FileDevice(loop, writable=True, direct=True) as dev:
            assert dev.direct
            for _ in range(60):
                offset = rnd.randrange(0, len(expected) - 1)
                length = rnd.randrange(1, min(300_000, len(expected) - offset) + 1)
                if rnd.random() < 0.5:
                    data = rnd.randbytes(length)
                    dev.write(offset, data)
                    expected[offset:offset + length] = data
                else:
                    assert dev.read(offset, length) == expected[offset:offset + length]
            dev.flush()
            assert dev.read(0, len(expected)) == expected
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)
    assert backing.read_bytes() == expected
