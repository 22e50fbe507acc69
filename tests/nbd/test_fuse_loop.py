"""The whole stack a user would build: nbdfuse exposes the export as a file, a loop device
(direct I/O) makes it a block device, ext4 is created, mounted, written, checked and read back.
Needs root, /dev/fuse and loop devices."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from blockera.blockdev import FileDevice

from .conftest import pattern, require_fuse_and_loop, run, stop_nbdfuse, unix_uri

MiB = 1 << 20


def _wait_for(path: Path, timeout_s: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if proc.poll() is not None:
            out = proc.stderr.read().decode() if proc.stderr else ""
            raise AssertionError(f"nbdfuse exited with {proc.returncode}: {out}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout_s} s")
        time.sleep(0.02)


@pytest.fixture
def fuse_file(start_server, tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(the nbdfuse file of an exported 128 MiB image, the image)."""
    require_fuse_and_loop()
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(128 * MiB)
    device = FileDevice(image)
    server = start_server({"disk": device})
    mountpoint = tmp_path / "fuse"
    mountpoint.mkdir()
    pidfile = tmp_path / "nbdfuse.pid"
    proc = subprocess.Popen(["nbdfuse", "-P", str(pidfile), str(mountpoint),
                             unix_uri(server)], stderr=subprocess.PIPE)
    try:
        _wait_for(pidfile, 20, proc)
        yield mountpoint / "nbd", image
    finally:
        stop_nbdfuse(mountpoint, proc)
        server.shutdown(timeout_s=10)
        device.close()


@pytest.fixture
def cleanup() -> Iterator[ExitStack]:
    with ExitStack() as stack:
        yield stack


def _detach_loop(loop: str) -> None:
    subprocess.run(["losetup", "-d", loop], capture_output=True, timeout=30)


def _unmount(path: Path) -> None:
    if os.path.ismount(path):
        subprocess.run(["umount", str(path)], capture_output=True, timeout=60)


def test_ext4_on_a_loop_device_over_nbdfuse(fuse_file, cleanup: ExitStack,
                                            tmp_path: Path) -> None:
    nbd_file, image = fuse_file
    assert nbd_file.stat().st_size == 128 * MiB
    loop = run(["losetup", "-f", "--show", "--direct-io=on", str(nbd_file)]).stdout.strip()
    cleanup.callback(_detach_loop, loop)
    run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", loop], timeout=120)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run(["mount", "-t", "ext4", loop, str(mnt)])
    cleanup.callback(_unmount, mnt)
    files = {f"file{i}.bin": pattern((i + 1) * 1536 * 1024 + 123, seed=i) for i in range(6)}
    (mnt / "dir").mkdir()
    for name, data in files.items():
        (mnt / "dir" / name).write_bytes(data)
    run(["sync"])
    run(["umount", str(mnt)], timeout=60)
    fsck = run(["fsck.ext4", "-n", "-f", loop], check=False, timeout=120)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    run(["mount", "-t", "ext4", "-o", "ro", loop, str(mnt)])
    for name, data in files.items():
        got = (mnt / "dir" / name).read_bytes()
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest(), name
    run(["umount", str(mnt)], timeout=60)
    _detach_loop(loop)
    # The filesystem really is in the exported image: check it and read the files directly.
    fsck = run(["fsck.ext4", "-n", "-f", str(image)], check=False, timeout=120)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    for name, data in files.items():
        out = subprocess.run(["debugfs", "-R", f"cat /dir/{name}", str(image)],
                             capture_output=True, timeout=60)
        assert hashlib.sha256(out.stdout).digest() == hashlib.sha256(data).digest(), name
