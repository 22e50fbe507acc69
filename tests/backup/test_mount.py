"""`blockera mount`: a snapshot exported over NBD without restoring it, read by the real libnbd
tools; the copy-on-write overlay takes writes and never touches the repository; the blob cache
is bounded and loads each blob once under concurrent readers."""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from blockera.backup import LocalBackend, Repository
from blockera.backup.device_layout import DeviceFacts, content_layout, find_file_node
from blockera.backup.mount import OverlayDevice, SnapshotDevice
from blockera.blockdev import MemoryDevice
from blockera.errors import DeviceError
from tests.nbd.conftest import need

from .helpers import PASSWORD, tree_listing
from .jobs import KiB, MiB, Cli, image_bytes, make_repo


def _mount(cli: Cli, *args: str) -> tuple[subprocess.Popen, str]:
    """The mount process, once serving, and the line saying where."""
    proc = subprocess.Popen([sys.executable, "-m", "blockera", "mount", *args],
                            env=cli.env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    line = b""
    while b"serving" not in line:
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        line = proc.stderr.readline()
    return proc, line.decode()


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


@pytest.fixture
def backed_up(tmp_path: Path) -> tuple[Cli, bytes]:
    cli = Cli(make_repo(tmp_path / "repo"), tmp_path / "locks")
    disk = tmp_path / "vm.img"
    image = image_bytes(5 * MiB + 4096, seed=100)
    disk.write_bytes(image)
    cli.backup(disk, "--chunk-size", "256K")
    return cli, image


def test_nbd_clients_read_a_mounted_snapshot(backed_up, tmp_path: Path) -> None:
    need("nbdcopy", "nbdinfo")
    cli, image = backed_up
    before = tree_listing(cli.repo)
    sock = tmp_path / "m.sock"
    proc, _ = _mount(cli, "latest", "--unix", str(sock), "--cache-size", "1M")
    try:
        uri = f"nbd+unix:///vm.img?socket={sock}"
        info = json.loads(subprocess.run(["nbdinfo", "--json", uri], capture_output=True,
                                         check=True).stdout)
        export = info["exports"][0]
        assert export["export-size"] == len(image) and export["is_read_only"] is True
        subprocess.run(["nbdcopy", uri, str(tmp_path / "copy.img")], check=True)
        assert (tmp_path / "copy.img").read_bytes() == image
        r = subprocess.run(["nbdcopy", str(tmp_path / "copy.img"), uri], capture_output=True)
        assert r.returncode != 0                       # read-only
        assert len(list((cli.repo / "locks").iterdir())) == 1   # prune must wait
    finally:
        _stop(proc)
    assert tree_listing(cli.repo) == before


def test_writable_overlay_never_writes_the_repository(backed_up, tmp_path: Path) -> None:
    need("nbdcopy")
    cli, image = backed_up
    before = tree_listing(cli.repo)
    sock = tmp_path / "w.sock"
    new = image_bytes(len(image), seed=101)
    (tmp_path / "new.img").write_bytes(new)
    for where, overlay in ((["--unix", str(sock)], []),
                           (["--tcp", "0"], ["--overlay", str(tmp_path)])):
        proc, line = _mount(cli, "latest", *where, "--writable", *overlay)
        try:
            if where[0] == "--unix":
                uri = f"nbd+unix:///?socket={sock}"
            else:                           # "... at nbd://127.0.0.1:PORT/vm.img"
                uri = line.split(" at ")[-1].strip()
                assert re.fullmatch(r"nbd://127\.0\.0\.1:\d+/vm\.img", uri), line
            subprocess.run(["nbdcopy", str(tmp_path / "new.img"), uri], check=True)
            subprocess.run(["nbdcopy", uri, str(tmp_path / "back.img")], check=True)
            assert (tmp_path / "back.img").read_bytes() == new
        finally:
            _stop(proc)
    assert tree_listing(cli.repo) == before
    assert list(tmp_path.glob("blockera-overlay-*")) == []
    subprocess.run([sys.executable, "-m", "blockera", "dump", "latest"], env=cli.env,
                   stdout=open(tmp_path / "again.img", "wb"), check=True)
    assert (tmp_path / "again.img").read_bytes() == image


def _device(repo_path: Path, cache_bytes: int) -> SnapshotDevice:
    repo = Repository.open(LocalBackend(repo_path), PASSWORD)
    snapshot = repo.find_snapshot("latest")
    _, node = find_file_node(repo, snapshot)
    layout = content_layout(repo, node, DeviceFacts.from_tags(snapshot.tags), "t")
    return SnapshotDevice(repo, layout, cache_bytes=cache_bytes)


def test_cache_is_bounded_and_loads_once(backed_up) -> None:
    cli, image = backed_up
    dev = _device(cli.repo, cache_bytes=8 * MiB)
    rnd = random.Random(7)
    for _ in range(200):
        offset = rnd.randrange(len(image))
        length = rnd.randint(1, min(700 * KiB, len(image) - offset))
        assert dev.read(offset, length) == image[offset:offset + length]
    loaded_once = dev.loads
    assert loaded_once <= 21                           # each non-zero blob at most once
    results = []
    threads = [threading.Thread(target=lambda: results.append(dev.read(0, len(image))))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [image] * 8 and dev.loads == loaded_once
    small = _device(cli.repo, cache_bytes=512 * KiB)
    for _ in range(2):
        assert small.read(0, len(image)) == image
    assert small._cached_bytes <= 512 * KiB and small.loads > loaded_once
    with pytest.raises(DeviceError, match="read-only"):
        small.write(0, b"x")
    dev.repo.close()
    small.repo.close()


@pytest.mark.parametrize("directory", [None, "tmp"])
def test_overlay_matches_a_model(tmp_path: Path, directory: str | None) -> None:
    size = 300 * KiB + 512
    base = image_bytes(size, seed=102)
    model = bytearray(base)
    dev = OverlayDevice(MemoryDevice(data=base), str(tmp_path) if directory else None)
    rnd = random.Random(8)
    for _ in range(300):
        offset = rnd.randrange(size)
        length = rnd.randint(0, min(20000, size - offset))
        if rnd.random() < 0.5:
            data = rnd.randbytes(length)
            dev.write(offset, data)
            model[offset:offset + length] = data
        elif rnd.random() < 0.2:
            dev.write_zeroes(offset, length)
            model[offset:offset + length] = bytes(length)
        assert dev.read(offset, length) == bytes(model[offset:offset + length])
    assert dev.read(0, size) == bytes(model)
    dev.close()
