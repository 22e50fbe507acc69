"""Listening unix sockets that are private from the first moment, and their removal.

Used by the engine daemon's control socket and the NBD export. A socket is bound, given its
permission bits (0600 by default: only its owner may connect) and only then put into the
listening state, so no other user can connect in between, whatever the umask. A socket file left
by a crashed server is replaced; a live one, or anything that is not a socket, is not. On
shutdown only the socket this process created (same device and inode) is removed.

See docs/engine.md §3; docs/nbd.md §1.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from pathlib import Path

from blockera.errors import ListenError

_BACKLOG = 64
_SUN_PATH_MAX = 107


def open_unix_listener(path: str | os.PathLike[str], *, mode: int = 0o600) -> socket.socket:
    """A listening unix socket at `path`, accessible with permission bits `mode`."""
    path = Path(path)
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        raise ListenError(f"unix socket path {path} is too long (the limit is "
                          f"{_SUN_PATH_MAX} bytes): use a shorter directory")
    remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(os.fspath(path))
        os.chmod(path, mode)  # before listen(): nobody can connect in between
        sock.listen(_BACKLOG)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on unix socket {path}: {exc.strerror}") from None
    return sock


def remove_stale_socket(path: Path) -> None:
    """Remove a socket file nobody listens on; refuse a live socket or a non-socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenError(f"{path} exists and is not a socket: choose another path (it is left "
                          "as it is)")
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


def socket_identity(sock: socket.socket) -> tuple[int, int]:
    """(device, inode) of the file a bound unix socket created."""
    st = os.stat(sock.getsockname())
    return st.st_dev, st.st_ino


def remove_own_socket(path: Path, identity: tuple[int, int]) -> None:
    """Unlink `path` if it is still the socket file with `identity` (not a newer one)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == identity:
        os.unlink(path)
