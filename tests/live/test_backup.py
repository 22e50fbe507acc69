"""`blockera backup` of a tracked device on the userspace engine: consistent (read from a
snapshot while the device is written), incremental from the device's own tracking, proven
against a full read; every way tracking can be doubted ends in a full read with the reason;
kill -9 and a COW that fills up leave the device as it was and the repository unchanged."""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from blockera.engine.client import EngineClient
from tests.backup.helpers import PASSWORD, Restic, need_restic
from tests.backup.jobs import make_repo, snapshot_image
from tests.conftest import DaemonProcess, sparse_file

MiB = 1 << 20
BLOCK_BYTES = 64 << 10            # the era block size used here (128 sectors)
SIZE = 32 * MiB


class Tracked:
    """A tracked image file on the engine daemon and one repository."""

    def __init__(self, daemon: DaemonProcess, tmp_path: Path, zeros: bool = False) -> None:
        self.daemon = daemon
        self.disk = tmp_path / "disk.img"
        self.disk.write_bytes(bytes(SIZE) if zeros else random.Random(1).randbytes(SIZE))
        self.repo = make_repo(tmp_path / "repo")
        self.state = tmp_path / "state"
        self.env = {"BLOCKERA_STATE_DIR": str(self.state), "BLOCKERA_REPOSITORY": str(self.repo),
                    "BLOCKERA_PASSWORD": PASSWORD, "BLOCKERA_LOCK_DIR": str(tmp_path / "locks"),
                    "TMPDIR": str(tmp_path)}
        daemon.env.update(self.env)
        daemon.run("track", str(self.disk), "--metadata",
                   str(sparse_file(tmp_path / "era.img", 4 * MiB)), "--block-size", "128")
        self.engine = EngineClient(str(daemon.socket_path))

    def backup(self, *args: str, check: bool = True) -> dict:
        r = self.daemon.run("backup", "/dev/mapper/disk", "--json", *args, check=check)
        return json.loads(r.stdout) if r.returncode == 0 else {"exit": r.returncode,
                                                                "stderr": r.stderr}

    def write(self, offset: int, data: bytes) -> None:
        self.engine.write("disk", offset, data)

    def device_bytes(self) -> bytes:
        return self.engine.read("disk", 0, self.engine.size_bytes("disk"))

    def snapshot_count(self) -> int:
        return len(list((self.repo / "snapshots").iterdir()))

    def listing(self) -> str:
        return self.daemon.run("dmsetup", "ls").stdout


@pytest.fixture
def tracked(daemon: DaemonProcess, tmp_path: Path) -> Tracked:
    return Tracked(daemon, tmp_path)


