"""Protocol behaviour seen through libnbd (python3-libnbd): flags, errors, limits, several
connections and requests in flight."""

from __future__ import annotations

import errno
import threading
import time
from typing import Any

import pytest

from blockera.blockdev import MemoryDevice
from blockera.errors import DeviceError, NoSpaceError
from blockera.nbd import Export

from .conftest import RecordingDevice, pattern, unix_uri, wait_all

MiB = 1 << 20


def connect(nbd: Any, uri: str, *, strict: bool = True, structured: bool = True) -> Any:
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    if not strict:
        h.set_strict_mode(0)
    h.connect_uri(uri)
    return h


def nbd_errno(call: Any) -> int:
    """Run `call`, which must fail with an NBD error; its errno."""
    import nbd as _nbd  # loaded by the fixture
    with pytest.raises(_nbd.Error) as info:
        call()
    return info.value.errnum


def test_write_fua_flush_trim_zero(nbd, start_server) -> None:
    device = RecordingDevice(8 * MiB)
    h = connect(nbd, unix_uri(start_server({"disk": device})))
    assert h.get_structured_replies_negotiated()
    data = pattern(64 << 10)
    h.pwrite(data, 1 * MiB, nbd.CMD_FLAG_FUA)
    assert device.calls[-2:] == [("write", 1 * MiB, 64 << 10), ("flush", 0, 0)]
    assert h.pread(64 << 10, 1 * MiB) == data
    h.flush()
    assert device.calls[-1] == ("flush", 0, 0)
    h.trim(16 << 10, 1 * MiB)
    assert device.calls[-1] == ("discard", 1 * MiB, 16 << 10)
    assert h.pread(16 << 10, 1 * MiB) == bytes(16 << 10)
    h.trim(4096, 2 * MiB, nbd.CMD_FLAG_FUA)
    assert device.calls[-2:] == [("discard", 2 * MiB, 4096), ("flush", 0, 0)]
    h.zero(8192, 1 * MiB + 32768)
    h.zero(8192, 1 * MiB + 49152, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
    assert device.calls[-3:] == [("write_zeroes", 1 * MiB + 32768, 8192),
                                 ("write_zeroes", 1 * MiB + 49152, 8192), ("flush", 0, 0)]
    expected = bytearray(data)
    expected[:16 << 10] = bytes(16 << 10)
    expected[32768:40960] = bytes(8192)
    expected[49152:57344] = bytes(8192)
    assert h.pread(64 << 10, 1 * MiB) == bytes(expected)
    h.shutdown()


def test_fast_zero_is_refused_unless_the_device_zeroes_fast(nbd, start_server) -> None:
    slow = RecordingDevice(MiB)
    slow.data[:] = b"\x01" * MiB
    fast = RecordingDevice(MiB)
    fast.fast_zero = True  # type: ignore[attr-defined]
    fast.data[:] = b"\x01" * MiB
    server = start_server({"slow": slow, "fast": fast})
    h = connect(nbd, unix_uri(server, "slow"))
    assert h.can_fast_zero()
    assert nbd_errno(lambda: h.zero(65536, 0, nbd.CMD_FLAG_FAST_ZERO)) == errno.ENOTSUP
    assert "write_zeroes" not in slow.kinds() and bytes(slow.data[:65536]) == b"\x01" * 65536
    h.zero(65536, 0)  # without the flag it must not fail
    assert bytes(slow.data[:65536]) == bytes(65536)
    h.shutdown()
    h = connect(nbd, unix_uri(server, "fast"))
    h.zero(65536, 0, nbd.CMD_FLAG_FAST_ZERO)
    assert bytes(fast.data[:65536]) == bytes(65536)
    h.shutdown()


@pytest.mark.parametrize("structured", [True, False])
def test_out_of_range_and_misaligned_requests(nbd, start_server, structured) -> None:
    size = 4 * MiB
    device = MemoryDevice(size)
    h = connect(nbd, unix_uri(start_server({"disk": device})), strict=False,
                structured=structured)
    assert h.get_structured_replies_negotiated() == structured
    assert nbd_errno(lambda: h.pread(4096, size)) == errno.EINVAL
    assert nbd_errno(lambda: h.pread(8192, size - 4096)) == errno.EINVAL
    assert nbd_errno(lambda: h.pwrite(bytes(4096), size)) == errno.ENOSPC
    assert nbd_errno(lambda: h.pwrite(bytes(8192), size - 4096)) == errno.ENOSPC
    assert nbd_errno(lambda: h.zero(8192, size - 4096)) == errno.ENOSPC
    assert nbd_errno(lambda: h.trim(8192, size - 4096)) == errno.EINVAL
    assert nbd_errno(lambda: h.pread(512, 100)) == errno.EINVAL
    assert nbd_errno(lambda: h.pwrite(bytes(100), 512)) == errno.EINVAL
    assert bytes(device.data) == bytes(size)
    # The connection is still in step: a good request right after succeeds.
    h.pwrite(b"\x42" * 4096, size - 4096)
    assert h.pread(4096, size - 4096) == b"\x42" * 4096
    h.shutdown()


@pytest.mark.parametrize("structured", [True, False])
def test_oversized_requests_are_refused_and_the_connection_survives(
        nbd, start_server, structured) -> None:
    size = 64 * MiB
    device = MemoryDevice(size)
    h = connect(nbd, unix_uri(start_server({"disk": device})), strict=False,
                structured=structured)
    assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 * MiB
    too_big = 48 * MiB
    expected = errno.EOVERFLOW if structured else errno.EINVAL
    assert nbd_errno(lambda: h.pread(too_big, 0)) == expected
    assert nbd_errno(lambda: h.pwrite(b"\x07" * too_big, 0)) == errno.EINVAL
    assert bytes(device.data[:4096]) == bytes(4096)  # nothing of it was written
    data = pattern(32 * MiB)
    h.pwrite(data, 0)
    assert h.pread(32 * MiB, 0) == data
    h.shutdown()


def test_read_only_exports(nbd, start_server) -> None:
    device = MemoryDevice(MiB)
    device.data[:] = b"\x33" * MiB
    server = start_server({"ro": Export(device, read_only=True), "rw": device})
    h = connect(nbd, unix_uri(server, "ro"), strict=False)
    assert h.is_read_only()
    assert not h.can_trim() and not h.can_zero()
    assert h.pread(4096, 0) == b"\x33" * 4096
    assert nbd_errno(lambda: h.pwrite(bytes(4096), 0)) == errno.EPERM
    assert nbd_errno(lambda: h.trim(4096, 0)) == errno.EPERM
    assert nbd_errno(lambda: h.zero(4096, 0)) == errno.EPERM
    h.flush()
    assert h.pread(4096, 0) == b"\x33" * 4096
    h.shutdown()
    h = connect(nbd, unix_uri(server, "rw"))
    assert not h.is_read_only()
    h.shutdown()


def test_read_only_server_and_device_attribute(nbd, start_server) -> None:
    class ReadOnlyDevice(MemoryDevice):
        read_only = True

    server = start_server({"a": MemoryDevice(MiB)}, read_only=True)
    h = connect(nbd, unix_uri(server, "a"))
    assert h.is_read_only()
    h.shutdown()
    server = start_server({"b": ReadOnlyDevice(MiB)})
    h = connect(nbd, unix_uri(server, "b"))
    assert h.is_read_only()
    h.shutdown()


def test_negotiation_details(nbd, start_server) -> None:
    exports = {"disk": Export(MemoryDevice(3 * MiB), description="scratch disk"),
               "other": MemoryDevice(MiB)}
    server = start_server(exports, default_export="disk")
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(unix_uri(server, ""))
    listed: list[tuple[str, str]] = []
    h.opt_list(lambda name, description: listed.append((name, description)) or 0)
    assert sorted(listed) == [("disk", "scratch disk"), ("other", "")]
    h.set_full_info(True)
    h.set_export_name("")  # the default export
    h.opt_info()
    assert h.get_canonical_export_name() == "disk"
    assert h.get_export_description() == "scratch disk"
    assert h.get_size() == 3 * MiB
    assert (h.get_block_size(nbd.SIZE_MINIMUM), h.get_block_size(nbd.SIZE_PREFERRED),
            h.get_block_size(nbd.SIZE_MAXIMUM)) == (512, 4096, 32 * MiB)
    h.set_export_name("missing")
    assert nbd_errno(h.opt_info) == errno.ENOENT  # NBD_REP_ERR_UNKNOWN
    h.set_export_name("other")
    h.opt_go()
    assert h.get_size() == MiB
    assert h.can_multi_conn()
    h.shutdown()


def test_exports_are_resolved_at_negotiation(nbd, start_server) -> None:
    exports: dict[str, Any] = {}
    server = start_server(lambda: exports)
    with pytest.raises(nbd.Error):
        connect(nbd, unix_uri(server, "late"))
    exports["late"] = MemoryDevice(2 * MiB)
    h = connect(nbd, unix_uri(server, "late"))
    assert h.get_size() == 2 * MiB
    del exports["late"]
    h.pwrite(b"x" * 512, 0)  # a negotiated connection keeps its device
    h.shutdown()
    with pytest.raises(nbd.Error):
        connect(nbd, unix_uri(server, "late"))


def test_a_failing_export_source_is_an_error_not_a_crash(nbd, start_server) -> None:
    calls = {"n": 0}

    def source() -> dict[str, Any]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("engine busy")
        return {"disk": MemoryDevice(MiB)}

    server = start_server(source)
    assert nbd_errno(lambda: connect(nbd, unix_uri(server))) == errno.ENOENT
    h = connect(nbd, unix_uri(server))
    assert h.get_size() == MiB
    h.shutdown()


class FailingDevice(MemoryDevice):
    """Reads fail with an I/O error, writes past the first MiB run out of space, flush raises
    something unexpected."""

    def read(self, offset_bytes: int, length_bytes: int) -> bytes:
        if offset_bytes >= MiB:
            raise DeviceError(f"medium error at byte {offset_bytes}")
        return super().read(offset_bytes, length_bytes)

    def write(self, offset_bytes: int, data: Any) -> None:
        if offset_bytes >= MiB:
            raise NoSpaceError("snapshot store is full")
        super().write(offset_bytes, data)

    def flush(self) -> None:
        raise RuntimeError("unexpected failure")

    def discard(self, offset_bytes: int, length_bytes: int) -> None:
        raise DeviceError("discard is not supported", errno_name="EOPNOTSUPP")


@pytest.mark.parametrize("structured", [True, False])
def test_device_errors_become_nbd_errors(nbd, start_server, structured) -> None:
    server = start_server({"disk": FailingDevice(2 * MiB)})
    h = connect(nbd, unix_uri(server), structured=structured)
    assert nbd_errno(lambda: h.pread(4096, MiB)) == errno.EIO
    assert nbd_errno(lambda: h.pwrite(bytes(4096), MiB)) == errno.ENOSPC
    assert nbd_errno(lambda: h.flush()) == errno.EIO
    h.trim(4096, 0)  # unsupported discard: TRIM is a hint, it succeeds
    h.pwrite(b"\x01" * 4096, 0)
    assert h.pread(4096, 0) == b"\x01" * 4096
    h.shutdown()


def test_several_connections_at_once(nbd, start_server) -> None:
    device = MemoryDevice(16 * MiB)
    server = start_server({"disk": device})
    errors: list[BaseException] = []
    chunk = 64 << 10

    def client(index: int) -> None:
        try:
            h = connect(nbd, unix_uri(server))
            assert h.can_multi_conn()
            data = pattern(chunk, seed=index)
            for i in range(16):
                h.pwrite(data, (index * 16 + i) * chunk)
            h.flush()
            for i in range(16):
                assert h.pread(chunk, (index * 16 + i) * chunk) == data
            h.shutdown()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    # One connection sees what all the others wrote.
    h = connect(nbd, unix_uri(server))
    for index in range(8):
        assert h.pread(chunk, index * 16 * chunk) == pattern(chunk, seed=index)
    h.shutdown()


def test_many_requests_in_flight_on_one_connection(nbd, start_server) -> None:
    device = MemoryDevice(8 * MiB)
    h = connect(nbd, unix_uri(start_server({"disk": device})))
    block = 4096
    blocks = 512
    data = pattern(block * blocks, seed=3)
    writes = [h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data[i * block:(i + 1) * block])),
                           i * block * 3) for i in range(blocks)]
    assert h.aio_in_flight() > 1
    wait_all(h, writes)
    for i in range(blocks):
        assert bytes(device.data[i * block * 3:i * block * 3 + block]) == \
            data[i * block:(i + 1) * block]
    buffers = [nbd.Buffer(block) for _ in range(blocks)]
    wait_all(h, [h.aio_pread(buffers[i], i * block * 3) for i in range(blocks)])
    for i in range(blocks):
        assert buffers[i].to_bytearray() == data[i * block:(i + 1) * block]
    h.shutdown()


