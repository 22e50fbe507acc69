"""The persistent COW format against docs/snapshot.md: byte layouts (the spec's real-kernel
hexdumps), area locations, the kernel's loading and stopping rules, header checks, capacity."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from blockera.blockdev import FileDevice, MemoryDevice
from blockera.errors import DeviceError, MetadataError, NoSpaceError, TableError
from blockera.snapshot import (DiskHeader, Geometry, StoreWriteError,
                               open_store, read_cow, write_store)
from blockera.snapshot.layout import SNAP_MAGIC
from blockera.snapshot.records import pack_record

from .helpers import add_exceptions, read_all, spec_parse

KiB = 1024


def hexdump_bytes(text: str) -> bytes:
    """Bytes of `xxd` lines like `00001000: 0000 0000 ...  ascii`."""
    out = b""
    for line in text.strip().splitlines():
        hexpart = line.split(":", 1)[1].strip().split("  ")[0]
        out += bytes.fromhex(hexpart.replace(" ", ""))
    return out


def test_fresh_header_matches_kernel_hexdump() -> None:
    cow = MemoryDevice(2048 * 512)
    store = open_store("P", cow, 8)
    assert store.created and store.status_text() == "16/2048 16"
    expected = hexdump_bytes("""
00000000: 536e 4170 0100 0000 0100 0000 0800 0000  SnAp............
00000010: 0000 0000 0000 0000 0000 0000 0000 0000  ................
""")
    image = read_all(cow)
    assert image[:32] == expected
    assert image[:4] == b"SnAp"
    assert image[16:8192] == bytes(8192 - 16)           # rest of chunk 0 and area 0 zero
    assert DiskHeader.unpack(image) == DiskHeader(SNAP_MAGIC, 1, 1, 8)


def test_invalidated_header_changes_only_valid() -> None:
    cow = MemoryDevice(2048 * 512)
    store = open_store("P", cow, 8)
    add_exceptions(store, [3, 5, 10])
    before = read_all(cow)
    assert store.invalidate() is True
    after = read_all(cow)
    assert after[:16] == hexdump_bytes("00000000: 536e 4170 0000 0000 0100 0000 0800 0000  ")
    assert after[16:] == before[16:]
    reopened = open_store("P", cow, 8)
    assert not reopened.valid and len(reopened) == 0 and reopened.status_text() == "Invalid"
    assert "Snapshot is marked invalid." in reopened.warnings


def test_record_layout_matches_kernel_hexdumps() -> None:
    assert pack_record(2, 3) == hexdump_bytes(
        "00001010: 0200 0000 0000 0000 0300 0000 0000 0000  ")
    cow = MemoryDevice(4 << 20)
    store = open_store("P", cow, 8)
    add_exceptions(store, [0, 2, 4])
    assert read_all(cow)[0x1000:0x1030] == hexdump_bytes("""
00001000: 0000 0000 0000 0000 0200 0000 0000 0000
00001010: 0200 0000 0000 0000 0300 0000 0000 0000
00001020: 0400 0000 0000 0000 0400 0000 0000 0000
""")
    # End of a list: area 1 at 0x102000 holding 37 records, the last (1600, 295).
    cow = MemoryDevice(4 << 20)
    store = open_store("P", cow, 8)
    add_exceptions(store, list(range(292)) + [1600], batch=7)
    image = read_all(cow)
    assert image[0x102240:0x102260] == hexdump_bytes("""
