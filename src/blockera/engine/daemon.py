"""The engine daemon: one `Engine` served on a unix socket (see `blockera.engine.protocol`).

The control socket is private (mode 0600) before it listens, whatever the umask; the state
directory (the socket's by default) holds `<socket name without suffix>.pid`, and on exit the
daemon removes only the socket it created and a pid file that still names it. Other services
over the same engine (the NBD export, `blockera.nbd.daemon_service`) are handed in as
`DaemonService` objects: they start before the control socket appears (so it existing means
everything is up) and stop right after it closes. On SIGTERM or SIGINT the daemon shuts down cleanly: it stops accepting
requests, stops the services (NBD clients are disconnected once their requests in flight are
answered), suspends every device (users before what they use) so that targets commit their
metadata, removes them and deletes the socket.

See docs/engine.md §2, §3.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import socketserver
import threading
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from blockera.engine.userspace import Engine
from blockera.engine.protocol import MAX_IO_BYTES, Reader, error_reply, send_message
from blockera.errors import BlockeraError, ListenError, UsageError
from blockera.unix_socket import open_unix_listener, remove_own_socket, socket_identity

log = logging.getLogger(__name__)


def _str(req: dict, key: str, default: str | None = None) -> str:
    value = req.get(key, default)
    if not isinstance(value, str):
        raise UsageError(f"request needs a string {key!r}")
    return value


def _int(req: dict, key: str) -> int:
    value = req.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise UsageError(f"request needs a non-negative integer {key!r}")
    return value


def _cwd(req: dict) -> str:
    """The client's working directory, against which relative paths in its table resolve."""
    cwd = _str(req, "cwd")
    if not os.path.isabs(cwd):
        raise UsageError("request needs the client's working directory as an absolute 'cwd'")
    return cwd


class EngineService:
    """Executes protocol requests against an engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def handle(self, req: dict, reader: Reader) -> tuple[dict, bytes]:
        op = req.get("op")
        e = self.engine
        name = req.get("name")
        simple: dict[str, Callable[[], Any]] = {
            "ping": lambda: "pong",
            "create": lambda: e.create(_str(req, "name"), req.get("table"),
                                       uuid=_str(req, "uuid", ""),
                                       read_only=bool(req.get("read_only")),
                                       cwd=_cwd(req)) and None,
            "load": lambda: e.load(_str(req, "name"), _str(req, "table"), cwd=_cwd(req)),
            "clear": lambda: e.clear(_str(req, "name")),
            "suspend": lambda: e.suspend(_str(req, "name")),
            "resume": lambda: e.resume(_str(req, "name")),
            "remove": lambda: e.remove(_str(req, "name")),
            "rename": lambda: e.rename(_str(req, "name"), _str(req, "new_name")),
            "message": lambda: e.message(_str(req, "name"), _int(req, "sector"),
                                         [str(a) for a in req.get("args", [])]),
            "status": lambda: e.status(name),
            "table": lambda: e.table(name),
            "info": lambda: e.info(name),
            "ls": lambda: e.ls(),
            "size": lambda: e.device(_str(req, "name")).size_bytes,
            "flush": lambda: e.device(_str(req, "name")).flush(),
            "discard": lambda: e.device(_str(req, "name")).discard(_int(req, "offset"),
                                                                   _int(req, "length")),
            "write_zeroes": lambda: e.device(_str(req, "name")).write_zeroes(
                _int(req, "offset"), _int(req, "length")),
        }
        if op in simple:
            return {"ok": True, "result": simple[op]()}, b""
        if op == "read":
            length = _int(req, "length")
            if length > MAX_IO_BYTES:
                raise UsageError(f"read of {length} bytes is larger than {MAX_IO_BYTES}")
            data = e.device(_str(req, "name")).read(_int(req, "offset"), length)
            return {"ok": True, "result": len(data)}, data
        if op == "write":
            length = _int(req, "length")
            if length > MAX_IO_BYTES:
                raise UsageError(f"write of {length} bytes is larger than {MAX_IO_BYTES}")
            data = reader.payload(length)
            e.device(_str(req, "name")).write(_int(req, "offset"), data)
            return {"ok": True, "result": length}, b""
        raise UsageError(f"unknown request {op!r}")


class _Handler(socketserver.StreamRequestHandler):
    server: "_Server"

    def handle(self) -> None:
        guarded: set[str] = set()      # suspended with resume_if_gone, not resumed yet
        try:
            self._serve(guarded)
        finally:
            self._resume_abandoned(guarded)

    def _resume_abandoned(self, names: set[str]) -> None:
        engine = self.server.service.engine
        for name in sorted(names):
            try:
                if engine.is_suspended(name):
                    engine.resume(name)
                    log.warning("%s: the client that suspended it went away before resuming "
                                "it; resumed", name)
            except BlockeraError as exc:
                log.error("%s: left suspended by a client that went away, and resuming it "
                          "failed: %s", name, exc)

    def _serve(self, guarded: set[str]) -> None:
        reader = Reader(self.request)
        while True:
            try:
                req = reader.message()
            except UsageError as exc:
                send_message(self.request, error_reply(exc))
                return
            except OSError:
                return
            if req is None:
                return
            try:
                reply, payload = self.server.service.handle(req, reader)
                op, name = req.get("op"), req.get("name")
                if op == "suspend" and req.get("resume_if_gone"):
                    guarded.add(str(name))
                elif op in ("resume", "remove"):
                    guarded.discard(str(name))
            except BlockeraError as exc:
                reply, payload = error_reply(exc), b""
            except Exception as exc:  # a bug: report it, keep serving
                log.exception("request %r failed", req.get("op"))
                reply, payload = error_reply(exc), b""
            try:
                send_message(self.request, reply, payload)
            except OSError:
                return


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """Serves an already listening socket (made private before it listened)."""

    daemon_threads = True

    def __init__(self, listener: socket.socket, service: EngineService) -> None:
        self.service = service
        super().__init__(listener.getsockname(), _Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = listener


class DaemonService(Protocol):
    """Something the daemon runs over its engine besides the control socket."""

    def start(self) -> None:
        """Start serving; raise a `BlockeraError` saying why when that is impossible."""

    def stop(self) -> None:
        """Stop serving and let go of the engine's devices (called before they suspend)."""


