"""Fuzzers for every input a user hands blockera, kept as tests with fixed seeds (see
`fuzzing.py` for the longer mode): era_dump XML, COW stores, table lines, NBD handshakes and
requests. (Era metadata images: tests/compat/test_fuzz.py.) Every case must be accepted or
refused with a BlockeraError: never an internal error, a hang or a write to an input."""

from __future__ import annotations

import io
import logging
import socket
import struct
import time
from pathlib import Path

import numpy as np

from blockera.blockdev import MemoryDevice
from blockera.engine.userspace import Engine
from blockera.errors import BlockeraError
from blockera.era.check import check_era_metadata
from blockera.era.dump import dump_xml
from blockera.era.invalidate import written_since
from blockera.era.image import EraImage
from blockera.era.superblock import SUPERBLOCK, Superblock
from blockera.era.restore import write_image
from blockera.era.xml_parse import parse_era_xml_bytes
from blockera.nbd import Export, serve
from blockera.snapshot.build import write_store
from blockera.snapshot.changed import changed_chunks, load_checked
from blockera.snapshot.dump import dump_cow
from blockera.snapshot.extract import plan_extract
from blockera.snapshot.store_open import open_store
from tests.conftest import sparse_file
from tests.hardening.fuzzing import ReadOnlyDevice, Tally, cases, mutate_bytes, rng_for
from tests.nbd.rawclient import RawClient

XML_SEEDS = [
    b'<superblock uuid="" block_size="8" nr_blocks="6" current_era="4">\n'
    b'  <writeset era="2" nr_bits="6">\n    <bit block="1" value="true"/>\n'
    b'    <bit block="5" value="false"/>\n  </writeset>\n  <era_array>\n'
    b'    <era block="0" era="1"/>\n    <era block="3" era="3"/>\n  </era_array>\n'
    b'</superblock>\n',
    b'<?xml version="1.0"?>\n<!-- c --><superblock uuid="u" block_size="128" nr_blocks="3" '
    b'current_era="9"><writeset era="9" nr_bits="3"><bit block="2" value="true"/>'
    b'</writeset><era_array><era block="2" era="8"/></era_array></superblock>',
]


def test_fuzz_era_xml() -> None:
    rng = rng_for("xml")
    tally = Tally("era XML")
    for _ in range(cases(3000)):
        doc = mutate_bytes(rng.choice(XML_SEEDS), rng, max_edits=2)
        try:
            desc = parse_era_xml_bytes(doc, metadata_blocks=64)
            dev = MemoryDevice(64 * 4096)
            write_image(dev, desc)
        except BlockeraError as exc:
            tally.refused[type(exc).__name__] += 1
            continue
        report = check_era_metadata(dev)
        assert report.ok, (doc, report.lines())
        tally.accepted += 1
    print(tally.report())
    assert tally.accepted and tally.refused


SUPERBLOCK_FIELDS = ("data_block_size", "metadata_block_size", "nr_blocks", "current_era",
                     "writeset_tree_root", "era_array_root", "metadata_snap")
HUGE = [0, 1, 7, 8, 255, 1 << 20, (1 << 31) - 1, 1 << 31, (1 << 32) - 1]


def test_fuzz_era_superblock_fields() -> None:
    """Superblock fields set to extreme values with a valid checksum: the tools answer (or
    refuse) at once, without allocating for what the fields claim."""
    rng = rng_for("superblock")
    tally = Tally("era superblock fields")
    dev = MemoryDevice(1 << 20)
    write_image(dev, parse_era_xml_bytes(XML_SEEDS[0]))
    image = dev.read(0, dev.size_bytes)
    for _ in range(cases(300)):
        block = bytearray(image[:4096])
        sb = Superblock.unpack(block)
        for name in rng.sample(SUPERBLOCK_FIELDS, rng.randint(1, 3)):
            limit = (1 << 64) - 1 if name.endswith(("root", "snap")) else (1 << 32) - 1
            setattr(sb, name, min(rng.choice(HUGE + [rng.getrandbits(32)]), limit))
        sb.pack_into(block)
        SUPERBLOCK.prepare(0, block)
        mutated = ReadOnlyDevice(data=bytes(block) + image[4096:])
        started = time.monotonic()
        try:
            era = EraImage(mutated, use_snapshot=rng.random() < 0.2)
            dump_xml(era, io.BytesIO(), logical=rng.random() < 0.5)
            written_since(era, rng.randrange(4))
        except BlockeraError as exc:
            tally.refused[type(exc).__name__] += 1
        else:
            tally.accepted += 1
        check_era_metadata(mutated)
        assert time.monotonic() - started < 5, sb
    print(tally.report())
    assert tally.accepted and tally.refused


def _cow_image(rng) -> tuple[bytes, int]:
    chunk_sectors = rng.choice([8, 16])
    dev = MemoryDevice(256 * chunk_sectors * 512)
    olds = rng.sample(range(0, 300), rng.randint(0, 70))
    write_store(dev, chunk_sectors, np.array(olds, dtype=np.uint64))
    return dev.read(0, dev.size_bytes), chunk_sectors


