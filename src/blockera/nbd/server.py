"""The NBD server: listeners, the accept loop, the set of live connections, shutdown.

`serve()` starts a server and returns it running; `NbdServer.shutdown()` stops accepting, lets
every connection finish the requests it has in flight, closes the connections and removes the
unix socket. One thread accepts on all listeners; each connection has its own threads (see
`connection`, `transmission` and `workers`). The server holds its own lock only to track
connections, never across a device call.

See docs/nbd.md §1, §4.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from blockera.errors import UsageError
from blockera.nbd.connection import Connection
from blockera.nbd.exports import ExportResolver, ExportSource
from blockera.nbd.limits import BlockLimits
from blockera.nbd.listeners import open_tcp_listener
from blockera.unix_socket import open_unix_listener, remove_own_socket, socket_identity

log = logging.getLogger(__name__)

DEFAULT_MAX_CONNECTIONS = 128
DEFAULT_MAX_HANDSHAKES = 32
DEFAULT_WORKERS_PER_CONNECTION = 16
DEFAULT_HANDSHAKE_TIMEOUT_S = 10.0


class NbdServer:
    """An NBD server over an export source (see `blockera.nbd.exports`).

    Listens on `unix_path` and/or `tcp` = (host, port); port 0 picks a free port (read it back
    from `tcp_address`). A TCP host that is not a loopback address is refused unless
    `allow_remote` is true. `read_only` exports everything read-only; `default_export` is the
    export served to clients that ask for the empty name.

    Connections still in the handshake are counted apart from those being served: at most
    `max_handshakes` at once, each for at most `handshake_timeout_s`; when a new one arrives
    while that many are waiting, the oldest waiting one is dropped (a real client finishes its
    handshake in milliseconds), so idle connections cannot lock clients out."""

    def __init__(self, exports: ExportSource, *,
                 unix_path: str | os.PathLike[str] | None = None,
                 tcp: tuple[str | None, int] | None = None,
                 allow_remote: bool = False,
                 read_only: bool = False,
                 default_export: str | None = None,
                 limits: BlockLimits | None = None,
                 workers_per_connection: int = DEFAULT_WORKERS_PER_CONNECTION,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 max_handshakes: int = DEFAULT_MAX_HANDSHAKES,
                 handshake_timeout_s: float = DEFAULT_HANDSHAKE_TIMEOUT_S,
                 unix_mode: int = 0o600) -> None:
        if unix_path is None and tcp is None:
            raise UsageError("nothing to listen on: give a unix socket path, a TCP address "
                             "or both")
        if workers_per_connection < 1:
            raise UsageError(f"workers_per_connection must be at least 1, "
                             f"not {workers_per_connection}")
        if max_connections < 1 or max_handshakes < 1:
            raise UsageError(f"max_connections and max_handshakes must be at least 1, not "
                             f"{max_connections} and {max_handshakes}")
        if handshake_timeout_s <= 0:
            raise UsageError(f"handshake_timeout_s must be positive, not {handshake_timeout_s}")
        self._resolver = ExportResolver(exports, read_only=read_only,
                                        default_export=default_export)
        self._limits = limits if limits is not None else BlockLimits()
        self._workers = workers_per_connection
        self._max_connections = max_connections
        self._max_handshakes = max_handshakes
        self._handshake_timeout_s = handshake_timeout_s
        self._unix_path = Path(unix_path) if unix_path is not None else None
        self._unix_mode = unix_mode
        self._tcp = tcp
        self._allow_remote = allow_remote
        self._listeners: list[socket.socket] = []
        self._unix_inode: tuple[int, int] | None = None
        self._lock = threading.Lock()
        self._connections: dict[Connection, None] = {}    # insertion order: oldest first
        self._stopping = False
        self._accepted = 0
        self._accept_thread: threading.Thread | None = None
        self._wake_r, self._wake_w = -1, -1
        self.tcp_address: tuple[str, int] | None = None

    # -- properties --------------------------------------------------------------------------
    @property
    def unix_path(self) -> Path | None:
        return self._unix_path

    @property
    def limits(self) -> BlockLimits:
        return self._limits

    def connection_count(self) -> int:
        with self._lock:
            return len(self._connections)

    # -- start -------------------------------------------------------------------------------
    def start(self) -> "NbdServer":
        if self._accept_thread is not None:
            raise UsageError("the server is already started")
        try:
            if self._tcp is not None:
                host, port = self._tcp
                sock = open_tcp_listener(host, port, allow_remote=self._allow_remote)
                self._listeners.append(sock)
                addr = sock.getsockname()
                self.tcp_address = (str(addr[0]), int(addr[1]))
            if self._unix_path is not None:
                unix = open_unix_listener(self._unix_path, mode=self._unix_mode)
                self._listeners.append(unix)
                self._unix_inode = socket_identity(unix)
        except BaseException:
            self._close_listeners()
            raise
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._accept_thread = threading.Thread(target=self._accept_loop, name="nbd accept",
                                               daemon=True)
        self._accept_thread.start()
        where = [f"unix:{self._unix_path}"] if self._unix_path else []
        if self.tcp_address:
            where.append(f"tcp:{self.tcp_address[0]}:{self.tcp_address[1]}")
        log.info("NBD server listening on %s", ", ".join(where))
        return self

    def _accept_loop(self) -> None:
        with selectors.DefaultSelector() as sel:
            for sock in self._listeners:
                sel.register(sock, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping:
                for key, _ in sel.select():
                    if key.fileobj == self._wake_r or self._stopping:
                        return
                    self._accept(key.fileobj)  # type: ignore[arg-type]

    def _accept(self, listener: socket.socket) -> None:
        try:
            sock, address = listener.accept()
        except OSError as exc:
            log.warning("accept failed: %s", exc)
            time.sleep(0.05)  # e.g. out of file descriptors: do not spin
            return
        self._accepted += 1
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = f"connection {self._accepted} (tcp {address[0]}:{address[1]})"
        else:
            peer = f"connection {self._accepted} (unix)"
        with self._lock:
            waiting = [c for c in self._connections if c.in_handshake]
            if len(self._connections) - len(waiting) >= self._max_connections:
                log.warning("%s: refused, already serving %d connections", peer,
                            self._max_connections)
                sock.close()
                return
            if len(waiting) >= self._max_handshakes:
                log.warning("%s: %d connections in the handshake; dropping the oldest, %s",
                            peer, len(waiting), waiting[0].peer)
                waiting[0].stop()
            conn = Connection(sock, peer, resolver=self._resolver, limits=self._limits,
                              max_workers=self._workers,
                              handshake_timeout_s=self._handshake_timeout_s,
                              stopping=lambda: self._stopping, on_closed=self._closed)
            self._connections[conn] = None
        log.debug("%s: connected", peer)
        try:
            conn.start()
        except RuntimeError:
            log.error("%s: cannot start a thread for the connection", peer)
            with self._lock:
                self._connections.pop(conn, None)
            sock.close()

    def _closed(self, conn: Connection) -> None:
        with self._lock:
            self._connections.pop(conn, None)
        log.debug("%s: closed", conn.peer)

    # -- stop --------------------------------------------------------------------------------
    def shutdown(self, timeout_s: float | None = 30.0) -> bool:
        """Stop accepting, finish the requests in flight, close every connection. Returns
        False if some connection had not finished within `timeout_s` (a device that stays
        blocked); those are then cut."""
        self._stopping = True
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass
        if self._accept_thread is not None and \
                self._accept_thread is not threading.current_thread():
            self._accept_thread.join()
        self._close_listeners()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            conn.stop()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        clean = True
        for conn in connections:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not conn.finished.wait(remaining):
                clean = False
                log.warning("%s: requests still in flight after %s s; cutting the connection",
                            conn.peer, timeout_s)
                conn.force_close()
        log.info("NBD server stopped")
        return clean

    def _close_listeners(self) -> None:
        for sock in self._listeners:
            sock.close()
        self._listeners.clear()
        if self._unix_path is not None and self._unix_inode is not None:
            remove_own_socket(self._unix_path, self._unix_inode)
            self._unix_inode = None

    def __enter__(self) -> "NbdServer":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.shutdown()


def serve(exports: ExportSource, **options: Any) -> NbdServer:
    """Start an NBD server over `exports` with `NbdServer`'s keyword options and return it
    running."""
    return NbdServer(exports, **options).start()
