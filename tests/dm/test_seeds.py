"""The seed documents' dmsetup sequences, run verbatim through `blockera dmsetup`, `blockera dd`
and `blockera era` against the engine daemon, with image files standing in for disks."""

from __future__ import annotations

import re
from pathlib import Path

from blockera.blockdev import FileDevice
from blockera.era.check import check_era_metadata
from tests.conftest import DaemonProcess, sparse_file


def _era(status: str) -> int:
    return int(status.split()[5])


def test_seed_000_era_tutorial(daemon: DaemonProcess, tmp_path: Path) -> None:
    sdb = sparse_file(tmp_path / "sdb.img", 256 << 20)   # /dev/sdb: metadata disk
    sdc = sparse_file(tmp_path / "sdc.img", 256 << 20)   # /dev/sdc: origin
    d = daemon.run
    # Minimal setup
    d("dmsetup", "create", "era-meta", "--table", f"0 256 linear {sdb} 0")
    d("dmsetup", "create", "era", "--table", f"0 524288 era /dev/mapper/era-meta {sdc} 4096")
    d("dmsetup", "create", "era-access", "--table", "0 256 linear /dev/mapper/era-meta 0")
    assert d("dmsetup", "status", "era").stdout == "0 524288 era 8 9/32 1 -\n"
    assert d("dmsetup", "table", "era").stdout == f"0 524288 era 253:0 {sdc} 4096\n"
    d("dmsetup", "message", "era", "0", "take_metadata_snap")
    dump = d("era", "dump", "/dev/mapper/era-access").stdout
    assert dump.startswith('<superblock uuid="" block_size="4096" nr_blocks="128" '
                           'current_era="2">\n')
    assert _era(d("dmsetup", "status", "era").stdout) == 2
    d("dmsetup", "message", "era", "0", "drop_metadata_snap")
    d("dmsetup", "message", "era", "0", "take_metadata_snap")
    assert d("era", "invalidate", "--written-since", "1",
             "/dev/mapper/era-access").stdout == "<blocks>\n</blocks>\n"
    d("dmsetup", "message", "era", "0", "drop_metadata_snap")
    d("dd", "if=/dev/urandom", "of=/dev/mapper/era", "bs=1M", "seek=60", "count=40")
    # the tutorial drops again here; there is no snapshot held, so this fails as in the kernel
    again = d("dmsetup", "message", "era", "0", "drop_metadata_snap", check=False)
    assert again.returncode == 1
    assert again.stderr.startswith("device-mapper: message ioctl on era failed: "
                                   "Invalid argument")
    d("dmsetup", "message", "era", "0", "take_metadata_snap")
    assert d("era", "invalidate", "--written-since", "1", "/dev/mapper/era-access").stdout == \
        '<blocks>\n  <range begin="30" end = "50"/>\n</blocks>\n'
    status = d("dmsetup", "status", "era").stdout
    assert re.fullmatch(r"0 524288 era 8 \d+/32 4 \d+\n", status)
    assert d("era", "invalidate", "--written-since", "3", "/dev/mapper/era-access").stdout == \
        '<blocks>\n  <range begin="30" end = "50"/>\n</blocks>\n'
    d("dmsetup", "message", "era", "0", "drop_metadata_snap")
    # the data went through to the origin
    assert (tmp_path / "sdc.img").read_bytes()[60 << 20: 100 << 20] != bytes(40 << 20)
    busy = d("dmsetup", "remove", "era-meta", check=False)
    assert busy.returncode == 1 and "Device or resource busy" in busy.stderr
    for name in ("era-access", "era", "era-meta"):
        d("dmsetup", "remove", name)
    assert d("dmsetup", "ls").stdout == "No devices found\n"
    assert check_era_metadata(FileDevice(sdb, writable=False)).ok


def test_seed_001_checkpoint_take_drop(daemon: DaemonProcess, tmp_path: Path) -> None:
    meta = sparse_file(tmp_path / "meta.img", 8 << 20)
    origin = sparse_file(tmp_path / "origin.img", 64 << 20)
    d = daemon.run
    d("dmsetup", "create", "era", input=f"0 131072 era {meta} {origin} 128\n")
    d("dd", "if=/dev/zero", "of=/dev/mapper/era", "bs=64k", "seek=10", "count=2", "status=none")
    # Taking a vendor snapshot: checkpoint, note the era
    d("dmsetup", "message", "era", "0", "checkpoint")
    noted = _era(d("dmsetup", "status", "era").stdout)
    assert noted == 2
    d("dd", "if=/dev/zero", "of=/dev/mapper/era", "bs=64k", "seek=100", "count=3", "status=none")
    # Rolling back: take a metadata snapshot, ask which blocks were written since the era
    d("dmsetup", "message", "era", "0", "take_metadata_snap")
    assert _era(d("dmsetup", "status", "era").stdout) == 3
    held = d("dmsetup", "status", "era").stdout.split()[6]
    assert held != "-"
    out = d("era", "invalidate", "--written-since", str(noted), "--metadata-snapshot",
            "--json", str(meta)).stdout
    assert '"ranges": [[100, 103]]' in out
    d("dmsetup", "message", "era", "0", "drop_metadata_snap")
    assert d("dmsetup", "status", "era").stdout.split()[6] == "-"
    d("dmsetup", "remove", "era")


def test_daemon_shutdown_commits_metadata(tmp_path: Path) -> None:
    meta = sparse_file(tmp_path / "meta.img", 8 << 20)
    origin = sparse_file(tmp_path / "origin.img", 64 << 20)
    d = DaemonProcess(tmp_path / "engine.sock")
    try:
        d.run("dmsetup", "create", "era", "--table", f"0 131072 era {meta} {origin} 128")
        d.run("dd", "if=/dev/zero", "of=/dev/mapper/era", "bs=64k", "seek=7", "count=1",
              "status=none")
    finally:
        assert d.stop() == 0
    assert not (tmp_path / "engine.sock").exists()
    from blockera.era.image import EraImage

    image = EraImage(FileDevice(meta, writable=False))
    assert image.current_writeset() is None, "shutdown archives the current writeset"
    assert image.changed_since(1)[7]


def test_dmsetup_errors(daemon: DaemonProcess, tmp_path: Path) -> None:
    meta = sparse_file(tmp_path / "meta.img", 8 << 20)
    origin = sparse_file(tmp_path / "origin.img", 64 << 20)
    r = daemon.run("dmsetup", "create", "era", "--table", f"0 131072 era {meta} {origin} 7",
                   check=False)
    assert r.returncode == 1
    assert r.stderr == ("device-mapper: reload ioctl on era failed: Invalid argument "
                        "(era: Invalid block size)\nCommand failed.\n")
    r = daemon.run("dmsetup", "status", "nothere", check=False)
    assert r.returncode == 1 and "nothere" in r.stderr
    r = daemon.run("dmsetup", "create", "x", check=False, input="0 8 bogus\n")
    assert r.returncode == 1 and "unknown target type 'bogus'" in r.stderr
    r = daemon.run("era", "invalidate", "--written-since", "1", "/dev/mapper/nothere",
                   check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
