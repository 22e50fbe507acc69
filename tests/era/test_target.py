"""The era target in the userspace engine, against the kernel's recorded behaviour
(docs/era.md §3)."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from blockera.blockdev import FileDevice
from blockera.blocking import waits_announced_to
from blockera.engine.userspace import Engine
from blockera.errors import NoSpaceError, TableError, TargetError
from blockera.era.check import check_era_metadata
from blockera.era.image import EraImage
from blockera.era.metadata import EraMetadata
from blockera.era.superblock import Superblock
from tests.write_log import WriteLogDevice
from tests.conftest import sparse_file

BLOCK = 64 << 10     # 128 sectors


@pytest.fixture
def disks(tmp_path: Path) -> tuple[Path, Path]:
    return sparse_file(tmp_path / "meta.img", 8 << 20), sparse_file(tmp_path / "origin.img", 32 << 20)


@pytest.fixture
def engine() -> Engine:
    e = Engine()
    yield e
    e.shutdown()


def _era(engine: Engine, meta: Path, origin: Path, sectors: int = 65536, bs: int = 128) -> None:
    engine.create("era", f"0 {sectors} era {meta} {origin} {bs}")


def _write(engine: Engine, *blocks: int, block_bytes: int = BLOCK) -> None:
    for b in blocks:
        engine.device("era").write(b * block_bytes, os.urandom(block_bytes))


def _status(engine: Engine) -> str:
    engine.settle()
    status = engine.status("era").strip().split(" era ", 1)[1]
    engine.settle()
    return status


def test_kernel_trace_character_for_character(engine: Engine, disks) -> None:
    """§12: 8 MiB metadata, 512 x 64 KiB blocks; one bio per block written, a status after
    each step. Includes the metadata snapshot's block number, so block placement must be the
    kernel's too."""
    meta, origin = disks
    _era(engine, meta, origin)
    trace = [_status(engine)]
    _write(engine, 3, 200, 201)
    trace.append(_status(engine))
    engine.message("era", 0, ["checkpoint"])
    trace.append(_status(engine))
    _write(engine, 5, 3)
    trace.append(_status(engine))
    engine.message("era", 0, ["take_metadata_snap"])
    trace.append(_status(engine))
    live = Superblock.unpack(FileDevice(meta, writable=False).read(0, 4096))
    _write(engine, 7)
    trace.append(_status(engine))
    engine.message("era", 0, ["drop_metadata_snap"])
    trace.append(_status(engine))
    engine.message("era", 0, ["CHECKPOINT"])
    trace.append(_status(engine))
    assert trace == ["8 9/2048 1 -", "8 9/2048 1 -", "8 11/2048 2 -", "8 9/2048 2 -",
                     "8 12/2048 3 48", "8 15/2048 3 48", "8 9/2048 3 -", "8 11/2048 4 -"]
    # §9.2: the live superblock right after take_metadata_snap
    sm = live.space_map_root
    assert (sm.nr_blocks, sm.nr_allocated, sm.bitmap_root, sm.ref_count_root) == (2048, 12, 49, 2)
    assert (live.current_writeset.nr_bits, live.current_writeset.root) == (512, 44)
    assert (live.writeset_tree_root, live.era_array_root, live.metadata_snap) == (42, 33, 48)
    assert engine.table("era") == f"0 65536 era {meta} {origin} 128\n"


@pytest.mark.parametrize("args, error", [
    ("{m} {o}", "Invalid argument count"),
    ("{m} {o} 128 9", "Invalid argument count"),
    ("{m} {o} 128k", "Error parsing block size"),
    ("{m} {o} 7", "Invalid block size"),
    ("{m} {o} 0", "Invalid block size"),
    ("/nonexistent {o} 128", "Error opening metadata device"),
    ("{m} /nonexistent 128", "Error opening data device"),
])
def test_constructor_errors(engine: Engine, disks, args: str, error: str) -> None:
    meta, origin = disks
    with pytest.raises(TableError, match=error):
        engine.create("era", f"0 65536 era {args.format(m=meta, o=origin)}")


