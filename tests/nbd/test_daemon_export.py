"""`blockera daemon` exporting its devices over NBD, seen by real clients: nbdinfo, qemu-img,
qemu-io, nbdcopy and libnbd, over the unix socket and TCP; the listening rules and options;
clients that vanish; the clean shutdown."""

from __future__ import annotations

import errno
import json
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from blockera.blockdev import FileDevice
from blockera.era.check import check_era_metadata
from blockera.era.image import EraImage

from .conftest import need, pattern, run, wait_until
from .engineenv import MiB, image, nonzero_blocks

ERA_BLOCK_BYTES = 64 << 10


def create_era(d: Any, tmp_path: Path, size_bytes: int, block_bytes: int = ERA_BLOCK_BYTES,
               name: str = "era") -> tuple[Path, Path]:
    meta = image(tmp_path / f"{name}-meta.img", 8 * MiB)
    origin = image(tmp_path / f"{name}-origin.img", size_bytes)
    with d.control() as c:
        c.create(name, f"0 {size_bytes // 512} era {meta} {origin} {block_bytes // 512}")
    return meta, origin


def message(d: Any, *args: str) -> None:
    with d.control() as c:
        c.message("era", 0, list(args))


def invalidate_json(d: Any, meta: Path, since: int = 1) -> list[list[int]]:
    """`blockera era invalidate --json` through a metadata snapshot, as a backup would."""
    message(d, "take_metadata_snap")
    try:
        out = d.blockera("era", "invalidate", "--written-since", str(since),
                         "--metadata-snapshot", "--json", str(meta)).stdout
    finally:
        message(d, "drop_metadata_snap")
    return json.loads(out)["ranges"]


def live_recorded(meta: Path) -> set[int]:
    """Blocks recorded in committed metadata (after the daemon stopped)."""
    dev = FileDevice(meta, writable=False)
    try:
        image_ = EraImage(dev)
        assert image_.current_writeset() is None, "shutdown archives the current writeset"
        return set(np.flatnonzero(image_.changed_since(1)).tolist())
    finally:
        dev.close()


@pytest.fixture(params=["unix", "tcp"])
def transport(request: pytest.FixtureRequest) -> str:
    return request.param


def uri_for(d: Any, transport: str, name: str) -> str:
    return d.unix_uri(name) if transport == "unix" else d.tcp_uri(name)


def test_nbdinfo_and_qemu_img_see_the_devices(nbd_daemon, tmp_path: Path) -> None:
    need("nbdinfo", "qemu-img")
    d = nbd_daemon("--nbd-tcp", "127.0.0.1:0")
    assert d.nbd_socket.exists()
    assert d.tcp_address is not None and d.tcp_address[0] == "127.0.0.1"
    create_era(d, tmp_path, 48 * MiB, block_bytes=2 * MiB)
    plain = image(tmp_path / "plain.img", 6 * MiB)
    with d.control() as c:
        c.create("plain", f"0 {6 * MiB // 512} linear {plain} 0")
    for uri in (d.unix_uri("era"), d.tcp_uri("era")):
        info = json.loads(run(["nbdinfo", "--json", uri]).stdout)["exports"][0]
        assert info["export-size"] == 48 * MiB
        assert info["description"] == "engine device 253:0, era"
        assert info["block_size_minimum"] == 512
        assert info["is_read_only"] is False and info["can_multi_conn"] is True
        out = run(["qemu-img", "info", "--output=json", uri]).stdout
        assert json.loads(out)["virtual-size"] == 48 * MiB
    out = run(["qemu-img", "info", "--output=json", d.tcp_uri("plain")]).stdout
    assert json.loads(out)["virtual-size"] == 6 * MiB
    listing = json.loads(run(["nbdinfo", "--list", "--json", d.unix_uri("")]).stdout)
    assert {e["export-name"]: e["export-size"] for e in listing["exports"]} == {
        "era": 48 * MiB, "plain": 6 * MiB}
    with d.control() as c:
        c.remove("plain")
    listing = json.loads(run(["nbdinfo", "--list", "--json", d.unix_uri("")]).stdout)
    assert [e["export-name"] for e in listing["exports"]] == ["era"]
    gone = run(["nbdinfo", d.unix_uri("plain")], check=False)
    assert gone.returncode != 0 and "plain" in gone.stderr


