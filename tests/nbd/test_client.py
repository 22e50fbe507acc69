"""The NBD client (blockera.nbd.client, blockera.nbd.uri): NBD URIs, then an export as a
BlockDevice against blockera's own server, a scripted server for what real servers rarely do,
and real peers: qemu-nbd (qemu-utils) over an image file that the tests compare byte by byte,
and nbdkit for block size policies, plain newstyle, missing flush or multi-conn, and error
replies. A missing peer skips its tests, or fails them with BLOCKERA_REQUIRE_NBD_CLIENTS set."""

from __future__ import annotations

import itertools
import os
import random
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from blockera.blockdev import MemoryDevice
from blockera.errors import DeviceError, NoSpaceError, UsageError
from blockera.nbd import BlockLimits, Export
from blockera.nbd.client import NbdConnectError, NbdConnectionLost, NbdDevice, \
    NbdExportNotFoundError, open_nbd
from blockera.nbd.uri import NbdUri, NbdUriError, parse_nbd_uri

from . import rawclient as raw
from .conftest import GatedDevice, RecordingDevice, need, pattern, tcp_uri, unix_uri, \
    wait_until

MiB = 1 << 20


def big_pattern(length_bytes: int, seed: int) -> bytes:
    """Test data made quickly: a pattern with a period of 999,983 bytes (a prime, so no
    power-of-two misplacement of a piece goes unnoticed)."""
    period = pattern(999_983, seed=seed)
    return (period * (length_bytes // len(period) + 1))[:length_bytes]


# -- URIs ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("nbd://example.com/disk", NbdUri("disk", host="example.com", port=10809)),
    ("nbd://example.com:10900/disk", NbdUri("disk", host="example.com", port=10900)),
    ("nbd://example.com", NbdUri("", host="example.com")),
    ("nbd://example.com/", NbdUri("", host="example.com")),
    ("nbd://example.com//disk", NbdUri("/disk", host="example.com")),
    ("nbd://example.com/hello%20world", NbdUri("hello world", host="example.com")),
    ("nbd://127.0.0.1:1234/a+b", NbdUri("a+b", host="127.0.0.1", port=1234)),
    ("nbd://[::1]:10810/x", NbdUri("x", host="::1", port=10810)),
    ("NBD://Example.COM/Disk", NbdUri("Disk", host="example.com")),
    ("nbd+unix:///disk?socket=/run/x.sock", NbdUri("disk", unix_path="/run/x.sock")),
    ("nbd+unix:///?socket=nbd.sock", NbdUri("", unix_path="nbd.sock")),
    ("nbd+unix:///d?socket=/tmp/a%20b+c.sock", NbdUri("d", unix_path="/tmp/a b+c.sock")),
    ("nbd+unix:///?socket=%00/abstract", NbdUri("", unix_path="\0/abstract")),
    ("nbd+unix:///caf%C3%A9?socket=s", NbdUri("café", unix_path="s")),
])
def test_good_uris(text: str, expected: NbdUri) -> None:
    parsed = parse_nbd_uri(text)
    assert parsed == expected
    assert parse_nbd_uri(str(parsed)) == parsed  # str() gives a URI meaning the same


@pytest.mark.parametrize("text, complaint", [
    ("nbds://example.com/disk", "requires TLS"),
    ("nbds+unix:///disk?socket=/s", "requires TLS"),
    ("nbd://example.com/disk?tls-type=x509", "tls-type asks for TLS"),
    ("nbd://alice@example.com/disk", "user name is only used for TLS"),
    ("http://example.com/disk", "unsupported scheme 'http'"),
    ("nbd+vsock://1:10809/disk", "unsupported scheme"),
    ("disk", "expected nbd://"),
    ("", "expected nbd://"),
    ("nbd:disk", "expected nbd://"),
    ("nbd:///disk", "needs a host"),
    ("nbd://example.com:99999/disk", "out of range"),
    ("nbd://example.com:ten/disk", "Port could not be cast"),
    ("nbd://example.com:0/disk", "port 0"),
    ("nbd://[not-ipv6]/disk", "IPv6 address"),
    ("nbd://example.com/disk?socket=/s", "unknown query parameter 'socket'"),
    ("nbd://example.com/disk#part", "no fragment"),
    ("nbd://example.com/a b", "spaces"),
    ("nbd://example.com/50%", "percent-escape"),
    ("nbd://example.com/%ff", "UTF-8"),
    ("nbd://example.com/a%00b", "NUL"),
    ("nbd://example.com/" + "x" * 4097, "longer than 4096"),
    ("nbd+unix:///disk", "needs the socket"),
    ("nbd+unix:///disk?socket=", "needs the socket"),
    ("nbd+unix://host/disk?socket=/s", "takes no host"),
    ("nbd+unix:///disk?socket=/s&x-cache=1", "unknown query parameter 'x-cache'"),
    ("nbd+unix:///disk?socket=/s&socket=/t", "given twice"),
])
def test_bad_uris(text: str, complaint: str) -> None:
    with pytest.raises(NbdUriError, match="bad NBD URI") as info:
        parse_nbd_uri(text)
    assert complaint in str(info.value)
    assert isinstance(info.value, UsageError)


# -- against blockera's own server ---------------------------------------------------------------

