"""The NBD client: an export of any NBD server as a `BlockDevice`.

`open_nbd(uri, writable=...)` connects to the export an NBD URI names (`blockera.nbd.uri`),
negotiates it and returns an `NbdDevice`, through which blockera reads a source or writes a
mirror like any other device.

Owns the client side of the protocol: the fixed newstyle handshake (NBD_OPT_GO with an
NBD_INFO_BLOCK_SIZE request, so the server's block size constraints bind it; NBD_OPT_EXPORT_NAME
when the server does not know NBD_OPT_GO or speaks plain newstyle; NBD_OPT_LIST to name the
exports there are when the one asked for is not), and the transmission phase with simple
replies: READ, WRITE (with NBD_CMD_FLAG_FUA on request), FLUSH, TRIM and WRITE_ZEROES when the
server advertises them, DISC on close.

Requests are pipelined. A caller thread sends its request under the connection's send lock and
waits for its own reply; one reader thread per connection receives the replies, in whatever
order the server sends them, matches them to requests by cookie and reads READ data straight
into the waiting caller's buffer. Requests larger than the server's maximum payload are split,
and the pieces are in flight together (spread over the connections when there are several).
Unaligned requests are widened to the server's minimum block size; a write that only partly
covers a block reads that block first (read-modify-write), while a range lock keeps every
other write to the blocks concerned out until it is done. With `connections` > 1 and a server
that advertises NBD_FLAG_CAN_MULTI_CONN, requests go round-robin over several connections.

Every failure is a `DeviceError`: an NBD error reply carries the errno name of the NBD error
(EPERM, EIO, ENOSPC as `NoSpaceError`, EINVAL, ...) and says which request failed; a
connection that drops, breaks the protocol or leaves a request unanswered past the reply
timeout is closed, and all its requests fail with `NbdConnectionLost`, as does every later call.

See docs/nbd.md §6.
"""

from __future__ import annotations

import errno as _errno
import itertools
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from blockera.blockdev import BlockDevice
from blockera.errors import DeviceError, NoSpaceError, UsageError
from blockera.nbd import protocol as p
from blockera.nbd.errors import ClientDisconnected
from blockera.nbd.uri import NbdUri, parse_nbd_uri
from blockera.nbd.wire import SocketReader, send_buffers

log = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_REPLY_TIMEOUT_S = 60.0
DEFAULT_MAX_IN_FLIGHT = 64
MAX_CONNECTIONS = 16

# Without NBD_INFO_BLOCK_SIZE the protocol's defaults apply; READ and WRITE payloads stay within
# 32 MiB, which every server must accept, even when a server advertises more.
_DEFAULT_MIN_BLOCK_BYTES = 1
_DEFAULT_PREFERRED_BLOCK_BYTES = 4096
_INTEROPERABLE_PAYLOAD_BYTES = 32 << 20
_MAX_MIN_BLOCK_BYTES = 1 << 16
_MAX_OPTION_REPLY_BYTES = 1 << 20
_OLDSTYLE_MAGIC = 0x00420281861253
_CLOSE_WAIT_S = 2.0
_SIMPLE_REPLY_REST = struct.Struct(">IQ")  # a simple reply after its magic: error, cookie

# NBD error values -> errno names (the protocol's values are Linux's errno numbers)
_ERRNO_NAMES = {p.EPERM: "EPERM", p.EIO: "EIO", p.ENOMEM: "ENOMEM", p.EINVAL: "EINVAL",
                p.ENOSPC: "ENOSPC", p.EOVERFLOW: "EOVERFLOW", p.ENOTSUP: "ENOTSUP",
                p.ESHUTDOWN: "ESHUTDOWN"}
_OPTION_NAMES = {p.OPT_EXPORT_NAME: "NBD_OPT_EXPORT_NAME", p.OPT_ABORT: "NBD_OPT_ABORT",
                 p.OPT_LIST: "NBD_OPT_LIST", p.OPT_GO: "NBD_OPT_GO"}
_OPTION_ERRORS = {p.REP_ERR_UNSUP: "NBD_REP_ERR_UNSUP", p.REP_ERR_POLICY: "NBD_REP_ERR_POLICY",
                  p.REP_ERR_INVALID: "NBD_REP_ERR_INVALID",
                  p.REP_ERR_PLATFORM: "NBD_REP_ERR_PLATFORM",
                  p.REP_ERR_TLS_REQD: "NBD_REP_ERR_TLS_REQD",
                  p.REP_ERR_UNKNOWN: "NBD_REP_ERR_UNKNOWN",
                  p.REP_ERR_SHUTDOWN: "NBD_REP_ERR_SHUTDOWN",
                  p.REP_ERR_BLOCK_SIZE_REQD: "NBD_REP_ERR_BLOCK_SIZE_REQD",
                  p.REP_ERR_TOO_BIG: "NBD_REP_ERR_TOO_BIG"}


class NbdConnectError(DeviceError):
    """The export could not be connected to: no server there, a failed handshake, a refusal."""


class NbdExportNotFoundError(NbdConnectError):
    """The server has no export of the name asked for. `available` holds the names it
    listed, or None when it would not list them."""

    errno_name = "ENOENT"

    def __init__(self, message: str, *, export_name: str,
                 available: list[str] | None) -> None:
        super().__init__(message)
        self.export_name = export_name
        self.available = available


class NbdConnectionLost(DeviceError):
    """A connection failed in the transmission phase (the server went away, broke the
    protocol or did not answer in time); the device cannot be used any more."""


