"""Exception-store behaviour: the commit I/O order and batching, invalidation, overflow, online
growth, the transient store, merging, lookups, and a model-based comparison with the bulk
writer and an independent parser."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from blockera.blockdev import MemoryDevice
from blockera.errors import DeviceError, NoSpaceError, TargetError
from blockera.snapshot import (Geometry, MergeBatch, StoreInvalidError, StoreWriteError,
                               open_store, read_cow, write_store)

from tests.write_log import WriteLogDevice
from .helpers import add_exceptions, payload, read_all, spec_parse


def ops(log, start: int = 0) -> list[tuple[str, int, int]]:
    """The log as (kind, offset, length) from `start` on."""
    return [(rec.kind, rec.offset_bytes, len(rec.data)) for _, rec in log[start:]]


def test_commit_io_order_single_and_filling_area() -> None:
    g = Geometry(4)                       # EPA 128, 2 KiB chunks
    cb = g.chunk_bytes
    log: list = []
    cow = WriteLogDevice(MemoryDevice(600 * cb), log)
    store = open_store("P", cow, 4)
    # New store: area 0 zeroed and flushed before the header is written and flushed.
    assert ops(log) == [("write", cb, cb), ("flush", 0, 0), ("write", 0, cb), ("flush", 0, 0)]
    start = len(log)
    add_exceptions(store, [10])
    assert ops(log, start) == [("write", 2 * cb, cb),                     # caller's data
                               ("flush", 0, 0), ("write", cb, cb), ("flush", 0, 0)]
    add_exceptions(store, list(range(20, 20 + 126)), batch=126)
    # One batch that exactly fills area 0: zero area 1, flush, area 0, flush; nothing after.
    start = len(log)
    new = store.allocate()
    cow.write(new * cb, payload(500, new, cb))
    store.commit([(500, new)])
    assert ops(log, start) == [("write", new * cb, cb), ("write", g.area_offset_bytes(1), cb),
                               ("flush", 0, 0), ("write", cb, cb), ("flush", 0, 0)]
    assert log[start + 1][1].data == bytes(cb)
    assert (store.current_area, store.current_committed) == (1, 0)


def test_batch_crossing_an_area_costs_one_write_per_area() -> None:
    g = Geometry(4)
    cb = g.chunk_bytes
    log: list = []
    cow = WriteLogDevice(MemoryDevice(600 * cb), log)
    store = open_store("P", cow, 4)
    add_exceptions(store, list(range(100)), batch=100)
    pairs = [(1000 + i, store.allocate()) for i in range(60)]
    start = len(log)
    store.commit(pairs)
    assert ops(log, start) == [
        ("write", g.area_offset_bytes(1), cb), ("flush", 0, 0), ("write", cb, cb),
        ("flush", 0, 0),                                           # area 0 full (28 records)
        ("flush", 0, 0), ("write", g.area_offset_bytes(1), cb), ("flush", 0, 0)]  # 32 in area 1
    assert store.current_committed == 32 and len(store) == 160
    assert spec_parse(read_all(cow.inner))[1] == list(zip(range(100), range(2, 102))) + pairs


def test_commit_must_follow_allocation_order() -> None:
    store = open_store("P", MemoryDevice(1 << 20), 8)
    a, b = store.allocate(), store.allocate()
    with pytest.raises(ValueError, match="allocation order"):
        store.commit([(1, b)])
    with pytest.raises(ValueError, match="allocation order"):
        store.commit([(1, 77)])
    with pytest.raises(ValueError, match="64-bit"):
        store.commit([(1 << 64, a)])
    assert store.lookup(1) is None and store.pending == (a, b) and store.current_committed == 0
    store.commit([(1, a), (2, b)])
    assert store.pending == () and store.lookup(2) == b


def test_lookup_ignores_pending_and_sees_committed() -> None:
    store = open_store("P", MemoryDevice(1 << 20), 8)
    new = store.allocate()
    assert store.lookup(4) is None
    store.commit([(4, new)])
    assert store.lookup(4) == new == 2
    old, newa = store.exceptions()
    assert old.tolist() == [4] and newa.tolist() == [2] and old.dtype == np.uint64


def test_allocation_rereads_the_cow_size() -> None:
    # §2.7: 512 sectors CS=16 -> full; growing the COW to 2048 sectors allows more.
    cow = MemoryDevice(512 * 512)
    store = open_store("P", cow, 16)
    add_exceptions(store, list(range(30)))
    with pytest.raises(NoSpaceError) as caught:
        store.allocate()
    assert caught.value.errno_name == "ENOSPC" and store.valid
    assert store.status_text() == "512/512 32"
    cow.resize(2048 * 512)
    assert store.status_text() == "512/2048 32"
    add_exceptions(store, list(range(100, 190)))
    assert len(store) == 120


def test_invalid_store_refuses_work_and_writes_nothing_more() -> None:
    log: list = []
    cow = WriteLogDevice(MemoryDevice(1 << 20), log)
    store = open_store("P", cow, 8)
    add_exceptions(store, [1, 2])
    store.allocate()
    start = len(log)
    assert store.invalidate()
    assert ops(log, start) == [("write", 0, 4096), ("flush", 0, 0)]
    assert store.pending == () and store.status_text("Merge failed") == "Invalid"
    with pytest.raises(StoreInvalidError):
        store.allocate()
    with pytest.raises(StoreInvalidError):
        store.commit([(3, 4)])
    with pytest.raises(StoreInvalidError, match="can't merge"):
        store.prepare_merge()
    assert len(log) == start + 2


def test_failed_area_write_invalidates_and_header_failure_is_reported() -> None:
    class FailingWrites(MemoryDevice):
        fail_at: int | None = None

        def write(self, offset_bytes, data):
            if self.fail_at is not None and offset_bytes >= self.fail_at:
                raise DeviceError("injected write error")
            super().write(offset_bytes, data)

    cow = FailingWrites(1 << 20)
    store = open_store("P", cow, 8)
    add_exceptions(store, [1])
    new = store.allocate()
    cow.fail_at = 4096          # area 0 and the header's rewrite... only area 0 (>= 4096)
    with pytest.raises(StoreWriteError, match="injected write error") as caught:
        store.commit([(2, new)])
    assert caught.value.committed == 0 and not store.valid
    assert store.lookup(2) is None and store.lookup(1) == 2
    assert read_all(cow)[4:8] == bytes(4)            # header rewritten with valid=0
    cow2 = FailingWrites(1 << 20)
    store2 = open_store("P", cow2, 8)
    cow2.fail_at = 0
    assert store2.invalidate() is False and not store2.valid
    assert any("write header failed" in w for w in store2.warnings)


def test_overflow_is_po_only_and_in_memory() -> None:
    cow = MemoryDevice(512 * 512)
    po = open_store("PO", cow, 16)
    add_exceptions(po, list(range(30)))
    with pytest.raises(NoSpaceError):
        po.allocate()
    po.mark_overflowed()
    assert po.overflowed and po.valid and po.status_text() == "Overflow"
    assert po.status_text(merge_failed=True) == "Merge failed"
    assert DiskHeaderValid(cow) == 1
    again = open_store("PO", cow, 16)
    assert not again.overflowed and again.status_text() == "512/512 32"
    with pytest.raises(ValueError, match="cannot overflow"):
        open_store("P", cow, 16).mark_overflowed()


def DiskHeaderValid(cow) -> int:
    return int.from_bytes(cow.read(4, 4), "little")


def test_transient_store() -> None:
    cow = MemoryDevice(2048 * 512)
    cow.write(0, b"SnAp\x01\x00\x00\x00\x01\x00\x00\x00\x08\x00\x00\x00")   # stale header
    before = read_all(cow)
    store = open_store("N", cow, 8)
    assert store.status_text() == "0/2048 0" and store.table_text() == "N 8"
    assert not store.persistent and not store.supports_merge
    pairs = [(old, store.allocate()) for old in (7, 8, 9)]
    store.commit(pairs)
    pairs2 = [(20, store.allocate())]
    store.commit(pairs2)
    assert [n for _, n in pairs + pairs2] == [0, 1, 2, 3]
    assert store.lookup(7) == 0 and store.lookup(20) == 3 and store.lookup(21) is None
    assert store.status_text() == "32/2048 0"
    assert read_all(cow) == before                     # the store itself writes nothing
    assert store.invalidate() and store.status_text() == "Invalid" and read_all(cow) == before
    with pytest.raises(TargetError, match="does not support snapshot-merge"):
        store.prepare_merge()
    small = open_store("N", MemoryDevice(20 * 512), 8)
    small.commit([(1, small.allocate()), (2, small.allocate())])
    with pytest.raises(NoSpaceError):
        small.allocate()
    assert small.status_text() == "16/20 0"


def test_duplicates_load_like_the_kernel_first_record_wins() -> None:
    cow = MemoryDevice(1 << 20)
    write_store(cow, 8, [5, 6, 5, 9], [2, 3, 4, 5])
    store = open_store("P", cow, 8)
    assert len(store) == 4 and store.lookup(5) == 2
    assert [(a.kind, a.index) for a in store.anomalies] == [("duplicate_old", 2)]
    # Merging from the tail: removing (9, 5) then the duplicate (5, 4) keeps 5 -> 2 visible.
    assert store.prepare_merge() == MergeBatch(9, 5, 1)
    store.commit_merge(1)
    assert store.prepare_merge() == MergeBatch(5, 4, 1)
    store.commit_merge(1)
    assert store.lookup(5) == 2 and store.lookup(9) is None


# -- merging (§2.12) -----------------------------------------------------------------------

def runs_from_tail(records: list[tuple[int, int]], epa: int) -> list[MergeBatch]:
    """Independent expectation: consume from the end in runs ascending-consecutive in both
    fields, never crossing an area boundary."""
    batches = []
    end = len(records)
    while end:
        area_start = ((end - 1) // epa) * epa
        last_old, last_new = records[end - 1]
        n = 1
        while end - 1 - n >= area_start and records[end - 1 - n] == (last_old - n, last_new - n):
            n += 1
        batches.append(MergeBatch(last_old - n + 1, last_new - n + 1, n))
        end -= n
    return batches


def test_merge_drains_the_store_from_the_tail() -> None:
    rng = np.random.default_rng(7)
    olds: list[int] = []
    while len(olds) < 600:                 # runs of consecutive chunks, random gaps
        start = int(rng.integers(0, 1 << 20))
        olds.extend(range(start, start + int(rng.integers(1, 40))))
    olds = list(dict.fromkeys(olds))[:600]
    log: list = []
    cow = WriteLogDevice(MemoryDevice(4 << 20), log)
    store = open_store("P", cow, 8)
    records = add_exceptions(store, olds, batch=9)
    assert store.status_text() == "4832/8192 32"
    expected = runs_from_tail(records, 256)
    seen = []
    statuses = []
    while (batch := store.prepare_merge()) is not None:
        seen.append(batch)
        start = len(log)
        store.commit_merge(batch.count)
        assert ops(log, start) == [("flush", 0, 0), ("write", store.geometry.area_offset_bytes(
            store.current_area), 4096), ("flush", 0, 0)]
        statuses.append(store.status_fields())
        left = len(records) - sum(b.count for b in seen)
        assert spec_parse(read_all(cow.inner))[1] == records[:left]
        assert all(store.lookup(o) is None for o, _ in records[left:])
        assert all(store.lookup(o) == n for o, n in records[:left][-3:])
    assert seen == expected
    assert any(b.count > 1 for b in seen)
    assert statuses[-1] == (16, 8192, 16) and store.status_text() == "16/8192 16"
    assert store.prepare_merge() is None and len(store) == 0
    image = read_all(cow.inner)
    g = Geometry(8)
    for area in range(3):
        assert image[g.area_offset_bytes(area): g.area_offset_bytes(area) + 4096] == bytes(4096)
    assert image[4:8] == b"\x01\x00\x00\x00"              # the header stays valid
    # Data chunks are left in place.
    assert image[2 * 4096: 3 * 4096] == payload(records[0][0], 2, 4096)
    assert open_store("P", cow.inner, 8).status_text() == "16/8192 16"
    with pytest.raises(TargetError, match="being merged"):
        store.allocate()


def test_merge_status_sequence_crosses_an_area_back() -> None:
    cow = MemoryDevice(4 << 20)
    store = open_store("P", cow, 8)
    add_exceptions(store, [3 * i for i in range(258)], batch=50)   # area 1 holds 2 records
    assert store.status_text() == "2088/8192 24"
    store.commit_merge(store.prepare_merge().count)
    assert store.status_text() == "2080/8192 24"
    store.commit_merge(store.prepare_merge().count)
    assert store.status_text() == "2072/8192 24"                     # area 1 empty
    assert store.prepare_merge() == MergeBatch(3 * 255, 257, 1)     # back in area 0
    store.commit_merge(1)
    assert store.status_text() == "2056/8192 16"


def test_merge_write_error_changes_nothing() -> None:
    class Flaky(MemoryDevice):
        broken = False

        def write(self, offset_bytes, data):
            if self.broken:
                raise DeviceError("injected")
            super().write(offset_bytes, data)

    cow = Flaky(1 << 20)
    store = open_store("P", cow, 8)
    add_exceptions(store, [1, 2, 3])
    batch = store.prepare_merge()
    assert batch == MergeBatch(1, 2, 3)
    cow.broken = True
    with pytest.raises(StoreWriteError, match="Write error in exception store"):
        store.commit_merge(3)
    assert store.valid and len(store) == 3 and store.current_committed == 3
    cow.broken = False
    store.commit_merge(3)
    assert len(store) == 0


def test_merge_rejects_bad_counts_and_pending() -> None:
    store = open_store("P", MemoryDevice(1 << 20), 8)
    add_exceptions(store, [1, 2])
    store.allocate()
    with pytest.raises(TargetError, match="pending"):
        store.prepare_merge()
    fresh = open_store("P", MemoryDevice(1 << 20), 8)
    add_exceptions(fresh, [1, 2])
    fresh.prepare_merge()
    with pytest.raises(ValueError):
        fresh.commit_merge(3)


# -- model-based: the online store, the bulk writer and the spec parser agree --------------

@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cs=st.sampled_from([1, 2, 4, 8]),
       olds=st.lists(st.integers(0, 2**64 - 1), unique=True, max_size=300),
       batches=st.lists(st.integers(1, 70), min_size=1, max_size=20))
def test_store_image_equals_bulk_writer_and_parser(cs: int, olds: list[int],
                                                   batches: list[int]) -> None:
    g = Geometry(cs)
    size = (g.allocation_chunk(len(olds)) + g.stride_chunks + 2) * g.chunk_bytes
    online = MemoryDevice(size)
    store = open_store("P", online, cs)
    pos = 0
    turn = 0
    while pos < len(olds):
        n = batches[turn % len(batches)]
        add_exceptions(store, olds[pos: pos + n], batch=n, data=False)
        pos += n
        turn += 1
    bulk = MemoryDevice(size)
    write_store(bulk, cs, np.array(olds, dtype=np.uint64))
    assert read_all(online) == read_all(bulk)
    header, records = spec_parse(read_all(online))
    assert header == (0x70416E53, 1, 1, cs)
    assert records == [(o, g.allocation_chunk(j)) for j, o in enumerate(olds)]
    table = read_cow(online).table
    assert table.old.tolist() == olds
    reloaded = open_store("P", online, cs)
    assert reloaded.status_fields() == store.status_fields()
    assert (reloaded.current_area, reloaded.current_committed, reloaded.next_free) == \
        (store.current_area, store.current_committed, store.next_free)
    assert all(reloaded.lookup(o) == n for o, n in records[:50])