@pytest.fixture
def opened() -> Iterator[Callable[..., NbdDevice]]:
    """open_nbd() whose devices are all closed at the end of the test."""
    devices: list[NbdDevice] = []

    def open_(uri: str, **options: Any) -> NbdDevice:
        options.setdefault("writable", True)
        options.setdefault("connect_timeout_s", 5)
        options.setdefault("reply_timeout_s", 10)
        device = open_nbd(uri, **options)
        devices.append(device)
        return device

    yield open_
    for device in devices:
        device.close()


def test_round_trip_over_unix_and_tcp(start_server, opened) -> None:
    backing = MemoryDevice(8 * MiB)
    server = start_server({"disk": backing}, tcp=True)
    for uri in (unix_uri(server), tcp_uri(server)):
        dev = opened(uri)
        assert dev.size_bytes == 8 * MiB
        assert (dev.info.min_block_bytes, dev.info.preferred_block_bytes,
                dev.info.max_payload_bytes) == (512, 4096, 32 * MiB)
        assert dev.info.negotiated_with == "NBD_OPT_GO"
        data = pattern(3 * MiB + 1000, seed=len(uri))
        dev.write(4096, data)
        assert bytes(backing.data[4096:4096 + len(data)]) == data
        assert dev.read(4096, len(data)) == data
        backing.write(0, b"from the server side")
        assert dev.read(0, 20) == b"from the server side"


def test_unaligned_requests_are_widened_to_whole_blocks(start_server, opened) -> None:
    backing = RecordingDevice(MiB, data=pattern(MiB, seed=2))
    limits = BlockLimits(min_block_bytes=4096, preferred_block_bytes=4096,
                         max_payload_bytes=64 << 10)
    server = start_server({"disk": backing}, limits=limits)
    dev = opened(unix_uri(server))
    expected = bytearray(pattern(MiB, seed=2))
    for offset, length in [(1, 1), (100, 5000), (4095, 2), (8192, 4096), (12000, 200_000),
                           (MiB - 3, 3), (0, MiB)]:
        data = pattern(length, seed=offset)
        dev.write(offset, data)
        expected[offset:offset + length] = data
        assert dev.read(offset, length) == data
        around, until = max(0, offset - 5000), min(MiB, offset + length + 5000)
        assert dev.read(around, until - around) == bytes(expected[around:until])
    assert backing.data == expected
    # every request the server saw was aligned to 4096 and at most 64 KiB
    io = [c for c in backing.calls if c[0] in ("read", "write")]
    assert io and all(off % 4096 == 0 and n % 4096 == 0 and 0 < n <= 64 << 10
                      for _, off, n in io), io


def test_export_size_not_a_multiple_of_the_block(start_server, opened) -> None:
    backing = MemoryDevice(10_000)
    server = start_server({"disk": backing})
    dev = opened(unix_uri(server))
    dev.write(9_000, b"x" * 1000)
    dev.write(9_990, b"end of it!")
    assert dev.read(9_000, 1000) == b"x" * 990 + b"end of it!"
    assert bytes(backing.data[9_990:]) == b"end of it!"
    dev.discard(9_500, 500)
    assert dev.read(9_000, 1000) == b"x" * 500 + bytes(500)
    with pytest.raises(DeviceError, match="beyond the end"):
        dev.read(9_999, 2)


def test_large_requests_are_split_at_the_maximum_payload(start_server, opened) -> None:
    backing = RecordingDevice(4 * MiB)
    server = start_server({"disk": backing},
                          limits=BlockLimits(max_payload_bytes=256 << 10))
    dev = opened(unix_uri(server), connections=3)
    assert dev.connection_count == 3
    assert dev.chunk_bytes == 256 << 10
    data = pattern(3 * MiB, seed=5)
    dev.write(512, data)
    assert dev.read(512, len(data)) == data
    writes = [n for kind, _, n in backing.calls if kind == "write"]
    assert max(writes) == 256 << 10 and sum(writes) == 3 * MiB and len(writes) == 12
    assert server.connection_count() == 3


def test_flush_fua_discard_zeroes_and_trim(start_server, opened) -> None:
    backing = RecordingDevice(MiB, data=b"\xff" * MiB)
    server = start_server({"disk": backing})
    dev = opened(unix_uri(server))
    assert dev.info.can_flush and dev.info.can_fua and dev.info.can_trim
    dev.flush()
    assert backing.kinds()[-1] == "flush"
    dev.write(0, b"a" * 512, fua=True)
    assert backing.kinds()[-2:] == ["write", "flush"]
    dev.discard(4096, 8192)
    assert ("write_zeroes", 4096, 8192) in backing.calls
    dev.write_zeroes(100, 1000)  # unaligned: the edges are read-modify-written
    assert bytes(backing.data[:100]) == b"a" * 100
    assert bytes(backing.data[100:1100]) == bytes(1000)
    assert bytes(backing.data[1100:1200]) == b"\xff" * 100
    assert dev.read(4096, 8192) == bytes(8192)
    assert dev.trim(1000, 10_000) is True  # only the whole blocks inside
    assert backing.calls[-1] == ("discard", 1024, 10_752 - 1024)


