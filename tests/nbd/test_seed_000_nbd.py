"""Seed 000 (the dm-era tutorial) end to end with a real file system: the tutorial's three
devices in the engine, the era device exported over NBD, `nbdfuse` making it a file, a loop
device making that a block device, `mkfs.ext4`, mount, files, unmount, `fsck -n`; then
`blockera era invalidate` lists exactly the blocks the file system wrote, and `dd` of 40 MiB at
60 MiB shows blocks 30-49 in the next era, as in the tutorial.

The engine runs in this process with the origin image wrapped to log every write, so "the
blocks mkfs touched" is known independently of the era metadata. Needs root, /dev/fuse and
loop devices."""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from blockera.blockdev import BlockDevice, FileDevice
from blockera.engine.daemon import Daemon
from blockera.engine.userspace import Engine
from blockera.era.check import check_era_metadata
from blockera.nbd.daemon_service import EngineNbdService, NbdSettings

from .conftest import pattern, require_fuse_and_loop, run, stop_nbdfuse
from .engineenv import MiB, image, nonzero_blocks

ERA_BLOCK_BYTES = 4096 * 512        # the tutorial's granularity: 4096 sectors, 2 MiB


class WriteLog(BlockDevice):
    """A device that notes the byte range of every write, discard and zeroing."""

    def __init__(self, inner: BlockDevice) -> None:
        self.inner = inner
        self.name = inner.name
        self.ranges: list[tuple[int, int]] = []

    @property
    def size_bytes(self) -> int:
        return self.inner.size_bytes

    def read(self, offset_bytes: int, length_bytes: int) -> bytes:
        return self.inner.read(offset_bytes, length_bytes)

    def write(self, offset_bytes: int, data: bytes | bytearray | memoryview) -> None:
        self.inner.write(offset_bytes, data)
        self.ranges.append((offset_bytes, len(data)))

    def discard(self, offset_bytes: int, length_bytes: int) -> None:
        self.inner.discard(offset_bytes, length_bytes)
        self.ranges.append((offset_bytes, length_bytes))

    def write_zeroes(self, offset_bytes: int, length_bytes: int) -> None:
        self.inner.write_zeroes(offset_bytes, length_bytes)
        self.ranges.append((offset_bytes, length_bytes))

    def flush(self) -> None:
        self.inner.flush()

    def close(self) -> None:
        self.inner.close()

    def blocks(self, block_bytes: int) -> set[int]:
        out: set[int] = set()
        for offset, length in list(self.ranges):
            if length:
                out.update(range(offset // block_bytes, (offset + length - 1) // block_bytes + 1))
        return out


class Tutorial:
    """The engine (in this process) behind a control socket and an NBD socket."""

    def __init__(self, sock_dir: Path, tmp_path: Path) -> None:
        self.sdb = image(tmp_path / "sdb.img", 256 * MiB)        # metadata disk
        self.sdc = image(tmp_path / "sdc.img", 256 * MiB)        # origin
        self.origin_log: WriteLog | None = None

        def opener(path: str, writable: bool) -> BlockDevice:
            dev: BlockDevice = FileDevice(path, writable=writable)
            if Path(path).resolve() == self.sdc.resolve():
                dev = self.origin_log = WriteLog(dev)
            return dev

        self.engine = Engine(file_opener=opener)
        self.control = sock_dir / "engine.sock"
        self.nbd_socket = sock_dir / "engine-nbd.sock"
        self.daemon = Daemon(self.engine, self.control, services=[
            EngineNbdService(self.engine, NbdSettings(unix_path=self.nbd_socket))])
        self.env = {**os.environ, "BLOCKERA_SOCKET": str(self.control)}

    def blockera(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["blockera", *args], env=self.env, capture_output=True,
                              text=True, timeout=120)
        if check:
            assert proc.returncode == 0, f"blockera {' '.join(args)}: {proc.stderr}"
        return proc

    def invalidate(self, since: int) -> set[int]:
        out = self.blockera("era", "invalidate", "--written-since", str(since),
                            "/dev/mapper/era-access").stdout
        blocks = {int(b) for b in re.findall(r'<block block="(\d+)"/>', out)}
        for begin, end in re.findall(r'<range begin="(\d+)" end = "(\d+)"/>', out):
            blocks.update(range(int(begin), int(end)))
        return blocks

    def era(self) -> int:
        return int(self.blockera("dmsetup", "status", "era").stdout.split()[5])


@pytest.fixture
def tutorial(sock_dir: Path, tmp_path: Path) -> Iterator[Tutorial]:
    require_fuse_and_loop()
    t = Tutorial(sock_dir, tmp_path)
    t.daemon.start()
    try:
        yield t
    finally:
        t.daemon.stop()


def _wait_for(path: Path, proc: subprocess.Popen[bytes], timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise AssertionError(f"nbdfuse exited with {proc.returncode}: {err}")
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout_s} s"
        time.sleep(0.02)


def _unmount(path: Path) -> None:
    if os.path.ismount(path):
        subprocess.run(["umount", str(path)], capture_output=True, timeout=60)


def test_seed_000_with_ext4_over_nbdfuse_and_a_loop_device(tutorial: Tutorial,
                                                          tmp_path: Path) -> None:
    t = tutorial
    d = t.blockera
    d("dmsetup", "create", "era-meta", "--table", f"0 256 linear {t.sdb} 0")
    d("dmsetup", "create", "era", "--table", f"0 524288 era /dev/mapper/era-meta {t.sdc} 4096")
    d("dmsetup", "create", "era-access", "--table", "0 256 linear /dev/mapper/era-meta 0")
    assert t.origin_log is not None
    fuse_dir = tmp_path / "fuse"
    fuse_dir.mkdir()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with ExitStack() as cleanup:
        proc = subprocess.Popen(["nbdfuse", "-P", str(tmp_path / "nbdfuse.pid"), str(fuse_dir),
                                 f"nbd+unix:///era?socket={t.nbd_socket}"],
                                stderr=subprocess.PIPE)
        cleanup.callback(stop_nbdfuse, fuse_dir, proc)
        _wait_for(tmp_path / "nbdfuse.pid", proc)
        era_file = fuse_dir / "nbd"
        assert era_file.stat().st_size == 256 * MiB
        loop = run(["losetup", "-f", "--show", "--direct-io=on", str(era_file)]).stdout.strip()
        cleanup.callback(subprocess.run, ["losetup", "-d", loop], capture_output=True,
                         timeout=30)
        # mkfs.ext4 (without discarding: the era target marks every block a discard covers)
        run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", loop], timeout=120)
        run(["mount", "-t", "ext4", loop, str(mnt)])
        cleanup.callback(_unmount, mnt)
        files = {f"file{i}.bin": pattern((i + 1) * 700 * 1024 + 17, seed=i) for i in range(5)}
        (mnt / "dir").mkdir()
        for name, data in files.items():
            (mnt / "dir" / name).write_bytes(data)
        run(["umount", str(mnt)], timeout=60)
        fsck = run(["fsck.ext4", "-n", "-f", loop], check=False, timeout=120)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        written_by_fs = t.origin_log.blocks(ERA_BLOCK_BYTES)
        # The tutorial: take a snapshot, drop it, take another, list what changed since era 1.
        d("dmsetup", "message", "era", "0", "take_metadata_snap")
        assert t.era() == 2
        d("dmsetup", "message", "era", "0", "drop_metadata_snap")
        d("dmsetup", "message", "era", "0", "take_metadata_snap")
        mkfs_blocks = t.invalidate(1)
        assert mkfs_blocks == written_by_fs
        assert 0 in mkfs_blocks and len(mkfs_blocks) < 128
        assert nonzero_blocks(t.sdc, ERA_BLOCK_BYTES) <= mkfs_blocks
        d("dmsetup", "message", "era", "0", "drop_metadata_snap")
        # dd 40 MiB at 60 MiB through the loop device.
        data = tmp_path / "dd.bin"
        data.write_bytes(pattern(40 * MiB, seed=60))
        run(["dd", f"if={data}", f"of={loop}", "bs=1M", "seek=60", "count=40", "oflag=direct",
             "conv=fsync", "status=none"], timeout=120)
        d("dmsetup", "message", "era", "0", "take_metadata_snap")
        assert t.era() == 4
        assert t.invalidate(1) == mkfs_blocks | set(range(30, 50))
        assert t.invalidate(3) == set(range(30, 50))
        d("dmsetup", "message", "era", "0", "drop_metadata_snap")
        with open(t.sdc, "rb") as f:
            f.seek(60 * MiB)
            assert f.read(40 * MiB) == data.read_bytes()
    # The export let go of the device: everything can be removed, and the metadata is sound.
    for name in ("era-access", "era", "era-meta"):
        d("dmsetup", "remove", name)
    assert check_era_metadata(FileDevice(t.sdb, writable=False)).ok