def test_metadata_from_another_block_size(engine: Engine, disks) -> None:
    meta, origin = disks
    _era(engine, meta, origin)
    engine.remove("era")
    with pytest.raises(TableError, match=r"Error reading metadata \(changing the data block "
                                         r"size \(from 128 to 256\) is not supported\)"):
        _era(engine, meta, origin, bs=256)
    meta.write_bytes(b"garbage" + bytes(4089) + bytes(meta.stat().st_size - 4096))
    with pytest.raises(TableError, match="Error reading metadata"):
        _era(engine, meta, origin)


def test_messages(engine: Engine, disks) -> None:
    meta, origin = disks
    _era(engine, meta, origin)
    with pytest.raises(TargetError, match="unsupported message 'bogus'"):
        engine.message("era", 0, ["bogus"])
    with pytest.raises(TargetError, match="incorrect number of message arguments"):
        engine.message("era", 0, ["checkpoint", "now"])
    with pytest.raises(TargetError, match="no snap to drop"):
        engine.message("era", 0, ["drop_metadata_snap"])
    engine.message("era", 0, ["Take_Metadata_Snap"])
    with pytest.raises(TargetError, match="metadata snapshot already exists"):
        engine.message("era", 0, ["take_metadata_snap"])
    assert _status(engine).split()[2] == "2"


def _era_number(engine: Engine) -> int:
    return int(_status(engine).split()[2])


def test_era_numbering(engine: Engine, disks, tmp_path: Path) -> None:
    """§11.12: which events advance the era."""
    meta, origin = disks
    _era(engine, meta, origin)
    seen = [_era_number(engine)]
    _write(engine, 1)
    seen.append(_era_number(engine))
    engine.message("era", 0, ["checkpoint"])
    seen.append(_era_number(engine))
    engine.message("era", 0, ["take_metadata_snap"])
    seen.append(_era_number(engine))
    engine.message("era", 0, ["drop_metadata_snap"])
    seen.append(_era_number(engine))
    engine.suspend("era")
    with pytest.raises(TargetError, match="suspended"):
        engine.status("era")
    engine.resume("era")
    seen.append(_era_number(engine))
    engine.load("era", f"0 65536 era {meta} {origin} 128")
    engine.resume("era")
    seen.append(_era_number(engine))
    engine.remove("era")
    _era(engine, meta, origin)
    seen.append(_era_number(engine))
    assert seen == [1, 1, 2, 3, 3, 4, 5, 6]
    # a crash: metadata copied while the device is live, then loaded and resumed
    _write(engine, 9, 10)
    crashed_era = _era_number(engine)
    crashed = tmp_path / "crashed.img"
    shutil.copy(meta, crashed)
    other = Engine()
    try:
        other.create("era", f"0 65536 era {crashed} {origin} 128")
        assert int(other.status("era").split()[5]) == crashed_era + 1
    finally:
        other.shutdown()
    image = EraImage(FileDevice(crashed, writable=False))
    assert {9, 10} <= set(np.flatnonzero(image.changed_since(crashed_era)).tolist())


def test_resize_grow_and_shrink(engine: Engine, disks) -> None:
    """§11.11: 512 -> 513 -> 1024 -> 256 blocks; new blocks start at era 0."""
    meta, origin = disks
    _era(engine, meta, origin)
    _write(engine, 511)
    for sectors in (65544, 131072, 32768):
        engine.load("era", f"0 {sectors} era {meta} {origin} 128")
        engine.resume("era")
        engine.message("era", 0, ["checkpoint"])
    engine.suspend("era")
    image = EraImage(FileDevice(meta, writable=False))
    assert image.nr_blocks == 256
    engine.resume("era")
    engine.load("era", f"0 65536 era {meta} {origin} 128")
    engine.resume("era")
    engine.suspend("era")
    report = check_era_metadata(FileDevice(meta, writable=False))
    assert report.ok, report.lines()
    logical = EraImage(FileDevice(meta, writable=False)).logical_eras()
    # block 511 was cut off by the shrink to 256: it comes back as era 0, or as era 1 if its
    # writeset was still waiting to be digested when the device grew again (§11.11)
    assert len(logical) == 512 and logical[511] in (0, 1) and not logical[:511].any()