class _ServerClosed(Exception):
    """The server closed the connection during the handshake."""


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass(frozen=True)
class ExportInfo:
    """What the handshake said about an export. Sizes in bytes."""

    export_name: str
    size_bytes: int
    transmission_flags: int
    min_block_bytes: int = _DEFAULT_MIN_BLOCK_BYTES
    preferred_block_bytes: int = _DEFAULT_PREFERRED_BLOCK_BYTES
    max_payload_bytes: int = _INTEROPERABLE_PAYLOAD_BYTES
    block_sizes_advertised: bool = False
    negotiated_with: str = "NBD_OPT_GO"

    def _flag(self, flag: int) -> bool:
        return bool(self.transmission_flags & flag)

    @property
    def read_only(self) -> bool:
        return self._flag(p.FLAG_READ_ONLY)

    @property
    def can_flush(self) -> bool:
        return self._flag(p.FLAG_SEND_FLUSH)

    @property
    def can_fua(self) -> bool:
        return self._flag(p.FLAG_SEND_FUA)

    @property
    def can_trim(self) -> bool:
        return self._flag(p.FLAG_SEND_TRIM)

    @property
    def can_write_zeroes(self) -> bool:
        return self._flag(p.FLAG_SEND_WRITE_ZEROES)

    @property
    def can_multi_conn(self) -> bool:
        return self._flag(p.FLAG_CAN_MULTI_CONN)


# -- connecting and the handshake ----------------------------------------------------------------

