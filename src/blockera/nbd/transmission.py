"""The transmission phase of one connection: requests in, device calls, replies out.

Owns NBD_CMD_READ, WRITE, FLUSH, TRIM, WRITE_ZEROES (with NBD_CMD_FLAG_NO_HOLE and
NBD_CMD_FLAG_FAST_ZERO), CACHE (accepted as a no-op) and DISC; NBD_CMD_FLAG_FUA (the command,
then a device flush); simple replies and, when negotiated, structured replies (a READ answers
with one NBD_REPLY_TYPE_OFFSET_DATA chunk, so NBD_CMD_FLAG_DF always holds; errors are
NBD_REPLY_TYPE_ERROR chunks carrying the message).

Requests are served by a small pool of threads per connection (`blockera.nbd.workers`): one
thread at a time receives the next request (a WRITE's payload into that thread's own buffer);
it executes fast requests itself, and when a request blocks, another thread takes over
receiving (at once when the request announces its wait, `blockera.blocking`), so a pipelining
client has several requests in flight and replies go out as they complete, matched by cookie. A reply is written with one `sendmsg` under the send lock; the
replies of requests executed on the reading thread while more requests are already buffered
are held back and sent together (one `sendmsg` for up to `_CORK_BUFFERS` buffers or
`_CORK_BYTES`), at the latest when the reader would wait for the client, when a request is
handed to another thread, or when the connection ends. A send never waits for the client:
what the socket does not take at once goes to a backlog that a thread of its own sends (so a
device reporting writes from its own thread, an era pass, is never held up by a client that
does not read its replies); while more than `_BACKLOG_BYTES` wait there, no request is read.
Writes submitted to a device and not yet reported are bounded (`_SUBMITTED_WRITES`,
`_SUBMITTED_BYTES`): beyond that, the reading waits. No lock is held across a device call,
so a device that blocks (a suspended device-mapper device, an era device committing its
metadata) only holds up the requests sent to it.

Validation follows the protocol's error rules: unknown commands or flags, misaligned requests
and reads/trims beyond the end are NBD_EINVAL (alignment is checked here only for clients that
requested NBD_INFO_BLOCK_SIZE with NBD_OPT_GO and so agreed to the constraints; for the others
the protocol's default minimum block size of 1 applies, and a device that needs aligned I/O,
such as a device-mapper device, refuses what it cannot do with an EINVAL error of its own);
writes beyond the end NBD_ENOSPC; writes to a read-only export NBD_EPERM; a READ or WRITE larger
than the maximum payload NBD_EINVAL (a structured READ NBD_EOVERFLOW) -- an oversized WRITE's
payload is read and dropped in bounded pieces, so the connection stays in step. A bad request
magic is a protocol violation: the connection is closed once the requests already in flight have
been answered.

See docs/nbd.md §3.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
from collections.abc import Callable

from blockera.blocking import at_end_of_reports
from blockera.errors import BlockeraError, DeviceError
from blockera.nbd import protocol as p
from blockera.nbd.errors import ClientDisconnected, ClientProtocolError, is_unsupported, \
    message_bytes, nbd_error_for
from blockera.nbd.handshake import Negotiated
from blockera.nbd.limits import BlockLimits
from blockera.nbd.wire import SocketReader, send_buffers, send_without_waiting
from blockera.nbd.workers import Workers

log = logging.getLogger(__name__)

_KEEP_BUFFER_BYTES = 4 << 20
_CORK_BUFFERS = 128
_CORK_BYTES = 256 << 10
_BACKLOG_BYTES = 4 << 20        # replies waiting for the client before reading stops
_SUBMITTED_WRITES = 256         # submitted writes in a device, at most (and their bytes:)
_SUBMITTED_BYTES = 64 << 20
_DATA_CHUNK = struct.Struct(">IHHQIQ")  # structured reply header + OFFSET_DATA offset
_OK = object()  # marks a request whose validation passed


class _Request:
    __slots__ = ("flags", "command", "cookie", "offset", "length", "payload", "error")

    def __init__(self, flags: int, command: int, cookie: int, offset: int, length: int,
                 payload: memoryview | None, error: tuple[int, str] | None) -> None:
        self.flags = flags
        self.command = command
        self.cookie = cookie
        self.offset = offset
        self.length = length
        self.payload = payload
        self.error = error


class Transmission:
    """Serves one negotiated connection until the client disconnects or `stop()` is called.
    `run()` makes the calling thread the first worker; `on_finished` is called once, by the
    last worker to leave, after the socket is closed."""

    def __init__(self, sock: socket.socket, reader: SocketReader, negotiated: Negotiated,
                 limits: BlockLimits, *, max_workers: int, peer: str,
                 on_finished: Callable[[], None]) -> None:
        self._sock = sock
        self._reader = reader
        self._device = negotiated.export.device
        self._export = negotiated.export
        self._size = negotiated.size_bytes
        self._structured = negotiated.structured_replies
        flags = negotiated.transmission_flags
        self._read_only = bool(flags & p.FLAG_READ_ONLY)
        self._fua_ok = bool(flags & p.FLAG_SEND_FUA)
        self._limits = limits
        self._enforce_alignment = negotiated.block_sizes_agreed
        self._max_payload = limits.max_payload_bytes
        self._peer = peer
        self._on_finished = on_finished
        self._submit = getattr(self._device, "submit_write", None)
        self._submitted = 0                 # writes handed to the device, not yet answered
        self._submitted_bytes = 0
        self._submitted_cv = threading.Condition()
        self._send_lock = threading.Lock()
        self._send_cv = threading.Condition(self._send_lock)
        self._send_failed = False
        self._backlog: list[bytes | bytearray | memoryview] = []   # replies not yet taken
        self._backlog_bytes = 0
        self._draining = False
        self._corked: list[bytes | bytearray | memoryview] = []
        self._corked_bytes = 0
        self._local = threading.local()
        reader.before_wait = self._flush_replies
        self._workers: Workers[_Request] = Workers(
            receive=self._next_request, execute=self._execute, interrupt=self._abort,
            max_workers=max_workers, name=f"nbd {peer}", on_finished=self._finished,
            on_hand_over=self._handed_over)

    # -- life cycle --------------------------------------------------------------------------
    def run(self) -> None:
        self._workers.run()

    def stop(self) -> None:
        """Stop reading requests; those in flight are finished and answered, then the
        connection closes."""
        self._workers.stop()
        try:
            self._sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass

    def _abort(self) -> None:
        self._workers.stop()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _finished(self) -> None:
        with self._submitted_cv:
            while self._submitted:
                self._submitted_cv.wait()
        try:
            self._reader.before_wait = None
            self._flush_replies()
            self._wait_for_backlog(0)
            self._sock.close()
        finally:
            self._on_finished()

    def _handed_over(self) -> None:
        """This thread's request is about to wait and another thread reads on: its reply is
        no longer held back, nor are the replies already held."""
        self._local.inline = False
        self._flush_replies()

    def _next_request(self) -> _Request | None:
        """The next request, or None when the connection is over (disconnect, NBD_CMD_DISC,
        protocol violation)."""
        self._wait_for_backlog(_BACKLOG_BYTES)    # a client not reading its replies
        try:
            request = self._receive()
        except ClientDisconnected as exc:
            if exc.clean:
                log.debug("%s: client disconnected", self._peer)
            else:
                log.info("%s: client went away: %s", self._peer, exc)
            return None
        except ClientProtocolError as exc:
            log.warning("%s: closing the connection: %s", self._peer, exc)
            return None
        except Exception:
            log.exception("%s: receiving a request failed; closing the connection",
                          self._peer)
            self._abort()
            return None
        if request is None:
            log.debug("%s: NBD_CMD_DISC", self._peer)
        return request

    # -- receiving ---------------------------------------------------------------------------
    def _payload_buffer(self, length: int) -> memoryview:
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) < length:
            buf = bytearray(length)
            if length <= _KEEP_BUFFER_BYTES:
                self._local.buf = buf
        return memoryview(buf)[:length]

    def _receive(self) -> _Request | None:
        """The next request (None for NBD_CMD_DISC); a WRITE's payload is read with it."""
        magic, flags, command, cookie, offset, length = p.REQUEST.unpack(
            self._reader.take(p.REQUEST.size))
        if magic != p.REQUEST_MAGIC:
            raise ClientProtocolError(f"bad request magic {magic:#x}")
        if command == p.CMD_WRITE:
            if length > self._max_payload:
                self._reader.skip(length)
                return _Request(flags, command, cookie, offset, length, None, (
                    p.EINVAL, f"write of {length} bytes exceeds the maximum payload of "
                    f"{self._max_payload} bytes"))
            payload = self._payload_buffer(length)
            self._reader.read_into(payload)
            return _Request(flags, command, cookie, offset, length, payload, None)
        if command == p.CMD_DISC:
            return None
        return _Request(flags, command, cookie, offset, length, None, None)

    # -- validation --------------------------------------------------------------------------
    def _invalid(self, r: _Request) -> tuple[int, str] | None:
        """Why a request must fail before reaching the device, or None."""
        command, flags = r.command, r.flags
        allowed = p.CMD_FLAG_FUA if self._fua_ok else 0
        if command == p.CMD_READ:
            if self._structured:
                allowed |= p.CMD_FLAG_DF
        elif command == p.CMD_WRITE_ZEROES:
            allowed |= p.CMD_FLAG_NO_HOLE | p.CMD_FLAG_FAST_ZERO
        elif command not in (p.CMD_WRITE, p.CMD_FLUSH, p.CMD_TRIM, p.CMD_CACHE):
            name = p.COMMAND_NAMES.get(command, f"command {command}")
            return p.EINVAL, f"{name} is not supported"
        if flags & ~allowed:
            return p.EINVAL, (f"flags {flags & ~allowed:#x} are not valid for "
                              f"{p.COMMAND_NAMES[command]}")
        if command == p.CMD_FLUSH:
            if r.offset or r.length:
                return p.EINVAL, "FLUSH must have zero offset and length"
            return None
        writes = command in (p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES)
        if writes and self._read_only:
            return p.EPERM, f"export {self._export.name!r} is read-only"
        if command == p.CMD_READ and r.length > self._max_payload:
            return (p.EOVERFLOW if self._structured else p.EINVAL), (
                f"read of {r.length} bytes exceeds the maximum payload of "
                f"{self._max_payload} bytes")
        if self._enforce_alignment and self._limits.misaligned(r.offset, r.length, self._size):
            return p.EINVAL, (f"request at byte {r.offset}, length {r.length} is not aligned "
                              f"to the minimum block size of {self._limits.min_block_bytes}")
        if r.offset + r.length > self._size:
            return (p.ENOSPC if command in (p.CMD_WRITE, p.CMD_WRITE_ZEROES) else p.EINVAL), (
                f"request at byte {r.offset}, length {r.length} goes beyond the end of the "
                f"export ({self._size} bytes)")
        return None

    # -- execution ---------------------------------------------------------------------------
    def _execute(self, r: _Request, inline: bool = False) -> None:
        self._local.inline = inline
        if not inline and self._corked:
            self._flush_replies()  # this request may block: send what is held back first
        error = r.error or self._invalid(r)
        if error is not None:
            log.debug("%s: %s refused: %s", self._peer,
                      p.COMMAND_NAMES.get(r.command, r.command), error[1])
            self._reply_error(r.cookie, *error)
            return
        device = self._device
        command = r.command
        try:
            if command == p.CMD_READ:
                self._read(r)
                return
            if command == p.CMD_WRITE:
                if self._submit is not None and not r.flags & p.CMD_FLAG_FUA:
                    self._submit_write(r)
                    return
                device.write(r.offset, r.payload)
            elif command == p.CMD_FLUSH:
                device.flush()
            elif command == p.CMD_WRITE_ZEROES:
                if r.flags & p.CMD_FLAG_FAST_ZERO and not self._export.fast_zero:
                    self._reply_error(r.cookie, p.ENOTSUP,
                                      "zeroing is not faster than writing on this device")
                    return
                if r.length:
                    device.write_zeroes(r.offset, r.length)
            elif command == p.CMD_TRIM:
                if r.length and not self._trim(r):
                    self._reply_ok(r.cookie)
                    return
            # CMD_CACHE: a hint with nothing to do; reaching here means it was valid.
            if r.flags & p.CMD_FLAG_FUA and command != p.CMD_FLUSH:
                device.flush()
        except Exception as exc:
            self._device_failed(r, exc)
            return
        self._reply_ok(r.cookie)

    def _submit_write(self, r: _Request) -> None:
        """Hand the write to the device; it is answered when the device reports (an era
        device holds a first write back until its mark is committed, without a thread of
        this connection waiting for it)."""
        assert self._submit is not None and r.payload is not None
        with self._submitted_cv:
            while self._submitted and (
                    self._submitted >= _SUBMITTED_WRITES or
                    self._submitted_bytes + r.length > _SUBMITTED_BYTES):
                self._submitted_cv.wait()
        self._count_submitted(1, r.length)
        try:
            self._submit(r.offset, r.payload, lambda error: self._written(r, error))
        except Exception:
            self._count_submitted(-1, -r.length)
            raise

    def _written(self, r: _Request, error: BlockeraError | None) -> None:
        try:
            if error is not None:
                self._device_failed(r, error)
            elif at_end_of_reports(self._flush_replies):   # the batch's replies go together
                self._send([p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, r.cookie)], hold=True)
            else:
                self._reply_ok(r.cookie)
        finally:
            self._count_submitted(-1, -r.length)

    def _count_submitted(self, delta: int, delta_bytes: int) -> None:
        with self._submitted_cv:
            self._submitted += delta
            self._submitted_bytes += delta_bytes
            if delta < 0:
                self._submitted_cv.notify_all()

    def _trim(self, r: _Request) -> bool:
        """Discard; False when the device does not support it (TRIM is only a hint)."""
        try:
            self._device.discard(r.offset, r.length)
        except Exception as exc:
            if is_unsupported(exc):
                log.debug("%s: TRIM ignored: %s", self._peer, exc)
                return False
            raise
        return True

    def _read(self, r: _Request) -> None:
        if r.length == 0:
            if self._structured:
                self._send([p.STRUCTURED_REPLY.pack(p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE,
                                                    p.REPLY_TYPE_NONE, r.cookie, 0)])
            else:
                self._reply_ok(r.cookie)
            return
        try:
            data = self._device.read(r.offset, r.length)
            if len(data) != r.length:
                raise DeviceError(f"device returned {len(data)} bytes for a read of "
                                  f"{r.length} at byte {r.offset}")
        except Exception as exc:
            self._device_failed(r, exc)
            return
        if self._structured:
            header = _DATA_CHUNK.pack(p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE,
                                      p.REPLY_TYPE_OFFSET_DATA, r.cookie, r.length + 8, r.offset)
        else:
            header = p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, r.cookie)
        self._send([header, data])

    def _device_failed(self, r: _Request, exc: Exception) -> None:
        code = nbd_error_for(exc)
        name = p.COMMAND_NAMES.get(r.command, str(r.command))
        if isinstance(exc, BlockeraError):
            log.warning("%s: %s at byte %d, length %d failed: %s", self._peer, name, r.offset,
                        r.length, exc)
            text = str(exc)
        else:
            log.error("%s: %s at byte %d, length %d raised an unexpected error", self._peer,
                      name, r.offset, r.length, exc_info=exc)
            text = f"{type(exc).__name__}: {exc}"
        self._reply_error(r.cookie, code, text)

    # -- replies -----------------------------------------------------------------------------
    def _reply_ok(self, cookie: int) -> None:
        self._send([p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, cookie)])

    def _reply_error(self, cookie: int, code: int, text: str) -> None:
        if self._structured:
            msg = message_bytes(text)
            self._send([p.STRUCTURED_REPLY.pack(p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE,
                                                p.REPLY_TYPE_ERROR, cookie, 6 + len(msg)) +
                        p.ERROR_PREFIX.pack(code, len(msg)) + msg])
        else:
            self._send([p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, code, cookie)])

    def _send(self, buffers: list[bytes | bytearray | memoryview], *,
              hold: bool = False) -> None:
        """Send one reply, or hold it back while the reading thread has more requests to
        execute right away, or when `hold` says more replies follow at once (see the module
        docstring)."""
        cork = hold or getattr(self._local, "inline", False) and \
            self._reader.buffered_bytes >= p.REQUEST.size
        with self._send_lock:
            if self._send_failed:
                return
            if cork or self._corked:
                self._corked.extend(buffers)
                for b in buffers:
                    self._corked_bytes += len(b)
                if cork and len(self._corked) < _CORK_BUFFERS and \
                        self._corked_bytes < _CORK_BYTES:
                    return
                buffers, self._corked, self._corked_bytes = self._corked, [], 0
            self._send_now(buffers)

    def _flush_replies(self) -> None:
        """Send the replies held back, if any."""
        if not self._corked:
            return
        with self._send_lock:
            if self._send_failed or not self._corked:
                return
            buffers, self._corked, self._corked_bytes = self._corked, [], 0
            self._send_now(buffers)

    def _send_now(self, buffers: list[bytes | bytearray | memoryview]) -> None:
        """Under the send lock. Never waits for the client: what the socket does not take at
        once goes to the backlog, which a thread of its own sends."""
        if self._draining:
            self._add_to_backlog(buffers)
            return
        try:
            left = send_without_waiting(self._sock, buffers)
        except OSError as exc:
            self._send_failed_with(exc)
            return
        if not left:
            return
        self._add_to_backlog(left)
        self._draining = True
        try:
            threading.Thread(target=self._drain, name=f"nbd {self._peer} replies",
                             daemon=True).start()
        except RuntimeError:        # no thread to be had: send here, waiting
            self._draining = False
            backlog, self._backlog, self._backlog_bytes = self._backlog, [], 0
            try:
                send_buffers(self._sock, backlog)
            except OSError as exc:
                self._send_failed_with(exc)

    def _add_to_backlog(self, buffers: list[bytes | bytearray | memoryview]) -> None:
        self._backlog.extend(buffers)
        for b in buffers:
            self._backlog_bytes += len(b)

    def _drain(self) -> None:
        """Send the backlog, waiting for the client as long as it takes, until it is empty."""
        while True:
            with self._send_lock:
                if self._send_failed or not self._backlog:
                    self._draining = False
                    self._backlog, self._backlog_bytes = [], 0
                    self._send_cv.notify_all()
                    return
                buffers, self._backlog, self._backlog_bytes = self._backlog, [], 0
                self._send_cv.notify_all()
            try:
                send_buffers(self._sock, buffers)
            except OSError as exc:
                with self._send_lock:
                    self._send_failed_with(exc)

    def _send_failed_with(self, exc: OSError) -> None:
        """Under the send lock."""
        self._send_failed = True
        self._corked, self._corked_bytes = [], 0
        self._send_cv.notify_all()
        log.info("%s: cannot send a reply, closing: %s", self._peer, exc)
        self._abort()

    def _wait_for_backlog(self, limit_bytes: int) -> None:
        """Wait while more than `limit_bytes` of replies wait for the client."""
        with self._send_lock:
            while self._draining and self._backlog_bytes > limit_bytes and \
                    not self._send_failed:
                self._send_cv.wait()
