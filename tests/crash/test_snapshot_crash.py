"""Power cut at every write under the snapshot targets: copy-outs (data, flush, record, flush,
then the origin write) and snapshot writes (data or copy, commit, then the partial write)
never leave a store that maps a chunk to data that was not fully written, and never lose an
acknowledged write -- to the origin or to a snapshot.

Two persistent snapshots (chunk sizes 4 and 8 sectors, so their stores span several metadata
areas) sit on one origin through a snapshot-origin device, all over memory devices that log
every write and flush. After the workload, every prefix of the log is a possible moment of
power loss, and each device independently may have kept any part of what it was sent after
its last completed flush (a device orders nothing between flushes): for every cut the test
checks the state where everything sent arrived, where nothing after the last flush did, a
random part of that, and a torn last write. The COW images are then loaded with the kernel's
rules, and each device as the snapshot would show it must hold, in every sector, what the
last completed flush of that device made durable, or what a write sent to that device since
then (acknowledged or still in flight) put there -- as block devices promise. An origin write
must never show through a snapshot, and a record must never point at a chunk whose data did
not arrive.
"""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
from dataclasses import dataclass

import numpy as np
import pytest

from blockera.blockdev import MemoryDevice
from blockera.engine.userspace import Engine
from blockera.snapshot.cow_image import read_cow

from tests.write_log import LogRecord, WriteLogDevice

SECTOR = 512
ORIGIN_SECTORS = 1024                       # 512 KiB: 256 chunks of 4 sectors
SNAPSHOTS = {"snap4": 4, "snap8": 8}
COW_BYTES = 1 << 20
CHECKED = {"points": 0}


@dataclass(frozen=True)
class Request:
    """A write (or, with no data, a flush) sent to "base" (the origin) or a snapshot."""

    device: str
    sector: int = 0
    data: bytes = b""


def _payload(seed: int, length: int) -> bytes:
    out = bytearray()
    while len(out) < length:
        out += hashlib.sha256(f"{seed}:{len(out)}".encode()).digest()
    return bytes(out[:length])


class Workload:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.log: list[tuple[str, object]] = []
        self.dir = tempfile.mkdtemp(prefix="snapcrash-")
        self.base_images: dict[str, bytes] = {}
        self.devices: dict[str, MemoryDevice] = {}
        self.paths: dict[str, str] = {}
        origin = _payload(seed, ORIGIN_SECTORS * SECTOR)
        for name, content in [("origin", origin)] + [(f"cow-{s}", bytes(COW_BYTES))
                                                     for s in SNAPSHOTS]:
            path = os.path.join(self.dir, f"{name}.img")
            open(path, "wb").close()
            self.paths[name] = path
            self.devices[name] = MemoryDevice(data=bytearray(content))
            self.base_images[name] = content
        by_path = {p: n for n, p in self.paths.items()}

        def opener(path: str, writable: bool) -> WriteLogDevice:
            name = by_path[os.path.realpath(path)]
            return WriteLogDevice(self.devices[name], self.log, name)

        self.engine = Engine(file_opener=opener)

    def run(self, steps: int) -> None:
        e, rng = self.engine, self.rng
        e.create("real", f"0 {ORIGIN_SECTORS} linear {self.paths['origin']} 0")
        e.create("base", f"0 {ORIGIN_SECTORS} snapshot-origin /dev/mapper/real")
        e.suspend("base")
        for name, cs in SNAPSHOTS.items():
            e.create(name, f"0 {ORIGIN_SECTORS} snapshot /dev/mapper/real "
                           f"{self.paths['cow-' + name]} P {cs}")
        e.resume("base")
        for step in range(steps):
            device = rng.choice(["base", "base", "snap4", "snap8"])
            if rng.random() < 0.25:
                request = Request(device)
                self.log.append(("start", request))
                e.device(device).flush()
                self.log.append(("ack", request))
                continue
            sector = rng.randrange(ORIGIN_SECTORS)
            count = min(rng.choice([1, 3, 4, 8, 12, 16, 40]), ORIGIN_SECTORS - sector)
            request = Request(device, sector, _payload(1000 + step, count * SECTOR))
            self.log.append(("start", request))
            e.device(device).write(sector * SECTOR, request.data)
            self.log.append(("ack", request))
        e.shutdown()

    def close(self) -> None:
        for name in os.listdir(self.dir):
            os.unlink(os.path.join(self.dir, name))
        os.rmdir(self.dir)