def _connect_socket(uri: NbdUri, where: str, timeout_s: float) -> socket.socket:
    """A connected stream socket to the server's address."""
    if uri.unix_path is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout_s)
        try:
            sock.connect(uri.unix_path)
        except FileNotFoundError:
            sock.close()
            raise NbdConnectError(f"{where}: no socket at {uri.unix_path}: is the NBD server "
                                  "running?", errno_name="ENOENT") from None
        except ConnectionRefusedError:
            sock.close()
            raise NbdConnectError(f"{where}: nothing listens on {uri.unix_path} (connection "
                                  "refused): is the NBD server running?",
                                  errno_name="ECONNREFUSED") from None
        except TimeoutError:
            sock.close()
            raise NbdConnectError(f"{where}: connecting timed out after {timeout_s:g} s",
                                  errno_name="ETIMEDOUT") from None
        except OSError as exc:
            sock.close()
            raise NbdConnectError(f"{where}: cannot connect to {uri.unix_path}: "
                                  f"{exc.strerror or exc}") from None
        return sock
    assert uri.host is not None
    try:
        sock = socket.create_connection((uri.host, uri.port), timeout=timeout_s)
    except socket.gaierror as exc:
        raise NbdConnectError(f"{where}: cannot resolve host {uri.host!r}: "
                              f"{exc.strerror}") from None
    except ConnectionRefusedError:
        raise NbdConnectError(f"{where}: connection refused by {uri.host} port {uri.port}: "
                              "is the NBD server running and listening there?",
                              errno_name="ECONNREFUSED") from None
    except TimeoutError:
        raise NbdConnectError(f"{where}: connecting to {uri.host} port {uri.port} timed out "
                              f"after {timeout_s:g} s", errno_name="ETIMEDOUT") from None
    except OSError as exc:
        raise NbdConnectError(f"{where}: cannot connect to {uri.host} port {uri.port}: "
                              f"{exc.strerror or exc}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class _Handshake:
    """The client's side of the handshake on one connected socket; every receive is bounded
    by one deadline for the whole handshake."""

    def __init__(self, sock: socket.socket, where: str, timeout_s: float) -> None:
        self._sock = sock
        self._where = where
        self._timeout_s = timeout_s
        self._deadline = time.monotonic() + timeout_s
        self.fixed_newstyle = False
        self.no_zeroes = False
        self.in_transmission = False

    # -- bytes -----------------------------------------------------------------------------
    def _error(self, text: str, *, errno_name: str | None = None) -> NbdConnectError:
        return NbdConnectError(f"{self._where}: {text}", errno_name=errno_name)

    def _recv(self, n_bytes: int) -> bytes:
        buf = bytearray(n_bytes)
        view = memoryview(buf)
        got = 0
        while got < n_bytes:
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                raise self._error(f"the server did not complete the handshake within "
                                  f"{self._timeout_s:g} s", errno_name="ETIMEDOUT")
            self._sock.settimeout(remaining)
            try:
                n = self._sock.recv_into(view[got:])
            except TimeoutError:
                raise self._error(f"the server did not complete the handshake within "
                                  f"{self._timeout_s:g} s", errno_name="ETIMEDOUT") from None
            except OSError as exc:
                raise self._error(f"the connection failed during the handshake: "
                                  f"{exc.strerror or exc}") from None
            if n == 0:
                raise _ServerClosed()
            got += n
        return bytes(buf)

    def _send(self, data: bytes) -> None:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise self._error(f"the handshake did not complete within {self._timeout_s:g} s",
                              errno_name="ETIMEDOUT")
        self._sock.settimeout(remaining)
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise self._error(f"the connection failed during the handshake: "
                              f"{exc.strerror or exc}") from None

    # -- messages --------------------------------------------------------------------------
    def greeting(self) -> None:
        try:
            magic, second = struct.unpack(">QQ", self._recv(16))
        except _ServerClosed:
            raise self._error("the server closed the connection before greeting") from None
        if magic != p.NBDMAGIC:
            raise self._error(f"not an NBD server (its greeting starts with {magic:#x}, not "
                              "NBDMAGIC)")
        if second == _OLDSTYLE_MAGIC:
            raise self._error("the server speaks the oldstyle handshake, which has no export "
                              "names; blockera's client needs a newstyle server")
        if second != p.IHAVEOPT:
            raise self._error(f"unexpected handshake magic {second:#x} (expected IHAVEOPT)")
        try:
            (flags,) = struct.unpack(">H", self._recv(2))
        except _ServerClosed:
            raise self._error("the server closed the connection during the greeting") from None
        self.fixed_newstyle = bool(flags & p.FLAG_FIXED_NEWSTYLE)
        self.no_zeroes = bool(flags & p.FLAG_NO_ZEROES)
        client_flags = (p.FLAG_C_FIXED_NEWSTYLE if self.fixed_newstyle else 0) | \
            (p.FLAG_C_NO_ZEROES if self.no_zeroes else 0)
        self._send(p.CLIENT_FLAGS.pack(client_flags))

    def _option(self, option: int, data: bytes = b"") -> None:
        self._send(p.OPTION_HEADER.pack(p.IHAVEOPT, option, len(data)) + data)

    def _reply(self, option: int) -> tuple[int, bytes]:
        what = _OPTION_NAMES.get(option, f"option {option}")
        try:
            magic, replied, reply_type, length = p.OPTION_REPLY_HEADER.unpack(
                self._recv(p.OPTION_REPLY_HEADER.size))
            if magic != p.OPTION_REPLY_MAGIC:
                raise self._error(f"bad option reply magic {magic:#x} to {what}")
            if replied != option:
                raise self._error(f"the server answered option {replied} to {what}")
            if length > _MAX_OPTION_REPLY_BYTES:
                raise self._error(f"the server's reply to {what} carries {length} bytes")
            return reply_type, self._recv(length) if length else b""
        except _ServerClosed:
            raise self._error(f"the server closed the connection in answer to {what}") \
                from None

    def abort(self) -> None:
        """Leave politely (a soft disconnect): NBD_OPT_ABORT during option haggling (the
        server's answer is optional), NBD_CMD_DISC once in the transmission phase."""
        try:
            if self.in_transmission:
                self._send(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_DISC, 0, 0, 0))
                return
            self._option(p.OPT_ABORT)
            self._deadline = min(self._deadline, time.monotonic() + 1.0)
            self._reply(p.OPT_ABORT)
        except (NbdConnectError, OSError):
            pass

    def list_exports(self) -> list[str] | None:
        """The names NBD_OPT_LIST returns, or None if the server refuses to list."""
        self._option(p.OPT_LIST)
        names: list[str] = []
        while True:
            reply_type, data = self._reply(p.OPT_LIST)
            if reply_type == p.REP_ACK:
                return names
            if reply_type != p.REP_SERVER:
                return None
            if len(data) < 4:
                raise self._error("malformed NBD_REP_SERVER reply")
            (name_len,) = struct.unpack_from(">I", data)
            names.append(data[4:4 + name_len].decode("utf-8", "replace"))

    def go(self, name: str) -> ExportInfo | None:
        """NBD_OPT_GO with an NBD_INFO_BLOCK_SIZE request; None if the server does not
        support NBD_OPT_GO. A refusal raises (the caller then aborts the handshake)."""
        encoded = name.encode("utf-8")
        self._option(p.OPT_GO, struct.pack(">I", len(encoded)) + encoded +
                     struct.pack(">HH", 1, p.INFO_BLOCK_SIZE))
        size_bytes: int | None = None
        flags = 0
        block_sizes: tuple[int, int, int] | None = None
        while True:
            reply_type, data = self._reply(p.OPT_GO)
            if reply_type == p.REP_INFO:
                if len(data) < 2:
                    raise self._error("malformed NBD_REP_INFO reply to NBD_OPT_GO")
                (info,) = p.INFO_TYPE.unpack_from(data)
                if info == p.INFO_EXPORT:
                    if len(data) != p.INFO_EXPORT_PAYLOAD.size:
                        raise self._error(f"NBD_INFO_EXPORT of {len(data)} bytes, not "
                                          f"{p.INFO_EXPORT_PAYLOAD.size}")
                    _, size_bytes, flags = p.INFO_EXPORT_PAYLOAD.unpack(data)
                elif info == p.INFO_BLOCK_SIZE:
                    if len(data) != p.INFO_BLOCK_SIZE_PAYLOAD.size:
                        raise self._error(f"NBD_INFO_BLOCK_SIZE of {len(data)} bytes, not "
                                          f"{p.INFO_BLOCK_SIZE_PAYLOAD.size}")
                    _, *sizes = p.INFO_BLOCK_SIZE_PAYLOAD.unpack(data)
                    block_sizes = (sizes[0], sizes[1], sizes[2])
                continue  # other information is ignored, as the protocol requires
            if reply_type == p.REP_ACK:
                self.in_transmission = True
                if size_bytes is None:
                    raise self._error("the server accepted NBD_OPT_GO without sending "
                                      "NBD_INFO_EXPORT")
                return self._info(name, size_bytes, flags, block_sizes, "NBD_OPT_GO")
            if reply_type == p.REP_ERR_UNSUP:
                return None
            self._refused(name, reply_type, data)

    def _refused(self, name: str, reply_type: int, data: bytes) -> None:
        message = data.decode("utf-8", "replace").strip()
        detail = f" (the server says: {message})" if message else ""
        if reply_type == p.REP_ERR_UNKNOWN:
            try:
                available = self.list_exports()
            except NbdConnectError:
                available = None
            raise _not_found(self._where, name, available, detail)
        if reply_type == p.REP_ERR_TLS_REQD:
            raise self._error(f"the server requires TLS for export {name!r}{detail}; "
                              "blockera's NBD client does not support TLS",
                              errno_name="EPERM")
        if reply_type == p.REP_ERR_POLICY:
            raise self._error(f"the server's policy refuses export {name!r}{detail}",
                              errno_name="EPERM")
        if reply_type == p.REP_ERR_SHUTDOWN:
            raise self._error(f"the server is shutting down{detail}; try again when it is "
                              "back", errno_name="ESHUTDOWN")
        if reply_type & (1 << 31):
            kind = _OPTION_ERRORS.get(reply_type, f"error reply {reply_type:#x}")
            raise self._error(f"the server refused NBD_OPT_GO for export {name!r} "
                              f"({kind}){detail}")
        raise self._error(f"unexpected reply type {reply_type} to NBD_OPT_GO")

    def export_name(self, name: str) -> ExportInfo:
        """NBD_OPT_EXPORT_NAME; the server closes the connection if it will not serve the
        export (this option cannot carry an error)."""
        self._option(p.OPT_EXPORT_NAME, name.encode("utf-8"))
        reply_bytes = p.EXPORT_NAME_REPLY.size + (0 if self.no_zeroes else
                                                  p.EXPORT_NAME_ZEROES_BYTES)
        try:
            data = self._recv(reply_bytes)
        except _ServerClosed:
            raise _not_found(self._where, name, None,
                             " (the server closed the connection when asked for it with "
                             "NBD_OPT_EXPORT_NAME, which cannot say why)") from None
        self.in_transmission = True
        size_bytes, flags = p.EXPORT_NAME_REPLY.unpack_from(data)
        return self._info(name, size_bytes, flags, None, "NBD_OPT_EXPORT_NAME")

    def _info(self, name: str, size_bytes: int, flags: int,
              block_sizes: tuple[int, int, int] | None, negotiated_with: str) -> ExportInfo:
        if not flags & p.FLAG_HAS_FLAGS:
            flags = 0  # the flags field is not valid: assume no optional features
        if block_sizes is None:
            return ExportInfo(name, size_bytes, flags, negotiated_with=negotiated_with)
        min_bytes, preferred_bytes, max_bytes = block_sizes
        if not _is_power_of_two(min_bytes) or min_bytes > _MAX_MIN_BLOCK_BYTES or \
                max_bytes < min_bytes:
            raise self._error(f"the server sent invalid block size constraints (minimum "
                              f"{min_bytes}, preferred {preferred_bytes}, maximum "
                              f"{max_bytes} bytes)")
        if not _is_power_of_two(preferred_bytes) or preferred_bytes < min_bytes:
            preferred_bytes = min_bytes  # only advice; an invalid one is not followed
        return ExportInfo(name, size_bytes, flags, min_bytes, preferred_bytes, max_bytes,
                          block_sizes_advertised=True, negotiated_with=negotiated_with)


