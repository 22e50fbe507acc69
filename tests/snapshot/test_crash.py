"""Crash safety of the persistent store (docs/snapshot.md §3, §6).

A `WriteLogDevice` records every write and flush of randomized workloads (store creation,
allocate / write data / commit in batches, some filling areas mid-batch; and merges). The COW
is then rebuilt as a power cut would leave it:

* every prefix of the log;
* every prefix whose last write is torn after each whole sector;
* every prefix where the writes since the last flush landed only as a subset, in any
  combination (all subsets up to 3 writes, a random sample beyond): a flush is the only
  ordering the store may rely on.

Each image is reloaded. It must load, list a prefix of the committed sequence, map no chunk
whose data did not reach the COW before its record, and contain every exception whose
`commit()` had returned before the cut. Some recovered stores take new exceptions and are
reloaded again. The stale contents of the COW are 0xA5 bytes, so anything read that was not
written shows up.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field

import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st

from blockera.blockdev import MemoryDevice
from blockera.snapshot import Geometry, open_store
from blockera.snapshot.store import ExceptionStore

from tests.write_log import LogRecord, WriteLogDevice, replay

from .helpers import add_exceptions, chunk_tags, payload

STALE = 0xA5
CHECKED: dict[str, int] = {"points": 0}   # reported by tests/snapshot/conftest.py


@dataclass
class Workload:
    cs: int
    base: bytes
    log: list[LogRecord]
    attempted: list[tuple[int, int]] = field(default_factory=list)
    returned: list[tuple[int, int]] = field(default_factory=list)   # (log length, committed)

    @property
    def chunk_bytes(self) -> int:
        return self.cs * 512

    def required(self, cut: int) -> int:
        return max((n for length, n in self.returned if length <= cut), default=0)


def stale_cow(cs: int, exceptions: int) -> bytearray:
    g = Geometry(cs)
    chunks = g.allocation_chunk(exceptions) + g.stride_chunks + 3
    image = bytearray([STALE]) * (chunks * g.chunk_bytes)
    image[: g.chunk_bytes] = bytes(g.chunk_bytes)         # LVM wipes the header chunk
    return image


def run_workload(cs: int, batches: list[int], seed: int) -> Workload:
    total = sum(batches)
    base = stale_cow(cs, total)
    entries: list = []
    dev = WriteLogDevice(MemoryDevice(data=base), entries)
    store = open_store("P", dev, cs)
    rng = random.Random(seed)
    olds = rng.sample(range(1 << 40), total)
    work = Workload(cs, bytes(base), [])
    for k in batches:
        pairs = []
        for _ in range(k):
            new = store.allocate()
            old = olds.pop()
            dev.write(new * work.chunk_bytes, payload(old, new, work.chunk_bytes))
            pairs.append((old, new))
        store.commit(pairs)
        work.attempted.extend(pairs)
        work.returned.append((len(entries), len(work.attempted)))
    work.log = [rec for _, rec in entries]
    return work


def check_commit_image(work: Workload, image: bytes | bytearray, cut: int,
                       extend: bool = False) -> None:
    CHECKED["points"] += 1
    dev = MemoryDevice(data=image)
    store = open_store("P", dev, work.cs)
    old, new = store.exceptions()
    n = len(old)
    if store.created:
        assert work.required(cut) == 0
    assert store.valid and not store.anomalies
    expected = np.array(work.attempted[:n], dtype=np.uint64).reshape(-1, 2)
    assert n <= len(work.attempted)
    assert (old == expected[:, 0]).all() and (new == expected[:, 1]).all()
    assert n >= work.required(cut), f"cut {cut}: {n} exceptions, {work.required(cut)} returned"
    tags = chunk_tags(image, work.chunk_bytes, new)
    assert (tags[:, 0] == old).all() and (tags[:, 1] == new).all() and tags[:, 2].all(), \
        f"cut {cut}: a mapped chunk's data did not reach the COW"
    if extend:
        more = add_exceptions(store, [(1 << 41) + i for i in range(3)], batch=2)
        again = open_store("P", dev, work.cs)
        o2, n2 = again.exceptions()
        assert len(o2) == n + 3 and list(zip(o2[n:].tolist(), n2[n:].tolist())) == more
        tags = chunk_tags(dev.data, work.chunk_bytes, n2)
        assert (tags[:, 0] == o2).all() and (tags[:, 1] == n2).all() and tags[:, 2].all()


def crash_images(base: bytes, log: list[LogRecord], rng: random.Random,
                 subsets_sampled: int = 6):
    """Yield (cut, image) for every crash the module docstring lists."""
    current = bytearray(base)
    at_flush = bytes(base)
    since_flush: list[LogRecord] = []
    yield 0, bytes(current)
    for i, rec in enumerate(log):
        cut = i + 1
        if rec.kind == "write":
            before = bytes(current)
            sectors = len(rec.data) // 512
            for torn in range(1, sectors):
                yield cut, replay(before, [rec], torn_sectors=torn)
            current = replay(current, [rec])
            since_flush.append(rec)
        elif rec.kind == "flush":
            at_flush = bytes(current)
            since_flush = []
        yield cut, bytes(current)
        if len(since_flush) >= 2:
            if len(since_flush) <= 3:
                masks = itertools.product((False, True), repeat=len(since_flush))
            else:
                masks = (tuple(rng.random() < 0.5 for _ in since_flush)
                         for _ in range(subsets_sampled))
            for mask in masks:
                if all(mask):
                    continue
                chosen = [r for r, keep in zip(since_flush, mask) if keep]
                yield cut, replay(at_flush, chosen)


def check_all_cuts(work: Workload, seed: int) -> int:
    rng = random.Random(seed)
    count = 0
    for cut, image in crash_images(work.base, work.log, rng):
        check_commit_image(work, image, cut, extend=(count % 97 == 0))
        count += 1
    return count


batch_sizes = st.lists(st.one_of(st.integers(1, 4), st.integers(30, 70)), min_size=3,
                       max_size=12)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cs=st.sampled_from([2, 4]), batches=batch_sizes, seed=st.integers(0, 2**32))
def test_commit_survives_every_crash_point(cs: int, batches: list[int], seed: int) -> None:
    work = run_workload(cs, batches, seed)
    assert check_all_cuts(work, seed) > len(work.log)


def test_commit_crash_points_across_six_areas() -> None:
    # Fixed workload over six areas: single commits, small batches, batches that fill an
    # area mid-batch, and one that fills an area exactly.
    g = Geometry(2)
    epa = g.exceptions_per_area
    batches = [1] * 70 + [3] * 20 + [epa - 5] + [1] * 40 + [7] * 10 + [epa, 2]
    work = run_workload(2, batches, 12345)
    assert sum(batches) > 5 * epa
    points = check_all_cuts(work, 1)
    assert points > 3 * len(work.log)


def test_creation_and_reuse_after_crash_leave_no_stale_records() -> None:
    # Crash with data written but the record never committed: the chunk is reused and the
    # old payload cannot appear under a record.
    work = run_workload(4, [3], 9)
    image = replay(work.base, work.log[:-3])       # data written, records not yet
    store = open_store("P", MemoryDevice(data=image), 4)
    assert len(store) == 0 and store.next_free == 2
    check_commit_image(work, image, len(work.log) - 3, extend=True)


# -- merges --------------------------------------------------------------------------------

def merge_workload(cs: int, seed: int) -> tuple[Workload, list[tuple[int, int]],
                                                 list[tuple[int, int]]]:
    """A store of ~2.5 areas with runs, merged to the end under a write log. Returns the
    workload, the records, and (log length, records left) after each commit_merge."""
    g = Geometry(cs)
    rng = random.Random(seed)
    olds: list[int] = []
    while len(olds) < int(2.5 * g.exceptions_per_area):
        start = rng.randrange(1 << 30)
        olds.extend(range(start, start + rng.randrange(1, 6)))
    olds = list(dict.fromkeys(olds))
    dev = MemoryDevice(data=stale_cow(cs, len(olds)))
    store = open_store("P", dev, cs)
    records = add_exceptions(store, olds, batch=7)
    base = bytes(dev.data)
    entries: list = []
    logged = WriteLogDevice(MemoryDevice(data=base), entries)
    merging = open_store("P", logged, cs)
    assert not merging.created
    events = []
    left = len(records)
    while (batch := merging.prepare_merge()) is not None:
        merging.commit_merge(batch.count)
        left -= batch.count
        events.append((len(entries), left))
    work = Workload(cs, base, [rec for _, rec in entries])
    return work, records, events


def test_merge_survives_every_crash_point() -> None:
    total = 0
    for cs, seed in ((1, 5), (2, 3), (4, 8)):
        work, records, events = merge_workload(cs, seed)
        before = [len(records)] + [left for _, left in events]
        for cut, image in crash_images(work.base, work.log, random.Random(seed)):
            done = [left for length, left in events if length <= cut]
            upper = done[-1] if done else len(records)
            lower = before[len(done) + 1] if len(done) + 1 < len(before) else 0
            store: ExceptionStore = open_store("P", MemoryDevice(data=image), cs)
            old, new = store.exceptions()
            n = len(old)
            assert lower <= n <= upper, f"cut {cut}: {n} records left, expected {lower}..{upper}"
            assert list(zip(old.tolist(), new.tolist())) == records[:n]
            total += 1
            if total % 53 == 0:        # the merge resumes and finishes
                while (batch := store.prepare_merge()) is not None:
                    store.commit_merge(batch.count)
                assert store.status_fields()[0] == 2 * cs
        CHECKED["points"] += total
    assert total > 500
