"""The snapshot, snapshot-origin and snapshot-merge targets in the userspace engine: the
kernel's constructor errors, table and status lines (docs/snapshot.md §6checked against
Linux 6.1 in tests/kernel), copy-out, snapshot writes, overflow and invalidation, several
snapshots of one origin, handover and merging."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import pytest

from blockera.blockdev import FileDevice
from blockera.blocking import waits_announced_to
from blockera.engine.userspace import Engine
from blockera.errors import DeviceError, TableError, TargetError
from blockera.snapshot import changed_chunks, read_cow
from blockera.snapshot.changed import merge_ranges

KiB, MiB = 1024, 1024 * 1024


def image(path: Path, size: int, fill: bytes | None = None) -> str:
    with open(path, "wb") as f:
        if fill is None:
            f.truncate(size)
        else:
            f.write((fill * (size // len(fill) + 1))[:size])
    return str(path)


def pattern(seed: int, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{len(out)}".encode()).digest()
    return bytes(out[:size])


class Stack:
    """The LVM layering of seed 003: base-real (linear), snap-cow (linear), snap (snapshot) and
    base (snapshot-origin), over image files."""

    def __init__(self, tmp: Path, origin_bytes: int = 8 * MiB, cow_bytes: int = 2 * MiB,
                 kind: str = "P", cs: int = 8) -> None:
        self.engine = Engine()
        self.origin_file = image(tmp / "origin.img", origin_bytes)
        FileDevice(self.origin_file).write(0, pattern(1, origin_bytes))
        self.cow_file = image(tmp / "cow.img", cow_bytes)
        self.sectors = origin_bytes // 512
        e = self.engine
        e.create("base-real", f"0 {self.sectors} linear {self.origin_file} 0")
        e.create("snap-cow", f"0 {cow_bytes // 512} linear {self.cow_file} 0")
        e.create("base", f"0 {self.sectors} snapshot-origin /dev/mapper/base-real")
        self.original = e.device("base").read(0, origin_bytes)
        self.add_snapshot("snap", "/dev/mapper/snap-cow", kind, cs)

    def add_snapshot(self, name: str, cow: str, kind: str, cs: int) -> None:
        e = self.engine
        e.suspend("base")
        e.create(name, f"0 {self.sectors} snapshot /dev/mapper/base-real {cow} {kind} {cs}")
        e.resume("base")

    def status(self, name: str) -> str:
        """The target's status words (after the line's start, length and target name)."""
        self.engine.settle()
        return self.engine.status(name).rstrip("\n").split(" ", 3)[3]

    def read(self, name: str) -> bytes:
        dev = self.engine.device(name)
        return dev.read(0, dev.size_bytes)

    def close(self) -> None:
        self.engine.shutdown()


@pytest.fixture
def stack(tmp_path: Path):
    s = Stack(tmp_path)
    yield s
    s.close()


# -- table lines -------------------------------------------------------------------------------
def test_an_origin_write_announces_its_wait_only_when_it_copies_out(stack: Stack) -> None:
    base = stack.engine.device("base")
    announced: list[str] = []
    for label in ("copy-out", "already copied"):
        with waits_announced_to(lambda: announced.append(label)):
            base.write(64 * KiB, os.urandom(4 * KiB))
    assert announced == ["copy-out"]


@pytest.mark.parametrize("args, message", [
    ("{o} {c} P", "snapshot: requires 4 or more arguments"),
    ("{o} {c} X 8", "Couldn't create exception store (Exception store type is not P or N)"),
    ("{o} {c} PX 8", "Couldn't create exception store (Unsupported persistent store option: X)"),
    ("{o} {c} P 12", "Couldn't create exception store (Chunk size is not a power of 2)"),
    ("{o} {c} P 4194304", "Couldn't create exception store (Chunk size is too high)"),
    ("{o} {c} P 8k", "Couldn't create exception store (Invalid chunk size)"),
    ("{o} {c} N 0", "Chunk size not set"),
    ("{o} {c} P 8 3 a b c", "Invalid number of feature arguments"),
    ("{o} {c} P 8 2 discard_zeroes_cow", "Invalid number of feature arguments"),
    ("{o} {c} P 8 1 bogus", "Unrecognised feature requested"),
    ("{o} {c} P 8 1 discard_passdown_origin",
     "discard_passdown_origin feature depends on discard_zeroes_cow"),
    ("{o} {o} P 8", "COW device cannot be the same as origin device"),
    ("{o} /nonexistent P 8", "Cannot get COW device"),
    ("/nonexistent {c} P 8", "Cannot get origin device"),
])
def test_snapshot_constructor_errors(tmp_path: Path, args: str, message: str) -> None:
    o = image(tmp_path / "o.img", MiB)
    c = image(tmp_path / "c.img", MiB)
    e = Engine()
    with pytest.raises(TableError) as info:
        e.create("s", f"0 2048 snapshot {args.format(o=o, c=c)}")
    assert message in str(info.value)
    assert e.ls() == "No devices found\n"
    assert Path(c).read_bytes() == bytes(MiB), "a rejected table writes nothing"


def test_origin_and_merge_constructor_errors(tmp_path: Path) -> None:
    o = image(tmp_path / "o.img", MiB)
    c = image(tmp_path / "c.img", MiB)
    e = Engine()
    with pytest.raises(TableError, match="origin: incorrect number of arguments"):
        e.create("x", f"0 2048 snapshot-origin {o} {c}")
    with pytest.raises(TableError, match="Cannot get target device"):
        e.create("x", "0 2048 snapshot-origin /nonexistent")
    with pytest.raises(TableError, match="does not support snapshot-merge"):
        e.create("x", f"0 2048 snapshot-merge {o} {c} N 8")


def test_corrupt_header_is_refused_and_left_alone(tmp_path: Path) -> None:
    o = image(tmp_path / "o.img", MiB)
    c = image(tmp_path / "c.img", MiB, fill=b"\xa5")
    e = Engine()
    with pytest.raises(TableError) as info:
        e.create("s", f"0 2048 snapshot {o} {c} P 8")
    assert "Failed to read snapshot metadata (Invalid or corrupt snapshot" in str(info.value)
    assert info.value.errno_name == "ENXIO"
    assert Path(c).read_bytes() == b"\xa5" * MiB


def test_table_and_status_forms(tmp_path: Path) -> None:
    o = image(tmp_path / "o.img", MiB)
    cows = [image(tmp_path / f"c{i}.img", MiB) for i in range(4)]
    e = Engine()
    e.create("a", f"0 2048 snapshot {o} {cows[0]} P 0")
    e.create("b", f"0 2048 snapshot {o} {cows[1]} pox 8 0")
    e.create("c", f"0 2048 snapshot {o} {cows[2]} nX 08")
    e.create("d", f"0 2048 snapshot {o} {cows[3]} P 4 2 DISCARD_ZEROES_COW "
                  "discard_passdown_origin")
    assert e.table() == (f"a: 0 2048 snapshot {o} {cows[0]} P 32\n"
                         f"b: 0 2048 snapshot {o} {cows[1]} PO 8\n"
                         f"c: 0 2048 snapshot {o} {cows[2]} N 8\n"
                         f"d: 0 2048 snapshot {o} {cows[3]} P 4 2 discard_zeroes_cow "
                         "discard_passdown_origin\n")
    assert e.status() == ("a: 0 2048 snapshot 64/2048 64\n"
                          "b: 0 2048 snapshot 16/2048 16\n"
                          "c: 0 2048 snapshot 0/2048 0\n"
                          "d: 0 2048 snapshot 8/2048 8\n")
    e.create("o", f"0 2048 snapshot-origin {o}")
    assert e.status("o") == "0 2048 snapshot-origin \n"
    assert e.table("o") == f"0 2048 snapshot-origin {o}\n"
    e.shutdown()


def test_header_chunk_size_overrides_the_table(tmp_path: Path) -> None:
    o = image(tmp_path / "o.img", MiB)
    c = image(tmp_path / "c.img", MiB)
    e = Engine()
    e.create("s", f"0 2048 snapshot {o} {c} P 8")
    e.remove("s")
    e.create("s", f"0 2048 snapshot {o} {c} P 16")
    assert e.table("s") == f"0 2048 snapshot {o} {c} P 8\n"
    e.shutdown()


# -- copy-out and the frozen view ------------------------------------------------------------
def test_origin_writes_copy_out_and_the_snapshot_stays_frozen(stack: Stack) -> None:
    base = stack.engine.device("base")
    base.write(3 * 4096, pattern(2, 4096))           # chunk 3
    base.write(5 * 4096 + 512, pattern(3, 512))      # chunk 5, partially
    base.write(10 * 4096, pattern(4, 3 * 4096))      # chunks 10-12
    assert stack.status("snap") == "56/4096 16"      # 5 exceptions: next_free 7, area 0
    assert stack.read("snap") == stack.original
    now = stack.read("base")
    assert now[3 * 4096: 4 * 4096] == pattern(2, 4096)
    assert now != stack.original
    base.write(3 * 4096, pattern(5, 4096))           # already copied: no new exception
    assert stack.status("snap") == "56/4096 16"
    stack.engine.settle()
    table = read_cow(FileDevice(stack.cow_file, writable=False)).table
    assert table.old.tolist() == [3, 5, 10, 11, 12]
    assert table.new.tolist() == [2, 3, 4, 5, 6]
    assert [a.tolist() for a in merge_ranges(table.old)] == [[3, 5, 10], [4, 6, 13]]


def test_snapshot_writes_full_and_partial_chunks(stack: Stack) -> None:
    snap = stack.engine.device("snap")
    snap.write(20 * 4096, pattern(6, 4096))           # whole chunk: straight to the COW
    snap.write(12 * 4096 + 3 * 512, pattern(7, 512))  # partial: copy the origin chunk first
    view = bytearray(stack.original)
    view[20 * 4096: 21 * 4096] = pattern(6, 4096)
    view[12 * 4096 + 1536: 12 * 4096 + 2048] = pattern(7, 512)
    assert stack.read("snap") == bytes(view)
    assert stack.read("base") == stack.original, "snapshot writes never reach the origin"
    assert stack.status("snap") == "32/4096 16"


def test_write_spanning_many_chunks_is_one_batch(tmp_path: Path) -> None:
    stack = Stack(tmp_path, cow_bytes=4 * MiB)
    base = stack.engine.device("base")
    base.write(0, pattern(8, 2 * MiB))                # 512 chunks: areas 0 and 1 fill up
    # data chunks 2-257 and 259-514, area 2 at chunk 515 is skipped
    assert stack.status("snap") == f"{516 * 8}/8192 {4 * 8}"
    assert stack.read("snap") == stack.original
    result = changed_chunks(read_cow(FileDevice(stack.cow_file, writable=False)))
    assert result.ranges() == [[0, 512]]
    stack.close()


def test_partial_last_chunk_copies_only_existing_sectors(tmp_path: Path) -> None:
    o = image(tmp_path / "o.img", 16380 * 512)        # the last 32-sector chunk has 28
    FileDevice(o).write(0, pattern(9, 16380 * 512))
    c = image(tmp_path / "c.img", MiB, fill=b"\xee")
    FileDevice(c).write(0, bytes(16 * KiB))           # header chunk zeroed: a new store
    e = Engine()
    e.create("base", f"0 16380 snapshot-origin {o}")
    e.suspend("base")
    e.create("snap", f"0 16380 snapshot {o} {c} P 32")
    e.resume("base")
    e.device("base").write(16352 * 512, bytes(28 * 512))
    cow = Path(c).read_bytes()
    chunk = 2 * 32 * 512
    assert cow[chunk: chunk + 28 * 512] == pattern(9, 16380 * 512)[16352 * 512:]
    assert cow[chunk + 28 * 512: chunk + 32 * 512] == b"\xee" * 2048
    e.shutdown()


def test_two_snapshots_of_one_origin(stack: Stack, tmp_path: Path) -> None:
    cow2 = image(tmp_path / "cow2.img", 2 * MiB)
    stack.add_snapshot("snap2", cow2, "P", 32)
    stack.engine.device("base").write(4096, pattern(10, 4096))
    assert stack.status("snap") == "24/4096 16"
    assert stack.status("snap2") == "96/4096 64"
    assert stack.read("snap") == stack.original == stack.read("snap2")


def test_snapshot_gets_copy_outs_only_once_resumed(stack: Stack, tmp_path: Path) -> None:
    cow2 = image(tmp_path / "cow2.img", MiB)
    e = stack.engine
    e.create("later")
    e.load("later", f"0 {stack.sectors} snapshot /dev/mapper/base-real {cow2} P 8")
    e.device("base").write(0, pattern(11, 4096))      # "later" is loaded, not active
    e.suspend("base")
    e.resume("later")
    e.resume("base")
    assert stack.status("later") == "16/2048 16"
    now = stack.read("base")
    assert stack.read("later") == now
    e.device("base").write(0, pattern(12, 4096))
    assert stack.status("later") == "24/2048 16"
    assert stack.read("later") == now


# -- full COWs -------------------------------------------------------------------------------------
def test_origin_write_on_a_full_cow_invalidates(tmp_path: Path) -> None:
    s = Stack(tmp_path, cow_bytes=5 * 4096, kind="PO")   # room for 3 exceptions
    base = s.engine.device("base")
    base.write(0, pattern(12, 3 * 4096))
    assert s.status("snap") == "40/40 16"
    base.write(10 * 4096, pattern(13, 4096))            # no room: invalid, even with PO
    assert s.status("snap") == "Invalid"
    assert s.read("base")[10 * 4096: 11 * 4096] == pattern(13, 4096)   # the origin goes on
    with pytest.raises(DeviceError) as info:
        s.engine.device("snap").read(0, 4096)
    assert info.value.errno_name == "EIO"
    s.close()
    assert Path(s.cow_file).read_bytes()[4:8] == bytes(4), "header valid=0 on disk"


def test_snapshot_write_overflow_with_po_and_invalidation_without(tmp_path: Path) -> None:
    for kind, expected in (("PO", "Overflow"), ("P", "Invalid"), ("N", "Invalid")):
        work = tmp_path / kind
        work.mkdir()
        s = Stack(work, cow_bytes=4 * 4096, kind=kind, cs=8)
        snap = s.engine.device("snap")
        snap.write(0, pattern(14, 4096))
        with pytest.raises(DeviceError):
            snap.write(8 * 4096, pattern(15, 4 * 4096))   # P/PO room for 1 more, N for 3
        assert s.status("snap") == expected
        if kind == "PO":
            assert snap.read(0, 4096) == pattern(14, 4096), "reads still work"
            with pytest.raises(DeviceError):
                snap.write(0, pattern(16, 4096))      # even to a chunk with an exception
        s.close()


# -- handover and merge -----------------------------------------------------------------------
def test_reload_hands_the_store_over(stack: Stack) -> None:
    e = stack.engine
    e.device("base").write(0, pattern(17, 4096))
    with pytest.raises(TargetError, match="until source is suspended"):
        # a second device taking over the same COW while the source runs
        e.create("other", f"0 {stack.sectors} snapshot /dev/mapper/base-real "
                          "/dev/mapper/snap-cow P 8")
    e.load("snap", f"0 {stack.sectors} snapshot /dev/mapper/base-real /dev/mapper/snap-cow PO 8")
    with pytest.raises(TableError, match="Snapshot cow pairing for exception table handover"):
        e.create("other", f"0 {stack.sectors} snapshot /dev/mapper/base-real "
                          "/dev/mapper/snap-cow P 8")
    e.resume("snap")     # suspends the old table, hands over, resumes
    assert e.table("snap").endswith(" PO 8\n")
    assert stack.status("snap") == "24/4096 16"
    assert stack.read("snap") == stack.original


def test_lvm_merge_rolls_the_origin_back(stack: Stack) -> None:
    e = stack.engine
    e.device("base").write(MiB, pattern(18, 300 * 4096))     # 300 chunks over two areas
    e.device("snap").write(0, pattern(19, 4096))              # a write to the snapshot
    view = stack.read("snap")
    assert stack.status("snap") == "2432/4096 24"     # 301 exceptions
    # lvconvert --merge: origin -> snapshot-merge (handover from the suspended snapshot),
    # snapshot -> error
    e.suspend("base")
    e.suspend("snap")
    e.load("base", f"0 {stack.sectors} snapshot-merge /dev/mapper/base-real "
                   "/dev/mapper/snap-cow P 8")
    e.resume("base")
    e.load("snap", f"0 {stack.sectors} error")
    e.resume("snap")
    e.rename("snap-cow", "base-cow")
    assert stack.status("base") == "16/4096 16"
    assert stack.read("base") == view
    assert FileDevice(stack.origin_file).read(0, len(view)) == view
    e.suspend("base")
    e.load("base", f"0 {stack.sectors} linear /dev/mapper/base-real 0")
    e.resume("base")
    e.remove("snap")
    cow = read_cow(FileDevice(stack.cow_file, writable=False))
    assert cow.header.valid == 1 and len(cow.table) == 0


def test_merge_from_disk_without_handover_and_io_during_merge(tmp_path: Path) -> None:
    s = Stack(tmp_path, cs=16)
    e = s.engine
    e.device("base").write(0, pattern(20, 64 * 8192))
    view = s.read("snap")
    e.suspend("base")
    e.remove("snap")
    e.load("base", f"0 {s.sectors} snapshot-merge /dev/mapper/base-real /dev/mapper/snap-cow "
                   "P 16")
    e.resume("base")
    e.device("base").write(8192, pattern(21, 8192))           # during (or after) the merge
    expected = bytearray(view)
    expected[8192: 16384] = pattern(21, 8192)
    assert s.read("base") == bytes(expected)
    assert s.status("base") == "32/4096 32"
    s.close()


def test_suspend_pauses_the_merge_and_remove_of_busy_snapshots(stack: Stack) -> None:
    e = stack.engine
    e.device("base").write(0, pattern(22, 64 * 4096))
    view = stack.read("snap")
    e.suspend("base")
    e.suspend("snap")
    e.load("base", f"0 {stack.sectors} snapshot-merge /dev/mapper/base-real "
                   "/dev/mapper/snap-cow P 8")
    e.resume("base")
    e.suspend("base")
    assert stack.engine.status("base").startswith(f"0 {stack.sectors} snapshot-merge ")
    e.resume("base")
    assert stack.status("base") == "16/4096 16"
    assert stack.read("base") == view
    e.resume("snap")                  # left active, the handed-over snapshot fails all I/O
    assert stack.status("snap") == "Invalid"
    assert e.table("snap").endswith(" P 0\n")
    with pytest.raises(DeviceError):
        e.device("snap").read(0, 512)


def test_second_merge_is_refused(stack: Stack, tmp_path: Path) -> None:
    cow2 = image(tmp_path / "cow2.img", MiB)
    stack.add_snapshot("snap2", cow2, "P", 8)
    e = stack.engine
    e.suspend("base")
    e.suspend("snap")
    e.load("base", f"0 {stack.sectors} snapshot-merge /dev/mapper/base-real "
                   "/dev/mapper/snap-cow P 8")
    e.resume("base")
    e.suspend("snap2")
    with pytest.raises(TableError, match="A snapshot is already merging."):
        e.create("m2", f"0 {stack.sectors} snapshot-merge /dev/mapper/base-real {cow2} P 8")
    e.resume("snap2")


def test_discard_zeroes_cow(tmp_path: Path) -> None:
    o = image(tmp_path / "o.img", MiB)
    FileDevice(o).write(0, pattern(23, MiB))
    c = image(tmp_path / "c.img", MiB)
    e = Engine()
    e.create("s", f"0 2048 snapshot {o} {c} P 8 1 discard_zeroes_cow")
    dev = e.device("s")
    dev.write(0, pattern(24, 4096))
    dev.discard(0, 8192)                 # chunk 0 has an exception: zeroed; chunk 1: nothing
    assert dev.read(0, 8192) == bytes(4096) + pattern(23, MiB)[4096:8192]
    assert e.status("s") == "0 2048 snapshot 24/2048 16\n"
    e.create("plain", f"0 2048 snapshot {o} {image(tmp_path / 'c2.img', MiB)} P 8")
    with pytest.raises(DeviceError) as info:
        e.device("plain").discard(0, 4096)
    assert info.value.errno_name == "EOPNOTSUPP"
    e.shutdown()


def test_cow_tools_read_engine_devices(stack: Stack) -> None:
    stack.engine.device("base").write(0, pattern(25, 3 * 4096))
    assert os.path.exists(stack.cow_file)
    result = changed_chunks(read_cow(stack.engine.device("snap-cow")))
    assert result.ranges() == [[0, 3]]


class _GatedFile(FileDevice):
    """An image file whose flushes are counted and, while `gate` is clear, held back."""

    def __init__(self, path: str, writable: bool) -> None:
        super().__init__(path, writable=writable)
        self.flushes = 0
        self.gate = threading.Event()
        self.gate.set()

    def flush(self) -> None:
        self.flushes += 1
        self.gate.wait(60)
        super().flush()


def test_concurrent_origin_writes_share_one_copy_out_commit(tmp_path: Path) -> None:
    """Origin writes that need copy-outs while a batch is committing wait for the next batch,
    and that batch copies all their chunks with one commit (one data flush, one area write,
    one flush) before any of them reaches the origin."""
    files: dict[str, _GatedFile] = {}

    def opener(path: str, writable: bool) -> FileDevice:
        files[Path(path).name] = _GatedFile(path, writable)
        return files[Path(path).name]

    engine = Engine(file_opener=opener)
    origin = image(tmp_path / "origin.img", 4 * MiB, pattern(2, 4 * MiB))
    cow = image(tmp_path / "cow.img", 2 * MiB)
    sectors = 4 * MiB // 512
    engine.create("base-real", f"0 {sectors} linear {origin} 0")
    engine.create("base", f"0 {sectors} snapshot-origin /dev/mapper/base-real")
    engine.suspend("base")
    engine.create("snap", f"0 {sectors} snapshot /dev/mapper/base-real {cow} P 8")
    engine.resume("base")
    base = engine.device("base")
    original = base.read(0, 4 * MiB)
    cow_file = files["cow.img"]
    group = base.live.targets[0].group
    try:
        cow_file.flushes = 0
        cow_file.gate.clear()
        first = threading.Thread(target=base.write, args=(0, pattern(3, 4 * KiB)))
        first.start()
        deadline = time.monotonic() + 30
        while cow_file.flushes == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        others = [threading.Thread(target=base.write, args=((10 + i) * 8 * KiB,
                                                             pattern(4 + i, 4 * KiB)))
                  for i in range(8)]
        for t in others:
            t.start()
        while len(group.batches.waiting) < 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(group.batches.waiting) == 8
        assert base.read(10 * 8 * KiB, 4 * KiB) == original[10 * 8 * KiB: 10 * 8 * KiB + 4 * KiB]
        cow_file.gate.set()
        for t in [first, *others]:
            t.join(60)
        assert cow_file.flushes == 4                      # two batches, two flushes each
        after = base.read(0, 4 * MiB)
        for i in range(8):
            at = (10 + i) * 8 * KiB
            assert after[at: at + 4 * KiB] == pattern(4 + i, 4 * KiB)
        assert engine.device("snap").read(0, 4 * MiB) == original
        engine.settle()
        assert engine.status("snap").split()[3] == f"{(2 + 9) * 8}/{2 * MiB // 512}"
    finally:
        cow_file.gate.set()
        engine.shutdown()