def test_reads_do_not_mark_and_discards_mark_every_block(engine: Engine, disks) -> None:
    meta, origin = disks
    _era(engine, meta, origin)
    engine.device("era").read(0, 10 * BLOCK)
    engine.device("era").discard(70 * BLOCK, 10 * BLOCK)
    engine.device("era").write_zeroes(100 * BLOCK + 512, 2 * BLOCK)
    engine.message("era", 0, ["take_metadata_snap"])
    image = EraImage(FileDevice(meta, writable=False), use_snapshot=True)
    changed = set(np.flatnonzero(image.changed_since(1)).tolist())
    assert changed == set(range(70, 80)) | {100, 101, 102}


def test_metadata_full_fails_writes_and_keeps_what_was_tracked(engine: Engine,
                                                               tmp_path: Path) -> None:
    """A full metadata device fails the writes that need a new mark, loses nothing already
    tracked, and recovers once space is freed (here: by dropping the metadata snapshot)."""
    from blockera.era.size import metadata_size

    size = metadata_size(65536, 8)
    meta = sparse_file(tmp_path / "meta.img", (size.with_snapshot_blocks + 8) * 4096)
    origin = sparse_file(tmp_path / "origin.img", 32 << 20)
    engine.create("era", f"0 65536 era {meta} {origin} 8")
    dev = engine.device("era")
    engine.message("era", 0, ["take_metadata_snap"])
    tracked: list[int] = []
    with pytest.raises(NoSpaceError, match="era: cannot record the write"):
        for i in range(2000):
            dev.write(i * 4096, b"\x02" * 4096)
            tracked.append(i)
            if i % 3 == 2:
                engine.message("era", 0, ["checkpoint"])
    failed = tracked[-1] + 1
    assert dev.read(0, 4096) == b"\x02" * 4096
    assert dev.read(failed * 4096, 4096) == bytes(4096), "a failed write must not reach the origin"
    engine.settle()
    engine.message("era", 0, ["drop_metadata_snap"])
    dev.write(failed * 4096, b"\x04" * 4096)
    tracked.append(failed)
    engine.suspend("era")
    report = check_era_metadata(FileDevice(meta, writable=False))
    assert report.ok, report.lines()
    image = EraImage(FileDevice(meta, writable=False))
    assert set(tracked) <= set(np.flatnonzero(image.changed_since(0)).tolist())


def test_a_first_write_announces_its_wait_and_a_write_to_a_marked_block_does_not(
        engine: Engine, disks) -> None:
    _era(engine, *disks)
    dev = engine.device("era")
    announced: list[str] = []
    for label in ("first", "again"):
        with waits_announced_to(lambda: announced.append(label)):
            dev.write(3 * BLOCK, os.urandom(BLOCK))
    assert announced == ["first"]


def test_concurrent_first_writes_share_commits(tmp_path: Path) -> None:
    meta = sparse_file(tmp_path / "meta.img", 8 << 20)
    origin = sparse_file(tmp_path / "origin.img", 64 << 20)
    log: list = []

    def opener(path: str, writable: bool):
        dev = FileDevice(path, writable=True)
        return WriteLogDevice(dev, log, tag=Path(path).name) if path.endswith("meta.img") else dev

    engine = Engine(file_opener=opener)
    try:
        engine.create("era", f"0 131072 era {meta} {origin} 8")
        before = sum(1 for tag, rec in log if rec.kind == "write" and rec.offset_bytes == 0)
        dev = engine.device("era")
        nr_threads, per_thread = 8, 40

        def worker(t: int) -> None:
            for i in range(per_thread):
                dev.write((t * per_thread + i) * 4096, b"\x05" * 4096)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(nr_threads)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        commits = sum(1 for tag, rec in log if rec.kind == "write" and rec.offset_bytes == 0) - before
        assert commits < nr_threads * per_thread
    finally:
        engine.shutdown()


def _submit(dev, block: int, done: list) -> None:
    dev.submit_write(block * BLOCK, os.urandom(BLOCK), lambda error: done.append((block, error)))


