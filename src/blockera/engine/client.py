"""A client of the engine daemon with the same operations as `Engine`, plus device I/O.
See docs/engine.md §2."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

from blockera.blockdev import BlockDevice, FileDevice

from blockera.engine.protocol import MAX_IO_BYTES, Reader, default_socket_path, raise_reply, send_message
from blockera.errors import DeviceError

MAPPER_PREFIX = "/dev/mapper/"


class EngineClient:
    """`resume_if_gone`: the daemon resumes any device this client suspended and had not
    resumed when the connection ends (the client was killed between its suspend and its
    resume); a job that swaps tables under a device in use asks for it."""

    def __init__(self, socket_path: str | Path | None = None, timeout_s: float | None = None,
                 *, resume_if_gone: bool = False) -> None:
        self.resume_if_gone = resume_if_gone
        self.socket_path = Path(socket_path) if socket_path else default_socket_path()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if timeout_s is not None:
            self.sock.settimeout(timeout_s)
        try:
            self.sock.connect(str(self.socket_path))
        except OSError as exc:
            self.sock.close()
            raise DeviceError(f"cannot reach the engine daemon at {self.socket_path}: "
                              f"{exc.strerror or exc}; start it with 'blockera daemon' or point "
                              "--socket / BLOCKERA_SOCKET at it") from None
        self.reader = Reader(self.sock)
        self.lock = threading.Lock()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "EngineClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, op: str, payload: bytes | memoryview = b"", **args: object) -> tuple[object, bytes]:
        with self.lock:
            try:
                send_message(self.sock, {"op": op, **args}, payload)
                reply = self.reader.message()
            except OSError as exc:
                raise DeviceError(f"lost the connection to the engine daemon: {exc}") from None
            if reply is None:
                raise DeviceError("the engine daemon closed the connection")
            if not reply.get("ok"):
                raise_reply(reply)
            data = b""
            if op == "read":
                data = self.reader.payload(int(reply["result"]))
            return reply.get("result"), data

    # -- control (same signatures as Engine) ---------------------------------------------------
    def create(self, name: str, table: str | None = None, *, uuid: str = "",
               read_only: bool = False) -> None:
        self.call("create", name=name, table=table, uuid=uuid, read_only=read_only,
                  cwd=os.getcwd())

    def load(self, name: str, table: str) -> None:
        self.call("load", name=name, table=table, cwd=os.getcwd())

    def clear(self, name: str) -> None:
        self.call("clear", name=name)

    def suspend(self, name: str) -> None:
        if self.resume_if_gone:
            self.call("suspend", name=name, resume_if_gone=True)
        else:
            self.call("suspend", name=name)

    def resume(self, name: str) -> None:
        self.call("resume", name=name)

    def remove(self, name: str) -> None:
        self.call("remove", name=name)

    def rename(self, name: str, new_name: str) -> None:
        self.call("rename", name=name, new_name=new_name)

    def message(self, name: str, sector: int, args: list[str]) -> str:
        return str(self.call("message", name=name, sector=sector, args=args)[0] or "")

    def status(self, name: str | None = None) -> str:
        return str(self.call("status", name=name)[0])

    def table(self, name: str | None = None) -> str:
        return str(self.call("table", name=name)[0])

    def info(self, name: str | None = None) -> str:
        return str(self.call("info", name=name)[0])

    def ls(self) -> str:
        return str(self.call("ls")[0])

    # -- I/O ---------------------------------------------------------------------------------------
    def device(self, name: str) -> "ClientDevice":
        """/dev/mapper/NAME of the engine for I/O (its own connection to the daemon)."""
        return ClientDevice(name, self.socket_path)

    def size_bytes(self, name: str) -> int:
        return int(self.call("size", name=name)[0])  # type: ignore[arg-type]

    def read(self, name: str, offset_bytes: int, length_bytes: int) -> bytes:
        out = bytearray()
        while length_bytes:
            n = min(length_bytes, MAX_IO_BYTES)
            out += self.call("read", name=name, offset=offset_bytes, length=n)[1]
            offset_bytes += n
            length_bytes -= n
        return bytes(out)

    def write(self, name: str, offset_bytes: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while len(view):
            n = min(len(view), MAX_IO_BYTES)
            self.call("write", view[:n], name=name, offset=offset_bytes, length=n)
            offset_bytes += n
            view = view[n:]

    def flush(self, name: str) -> None:
        self.call("flush", name=name)

    def discard(self, name: str, offset_bytes: int, length_bytes: int) -> None:
        self.call("discard", name=name, offset=offset_bytes, length=length_bytes)


class ClientDevice(BlockDevice):
    """An engine device as a `BlockDevice`, reached through the daemon (tools reading
    `/dev/mapper/NAME` where the engine, not the kernel, runs the device)."""

    def __init__(self, name: str, socket_path: str | Path | None = None) -> None:
        self.name = f"{MAPPER_PREFIX}{name}"
        self.device = name
        self.client = EngineClient(socket_path)
        self._size = self.client.size_bytes(name)

    @property
    def size_bytes(self) -> int:
        return self._size

    def read(self, offset_bytes: int, length_bytes: int) -> bytes:
        self.check_range(offset_bytes, length_bytes)
        return self.client.read(self.device, offset_bytes, length_bytes)

    def write(self, offset_bytes: int, data: bytes | bytearray | memoryview) -> None:
        self.check_range(offset_bytes, len(data))
        self.client.write(self.device, offset_bytes, data)

    def flush(self) -> None:
        self.client.flush(self.device)

    def discard(self, offset_bytes: int, length_bytes: int) -> None:
        self.client.discard(self.device, offset_bytes, length_bytes)

    def close(self) -> None:
        self.client.close()


def open_path(path: str, *, writable: bool, direct: bool = False) -> BlockDevice:
    """A file or block device by path; `/dev/mapper/NAME` that is not a kernel device node is
    taken to be a device of the engine daemon."""
    if path.startswith(MAPPER_PREFIX) and not os.path.exists(path):
        return ClientDevice(path[len(MAPPER_PREFIX):])
    return FileDevice(path, writable=writable, direct=direct)
