"""Server life cycle and safety: listen addresses, the unix socket file, connection limits,
graceful shutdown with requests in flight."""

from __future__ import annotations

import os
import socket
import stat
import threading
import time
from pathlib import Path

import pytest

from blockera.blockdev import MemoryDevice
from blockera.errors import UsageError
from blockera.nbd import BlockLimits, ListenError, RemoteBindRefusedError, serve

from .conftest import wait_until
from .rawclient import CMD_READ, RawClient

MiB = 1 << 20


@pytest.mark.parametrize("host", ["0.0.0.0", "::", ""])
def test_non_loopback_tcp_bind_is_refused(host) -> None:
    with pytest.raises(RemoteBindRefusedError) as info:
        serve({"disk": MemoryDevice(MiB)}, tcp=(host, 0))
    assert "allow_remote=True" in str(info.value)


def test_non_loopback_tcp_bind_when_explicitly_allowed() -> None:
    server = serve({"disk": MemoryDevice(MiB)}, tcp=("0.0.0.0", 0), allow_remote=True)
    try:
        assert server.tcp_address is not None and server.tcp_address[0] == "0.0.0.0"
        with socket.create_connection(("127.0.0.1", server.tcp_address[1]), timeout=5) as s:
            assert s.recv(8) == b"NBDMAGIC"
    finally:
        assert server.shutdown(timeout_s=10)


@pytest.mark.parametrize("host", [None, "127.0.0.1", "localhost"])
def test_loopback_tcp_binds(host) -> None:
    server = serve({"disk": MemoryDevice(MiB)}, tcp=(host, 0))
    try:
        address, port = server.tcp_address
        assert address in ("127.0.0.1", "::1")
        with socket.create_connection((address, port), timeout=5) as s:
            s.settimeout(5)
            assert s.recv(8) == b"NBDMAGIC"
    finally:
        assert server.shutdown(timeout_s=10)


def test_configuration_errors(sock_dir: Path) -> None:
    with pytest.raises(UsageError, match="nothing to listen on"):
        serve({"disk": MemoryDevice(MiB)})
    with pytest.raises(UsageError, match="power of two"):
        BlockLimits(min_block_bytes=3000)
    with pytest.raises(UsageError, match="maximum payload"):
        BlockLimits(max_payload_bytes=1024)
    with pytest.raises(ListenError, match="too long"):
        serve({}, unix_path=sock_dir / ("x" * 120))
    plain = sock_dir / "plain"
    plain.write_text("not a socket")
    with pytest.raises(ListenError, match="not a socket"):
        serve({}, unix_path=plain)


def test_unix_socket_file(sock_dir: Path) -> None:
    path = sock_dir / "nbd.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # a socket file nobody listens on, as a crashed server leaves it
    server = serve({"disk": MemoryDevice(MiB)}, unix_path=path)
    try:
        mode = os.stat(path).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
        with pytest.raises(ListenError, match="in use"):
            serve({}, unix_path=path)
    finally:
        assert server.shutdown(timeout_s=10)
    assert not path.exists()


def test_connection_limit(start_server) -> None:
    server = start_server({"disk": MemoryDevice(MiB)}, max_connections=1)
    first = RawClient(server.unix_path)
    try:
        first.connect_export("disk")
        second = RawClient(server.unix_path)
        try:
            assert second.is_closed()
        finally:
            second.close()
        first.request(CMD_READ, 1, 0, 512)
        assert first.simple_reply(512) == (0, 1, bytes(512))
    finally:
        first.close()


class BlockingDevice(MemoryDevice):
    """Reads wait until `release` is set."""

    def __init__(self, size_bytes: int) -> None:
        super().__init__(size_bytes)
        self.release = threading.Event()
        self.reading = threading.Event()

    def read(self, offset_bytes: int, length_bytes: int) -> bytes:
        self.reading.set()
        self.release.wait(30)
        return super().read(offset_bytes, length_bytes)


def test_shutdown_finishes_requests_in_flight(sock_dir: Path) -> None:
    device = BlockingDevice(MiB)
    device.data[:4] = b"done"
    server = serve({"disk": device}, unix_path=sock_dir / "s.sock")
    idle = RawClient(server.unix_path)
    busy = RawClient(server.unix_path)
    try:
        idle.connect_export("disk")
        busy.connect_export("disk")
        busy.request(CMD_READ, 5, 0, 512)
        assert device.reading.wait(10)
        result: list[bool] = []
        stopper = threading.Thread(target=lambda: result.append(server.shutdown(timeout_s=20)))
        stopper.start()
        wait_until(lambda: idle.is_closed())  # idle connections close at once
        with pytest.raises(OSError):  # no new connections
            RawClient(server.unix_path).greeting()
        time.sleep(0.2)
        assert stopper.is_alive()  # still waiting for the blocked request
        device.release.set()
        assert busy.simple_reply(512) == (0, 5, b"done" + bytes(508))
        assert busy.is_closed()
        stopper.join(20)
        assert result == [True]
        assert server.connection_count() == 0
    finally:
        device.release.set()
        idle.close()
        busy.close()
        server.shutdown(timeout_s=5)


def test_shutdown_gives_up_on_a_device_that_stays_blocked(sock_dir: Path) -> None:
    device = BlockingDevice(MiB)
    server = serve({"disk": device}, unix_path=sock_dir / "s.sock")
    c = RawClient(server.unix_path)
    try:
        c.connect_export("disk")
        c.request(CMD_READ, 1, 0, 512)
        assert device.reading.wait(10)
        started = time.monotonic()
        assert server.shutdown(timeout_s=0.3) is False
        assert time.monotonic() - started < 5
        assert c.is_closed()
    finally:
        device.release.set()
        c.close()


def test_shutdown_during_the_handshake(sock_dir: Path) -> None:
    server = serve({"disk": MemoryDevice(MiB)}, unix_path=sock_dir / "s.sock")
    c = RawClient(server.unix_path)
    try:
        c.greeting()
        wait_until(lambda: server.connection_count() == 1)
        assert server.shutdown(timeout_s=10)
        assert c.is_closed()
    finally:
        c.close()


def test_context_manager_and_repeated_shutdown(sock_dir: Path) -> None:
    with serve({"disk": MemoryDevice(MiB)}, unix_path=sock_dir / "s.sock") as server:
        assert (sock_dir / "s.sock").exists()
    assert not (sock_dir / "s.sock").exists()
    assert server.shutdown(timeout_s=1)
