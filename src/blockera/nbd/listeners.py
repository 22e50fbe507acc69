"""The NBD export's TCP listener, with the loopback-only rule (unix sockets:
`blockera.unix_socket`).

NBD has no authentication here and no encryption, so whoever can connect can read and
overwrite every export. TCP therefore binds to 127.0.0.1 unless told otherwise, and an address
that is not a loopback address is refused unless the caller passes `allow_remote=True`.

See docs/nbd.md §1.
"""

from __future__ import annotations

import ipaddress
import socket

from blockera.errors import ListenError, UsageError
from blockera.nbd.errors import RemoteBindRefusedError

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


def parse_tcp_address(text: str) -> tuple[str, int]:
    """`PORT`, `HOST:PORT` or `[IPV6]:PORT` as (host, port); the host defaults to 127.0.0.1."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = DEFAULT_TCP_HOST, text
    host = host.strip("[]") if host.startswith("[") else host
    if ":" in host and not text.startswith("["):
        raise UsageError(f"bad TCP address {text!r}: write an IPv6 address in brackets, "
                         "e.g. [::1]:10809")
    try:
        port = int(port_text)
    except ValueError:
        raise UsageError(f"bad TCP address {text!r}: use PORT or HOST:PORT, "
                         f"e.g. {DEFAULT_TCP_HOST}:{NBD_PORT}") from None
    if not 0 <= port <= 65535:
        raise UsageError(f"bad TCP port {port} in {text!r}: use 0 to 65535 (0: any free port)")
    return host or DEFAULT_TCP_HOST, port
