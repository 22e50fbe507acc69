"""The device-mapper engine's devices exported over NBD, in-process: names resolved live, I/O
through the device's table (an era device records what clients write), the kernel's rules for
open, suspended and read-only devices, and bad requests that must not hurt the metadata."""

from __future__ import annotations

import errno
import struct
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from blockera.blockdev import FileDevice
from blockera.era.check import check_era_metadata
from blockera.errors import DeviceMapperError

from .conftest import pattern, wait_all, wait_until
from .engineenv import MiB, image, nonzero_blocks, recorded_blocks
from .rawclient import (CMD_READ, CMD_WRITE, EINVAL, ENOSPC, OPT_EXPORT_NAME, OPT_GO,
                        REP_ERR_UNKNOWN, RawClient)

ERA_BLOCK_BYTES = 64 << 10          # 128 sectors


def uri(server: Any, name: str) -> str:
    return f"nbd+unix:///{name}?socket={server.unix_path}"


def connect(nbd: Any, server: Any, name: str) -> Any:
    h = nbd.NBD()
    h.connect_uri(uri(server, name))
    return h


def listed(nbd: Any, server: Any) -> dict[str, str]:
    """NBD_OPT_LIST: export name -> description."""
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(uri(server, ""))
    found: dict[str, str] = {}

    def add(name: str, description: str) -> int:
        found[name] = description
        return 0

    try:
        h.opt_list(add)
    finally:
        h.opt_abort()
    return found


def go_refusal(server: Any, name: str) -> str:
    """NBD_OPT_GO for `name`, which must be refused as unknown; the server's message."""
    raw = RawClient(server.unix_path)
    try:
        raw.greeting()
        encoded = name.encode()
        raw.send_option(OPT_GO, len(encoded).to_bytes(4, "big") + encoded + bytes(2))
        option, reply_type, message = raw.option_reply()
        assert (option, reply_type) == (OPT_GO, REP_ERR_UNKNOWN)
        return message.decode()
    finally:
        raw.close()


def nbd_errno(nbd: Any, call: Any) -> int:
    with pytest.raises(nbd.Error) as info:
        call()
    return info.value.errnum


def era_setup(engine: Any, tmp_path: Path, origin_bytes: int = 16 * MiB,
              name: str = "era") -> tuple[Path, Path]:
    meta = image(tmp_path / f"{name}-meta.img", 4 * MiB)
    origin = image(tmp_path / f"{name}-origin.img", origin_bytes)
    engine.create(name, f"0 {origin_bytes // 512} era {meta} {origin} "
                        f"{ERA_BLOCK_BYTES // 512}")
    return meta, origin


def test_devices_are_exported_by_name_as_they_come_and_go(nbd, engine_export,
                                                          tmp_path: Path) -> None:
    engine, server = engine_export
    assert listed(nbd, server) == {}
    a = image(tmp_path / "a.img", 2 * MiB)
    engine.create("first", f"0 {2 * MiB // 512} linear {a} 0")
    assert set(listed(nbd, server)) == {"first"}
    engine.create("second", "0 2048 zero")
    names = listed(nbd, server)
    assert names == {"first": "engine device 253:0, linear",
                     "second": "engine device 253:1, zero"}
    h = connect(nbd, server, "second")
    assert h.get_size() == 2048 * 512
    h.shutdown()
    engine.remove("first")
    assert set(listed(nbd, server)) == {"second"}
    with pytest.raises(nbd.Error, match="no export named 'first'"):
        connect(nbd, server, "first")
    assert go_refusal(server, "first") == "no export named 'first' (available: 'second')"
    engine.rename("second", "third")
    assert set(listed(nbd, server)) == {"third"}
    assert connect(nbd, server, "third").get_size() == 2048 * 512


def test_a_device_without_a_live_table_is_listed_but_cannot_be_used(nbd, engine_export
                                                                    ) -> None:
    engine, server = engine_export
    engine.create("empty")
    assert listed(nbd, server) == {"empty": "engine device 253:0, no live table"}
    with pytest.raises(nbd.Error):
        connect(nbd, server, "empty")
    assert go_refusal(server, "empty") == ("device 'empty' has no live table: load a table "
                                           "and resume the device first")
    engine.load("empty", "0 1024 zero")
    engine.resume("empty")
    assert connect(nbd, server, "empty").get_size() == 1024 * 512


def test_a_connected_client_holds_the_device_open(nbd, engine_export, tmp_path: Path) -> None:
    engine, server = engine_export
    a = image(tmp_path / "a.img", MiB)
    engine.create("disk", f"0 2048 linear {a} 0")
    h = connect(nbd, server, "disk")
    assert engine.device("disk").open_count == 1
    assert "Open count:        1" in engine.info("disk")
    with pytest.raises(DeviceMapperError, match="busy") as info:
        engine.remove("disk")
    assert info.value.errno_name == "EBUSY"
    h.pwrite(b"\x42" * 4096, 0)
    h.shutdown()
    wait_until(lambda: engine.device("disk").open_count == 0)
    engine.remove("disk")
    assert a.read_bytes()[:4096] == b"\x42" * 4096