def _gathering_device(engine: Engine, disks, monkeypatch: pytest.MonkeyPatch,
                      expected: int, commit_s: float):
    """An era device whose worker acts as if its last pass took `expected` submitted writes
    and its commit `commit_s` seconds (no cap on the gathering wait)."""
    import blockera.era.target as era_target
    monkeypatch.setattr(era_target, "_GATHER_MAX_S", 30.0)
    _era(engine, *disks)
    dev = engine.device("era")
    worker = dev.find_target(0).worker
    with worker.cv:
        worker.expected, worker.commit_s = expected, commit_s
    return dev, worker


def test_the_worker_gathers_as_many_submitted_writes_as_its_last_pass_took(
        engine: Engine, disks, monkeypatch: pytest.MonkeyPatch) -> None:
    dev, worker = _gathering_device(engine, disks, monkeypatch, expected=3, commit_s=40.0)
    done: list = []
    _submit(dev, 1, done)
    time.sleep(0.3)
    assert done == []           # held back for the others a client has in flight
    _submit(dev, 2, done)
    _submit(dev, 3, done)
    deadline = time.monotonic() + 10
    while len(done) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(done) == [(1, None), (2, None), (3, None)]
    assert worker.expected == 3


def test_gathering_waits_a_share_of_the_last_commit_at_most(
        engine: Engine, disks, monkeypatch: pytest.MonkeyPatch) -> None:
    # the last commit took 1.2 s: wait up to 0.3 s for a second write
    dev, worker = _gathering_device(engine, disks, monkeypatch, expected=2, commit_s=1.2)
    done: list = []
    started = time.monotonic()
    _submit(dev, 1, done)
    while not done and time.monotonic() < started + 10:
        time.sleep(0.01)
    assert done == [(1, None)]
    assert 0.25 <= time.monotonic() - started < 5
    assert worker.expected == 1     # the next pass expects what this one took


def test_a_pass_failing_on_a_bug_fails_every_write_it_took_and_hangs_none(
        engine: Engine, disks, monkeypatch: pytest.MonkeyPatch) -> None:
    _era(engine, *disks)
    dev = engine.device("era")
    started = threading.Event()
    release = threading.Event()

    def broken(self, blocks):
        started.set()
        assert release.wait(30)       # the writes of the other threads queue meanwhile
        raise RuntimeError("a bug")

    monkeypatch.setattr(EraMetadata, "writeset_set_many", broken)
    errors: list[BaseException] = []

    def write(block: int) -> None:
        try:
            dev.write(block * BLOCK, os.urandom(BLOCK))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(b,), daemon=True) for b in range(6)]
    threads[0].start()
    assert started.wait(10)
    for th in threads[1:]:
        th.start()
    wait_for = time.monotonic() + 10
    worker = engine.device("era").find_target(0).worker
    while len(worker.marks) < 5 and \
            time.monotonic() < wait_for:
        time.sleep(0.01)
    release.set()
    for th in threads:
        th.join(10)
    assert not any(th.is_alive() for th in threads)
    assert len(errors) == 6 and all("metadata pass failed" in str(e) for e in errors)
    monkeypatch.undo()
    _write(engine, 7)                 # the device goes on working


def test_reload_sees_what_the_old_table_committed_after_the_load(engine: Engine, disks) -> None:
    """A table loaded while the old one is live reads the superblock before the old table's
    later commits. Those commits free blocks that the new table's stale view still references;
    resuming on that view lost the marks set in between and reused live blocks. The new table
    reads the metadata again before it first resumes."""
    meta, origin = disks
    table = f"0 65536 era {meta} {origin} 128"
    _era(engine, meta, origin)
    _write(engine, 1, 2)
    _status(engine)
    engine.load("era", table)                 # the new instance opens the metadata now
    for block in (10, 11, 12):                # the old instance commits several times more
        engine.message("era", 0, ["checkpoint"])
        _write(engine, block, block + 100)
        _status(engine)
    engine.resume("era")
    for block in (20, 21):
        _write(engine, block)
        engine.message("era", 0, ["checkpoint"])
    engine.suspend("era")
    report = check_era_metadata(FileDevice(meta, writable=False))
    assert report.ok, report.lines()
    changed = np.flatnonzero(EraImage(FileDevice(meta, writable=False)).changed_since(1))
    assert set(changed.tolist()) == {1, 2, 10, 11, 12, 110, 111, 112, 20, 21}
