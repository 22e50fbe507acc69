"""The snapshot seeds' dmsetup sequences, run verbatim through `blockera dmsetup`, `blockera dd`
and `blockera cow` against the engine daemon, with image files standing in for disks; reading
and writing the devices (in place of mount and the backup itself) goes through `blockera dd`.

Seed 004: a consistent backup of a live device through a snapshot-origin stack (steps 0-6).
Seed 003: LVM's four-device layering of a snapshot, and `lvconvert --merge` done by hand.
"""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path

from tests.conftest import DaemonProcess, sparse_file

MiB = 1 << 20


def _sha(d: DaemonProcess, device: str) -> str:
    data = d.run("dd", f"if={device}", "of=-", "bs=1M", "status=none",
                 input=b"").stdout
    return hashlib.sha256(data).hexdigest()


def _sectors(path: Path) -> int:
    return path.stat().st_size // 512


def test_seed_004_snapshot_origin_backup(daemon: DaemonProcess, tmp_path: Path) -> None:
    md2 = sparse_file(tmp_path / "md2.img", 16 * MiB)      # /dev/md2: the live device
    sdb6 = tmp_path / "sdb6.img"                             # /dev/sdb6: the COW partition
    sdb6.write_bytes(b"\xa5" * (16 * MiB))                   # stale data from an earlier use
    d = daemon.run
    size = _sectors(md2)
    # Step 0: a dm object for the device, and a duplicate of it
    d("dmsetup", "create", "md2", input=f"0 {size} linear {md2} 0\n")
    d("dmsetup", "create", "md2_dup", input=d("dmsetup", "table", "md2").stdout)
    d("dd", "if=/dev/urandom", "of=/dev/mapper/md2", "bs=1M", "count=16", "status=none")
    original_table = d("dmsetup", "table", "md2").stdout
    for round_ in range(2):                                  # step 6: back to step 1
        # Step 1: prepare the COW snapshot and activate it
        d("dd", "if=/dev/zero", f"of={sdb6}", "bs=512", "count=32", "conv=notrunc",
          "status=none")
        d("dmsetup", "suspend", "md2")
        d("dmsetup", "create", "cow",
          input=f"0 {size} snapshot /dev/mapper/md2_dup {sdb6} p 32\n")
        d("dmsetup", "create", "origin", input=f"0 {size} snapshot-origin /dev/mapper/md2_dup\n")
        d("dmsetup", "load", "md2", input=d("dmsetup", "table", "origin").stdout)
        d("dmsetup", "resume", "md2")
        # Step 2/3: the snapshot is the frozen state; the live device keeps being written
        frozen = _sha(daemon, "/dev/mapper/md2")
        assert _sha(daemon, "/dev/mapper/cow") == frozen
        d("dd", "if=/dev/urandom", "of=/dev/mapper/md2", "bs=64k", f"seek={3 + round_ * 100}",
          "count=40", "status=none")
        d("dd", "if=/dev/urandom", "of=/dev/mapper/md2", "bs=4k", "seek=3000", "count=1",
          "status=none")
        assert _sha(daemon, "/dev/mapper/cow") == frozen
        assert _sha(daemon, "/dev/mapper/md2") != frozen
        # Step 4: statistics while the snapshot is in effect
        assert d("dmsetup", "table", "md2").stdout == f"0 {size} snapshot-origin 253:1\n"
        assert d("dmsetup", "table", "md2_dup").stdout == f"0 {size} linear {md2} 0\n"
        status = d("dmsetup", "status", "cow").stdout
        assert re.fullmatch(rf"0 {size} snapshot (\d+)/{_sectors(sdb6)} 64\n", status)
        # 40 x 64 KiB = 160 chunks of 16 KiB, plus one: next_free = 2 + 161
        assert status.split()[3] == f"{163 * 32}/{_sectors(sdb6)}"
        changed = d("cow", "changed", "--json", str(sdb6)).stdout
        first = (3 + round_ * 100) * 4
        assert f'"ranges": [[{first}, {first + 160}], [750, 751]]' in changed
        # Step 5: tear down and restore the initial table
        d("dmsetup", "suspend", "md2")
        d("dmsetup", "remove", "origin")
        d("dmsetup", "remove", "cow")
        d("dmsetup", "load", "md2", input=d("dmsetup", "table", "md2_dup").stdout)
        d("dmsetup", "resume", "md2")
        assert d("dmsetup", "table", "md2").stdout == original_table
    assert d("dmsetup", "ls").stdout == "md2\t(253:0)\nmd2_dup\t(253:1)\n"