class SlowAtZeroDevice(MemoryDevice):
    """Reads of the first block wait until released."""

    def __init__(self, size_bytes: int) -> None:
        super().__init__(size_bytes)
        self.release = threading.Event()
        self.entered = threading.Event()

    def read(self, offset_bytes: int, length_bytes: int) -> bytes:
        if offset_bytes == 0:
            self.entered.set()
            self.release.wait(30)
        return super().read(offset_bytes, length_bytes)


def test_replies_complete_out_of_order(nbd, start_server) -> None:
    device = SlowAtZeroDevice(MiB)
    device.data[4096:8192] = b"\x77" * 4096
    h = connect(nbd, unix_uri(start_server({"disk": device})))
    try:
        slow = h.aio_pread(nbd.Buffer(4096), 0)
        fast_buf = nbd.Buffer(4096)
        fast = h.aio_pread(fast_buf, 4096)
        deadline = time.monotonic() + 10
        while not h.aio_command_completed(fast):
            assert time.monotonic() < deadline, "a request was held up behind a blocked one"
            h.poll(100)
        assert fast_buf.to_bytearray() == b"\x77" * 4096
        assert h.aio_in_flight() == 1
        # (the slow read's thread may not have reached the device yet on a loaded machine)
        assert device.entered.wait(10)
    finally:
        device.release.set()
    wait_all(h, [slow])
    h.shutdown()
