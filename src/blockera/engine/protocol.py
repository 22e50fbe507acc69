"""The engine daemon's control protocol, on a unix socket.

A request is one JSON object on a line: `{"op": NAME, ...arguments}`; a `write` request is
followed by exactly `length` raw bytes. A reply is one JSON line: `{"ok": true, "result": ...}`
or `{"ok": false, "error": message, "errno": "EINVAL", "kind": exception class}`; a successful
`read` reply is followed by `length` raw bytes. One connection can carry many requests.

Where clients find the daemon: `--socket PATH`, else $BLOCKERA_SOCKET, else
$XDG_RUNTIME_DIR/blockera/engine.sock, else /run/blockera/engine.sock.

See docs/engine.md §2.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from blockera import errors

MAX_IO_BYTES = 64 << 20


def default_socket_path() -> Path:
    env = os.environ.get("BLOCKERA_SOCKET")
    if env:
        return Path(env)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) if runtime else Path("/run")
    return base / "blockera" / "engine.sock"


def send_message(sock: socket.socket, message: dict, payload: bytes | memoryview = b"") -> None:
    data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
    if payload:
        sock.sendall(data)
        sock.sendall(payload)
    else:
        sock.sendall(data)


class Reader:
    """Buffered reading of JSON lines and exact byte counts from a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def _fill(self) -> bool:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            return False
        self.buf += chunk
        return True

    def message(self) -> dict | None:
        while b"\n" not in self.buf:
            if len(self.buf) > 1 << 20:
                raise errors.UsageError("protocol error: request line too long")
            if not self._fill():
                if self.buf:
                    raise errors.UsageError("protocol error: connection closed mid-request")
                return None
        line, _, rest = bytes(self.buf).partition(b"\n")
        self.buf = bytearray(rest)
        try:
            message = json.loads(line)
        except json.JSONDecodeError as exc:
            raise errors.UsageError(f"protocol error: bad JSON: {exc}") from None
        if not isinstance(message, dict):
            raise errors.UsageError("protocol error: a message must be a JSON object")
        return message

    def payload(self, length: int) -> bytes:
        while len(self.buf) < length:
            if not self._fill():
                raise errors.UsageError("protocol error: connection closed mid-payload")
        data = bytes(self.buf[:length])
        del self.buf[:length]
        return data


def error_reply(exc: BaseException) -> dict:
    if isinstance(exc, errors.BlockeraError):
        return {"ok": False, "error": str(exc), "errno": exc.errno_name,
                "kind": type(exc).__name__}
    return {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}",
            "errno": "EIO", "kind": "BlockeraError"}


def raise_reply(reply: dict) -> None:
    """Turn an error reply back into the exception it came from."""
    cls = getattr(errors, str(reply.get("kind")), errors.BlockeraError)
    if not (isinstance(cls, type) and issubclass(cls, errors.BlockeraError)):
        cls = errors.BlockeraError
    exc = cls.__new__(cls)
    errors.BlockeraError.__init__(exc, reply.get("error", "unknown error"),
                                  errno_name=reply.get("errno"))
    raise exc
