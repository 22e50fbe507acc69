"""Shared fixtures: scratch image files and access to the real thin-provisioning-tools."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ERA_TOOLS = ("era_dump", "era_invalidate", "era_check", "era_restore")


def have_era_tools() -> bool:
    return all(shutil.which(t) for t in ERA_TOOLS)


@pytest.fixture
def era_tools() -> "EraTools":
    if not have_era_tools():
        pytest.skip("thin-provisioning-tools (era_dump & co.) not installed: "
                    "apt-get install thin-provisioning-tools")
    return EraTools()


class EraTools:
    """Runs the real 0.9.0 era tools."""

    def run(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(list(args), capture_output=True, check=check, timeout=600)

    def restore(self, xml: Path, image: Path) -> None:
        self.run("era_restore", "-i", str(xml), "-o", str(image), check=True)

    def dump(self, image: Path, *flags: str) -> bytes:
        return self.run("era_dump", *flags, str(image), check=True).stdout

    def invalidate(self, image: Path, since: int, *flags: str) -> bytes:
        return self.run("era_invalidate", "--written-since", str(since), *flags,
                        str(image), check=True).stdout

    def check(self, image: Path) -> int:
        return self.run("era_check", "-q", str(image)).returncode


def sparse_file(path: Path, size_bytes: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size_bytes)
    return path


class DaemonProcess:
    """A `blockera daemon` subprocess; `run()` calls blockera commands against it."""

    def __init__(self, socket_path: Path) -> None:
        import os
        import time

        self.socket_path = socket_path
        self.env = {**os.environ, "BLOCKERA_SOCKET": str(socket_path)}
        self.proc = subprocess.Popen(["blockera", "daemon", "--socket", str(socket_path)],
                                     env=self.env, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while not socket_path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daemon did not start: {self.proc.stderr.read()!r}")
            time.sleep(0.05)

    def run(self, *args: str, input: str | bytes | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
        text = not isinstance(input, bytes)
        r = subprocess.run(["blockera", *args], env=self.env, capture_output=True,
                           input=input, text=text, timeout=300)
        if check and r.returncode != 0:
            raise AssertionError(f"blockera {' '.join(args)} failed ({r.returncode}): "
                                 f"{r.stderr}")
        return r

    def stop(self) -> int:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=60)
        return self.proc.returncode


@pytest.fixture
def daemon(tmp_path: Path):
    d = DaemonProcess(tmp_path / "engine.sock")
    yield d
    d.stop()
