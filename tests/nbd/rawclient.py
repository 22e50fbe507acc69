"""A deliberately minimal NBD client over a raw socket, for sending what real clients never
send. Constants are written out from the protocol specification, independently of the server's
own definitions."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_INFO, OPT_GO, OPT_STRUCTURED_REPLY = 1, 2, 3, 6, 7, 8
REP_ACK, REP_SERVER, REP_INFO = 1, 2, 3
REP_ERR_UNSUP = 0x80000001
REP_ERR_INVALID = 0x80000003
REP_ERR_UNKNOWN = 0x80000006
INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE = 0, 1, 2, 3

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES = 0, 1, 2, 3, 4, 6
CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLAG_DF = 1, 2, 4
REPLY_FLAG_DONE = 1
REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_ERROR = 0, 1, 0x8001
EPERM, EIO, EINVAL, ENOSPC, EOVERFLOW = 1, 5, 22, 28, 75


class Closed(Exception):
    """The server closed the connection."""


class RawClient:
    def __init__(self, path: Path, timeout_s: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout_s)
        self.sock.connect(str(path))

    def close(self) -> None:
        self.sock.close()

    def recv_exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise Closed(f"closed after {len(out)} of {n} bytes")
            out += chunk
        return bytes(out)

    def is_closed(self) -> bool:
        """True if the server has closed the connection (reads return end-of-file)."""
        try:
            while True:
                if not self.sock.recv(65536):
                    return True
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False

    # -- handshake ---------------------------------------------------------------------------
    def greeting(self, client_flags: int = 3) -> int:
        magic, opt, flags = struct.unpack(">QQH", self.recv_exact(18))
        assert (magic, opt) == (NBDMAGIC, IHAVEOPT)
        self.sock.sendall(struct.pack(">I", client_flags))
        return flags

    def send_option(self, option: int, data: bytes = b"", magic: int = IHAVEOPT) -> None:
        self.sock.sendall(struct.pack(">QII", magic, option, len(data)) + data)

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, option, reply_type, length = struct.unpack(">QIII", self.recv_exact(20))
        assert magic == OPTION_REPLY_MAGIC
        return option, reply_type, self.recv_exact(length)

    def go(self, name: str, *, structured: bool = False, option: int = OPT_GO,
           infos: tuple[int, ...] = ()) -> dict[int, bytes]:
        """NBD_OPT_GO (or INFO); the information replies by type. Fails on an error reply."""
        if structured:
            self.send_option(OPT_STRUCTURED_REPLY)
            assert self.option_reply()[1] == REP_ACK
        encoded = name.encode()
        self.send_option(option, struct.pack(">I", len(encoded)) + encoded +
                         struct.pack(f">H{len(infos)}H", len(infos), *infos))
        replies: dict[int, bytes] = {}
        while True:
            opt, reply_type, data = self.option_reply()
            assert opt == option
            if reply_type == REP_ACK:
                return replies
            assert reply_type == REP_INFO, (hex(reply_type), data)
            replies[struct.unpack(">H", data[:2])[0]] = data[2:]

    def connect_export(self, name: str, *, structured: bool = False) -> tuple[int, int]:
        """Handshake into transmission; (size in bytes, transmission flags)."""
        self.greeting()
        infos = self.go(name, structured=structured)
        size, flags = struct.unpack(">QH", infos[INFO_EXPORT])
        return size, flags

    # -- transmission ------------------------------------------------------------------------
    def request(self, command: int, cookie: int, offset: int = 0, length: int = 0,
                flags: int = 0, payload: bytes = b"", magic: int = REQUEST_MAGIC) -> None:
        self.sock.sendall(struct.pack(">IHHQQI", magic, flags, command, cookie, offset, length)
                          + payload)

    def simple_reply(self, data_bytes: int = 0) -> tuple[int, int, bytes]:
        """(error, cookie, data); data is read only when the error is zero."""
        magic, error, cookie = struct.unpack(">IIQ", self.recv_exact(16))
        assert magic == SIMPLE_REPLY_MAGIC, hex(magic)
        return error, cookie, self.recv_exact(data_bytes) if error == 0 and data_bytes else b""

    def chunk(self) -> tuple[int, int, int, bytes]:
        """One structured reply chunk: (flags, type, cookie, payload)."""
        magic, flags, reply_type, cookie, length = struct.unpack(">IHHQI", self.recv_exact(20))
        assert magic == STRUCTURED_REPLY_MAGIC, hex(magic)
        return flags, reply_type, cookie, self.recv_exact(length)
