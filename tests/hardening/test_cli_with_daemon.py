"""Commands a newcomer runs against the engine daemon: `--socket` before or after the dmsetup
command, `era restore` into an engine device, and the note on live metadata."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.conftest import DaemonProcess, sparse_file

XML = ('<superblock uuid="" block_size="8" nr_blocks="16" current_era="3">\n'
       '  <era_array>\n    <era block="4" era="2"/>\n  </era_array>\n</superblock>\n')


def test_socket_option_in_both_places(daemon: DaemonProcess) -> None:
    for args in (["dmsetup", "--socket", str(daemon.socket_path), "ls"],
                 ["dmsetup", "ls", "--socket", str(daemon.socket_path)]):
        r = subprocess.run(["blockera", *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and r.stdout == "No devices found\n", r.stderr


def test_restore_into_an_engine_device_and_the_live_metadata_note(daemon: DaemonProcess,
                                                                   tmp_path: Path) -> None:
    meta = sparse_file(tmp_path / "meta.img", 1 << 20)
    origin = sparse_file(tmp_path / "origin.img", 16 * 4096)
    (tmp_path / "in.xml").write_text(XML)
    daemon.run("dmsetup", "create", "meta", "--table", f"0 2048 linear {meta} 0")
    daemon.run("era", "restore", "-q", "-i", str(tmp_path / "in.xml"), "-o", "/dev/mapper/meta")
    daemon.run("dmsetup", "create", "era", "--table",
               f"0 128 era /dev/mapper/meta {origin} 8")
    daemon.run("dd", "if=/dev/zero", "of=/dev/mapper/era", "bs=4k", "seek=9", "count=1")
    r = daemon.run("era", "invalidate", "--json", "--written-since", "2", "/dev/mapper/meta")
    assert json.loads(r.stdout)["ranges"] == [[4, 5], [9, 10]]
    assert "can change while it is read" in r.stderr
    daemon.run("dmsetup", "message", "era", "0", "take_metadata_snap")
    r = daemon.run("era", "invalidate", "--json", "--metadata-snapshot", "--written-since",
                   "2", "/dev/mapper/meta")
    assert json.loads(r.stdout)["ranges"] == [[4, 5], [9, 10]] and r.stderr == ""
