"""Handshake and transmission details, and malformed input, over a raw socket: the server
answers with the right error or closes that connection, and keeps serving everyone else."""

from __future__ import annotations

import struct
import time

import pytest

from blockera.blockdev import MemoryDevice
from blockera.nbd import BlockLimits, Export

from .conftest import GatedDevice, wait_until
from .rawclient import (
    CMD_DISC, CMD_FLAG_DF, CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLUSH, CMD_READ, CMD_TRIM,
    CMD_WRITE, CMD_WRITE_ZEROES, EINVAL, ENOSPC, EOVERFLOW, EPERM, INFO_BLOCK_SIZE,
    INFO_DESCRIPTION, INFO_EXPORT, INFO_NAME, OPT_ABORT, OPT_EXPORT_NAME, OPT_GO, OPT_INFO,
    OPT_LIST, OPT_STRUCTURED_REPLY, REP_ACK, REP_ERR_INVALID, REP_ERR_UNKNOWN, REP_ERR_UNSUP,
    REP_SERVER, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA,
    RawClient)

MiB = 1 << 20


@pytest.fixture
def device() -> MemoryDevice:
    dev = MemoryDevice(4 * MiB)
    dev.data[:MiB] = bytes(range(256)) * (MiB // 256)
    return dev


@pytest.fixture
def server(start_server, device):
    return start_server({"disk": device,
                         "ro": Export(MemoryDevice(MiB), read_only=True, description="r/o")})


@pytest.fixture
def client(server):
    clients: list[RawClient] = []

    def make() -> RawClient:
        c = RawClient(server.unix_path)
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()


def assert_server_still_serves(server) -> None:
    c = RawClient(server.unix_path)
    try:
        size, _ = c.connect_export("disk")
        assert size == 4 * MiB
        c.request(CMD_READ, 7, 512, 512)
        assert c.simple_reply(512) == (0, 7, bytes(range(256)) * 2)
    finally:
        c.close()


# -- handshake -------------------------------------------------------------------------------
def test_greeting_advertises_fixed_newstyle_and_no_zeroes(client) -> None:
    assert client().greeting() == 0b11


def test_unknown_client_flags_close_the_connection(client, server) -> None:
    c = client()
    c.greeting(client_flags=0x80)
    assert c.is_closed()
    assert_server_still_serves(server)


def test_bad_option_magic_closes_the_connection(client, server) -> None:
    c = client()
    c.greeting()
    c.send_option(OPT_LIST, magic=0x1234)
    assert c.is_closed()
    assert_server_still_serves(server)


def test_unknown_options_are_unsupported_and_haggling_continues(client) -> None:
    c = client()
    c.greeting()
    for option in (99, 5, 9, 10, 11):  # unknown, STARTTLS, meta contexts, extended headers
        c.send_option(option, b"junk")
        assert c.option_reply()[:2] == (option, REP_ERR_UNSUP)
    c.send_option(OPT_LIST)
    names = []
    while True:
        _, reply_type, data = c.option_reply()
        if reply_type == REP_ACK:
            break
        assert reply_type == REP_SERVER
        (n,) = struct.unpack(">I", data[:4])
        names.append((data[4:4 + n].decode(), data[4 + n:].decode()))
    assert sorted(names) == [("disk", ""), ("ro", "r/o")]


def test_malformed_options_are_invalid(client) -> None:
    c = client()
    c.greeting()
    c.send_option(OPT_LIST, b"x")
    assert c.option_reply()[1] == REP_ERR_INVALID
    c.send_option(OPT_STRUCTURED_REPLY, b"x")
    assert c.option_reply()[1] == REP_ERR_INVALID
    for data in (b"\0\0", struct.pack(">I", 100) + b"disk\0\0",
                 struct.pack(">I", 4) + b"disk" + struct.pack(">H", 3) + b"\0\0",
                 struct.pack(">I", 2) + b"\xff\xfe" + b"\0\0"):
        for option in (OPT_GO, OPT_INFO):
            c.send_option(option, data)
            assert c.option_reply()[:2] == (option, REP_ERR_INVALID)
    # Still haggling: a correct GO now succeeds.
    assert struct.unpack(">QH", c.go("disk")[INFO_EXPORT])[0] == 4 * MiB


def test_unknown_export_is_reported_with_the_available_names(client) -> None:
    c = client()
    c.greeting()
    c.send_option(OPT_GO, struct.pack(">I", 4) + b"nope" + b"\0\0")
    option, reply_type, message = c.option_reply()
    assert (option, reply_type) == (OPT_GO, REP_ERR_UNKNOWN)
    assert b"'nope'" in message and b"'disk'" in message


def test_info_replies(client) -> None:
    c = client()
    c.greeting()
    infos = c.go("ro", option=OPT_INFO, infos=(INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE))
    size, flags = struct.unpack(">QH", infos[INFO_EXPORT])
    assert size == MiB and flags & 0b11 == 0b11  # HAS_FLAGS | READ_ONLY
    assert infos[INFO_NAME] == b"ro" and infos[INFO_DESCRIPTION] == b"r/o"
    assert struct.unpack(">III", infos[INFO_BLOCK_SIZE]) == (512, 4096, 32 * MiB)
    # INFO does not end the handshake; the block sizes come even unasked.
    infos = c.go("disk")
    assert set(infos) == {INFO_EXPORT, INFO_BLOCK_SIZE}
    _, flags = struct.unpack(">QH", infos[INFO_EXPORT])
    assert flags & 0b10 == 0  # writable
    assert flags & (1 << 8)  # CAN_MULTI_CONN
    c.request(CMD_READ, 1, 0, 4)  # the client did not agree to the block sizes
    assert c.simple_reply(4) == (0, 1, b"\0\1\2\3")


def test_alignment_is_enforced_once_the_client_agreed_to_it(client) -> None:
    c = client()
    c.greeting()
    c.go("disk", infos=(INFO_BLOCK_SIZE,))
    for cookie, (offset, length) in enumerate([(0, 4), (256, 512), (512, 1000)]):
        c.request(CMD_READ, cookie, offset, length)
        assert c.simple_reply() == (EINVAL, cookie, b"")
    c.request(CMD_WRITE, 9, 100, 512, payload=b"\xff" * 512)
    assert c.simple_reply() == (EINVAL, 9, b"")
    c.request(CMD_READ, 10, 512, 1024)
    assert c.simple_reply(1024) == (0, 10, bytes(range(256)) * 4)


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name_option(client, no_zeroes) -> None:
    c = client()
    c.greeting(client_flags=3 if no_zeroes else 1)
    c.send_option(OPT_EXPORT_NAME, b"disk")
    size, flags = struct.unpack(">QH", c.recv_exact(10))
    assert size == 4 * MiB and flags & 1
    if not no_zeroes:
        assert c.recv_exact(124) == bytes(124)
    c.request(CMD_READ, 9, 256, 2)
    assert c.simple_reply(2) == (0, 9, b"\0\1")


def test_export_name_for_a_missing_export_closes(client, server) -> None:
    c = client()
    c.greeting()
    c.send_option(OPT_EXPORT_NAME, b"nope")
    assert c.is_closed()
    assert_server_still_serves(server)


def test_abort_is_acknowledged(client) -> None:
    c = client()
    c.greeting()
    c.send_option(OPT_ABORT)
    assert c.option_reply()[:2] == (OPT_ABORT, REP_ACK)
    assert c.is_closed()


def test_oversized_option_data_closes_the_connection(client, server) -> None:
    c = client()
    c.greeting()
    c.sock.sendall(struct.pack(">QII", 0x49484156454F5054, 99, 0xFFFFFFFF) + bytes(4096))
    assert c.is_closed()
    assert_server_still_serves(server)


def test_a_silent_client_is_dropped_after_the_handshake_timeout(start_server) -> None:
    server = start_server({"disk": MemoryDevice(MiB)}, handshake_timeout_s=0.5)
    c = RawClient(server.unix_path)
    try:
        c.recv_exact(18)
        started = time.monotonic()
        assert c.is_closed()
        assert time.monotonic() - started < 5
        wait_until(lambda: server.connection_count() == 0)
    finally:
        c.close()


# -- transmission ----------------------------------------------------------------------------
def test_structured_read_reply_format(client) -> None:
    c = client()
    c.connect_export("disk", structured=True)
    c.request(CMD_READ, 0xDEADBEEF12345678, 1024, 512, flags=CMD_FLAG_DF)
    flags, reply_type, cookie, payload = c.chunk()
    assert (flags, reply_type, cookie) == (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA,
                                           0xDEADBEEF12345678)
    assert struct.unpack(">Q", payload[:8])[0] == 1024
    assert payload[8:] == bytes(range(256)) * 2
    c.request(CMD_READ, 2, 0, 0)  # zero-length: a lone NONE chunk
    assert c.chunk() == (REPLY_FLAG_DONE, REPLY_TYPE_NONE, 2, b"")
    c.request(CMD_READ, 3, 4 * MiB, 512)  # beyond the end: an error chunk with a message
    flags, reply_type, cookie, payload = c.chunk()
    assert (flags, reply_type, cookie) == (REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 3)
    error, length = struct.unpack(">IH", payload[:6])
    assert error == EINVAL and length == len(payload) - 6
    assert b"beyond the end" in payload[6:]
    c.request(CMD_WRITE, 4, 0, 512, payload=b"\x09" * 512)
    assert c.simple_reply() == (0, 4, b"")  # successful non-reads may use simple replies


def test_request_errors(client, device) -> None:
    c = client()
    c.connect_export("disk")
    cases = [
        (dict(command=42), EINVAL),  # unknown command
        (dict(command=7, length=512), EINVAL),  # BLOCK_STATUS without a metadata context
        (dict(command=CMD_READ, length=512, flags=CMD_FLAG_DF), EINVAL),  # DF, not negotiated
        (dict(command=CMD_READ, length=512, flags=0x40), EINVAL),  # unknown flag
        (dict(command=CMD_FLUSH, offset=512), EINVAL),
        (dict(command=CMD_TRIM, length=512, flags=CMD_FLAG_NO_HOLE), EINVAL),
        (dict(command=CMD_TRIM, offset=4 * MiB, length=512), EINVAL),
        (dict(command=CMD_WRITE_ZEROES, offset=4 * MiB - 512, length=1024), ENOSPC),
        (dict(command=CMD_READ, length=33 * MiB), EINVAL),
    ]
    for cookie, (kwargs, expected) in enumerate(cases):
        c.request(cookie=cookie, **kwargs)
        assert c.simple_reply() == (expected, cookie, b""), kwargs
    c.request(CMD_WRITE, 100, 0, 512, flags=CMD_FLAG_DF, payload=b"\x01" * 512)
    assert c.simple_reply() == (EINVAL, 100, b"")
    assert bytes(device.data[:2]) == b"\0\1"  # refused writes wrote nothing
    c.request(CMD_FLUSH, 101, flags=CMD_FLAG_FUA)
    assert c.simple_reply() == (0, 101, b"")


def test_writes_to_a_read_only_export_are_refused(client) -> None:
    c = client()
    c.connect_export("ro", structured=True)
    c.request(CMD_WRITE, 1, 0, 4096, payload=bytes(4096))
    flags, reply_type, cookie, payload = c.chunk()
    assert (reply_type, cookie, struct.unpack(">I", payload[:4])[0]) == (REPLY_TYPE_ERROR, 1,
                                                                         EPERM)
    c.request(CMD_READ, 2, 0, 512)
    assert c.chunk()[1] == REPLY_TYPE_OFFSET_DATA


def test_oversized_write_payload_is_skipped_in_bounded_memory(start_server) -> None:
    device = MemoryDevice(MiB)
    limits = BlockLimits(max_payload_bytes=64 << 10)
    server = start_server({"disk": device}, limits=limits)
    c = RawClient(server.unix_path)
    try:
        c.connect_export("disk", structured=True)
        c.request(CMD_WRITE, 1, 0, 512 << 10, payload=b"\x05" * (512 << 10))
        flags, reply_type, cookie, payload = c.chunk()
        assert (reply_type, cookie) == (REPLY_TYPE_ERROR, 1)
        assert struct.unpack(">I", payload[:4])[0] == EINVAL
        c.request(CMD_READ, 2, 0, 128 << 10)
        assert struct.unpack(">I", c.chunk()[3][:4])[0] == EOVERFLOW
        c.request(CMD_READ, 3, 0, 512)  # the stream is still in step
        assert c.chunk()[3] == struct.pack(">Q", 0) + bytes(512)
        assert bytes(device.data) == bytes(MiB)
    finally:
        c.close()


def test_client_vanishing_in_the_middle_of_a_write(client, server, device) -> None:
    c = client()
    c.connect_export("disk")
    before = bytes(device.data)
    c.request(CMD_WRITE, 1, 0, 4 * MiB, payload=b"\xee" * MiB)  # 1 of 4 MiB sent
    c.close()
    # A 4 GiB write header with no payload at all.
    d = client()
    d.connect_export("disk")
    d.request(CMD_WRITE, 1, 0, 0xFFFFFFFF)
    d.close()
    wait_until(lambda: server.connection_count() == 0)
    assert bytes(device.data) == before
    assert_server_still_serves(server)


def test_bad_request_magic_closes_only_that_connection(client, server) -> None:
    good = client()
    good.connect_export("disk")
    bad = client()
    bad.connect_export("disk")
    bad.request(CMD_READ, 1, 0, 512, magic=0x12345678)
    assert bad.is_closed()
    good.request(CMD_READ, 2, 0, 4)
    assert good.simple_reply(4) == (0, 2, b"\0\1\2\3")


def test_replies_out_of_order_and_disc_waits_for_requests_in_flight(start_server) -> None:
    device = GatedDevice(MiB)
    device.data[4096:4100] = b"fast"
    server = start_server({"disk": device})
    c = RawClient(server.unix_path)
    try:
        c.connect_export("disk")
        c.request(CMD_READ, 1, 0, 4)
        c.request(CMD_READ, 2, 4096, 4)
        assert c.simple_reply(4) == (0, 2, b"fast")  # answered while request 1 is blocked
        assert device.waiting.wait(10)
        c.request(CMD_DISC, 3)
        time.sleep(0.1)
        device.gate.set()
        assert c.simple_reply(4) == (0, 1, bytes(4))  # DISC still answers what was in flight
        assert c.is_closed()
    finally:
        c.close()


def test_unknown_command_with_closed_client_does_not_crash(client, server) -> None:
    c = client()
    c.connect_export("disk")
    c.request(42, 1)
    c.close()
    assert_server_still_serves(server)


def test_truncated_header_then_close(client, server) -> None:
    c = client()
    c.connect_export("disk")
    c.sock.sendall(b"\x25\x60\x95\x13\0\0")
    c.close()
    wait_until(lambda: server.connection_count() == 0)
    assert_server_still_serves(server)