def _not_found(where: str, name: str, available: list[str] | None,
               detail: str) -> NbdExportNotFoundError:
    if available is None:
        offer = "the server did not list its exports"
    elif not available:
        offer = "the server lists no exports"
    else:
        offer = "the server offers: " + ", ".join(repr(n) for n in sorted(available))
    return NbdExportNotFoundError(f"{where}: no export named {name!r}{detail}; {offer}",
                                  export_name=name, available=available)


def _list_exports(uri: NbdUri, where: str, timeout_s: float) -> list[str] | None:
    """The server's export names over a fresh connection, or None if it will not say."""
    try:
        sock = _connect_socket(uri, where, timeout_s)
    except NbdConnectError:
        return None
    try:
        hs = _Handshake(sock, where, timeout_s)
        hs.greeting()
        if not hs.fixed_newstyle:
            return None
        names = hs.list_exports()
        hs.abort()
        return names
    except NbdConnectError:
        return None
    finally:
        sock.close()


def _negotiate(uri: NbdUri, where: str, timeout_s: float) -> tuple[socket.socket, ExportInfo]:
    """Connect and negotiate the export: a socket in the transmission phase."""
    sock = _connect_socket(uri, where, timeout_s)
    try:
        hs = _Handshake(sock, where, timeout_s)
        hs.greeting()
        info = None
        if hs.fixed_newstyle:
            try:
                info = hs.go(uri.export_name)
            except NbdConnectError:
                hs.abort()
                raise
            if info is None:
                log.info("%s: the server does not support NBD_OPT_GO; using "
                         "NBD_OPT_EXPORT_NAME", where)
        if info is None:
            try:
                info = hs.export_name(uri.export_name)
            except NbdExportNotFoundError:
                available = _list_exports(uri, where, timeout_s) if hs.fixed_newstyle \
                    else None
                if available is None:
                    raise
                raise _not_found(where, uri.export_name, available,
                                 " (the server closed the connection when asked for it)") \
                    from None
        sock.settimeout(None)
        return sock, info
    except BaseException:
        sock.close()
        raise


