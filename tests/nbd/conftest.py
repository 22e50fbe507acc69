"""Fixtures for the NBD server tests: servers over memory or file devices, short socket
paths, real NBD clients (qemu-img, qemu-io, the libnbd tools and Python bindings), the
device-mapper engine's export in-process and `blockera daemon` as a subprocess.

Client tools missing from the machine make their tests skip, naming the Debian package to
install; with BLOCKERA_REQUIRE_NBD_CLIENTS=1 (CI, where they are installed) a missing client
fails instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from blockera.blockdev import MemoryDevice
from blockera.nbd import NbdServer, serve

from .libnbd import load_libnbd

REQUIRE_ENV = "BLOCKERA_REQUIRE_NBD_CLIENTS"

PACKAGES = {
    "qemu-img": "qemu-utils", "qemu-io": "qemu-utils", "qemu-nbd": "qemu-utils",
    "nbdinfo": "libnbd-bin", "nbdcopy": "libnbd-bin", "nbdfuse": "libnbd-bin",
    "nbdsh": "libnbd-bin", "fusermount3": "fuse3", "fio": "fio",
    "mkfs.ext4": "e2fsprogs", "fsck.ext4": "e2fsprogs", "debugfs": "e2fsprogs",
    "losetup": "mount", "mount": "mount", "umount": "mount",
}


def missing(reason: str) -> None:
    """Skip (or, when clients are required, fail) because something is not installed."""
    if os.environ.get(REQUIRE_ENV, "") not in ("", "0"):
        pytest.fail(f"{reason} (and {REQUIRE_ENV} is set)")
    pytest.skip(reason)


def need(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            missing(f"{tool} not installed: apt-get install {PACKAGES.get(tool, tool)}")


def require_fuse_and_loop() -> None:
    """nbdfuse, a loop device, ext4 tools and root, for mounting an export."""
    need("nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "fsck.ext4", "debugfs", "mount",
         "umount")
    if os.geteuid() != 0:
        missing("loop devices and mounts need root")
    if not os.path.exists("/dev/fuse"):
        missing("/dev/fuse is not available (FUSE kernel module)")
    if not os.path.exists("/dev/loop-control"):
        missing("/dev/loop-control is not available (loop kernel module)")


def run(cmd: list[str], *, timeout: float = 60, check: bool = True,
        input: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """Run a client; on failure the assertion shows its output."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          input=input.decode() if input is not None else None)
    if check:
        assert proc.returncode == 0, (f"{' '.join(cmd)} exited with {proc.returncode}\n"
                                      f"stdout: {proc.stdout}\nstderr: {proc.stderr}")
    return proc


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short private directory (unix socket paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="nbdt"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def start_server(sock_dir: Path) -> Iterator[Callable[..., NbdServer]]:
    """start_server(exports, **options): a running server on a fresh unix socket (and TCP on
    a free loopback port with tcp=True); every server is shut down at the end of the test and
    must stop cleanly."""
    servers: list[NbdServer] = []
    counter = iter(range(1000))

    def start(exports: Any, *, tcp: bool = False, unix: bool = True,
              **options: Any) -> NbdServer:
        unix_path = sock_dir / f"s{next(counter)}.sock" if unix else None
        server = serve(exports, unix_path=unix_path, tcp=("127.0.0.1", 0) if tcp else None,
                       **options)
        servers.append(server)
        return server

    yield start
    for server in servers:
        assert server.shutdown(timeout_s=20), "server did not stop cleanly"


def unix_uri(server: NbdServer, name: str = "disk") -> str:
    return f"nbd+unix:///{name}?socket={server.unix_path}"


def tcp_uri(server: NbdServer, name: str = "disk") -> str:
    assert server.tcp_address is not None
    host, port = server.tcp_address
    return f"nbd://{host}:{port}/{name}"


@pytest.fixture(scope="session")
def nbd() -> Any:
    """The libnbd Python bindings (python3-libnbd)."""
    module, reason = load_libnbd()
    if module is None:
        missing(reason)
    return module


def pattern(size_bytes: int, seed: int = 1) -> bytes:
    """Deterministic, incompressible test data."""
    import random
    return random.Random(seed).randbytes(size_bytes)


class RecordingDevice(MemoryDevice):
    """A memory device that records every call the server makes (kind, offset, length)."""

    def __init__(self, size_bytes: int, **kwargs: Any) -> None:
        super().__init__(size_bytes, **kwargs)
        self.calls: list[tuple[str, int, int]] = []
        self._calls_lock = threading.Lock()

    def _record(self, kind: str, offset_bytes: int = 0, length_bytes: int = 0) -> None:
        with self._calls_lock:
            self.calls.append((kind, offset_bytes, length_bytes))

    def read(self, offset_bytes: int, length_bytes: int) -> bytes:
        self._record("read", offset_bytes, length_bytes)
        return super().read(offset_bytes, length_bytes)

    def write(self, offset_bytes: int, data: Any) -> None:
        self._record("write", offset_bytes, len(data))
        super().write(offset_bytes, data)

    def flush(self) -> None:
        self._record("flush")

    def discard(self, offset_bytes: int, length_bytes: int) -> None:
        self._record("discard", offset_bytes, length_bytes)
        self._zero(offset_bytes, length_bytes)

    def write_zeroes(self, offset_bytes: int, length_bytes: int) -> None:
        self._record("write_zeroes", offset_bytes, length_bytes)
        self._zero(offset_bytes, length_bytes)

    def _zero(self, offset_bytes: int, length_bytes: int) -> None:
        self.check_range(offset_bytes, length_bytes)
        with self._lock:
            self.data[offset_bytes:offset_bytes + length_bytes] = bytes(length_bytes)

    def kinds(self) -> list[str]:
        with self._calls_lock:
            return [c[0] for c in self.calls]


def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


@pytest.fixture
def engine_export(sock_dir: Path) -> Iterator[tuple[Any, NbdServer]]:
    """(an in-process device-mapper engine, an NBD server exporting its devices by name);
    the server stops, then the engine shuts down (suspending every device), as the daemon
    does."""
    from blockera.engine.userspace import Engine
    from blockera.nbd.engine_devices import EngineExports

    engine = Engine()
    server = serve(EngineExports(engine), unix_path=sock_dir / "engine-nbd.sock")
    try:
        yield engine, server
    finally:
        assert server.shutdown(timeout_s=20), "server did not stop cleanly"
        engine.shutdown()


@pytest.fixture
def nbd_daemon(sock_dir: Path) -> Iterator[Callable[..., Any]]:
    """nbd_daemon(*options): a running `blockera daemon` (see engineenv.NbdDaemon); each one
    started is stopped at the end of the test and must exit cleanly."""
    from .engineenv import NbdDaemon

    daemons: list[NbdDaemon] = []

    def start(*args: str) -> NbdDaemon:
        daemon = NbdDaemon(sock_dir, *args)
        daemons.append(daemon)
        return daemon

    yield start
    for daemon in daemons:
        status = daemon.stop()
        assert status == 0, f"daemon exited with {status}: {daemon.stderr()}"


def wait_all(h: Any, cookies: list[int], timeout_s: float = 30) -> None:
    """Poll until every command has completed (each is retired exactly once)."""
    deadline = time.monotonic() + timeout_s
    pending = set(cookies)
    while pending:
        assert time.monotonic() < deadline, f"{len(pending)} commands never completed"
        h.poll(1000)
        pending = {c for c in pending if not h.aio_command_completed(c)}


class GatedDevice(MemoryDevice):
    """Reads at offset 0 wait for `gate`."""

    def __init__(self, size_bytes: int) -> None:
        super().__init__(size_bytes)
        self.gate = threading.Event()
        self.waiting = threading.Event()

    def read(self, offset_bytes: int, length_bytes: int) -> bytes:
        if offset_bytes == 0:
            self.waiting.set()
            assert self.gate.wait(20)
        return super().read(offset_bytes, length_bytes)


def stop_nbdfuse(mountpoint: Path, proc: subprocess.Popen[bytes]) -> None:
    """Unmount an nbdfuse mount and wait for (or kill) its process."""
    subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True, timeout=30)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