def test_images_copy_in_and_out_bit_exact(nbd_daemon, transport, tmp_path: Path) -> None:
    need("qemu-img", "nbdcopy")
    d = nbd_daemon("--nbd-tcp", "127.0.0.1:0")
    size = 16 * MiB
    meta, origin = create_era(d, tmp_path, size, block_bytes=MiB)
    uri = uri_for(d, transport, "era")
    first = tmp_path / "first.raw"
    first.write_bytes(pattern(size, seed=21))
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(first), uri])
    assert origin.read_bytes() == first.read_bytes()
    out = tmp_path / "out.raw"
    out.touch()
    run(["nbdcopy", uri, str(out)])
    assert out.read_bytes() == first.read_bytes()
    assert invalidate_json(d, meta) == [[0, 16]]
    # And the other way round, after a new era: nbdcopy in, qemu-img out.
    second = bytearray(first.read_bytes())
    second[5 * MiB:6 * MiB] = pattern(MiB, seed=22)
    (tmp_path / "second.raw").write_bytes(second)
    message(d, "checkpoint")
    with d.control() as c:
        era_now = int(c.status("era").split()[5])
    run(["nbdcopy", str(tmp_path / "second.raw"), uri])
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(tmp_path / "back.raw")])
    assert (tmp_path / "back.raw").read_bytes() == bytes(second)
    assert origin.read_bytes() == bytes(second)
    assert invalidate_json(d, meta, since=era_now) == [[0, 16]]   # nbdcopy rewrote it all


def qemu_io(uri: str, commands: list[str]) -> str:
    cmd = ["qemu-io", "-f", "raw"]
    for c in commands:
        cmd += ["-c", c]
    proc = run([*cmd, uri], timeout=120)
    text = proc.stdout + proc.stderr
    assert not re.search(r"fail|error|mismatch", text, re.IGNORECASE), text
    return text


