"""Real NBD clients against the server: nbdinfo, qemu-img, nbdcopy and qemu-io, over a unix
socket and over TCP."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from blockera.blockdev import FileDevice, MemoryDevice
from blockera.nbd import Export

from .conftest import RecordingDevice, need, pattern, run, tcp_uri, unix_uri

MiB = 1 << 20


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(params=["unix", "tcp"])
def transport(request: pytest.FixtureRequest) -> str:
    return request.param


def uri_for(server, transport: str, name: str = "disk") -> str:
    return unix_uri(server, name) if transport == "unix" else tcp_uri(server, name)


def test_nbdinfo_reports_size_and_block_limits(start_server, transport) -> None:
    need("nbdinfo")
    server = start_server({"disk": MemoryDevice(48 * MiB)}, tcp=True)
    out = run(["nbdinfo", "--json", uri_for(server, transport)]).stdout
    import json
    info = json.loads(out)
    export = info["exports"][0]
    assert export["export-size"] == 48 * MiB
    assert export["block_size_minimum"] == 512
    assert export["block_size_preferred"] == 4096
    assert export["block_size_maximum"] == 32 * MiB
    assert export["is_read_only"] is False
    for capability in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn",
                       "can_fast_zero"):
        assert export[capability] is True, capability
    assert info["protocol"] == "newstyle-fixed"


def test_nbdinfo_list_shows_every_export(start_server) -> None:
    need("nbdinfo")
    exports = {"disk": MemoryDevice(4 * MiB),
               "base": Export(MemoryDevice(2 * MiB), read_only=True,
                              description="the origin, read-only")}
    server = start_server(exports)
    out = run(["nbdinfo", "--list", "--json", unix_uri(server, "")]).stdout
    import json
    listed = {e["export-name"]: e for e in json.loads(out)["exports"]}
    assert set(listed) == {"disk", "base"}
    assert listed["disk"]["export-size"] == 4 * MiB
    assert listed["base"]["export-size"] == 2 * MiB
    assert listed["base"]["is_read_only"] is True
    assert listed["base"]["description"] == "the origin, read-only"


def test_qemu_img_info_sees_the_size(start_server, transport) -> None:
    need("qemu-img")
    server = start_server({"disk": MemoryDevice(40 * MiB)}, tcp=True)
    out = run(["qemu-img", "info", "--output=json", uri_for(server, transport)]).stdout
    import json
    assert json.loads(out)["virtual-size"] == 40 * MiB


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, bytes]:
    """An 8 MiB image of random data with a 1 MiB hole of zeros in the middle."""
    data = bytearray(pattern(8 * MiB, seed=7))
    data[3 * MiB:4 * MiB] = bytes(MiB)
    path = tmp_path / "image.raw"
    path.write_bytes(data)
    return path, bytes(data)


def test_qemu_img_convert_in_and_out_is_bit_exact(start_server, transport, image,
                                                  tmp_path: Path) -> None:
    need("qemu-img")
    src, data = image
    device = MemoryDevice(len(data))
    device.data[:] = pattern(len(data), seed=99)  # old contents must be overwritten
    server = start_server({"disk": device}, tcp=True)
    uri = uri_for(server, transport)
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri])
    assert sha256(bytes(device.data)) == sha256(data)
    out = tmp_path / "out.raw"
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(out)])
    assert sha256(out.read_bytes()) == sha256(data)


def test_nbdcopy_in_and_out_is_bit_exact(start_server, transport, image,
                                         tmp_path: Path) -> None:
    need("nbdcopy")
    src, data = image
    backing = tmp_path / "export.raw"
    backing.write_bytes(pattern(len(data), seed=5))
    device = FileDevice(backing)
    server = start_server({"disk": device}, tcp=True)
    uri = uri_for(server, transport)
    try:
        run(["nbdcopy", str(src), uri])
        assert sha256(backing.read_bytes()) == sha256(data)
        out = tmp_path / "out.raw"
        out.touch()
        run(["nbdcopy", uri, str(out)])
        assert sha256(out.read_bytes()) == sha256(data)
    finally:
        server.shutdown(timeout_s=10)
        device.close()


def qemu_io(uri: str, *commands: str) -> str:
    cmd = ["qemu-io", "-f", "raw"]
    for c in commands:
        cmd += ["-c", c]
    proc = run([*cmd, uri])
    text = proc.stdout + proc.stderr
    assert not re.search(r"fail|error|mismatch", text, re.IGNORECASE), text
    return text


def test_qemu_io_patterns_verify(start_server, transport) -> None:
    need("qemu-io")
    device = RecordingDevice(4 * MiB)
    server = start_server({"disk": device}, tcp=True)
    uri = uri_for(server, transport)
    qemu_io(uri, "write -P 0xab 4k 64k", "read -P 0xab 4k 64k", "read -P 0 0 4k",
            "read -P 0 68k 4k")
    assert bytes(device.data[4096:4096 + 65536]) == b"\xab" * 65536
    assert bytes(device.data[:4096]) == bytes(4096)
    assert bytes(device.data[69632:73728]) == bytes(4096)
    # 512-byte I/O that is not 4 KiB aligned, and byte-unaligned I/O (qemu aligns it to
    # the advertised 512-byte minimum with read-modify-write).
    qemu_io(uri, "write -P 0xcd 512 512", "read -P 0xcd 512 512",
            "write -P 0xef 1000 3000", "read -P 0xef 1000 3000")
    assert bytes(device.data[512:1000]) == b"\xcd" * 488
    assert bytes(device.data[1000:4000]) == b"\xef" * 3000
    assert bytes(device.data[4000:4096]) == bytes(96)
    for _, offset, length in device.calls:
        assert offset % 512 == 0 and length % 512 == 0
    # FUA write: written, then flushed before the reply.
    device.calls.clear()
    qemu_io(uri, "write -f -P 0x5a 1M 4k", "read -P 0x5a 1M 4k")
    kinds = device.kinds()
    assert kinds[kinds.index("write") + 1] == "flush"


def test_qemu_io_discard_and_write_zeroes(start_server, transport) -> None:
    need("qemu-io")
    device = RecordingDevice(4 * MiB)
    server = start_server({"disk": device}, tcp=True)
    uri = uri_for(server, transport)
    qemu_io(uri, "write -P 0x11 0 2M", "discard 64k 128k", "read -P 0 64k 128k",
            "read -P 0x11 0 64k", "read -P 0x11 192k 64k")
    assert ("discard", 65536, 131072) in device.calls
    qemu_io(uri, "write -z 256k 64k", "read -P 0 256k 64k", "read -P 0x11 320k 4k",
            "write -z -u 512k 64k", "read -P 0 512k 64k")
    assert ("write_zeroes", 262144, 65536) in device.calls
    assert ("write_zeroes", 524288, 65536) in device.calls
    assert bytes(device.data[256 << 10:320 << 10]) == bytes(64 << 10)
    assert bytes(device.data[320 << 10:512 << 10]) == b"\x11" * (192 << 10)
    assert all(kind != "write" or length != 65536 or offset not in (262144, 524288)
               for kind, offset, length in device.calls)