# -- the transmission phase ------------------------------------------------------------------

class _Request:
    """One request in flight; `done` is set exactly once, by whoever completes it."""

    __slots__ = ("command", "offset_bytes", "length_bytes", "into", "done", "error")

    def __init__(self, command: int, offset_bytes: int, length_bytes: int,
                 into: memoryview | None) -> None:
        self.command = command
        self.offset_bytes = offset_bytes
        self.length_bytes = length_bytes
        self.into = into
        self.done = threading.Event()
        self.error: DeviceError | None = None

    def describe(self) -> str:
        name = p.COMMAND_NAMES.get(self.command, str(self.command))
        if self.command == p.CMD_FLUSH:
            return f"NBD {name}"
        return f"NBD {name} of {self.length_bytes} bytes at byte {self.offset_bytes}"


def _reply_error(where: str, request: _Request, error: int) -> DeviceError:
    """The exception for an NBD error reply."""
    name = _ERRNO_NAMES.get(error)
    if name is None:
        # the protocol asks clients to treat unknown values as EINVAL
        text, name = f"unknown NBD error value {error}, taken as EINVAL", "EINVAL"
    else:
        text = f"{name} ({os.strerror(getattr(_errno, name))})"
    message = f"{where}: {request.describe()} failed: {text}"
    if name == "ENOSPC":
        return NoSpaceError(message)
    return DeviceError(message, errno_name=name)


class _Connection:
    """One negotiated connection: requests are sent by the calling threads, replies are
    received by the connection's reader thread."""

    def __init__(self, sock: socket.socket, where: str, index: int, *,
                 reply_timeout_s: float, max_in_flight: int) -> None:
        self._sock = sock
        self._where = where
        self._reply_timeout_s = reply_timeout_s
        self._reader = SocketReader(sock)
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pending: dict[int, _Request] = {}
        self._cookies = itertools.count(1)
        self._slots = threading.Semaphore(max_in_flight)
        self._failure: str | None = None
        self._closing = False
        self._server_shutting_down = False
        self._disc_sent = False
        # A send that makes no progress for the reply timeout fails instead of blocking.
        seconds = int(reply_timeout_s)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack(
            "ll", seconds, int((reply_timeout_s - seconds) * 1e6)))
        self._thread = threading.Thread(target=self._read_replies, daemon=True,
                                        name=f"nbd client {index}")
        self._thread.start()

    @property
    def failure(self) -> str | None:
        return self._failure

    # -- requests --------------------------------------------------------------------------
    def submit(self, command: int, flags: int, offset_bytes: int, length_bytes: int, *,
               payload: memoryview | None = None, into: memoryview | None = None) -> _Request:
        """Send one request; its reply (or failure) is waited for with `wait`."""
        request = _Request(command, offset_bytes, length_bytes, into)
        if not self._slots.acquire(timeout=self._reply_timeout_s):
            self.fail(f"no reply to any of the requests in flight within "
                      f"{self._reply_timeout_s:g} s; the connection was closed")
            raise NbdConnectionLost(f"{self._where}: {request.describe()} could not be sent: "
                                    f"{self._failure}")
        with self._send_lock:
            with self._lock:
                refusal = self._refusal()
                if refusal is not None:
                    self._slots.release()
                    raise refusal
                cookie = next(self._cookies)
                self._pending[cookie] = request
            header = p.REQUEST.pack(p.REQUEST_MAGIC, flags, command, cookie, offset_bytes,
                                    length_bytes)
            try:
                send_buffers(self._sock, [header] if payload is None else [header, payload])
            except OSError as exc:
                reason = "timed out" if isinstance(exc, (BlockingIOError, TimeoutError)) \
                    else exc.strerror or str(exc)
                self.fail(f"the connection to the server was lost (sending failed: {reason})")
        return request

    def _refusal(self) -> DeviceError | None:
        """Why no request may be sent now (called with the lock held)."""
        if self._failure is not None:
            return NbdConnectionLost(f"{self._where}: {self._failure}; reopen the device to "
                                     "continue")
        if self._server_shutting_down:
            return DeviceError(f"{self._where}: the server is shutting down (it answered "
                               "ESHUTDOWN)", errno_name="ESHUTDOWN")
        if self._closing:
            return DeviceError(f"{self._where}: the device is closed")
        return None

    def wait(self, request: _Request) -> None:
        if not request.done.wait(self._reply_timeout_s):
            self.fail(f"no reply to {request.describe()} within {self._reply_timeout_s:g} s; "
                      "the connection was closed")
            request.done.wait()
        if request.error is not None:
            raise request.error

    def fail(self, reason: str) -> None:
        """Close the connection and fail every request in flight. `reason` says what went
        wrong with the connection (the first reason given stays)."""
        with self._lock:
            if self._failure is None:
                self._failure = reason
            reason = self._failure
            failed = list(self._pending.values())
            self._pending.clear()
            self._idle.notify_all()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        for request in failed:
            request.error = NbdConnectionLost(
                f"{self._where}: {request.describe()} failed: {reason}")
            self._slots.release()
            request.done.set()

    # -- replies ---------------------------------------------------------------------------
    def _read_replies(self) -> None:
        reader = self._reader
        try:
            while True:
                (magic,) = struct.unpack(">I", reader.take(4))
                if magic != p.SIMPLE_REPLY_MAGIC:
                    kind = "a structured reply, which was not negotiated" \
                        if magic == p.STRUCTURED_REPLY_MAGIC else f"bad reply magic {magic:#x}"
                    self.fail(f"the server broke the protocol ({kind}); the connection was "
                              "closed")
                    return
                error, cookie = _SIMPLE_REPLY_REST.unpack(reader.take(_SIMPLE_REPLY_REST.size))
                with self._lock:
                    request = self._pending.get(cookie)
                    failed = self._failure is not None
                if request is None:
                    if not failed:
                        self.fail(f"the server broke the protocol (a reply with unknown "
                                  f"cookie {cookie}); the connection was closed")
                    return
                if error == 0 and request.into is not None:
                    reader.read_into(request.into)
                self._complete(cookie, error)
        except ClientDisconnected as exc:
            with self._lock:
                expected = self._disc_sent and not self._pending
            if not expected:
                self.fail(f"the connection to the server was lost ({exc})")
        except Exception as exc:  # keep waiting callers from hanging on a reader bug
            log.exception("%s: the reply reader failed", self._where)
            self.fail(f"receiving replies failed ({type(exc).__name__}: {exc}); the "
                      "connection was closed")

    def _complete(self, cookie: int, error: int) -> None:
        with self._lock:
            request = self._pending.pop(cookie, None)
            if request is None:
                return  # already failed with the connection
            if error == p.ESHUTDOWN:
                self._server_shutting_down = True
            drained = not self._pending
            if drained:
                self._idle.notify_all()
            disconnect = drained and self._server_shutting_down and not self._disc_sent
        if error:
            request.error = _reply_error(self._where, request, error)
        self._slots.release()
        request.done.set()
        if disconnect:
            # a server that answers ESHUTDOWN must be left with a soft disconnect
            self._disconnect()

    # -- closing ---------------------------------------------------------------------------
    def _disconnect(self) -> None:
        """Send NBD_CMD_DISC (once) and stop sending."""
        with self._send_lock:
            with self._lock:
                if self._disc_sent or self._failure is not None:
                    return
                self._disc_sent = True
            try:
                send_buffers(self._sock, [p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_DISC,
                                                         next(self._cookies), 0, 0)])
                self._sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self) -> None:
        """Let the requests in flight finish (up to the reply timeout), disconnect, close."""
        deadline = time.monotonic() + self._reply_timeout_s
        with self._lock:
            self._closing = True
            while self._pending and time.monotonic() < deadline:
                self._idle.wait(deadline - time.monotonic())
            stuck = len(self._pending)
        if stuck:
            self.fail(f"the device was closed with {stuck} requests still unanswered")
        self._disconnect()
        self._thread.join(_CLOSE_WAIT_S)
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._thread.join()
        self._sock.close()


