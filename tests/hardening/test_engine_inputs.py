"""Tables and connections a careless or hostile user sends to the engine: refused at load with
the reason, never an internal error later; idle NBD connections cannot lock clients out."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from blockera.blockdev import MemoryDevice
from blockera.engine.userspace import Engine
from blockera.errors import TableError
from blockera.nbd import Export, serve
from tests.conftest import DaemonProcess, sparse_file
from tests.nbd.rawclient import RawClient


@pytest.fixture
def engine():
    e = Engine()
    yield e
    e.shutdown()


@pytest.mark.parametrize("table", [
    "0 18446744073709551616 zero",             # 2^64 sectors
    "0 18014398509481984 zero",                # 2^54 sectors: 2^63 bytes
    "0 9007199254740992 zero\n9007199254740992 9007199254740992 zero",
    "0 \u0661\u0662 zero",                      # Arabic-Indic digits
])
def test_tables_beyond_what_linux_addresses_are_refused(engine: Engine, table: str) -> None:
    with pytest.raises(TableError):
        engine.create("big", table)
    assert engine.ls() == "No devices found\n"


def test_largest_device_is_accepted(engine: Engine) -> None:
    engine.create("big", "0 18014398509481983 zero")
    assert engine.device("big").size_bytes == 18014398509481983 * 512


def test_cycles_are_refused_at_load(engine: Engine) -> None:
    engine.create("a", "0 8 zero")
    with pytest.raises(TableError, match=r"would use itself \(a -> a\)"):
        engine.load("a", "0 8 linear /dev/mapper/a 0")
    engine.create("b1", "0 8 zero")
    engine.create("b2", "0 8 linear /dev/mapper/b1 0")
    with pytest.raises(TableError, match=r"b1 -> b2 -> b1"):
        engine.load("b1", "0 8 linear /dev/mapper/b2 0")
    assert engine.device("b1").inactive is None
    engine.remove("b2")
    engine.remove("b1")                          # not held by the refused table


def test_allowed_paths_confine_the_engine(tmp_path: Path) -> None:
    (tmp_path / "ok").mkdir()
    inside = sparse_file(tmp_path / "ok" / "disk.img", 1 << 20)
    outside = sparse_file(tmp_path / "other.img", 1 << 20)
    os.symlink(outside, tmp_path / "ok" / "sneaky.img")
    e = Engine(allowed_paths=[str(tmp_path / "ok")])
    try:
        e.create("in", f"0 2048 linear {inside} 0")
        for path in (outside, tmp_path / "ok" / "sneaky.img", Path("/etc/shadow")):
            with pytest.raises(TableError, match="not inside a path this engine may open"):
                e.create("out", f"0 1 linear {path} 0")
    finally:
        e.shutdown()


def test_relative_paths_resolve_in_the_clients_directory(tmp_path: Path) -> None:
    client_dir = tmp_path / "client"
    client_dir.mkdir()
    sparse_file(client_dir / "disk.img", 1 << 20)
    d = DaemonProcess(tmp_path / "engine.sock")
    try:
        r = subprocess.run(["blockera", "dmsetup", "create", "rel", "--table",
                            "0 2048 linear disk.img 0"], cwd=client_dir, env=d.env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert d.run("dmsetup", "table", "rel").stdout.split()[3] == str(client_dir / "disk.img")
    finally:
        d.stop()


def _connect(path: Path) -> RawClient:
    while True:
        try:
            return RawClient(path, timeout_s=5)
        except BlockingIOError:                  # the listen backlog is full: let it drain
            time.sleep(0.01)


def test_idle_connections_do_not_lock_clients_out(tmp_path: Path) -> None:
    server = serve({"disk": Export(MemoryDevice(1 << 20))}, unix_path=tmp_path / "nbd.sock")
    idle = []
    try:
        while len(idle) < 160:                   # more than the connection limit
            idle.append(_connect(tmp_path / "nbd.sock"))
        started = time.monotonic()
        client = _connect(tmp_path / "nbd.sock")
        assert client.connect_export("disk")[0] == 1 << 20
        assert time.monotonic() - started < 5
        client.close()
    finally:
        for c in idle:
            c.close()
        server.shutdown()


@pytest.mark.parametrize("args", ["\u00b2", "\u0661", "18446744073709551616", "-1"])
def test_target_numbers_are_ascii_decimal(engine: Engine, tmp_path: Path, args: str) -> None:
    img = sparse_file(tmp_path / "disk.img", 1 << 20)
    with pytest.raises(TableError, match="Invalid device sector"):
        engine.create("lin", f"0 8 linear {img} {args}")
    with pytest.raises(TableError, match="block size"):
        engine.create("era", f"0 8 era {img} {img} {args}")