def test_option_export_name_holds_the_device_open_too(engine_export) -> None:
    engine, server = engine_export
    engine.create("z", "0 1024 zero")
    raw = RawClient(server.unix_path)
    try:
        raw.greeting()
        raw.send_option(OPT_EXPORT_NAME, b"z")
        size, _ = struct.unpack(">QH", raw.recv_exact(10))
        assert size == 1024 * 512
        assert engine.device("z").open_count == 1
        raw.request(CMD_READ, 1, 0, 512)
        assert raw.simple_reply(512) == (0, 1, bytes(512))
    finally:
        raw.close()
    wait_until(lambda: engine.device("z").open_count == 0)
    engine.remove("z")


def test_era_device_records_every_block_nbd_clients_write(nbd, engine_export,
                                                          tmp_path: Path) -> None:
    engine, server = engine_export
    meta, origin = era_setup(engine, tmp_path)
    h = connect(nbd, server, "era")
    assert h.get_size() == 16 * MiB
    b = ERA_BLOCK_BYTES
    h.pwrite(pattern(4096, seed=1), 3 * b + 512)                      # inside block 3
    h.pwrite(pattern(b, seed=2), 10 * b - 4096)                       # blocks 9 and 10
    h.pwrite(pattern(8192, seed=3), 20 * b, nbd.CMD_FLAG_FUA)         # block 20, FUA
    h.zero(3 * b, 40 * b)                                             # blocks 40-42
    h.trim(b, 100 * b)                                                # block 100
    h.flush()
    expected = {3, 9, 10, 20, 40, 41, 42, 100}
    assert recorded_blocks(engine, "era", meta) == expected
    assert nonzero_blocks(origin, b) <= expected
    data = origin.read_bytes()
    assert data[3 * b + 512:3 * b + 4608] == pattern(4096, seed=1)
    assert data[20 * b:20 * b + 8192] == pattern(8192, seed=3)
    assert h.pread(4096, 3 * b + 512) == pattern(4096, seed=1)
    h.shutdown()


def test_several_connections_write_one_era_device(nbd, engine_export, tmp_path: Path) -> None:
    engine, server = engine_export
    meta, origin = era_setup(engine, tmp_path, origin_bytes=32 * MiB)
    b = ERA_BLOCK_BYTES
    errors: list[BaseException] = []

    def client(index: int) -> None:
        try:
            h = connect(nbd, server, "era")
            assert h.can_multi_conn()
            cookies = [h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(
                pattern(4096, seed=index * 100 + i))), (index * 64 + i * 2) * b)
                for i in range(32)]
            wait_all(h, cookies)
            h.flush()
            h.shutdown()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    expected = {index * 64 + i * 2 for index in range(4) for i in range(32)}
    assert recorded_blocks(engine, "era", meta) == expected
    data = origin.read_bytes()
    for index in range(4):
        for i in range(32):
            offset = (index * 64 + i * 2) * b
            assert data[offset:offset + 4096] == pattern(4096, seed=index * 100 + i)