# -- the device ----------------------------------------------------------------------------------

class _RangeLock:
    """Exclusive holds on byte ranges: a hold waits until no overlapping range is held."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held: list[tuple[int, int]] = []

    @contextmanager
    def hold(self, start_bytes: int, end_bytes: int) -> Iterator[None]:
        with self._cond:
            while any(s < end_bytes and start_bytes < e for s, e in self._held):
                self._cond.wait()
            self._held.append((start_bytes, end_bytes))
        try:
            yield
        finally:
            with self._cond:
                self._held.remove((start_bytes, end_bytes))
                self._cond.notify_all()


class NbdDevice(BlockDevice):
    """An NBD export as a block device (made by `open_nbd`). Byte-addressed like every
    `BlockDevice`; the export's size is the size negotiated when it was opened."""

    def __init__(self, uri: NbdUri, info: ExportInfo, connections: list[_Connection], *,
                 writable: bool) -> None:
        self.uri = uri
        self.name = str(uri)
        self.info = info
        self.writable = writable
        self._connections = connections
        self._turn = itertools.count()
        self._closed = False
        self._close_lock = threading.Lock()
        block = info.min_block_bytes
        limit = min(info.max_payload_bytes, _INTEROPERABLE_PAYLOAD_BYTES)
        chunk = limit - limit % block
        if info.preferred_block_bytes <= chunk:
            chunk -= chunk % info.preferred_block_bytes
        self.chunk_bytes = chunk
        self._ranges = _RangeLock() if block > 1 else None

    # -- properties --------------------------------------------------------------------------
    @property
    def size_bytes(self) -> int:
        return self.info.size_bytes

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    # -- checks ------------------------------------------------------------------------------
    def _usable(self) -> None:
        if self._closed:
            raise DeviceError(f"{self.name}: the device is closed")
        for conn in self._connections:
            if conn.failure is not None:
                raise NbdConnectionLost(f"{self.name}: {conn.failure}; reopen the device to "
                                        "continue")

    def _writable(self, what: str) -> None:
        self._usable()
        if not self.writable:
            raise DeviceError(f"{self.name}: cannot {what}: opened read-only",
                              errno_name="EROFS")

    def _aligned(self, offset_bytes: int, length_bytes: int) -> tuple[int, int]:
        """The smallest range of whole minimum blocks around a request; the last block of an
        export whose size is not a multiple of the block ends at the end of the export."""
        block = self.info.min_block_bytes
        start = offset_bytes - offset_bytes % block
        end = offset_bytes + length_bytes
        if end % block:
            end = min(end + block - end % block, self.size_bytes)
        return start, end

    @contextmanager
    def _hold(self, start_bytes: int, end_bytes: int) -> Iterator[None]:
        if self._ranges is None:
            yield
        else:
            with self._ranges.hold(start_bytes, end_bytes):
                yield

    # -- requests --------------------------------------------------------------------------
    def _connection(self) -> _Connection:
        return self._connections[next(self._turn) % len(self._connections)]

    def _transfer(self, command: int, offset_bytes: int, length_bytes: int, flags: int = 0,
                  *, payload: memoryview | None = None, into: memoryview | None = None) -> None:
        """One command over an aligned range, in pieces of at most `chunk_bytes`, all in
        flight at once; raises the first failure once every piece is answered."""
        sent: list[tuple[_Connection, _Request]] = []
        first_error: DeviceError | None = None
        try:
            for pos in range(0, length_bytes, self.chunk_bytes):
                n = min(self.chunk_bytes, length_bytes - pos)
                conn = self._connection()
                sent.append((conn, conn.submit(
                    command, flags, offset_bytes + pos, n,
                    payload=None if payload is None else payload[pos:pos + n],
                    into=None if into is None else into[pos:pos + n])))
        except DeviceError as exc:
            first_error = exc
        for conn, request in sent:
            try:
                conn.wait(request)
            except DeviceError as exc:
                if first_error is None:
                    first_error = exc
        if first_error is not None:
            raise first_error

    def _read_aligned(self, start_bytes: int, end_bytes: int) -> bytearray:
        buf = bytearray(end_bytes - start_bytes)
        if buf:
            self._transfer(p.CMD_READ, start_bytes, len(buf), into=memoryview(buf))
        return buf

    def read(self, offset_bytes: int, length_bytes: int) -> bytes:
        self._usable()
        self.check_range(offset_bytes, length_bytes)
        if length_bytes == 0:
            return b""
        start, end = self._aligned(offset_bytes, length_bytes)
        buf = self._read_aligned(start, end)
        if start == offset_bytes and end == offset_bytes + length_bytes:
            return bytes(buf)
        return bytes(memoryview(buf)[offset_bytes - start:offset_bytes - start + length_bytes])

    def write(self, offset_bytes: int, data: bytes | bytearray | memoryview, *,
              fua: bool = False) -> None:
        """Write `data`; with `fua`, it is durable when the call returns (NBD_CMD_FLAG_FUA,
        or a FLUSH after the write when the server does not support FUA)."""
        self._writable("write")
        view = memoryview(data).cast("B")
        length = len(view)
        self.check_range(offset_bytes, length)
        if length == 0:
            return
        flags, flush_after = 0, False
        if fua:
            if self.info.can_fua:
                flags = p.CMD_FLAG_FUA
            else:
                self._require_flush("a write with FUA")
                flush_after = True
        start, end = self._aligned(offset_bytes, length)
        with self._hold(start, end):
            self._write_held(offset_bytes, view, start, end, flags)
        if flush_after:
            self.flush()

    def _write_held(self, offset_bytes: int, view: memoryview, start: int, end: int,
                    flags: int) -> None:
        """Write `view` at `offset_bytes`, whose aligned range [start, end) is held; partial
        blocks at either end are read first and merged."""
        if start != offset_bytes or end != offset_bytes + len(view):
            block = self.info.min_block_bytes
            merged = bytearray(end - start)
            head_end = min(start + block, end)
            tail_start = (end - 1) // block * block  # the block holding the last byte
            partial_head = offset_bytes != start
            partial_tail = offset_bytes + len(view) != end
            if tail_start == start and (partial_head or partial_tail):
                merged[:] = self._read_aligned(start, end)  # one block, read once
            else:
                if partial_head:
                    merged[:head_end - start] = self._read_aligned(start, head_end)
                if partial_tail:
                    merged[tail_start - start:] = self._read_aligned(tail_start, end)
            merged[offset_bytes - start:offset_bytes - start + len(view)] = view
            view = memoryview(merged)
        self._transfer(p.CMD_WRITE, start, end - start, flags, payload=view)

    def _require_flush(self, what: str) -> None:
        if not self.info.can_flush:
            raise DeviceError(
                f"{self.name}: {what} cannot be made durable: the server does not support "
                "NBD_CMD_FLUSH (it does not advertise NBD_FLAG_SEND_FLUSH), so a mirror on "
                "this export could lose completed writes; use a server that supports flush",
                errno_name="EOPNOTSUPP")

    def flush(self) -> None:
        """Make every completed write durable. Nothing to do when the device cannot write."""
        self._usable()
        if not self.writable or self.info.read_only:
            return
        self._require_flush("the export")
        conn = self._connection()  # with several connections, CAN_MULTI_CONN covers them all
        conn.wait(conn.submit(p.CMD_FLUSH, 0, 0, 0))

    def write_zeroes(self, offset_bytes: int, length_bytes: int) -> None:
        """Write zeros, allocated (NBD_CMD_WRITE_ZEROES with NBD_CMD_FLAG_NO_HOLE, or plain
        writes of zeros when the server does not advertise WRITE_ZEROES)."""
        self._zero("write zeroes", offset_bytes, length_bytes, p.CMD_FLAG_NO_HOLE)

    def discard(self, offset_bytes: int, length_bytes: int) -> None:
        """Forget a range; it reads back as zeros. NBD_CMD_WRITE_ZEROES without
        NBD_CMD_FLAG_NO_HOLE, which lets the server deallocate (NBD_CMD_TRIM alone cannot be
        used: after it, the contents are undefined); plain writes of zeros without it."""
        self._zero("discard", offset_bytes, length_bytes, 0)

    def _zero(self, what: str, offset_bytes: int, length_bytes: int, flags: int) -> None:
        self._writable(what)
        self.check_range(offset_bytes, length_bytes)
        if length_bytes == 0:
            return
        if not self.info.can_write_zeroes:
            super().write_zeroes(offset_bytes, length_bytes)
            return
        block = self.info.min_block_bytes
        end = offset_bytes + length_bytes
        start, aligned_end = self._aligned(offset_bytes, length_bytes)
        inner_start = start if start == offset_bytes else start + block
        inner_end = end if aligned_end == end else end - end % block
        with self._hold(start, aligned_end):
            if inner_start >= inner_end:  # no whole block inside: one read-modify-write
                self._write_held(offset_bytes, memoryview(bytes(length_bytes)), start,
                                 aligned_end, 0)
                return
            if inner_start != offset_bytes:
                self._write_held(offset_bytes, memoryview(bytes(inner_start - offset_bytes)),
                                 start, inner_start, 0)
            self._transfer(p.CMD_WRITE_ZEROES, inner_start, inner_end - inner_start, flags)
            if inner_end != end:
                self._write_held(inner_end, memoryview(bytes(end - inner_end)), inner_end,
                                 aligned_end, 0)

    def trim(self, offset_bytes: int, length_bytes: int) -> bool:
        """NBD_CMD_TRIM: a hint that a range is no longer needed; afterwards its contents are
        undefined until written again. Only whole minimum blocks inside the range are
        trimmed. False (and nothing sent) when the server does not advertise TRIM."""
        self._writable("trim")
        self.check_range(offset_bytes, length_bytes)
        if not self.info.can_trim:
            return False
        block = self.info.min_block_bytes
        start = -(-offset_bytes // block) * block
        end = offset_bytes + length_bytes
        if end != self.size_bytes:
            end -= end % block
        if start < end:
            with self._hold(start, end):
                self._transfer(p.CMD_TRIM, start, end - start)
        return True

    def close(self) -> None:
        """Wait for the requests in flight, send NBD_CMD_DISC and close every connection."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        for conn in self._connections:
            conn.close()


def open_nbd(uri: str | NbdUri, *, writable: bool, connections: int = 1,
             connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
             reply_timeout_s: float = DEFAULT_REPLY_TIMEOUT_S,
             max_in_flight: int = DEFAULT_MAX_IN_FLIGHT) -> NbdDevice:
    """Connect to the NBD export `uri` names (`nbd://HOST[:PORT]/NAME` or
    `nbd+unix:///NAME?socket=PATH`) and return it as a block device.

    `writable=True` fails at once if the server exports it read-only. `connections` > 1 opens
    that many connections when the server advertises NBD_FLAG_CAN_MULTI_CONN (one otherwise).
    `connect_timeout_s` bounds connecting, and then the handshake; `reply_timeout_s` bounds
    the wait for each reply (and any send that makes no progress) before the connection is
    declared lost; `max_in_flight` is the number of requests one connection has outstanding at
    most."""
    parsed = uri if isinstance(uri, NbdUri) else parse_nbd_uri(uri)
    if not 1 <= connections <= MAX_CONNECTIONS:
        raise UsageError(f"connections must be 1 to {MAX_CONNECTIONS}, not {connections}")
    if connect_timeout_s <= 0 or reply_timeout_s <= 0:
        raise UsageError(f"timeouts must be positive (connect {connect_timeout_s}, reply "
                         f"{reply_timeout_s})")
    if max_in_flight < 1:
        raise UsageError(f"max_in_flight must be at least 1, not {max_in_flight}")
    where = str(parsed)
    opened: list[_Connection] = []

    def connect(index: int) -> tuple[_Connection, ExportInfo]:
        sock, info = _negotiate(parsed, where, connect_timeout_s)
        try:
            conn = _Connection(sock, where, index, reply_timeout_s=reply_timeout_s,
                               max_in_flight=max_in_flight)
        except BaseException:
            sock.close()
            raise
        opened.append(conn)
        return conn, info

    try:
        _, info = connect(0)
        if writable and info.read_only:
            raise NbdConnectError(
                f"{where}: the server exports {info.export_name!r} read-only, so it cannot be "
                "opened for writing; open it with writable=False, or export it writable",
                errno_name="EROFS")
        wanted = connections
        if wanted > 1 and not info.can_multi_conn:
            log.info("%s: the server does not advertise NBD_FLAG_CAN_MULTI_CONN; using one "
                     "connection instead of %d", where, wanted)
            wanted = 1
        for index in range(1, wanted):
            _, other = connect(index)
            if (other.size_bytes, other.transmission_flags) != \
                    (info.size_bytes, info.transmission_flags):
                raise NbdConnectError(
                    f"{where}: connection {index + 1} sees a different export (size "
                    f"{other.size_bytes} bytes, flags {other.transmission_flags:#x}) than the "
                    f"first ({info.size_bytes} bytes, {info.transmission_flags:#x})")
    except BaseException:
        for conn in opened:
            conn.close()
        raise
    log.debug("%s: %d bytes, flags %#x, blocks %d/%d/%d bytes, %d connection(s)", where,
              info.size_bytes, info.transmission_flags, info.min_block_bytes,
              info.preferred_block_bytes, info.max_payload_bytes, len(opened))
    return NbdDevice(parsed, info, opened, writable=writable)
