"""Shared helpers for the snapshot store tests: an independent struct-based parser written from
the spec (docs/snapshot.md §1, §2), chunk payloads that identify their exception, and a
runner for the `cow` command group."""

from __future__ import annotations

import struct
import subprocess
import sys

import numpy as np

from blockera.blockdev import BlockDevice
from blockera.snapshot.store import ExceptionStore

def run_cow(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """`blockera cow ARGS` through the real entry point's error handling."""
    return subprocess.run([sys.executable, "-m", "blockera", "cow", *args], capture_output=True,
                          timeout=120, input=stdin)


def spec_parse(image: bytes | bytearray) -> tuple[tuple[int, int, int, int],
                                                   list[tuple[int, int]]]:
    """Header fields and records, walking areas at 1 + a*(EPA+1) until a terminator."""
    magic, valid, version, cs = struct.unpack_from("<IIII", image, 0)
    cb = cs * 512
    epa = cb // 16
    records = []
    area = 0
    while True:
        base = (1 + area * (epa + 1)) * cb
        if base + cb > len(image):
            raise ValueError(f"area {area} beyond the end")
        for i in range(epa):
            old, new = struct.unpack_from("<QQ", image, base + 16 * i)
            if new == 0:
                return (magic, valid, version, cs), records
            records.append((old, new))
        area += 1


def payload(old: int, new: int, chunk_bytes: int) -> bytes:
    """Chunk contents naming their exception (16-byte tag repeated)."""
    return struct.pack("<QQ", old, new) * (chunk_bytes // 16)


def add_exceptions(store: ExceptionStore, olds: list[int], batch: int = 1,
                   data: bool = True) -> list[tuple[int, int]]:
    """Allocate, write identifying data, commit; `batch` exceptions per commit."""
    done = []
    for start in range(0, len(olds), batch):
        pairs = []
        for old in olds[start: start + batch]:
            new = store.allocate()
            if data:
                store.cow.write(store.cow_offset_bytes(new), payload(old, new, store.chunk_bytes))
            pairs.append((old, new))
        store.commit(pairs)
        done.extend(pairs)
    return done


def chunk_tags(image: bytes | bytearray, chunk_bytes: int, chunks: np.ndarray) -> np.ndarray:
    """For each chunk index, whether it holds payload(old, new) for its own pair: returns the
    (old, new) tag of the first 16 bytes and whether the whole chunk repeats it."""
    words = np.frombuffer(bytes(image), dtype="<u8")
    per_chunk = chunk_bytes // 8
    usable = len(words) // per_chunk
    rows = words[: usable * per_chunk].reshape(usable, per_chunk)[chunks.astype(np.int64)]
    first = rows[:, :2]
    uniform = (rows.reshape(len(chunks), per_chunk // 2, 2) == first[:, None, :]).all(axis=(1, 2))
    return np.column_stack([first, uniform.astype(np.uint64)])


def read_all(dev: BlockDevice) -> bytes:
    return dev.read(0, dev.size_bytes)
