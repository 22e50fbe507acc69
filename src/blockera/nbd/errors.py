"""Errors of the NBD server, and the mapping of device errors to NBD error values.

Configuration mistakes (`RemoteBindRefusedError`; `ListenError` is in blockera.errors) are raised to whoever starts the
server. `ClientProtocolError` and `ClientDisconnected` end one connection only: the first when a
client breaks a mandatory rule of the protocol (the server then initiates a hard disconnect),
the second when the peer went away. `nbd_error_for` turns what a `BlockDevice` raised into the
error field of a reply.

See docs/nbd.md §3.
"""

from __future__ import annotations

import errno as _errno

from blockera.errors import BlockeraError, UsageError
from blockera.nbd import protocol as p


class RemoteBindRefusedError(UsageError):
    """A TCP listen address is reachable from other hosts and remote binds were not allowed."""


class UnknownExportError(BlockeraError):
    """A client asked for an export name that is not (or no longer) available."""

    errno_name = "ENOENT"


class ClientProtocolError(BlockeraError):
    """The client violated the NBD protocol; its connection is closed."""

    errno_name = "EPROTO"


class ClientDisconnected(Exception):
    """The peer closed the connection (or it failed). `clean` is True when this happened on a
    message boundary, i.e. not in the middle of a request."""

    def __init__(self, message: str, *, clean: bool = False) -> None:
        super().__init__(message)
        self.clean = clean


# errno names a device may report (BlockeraError.errno_name) -> NBD error values.
_BY_ERRNO_NAME = {
    "EPERM": p.EPERM,
    "EACCES": p.EPERM,
    "EROFS": p.EPERM,
    "EIO": p.EIO,
    "EINVAL": p.EINVAL,
    "ENOSPC": p.ENOSPC,
    "EDQUOT": p.ENOSPC,
    "EFBIG": p.ENOSPC,
    "ESHUTDOWN": p.ESHUTDOWN,
}


def nbd_error_for(exc: BaseException) -> int:
    """The NBD error value for an exception raised by a device call.

    `NoSpaceError` (and any error whose errno is ENOSPC, EDQUOT or EFBIG) becomes NBD_ENOSPC;
    a read-only or permission refusal NBD_EPERM; an error the device itself classifies as
    EINVAL (e.g. misaligned I/O) NBD_EINVAL; everything else, `DeviceError` included, NBD_EIO."""
    if isinstance(exc, BlockeraError):
        return _BY_ERRNO_NAME.get(exc.errno_name, p.EIO)
    if isinstance(exc, OSError) and exc.errno is not None:
        return _BY_ERRNO_NAME.get(_errno.errorcode.get(exc.errno, ""), p.EIO)
    return p.EIO


def is_unsupported(exc: BaseException) -> bool:
    """True when a device refused an operation it does not implement (EOPNOTSUPP)."""
    name = getattr(exc, "errno_name", None)
    if name is None and isinstance(exc, OSError) and exc.errno is not None:
        name = _errno.errorcode.get(exc.errno)
    return name in ("EOPNOTSUPP", "ENOTSUP")


MAX_MESSAGE_BYTES = 1024


def message_bytes(text: str) -> bytes:
    """A human-readable message for an option reply or an error chunk: UTF-8, cut at a
    character boundary to at most MAX_MESSAGE_BYTES."""
    data = text.encode("utf-8", "replace")
    if len(data) > MAX_MESSAGE_BYTES:
        data = data[:MAX_MESSAGE_BYTES].decode("utf-8", "ignore").encode()
    return data