def test_a_suspended_device_holds_nbd_io_until_resumed(nbd, engine_export,
                                                       tmp_path: Path) -> None:
    engine, server = engine_export
    meta, origin = era_setup(engine, tmp_path)
    h = connect(nbd, server, "era")
    engine.suspend("era")
    write = h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(b"\x5a" * 4096)), 5 * MiB)
    read = h.aio_pread(nbd.Buffer(4096), 0)
    deadline = time.monotonic() + 0.3
    while time.monotonic() < deadline:
        h.poll(50)
    assert not h.aio_command_completed(write) and not h.aio_command_completed(read)
    assert origin.read_bytes()[5 * MiB:5 * MiB + 4096] == bytes(4096)
    engine.resume("era")
    wait_all(h, [write, read])
    assert origin.read_bytes()[5 * MiB:5 * MiB + 4096] == b"\x5a" * 4096
    h.shutdown()
    assert recorded_blocks(engine, "era", meta) == {5 * MiB // ERA_BLOCK_BYTES}


def test_a_read_only_device_is_a_read_only_export(nbd, engine_export, tmp_path: Path) -> None:
    engine, server = engine_export
    a = image(tmp_path / "a.img", MiB)
    a.write_bytes(b"\x11" * MiB)
    engine.create("ro", f"0 2048 linear {a} 0", read_only=True)
    h = connect(nbd, server, "ro")
    assert h.is_read_only()
    assert h.pread(512, 0) == b"\x11" * 512
    h.shutdown()
    raw = RawClient(server.unix_path)
    try:
        raw.connect_export("ro")
        raw.request(CMD_WRITE, 1, 0, 512, payload=bytes(512))
        assert raw.simple_reply()[0] == errno.EPERM
    finally:
        raw.close()
    assert a.read_bytes() == b"\x11" * MiB


def test_bad_requests_get_nbd_errors_and_leave_the_era_metadata_sound(
        nbd, engine_export, tmp_path: Path) -> None:
    engine, server = engine_export
    meta, origin = era_setup(engine, tmp_path, origin_bytes=4 * MiB)
    raw = RawClient(server.unix_path)
    try:
        size, _ = raw.connect_export("era")   # no NBD_INFO_BLOCK_SIZE: the device checks
        assert size == 4 * MiB
        raw.request(CMD_WRITE, 1, 100, 512, payload=bytes(512))      # not sector-aligned
        assert raw.simple_reply()[:2] == (EINVAL, 1)
        raw.request(CMD_READ, 2, 512, 100)                            # partial sector
        assert raw.simple_reply()[:2] == (EINVAL, 2)
        raw.request(CMD_WRITE, 3, 4 * MiB - 512, 1024, payload=bytes(1024))  # past the end
        assert raw.simple_reply()[:2] == (ENOSPC, 3)
        raw.request(CMD_READ, 4, 4 * MiB, 512)
        assert raw.simple_reply()[:2] == (EINVAL, 4)
        raw.request(CMD_READ, 5, 0, 64 * MiB)                         # over the maximum
        assert raw.simple_reply()[:2] == (EINVAL, 5)
        raw.request(CMD_WRITE, 6, 0, 512, payload=b"\x99" * 512)      # still serving
        assert raw.simple_reply() == (0, 6, b"")
    finally:
        raw.close()
    # A client that asked for the block size constraints is refused by the server itself.
    h = connect(nbd, server, "era")
    h.set_strict_mode(0)
    assert nbd_errno(nbd, lambda: h.pread(100, 10)) == errno.EINVAL
    h.shutdown()
    assert recorded_blocks(engine, "era", meta) == {0}
    engine.suspend("era")
    assert check_era_metadata(FileDevice(meta, writable=False)).ok
    assert origin.read_bytes()[:512] == b"\x99" * 512


def test_a_client_vanishing_mid_write_leaves_the_era_metadata_consistent(
        nbd, engine_export, tmp_path: Path) -> None:
    engine, server = engine_export
    meta, origin = era_setup(engine, tmp_path)
    b = ERA_BLOCK_BYTES
    half = RawClient(server.unix_path)                  # 1 of 4 MiB of payload, then gone
    half.connect_export("era")
    half.request(CMD_WRITE, 1, 32 * b, 4 * MiB, payload=b"\xee" * MiB)
    half.close()
    header = RawClient(server.unix_path)                # a header and no payload at all
    header.connect_export("era")
    header.request(CMD_WRITE, 1, 100 * b, 8192)
    header.close()
    burst = RawClient(server.unix_path)                 # complete writes, replies unread
    burst.connect_export("era")
    for i in range(16):
        burst.request(CMD_WRITE, i, (150 + i) * b, 4096, payload=b"\x77" * 4096)
    burst.close()
    wait_until(lambda: server.connection_count() == 0)
    wait_until(lambda: engine.device("era").open_count == 0)
    recorded = recorded_blocks(engine, "era", meta)
    # Incomplete writes never reached the device; of the complete ones, those executed before
    # the server noticed the client was gone (its replies cannot be sent) are all recorded.
    assert recorded == nonzero_blocks(origin, b)
    assert {150} <= recorded <= set(range(150, 166))
    h = connect(nbd, server, "era")
    h.pwrite(b"\x12" * 4096, 7 * b)
    h.shutdown()
    engine.suspend("era")
    report = check_era_metadata(FileDevice(meta, writable=False))
    assert report.ok, report.lines()
    engine.resume("era")
    assert recorded_blocks(engine, "era", meta) == recorded | {7}


def test_option_go_on_a_removed_device_is_refused(engine_export) -> None:
    engine, server = engine_export
    engine.create("gone", "0 1024 zero")
    engine.remove("gone")
    assert go_refusal(server, "gone") == "no export named 'gone' (available: none)"


def test_snapshot_origin_copies_out_before_nbd_writes(nbd, engine_export,
                                                      tmp_path: Path) -> None:
    engine, server = engine_export
    origin = image(tmp_path / "origin.img", 4 * MiB)
    cow = image(tmp_path / "cow.img", 4 * MiB)
    before = pattern(4 * MiB, seed=11)
    origin.write_bytes(before)
    # LVM's layering: the origin goes live first; a snapshot is added while it is suspended.
    engine.create("base-real", f"0 8192 linear {origin} 0")
    engine.create("base", "0 8192 snapshot-origin /dev/mapper/base-real")
    engine.suspend("base")
    engine.create("snap", f"0 8192 snapshot /dev/mapper/base-real {cow} P 16")
    engine.resume("base")
    h = connect(nbd, server, "base")
    h.pwrite(b"\xab" * 65536, MiB)
    h.flush()
    h.shutdown()
    s = connect(nbd, server, "snap")
    assert s.pread(65536, MiB) == before[MiB:MiB + 65536]
    s.shutdown()
    assert origin.read_bytes()[MiB:MiB + 65536] == b"\xab" * 65536
