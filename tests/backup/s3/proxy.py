"""A TCP proxy on loopback that mistreats connections, for the S3 backend's fault tests.

Each accepted connection gets a fate drawn from a seeded random generator (or the next one of
a script, for the first connections): forwarded untouched (with probability 1 - fault_share),
or, once a random number of bytes (exponentially distributed, `mean_offset_bytes` on average:
so a connection that is kept alive meets its fault sooner or later) has passed in one
direction, **dropped** (both sides reset), **stalled** (nothing more moves
for `stall_s`, then both sides closed), or **truncated** (both sides closed cleanly mid-stream,
e.g. inside a response body); or answered at once with **503 SlowDown**, as a throttling S3
server answers, without reaching the server. `fired` counts the faults that happened.
"""

from __future__ import annotations

import random
import select
import socket
import struct
import threading
from collections import Counter

FAULTS = ("drop", "stall", "truncate", "slowdown")
SLOWDOWN = (b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: "
            b"%d\r\nConnection: close\r\n\r\n%s")
SLOWDOWN_BODY = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                 b"<Message>Please reduce your request rate.</Message></Error>")


class FaultyProxy:
    def __init__(self, upstream_port: int, *, seed: int, fault_share: float = 1.0,
                 stall_s: float = 1.0, mean_offset_bytes: int = 1 << 20,
                 script: tuple[str, ...] = ()) -> None:
        self.upstream_port = upstream_port
        self.fault_share = fault_share
        self.stall_s = stall_s
        self.mean_offset_bytes = mean_offset_bytes
        self.script = list(script)
        self.fired: Counter[str] = Counter()
        self.connections = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._stopped = threading.Event()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, daemon=True, name="proxy")
        self._thread.start()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
                if self.script:
                    fate, offset = self.script.pop(0), self._rng.randrange(300)
                elif self._rng.random() < self.fault_share:
                    fate = self._rng.choice(FAULTS)
                    offset = int(self._rng.expovariate(1 / self.mean_offset_bytes))
                else:
                    fate, offset = "clean", 0
                upstream = self._rng.random() < 0.5
            threading.Thread(target=self._serve, args=(client, fate, offset, upstream),
                             daemon=True).start()

    def _track(self, *socks: socket.socket) -> None:
        with self._lock:
            self._open.update(socks)

    def _close(self, *socks: socket.socket, reset: bool = False) -> None:
        for s in socks:
            try:
                if reset:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                else:
                    s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                s.close()
            except OSError:
                pass
            with self._lock:
                self._open.discard(s)

    def _serve(self, client: socket.socket, fate: str, offset: int, upstream: bool) -> None:
        """One connection, in one thread (select over both sockets), so that closing a socket
        really closes it: a socket another thread is blocked on would not send its FIN/RST."""
        self._track(client)
        if fate == "slowdown":
            client.settimeout(5)
            head = b""
            try:
                while b"\r\n\r\n" not in head:
                    piece = client.recv(65536)
                    if not piece:
                        break
                    head += piece
                client.sendall(SLOWDOWN % (len(SLOWDOWN_BODY), SLOWDOWN_BODY))
                with self._lock:
                    self.fired["slowdown"] += 1
            except OSError:
                pass
            self._close(client)
            return
        try:
            server = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
        except OSError:
            self._close(client, reset=True)
            return
        self._track(server)
        peer = {client: server, server: client}
        limit = {client: offset if fate != "clean" and upstream else None,
                 server: offset if fate != "clean" and not upstream else None}
        passed = {client: 0, server: 0}
        open_ends = {client, server}
        try:
            while open_ends and not self._stopped.is_set():
                ready, _, _ = select.select(list(open_ends), [], [], 0.2)
                for src in ready:
                    dst = peer[src]
                    try:
                        data = src.recv(65536)
                    except OSError:
                        data = b""
                    if not data:
                        open_ends.discard(src)
                        try:
                            dst.shutdown(socket.SHUT_WR)
                        except OSError:
                            pass
                        continue
                    cap = limit[src]
                    if cap is not None and passed[src] + len(data) > cap:
                        try:
                            dst.sendall(data[:cap - passed[src]])
                        except OSError:
                            pass
                        with self._lock:
                            self.fired[fate] += 1
                        if fate == "stall":
                            self._stopped.wait(self.stall_s)
                        self._close(client, server, reset=fate == "drop")
                        return
                    try:
                        dst.sendall(data)
                    except OSError:
                        self._close(client, server, reset=True)
                        return
                    passed[src] += len(data)
        finally:
            self._close(client, server)

    def stop(self) -> None:
        self._stopped.set()
        self._listener.close()
        with self._lock:
            socks = list(self._open)
        self._close(*socks)
        self._thread.join(timeout=5)
