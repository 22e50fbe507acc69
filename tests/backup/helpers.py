"""Helpers for the backup repository tests: repositories in temporary directories (with cheap
scrypt parameters: restic reads N, r, p from each key file, so it opens them too), sample
block images, and a runner for the real `restic` binary.

Tests that need restic skip when it is not installed; with BLOCKERA_REQUIRE_RESTIC=1 (CI,
where it is installed) they fail instead.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from blockera.backup import KdfParams, LocalBackend, Repository

REQUIRE_ENV = "BLOCKERA_REQUIRE_RESTIC"
PASSWORD = "correct horse battery staple"
FAST_KDF = KdfParams(n=1024, r=8, p=1)
"""Tests only: production keys use restic's calibrated parameters."""
MiB = 1 << 20


def compressible_bytes(size: int, seed: int) -> bytes:
    """Text-like data that zstd shrinks to about a third."""
    rnd = random.Random(seed)
    words = [bytes(rnd.choice(b"abcdefghijklmnop") for _ in range(rnd.randint(2, 9)))
             for _ in range(700)]
    out = bytearray()
    while len(out) < size:
        out += b" ".join(rnd.choice(words) for _ in range(1000)) + b"\n"
    return bytes(out[:size])


def random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def image_chunks(seed: int = 1, chunk_bytes: int = MiB) -> list[bytes]:
    """A small disk image as fixed-size chunks: compressible, zero and random ones."""
    return [compressible_bytes(chunk_bytes, seed), bytes(chunk_bytes),
            random_bytes(chunk_bytes, seed + 1), compressible_bytes(chunk_bytes, seed + 2),
            bytes(chunk_bytes), random_bytes(chunk_bytes, seed + 3)]


def new_repo(path: Path, **options: object) -> Repository:
    return Repository.init(LocalBackend(path), PASSWORD, kdf_params=FAST_KDF, **options)


def tree_listing(root: Path) -> dict[str, int]:
    """Every file under `root` with its size (to show that nothing was written)."""
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*"))
            if p.is_file()}


class Restic:
    """Runs the real restic against one repository."""

    def __init__(self, repo: Path, password: str = PASSWORD) -> None:
        self.repo = repo
        self.password = password

    def env(self, password: str | None = None) -> dict[str, str]:
        return {**os.environ, "RESTIC_PASSWORD": password or self.password,
                "RESTIC_REPOSITORY": str(self.repo)}

    def run(self, *args: str, check: bool = True, password: str | None = None,
            input: bytes | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        r = subprocess.run(["restic", "--no-cache", *args], env=self.env(password),
                           capture_output=True, input=input, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"restic {' '.join(args)} failed ({r.returncode}):\n"
                                 f"{r.stderr.decode(errors='replace')}")
        return r

    def popen(self, *args: str, **kwargs: object) -> subprocess.Popen:
        return subprocess.Popen(["restic", "--no-cache", *args], env=self.env(),
                                **kwargs)  # type: ignore[call-overload]


def need_restic() -> None:
    if shutil.which("restic") is None:
        reason = "restic not installed: apt-get install restic"
        if os.environ.get(REQUIRE_ENV, "") not in ("", "0"):
            pytest.fail(f"{reason} (and {REQUIRE_ENV} is set)")
        pytest.skip(reason)


LOCK_HOLDER = """
import signal, sys
from blockera.backup import LocalBackend, Repository
repo = Repository.open(LocalBackend(sys.argv[1]), sys.argv[2])
with repo.lock(recheck_delay_s=0.01) as lock:
    print("locked", lock.name, flush=True)
    sys.stdin.readline()
print("released", signal.getsignal(signal.SIGHUP) == signal.SIG_DFL, flush=True)
repo.close()
"""


def start_lock_holder(root: Path) -> subprocess.Popen:
    """Another process holding a non-exclusive blockera lock until a line arrives on its
    standard input. Its first output line is `locked <lock name>`."""
    import blockera
    src = str(Path(blockera.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(root), PASSWORD],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, text=True)