class Daemon:
    """Serve `engine` on `socket_path`, with `services`, until `stop()` (or a signal when
    `run()` is used)."""

    def __init__(self, engine: Engine, socket_path: Path, state_dir: Path | None = None,
                 services: Sequence[DaemonService] = ()) -> None:
        self.engine = engine
        self.socket_path = Path(socket_path)
        self.state_dir = Path(state_dir) if state_dir else self.socket_path.parent
        self.services = list(services)
        self._stopped = threading.Event()
        self._started: list[DaemonService] = []
        self.pid_path = self.state_dir / f"{self.socket_path.stem}.pid"
        self.server: _Server | None = None
        self._socket_identity: tuple[int, int] | None = None
        self.extra_shutdown: list[Callable[[], None]] = []

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            for service in self.services:
                service.start()
                self._started.append(service)
            try:
                listener = open_unix_listener(self.socket_path, mode=0o600)
            except ListenError as exc:
                raise ListenError(f"control socket: {exc}") from None
            self._socket_identity = socket_identity(listener)
            self.server = _Server(listener, EngineService(self.engine))
        except BaseException:
            self._stop_services()
            raise
        self._write_pid_file()
        threading.Thread(target=self.server.serve_forever, name="engine-control",
                         daemon=True).start()
        log.info("engine daemon listening on %s", self.socket_path)

    def _write_pid_file(self) -> None:
        tmp = self.pid_path.with_name(f".{self.pid_path.name}.{os.getpid()}")
        tmp.write_text(f"{os.getpid()}\n")
        os.replace(tmp, self.pid_path)

    def _remove_pid_file(self) -> None:
        """Remove the pid file only while it still names this process."""
        try:
            if self.pid_path.read_text().strip() == str(os.getpid()):
                self.pid_path.unlink()
        except OSError:
            pass

    def _stop_services(self) -> None:
        while self._started:
            service = self._started.pop()
            try:
                service.stop()
            except Exception:
                log.exception("stopping %s failed", type(service).__name__)

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        self._stop_services()
        for action in self.extra_shutdown:
            action()
        self.engine.shutdown()
        if self._socket_identity is not None:
            remove_own_socket(self.socket_path, self._socket_identity)
        self._remove_pid_file()
        log.info("engine daemon stopped; devices suspended and removed")

    def run(self, on_started: Callable[[], None] | None = None) -> None:
        """Start (then call `on_started`), serve until SIGTERM or SIGINT; shut down cleanly."""
        wake = threading.Event()

        def on_signal(signum: int, frame: object) -> None:
            wake.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.start()
        try:
            if on_started is not None:
                on_started()
            while not wake.wait(1.0):
                pass
        finally:
            self.stop()