class DeviceState:
    """One device's image as the log is walked: `stable` holds what a completed flush made
    durable, `pending` what was sent after it."""

    def __init__(self, base: bytes) -> None:
        self.stable = bytearray(base)
        self.pending: list[LogRecord] = []

    def add(self, record: LogRecord) -> None:
        if record.kind == "flush":
            self._apply(self.stable, self.pending)
            self.pending = []
        else:
            self.pending.append(record)

    @staticmethod
    def _apply(image: bytearray, records: list[LogRecord], torn_sectors: int | None = None
               ) -> None:
        for i, rec in enumerate(records):
            if rec.kind == "write":
                data = rec.data
                if torn_sectors is not None and i == len(records) - 1:
                    data = data[: torn_sectors * SECTOR]
                image[rec.offset_bytes: rec.offset_bytes + len(data)] = data
            elif rec.kind == "discard":
                image[rec.offset_bytes: rec.offset_bytes + rec.length_bytes] = \
                    bytes(rec.length_bytes)

    def variants(self, rng: random.Random) -> list[bytearray]:
        """Possible images after a power cut now."""
        if not self.pending:
            return [self.stable]
        everything = bytearray(self.stable)
        self._apply(everything, self.pending)
        out = [everything, self.stable]
        subset = [r for r in self.pending if rng.random() < 0.5]
        if subset:
            image = bytearray(self.stable)
            self._apply(image, subset)
            out.append(image)
        last = self.pending[-1]
        if last.kind == "write" and len(last.data) > SECTOR:
            image = bytearray(self.stable)
            self._apply(image, self.pending, torn_sectors=rng.randrange(1, len(last.data) // SECTOR))
            out.append(image)
        return out


def snapshot_view(origin: bytes, cow: bytes, cs: int) -> bytes:
    """What the snapshot shows after the store is loaded as the kernel loads it."""
    image = read_cow(MemoryDevice(data=bytearray(cow)), lenient=True)
    if image.header is not None and image.header.is_new:
        return origin                       # never initialised: a new, empty store
    assert image.error is None, f"the store does not load after the crash: {image.error}"
    assert image.header.is_valid
    view = bytearray(origin)
    cb = cs * SECTOR
    for old, new in zip(image.table.old.tolist(), image.table.new.tolist()):
        assert old * cb < len(origin), f"exception for chunk {old} beyond the origin"
        view[old * cb: (old + 1) * cb] = cow[new * cb: new * cb + cb][: len(origin) - old * cb]
    return bytes(view)


class Expected:
    """What a device may hold after a power cut: `durable` (the data as of its last completed
    flush) and the writes sent since, any of which may or may not have landed."""

    def __init__(self, base: bytes) -> None:
        self.durable = bytearray(base)
        self.since_flush: list[Request] = []

    def flushed(self) -> None:
        for w in self.since_flush:
            self.durable[w.sector * SECTOR: w.sector * SECTOR + len(w.data)] = w.data
        self.since_flush = []

    def check(self, actual: bytes, name: str, where: str) -> None:
        a = np.frombuffer(actual, dtype=np.uint8).reshape(-1, SECTOR)
        b = np.frombuffer(bytes(self.durable), dtype=np.uint8).reshape(-1, SECTOR)
        bad = np.flatnonzero((a != b).any(axis=1))
        for w in self.since_flush:
            if not len(bad):
                break
            new = np.frombuffer(w.data, dtype=np.uint8).reshape(-1, SECTOR)
            inside = (bad >= w.sector) & (bad < w.sector + len(new))
            ok = inside.copy()
            ok[inside] = (a[bad[inside]] == new[bad[inside] - w.sector]).all(axis=1)
            bad = bad[~ok]
        assert not len(bad), (f"{where}: {name} sectors {bad[:8].tolist()} hold neither the "
                              "data its last flush made durable nor any write sent since")


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_every_cut_keeps_acknowledged_writes_and_valid_stores(seed: int) -> None:
    work = Workload(seed)
    try:
        work.run(steps=70)
    finally:
        work.close()
    rng = random.Random(seed)
    states = {name: DeviceState(base) for name, base in work.base_images.items()}
    expected = {name: Expected(work.base_images["origin"]) for name in ["base", *SNAPSHOTS]}
    checked = 0
    for position, (tag, item) in enumerate(work.log):
        if tag in ("start", "ack"):
            assert isinstance(item, Request)
            if tag == "start" and item.data:
                expected[item.device].since_flush.append(item)
            elif tag == "ack" and not item.data:
                expected[item.device].flushed()
            continue
        assert isinstance(item, LogRecord)
        states[tag].add(item)
        if item.kind == "flush":
            continue
        # power is lost right after this write was sent
        where = f"seed {seed}, cut at log entry {position}"
        for origin in states["origin"].variants(rng):
            expected["base"].check(bytes(origin), "the origin", where)
            for name, cs in SNAPSHOTS.items():
                for cow in states[f"cow-{name}"].variants(rng):
                    view = snapshot_view(bytes(origin), bytes(cow), cs)
                    expected[name].check(view, name, where)
                    checked += 1
    CHECKED["points"] += checked
    assert checked > 1000
