"""Helpers for the backup job tests: the `blockera` command run against one repository (made
with cheap scrypt parameters), image files with random, zero and compressible regions, and
the era and snapshot-origin stacks of the userspace engine that produce change lists."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

from .helpers import PASSWORD, compressible_bytes, new_repo

KiB = 1 << 10
MiB = 1 << 20


def make_repo(path: Path, **options: object) -> Path:
    new_repo(path, **options).close()
    return path


class Cli:
    """`blockera ...` (the real entry point, in a subprocess) with the repository, password
    and source-lock directory in its environment."""

    def __init__(self, repo: Path, lock_dir: Path, password: str = PASSWORD) -> None:
        self.repo = repo
        self.env = {**os.environ, "BLOCKERA_REPOSITORY": str(repo),
                    "BLOCKERA_PASSWORD": password, "BLOCKERA_LOCK_DIR": str(lock_dir)}
        self.env.pop("BLOCKERA_PASSWORD_FILE", None)

    def run(self, *args: str, check: bool = True, input: bytes | None = None,
            cwd: Path | None = None, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
        r = subprocess.run([sys.executable, "-m", "blockera", *args], capture_output=True,
                           input=input, env={**self.env, **(env or {})}, cwd=cwd,
                           timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"blockera {' '.join(args)} exited {r.returncode}:\n"
                                 f"{r.stderr.decode(errors='replace')}")
        return r

    def json(self, *args: str, **kwargs: object) -> object:
        return json.loads(self.run(*args, "--json", **kwargs).stdout)  # type: ignore[arg-type]

    def backup(self, source: Path | str, *args: str) -> dict:
        return self.json("backup", str(source), *args)  # type: ignore[return-value]


def image_bytes(size: int, seed: int) -> bytes:
    """Random, zero and text-like regions of 64 KiB to 1 MiB each."""
    rnd = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        n = rnd.choice((64 * KiB, 192 * KiB, 512 * KiB, MiB))
        kind = rnd.random()
        if kind < 0.3:
            out += bytes(n)
        elif kind < 0.6:
            out += compressible_bytes(n, rnd.randrange(1 << 30))
        else:
            out += rnd.randbytes(n)
    return bytes(out[:size])


def write_image(path: Path, size: int, seed: int) -> bytes:
    data = image_bytes(size, seed)
    path.write_bytes(data)
    return data


def overwrite(path: Path, writes: list[tuple[int, int]], seed: int) -> list[tuple[int, int]]:
    """Random bytes at each (offset, length); returns the byte ranges written."""
    rnd = random.Random(seed)
    with open(path, "r+b") as f:
        for offset, length in writes:
            f.seek(offset)
            f.write(rnd.randbytes(length))
    return [(o, o + n) for o, n in writes]


def snapshot_image(repo_path: Path, ref: str = "latest", password: str = PASSWORD) -> bytes:
    """A snapshot's image, read in this process (the Python API, not the command)."""
    import io

    from blockera.backup import LocalBackend, Repository
    from blockera.backup.device_layout import DeviceFacts, content_layout, find_file_node
    from blockera.backup.restore import dump_to_stream

    repo = Repository.open(LocalBackend(repo_path), password)
    try:
        snapshot = repo.find_snapshot(ref)
        _, node = find_file_node(repo, snapshot)
        layout = content_layout(repo, node, DeviceFacts.from_tags(snapshot.tags), "test")
        out = io.BytesIO()
        dump_to_stream(repo, layout, out)
        return out.getvalue()
    finally:
        repo.close()