def test_concurrent_unaligned_writes_from_eight_threads(start_server, opened) -> None:
    """Threads write interleaved 100-byte pieces, so each 4 KiB block is shared by all of them
    and every write is a read-modify-write: none may undo another."""
    backing = MemoryDevice(MiB)
    server = start_server({"disk": backing},
                          limits=BlockLimits(min_block_bytes=4096))
    dev = opened(unix_uri(server), connections=2)
    expected = bytearray(MiB)
    pieces = [(i * 100, pattern(100, seed=i)) for i in range(2000)]
    for offset, data in pieces:
        expected[offset:offset + 100] = data
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            for offset, data in pieces[index::8]:
                dev.write(offset, data)
                assert dev.read(offset, 100) == data
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert backing.data == expected
    assert dev.read(0, MiB) == bytes(expected)


def test_read_only_export(start_server, opened) -> None:
    backing = MemoryDevice(MiB, data=pattern(MiB))
    server = start_server({"base": Export(backing, read_only=True)})
    with pytest.raises(NbdConnectError, match="read-only, so it cannot be opened for "
                                              "writing") as info:
        opened(unix_uri(server, "base"), writable=True)
    assert info.value.errno_name == "EROFS"
    wait_until(lambda: server.connection_count() == 0)
    dev = opened(unix_uri(server, "base"), writable=False)
    assert dev.info.read_only
    assert dev.read(10, 10) == pattern(MiB)[10:20]
    dev.flush()  # nothing to make durable
    for call in (lambda: dev.write(0, b"x"), lambda: dev.discard(0, 512),
                 lambda: dev.write_zeroes(0, 512), lambda: dev.trim(0, 512)):
        with pytest.raises(DeviceError, match="opened read-only") as refused:
            call()
        assert refused.value.errno_name == "EROFS"
    assert bytes(backing.data) == pattern(MiB)


class Failing(MemoryDevice):
    """Writes at offset 0 fail with the given error."""

    def __init__(self, size_bytes: int, error: Exception) -> None:
        super().__init__(size_bytes)
        self.error = error

    def write(self, offset_bytes: int, data: Any) -> None:
        if offset_bytes == 0:
            raise self.error
        super().write(offset_bytes, data)


@pytest.mark.parametrize("error, errno_name, kind", [
    (NoSpaceError("metadata full"), "ENOSPC", NoSpaceError),
    (DeviceError("medium error"), "EIO", DeviceError),
    (DeviceError("misaligned", errno_name="EINVAL"), "EINVAL", DeviceError),
    (DeviceError("write-protected", errno_name="EROFS"), "EPERM", DeviceError),
])
def test_error_replies_become_device_errors(start_server, opened, error, errno_name,
                                            kind) -> None:
    server = start_server({"disk": Failing(MiB, error)})
    dev = opened(unix_uri(server))
    with pytest.raises(kind) as info:
        dev.write(0, bytes(4096))
    assert info.value.errno_name == errno_name
    assert f"NBD WRITE of 4096 bytes at byte 0 failed: {errno_name}" in str(info.value)
    dev.write(4096, b"x" * 512)  # the connection goes on
    assert dev.read(4096, 1) == b"x"


def test_wrong_export_name_lists_what_the_server_offers(start_server, opened) -> None:
    server = start_server({"disk": MemoryDevice(MiB), "base": MemoryDevice(MiB)})
    with pytest.raises(NbdExportNotFoundError) as info:
        opened(unix_uri(server, "dsik"))
    assert info.value.available == ["disk", "base"]
    assert info.value.errno_name == "ENOENT"
    assert "no export named 'dsik'" in str(info.value)
    assert "the server offers: 'base', 'disk'" in str(info.value)
    wait_until(lambda: server.connection_count() == 0)


def test_close_disconnects_and_refuses_further_calls(start_server, opened) -> None:
    server = start_server({"disk": MemoryDevice(MiB)})
    dev = opened(unix_uri(server), connections=4)
    assert server.connection_count() == 4
    dev.close()
    wait_until(lambda: server.connection_count() == 0)
    with pytest.raises(DeviceError, match="closed"):
        dev.read(0, 512)
    dev.close()


def test_server_shutdown_is_a_clear_error(start_server, opened) -> None:
    server = start_server({"disk": MemoryDevice(MiB)})
    dev = opened(unix_uri(server))
    dev.write(0, b"x" * 512)
    assert server.shutdown(timeout_s=10)
    started = time.monotonic()
    with pytest.raises(NbdConnectionLost, match="connection to the server was lost"):
        dev.read(0, 512)
    with pytest.raises(NbdConnectionLost, match="reopen the device"):
        dev.write(0, b"y" * 512)
    assert time.monotonic() - started < 5


def test_a_request_without_a_reply_times_out(start_server, opened) -> None:
    backing = GatedDevice(MiB)
    server = start_server({"disk": backing})
    dev = opened(unix_uri(server), reply_timeout_s=0.5)
    started = time.monotonic()
    try:
        with pytest.raises(NbdConnectionLost, match=r"no reply to NBD READ of 512 bytes at "
                                                    r"byte 0 within 0.5 s"):
            dev.read(0, 512)
        assert time.monotonic() - started < 5
        with pytest.raises(NbdConnectionLost):
            dev.read(4096, 512)
    finally:
        backing.gate.set()


