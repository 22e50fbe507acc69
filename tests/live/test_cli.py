"""The live-device commands through the engine daemon, as an operator runs them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

from tests.conftest import DaemonProcess, sparse_file

MiB = 1 << 20


def test_track_replicate_mark_invalidate_status_untrack(daemon: DaemonProcess,
                                                         tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(16 * MiB))
    meta = sparse_file(tmp_path / "disk-era.img", 4 * MiB)
    state = ["--state-dir", str(tmp_path / "state")]
    sock = ["--socket", str(daemon.socket_path)]
    daemon.run("track", str(disk), "--metadata", str(meta), "--block-size", "128", *state, *sock)
    daemon.run("dd", "if=/dev/urandom", "of=/dev/mapper/disk", "bs=64k", "seek=3", "count=2",
               "status=none")
    mirror = tmp_path / "mirror.img"
    first = json.loads(daemon.run("replicate", "/dev/mapper/disk", str(mirror), "--json",
                                  *state).stdout)
    assert first["full"] and first["bytes_copied"] == 16 * MiB
    assert mirror.read_bytes() == disk.read_bytes()
    daemon.run("mark", "before", "/dev/mapper/disk", *state)
    daemon.run("dd", "if=/dev/urandom", "of=/dev/mapper/disk", "bs=64k", "seek=40", "count=1",
               "status=none")
    result = json.loads(daemon.run("invalidate", "--since-mark", "before", "--json",
                                   "/dev/mapper/disk", *state).stdout)
    assert result["ranges"] == [[40, 41]] and result["sector_ranges"] == [[5120, 5248]]
    plain = daemon.run("invalidate", "--since-mark", "before", "--units", "bytes",
                       "/dev/mapper/disk", *state).stdout
    assert plain == f"{40 * 65536} {41 * 65536}\n"
    second = json.loads(daemon.run("replicate", "/dev/mapper/disk", str(mirror), "--json",
                                   *state).stdout)
    assert not second["full"] and second["bytes_copied"] == 65536
    assert mirror.read_bytes() == disk.read_bytes()
    report = json.loads(daemon.run("status", "--json", *state).stdout)
    assert report[0]["name"] == "disk" and report[0]["state"] == "active"
    assert report[0]["marks"]["before"]["changed_blocks"] == 1
    assert report[0]["mirrors"][str(mirror)]["changed_blocks"] == 0
    daemon.run("untrack", "/dev/mapper/disk", *state)
    assert "No devices found" in daemon.run("dmsetup", "ls").stdout


def test_replicate_resumes_after_kill(daemon: DaemonProcess, tmp_path: Path) -> None:
    """kill -9 in the middle of rounds: the device is always usable and the next round makes
    the mirror exact."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(64 * MiB))
    meta = sparse_file(tmp_path / "era.img", 4 * MiB)
    state = ["--state-dir", str(tmp_path / "state")]
    daemon.run("track", str(disk), "--metadata", str(meta), "--block-size", "128", *state)
    mirror = tmp_path / "mirror.img"
    for delay in (0.05, 0.2, 0.5, 1.0):
        daemon.run("dd", "if=/dev/urandom", "of=/dev/mapper/disk", "bs=64k",
                   f"seek={int(delay * 100)}", "count=4", "status=none")
        proc = subprocess.Popen(["blockera", "replicate", "/dev/mapper/disk", str(mirror),
                                 *state], env=daemon.env, stderr=subprocess.PIPE)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        daemon.run("dd", "if=/dev/mapper/disk", "of=/dev/null", "bs=1M", "count=1",
                   "status=none")                               # still usable
    daemon.run("replicate", "/dev/mapper/disk", str(mirror), *state)
    assert mirror.read_bytes() == disk.read_bytes()
    listing = daemon.run("dmsetup", "ls").stdout
    assert "disk-snap" not in listing and "disk-origin" not in listing
