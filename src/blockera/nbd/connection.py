"""One client connection's life: handshake, then transmission, then close.

A connection runs in its own thread (plus the transmission phase's workers). `stop()` ends it
gracefully whatever phase it is in: during the handshake the socket is shut down; during
transmission no further requests are read, those in flight are answered, then the socket
closes. `finished` is set when everything is released, the claim on the negotiated export
included (see `blockera.nbd.exports`).

See docs/nbd.md §4.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable

from blockera.nbd.errors import ClientDisconnected, ClientProtocolError
from blockera.nbd.exports import ExportResolver, Release
from blockera.nbd.handshake import Handshake
from blockera.nbd.limits import BlockLimits
from blockera.nbd.transmission import Transmission
from blockera.nbd.wire import SocketReader

log = logging.getLogger(__name__)


class Connection:
    def __init__(self, sock: socket.socket, peer: str, *, resolver: ExportResolver,
                 limits: BlockLimits, max_workers: int, handshake_timeout_s: float,
                 stopping: Callable[[], bool],
                 on_closed: Callable[["Connection"], None]) -> None:
        self.sock = sock
        self.peer = peer
        self.export_name: str | None = None
        self.finished = threading.Event()
        self._resolver = resolver
        self._limits = limits
        self._max_workers = max_workers
        self._handshake_timeout_s = handshake_timeout_s
        self._stopping = stopping
        self._on_closed = on_closed
        self._lock = threading.Lock()
        self._stop_requested = False
        self._transmission: Transmission | None = None
        self._release: Release | None = None
        self.in_handshake = True     # until transmission starts or the connection ends

    def start(self) -> None:
        threading.Thread(target=self._run, name=f"nbd {self.peer}", daemon=True).start()

    def stop(self) -> None:
        with self._lock:
            self._stop_requested = True
            transmission = self._transmission
        if transmission is not None:
            transmission.stop()
        else:
            self._shutdown_socket()

    def force_close(self) -> None:
        """Cut the connection now (after a graceful stop timed out)."""
        self._shutdown_socket()

    def _shutdown_socket(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _claimed(self) -> None:
        self.in_handshake = False

    def _finish(self) -> None:
        self.in_handshake = False
        try:
            self.sock.close()
        finally:
            release, self._release = self._release, None
            if release is not None:
                try:
                    release()
                except Exception:
                    log.exception("%s: releasing export %r failed", self.peer, self.export_name)
            self.finished.set()
            self._on_closed(self)

    def _run(self) -> None:
        reader = SocketReader(self.sock)
        try:
            negotiated = Handshake(self.sock, reader, self._resolver, self._limits,
                                   timeout_s=self._handshake_timeout_s,
                                   stopping=self._stopping, peer=self.peer,
                                   on_claimed=self._claimed).run()
        except ClientDisconnected as exc:
            log.debug("%s: disconnected during the handshake: %s", self.peer, exc)
            negotiated = None
        except ClientProtocolError as exc:
            log.warning("%s: handshake failed, closing: %s", self.peer, exc)
            negotiated = None
        except OSError as exc:
            log.info("%s: handshake failed: %s", self.peer, exc)
            negotiated = None
        except Exception:
            log.exception("%s: unexpected error in the handshake", self.peer)
            negotiated = None
        if negotiated is None:
            self._finish()
            return
        self._release = negotiated.release
        with self._lock:
            if self._stop_requested:
                negotiated = None
            else:
                self.export_name = negotiated.export.name
                try:
                    self.sock.settimeout(None)
                except OSError:
                    negotiated = None
                if negotiated is not None:
                    self._transmission = Transmission(
                        self.sock, reader, negotiated, self._limits,
                        max_workers=self._max_workers, peer=self.peer,
                        on_finished=self._finish)
                    self.in_handshake = False
        if self._transmission is None:
            self._finish()
            return
        log.info("%s: serving export %r (%d bytes%s%s)", self.peer, negotiated.export.name,
                 negotiated.size_bytes, ", read-only" if negotiated.export.read_only else "",
                 ", structured replies" if negotiated.structured_replies else "")
        self._transmission.run()