def test_connect_failures(sock_dir: Path) -> None:
    with pytest.raises(NbdConnectError, match="no socket at") as info:
        open_nbd(f"nbd+unix:///disk?socket={sock_dir}/none.sock", writable=True)
    assert info.value.errno_name == "ENOENT"
    # a socket that accepts but never greets: the handshake times out
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(str(sock_dir / "silent.sock"))
    silent.listen(1)
    try:
        started = time.monotonic()
        with pytest.raises(NbdConnectError, match="did not complete the handshake within "
                                                  "0.3 s"):
            open_nbd(f"nbd+unix:///disk?socket={sock_dir}/silent.sock", writable=True,
                     connect_timeout_s=0.3)
        assert time.monotonic() - started < 3
    finally:
        silent.close()
    # nothing listening on a TCP port
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    with pytest.raises(NbdConnectError, match="connection refused"):
        open_nbd(f"nbd://127.0.0.1:{port}/disk", writable=False)
    with pytest.raises(NbdUriError, match="TLS"):
        open_nbd("nbds://127.0.0.1/disk", writable=False)
    with pytest.raises(UsageError, match="connections must be"):
        open_nbd(f"nbd://127.0.0.1:{port}/disk", writable=False, connections=0)


# -- against a scripted server -------------------------------------------------------------------
# Protocol constants come from tests/nbd/rawclient.py, written out independently of the
# client's own.

HAS_FLAGS, READ_ONLY, SEND_FLUSH, SEND_FUA = 1, 2, 4, 8
FIXED_NEWSTYLE, NO_ZEROES = 1, 2
REP_ERR_POLICY, REP_ERR_TLS_REQD, REP_ERR_SHUTDOWN = 0x80000002, 0x80000005, 0x80000007
OLDSTYLE_MAGIC = 0x00420281861253
ESHUTDOWN = 108


class Peer:
    """The server's end of one connection, driven by a test script."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn

    def recv(self, n_bytes: int) -> bytes:
        out = bytearray()
        while len(out) < n_bytes:
            chunk = self.conn.recv(n_bytes - len(out))
            if not chunk:
                raise raw.Closed(f"client closed after {len(out)} of {n_bytes} bytes")
            out += chunk
        return bytes(out)

    def greet(self, flags: int = FIXED_NEWSTYLE | NO_ZEROES) -> int:
        self.conn.sendall(struct.pack(">QQH", raw.NBDMAGIC, raw.IHAVEOPT, flags))
        return struct.unpack(">I", self.recv(4))[0]

    def option(self) -> tuple[int, bytes]:
        magic, option, length = struct.unpack(">QII", self.recv(16))
        assert magic == raw.IHAVEOPT
        return option, self.recv(length)

    def reply(self, option: int, reply_type: int, data: bytes = b"") -> None:
        self.conn.sendall(struct.pack(">QIII", raw.OPTION_REPLY_MAGIC, option, reply_type,
                                      len(data)) + data)

    def go(self, size_bytes: int, flags: int,
           block_sizes: tuple[int, int, int] | None = None) -> str:
        """Expect NBD_OPT_GO asking for NBD_INFO_BLOCK_SIZE, accept it; the name asked for."""
        option, data = self.option()
        assert option == raw.OPT_GO
        (name_len,) = struct.unpack_from(">I", data)
        (count,) = struct.unpack_from(">H", data, 4 + name_len)
        assert struct.unpack_from(f">{count}H", data, 6 + name_len) == (raw.INFO_BLOCK_SIZE,)
        self.reply(raw.OPT_GO, raw.REP_INFO, struct.pack(">HQH", raw.INFO_EXPORT, size_bytes,
                                                         flags))
        if block_sizes is not None:
            self.reply(raw.OPT_GO, raw.REP_INFO,
                       struct.pack(">HIII", raw.INFO_BLOCK_SIZE, *block_sizes))
        self.reply(raw.OPT_GO, raw.REP_ACK)
        return data[4:4 + name_len].decode()

    def request(self) -> tuple[int, int, int, int, int, bytes]:
        """(flags, command, cookie, offset, length, payload)."""
        magic, flags, command, cookie, offset, length = struct.unpack(">IHHQQI",
                                                                      self.recv(28))
        assert magic == raw.REQUEST_MAGIC
        payload = self.recv(length) if command == raw.CMD_WRITE else b""
        return flags, command, cookie, offset, length, payload

    def simple(self, cookie: int, error: int = 0, data: bytes = b"") -> None:
        self.conn.sendall(struct.pack(">IIQ", raw.SIMPLE_REPLY_MAGIC, error, cookie) + data)

    def expect_disc(self) -> None:
        assert self.request()[1] == raw.CMD_DISC


Script = Callable[[Peer], None]


@pytest.fixture
def scripted(sock_dir: Path) -> Iterator[Callable[..., str]]:
    """scripted(*scripts): a unix socket server that runs one script per connection, in
    order; returns the socket path. A script's failure fails the test."""
    servers: list[tuple[socket.socket, threading.Thread, list[BaseException]]] = []

    def start(*scripts: Script) -> str:
        path = sock_dir / f"scripted{len(servers)}.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(4)
        errors: list[BaseException] = []

        def run() -> None:
            for script in scripts:
                conn, _ = listener.accept()
                conn.settimeout(10)
                try:
                    script(Peer(conn))
                except BaseException as exc:  # reported by the test
                    errors.append(exc)
                finally:
                    conn.close()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        servers.append((listener, thread, errors))
        return str(path)

    yield start
    for listener, thread, errors in servers:
        thread.join(10)
        listener.close()
        assert not thread.is_alive(), "a scripted connection never came"
        if errors:
            raise errors[0]


