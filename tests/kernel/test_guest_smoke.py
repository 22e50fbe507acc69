"""Smoke tests of the qemu harness against the real dm-era target."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .guest import GuestTimeout, KernelGuest, create_disk_image

pytestmark = pytest.mark.kernel

MiB = 1024 * 1024
ERA_SUPERBLOCK_MAGIC = 0x7EC1077B
ERA_MAGIC_OFFSET = 32
ERA_BLOCK_BYTES = 128 * 512
PAYLOAD_BYTES = 1 * MiB  # era blocks 0..15

SMOKE_SCRIPT = r"""
dmsetup create era --table "0 65536 era /dev/vda /dev/vdb 128"
dmsetup mknodes era
test -b /dev/mapper/era
dmsetup status era > status-created.txt
dd if="$SHARE/payload.bin" of=/dev/mapper/era bs=64k oflag=direct status=none
dmsetup status era > status-written.txt
dd if=/dev/vda of="$SHARE/live-meta.img" bs=64k iflag=direct status=none
dmsetup message era 0 checkpoint
dmsetup status era > status-checkpoint.txt
dmsetup message era 0 take_metadata_snap
dmsetup status era > status-snap.txt
python3 -c 'import numpy, sys; print(sys.version); print(numpy.__version__)' > python.txt
dmsetup message era 0 drop_metadata_snap
dmsetup remove era
dmsetup ls > ls-after.txt
echo smoke-done
"""


def read_status(share: Path, name: str) -> str:
    return (share / f"status-{name}.txt").read_text().strip()


def logical_eras(metadata: Path) -> tuple[int, dict[int, int]]:
    """Current era and per-block eras of an era metadata image, via era_dump."""
    dump = subprocess.run(["era_dump", "--logical", str(metadata)], capture_output=True,
                          text=True, check=True).stdout
    current = re.search(r'current_era="(\d+)"', dump)
    assert current, dump[:500]
    eras = {int(block): int(era)
            for block, era in re.findall(r'<era block="(\d+)" era="(\d+)"/>', dump)}
    return int(current.group(1)), eras


def test_era_target_in_real_kernel(kernel_guest: KernelGuest, tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    meta = create_disk_image(tmp_path / "meta.img", 8 * MiB)
    origin = create_disk_image(tmp_path / "origin.img", 32 * MiB)
    payload = os.urandom(PAYLOAD_BYTES)
    (share / "payload.bin").write_bytes(payload)

    result = kernel_guest.run(SMOKE_SCRIPT, [meta, origin], share, timeout_s=240).check()

    assert result.stdout.strip() == "smoke-done"
    assert read_status(share, "created") == "0 65536 era 8 9/2048 1 -"
    assert re.fullmatch(r"0 65536 era 8 \d+/2048 1 -", read_status(share, "written"))
    assert re.fullmatch(r"0 65536 era 8 \d+/2048 2 -", read_status(share, "checkpoint"))
    # take_metadata_snap rolls the era over before it snapshots the metadata.
    assert re.fullmatch(r"0 65536 era 8 \d+/2048 3 \d+", read_status(share, "snap"))
    assert (share / "ls-after.txt").read_text().strip() == "No devices found"

    guest_python = (share / "python.txt").read_text().splitlines()
    assert guest_python[0] == sys.version.splitlines()[0]

    with open(meta, "rb") as image:
        block0 = image.read(4096)
    magic, = struct.unpack_from("<Q", block0, ERA_MAGIC_OFFSET)
    assert magic == ERA_SUPERBLOCK_MAGIC, f"metadata block 0 magic is {magic:#x}"
    assert origin.read_bytes()[:PAYLOAD_BYTES] == payload

    # Metadata copied while the device was active (no metadata snapshot, as after a crash):
    # the writes of era 1 are marked only in the on-disk current writeset, and still listed.
    written = PAYLOAD_BYTES // ERA_BLOCK_BYTES
    live_copy = share / "live-meta.img"
    listed = subprocess.run([sys.executable, "-m", "blockera", "era", "invalidate", "--json",
                             "--written-since", "1", str(live_copy)],
                            capture_output=True, text=True, check=True)
    assert json.loads(listed.stdout)["ranges"] == [[0, written]]
    logical = subprocess.run([sys.executable, "-m", "blockera", "era", "dump", "--logical",
                              str(live_copy)], capture_output=True, text=True, check=True)
    assert logical.stdout.count('era="1"/>') == written

    if shutil.which("era_dump"):
        current_era, eras = logical_eras(meta)
        assert current_era == 3
        assert len(eras) == 32 * MiB // ERA_BLOCK_BYTES
        assert {block for block, era in eras.items() if era == 1} == set(range(written))
        assert all(era == 0 for block, era in eras.items() if block >= written)


def test_hung_guest_is_killed(kernel_guest: KernelGuest, tmp_path: Path) -> None:
    timeout_s = 15
    started = time.monotonic()
    with pytest.raises(GuestTimeout) as caught:
        kernel_guest.run("echo started; sleep 3600", [], tmp_path / "share",
                         timeout_s=timeout_s)
    assert time.monotonic() - started < timeout_s + 15
    assert "did not power off" in str(caught.value)
    assert caught.value.stdout == "started\n"
    assert caught.value.console_log.exists()
