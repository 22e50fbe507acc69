"""Listening sockets: a unix socket and/or a TCP socket, with the loopback-only rule.

NBD has no authentication here and no encryption, so whoever can connect can read and
overwrite every export. TCP therefore binds to 127.0.0.1 unless told otherwise, and an address
that is not a loopback address is refused unless the caller passes `allow_remote=True`. A unix
socket is created with mode 0600 by default (only its owner may connect); a stale socket file
left by a crashed server is replaced, a live one is not.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import stat
from pathlib import Path

from blockera.nbd.errors import ListenError, RemoteBindRefusedError

DEFAULT_TCP_HOST = "127.0.0.1"
NBD_PORT = 10809
_BACKLOG = 64


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def open_tcp_listener(host: str | None, port: int, *, allow_remote: bool = False
                      ) -> socket.socket:
    """A listening TCP socket on `host` (default 127.0.0.1) and `port` (0: any free port)."""
    host = DEFAULT_TCP_HOST if host is None else host
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError(f"cannot resolve listen address {host!r}: {exc.strerror}") from None
    remote = sorted({str(info[4][0]) for info in infos if not _is_loopback(str(info[4][0]))})
    if remote and not allow_remote:
        raise RemoteBindRefusedError(
            f"refusing to listen on {host or '*'}:{port} ({', '.join(remote)} is reachable from "
            "other hosts): NBD here has no authentication or encryption, so anyone who can "
            "connect could read and overwrite the exported devices. Listen on a loopback "
            f"address (the default, {DEFAULT_TCP_HOST}) or a unix socket, or pass "
            "allow_remote=True if the network is trusted.")
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(_BACKLOG)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


def open_unix_listener(path: str | os.PathLike[str], *, mode: int = 0o600) -> socket.socket:
    """A listening unix socket at `path`, accessible with permission bits `mode`."""
    path = Path(path)
    if len(os.fsencode(path)) >= 108:
        raise ListenError(f"unix socket path {path} is too long (the limit is 107 bytes): "
                          "use a shorter directory")
    _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(os.fspath(path))
        os.chmod(path, mode)  # before listen(): nobody can connect in between
        sock.listen(_BACKLOG)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on unix socket {path}: {exc.strerror}") from None
    return sock


def _remove_stale_socket(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenError(f"{path} exists and is not a socket: choose another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(os.fspath(path))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise ListenError(f"{path}: cannot tell whether a server is using this socket "
                              f"({exc.strerror})") from None
        os.unlink(path)
        return
    finally:
        probe.close()
    raise ListenError(f"{path} is in use by a running server: stop it or choose another path")