def test_export_name_when_the_server_does_not_know_go(scripted) -> None:
    def script(peer: Peer) -> None:
        assert peer.greet() == FIXED_NEWSTYLE | NO_ZEROES
        option, _ = peer.option()
        assert option == raw.OPT_GO
        peer.reply(raw.OPT_GO, raw.REP_ERR_UNSUP)
        assert peer.option() == (raw.OPT_EXPORT_NAME, b"disk")
        peer.conn.sendall(struct.pack(">QH", MiB, HAS_FLAGS | SEND_FLUSH))  # NO_ZEROES
        _, command, cookie, offset, length, _ = peer.request()
        assert (command, offset, length) == (raw.CMD_READ, 1000, 10)
        peer.simple(cookie, data=b"0123456789")
        peer.expect_disc()

    path = scripted(script)
    with open_nbd(f"nbd+unix:///disk?socket={path}", writable=True) as dev:
        assert dev.info.negotiated_with == "NBD_OPT_EXPORT_NAME"
        assert (dev.size_bytes, dev.info.min_block_bytes, dev.info.block_sizes_advertised) \
            == (MiB, 1, False)
        assert dev.read(1000, 10) == b"0123456789"


def test_plain_newstyle_server(scripted) -> None:
    def script(peer: Peer) -> None:
        assert peer.greet(flags=0) == 0  # no fixed newstyle: only NBD_OPT_EXPORT_NAME
        assert peer.option() == (raw.OPT_EXPORT_NAME, b"")
        peer.conn.sendall(struct.pack(">QH", 4096, HAS_FLAGS | READ_ONLY) + bytes(124))
        peer.expect_disc()

    path = scripted(script)
    with open_nbd(f"nbd+unix:///?socket={path}", writable=False) as dev:
        assert dev.size_bytes == 4096 and dev.info.read_only


def test_unknown_export_with_export_name_is_listed_over_a_new_connection(scripted) -> None:
    def refuse(peer: Peer) -> None:
        peer.greet()
        option, _ = peer.option()
        peer.reply(option, raw.REP_ERR_UNSUP)
        assert peer.option() == (raw.OPT_EXPORT_NAME, b"nope")  # then hang up

    def list_(peer: Peer) -> None:
        peer.greet()
        assert peer.option() == (raw.OPT_LIST, b"")
        for name in (b"alpha", b"beta"):
            peer.reply(raw.OPT_LIST, raw.REP_SERVER, struct.pack(">I", len(name)) + name)
        peer.reply(raw.OPT_LIST, raw.REP_ACK)
        assert peer.option()[0] == raw.OPT_ABORT
        peer.reply(raw.OPT_ABORT, raw.REP_ACK)

    path = scripted(refuse, list_)
    with pytest.raises(NbdExportNotFoundError, match="the server offers: 'alpha', 'beta'") \
            as info:
        open_nbd(f"nbd+unix:///nope?socket={path}", writable=False)
    assert info.value.available == ["alpha", "beta"]


@pytest.mark.parametrize("reply_type, message", [
    (REP_ERR_TLS_REQD, "requires TLS for export 'disk' \\(the server says: TLS only\\); "
                       "blockera's NBD client does not support TLS"),
    (REP_ERR_POLICY, "policy refuses export 'disk' \\(the server says: TLS only\\)"),
    (REP_ERR_SHUTDOWN, "the server is shutting down"),
    (raw.REP_ERR_INVALID, "refused NBD_OPT_GO for export 'disk' \\(NBD_REP_ERR_INVALID\\)"),
])
def test_go_refusals_end_the_handshake_politely(scripted, reply_type, message) -> None:
    def script(peer: Peer) -> None:
        peer.greet()
        assert peer.option()[0] == raw.OPT_GO
        peer.reply(raw.OPT_GO, reply_type, b"TLS only")
        assert peer.option()[0] == raw.OPT_ABORT  # a soft disconnect
        peer.reply(raw.OPT_ABORT, raw.REP_ACK)

    path = scripted(script)
    with pytest.raises(NbdConnectError, match=message):
        open_nbd(f"nbd+unix:///disk?socket={path}", writable=False)


@pytest.mark.parametrize("greeting, message", [
    (b"HTTP/1.1 400 Bad Request\r\n\r\n", "not an NBD server"),
    (struct.pack(">QQ", raw.NBDMAGIC, OLDSTYLE_MAGIC), "oldstyle handshake"),
])
def test_not_a_newstyle_nbd_server(scripted, greeting, message) -> None:
    path = scripted(lambda peer: peer.conn.sendall(greeting))
    with pytest.raises(NbdConnectError, match=message):
        open_nbd(f"nbd+unix:///disk?socket={path}", writable=False)


def test_invalid_block_size_constraints_are_refused(scripted) -> None:
    def script(peer: Peer) -> None:
        peer.greet()
        peer.go(MiB, HAS_FLAGS, block_sizes=(3000, 4096, MiB))
        peer.expect_disc()  # the client was already in transmission: it disconnects

    path = scripted(script)
    with pytest.raises(NbdConnectError, match="invalid block size constraints \\(minimum 3000"):
        open_nbd(f"nbd+unix:///disk?socket={path}", writable=False)