def test_incrementals_read_only_what_changed_and_restore_exactly(tracked: Tracked) -> None:
    first = tracked.backup()
    assert first["tracked"]["full"] and "no earlier backup" in first["tracked"]["reason"]
    assert first["bytes_read"] == SIZE
    assert snapshot_image(tracked.repo) == tracked.device_bytes()
    rnd = random.Random(2)
    previous = first
    for round_ in range(3):
        blocks = sorted(rnd.sample(range(SIZE // BLOCK_BYTES), 5))
        for block in blocks:
            tracked.write(block * BLOCK_BYTES + 4096, rnd.randbytes(8192))
        result = tracked.backup("--verify-sample", "10")
        assert not result["tracked"]["full"], result["tracked"]
        assert result["tracked"]["verified_chunks"] > 0
        chunks = {block * BLOCK_BYTES // MiB for block in blocks}
        assert result["chunks_read"] == len(chunks), (round_, result)
        assert result["parent_id"] == previous["snapshot_id"]
        assert snapshot_image(tracked.repo) == tracked.device_bytes()
        previous = result
    assert "disk-snap" not in tracked.listing() and "disk-origin" not in tracked.listing()
    need_restic()
    Restic(tracked.repo).run("check", "--read-data")
    status = json.loads(tracked.daemon.run("status", "--json").stdout)
    assert list(status[0]["backups"].values())[0]["changed_blocks"] == 0


def _sweeper(tracked: Tracked, stop: threading.Event, nr_blocks: int) -> None:
    """Write generation g into every block, from the last block down to the first, then
    generation g + 1, and so on until stopped."""
    generation = 1
    while not stop.is_set():
        for block in range(nr_blocks - 1, -1, -1):
            tracked.write(block * BLOCK_BYTES, struct.pack("<Q", generation) * 64)
        generation += 1


def _generations(image: bytes, nr_blocks: int) -> list[int]:
    return [struct.unpack_from("<Q", image, b * BLOCK_BYTES)[0] for b in range(nr_blocks)]


def test_backup_is_a_point_in_time_while_the_device_is_written(daemon: DaemonProcess,
                                                               tmp_path: Path) -> None:
    """A writer sweeps the device from its end to its start, over and over, while backups
    run. At any one moment the device holds generation g in a head and g + 1 in the tail
    (non-decreasing, spread at most one); a backup read from the live device while the
    writer moves would not be. The last backup, taken at rest, restores exactly: writes made
    during earlier backups were all picked up by the incrementals."""
    tracked = Tracked(daemon, tmp_path, zeros=True)             # generation 0 everywhere
    nr_blocks = SIZE // BLOCK_BYTES
    stop = threading.Event()
    writer = threading.Thread(target=_sweeper, args=(tracked, stop, nr_blocks))
    writer.start()
    try:
        time.sleep(0.3)
        results = [tracked.backup("--chunk-size", "64K") for _ in range(3)]
    finally:
        stop.set()
        writer.join()
    assert [r["tracked"]["full"] for r in results] == [True, False, False]
    for result in results:
        generations = _generations(snapshot_image(tracked.repo, result["snapshot_id"]),
                                   nr_blocks)
        assert generations == sorted(generations), result["snapshot_id"]
        assert generations[-1] - generations[0] <= 1
    last = tracked.backup()
    assert not last["tracked"]["full"]
    assert snapshot_image(tracked.repo) == tracked.device_bytes()


def test_kill_during_backup_leaves_device_and_repository_sound(tracked: Tracked) -> None:
    need_restic()
    tracked.backup()
    rnd = random.Random(3)
    for delay in (0.3, 0.6, 1.0, 1.5):
        for _ in range(20):
            tracked.write(rnd.randrange(SIZE // 4096) * 4096, rnd.randbytes(4096))
        before = tracked.snapshot_count()
        proc = subprocess.Popen(["blockera", "backup", "/dev/mapper/disk", "--chunk-size",
                                 "64K", "--verify-sample", "0"], env=tracked.daemon.env,
                                stderr=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert tracked.snapshot_count() in (before, before + 1)
        tracked.write(0, rnd.randbytes(4096))                   # the device still takes I/O
        Restic(tracked.repo).run("unlock")             # the killed process's lock is stale
        Restic(tracked.repo).run("check")
    result = tracked.backup()
    assert snapshot_image(tracked.repo) == tracked.device_bytes()
    assert not result["tracked"]["full"]
    listing = tracked.listing()
    assert "disk-snap" not in listing and "disk-origin" not in listing
    Restic(tracked.repo).run("check", "--read-data")


def test_cow_overflow_changes_nothing_and_the_next_backup_has_everything(
        tracked: Tracked, tmp_path: Path) -> None:
    tracked.backup()
    tracked.write(5 * MiB, os.urandom(MiB))
    cow = tmp_path / "small-cow.img"
    cow.write_bytes(bytes(64 << 10))                  # the header and room for almost nothing
    before = tracked.snapshot_count()
    stop = threading.Event()
    rnd = random.Random(4)

    def write_everywhere() -> None:
        while not stop.is_set():
            tracked.write(rnd.randrange(SIZE // BLOCK_BYTES) * BLOCK_BYTES,
                          rnd.randbytes(BLOCK_BYTES))

    writer = threading.Thread(target=write_everywhere)
    writer.start()
    try:
        failed = tracked.backup("--cow", str(cow), "--verify-sample", "0", check=False)
    finally:
        stop.set()
        writer.join()
    assert failed["exit"] != 0 and "COW" in failed["stderr"], failed
    assert tracked.snapshot_count() == before
    listing = tracked.listing()
    assert "disk-snap" not in listing and "disk-origin" not in listing
    table = tracked.daemon.run("dmsetup", "table", "disk").stdout
    assert " era " in table
    result = tracked.backup()
    assert not result["tracked"]["full"]
    assert snapshot_image(tracked.repo) == tracked.device_bytes()


def test_doubt_means_a_full_read_with_the_reason(tracked: Tracked, tmp_path: Path) -> None:
    tracked.backup()
    # a write that tracking cannot see (straight into the image under the era layer): the
    # verify sample of every unchanged chunk finds it
    with open(tracked.disk, "r+b") as f:
        f.seek(17 * MiB)
        f.write(os.urandom(4096))
    result = tracked.backup("--verify-sample", "100")
    assert result["tracked"]["full"] and "differs from the parent" in \
        result["tracked"]["reason"]
    assert snapshot_image(tracked.repo) == tracked.device_bytes()
    result = tracked.backup("--chunk-size", "256K")
    assert result["tracked"]["full"] and "new chunk size" in result["tracked"]["reason"]
    assert result["chunk_bytes"] == 256 << 10
    # a backup of the same device by other means becomes the latest: not the recorded parent
    tracked.daemon.run("backup", "/dev/mapper/disk", "--state-dir", str(tmp_path / "none"))
    result = tracked.backup()
    assert result["tracked"]["full"] and "not the one this host recorded" in \
        result["tracked"]["reason"]
    # tracking lost: after a restart the era numbering went backwards (as when the metadata
    # was replaced): activate starts a new epoch, the next backup reads everything
    record_path = tracked.state / "devices" / "disk.json"
    record = json.loads(record_path.read_text())
    record["highest_era_seen"] = 10_000
    record_path.write_text(json.dumps(record))
    tracked.daemon.stop()
    restarted = DaemonProcess(tracked.daemon.socket_path)
    try:
        restarted.env.update(tracked.env)
        tracked.daemon = restarted
        tracked.engine = EngineClient(str(restarted.socket_path))
        notes = restarted.run("activate", "--all").stderr
        assert "went backwards" in notes, notes
        result = tracked.backup()
        assert result["tracked"]["full"] and "may have missed writes" in \
            result["tracked"]["reason"]
        assert snapshot_image(tracked.repo) == tracked.device_bytes()
        assert not tracked.backup()["tracked"]["full"]
    finally:
        restarted.stop()


def test_options_that_do_not_apply_to_a_tracked_device(tracked: Tracked) -> None:
    for option in (["--full"], ["--since", "3", "--era-metadata", "x"], ["--dry-run"],
                   ["--parent", "abc"]):
        r = tracked.daemon.run("backup", "/dev/mapper/disk", *option, check=False)
        assert r.returncode == 2 and "tracked device" in r.stderr, (option, r.stderr)
