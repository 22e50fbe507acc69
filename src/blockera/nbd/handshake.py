"""The fixed newstyle handshake: greeting, client flags and option haggling.

Owns everything before the transmission phase: NBD_OPT_GO, NBD_OPT_INFO (with NBD_INFO_EXPORT,
NBD_INFO_NAME, NBD_INFO_DESCRIPTION and NBD_INFO_BLOCK_SIZE), NBD_OPT_LIST, NBD_OPT_ABORT,
NBD_OPT_EXPORT_NAME and NBD_OPT_STRUCTURED_REPLY; every other option is answered with
NBD_REP_ERR_UNSUP (there is no TLS, no metadata context and no extended header support).
Export names are resolved when the client asks, through an `ExportResolver`; an export is
claimed (see `blockera.nbd.exports`) just before the server agrees to enter transmission with
it, and the release that comes with the claim travels in `Negotiated` to the connection.

The whole handshake has a deadline; a client that breaks a mandatory rule (bad magic, unknown
client flags, oversized option data) gets a hard disconnect, as the protocol allows.

See docs/nbd.md §2.
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from blockera.errors import BlockeraError
from blockera.nbd import protocol as p
from blockera.nbd.errors import ClientProtocolError, UnknownExportError, message_bytes
from blockera.nbd.exports import ExportResolver, Release, ResolvedExport
from blockera.nbd.limits import BlockLimits
from blockera.nbd.wire import SocketReader, send_buffers

log = logging.getLogger(__name__)

MAX_OPTION_DATA_BYTES = 64 << 10
_ZEROES = bytes(p.EXPORT_NAME_ZEROES_BYTES)


@dataclass(frozen=True)
class Negotiated:
    """The outcome of a successful handshake."""

    export: ResolvedExport
    size_bytes: int
    transmission_flags: int
    structured_replies: bool
    # The client asked for NBD_INFO_BLOCK_SIZE with NBD_OPT_GO, and so promised to honour the
    # block size constraints; only then are unaligned requests refused by the server itself.
    block_sizes_agreed: bool = False
    # Ends the claim on the export; the connection calls it exactly once when it closes.
    release: Release = lambda: None


def transmission_flags(export: ResolvedExport, structured_replies: bool) -> int:
    """What the server advertises for an export. CAN_MULTI_CONN is correct because a device's
    flush makes every completed write durable, whichever connection issued it, and the server
    keeps no cache of its own."""
    flags = p.FLAG_HAS_FLAGS | p.FLAG_SEND_FLUSH | p.FLAG_CAN_MULTI_CONN
    if export.read_only:
        flags |= p.FLAG_READ_ONLY
    else:
        flags |= p.FLAG_SEND_FUA | p.FLAG_SEND_WRITE_ZEROES | p.FLAG_SEND_FAST_ZERO
        if export.supports_discard:
            flags |= p.FLAG_SEND_TRIM
    if structured_replies:
        flags |= p.FLAG_SEND_DF
    return flags


class Handshake:
    """One connection's handshake. `run()` returns the negotiated export, or None when the
    client aborted or asked for an export that does not exist with NBD_OPT_EXPORT_NAME (which
    cannot report errors)."""

    def __init__(self, sock: socket.socket, reader: SocketReader, resolver: ExportResolver,
                 limits: BlockLimits, *, timeout_s: float, stopping: Callable[[], bool],
                 peer: str, on_claimed: Callable[[], None] = lambda: None) -> None:
        self._sock = sock
        self._reader = reader
        self._resolver = resolver
        self._limits = limits
        self._deadline = time.monotonic() + timeout_s
        self._timeout_s = timeout_s
        self._stopping = stopping
        self._peer = peer
        self._on_claimed = on_claimed
        self._no_zeroes = False
        self._structured = False

    # -- sending -----------------------------------------------------------------------------
    def _reply(self, option: int, reply_type: int, data: bytes = b"") -> None:
        send_buffers(self._sock, [p.OPTION_REPLY_HEADER.pack(
            p.OPTION_REPLY_MAGIC, option, reply_type, len(data)), data])

    def _error(self, option: int, reply_type: int, text: str) -> None:
        log.debug("%s: option %d refused (%#x): %s", self._peer, option, reply_type, text)
        self._reply(option, reply_type, message_bytes(text))

    # -- receiving ---------------------------------------------------------------------------
    def _arm_timeout(self) -> None:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise ClientProtocolError(f"handshake not finished within {self._timeout_s:g} s")
        self._sock.settimeout(remaining)

    def run(self) -> Negotiated | None:
        self._arm_timeout()
        self._sock.sendall(p.SERVER_GREETING.pack(
            p.NBDMAGIC, p.IHAVEOPT, p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES))
        (client_flags,) = p.CLIENT_FLAGS.unpack(self._reader.take(p.CLIENT_FLAGS.size))
        if client_flags & ~p.KNOWN_CLIENT_FLAGS:
            raise ClientProtocolError(f"unknown client flags {client_flags:#x}")
        self._no_zeroes = bool(client_flags & p.FLAG_C_NO_ZEROES)
        while True:
            self._arm_timeout()
            magic, option, length = p.OPTION_HEADER.unpack(
                self._reader.take(p.OPTION_HEADER.size))
            if magic != p.IHAVEOPT:
                raise ClientProtocolError(f"bad option magic {magic:#x}")
            if length > MAX_OPTION_DATA_BYTES:
                raise ClientProtocolError(f"option {option} carries {length} bytes of data; "
                                          f"the limit is {MAX_OPTION_DATA_BYTES}")
            data = self._reader.take_bytes(length)
            result = self._option(option, data)
            if result is not True:
                return result

    def _option(self, option: int, data: bytes) -> Negotiated | None | bool:
        """Handle one option: True to keep haggling, else the handshake's result."""
        if option == p.OPT_ABORT:
            try:
                self._reply(option, p.REP_ACK)
            except OSError:
                pass  # the client may close without waiting for the acknowledgement
            return None
        if self._stopping():
            if option == p.OPT_EXPORT_NAME:
                return None
            self._error(option, p.REP_ERR_SHUTDOWN, "the server is shutting down")
            return True
        if option == p.OPT_EXPORT_NAME:
            return self._export_name(data)
        if option in (p.OPT_GO, p.OPT_INFO):
            return self._info_or_go(option, data)
        if option == p.OPT_LIST:
            self._list(data)
            return True
        if option == p.OPT_STRUCTURED_REPLY:
            if data:
                self._error(option, p.REP_ERR_INVALID,
                            "NBD_OPT_STRUCTURED_REPLY takes no data")
            else:
                self._structured = True
                self._reply(option, p.REP_ACK)
            return True
        self._error(option, p.REP_ERR_UNSUP, f"option {option} is not supported")
        return True

    # -- options -----------------------------------------------------------------------------
    def _resolve(self, name: str) -> tuple[ResolvedExport, int]:
        try:
            export = self._resolver.resolve(name)
            return export, export.device.size_bytes
        except UnknownExportError:
            raise
        except BlockeraError as exc:
            raise UnknownExportError(f"export {name!r} is not available: {exc}") from None
        except Exception as exc:
            log.exception("looking up export %r failed", name)
            raise UnknownExportError(f"export {name!r} is not available: "
                                     f"{type(exc).__name__}: {exc}") from None

    def _claim(self, export: ResolvedExport) -> Release:
        """Claim the export; `on_claimed` runs before the client can learn of it, so a
        connection counts as serving from then on."""
        try:
            release = export.claim()
            self._on_claimed()
            return release
        except UnknownExportError:
            raise
        except BlockeraError as exc:
            raise UnknownExportError(f"export {export.name!r} is not available: {exc}") \
                from None
        except Exception as exc:
            log.exception("claiming export %r failed", export.name)
            raise UnknownExportError(f"export {export.name!r} is not available: "
                                     f"{type(exc).__name__}: {exc}") from None

    def _export_name(self, data: bytes) -> Negotiated | None:
        try:
            name = data.decode("utf-8")
            export, size_bytes = self._resolve(name)
            release = self._claim(export)
        except (UnicodeDecodeError, UnknownExportError) as exc:
            log.info("%s: NBD_OPT_EXPORT_NAME refused, closing: %s", self._peer, exc)
            return None
        flags = transmission_flags(export, False)
        try:
            self._sock.sendall(p.EXPORT_NAME_REPLY.pack(size_bytes, flags) +
                               (b"" if self._no_zeroes else _ZEROES))
        except BaseException:
            release()
            raise
        return Negotiated(export, size_bytes, flags, False, release=release)

    def _info_or_go(self, option: int, data: bytes) -> Negotiated | None | bool:
        what = "NBD_OPT_GO" if option == p.OPT_GO else "NBD_OPT_INFO"
        parsed = _parse_info_request(data)
        if isinstance(parsed, str):
            self._error(option, p.REP_ERR_INVALID, f"malformed {what}: {parsed}")
            return True
        name, requests = parsed
        try:
            export, size_bytes = self._resolve(name)
            release = self._claim(export) if option == p.OPT_GO else None
        except UnknownExportError as exc:
            self._error(option, p.REP_ERR_UNKNOWN, str(exc))
            return True
        try:
            self._send_info(option, export, size_bytes, requests)
        except BaseException:
            if release is not None:
                release()
            raise
        if release is None:
            return True
        return Negotiated(export, size_bytes, transmission_flags(export, self._structured),
                          self._structured, block_sizes_agreed=p.INFO_BLOCK_SIZE in requests,
                          release=release)

    def _send_info(self, option: int, export: ResolvedExport, size_bytes: int,
                   requests: set[int]) -> None:
        """The NBD_REP_INFO replies and the final NBD_REP_ACK of NBD_OPT_INFO or GO."""
        flags = transmission_flags(export, self._structured)
        infos = [p.INFO_EXPORT_PAYLOAD.pack(p.INFO_EXPORT, size_bytes, flags)]
        if p.INFO_NAME in requests:
            infos.append(p.INFO_TYPE.pack(p.INFO_NAME) + export.name.encode())
        if p.INFO_DESCRIPTION in requests and export.description:
            infos.append(p.INFO_TYPE.pack(p.INFO_DESCRIPTION) + message_bytes(export.description))
        # Always sent: the minimum block size is stricter than the protocol's default of 1.
        lim = self._limits
        infos.append(p.INFO_BLOCK_SIZE_PAYLOAD.pack(
            p.INFO_BLOCK_SIZE, lim.min_block_bytes, lim.preferred_block_bytes,
            lim.max_payload_bytes))
        for info in infos:
            self._reply(option, p.REP_INFO, info)
        self._reply(option, p.REP_ACK)

    def _list(self, data: bytes) -> None:
        if data:
            self._error(p.OPT_LIST, p.REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
            return
        try:
            listing = self._resolver.listing()
        except Exception as exc:
            log.exception("listing exports failed")
            self._error(p.OPT_LIST, p.REP_ERR_UNKNOWN, f"cannot list exports: {exc}")
            return
        for name, description in listing:
            encoded = name.encode("utf-8")
            self._reply(p.OPT_LIST, p.REP_SERVER, struct.pack(">I", len(encoded)) + encoded +
                        message_bytes(description))
        self._reply(p.OPT_LIST, p.REP_ACK)


def _parse_info_request(data: bytes) -> tuple[str, set[int]] | str:
    """(export name, requested information types), or why the request is malformed."""
    if len(data) < 6:
        return f"{len(data)} bytes of data, at least 6 needed"
    (name_len,) = struct.unpack_from(">I", data)
    if name_len > len(data) - 6:
        return f"name length {name_len} exceeds the option data"
    if name_len > p.MAX_STRING_BYTES:
        return f"name of {name_len} bytes is longer than {p.MAX_STRING_BYTES}"
    try:
        name = data[4:4 + name_len].decode("utf-8")
    except UnicodeDecodeError:
        return "export name is not valid UTF-8"
    (count,) = struct.unpack_from(">H", data, 4 + name_len)
    if len(data) != 6 + name_len + 2 * count:
        return f"{count} information requests do not match the option length {len(data)}"
    requests = set(struct.unpack_from(f">{count}H", data, 6 + name_len))
    return name, requests