def test_pieces_answered_out_of_order_are_reassembled(scripted) -> None:
    def script(peer: Peer) -> None:
        peer.greet()
        peer.go(MiB, HAS_FLAGS, block_sizes=(512, 4096, 4096))
        requests = [peer.request() for _ in range(4)]  # all in flight before any reply
        assert [(r[1], r[3], r[4]) for r in requests] == \
            [(raw.CMD_READ, 8192 + i * 4096, 4096) for i in range(4)]
        assert len({r[2] for r in requests}) == 4  # distinct cookies
        for _, _, cookie, offset, length, _ in reversed(requests):
            peer.simple(cookie, data=bytes([offset // 4096]) * length)
        peer.expect_disc()

    path = scripted(script)
    with open_nbd(f"nbd+unix:///disk?socket={path}", writable=False) as dev:
        data = dev.read(8192 + 100, 4 * 4096 - 200)
    assert data == b"\x02" * 3996 + b"\x03" * 4096 + b"\x04" * 4096 + b"\x05" * 3996


@pytest.mark.parametrize("bad_reply, complaint", [
    (lambda cookie: struct.pack(">IHHQI", raw.STRUCTURED_REPLY_MAGIC, 1, 0, cookie, 0),
     "a structured reply, which was not negotiated"),
    (lambda cookie: struct.pack(">IIQ", raw.SIMPLE_REPLY_MAGIC, 0, cookie + 1000),
     "unknown cookie"),
    (lambda cookie: struct.pack(">IIQ", 0x12345678, 0, cookie), "bad reply magic 0x12345678"),
])
def test_protocol_violations_close_the_connection(scripted, bad_reply, complaint) -> None:
    def script(peer: Peer) -> None:
        peer.greet()
        peer.go(MiB, HAS_FLAGS)
        cookie = peer.request()[2]
        peer.conn.sendall(bad_reply(cookie))
        with pytest.raises((raw.Closed, ConnectionResetError)):
            peer.request()  # the client hangs up without another word

    path = scripted(script)
    with open_nbd(f"nbd+unix:///disk?socket={path}", writable=False) as dev:
        with pytest.raises(NbdConnectionLost, match=complaint):
            dev.read(0, 512)
        with pytest.raises(NbdConnectionLost, match=complaint):
            dev.read(0, 512)


def test_an_unknown_error_value_is_taken_as_einval(scripted) -> None:
    def script(peer: Peer) -> None:
        peer.greet()
        peer.go(MiB, HAS_FLAGS | SEND_FLUSH)
        cookie = peer.request()[2]
        peer.simple(cookie, error=1234)
        peer.expect_disc()

    path = scripted(script)
    with open_nbd(f"nbd+unix:///disk?socket={path}", writable=True) as dev:
        with pytest.raises(DeviceError, match="NBD WRITE of 3 bytes at byte 7 failed: unknown "
                                              "NBD error value 1234, taken as EINVAL") as info:
            dev.write(7, b"abc")
    assert info.value.errno_name == "EINVAL"


def test_eshutdown_is_answered_with_a_soft_disconnect(scripted) -> None:
    def script(peer: Peer) -> None:
        peer.greet()
        peer.go(MiB, HAS_FLAGS | SEND_FLUSH)
        _, command, cookie, *_ = peer.request()
        assert command == raw.CMD_WRITE
        peer.simple(cookie, error=ESHUTDOWN)
        peer.expect_disc()  # at once, without the client being closed

    path = scripted(script)
    with open_nbd(f"nbd+unix:///disk?socket={path}", writable=True) as dev:
        with pytest.raises(DeviceError, match="NBD WRITE .* failed: ESHUTDOWN") as info:
            dev.write(0, b"x")
        assert info.value.errno_name == "ESHUTDOWN"
        with pytest.raises(DeviceError, match="the server is shutting down"):
            dev.read(0, 1)


def test_without_flush_a_writable_export_cannot_be_made_durable(scripted) -> None:
    def writable(peer: Peer) -> None:
        peer.greet()
        peer.go(MiB, HAS_FLAGS)  # writable, but neither FLUSH nor FUA
        peer.expect_disc()

    def read_only(peer: Peer) -> None:
        peer.greet()
        peer.go(MiB, HAS_FLAGS)
        peer.expect_disc()

    path = scripted(writable, read_only)
    with open_nbd(f"nbd+unix:///disk?socket={path}", writable=True) as dev:
        with pytest.raises(DeviceError, match="cannot be made durable: the server does not "
                                              "support NBD_CMD_FLUSH") as info:
            dev.flush()
        assert info.value.errno_name == "EOPNOTSUPP"
        with pytest.raises(DeviceError, match="a write with FUA cannot be made durable"):
            dev.write(0, b"x", fua=True)
    with open_nbd(f"nbd+unix:///disk?socket={path}", writable=False) as dev:
        dev.flush()  # nothing was written through it


# -- against real peers: qemu-nbd and nbdkit -----------------------------------------------------

def _connectable(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


@pytest.fixture
def peer(sock_dir: Path) -> Iterator[Callable[..., tuple[subprocess.Popen[bytes], Path]]]:
    """peer(tool, *arguments): a server process (qemu-nbd or nbdkit) listening on a fresh unix
    socket, which `{sock}` in the arguments stands for; (process, socket path) once it accepts
    connections. Every process is killed at the end of the test."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(tool: str, *arguments: str) -> tuple[subprocess.Popen[bytes], Path]:
        need(tool)
        path = sock_dir / f"{tool}{len(processes)}.sock"
        proc = subprocess.Popen([tool, *(a.replace("{sock}", str(path)) for a in arguments)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        processes.append(proc)
        deadline = time.monotonic() + 10
        while not _connectable(path):
            if proc.poll() is not None:
                raise AssertionError(f"{tool} exited with {proc.returncode}: "
                                     f"{proc.stderr.read().decode() if proc.stderr else ''}")
            assert time.monotonic() < deadline, f"{tool} did not start listening"
            time.sleep(0.01)
        return proc, path

    yield start
    for proc in processes:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        proc.wait(10)
        if proc.stderr:
            proc.stderr.close()


def qemu_nbd(peer: Callable[..., tuple[subprocess.Popen[bytes], Path]], image: Path,
             *options: str, name: str = "disk") -> tuple[subprocess.Popen[bytes], str]:
    proc, path = peer("qemu-nbd", "--socket={sock}", "--format=raw", "--persistent",
                      "--shared=16", "-x", name, *options, str(image))
    return proc, f"nbd+unix:///{name}?socket={path}"


def nbdkit(peer: Callable[..., tuple[subprocess.Popen[bytes], Path]],
           *arguments: str) -> tuple[subprocess.Popen[bytes], str]:
    proc, path = peer("nbdkit", "--foreground", "--unix={sock}", *arguments)
    return proc, f"nbd+unix:///?socket={path}"


@pytest.mark.parametrize("connections", [1, 4])
def test_qemu_nbd_round_trip_byte_compared_with_the_file(peer, opened, tmp_path,
                                                          connections) -> None:
    image = tmp_path / "disk.img"
    size = 48 * MiB
    expected = bytearray(big_pattern(size, seed=7))
    image.write_bytes(expected)
    _, uri = qemu_nbd(peer, image)
    dev = opened(uri, connections=connections)
    assert dev.size_bytes == size and dev.connection_count == connections
    assert dev.info.can_flush and dev.info.can_multi_conn
    requests = [(0, 4096), (1, 1), (12_345, 100_000), (MiB + 3, 40 * MiB), (size - 7, 7),
                (4096, 512 * 1024)]
    for offset, length in requests:
        data = big_pattern(length, seed=offset + 1)
        dev.write(offset, data, fua=offset == 0)
        expected[offset:offset + length] = data
    dev.flush()
    assert image.read_bytes() == expected
    for offset, length in requests + [(0, size), (777, 33 * MiB)]:
        assert dev.read(offset, length) == expected[offset:offset + length]


def test_qemu_nbd_discard_zeroes_and_trim(peer, opened, tmp_path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(pattern(8 * MiB, seed=8))
    _, uri = qemu_nbd(peer, image, "--discard=unmap")
    dev = opened(uri)
    assert dev.info.can_trim and dev.info.can_write_zeroes
    allocated = os.stat(image).st_blocks
    dev.discard(MiB, 2 * MiB)  # WRITE_ZEROES that may deallocate
    dev.flush()
    assert image.read_bytes()[MiB:3 * MiB] == bytes(2 * MiB)
    assert os.stat(image).st_blocks < allocated
    allocated = os.stat(image).st_blocks
    dev.write_zeroes(4 * MiB + 100, MiB)  # NO_HOLE: stays allocated
    dev.flush()
    assert image.read_bytes()[4 * MiB + 100:5 * MiB + 100] == bytes(MiB)
    assert image.read_bytes()[4 * MiB:4 * MiB + 100] == pattern(8 * MiB, seed=8)[4 * MiB:
                                                                                  4 * MiB + 100]
    assert os.stat(image).st_blocks >= allocated
    assert dev.trim(6 * MiB, MiB) is True
    dev.flush()
    assert os.stat(image).st_blocks < allocated


def test_qemu_nbd_from_eight_threads(peer, opened, tmp_path) -> None:
    image = tmp_path / "disk.img"
    size = 16 * MiB
    image.write_bytes(bytes(size))
    _, uri = qemu_nbd(peer, image)
    dev = opened(uri, connections=2)
    rng = random.Random(9)
    pieces: list[tuple[int, bytes]] = []
    offset = 0
    while offset < size:  # adjacent pieces of odd sizes, dealt out to the threads in turn
        length = min(rng.randrange(1, 300_000), size - offset)
        pieces.append((offset, pattern(length, seed=offset)))
        offset += length
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            for at, data in pieces[index::8]:
                dev.write(at, data)
                assert dev.read(at, len(data)) == data
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    dev.flush()
    assert image.read_bytes() == b"".join(data for _, data in pieces)


def test_qemu_nbd_read_only_export(peer, opened, tmp_path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(pattern(MiB))
    _, uri = qemu_nbd(peer, image, "--read-only")
    with pytest.raises(NbdConnectError, match="read-only") as info:
        opened(uri, writable=True)
    assert info.value.errno_name == "EROFS"
    dev = opened(uri, writable=False)
    assert dev.read(100, 100) == pattern(MiB)[100:200]
    with pytest.raises(DeviceError, match="opened read-only"):
        dev.write(0, b"x")
    dev.flush()


def test_qemu_nbd_wrong_export_name(peer, tmp_path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(MiB))
    _, uri = qemu_nbd(peer, image, name="vm-disk")
    with pytest.raises(NbdExportNotFoundError, match="no export named 'vm-dsik'.*the server "
                                                     "offers: 'vm-disk'") as info:
        open_nbd(uri.replace("vm-disk", "vm-dsik"), writable=True, connect_timeout_s=5)
    assert info.value.available == ["vm-disk"]


def test_qemu_nbd_killed_mid_way(peer, opened, tmp_path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(32 * MiB))
    proc, uri = qemu_nbd(peer, image)
    dev = opened(uri, connections=2)
    failures: list[BaseException] = []
    writing = threading.Event()

    def writer() -> None:
        data = pattern(MiB)
        try:
            for i in itertools.count():
                dev.write((i % 32) * MiB, data)
                writing.set()
        except DeviceError as exc:
            failures.append(exc)

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for t in threads:
        t.start()
    assert writing.wait(10)
    proc.kill()
    started = time.monotonic()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads), "a writer hangs"
    assert len(failures) == 4
    assert all(isinstance(f, NbdConnectionLost) for f in failures), failures
    assert any("connection to the server was lost" in str(f) for f in failures), failures
    with pytest.raises(NbdConnectionLost, match="reopen the device"):
        dev.read(0, 512)
    dev.close()
    assert time.monotonic() - started < 5


def test_qemu_nbd_stopped_server_times_out(peer, opened, tmp_path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(MiB))
    proc, uri = qemu_nbd(peer, image)
    dev = opened(uri, reply_timeout_s=0.5)
    dev.write(0, b"before")
    proc.send_signal(signal.SIGSTOP)
    started = time.monotonic()
    try:
        with pytest.raises(NbdConnectionLost, match="no reply to NBD READ .* within 0.5 s"):
            dev.read(0, 6)
        with pytest.raises(NbdConnectionLost):
            dev.write(0, b"after")
        dev.close()
        assert time.monotonic() - started < 5
    finally:
        proc.send_signal(signal.SIGCONT)


def test_nbdkit_block_size_constraints_are_obeyed(peer, opened) -> None:
    # The filter refuses (EINVAL) any request that breaks the constraints it advertises.
    _, uri = nbdkit(peer, "--filter=blocksize-policy", "memory", "4M",
                    "blocksize-minimum=4096", "blocksize-preferred=8192",
                    "blocksize-maximum=65536", "blocksize-error-policy=error")
    dev = opened(uri)
    assert (dev.info.min_block_bytes, dev.info.preferred_block_bytes,
            dev.info.max_payload_bytes) == (4096, 8192, 65536)
    assert dev.chunk_bytes == 65536
    expected = bytearray(4 * MiB)
    for offset, length in [(1, 1), (4095, 2), (5000, 300_000), (0, 4 * MiB), (4 * MiB - 9, 9),
                           (70_000, 70_000)]:
        data = pattern(length, seed=offset)
        dev.write(offset, data)
        expected[offset:offset + length] = data
    dev.write_zeroes(10, 20_000)
    expected[10:20_010] = bytes(20_000)
    dev.discard(100_000, 200_000)
    expected[100_000:300_000] = bytes(200_000)
    assert dev.trim(3 * MiB + 1, 4096 * 3) is True
    assert dev.read(0, 3 * MiB) == expected[:3 * MiB]
    assert dev.read(12_345, 54_321) == expected[12_345:12_345 + 54_321]


def test_nbdkit_plain_newstyle_uses_export_name(peer, opened) -> None:
    _, uri = nbdkit(peer, "--mask-handshake=0", "memory", "1M")
    dev = opened(uri)
    assert dev.info.negotiated_with == "NBD_OPT_EXPORT_NAME"
    dev.write(3, b"plain newstyle")
    dev.flush()
    assert dev.read(0, 20) == bytes(3) + b"plain newstyle" + bytes(3)


def test_nbdkit_without_flush(peer, opened) -> None:
    _, uri = nbdkit(peer, "eval", "get_size=echo 1048576",
                    "pread=dd if=/dev/zero count=$3 iflag=count_bytes status=none",
                    "pwrite=cat >/dev/null")
    dev = opened(uri)
    assert not dev.info.can_flush and not dev.info.read_only
    dev.write(0, b"x" * 4096)  # accepted, but it cannot be made durable:
    with pytest.raises(DeviceError, match="cannot be made durable"):
        dev.flush()
    with pytest.raises(DeviceError, match="cannot be made durable"):
        dev.write(0, b"x", fua=True)
    opened(uri, writable=False).flush()


def test_nbdkit_without_multi_conn_gets_one_connection(peer, opened) -> None:
    _, uri = nbdkit(peer, "--filter=multi-conn", "memory", "1M", "multi-conn-mode=disable")
    dev = opened(uri, connections=4)
    assert not dev.info.can_multi_conn and dev.connection_count == 1
    dev.write(0, b"one")
    assert dev.read(0, 3) == b"one"


@pytest.mark.parametrize("error, kind", [("EIO", DeviceError), ("EPERM", DeviceError),
                                         ("ENOSPC", NoSpaceError), ("EINVAL", DeviceError)])
def test_nbdkit_error_replies(peer, opened, error, kind) -> None:
    _, uri = nbdkit(peer, "--filter=error", "memory", "1M", f"error={error}",
                    "error-pwrite-rate=1")
    dev = opened(uri)
    with pytest.raises(kind, match=f"NBD WRITE of 8192 bytes at byte 4096 failed: {error}") \
            as info:
        dev.write(4096, bytes(8192))
    assert info.value.errno_name == error
    assert dev.read(0, 512) == bytes(512)  # the connection goes on
