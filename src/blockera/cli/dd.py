"""`blockera dd`: dd's operands, for copying to and from engine devices (`/dev/mapper/NAME`,
reached through the engine daemon) as well as files and /dev/zero or /dev/urandom, so scripts
written for the kernel run with `dd` replaced by `blockera dd`."""

from __future__ import annotations

import os
import re
import sys
import time
from typing import BinaryIO

import click

from blockera.dm.client import EngineClient
from blockera.errors import UsageError

MAPPER = "/dev/mapper/"
_MULT = {"": 1, "c": 1, "w": 2, "b": 512, "k": 1024, "K": 1024, "M": 1 << 20, "G": 1 << 30,
         "T": 1 << 40, "kB": 1000, "KB": 1000, "MB": 10**6, "GB": 10**9, "TB": 10**12}


def _number(text: str, what: str) -> int:
    match = re.fullmatch(r"(\d+)([A-Za-z]*)", text)
    if not match or match.group(2) not in _MULT:
        raise UsageError(f"dd: invalid number for {what}: {text!r}")
    return int(match.group(1)) * _MULT[match.group(2)]


class _Source:
    def __init__(self, path: str | None, client: EngineClient | None, skip_bytes: int) -> None:
        self.path = path
        self.client = client
        self.offset = skip_bytes
        self.file: BinaryIO | None = None
        if path in (None, "-"):
            self.file = sys.stdin.buffer
        elif path == "/dev/zero" or path == "/dev/urandom":
            pass
        elif path.startswith(MAPPER):
            assert client is not None
            self.size = client.size_bytes(path[len(MAPPER):])
        else:
            self.file = open(path, "rb")
            self.file.seek(skip_bytes)

    def read(self, n: int) -> bytes:
        if self.path == "/dev/zero":
            return bytes(n)
        if self.path == "/dev/urandom":
            return os.urandom(n)
        if self.path and self.path.startswith(MAPPER):
            assert self.client is not None
            n = max(0, min(n, self.size - self.offset))
            data = self.client.read(self.path[len(MAPPER):], self.offset, n) if n else b""
            self.offset += len(data)
            return data
        assert self.file is not None
        return self.file.read(n)


@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("operands", nargs=-1)
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False),
              help="Engine daemon socket, for /dev/mapper/NAME operands.")
def dd(operands: tuple[str, ...], socket_path: str | None) -> None:
    """Copy data like dd: if=, of=, bs=, count=, skip=, seek=, conv=, oflag=, iflag=, status=.

    \b
    Example (seed 000):
      blockera dd if=/dev/urandom of=/dev/mapper/era bs=1M seek=60 count=40
    """
    ops: dict[str, str] = {}
    for operand in operands:
        key, sep, value = operand.partition("=")
        if not sep or key not in ("if", "of", "bs", "ibs", "obs", "count", "skip", "seek", "conv",
                                  "oflag", "iflag", "status"):
            raise UsageError(f"dd: unrecognized operand {operand!r}")
        ops[key] = value
    bs = _number(ops.get("bs", ops.get("obs", ops.get("ibs", "512"))), "bs")
    if bs <= 0:
        raise UsageError("dd: bs must be positive")
    count = _number(ops["count"], "count") if "count" in ops else None
    skip = _number(ops.get("skip", "0"), "skip") * bs
    seek = _number(ops.get("seek", "0"), "seek") * bs
    conv = set(filter(None, ops.get("conv", "").split(",")))
    src_path, dst_path = ops.get("if"), ops.get("of")
    needs_engine = any(p and p.startswith(MAPPER) for p in (src_path, dst_path))
    client = EngineClient(socket_path) if needs_engine else None
    source = _Source(src_path, client, skip)
    out: BinaryIO | None = None
    dst_name = None
    if dst_path and dst_path.startswith(MAPPER):
        dst_name = dst_path[len(MAPPER):]
    elif dst_path in (None, "-"):
        out = sys.stdout.buffer
    else:
        flags = os.O_WRONLY | os.O_CREAT
        fd = os.open(dst_path, flags, 0o644)
        if "notrunc" not in conv and os.path.isfile(dst_path):
            os.ftruncate(fd, seek)
        out = os.fdopen(fd, "wb")
        out.seek(seek)
    started = time.monotonic()
    records = copied = 0
    partial = 0
    while count is None or records + partial < count:
        data = source.read(bs)
        if not data:
            break
        if dst_name is not None:
            assert client is not None
            client.write(dst_name, seek + copied, data)
        else:
            assert out is not None
            out.write(data)
        copied += len(data)
        if len(data) == bs:
            records += 1
        else:
            partial += 1
    if dst_name is not None and conv & {"fsync", "fdatasync"} or (
            dst_name is not None and "direct" in ops.get("oflag", "")):
        assert client is not None
        client.flush(dst_name)
    if out is not None:
        out.flush()
        if conv & {"fsync", "fdatasync"} and out is not sys.stdout.buffer:
            os.fsync(out.fileno())
        if out is not sys.stdout.buffer:
            out.close()
    if client is not None:
        client.close()
    if ops.get("status") != "none":
        elapsed = max(time.monotonic() - started, 1e-9)
        click.echo(f"{records}+{partial} records in\n{records}+{partial} records out", err=True)
        if ops.get("status") != "noxfer":
            click.echo(f"{copied} bytes copied, {elapsed:.3g} s, "
                       f"{copied / elapsed / 1e6:.3g} MB/s", err=True)