00102240: 4006 0000 0000 0000 2701 0000 0000 0000
00102250: 0000 0000 0000 0000 0000 0000 0000 0000
""")
    assert image[0x102250:0x103000] == bytes(0x103000 - 0x102250)
    assert store.lookup(292) is None and store.lookup(1600) == 295


# CS=4: area 1 is chunk 1 + 129 = 130, byte 0x41000 (the spec's table says 129 x 2 KiB =
# 0x40800, contradicting its own formula; the kernel test confirms 0x41000).
@pytest.mark.parametrize("cs, area1_offset", [
    (4, 0x41000), (8, 0x102000), (16, 0x404000), (32, 1026 * 16 * KiB),
    (128, 4098 * 64 * KiB)])
def test_area_locations(cs: int, area1_offset: int, tmp_path) -> None:
    g = Geometry(cs)
    assert g.exceptions_per_area == cs * 32
    assert g.area_offset_bytes(1) == area1_offset
    assert g.area_location(2) == 1 + 2 * (cs * 32 + 1)
    # The store puts the EPA+1-th record's data right after area 1 and its record in area 1.
    path = tmp_path / "cow.img"
    with open(path, "wb") as f:
        f.truncate(area1_offset + 4 * g.chunk_bytes)
    with FileDevice(path) as cow:
        store = open_store("P", cow, cs)
        epa = g.exceptions_per_area
        pairs = [(7 * j, store.allocate()) for j in range(epa + 1)]
        assert pairs[epa - 1][1] == epa + 1 and pairs[epa][1] == g.area_location(1) + 1
        store.commit(pairs)
        assert store.current_area == 1 and store.current_committed == 1
        raw = cow.read(area1_offset, 32)
        assert raw == pack_record(7 * epa, g.area_location(1) + 1) + bytes(16)
        loaded = read_cow(cow)
        assert len(loaded.table) == epa + 1 and loaded.table.current_area == 1


def test_metadata_chunks_and_allocation_order() -> None:
    g = Geometry(8)
    assert [g.allocation_chunk(j) for j in (0, 255, 256, 511, 512)] == [2, 257, 259, 514, 516]
    chunks = g.allocation_chunks(2000)
    assert not g.is_metadata_chunk(chunks).any()
    assert g.is_metadata_chunk(np.array([1, 258, 515], dtype=np.uint64)).all()
    assert g.skip_metadata(258) == 259 and g.skip_metadata(257) == 257


# -- the kernel's load and stopping rules --------------------------------------------------

def test_image_a_b_c_status_numbers() -> None:
    # Image A: CS=8, 300 records over area 0 (full) and area 1 -> 2424/8192 24.
    rng = np.random.default_rng(1)
    cow = MemoryDevice(8192 * 512)
    write_store(cow, 8, rng.choice(4096, 300, replace=False))
    assert open_store("P", cow, 8).status_text() == "2424/8192 24"
    # Image B: CS=16, exactly 512 records (area 0 full, area 1 the terminator), shuffled
    # new_chunks -> 8240/12288 48.
    cow = MemoryDevice(12288 * 512)
    new = Geometry(16).allocation_chunks(512)
    rng.shuffle(new)
    write_store(cow, 16, np.arange(512), new)
    store = open_store("P", cow, 16)
    assert store.status_text() == "8240/12288 48"
    assert (store.current_area, store.current_committed, store.next_free) == (1, 0, 515)
    # Image C: CS=8, 3 records, garbage after the terminator, valid=2 -> 40/2048 16.
    cow = MemoryDevice(2048 * 512)
    write_store(cow, 8, [5, 9, 11], valid=2)
    cow.write(0x1000 + 4 * 16, b"\xee" * 64)
    store = open_store("P", cow, 8)
    assert store.valid and len(store) == 3 and store.status_text() == "40/2048 16"


def test_status_after_300_commits_and_exactly_full_area() -> None:
    cow = MemoryDevice(8192 * 512)
    store = open_store("P", cow, 8)
    add_exceptions(store, list(range(0, 600, 2)), batch=11)
    assert store.status_fields() == (2424, 8192, 24) and store.next_free == 303
    cow = MemoryDevice(12288 * 512)
    store = open_store("P", cow, 16)
    add_exceptions(store, list(range(512)), batch=64)
    assert store.status_text() == "8240/12288 48"
    assert open_store("P", cow, 16).status_text() == "8240/12288 48"


def test_bytes_after_terminator_and_later_areas_are_ignored_on_load() -> None:
    cow = MemoryDevice(4 << 20)
    write_store(cow, 8, np.arange(300))
    g = Geometry(8)
    area1 = g.area_offset_bytes(1)
    cow.write(area1 + 45 * 16, b"\x55" * 100)      # slots 45..50 and half of 51
    cow.write(g.area_offset_bytes(2), b"\xaa" * 4096)
    store = open_store("P", cow, 8)
    assert len(store) == 300 and store.current_committed == 44
    assert not store.anomalies


def test_garbage_after_the_terminator_becomes_records_after_the_next_commit() -> None:
    # The kernel keeps the whole last area as its working buffer and writes it back, so once
    # the terminator slot is used the garbage behind it is part of the list.
    cow = MemoryDevice(4 << 20)
    write_store(cow, 8, np.arange(300))
    area1 = Geometry(8).area_offset_bytes(1)
    cow.write(area1 + 45 * 16, b"\x55" * 100)
    store = open_store("P", cow, 8)
    add_exceptions(store, [9999])
    records = spec_parse(read_all(cow))[1]
    assert records[300] == (9999, 303)
    garbage = int.from_bytes(b"\x55" * 8, "little")
    assert records[301:] == [(garbage, garbage)] * 6
    reloaded = open_store("P", cow, 8)
    assert len(reloaded) == 307
    assert {a.kind for a in reloaded.anomalies} == {"duplicate_old", "shared_new", "beyond_end",
                                                    "run_length_bits", "old_overflow"}


def test_full_area_without_successor_fails_to_load() -> None:
    g = Geometry(8)
    cow = MemoryDevice(258 * 4096)          # area 1 would be chunk 258: missing
    write_store(cow, 8, np.arange(255))
    cow.write(g.area_offset_bytes(0) + 255 * 16, pack_record(999, 257))   # area 0 now full
    with pytest.raises(MetadataError, match="Failed to read snapshot metadata") as caught:
        open_store("P", cow, 8)
    assert caught.value.errno_name == "EIO"
    cow = MemoryDevice(258 * 4096 + 2048)   # area 1 only half present: still unreadable
    write_store(cow, 8, np.arange(255))
    cow.write(g.area_offset_bytes(0) + 255 * 16, pack_record(999, 257))
    with pytest.raises(MetadataError, match="area 1 at chunk 258"):
        read_cow(cow)


@pytest.mark.parametrize("mutate, table_cs, message, errno_name", [
    (lambda h: b"XXXX" + h[4:], 8, "Invalid or corrupt snapshot", "ENXIO"),
    (lambda h: h[:8] + (2).to_bytes(4, "little") + h[12:], 8,
     "unable to handle snapshot disk version 2", "EINVAL"),
    (lambda h: h[:12] + (12).to_bytes(4, "little"), 8,
     "invalid on-disk chunk size 12: Chunk size is not a power of 2.", "EINVAL"),
    (lambda h: h[:12] + (1 << 22).to_bytes(4, "little"), 8,
     "invalid on-disk chunk size 4194304: Chunk size is too high.", "EINVAL"),
])
def test_header_rejections(mutate, table_cs: int, message: str, errno_name: str) -> None:
    cow = MemoryDevice(1 << 20)
    write_store(cow, 8, [1, 2])
    cow.write(0, mutate(cow.read(0, 16)))
    before = read_all(cow)
    with pytest.raises(MetadataError, match=message.replace(".", r"\.")) as caught:
        open_store("P", cow, table_cs)
    assert caught.value.errno_name == errno_name
    assert read_all(cow) == before


def test_on_disk_chunk_size_is_checked_against_the_block_size() -> None:
    cow = MemoryDevice(1 << 20)
    write_store(cow, 4, [1])
    with pytest.raises(MetadataError, match="not a multiple of device blocksize"):
        open_store("P", cow, 8, logical_block_bytes=4096)


def test_chunk_size_from_the_header_wins() -> None:
    cow = MemoryDevice(4 << 20)
    store = open_store("P", cow, 8)
    add_exceptions(store, list(range(300)))
    reopened = open_store("P", cow, 16)
    assert reopened.chunk_sectors == 8 and reopened.table_text() == "P 8"
    assert reopened.warnings == ["chunk size 8 in device metadata overrides table chunk size "
                                 "of 16."]
    assert len(reopened) == 300 and reopened.status_text() == "2424/8192 24"
    default = open_store("PO", cow, 0)
    assert default.chunk_sectors == 8 and default.warnings == [] and default.table_text() == "PO 8"


def test_table_words_and_chunk_sizes() -> None:
    cow = MemoryDevice(1 << 20)
    store = open_store("P", cow, 0)                   # new store, default chunk size
    assert store.chunk_sectors == 32 and store.status_text() == "64/2048 64"
    assert open_store("pox", MemoryDevice(1 << 20), 8).kind == "PO"
    assert open_store("nX", MemoryDevice(1 << 20), 8).kind == "N"
    assert open_store("P", MemoryDevice(1 << 20), 4).status_text() == "8/2048 8"
    for word, cs, message in [("X", 8, "Exception store type is not P or N"),
                              ("", 8, "Exception store type is not P or N"),
                              ("Px", 8, "Unsupported persistent store option: x"),
                              ("Px", 12, "Chunk size is not a power of 2"),
                              ("P", 1 << 22, "Chunk size is too high"),
                              ("N", 0, "Chunk size not set")]:
        with pytest.raises(TableError, match=message):
            open_store(word, MemoryDevice(1 << 20), cs)
    with pytest.raises(TableError, match="multiple of device blocksize"):
        open_store("P", MemoryDevice(1 << 20), 4, logical_block_bytes=4096)


def test_cow_too_small_for_a_new_store_is_left_untouched() -> None:
    cow = MemoryDevice(4096 + 512)
    with pytest.raises(DeviceError, match="at least 2 chunks"):
        open_store("P", cow, 8)
    assert read_all(cow) == bytes(4096 + 512)
    with pytest.raises(DeviceError, match="smaller than one"):
        open_store("P", MemoryDevice(2048), 8)


# -- capacity (§2.7) -----------------------------------------------------------------------

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cs=st.sampled_from([1, 2, 4]), data=st.data())
def test_capacity_formula_matches_the_store(cs: int, data: st.DataObject) -> None:
    g = Geometry(cs)
    stride = g.stride_chunks
    chunks = data.draw(st.one_of(st.integers(2, 4 * stride),
                                 st.integers(1, 3).map(lambda q: 1 + q * stride)), label="chunks")
    extra_sectors = data.draw(st.integers(0, cs - 1), label="partial chunk")
    cow = MemoryDevice((chunks * cs + extra_sectors) * 512)
    store = open_store("P", cow, cs)
    committed = 0
    failure: Exception | None = None
    while True:
        try:
            new = store.allocate()
        except NoSpaceError as exc:
            failure = exc
            break
        try:
            store.commit([(committed, new)])
        except StoreWriteError as exc:
            failure = exc
            break
        committed += 1
    assert committed == g.capacity(chunks * cs + extra_sectors)
    q, r = divmod(chunks - 1, stride)
    if r == 0:      # the q*EPA-th exception cannot zero area q: the store invalidates itself
        assert isinstance(failure, StoreWriteError) and failure.committed == 0
        assert not store.valid and read_all(cow)[4:8] == bytes(4)
        assert open_store("P", cow, cs).status_text() == "Invalid"
    else:
        assert isinstance(failure, NoSpaceError) and store.valid
        reloaded = open_store("P", cow, cs)
        assert len(reloaded) == committed


def test_r_equals_zero_example_from_the_kernel() -> None:
    # 258 chunks of CS=8: 255 exceptions fit (2056/2064 16); the 256th invalidates.
    cow = MemoryDevice(258 * 4096)
    store = open_store("P", cow, 8)
    add_exceptions(store, list(range(255)), batch=50)
    assert store.status_text() == "2056/2064 16"
    new = store.allocate()
    with pytest.raises(StoreWriteError, match="Invalidating snapshot: Error reading/writing"):
        store.commit([(255, new)])
    assert store.status_text() == "Invalid"
    assert len(open_store("P", MemoryDevice(data=read_all(cow)), 8)) == 0  # header valid=0
    header = DiskHeader.unpack(read_all(cow))
    assert header.valid == 0 and spec_parse(read_all(cow))[1][-1] == (254, 256)


def test_batch_hitting_the_missing_successor_reports_durable_part() -> None:
    cow = MemoryDevice(258 * 4096)
    store = open_store("P", cow, 8)
    add_exceptions(store, list(range(250)), batch=50)
    pairs = [(1000 + i, store.allocate()) for i in range(6)]
    with pytest.raises(StoreWriteError) as caught:
        store.commit(pairs)
    assert caught.value.committed == 0 and not store.valid and store.pending == ()
    records = spec_parse(read_all(cow))[1]
    assert len(records) == 250          # the last successful area write
