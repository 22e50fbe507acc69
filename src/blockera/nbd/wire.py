"""Byte transport for one NBD connection: a buffered reader and a gathering writer.

`SocketReader` pulls bytes off the socket in large `recv_into` calls into a preallocated
buffer, so a pipelining client's requests are usually parsed several per system call, and
reads large WRITE payloads straight into the caller's buffer. It is not thread-safe: the
transmission phase lets one thread at a time read. `before_wait`, when set, is called just
before the reader would block waiting for the peer (the transmission phase sends the replies
it has held back then). `send_buffers` writes several buffers with one `sendmsg` (header and
data without concatenating them).

See docs/nbd.md §3.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence

from blockera.nbd.errors import ClientDisconnected

_BUFFER_BYTES = 256 << 10
_DIRECT_THRESHOLD_BYTES = 64 << 10
_SKIP_CHUNK_BYTES = 1 << 20
_IOV_BUFFERS = 64           # buffers per sendmsg (well below any IOV_MAX)


class SocketReader:
    def __init__(self, sock: socket.socket, buffer_bytes: int = _BUFFER_BYTES) -> None:
        self._sock = sock
        self._buf = bytearray(buffer_bytes)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self.before_wait: Callable[[], None] | None = None

    @property
    def buffered_bytes(self) -> int:
        return self._end - self._start

    def _fill(self, need_bytes: int) -> None:
        """Make at least `need_bytes` (<= buffer size) available in the buffer."""
        if self._start == self._end:
            self._start = self._end = 0
        elif self._start + need_bytes > len(self._buf):
            avail = self._end - self._start
            self._buf[:avail] = bytes(self._view[self._start:self._end])  # regions may overlap
            self._start, self._end = 0, avail
        while self._end - self._start < need_bytes:
            try:
                got = self._recv_into(self._view[self._end:])
            except OSError as exc:
                raise ClientDisconnected(f"receive failed: {exc}") from None
            if got == 0:
                had = self._end - self._start
                raise ClientDisconnected(
                    "peer closed the connection" if had == 0 else
                    f"peer closed the connection in the middle of a message "
                    f"({had} of {need_bytes} bytes received)", clean=had == 0)
            self._end += got

    def _recv_into(self, target: memoryview) -> int:
        """One receive; with `before_wait` set, it is called first if the receive would block
        (a non-blocking attempt comes first, so it is not called while data is flowing)."""
        if self.before_wait is None:
            return self._sock.recv_into(target)
        try:
            return self._sock.recv_into(target, 0, socket.MSG_DONTWAIT)
        except BlockingIOError:
            self.before_wait()
            return self._sock.recv_into(target)

    def take(self, n_bytes: int) -> memoryview:
        """The next `n_bytes` (at most the buffer size) as a view into the buffer, valid until
        the next call on this reader."""
        if self._end - self._start < n_bytes:
            self._fill(n_bytes)
        start = self._start
        self._start = start + n_bytes
        return self._view[start:start + n_bytes]

    def take_bytes(self, n_bytes: int) -> bytes:
        """The next `n_bytes` as a copy; larger than the buffer is fine (handshake data)."""
        if n_bytes <= len(self._buf):
            return bytes(self.take(n_bytes))
        out = bytearray(n_bytes)
        self.read_into(memoryview(out))
        return bytes(out)

    def read_into(self, target: memoryview) -> None:
        """Fill all of `target`."""
        n_bytes = len(target)
        avail = self._end - self._start
        if avail < n_bytes and n_bytes - avail <= _DIRECT_THRESHOLD_BYTES \
                and n_bytes <= len(self._buf):
            self._fill(n_bytes)  # one receive that may also bring the next requests
            avail = self._end - self._start
        done = min(avail, n_bytes)
        target[:done] = self._view[self._start:self._start + done]
        self._start += done
        if done < n_bytes and self.before_wait is not None:
            self.before_wait()
        while done < n_bytes:
            try:
                got = self._sock.recv_into(target[done:], n_bytes - done, socket.MSG_WAITALL)
            except OSError as exc:
                raise ClientDisconnected(f"receive failed: {exc}") from None
            if got == 0:
                raise ClientDisconnected(f"peer closed the connection in the middle of a "
                                         f"payload ({done} of {n_bytes} bytes received)")
            done += got

    def skip(self, n_bytes: int) -> None:
        """Consume and drop `n_bytes` without holding more than a bounded buffer."""
        while n_bytes > 0:
            avail = self._end - self._start
            if avail:
                step = min(avail, n_bytes)
                self._start += step
                n_bytes -= step
                continue
            self._start = self._end = 0
            self._fill(min(n_bytes, len(self._buf)))


def send_without_waiting(sock: socket.socket, buffers: Sequence[bytes | bytearray | memoryview]
                         ) -> list[memoryview]:
    """Send what the socket takes at once, without waiting for room; what is left, in order
    (empty when everything went)."""
    try:
        sent = sock.sendmsg(buffers[:_IOV_BUFFERS], (), socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        sent = 0
    left = []
    for b in buffers:
        view = memoryview(b).cast("B")
        if sent >= len(view):
            sent -= len(view)
            continue
        left.append(view[sent:])
        sent = 0
    return left


def send_buffers(sock: socket.socket, buffers: Sequence[bytes | bytearray | memoryview]) -> None:
    """Send every byte of `buffers`, in order, with as few system calls as the socket allows."""
    total = 0
    for b in buffers:
        total += len(b)
    sent = sock.sendmsg(buffers[:_IOV_BUFFERS])
    if sent == total:
        return
    views = [memoryview(b).cast("B") for b in buffers]
    while True:
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        if not views:
            return
        views[0] = views[0][sent:]
        sent = sock.sendmsg(views[:_IOV_BUFFERS])