def test_qemu_io_random_patterns_verify(nbd_daemon, tmp_path: Path) -> None:
    need("qemu-io")
    d = nbd_daemon()
    size = 16 * MiB
    meta, origin = create_era(d, tmp_path, size)
    rng = random.Random(5)
    slots = rng.sample(range(size // ERA_BLOCK_BYTES), 48)
    model = bytearray(size)
    writes, reads = [], []
    for i, slot in enumerate(slots):
        base = slot * ERA_BLOCK_BYTES
        if i % 6 == 5:   # byte-unaligned: qemu does the read-modify-write at 512 bytes
            offset = base + rng.randrange(1, 4000)
            length = rng.randrange(1, 20000)
        else:
            offset = base + rng.randrange(0, 64) * 512
            length = rng.randrange(1, (base + ERA_BLOCK_BYTES - offset) // 512 + 1) * 512
        length = min(length, base + ERA_BLOCK_BYTES - offset)
        value = rng.randrange(1, 256)
        verb = "aio_write" if i % 2 else "write"
        writes.append(f"{verb} -P {value} {offset} {length}")
        reads.append(f"read -P {value} {offset} {length}")
        model[offset:offset + length] = bytes([value]) * length
    untouched = sorted(set(range(size // ERA_BLOCK_BYTES)) - set(slots))[:8]
    reads += [f"read -P 0 {s * ERA_BLOCK_BYTES} {ERA_BLOCK_BYTES}" for s in untouched]
    qemu_io(d.unix_uri("era"), writes + ["aio_flush"])
    qemu_io(d.unix_uri("era"), reads)
    assert origin.read_bytes() == bytes(model)
    recorded = {b for r in invalidate_json(d, meta) for b in range(r[0], r[1])}
    assert recorded == set(slots)


def test_non_loopback_tcp_is_refused_unless_allowed(nbd_daemon, sock_dir: Path) -> None:
    control = sock_dir / "engine.sock"
    proc = subprocess.run(["blockera", "daemon", "--socket", str(control), "--nbd-tcp",
                           "0.0.0.0:0"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "refusing to listen on 0.0.0.0:0" in proc.stderr
    assert "--nbd-allow-remote" in proc.stderr and "Traceback" not in proc.stderr
    assert not control.exists() and not (sock_dir / "engine-nbd.sock").exists()
    need("nbdinfo")
    d = nbd_daemon("--nbd-tcp", "0.0.0.0:0", "--nbd-allow-remote")
    assert d.tcp_address is not None and d.tcp_address[0] == "0.0.0.0"
    with d.control() as c:
        c.create("z", "0 2048 zero")
    info = run(["nbdinfo", "--json", f"nbd://127.0.0.1:{d.tcp_address[1]}/z"]).stdout
    assert json.loads(info)["exports"][0]["export-size"] == 2048 * 512


@pytest.mark.parametrize("args, message", [
    (["--no-nbd", "--nbd-tcp", "10809"], "--no-nbd cannot be combined"),
    (["--nbd-allow-remote"], "--nbd-allow-remote needs --nbd-tcp"),
    (["--nbd-tcp", "not-a-port"], "bad TCP address 'not-a-port'"),
    (["--nbd-tcp", "127.0.0.1:70000"], "bad TCP port 70000"),
    (["--nbd-tcp", "::1:10809"], "in brackets"),
    (["--nbd-socket", ""], "needs --nbd-tcp"),
])
def test_bad_nbd_options_are_usage_errors(sock_dir: Path, args: list[str],
                                          message: str) -> None:
    control = sock_dir / "engine.sock"
    proc = subprocess.run(["blockera", "daemon", "--socket", str(control), *args],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not control.exists()


def test_nbd_socket_choices(nbd_daemon, sock_dir: Path, tmp_path: Path) -> None:
    need("nbdinfo")
    d = nbd_daemon("--no-nbd")
    assert "NBD" not in d.stderr()
    assert not d.nbd_socket.exists()
    assert d.stop() == 0
    other = sock_dir / "elsewhere.sock"
    d = nbd_daemon("--nbd-socket", str(other))
    assert other.exists() and not d.nbd_socket.exists()
    assert f"nbd+unix:///NAME?socket={other}" in d.stderr()
    with d.control() as c:
        c.create("z", "0 1024 zero")
    info = run(["nbdinfo", "--json", f"nbd+unix:///z?socket={other}"]).stdout
    assert json.loads(info)["exports"][0]["export-size"] == 1024 * 512
    assert d.stop() == 0
    assert not other.exists()


def test_a_device_in_use_by_a_client_cannot_be_removed(nbd_daemon, nbd,
                                                       tmp_path: Path) -> None:
    d = nbd_daemon()
    create_era(d, tmp_path, 4 * MiB)
    h = nbd.NBD()
    h.connect_uri(d.unix_uri("era"))
    assert "Open count:        1" in d.dmsetup("info", "era").stdout
    busy = d.dmsetup("remove", "era", check=False)
    assert busy.returncode == 1 and "Device or resource busy" in busy.stderr
    h.shutdown()
    with d.control() as c:
        wait_until(lambda: "Open count:        0" in c.info("era"))
    d.dmsetup("remove", "era")
    assert d.dmsetup("ls").stdout == "No devices found\n"


def test_clean_shutdown_with_clients_connected_commits_the_metadata(
        nbd_daemon, nbd, tmp_path: Path) -> None:
    d = nbd_daemon()
    meta, origin = create_era(d, tmp_path, 8 * MiB)
    b = ERA_BLOCK_BYTES
    writer = nbd.NBD()
    writer.connect_uri(d.unix_uri("era"))
    writer.pwrite(pattern(8192, seed=1), 3 * b)
    writer.pwrite(pattern(4096, seed=2), 50 * b + 4096)       # no flush, no FUA
    idle = nbd.NBD()
    idle.connect_uri(d.unix_uri("era"))
    started = time.monotonic()
    assert d.stop() == 0
    assert time.monotonic() - started < 30
    assert "Traceback" not in d.stderr()
    with pytest.raises(nbd.Error):
        writer.pread(512, 0)
    assert live_recorded(meta) == {3, 50}
    report = check_era_metadata(FileDevice(meta, writable=False))
    assert report.ok, report.lines()
    data = origin.read_bytes()
    assert data[3 * b:3 * b + 8192] == pattern(8192, seed=1)
    assert data[50 * b + 4096:50 * b + 8192] == pattern(4096, seed=2)


def test_a_client_killed_mid_copy_leaves_the_metadata_consistent(nbd_daemon,
                                                                 tmp_path: Path) -> None:
    need("nbdcopy")
    d = nbd_daemon()
    size = 32 * MiB
    meta, origin = create_era(d, tmp_path, size)
    # nbdcopy reads the image from a pipe that is fed only part of it, so it is killed
    # while it has writes in flight and more to come.
    copy = subprocess.Popen(["nbdcopy", "--request-size=65536", "-", d.unix_uri("era")],
                            stdin=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert copy.stdin is not None
    try:
        copy.stdin.write(pattern(12 * MiB, seed=4))
        copy.stdin.flush()
        wait_until(lambda: os.stat(origin).st_blocks > 0)
    finally:
        copy.send_signal(signal.SIGKILL)
        copy.wait(timeout=30)
        try:
            copy.stdin.close()
        except BrokenPipeError:
            pass
    with d.control() as c:
        c.status("era")                          # the daemon carries on
    assert d.stop() == 0
    report = check_era_metadata(FileDevice(meta, writable=False))
    assert report.ok, report.lines()
    written = nonzero_blocks(origin, ERA_BLOCK_BYTES)
    assert written and written <= live_recorded(meta)
    assert d.blockera("era", "check", str(meta)).returncode == 0


def test_out_of_range_requests_through_the_daemon_are_nbd_errors(nbd_daemon, nbd,
                                                                 tmp_path: Path) -> None:
    d = nbd_daemon()
    meta, _ = create_era(d, tmp_path, 4 * MiB)
    h = nbd.NBD()
    h.set_strict_mode(0)
    h.connect_uri(d.unix_uri("era"))
    for call, code in ((lambda: h.pread(4096, 4 * MiB), errno.EINVAL),
                       (lambda: h.pwrite(bytes(4096), 4 * MiB - 512), errno.ENOSPC),
                       (lambda: h.pread(512, 7), errno.EINVAL),
                       (lambda: h.pread(64 * MiB, 0), errno.EOVERFLOW)):
        with pytest.raises(nbd.Error) as info:
            call()
        assert info.value.errnum == code
    h.pwrite(b"\x01" * 512, 0)
    assert h.pread(512, 0) == b"\x01" * 512
    h.shutdown()
    assert invalidate_json(d, meta) == [[0, 1]]