def test_fuzz_cow_stores() -> None:
    rng = rng_for("cow")
    tally = Tally("COW stores")
    bases = [_cow_image(rng) for _ in range(6)]
    for _ in range(cases(2000)):
        image, chunk_sectors = rng.choice(bases)
        head = rng.randrange(4) * chunk_sectors * 512      # header or one of the first areas
        piece = image[head: head + chunk_sectors * 512]
        mutated = image[:head] + mutate_bytes(piece, rng)[: len(piece)].ljust(len(piece), b"\0") \
            + image[head + len(piece):]
        dev = ReadOnlyDevice(data=mutated)
        try:
            dump_cow(dev)
            cow, _ = load_checked(dev)
            changed_chunks(cow)
            plan_extract(cow, 300 * chunk_sectors * 512, rng.choice(["origin", "snapshot"]))
            store = open_store(rng.choice(["P", "PO"]), MemoryDevice(data=mutated),
                               chunk_sectors)
            store.status_fields()
        except BlockeraError as exc:
            tally.refused[type(exc).__name__] += 1
            continue
        tally.accepted += 1
    print(tally.report())
    assert tally.accepted and tally.refused


TABLE_WORDS = ["0", "8", "16", "2048", "4096", "18446744073709551615", "18014398509481983",
               "-1", "linear", "zero", "error", "era", "snapshot", "snapshot-origin",
               "snapshot-merge", "P", "PO", "N", "1", "2", "discard_zeroes_cow", "/dev/mapper/a",
               "/dev/mapper/b", "253:0", "253:1", "{img}", "{img2}", "{meta}", "nosuchfile",
               "\u00b2", "#", ";"]


def _table_line(rng, paths: dict[str, str]) -> str:
    words = [rng.choice(TABLE_WORDS) for _ in range(rng.randint(1, 8))]
    if rng.random() < 0.6:
        words = [rng.choice(["0", "0", "8"]), rng.choice(["8", "16", "2048"]),
                 rng.choice(["linear", "zero", "error", "era", "snapshot", "snapshot-origin"])] \
            + words[: rng.randint(0, 5)]
    return " ".join(words).format(**paths)


def test_fuzz_table_lines(tmp_path: Path) -> None:
    rng = rng_for("tables")
    tally = Tally("table lines")
    paths = {name: str(sparse_file(tmp_path / f"{name}.img", 1 << 20))
             for name in ("img", "img2", "meta")}
    engine = Engine()
    try:
        engine.create("a", "0 16 zero")
        engine.create("b", f"0 2048 linear {paths['img2']} 0")
        for i in range(cases(1500)):
            name = rng.choice(["a", "b", "new"])
            table = "\n".join(_table_line(rng, paths) for _ in range(rng.randint(1, 3)))
            try:
                if name == "new":
                    engine.create("new", table)
                    dev = engine.device("new")
                    dev.read(0, min(dev.size_bytes, 4096))
                    engine.status("new")
                    engine.table("new")
                    engine.remove("new")
                else:
                    engine.load(name, table)
                    engine.clear(name)
            except BlockeraError as exc:
                tally.refused[type(exc).__name__] += 1
                if "new" in engine.devices:
                    engine.remove("new")
                continue
            tally.accepted += 1
        assert sorted(engine.devices) == ["a", "b"]
    finally:
        engine.shutdown()
    print(tally.report())
    assert tally.accepted and tally.refused


def _nbd_garbage(rng) -> bytes:
    flags = struct.pack(">I", rng.choice([0, 1, 2, 3, 0xFFFFFFFF]))
    options = b""
    for _ in range(rng.randint(0, 4)):
        opt = rng.choice([1, 2, 3, 6, 7, 8, 9, 10, 0xFFFF, rng.getrandbits(32)])
        data = rng.randbytes(rng.choice([0, 3, 4, 12, 40]))
        if opt in (6, 7) and rng.random() < 0.6:
            name = rng.choice([b"disk", b"", b"x" * 300, b"\xff"])
            data = struct.pack(">I", len(name)) + name + struct.pack(">H", 1) + b"\x00\x03"
        length = len(data) if rng.random() < 0.8 else rng.getrandbits(32)
        options += struct.pack(">QII", 0x49484156454F5054, opt, length) + data
    requests = b""
    for _ in range(rng.randint(0, 6)):
        requests += struct.pack(">IHHQQI", rng.choice([0x25609513, rng.getrandbits(32)]),
                                rng.getrandbits(16), rng.choice([0, 1, 3, 4, 5, 6, 7, 2, 99]),
                                rng.getrandbits(64), rng.choice([0, 512, 1 << 20, 2**64 - 512]),
                                rng.choice([0, 512, 4096, 1 << 26, 2**32 - 1]))
    return mutate_bytes(flags + options + requests, rng, max_edits=2)


def test_fuzz_nbd_handshakes_and_requests(tmp_path: Path, caplog) -> None:
    """Internal errors in the server are logged with their traceback: there must be none."""
    caplog.set_level(logging.ERROR, logger="blockera")
    rng = rng_for("nbd")
    disk = MemoryDevice(1 << 20)
    server = serve({"disk": Export(disk)}, unix_path=tmp_path / "nbd.sock",
                   handshake_timeout_s=2)
    try:
        for i in range(cases(1500)):
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(2)
            sock.connect(str(tmp_path / "nbd.sock"))
            try:
                sock.recv(18)
                sock.sendall(_nbd_garbage(rng))
                sock.settimeout(0.02)
                while sock.recv(65536):      # until the server closes or goes quiet
                    pass
            except OSError:
                pass
            finally:
                sock.close()
            if i % 100 == 99:              # the server still serves a well-behaved client
                client = RawClient(tmp_path / "nbd.sock")
                assert client.connect_export("disk")[0] == 1 << 20
                client.close()
        deadline = time.monotonic() + 10
        while server.connection_count() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.connection_count() == 0
    finally:
        assert server.shutdown(timeout_s=10)
    bugs = [r.getMessage() for r in caplog.records if r.exc_info]
    assert not bugs, bugs
    print(f"NBD: {cases(1500)} hostile connections, server alive throughout, "
          f"{len(caplog.records)} errors logged, 0 internal errors")
