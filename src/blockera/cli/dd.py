"""`blockera dd`: dd's operands, for copying to and from engine devices (`/dev/mapper/NAME`,
reached through the engine daemon) as well as files and /dev/zero or /dev/urandom, so scripts
written for the kernel run with `dd` replaced by `blockera dd`. See docs/engine.md §1."""

from __future__ import annotations

import errno
import os
import re
import sys
import time
from typing import TYPE_CHECKING, BinaryIO

import click

from blockera.errors import DeviceError, UsageError

if TYPE_CHECKING:
    from blockera.engine.client import EngineClient

MAPPER = "/dev/mapper/"
OPERANDS = ("if", "of", "bs", "ibs", "obs", "count", "skip", "seek", "conv", "oflag", "iflag",
            "status")
# The values this dd implements; anything else is refused, as GNU dd does.
SYMBOLS = {
    "conv": {"notrunc", "fsync", "fdatasync", "nocreat", "excl"},
    "iflag": {"fullblock"},
    "oflag": {"direct", "dsync", "sync"},
    "status": {"none", "noxfer", "progress"},
}


def _symbols(ops: dict[str, str], key: str) -> set[str]:
    values = set(filter(None, ops.get(key, "").split(",")))
    unknown = sorted(values - SYMBOLS[key])
    if unknown:
        raise UsageError(f"dd: invalid {key} value {unknown[0]!r} (supported: "
                         f"{', '.join(sorted(SYMBOLS[key]))})")
    if key == "status" and len(values) > 1:
        raise UsageError("dd: status takes one value")
    return values


def _open_failed(path: str, exc: OSError, doing: str) -> DeviceError:
    return DeviceError(f"dd: failed to open {path!r} for {doing}: {exc.strerror}",
                       errno_name=errno.errorcode.get(exc.errno or 0, "EIO"))
_MULT = {"": 1, "c": 1, "w": 2, "b": 512, "k": 1024, "K": 1024, "M": 1 << 20, "G": 1 << 30,
         "T": 1 << 40, "kB": 1000, "KB": 1000, "MB": 10**6, "GB": 10**9, "TB": 10**12}


def _number(text: str, what: str) -> int:
    match = re.fullmatch(r"(\d+)([A-Za-z]*)", text)
    if not match or match.group(2) not in _MULT:
        raise UsageError(f"dd: invalid number for {what}: {text!r}")
    return int(match.group(1)) * _MULT[match.group(2)]


class _Source:
    def __init__(self, path: str | None, client: "EngineClient | None",
                 skip_bytes: int) -> None:
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
            try:
                self.file = open(path, "rb")
                self.file.seek(skip_bytes)
            except OSError as exc:
                raise _open_failed(path, exc, "reading") from None

    def read(self, n: int, fullblock: bool = False) -> bytes:
        data = self._read(n)
        while fullblock and data and len(data) < n:
            more = self._read(n - len(data))
            if not more:
                break
            data += more
        return data

    def _read(self, n: int) -> bytes:
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

    conv=notrunc,fsync,fdatasync,nocreat,excl; iflag=fullblock; oflag=direct,dsync,sync
    (flush to an engine device: after the copy for direct, after each block for dsync/sync);
    status=none,noxfer,progress. Other values are refused.

    \b
    Example:
      blockera dd if=/dev/urandom of=/dev/mapper/era bs=1M seek=60 count=40
    """
    ops: dict[str, str] = {}
    for operand in operands:
        key, sep, value = operand.partition("=")
        if not sep or key not in OPERANDS:
            raise UsageError(f"dd: unrecognized operand {operand!r}")
        ops[key] = value
    conv = _symbols(ops, "conv")
    iflag = _symbols(ops, "iflag")
    oflag = _symbols(ops, "oflag")
    status = _symbols(ops, "status")
    bs = _number(ops.get("bs", ops.get("obs", ops.get("ibs", "512"))), "bs")
    if bs <= 0:
        raise UsageError("dd: bs must be positive")
    count = _number(ops["count"], "count") if "count" in ops else None
    skip = _number(ops.get("skip", "0"), "skip") * bs
    seek = _number(ops.get("seek", "0"), "seek") * bs
    src_path, dst_path = ops.get("if"), ops.get("of")
    needs_engine = any(p and p.startswith(MAPPER) for p in (src_path, dst_path))
    from blockera.engine.client import EngineClient   # imported when dd runs, not for every
    from blockera.progress import progress            # blockera command

    client = EngineClient(socket_path) if needs_engine else None
    source = _Source(src_path, client, skip)
    out: BinaryIO | None = None
    dst_name = None
    if dst_path and dst_path.startswith(MAPPER):
        dst_name = dst_path[len(MAPPER):]
    elif dst_path in (None, "-"):
        out = sys.stdout.buffer
    else:
        flags = os.O_WRONLY
        flags |= 0 if "nocreat" in conv else os.O_CREAT
        flags |= os.O_EXCL if "excl" in conv else 0
        try:
            fd = os.open(dst_path, flags, 0o644)
            if "notrunc" not in conv and os.path.isfile(dst_path):
                os.ftruncate(fd, seek)
        except OSError as exc:
            raise _open_failed(dst_path, exc, "writing") from None
        out = os.fdopen(fd, "wb")
        out.seek(seek)
    started = time.monotonic()
    records = copied = 0
    partial = 0
    total = None if count is None else count * bs
    sync_each = bool(oflag & {"dsync", "sync"})
    with progress(total, "dd", force="progress" in status) as bar:
        while count is None or records + partial < count:
            data = source.read(bs, fullblock="fullblock" in iflag)
            if not data:
                break
            try:
                if dst_name is not None:
                    assert client is not None
                    client.write(dst_name, seek + copied, data)
                    if sync_each:
                        client.flush(dst_name)
                else:
                    assert out is not None
                    out.write(data)
                    if sync_each and out is not sys.stdout.buffer:
                        out.flush()
                        os.fdatasync(out.fileno())
            except OSError as exc:
                raise DeviceError(f"dd: error writing {dst_path or 'standard output'!r}: "
                                  f"{exc.strerror}") from None
            copied += len(data)
            bar.update(len(data))
            if len(data) == bs:
                records += 1
            else:
                partial += 1
    if dst_name is not None and (conv & {"fsync", "fdatasync"} or "direct" in oflag):
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
    if "none" not in status:
        elapsed = max(time.monotonic() - started, 1e-9)
        click.echo(f"{records}+{partial} records in\n{records}+{partial} records out", err=True)
        if "noxfer" not in status:
            click.echo(f"{copied} bytes copied, {elapsed:.3g} s, "
                       f"{copied / elapsed / 1e6:.3g} MB/s", err=True)