def test_seed_003_lvm_layering_and_merge(daemon: DaemonProcess, tmp_path: Path) -> None:
    pv = sparse_file(tmp_path / "pv.img", 80 * MiB)          # 8:19 in the seed
    d = daemon.run
    # lvcreate -L 64M -n base volumeGroup; lvcreate -L 8M --snapshot -n snap volumeGroup/base
    d("dmsetup", "create", "volumeGroup-base-real", "--table", f"0 131072 linear {pv} 384")
    d("dmsetup", "create", "volumeGroup-base",
      "--table", "0 131072 snapshot-origin /dev/mapper/volumeGroup-base-real")
    d("dd", "if=/dev/urandom", "of=/dev/mapper/volumeGroup-base", "bs=1M", "count=64",
      "status=none")
    d("dmsetup", "create", "volumeGroup-snap-cow", "--table", f"0 16384 linear {pv} 131456")
    d("dd", "if=/dev/zero", "of=/dev/mapper/volumeGroup-snap-cow", "bs=4k", "count=1",
      "status=none")
    d("dmsetup", "suspend", "volumeGroup-base")
    d("dmsetup", "create", "volumeGroup-snap", "--table",
      "0 131072 snapshot /dev/mapper/volumeGroup-base-real /dev/mapper/volumeGroup-snap-cow P 16")
    d("dmsetup", "resume", "volumeGroup-base")
    assert d("dmsetup", "table").stdout == (
        f"volumeGroup-base: 0 131072 snapshot-origin 253:0\n"
        f"volumeGroup-base-real: 0 131072 linear {pv} 384\n"
        f"volumeGroup-snap: 0 131072 snapshot 253:0 253:2 P 16\n"
        f"volumeGroup-snap-cow: 0 16384 linear {pv} 131456\n")
    view = _sha(daemon, "/dev/mapper/volumeGroup-base")
    d("dd", "if=/dev/urandom", "of=/dev/mapper/volumeGroup-base", "bs=8k", "seek=100",
      "count=300", "status=none")
    d("dd", "if=/dev/urandom", "of=/dev/mapper/volumeGroup-snap", "bs=512", "seek=99",
      "count=1", "status=none")
    view = _sha(daemon, "/dev/mapper/volumeGroup-snap")
    assert d("dmsetup", "status", "volumeGroup-snap").stdout == \
        "0 131072 snapshot 4848/16384 32\n"      # 301 exceptions of CS 16, all in area 0
    # lvconvert --merge volumeGroup/snap: the origin becomes snapshot-merge, handing over
    # from the suspended snapshot, which then gets the error target; -cow is renamed
    d("dmsetup", "suspend", "volumeGroup-snap")
    d("dmsetup", "suspend", "volumeGroup-base")
    d("dmsetup", "load", "volumeGroup-base", "--table",
      "0 131072 snapshot-merge /dev/mapper/volumeGroup-base-real "
      "/dev/mapper/volumeGroup-snap-cow P 16")
    d("dmsetup", "resume", "volumeGroup-base")
    d("dmsetup", "load", "volumeGroup-snap", "--table", "0 131072 error")
    d("dmsetup", "resume", "volumeGroup-snap")
    d("dmsetup", "remove", "volumeGroup-snap")
    d("dmsetup", "rename", "volumeGroup-snap-cow", "volumeGroup-base-cow")
    # merging has finished when sectors_allocated == metadata_sectors
    deadline = time.monotonic() + 60
    while (status := d("dmsetup", "status", "volumeGroup-base").stdout) != \
            "0 131072 snapshot-merge 32/16384 32\n":
        assert re.fullmatch(r"0 131072 snapshot-merge \d+/16384 32\n", status), status
        assert time.monotonic() < deadline, f"merge did not finish: {status}"
        time.sleep(0.05)
    assert d("dmsetup", "table").stdout == (
        "volumeGroup-base: 0 131072 snapshot-merge 253:0 253:2 P 16\n"
        "volumeGroup-base-cow: 0 16384 linear " f"{pv} 131456\n"
        f"volumeGroup-base-real: 0 131072 linear {pv} 384\n")
    assert _sha(daemon, "/dev/mapper/volumeGroup-base") == view
    assert _sha(daemon, "/dev/mapper/volumeGroup-base-real") == view
    # lvconvert_merge_finish: drop the merge layer
    d("dmsetup", "suspend", "volumeGroup-base")
    d("dmsetup", "load", "volumeGroup-base", "--table",
      "0 131072 linear /dev/mapper/volumeGroup-base-real 0")
    d("dmsetup", "resume", "volumeGroup-base")
    d("dmsetup", "remove", "volumeGroup-base-cow")
    assert _sha(daemon, "/dev/mapper/volumeGroup-base") == view
