"""Helpers for exporting device-mapper engine devices in tests: scratch images, the blocks an
era device has recorded, and `blockera daemon` as a subprocess with its NBD export."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np

from blockera.blockdev import FileDevice
from blockera.engine.client import EngineClient
from blockera.engine.userspace import Engine
from blockera.era.image import EraImage

MiB = 1 << 20


def image(path: Path, size_bytes: int) -> Path:
    """A sparse (all-zero) image file."""
    with open(path, "wb") as f:
        f.truncate(size_bytes)
    return path


def recorded_blocks(engine: Engine, name: str, meta: Path, since: int = 1) -> set[int]:
    """Era blocks the era device `name` (metadata in `meta`) has recorded as written in era
    `since` or later, read from a metadata snapshot as a backup tool would."""
    engine.message(name, 0, ["take_metadata_snap"])
    try:
        dev = FileDevice(meta, writable=False)
        try:
            mask = EraImage(dev, use_snapshot=True).changed_since(since)
        finally:
            dev.close()
    finally:
        engine.message(name, 0, ["drop_metadata_snap"])
    return set(np.flatnonzero(mask).tolist())


def nonzero_blocks(path: Path, block_bytes: int) -> set[int]:
    """Blocks of a file that hold anything but zeros."""
    data = np.fromfile(path, dtype=np.uint8)
    blocks = data[: len(data) // block_bytes * block_bytes].reshape(-1, block_bytes)
    return set(np.flatnonzero(blocks.any(axis=1)).tolist())


_TCP_RE = re.compile(r"nbd://(\[[^\]]+\]|[^/:]+):(\d+)/")


class NbdDaemon:
    """`blockera daemon` in a subprocess; its control socket and NBD socket live in `sock_dir`
    (short paths), its standard error goes to a file (shown when something fails)."""

    def __init__(self, sock_dir: Path, *args: str) -> None:
        self.control_socket = sock_dir / "engine.sock"
        self.nbd_socket = sock_dir / "engine-nbd.sock"
        self.env = {**os.environ, "BLOCKERA_SOCKET": str(self.control_socket)}
        self.stderr_path = sock_dir / "daemon.err"
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                ["blockera", "daemon", "--socket", str(self.control_socket), *args],
                env=self.env, stderr=err)
        self.tcp_address: tuple[str, int] | None = None
        deadline = time.monotonic() + 30
        while "control socket" not in self.stderr():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"daemon did not start: {self.stderr()}")
            time.sleep(0.02)
        match = _TCP_RE.search(self.stderr())
        if match:
            self.tcp_address = (match.group(1).strip("[]"), int(match.group(2)))

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def blockera(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["blockera", *args], env=self.env, capture_output=True,
                              text=True, timeout=120)
        if check:
            assert proc.returncode == 0, (f"blockera {' '.join(args)} exited with "
                                          f"{proc.returncode}: {proc.stderr}")
        return proc

    def dmsetup(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.blockera("dmsetup", *args, check=check)

    def control(self) -> EngineClient:
        """A client of the control socket (quicker than a `blockera dmsetup` process)."""
        return EngineClient(self.control_socket)

    def unix_uri(self, name: str) -> str:
        return f"nbd+unix:///{name}?socket={self.nbd_socket}"

    def tcp_uri(self, name: str) -> str:
        assert self.tcp_address is not None, "the daemon was not started with --nbd-tcp"
        host, port = self.tcp_address
        return f"nbd://{host}:{port}/{name}"

    def stop(self, timeout_s: float = 60) -> int:
        """SIGTERM, then wait; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
                raise AssertionError(f"daemon did not stop within {timeout_s} s: "
                                     f"{self.stderr()}") from None
        return self.proc.returncode
