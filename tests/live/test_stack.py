"""track / activate / untrack / frozen views / replication / marks on the userspace engine
(in-process), with image files for disks."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from blockera.engine.userspace import Engine
from blockera.errors import NoSpaceError, UsageError
from blockera.live import engines
from blockera.live.frozen import frozen_view
from blockera.live.marks import changed_since_mark, mark
from blockera.live.replicate import replicate_once
from blockera.live.stack import activate, track, untrack
from blockera.live.state import StateDir
from tests.conftest import sparse_file

MiB = 1 << 20
BLOCK_SECTORS = 128            # 64 KiB era blocks


@pytest.fixture
def engine():
    e = Engine()
    yield e
    e.shutdown()


@pytest.fixture
def disks(tmp_path: Path) -> dict[str, Path]:
    pv = tmp_path / "pv.img"
    pv.write_bytes(os.urandom(16 * MiB))
    return {"pv": pv, "meta": sparse_file(tmp_path / "meta.img", 4 * MiB),
            "state": tmp_path / "state", "scratch": tmp_path}


def _lv(engine: Engine, pv: Path) -> None:
    """An LVM-style volume: a linear device over part of a PV."""
    engine.create("vg-lv", f"0 {8 * MiB // 512} linear {pv} 2048")


def _write(engine: Engine, name: str, offset: int, data: bytes) -> None:
    engine.device(name).write(offset, data)


def test_track_a_dm_device_in_place_and_untrack(engine: Engine, disks) -> None:
    _lv(engine, disks["pv"])
    before = engine.device("vg-lv").read(0, 8 * MiB)
    state = StateDir(disks["state"])
    record = track(engine, state, "/dev/mapper/vg-lv", str(disks["meta"]),
                   engine_kind="userspace", block_sectors=BLOCK_SECTORS)
    assert record.kind == "dm" and state.exists("vg-lv")
    assert engines.table_lines(engine, "vg-lv")[0][2] == "era"
    assert engines.table_lines(engine, "vg-lv-real")[0][2] == "linear"
    assert engine.device("vg-lv").read(0, 8 * MiB) == before     # same data, now tracked
    _write(engine, "vg-lv", 3 * 65536, b"x" * 65536)
    untrack(engine, state, state.load("vg-lv"))
    assert engines.table_lines(engine, "vg-lv")[0][2] == "linear"
    assert not engines.exists(engine, "vg-lv-real") and not state.exists("vg-lv")
    assert engine.device("vg-lv").read(3 * 65536, 65536) == b"x" * 65536


def test_refusals_touch_nothing(engine: Engine, disks, tmp_path: Path) -> None:
    _lv(engine, disks["pv"])
    state = StateDir(disks["state"])
    small = sparse_file(tmp_path / "small.img", 8192)
    with pytest.raises(NoSpaceError, match="metadata device too small"):
        track(engine, state, "/dev/mapper/vg-lv", str(small), engine_kind="userspace",
              block_sectors=BLOCK_SECTORS)
    used = tmp_path / "used.img"
    used.write_bytes(b"\1" * 4 * MiB)
    with pytest.raises(UsageError, match="holds data"):
        track(engine, state, "/dev/mapper/vg-lv", str(used), engine_kind="userspace",
              block_sectors=BLOCK_SECTORS)
    engine.create("vg-lv-real", "0 8 zero")           # in use by another stack
    with pytest.raises(UsageError, match="in use by another stack"):
        track(engine, state, "/dev/mapper/vg-lv", str(disks["meta"]), engine_kind="userspace",
              block_sectors=BLOCK_SECTORS)
    assert engines.table_lines(engine, "vg-lv")[0][2] == "linear"
    assert state.names() == []


def test_frozen_view_sees_the_moment_and_lists_every_change(engine: Engine, disks) -> None:
    _lv(engine, disks["pv"])
    state = StateDir(disks["state"])
    record = track(engine, state, "/dev/mapper/vg-lv", str(disks["meta"]),
                   engine_kind="userspace", block_sectors=BLOCK_SECTORS)
    start = record.era_at_track
    _write(engine, "vg-lv", 5 * 65536, b"a" * 65536)
    with frozen_view(engine, record, scratch_dir=str(disks["scratch"])) as view:
        frozen = view.device.read(0, 8 * MiB)
        assert view.changed_ranges_bytes(start) == [(5 * 65536, 6 * 65536)]
        _write(engine, "vg-lv", 5 * 65536, b"b" * 65536)      # after the freeze
        _write(engine, "vg-lv", 9 * 65536, b"c" * 65536)
        assert view.device.read(0, 8 * MiB) == frozen         # the view does not move
        next_era = view.next_era
    assert not engines.exists(engine, "vg-lv-snap") and not engines.exists(engine, "vg-lv-origin")
    assert engine.device("vg-lv").read(5 * 65536, 65536) == b"b" * 65536
    with frozen_view(engine, record, scratch_dir=str(disks["scratch"])) as view:
        assert view.changed_ranges_bytes(next_era) == [(5 * 65536, 6 * 65536),
                                                       (9 * 65536, 10 * 65536)]


def test_replication_rounds_keep_the_mirror_exact(engine: Engine, disks, tmp_path: Path) -> None:
    _lv(engine, disks["pv"])
    state = StateDir(disks["state"])
    record = track(engine, state, "/dev/mapper/vg-lv", str(disks["meta"]),
                   engine_kind="userspace", block_sectors=BLOCK_SECTORS)
    mirror = tmp_path / "mirror.img"
    first = replicate_once(engine, state, record, str(mirror), scratch_dir=str(tmp_path))
    assert first.full and first.bytes_copied == 8 * MiB
    assert mirror.read_bytes() == engine.device("vg-lv").read(0, 8 * MiB)
    rng = np.random.default_rng(1)
    for _ in range(3):
        for block in rng.choice(128, 5, replace=False).tolist():
            _write(engine, "vg-lv", block * 65536, os.urandom(65536))
        round_ = replicate_once(engine, state, record, str(mirror), scratch_dir=str(tmp_path))
        assert not round_.full and round_.bytes_copied <= 5 * 65536
        assert round_.verified_blocks >= 1
        assert mirror.read_bytes() == engine.device("vg-lv").read(0, 8 * MiB)
    # a mirror changed behind our back is caught by the sample (here: every block differs)
    mirror.write_bytes(bytes(8 * MiB))
    fixed = replicate_once(engine, state, record, str(mirror), scratch_dir=str(tmp_path),
                           verify_percent=100)
    assert fixed.full and "differs" in fixed.reason
    assert mirror.read_bytes() == engine.device("vg-lv").read(0, 8 * MiB)
    wrong = tmp_path / "wrong.img"
    wrong.write_bytes(bytes(MiB))
    with pytest.raises(UsageError, match="same size"):
        replicate_once(engine, state, record, str(wrong), scratch_dir=str(tmp_path))


def test_marks_give_exactly_the_blocks_written_after(engine: Engine, disks) -> None:
    _lv(engine, disks["pv"])
    state = StateDir(disks["state"])
    record = track(engine, state, "/dev/mapper/vg-lv", str(disks["meta"]),
                   engine_kind="userspace", block_sectors=BLOCK_SECTORS)
    _write(engine, "vg-lv", 1 * 65536, b"1" * 65536)          # before the mark
    mark(engine, state, record, "vendor-snap")
    _write(engine, "vg-lv", 7 * 65536, b"7" * 512)
    _write(engine, "vg-lv", 20 * 65536, b"2" * 2 * 65536)
    result = changed_since_mark(engine, record, "vendor-snap")
    assert result.ranges == [(7, 8), (20, 22)]
    assert result.byte_ranges() == [(7 * 65536, 8 * 65536), (20 * 65536, 22 * 65536)]
    with pytest.raises(UsageError, match="no mark 'nope'"):
        changed_since_mark(engine, record, "nope")


def test_activate_after_a_restart_and_continuity(engine: Engine, disks) -> None:
    _lv(engine, disks["pv"])
    state = StateDir(disks["state"])
    track(engine, state, "/dev/mapper/vg-lv", str(disks["meta"]), engine_kind="userspace",
          block_sectors=BLOCK_SECTORS)
    engine.shutdown()                                          # "reboot"
    restarted = Engine()
    try:
        _lv(restarted, disks["pv"])                            # LVM brings the volume back
        record = state.load("vg-lv")
        notes = activate(restarted, state, record)
        assert notes[-1].startswith("vg-lv: activated")
        assert state.load("vg-lv").epoch == 1                  # nothing lost
        assert activate(restarted, state, state.load("vg-lv"))[-1].startswith("vg-lv: active")
        untrack(restarted, state, state.load("vg-lv"))
        # metadata replaced by a blank one: tracking restarts in a new epoch
        track(restarted, state, "/dev/mapper/vg-lv", str(disks["meta"]),
              engine_kind="userspace", block_sectors=BLOCK_SECTORS, force=True)
        record = state.load("vg-lv")
        record.highest_era_seen = 50                           # as if era 50 had been seen
        state.save(record)
    finally:
        restarted.shutdown()
    again = Engine()
    try:
        _lv(again, disks["pv"])
        notes = activate(again, state, state.load("vg-lv"))
        assert any("went backwards" in n for n in notes)
        assert state.load("vg-lv").epoch == 2
    finally:
        again.shutdown()


def test_replication_to_an_nbd_mirror(engine: Engine, disks, tmp_path: Path) -> None:
    from blockera.blockdev import FileDevice
    from blockera.nbd import Export, serve

    _lv(engine, disks["pv"])
    state = StateDir(disks["state"])
    record = track(engine, state, "/dev/mapper/vg-lv", str(disks["meta"]),
                   engine_kind="userspace", block_sectors=BLOCK_SECTORS)
    mirror = sparse_file(tmp_path / "remote.img", 8 * MiB)
    server = serve({"mirror": Export(FileDevice(mirror))}, unix_path=tmp_path / "nbd.sock")
    try:
        uri = f"nbd+unix:///mirror?socket={tmp_path / 'nbd.sock'}"
        assert replicate_once(engine, state, record, uri, scratch_dir=str(tmp_path)).full
        _write(engine, "vg-lv", 12 * 65536, os.urandom(65536))
        second = replicate_once(engine, state, record, uri, scratch_dir=str(tmp_path))
        assert not second.full and second.bytes_copied == 65536
    finally:
        server.shutdown()
    assert mirror.read_bytes() == engine.device("vg-lv").read(0, 8 * MiB)
