"""The engine's device life cycle, stacking and the simple targets."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from blockera.engine.userspace import Engine
from blockera.dm.table import parse_table
from blockera.errors import DeviceError, DeviceMapperError, TableError
from tests.conftest import sparse_file


@pytest.fixture
def engine() -> Engine:
    e = Engine()
    yield e
    e.shutdown()


def test_table_parsing() -> None:
    lines = parse_table("0 100 linear a 0\n# comment\n\n100 50 zero\n")
    assert [(l.start_sectors, l.length_sectors, l.target) for l in lines] == \
        [(0, 100, "linear"), (100, 50, "zero")]
    with pytest.raises(TableError, match="Gap in table"):
        parse_table("0 100 zero\n101 5 zero")
    with pytest.raises(TableError, match="not a whole number"):
        parse_table("0 1k zero")
    with pytest.raises(TableError, match="empty table"):
        parse_table("  \n")


def test_linear_stacking_and_reports(engine: Engine, tmp_path: Path) -> None:
    disk = sparse_file(tmp_path / "disk.img", 1 << 20)
    engine.create("low", f"0 1024 linear {disk} 1024")
    engine.create("top", "0 512 linear /dev/mapper/low 512\n512 512 zero")
    top = engine.device("top")
    top.write(0, b"\x11" * 4096)
    assert disk.read_bytes()[(1024 + 512) * 512:][:4096] == b"\x11" * 4096
    assert top.read(512 * 512, 1024) == bytes(1024)
    assert engine.table("top") == "0 512 linear 253:0 512\n512 512 zero \n"
    assert engine.status("top") == "0 512 linear \n512 512 zero \n"
    assert engine.ls() == "low\t(253:0)\ntop\t(253:1)\n"
    info = engine.info("low")
    assert "Open count:        1" in info and "Tables present:    LIVE" in info
    with pytest.raises(DeviceMapperError, match="busy"):
        engine.remove("low")
    engine.remove("top")
    engine.remove("low")
    assert engine.ls() == "No devices found\n"


def test_constructor_errors(engine: Engine, tmp_path: Path) -> None:
    disk = sparse_file(tmp_path / "disk.img", 64 * 512)
    with pytest.raises(TableError, match="too small for target"):
        engine.create("x", f"0 65 linear {disk} 0")
    with pytest.raises(TableError, match="Invalid argument count"):
        engine.create("x", f"0 8 linear {disk}")
    with pytest.raises(TableError, match="unknown target type 'nope'"):
        engine.create("x", "0 8 nope")
    with pytest.raises(TableError, match="Device lookup failed"):
        engine.create("x", "0 8 linear /dev/mapper/missing 0")
    assert engine.ls() == "No devices found\n"


def test_load_goes_live_at_resume(engine: Engine, tmp_path: Path) -> None:
    a = sparse_file(tmp_path / "a.img", 1 << 20)
    b = sparse_file(tmp_path / "b.img", 1 << 20)
    Path(b).write_bytes(b"\x22" * (1 << 20))
    engine.create("dev", f"0 2048 linear {a} 0")
    engine.load("dev", f"0 2048 linear {b} 0")
    assert "LIVE & INACTIVE" in engine.info("dev")
    assert engine.device("dev").read(0, 512) == bytes(512)
    engine.resume("dev")
    assert engine.device("dev").read(0, 512) == b"\x22" * 512
    assert "Tables present:    LIVE\n" in engine.info("dev")


def test_io_waits_while_suspended(engine: Engine, tmp_path: Path) -> None:
    disk = sparse_file(tmp_path / "disk.img", 1 << 20)
    engine.create("dev", f"0 2048 linear {disk} 0")
    engine.suspend("dev")
    assert "State:             SUSPENDED" in engine.info("dev")
    done = threading.Event()

    def writer() -> None:
        engine.device("dev").write(0, b"\x33" * 512)
        done.set()

    threading.Thread(target=writer, daemon=True).start()
    time.sleep(0.2)
    assert not done.is_set()
    engine.resume("dev")
    assert done.wait(5)
    assert Path(disk).read_bytes()[:512] == b"\x33" * 512


def test_error_and_zero_targets(engine: Engine) -> None:
    engine.create("err", "0 8 error")
    with pytest.raises(DeviceError, match="I/O error"):
        engine.device("err").read(0, 512)
    engine.create("z", "0 8 zero")
    engine.device("z").write(0, b"\x01" * 4096)
    assert engine.device("z").read(0, 4096) == bytes(4096)
    with pytest.raises(DeviceError, match="aligned"):
        engine.device("z").read(1, 512)
    with pytest.raises(DeviceError, match="beyond the end"):
        engine.device("z").read(4096, 512)
