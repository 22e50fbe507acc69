"""Live-device workflows on the real kernel's device-mapper (Linux 6.1 under qemu): tracking an
LVM-style volume under a mounted filesystem while it is written, replication rounds, consistent
incremental backups taken while the filesystem is written (checked by restic), marks, a
simulated reboot with `activate`, lost tracking noticed, and dm-cache invalidation."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.backup.helpers import Restic, need_restic

from .guest import KernelGuest, create_disk_image

pytestmark = [pytest.mark.kernel, pytest.mark.xdist_group("kernel-live")]

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[2]

SCRIPT = r"""
cd "$REPO"
B="python3 -m blockera"
S="--state-dir $SHARE/state"
LV="0 262144 linear /dev/vda 2048"
dmsetup create vg-lv --table "$LV"
mkfs.ext4 -q -E lazy_itable_init=0,lazy_journal_init=0 /dev/mapper/vg-lv
mkdir -p /mnt/lv
mount /dev/mapper/vg-lv /mnt/lv
writer() {
    i=0
    while [ ! -f /tmp/stop ]; do
        dd if=/dev/urandom of=/mnt/lv/f$((i % 16)) bs=64k count=8 conv=fsync 2>/dev/null
        i=$((i + 1))
    done
}
writer &
W=$!
sleep 1
$B track /dev/mapper/vg-lv --metadata /dev/vdb --block-size 128 $S
dmsetup table vg-lv > $SHARE/table-tracked.txt
$B replicate /dev/mapper/vg-lv /dev/vdc --json $S > $SHARE/round1.json
$B replicate /dev/mapper/vg-lv /dev/vdc --json $S > $SHARE/round2.json
# consistent backups while the filesystem is written
export BLOCKERA_REPOSITORY=$SHARE/repo BLOCKERA_PASSWORD=kernel-test
$B init
$B backup /dev/mapper/vg-lv --json $S > $SHARE/backup1.json
$B backup /dev/mapper/vg-lv --json $S > $SHARE/backup2.json
touch /tmp/stop
wait $W
umount /mnt/lv
$B replicate /dev/mapper/vg-lv /dev/vdc --json $S > $SHARE/round3.json
cmp /dev/mapper/vg-lv /dev/vdc && echo mirror-equal-1
e2fsck -fn /dev/vdc > /dev/null 2>&1 && echo mirror-fsck-clean
$B backup /dev/mapper/vg-lv --json $S > $SHARE/backup3.json
$B restore latest /tmp/restored.img
cmp /dev/mapper/vg-lv /tmp/restored.img && echo backup-equal
rm /tmp/restored.img
B2=$(python3 -c "import json; print(json.load(open('$SHARE/backup2.json'))['snapshot_id'])")
$B restore $B2 /tmp/b2.img
e2fsck -fy /tmp/b2.img > $SHARE/fsck-b2.txt 2>&1; echo "fsck-b2=$?"
rm /tmp/b2.img

$B mark m1 /dev/mapper/vg-lv $S
dd if=/dev/urandom of=/dev/mapper/vg-lv bs=64k seek=100 count=3 oflag=direct 2>/dev/null
$B invalidate --since-mark m1 --json /dev/mapper/vg-lv $S > $SHARE/inval.json

# a reboot: the stack is gone, LVM brings the volume back, activate rebuilds the stack
dmsetup remove vg-lv
dmsetup remove vg-lv-real
dmsetup create vg-lv --table "$LV"
$B activate --all $S 2> $SHARE/activate1.txt
mount /dev/mapper/vg-lv /mnt/lv
dd if=/dev/urandom of=/mnt/lv/after-reboot bs=64k count=32 conv=fsync 2>/dev/null
umount /mnt/lv
$B replicate /dev/mapper/vg-lv /dev/vdc --json $S > $SHARE/round4.json
cmp /dev/mapper/vg-lv /dev/vdc && echo mirror-equal-2
$B status --json $S > $SHARE/status.json

# a reboot after which the volume was written before the stack was back: noticed
dmsetup remove vg-lv
dmsetup remove vg-lv-real
sed -i 's/"boot_id": "[^"]*"/"boot_id": "another-boot"/' $SHARE/state/devices/vg-lv.json
dmsetup create vg-lv --table "$LV"
mount /dev/mapper/vg-lv /mnt/lv
dd if=/dev/urandom of=/mnt/lv/untracked bs=64k count=16 conv=fsync 2>/dev/null
$B activate --all $S 2> $SHARE/activate2.txt
umount /mnt/lv
$B replicate /dev/mapper/vg-lv /dev/vdc --json $S > $SHARE/round5.json
cmp /dev/mapper/vg-lv /dev/vdc && echo mirror-equal-3

# dm-cache above the tracked volume: the blocks written after a mark leave the cache
dd if=/dev/zero of=/dev/vdd bs=4k count=1 oflag=direct 2>/dev/null
dmsetup create cache --table "0 262144 cache /dev/vdd /dev/vde /dev/mapper/vg-lv 128 1 writethrough smq 0"
for pass in 1 2 3 4 5 6 7 8; do
    dd if=/dev/mapper/cache of=/dev/null bs=64k skip=200 count=16 iflag=direct 2>/dev/null
done
$B mark m2 /dev/mapper/vg-lv $S
dd if=/dev/urandom of=/dev/mapper/cache bs=64k seek=204 count=2 oflag=direct 2>/dev/null
dmsetup suspend cache
dd if=/dev/vdd of=/tmp/cmeta bs=1M iflag=direct 2>/dev/null
L=$(losetup -f --show -r /tmp/cmeta)
cache_dump $L > $SHARE/cache-before.xml
losetup -d $L
dmsetup resume cache
$B invalidate --since-mark m2 --dm-cache cache --json /dev/mapper/vg-lv $S > $SHARE/inval2.json 2> $SHARE/inval2.err
dmsetup table cache > $SHARE/cache-table-after.txt
dmsetup suspend cache
dd if=/dev/vdd of=/tmp/cmeta bs=1M iflag=direct 2>/dev/null
L=$(losetup -f --show -r /tmp/cmeta)
cache_dump $L > $SHARE/cache-after.xml
losetup -d $L
dmsetup resume cache
dmsetup remove cache

$B untrack /dev/mapper/vg-lv $S
dmsetup table vg-lv > $SHARE/table-untracked.txt
dmsetup ls > $SHARE/ls.txt
echo live-done
"""


def _json(share: Path, name: str):
    return json.loads((share / name).read_text())


def _mappings(xml: str) -> dict[int, int]:
    return {int(o): int(c) for c, o in re.findall(r'cache_block="(\d+)" origin_block="(\d+)"', xml)}


def test_live_workflows_on_the_kernel(kernel_guest: KernelGuest, tmp_path: Path) -> None:
    need_restic()
    share = tmp_path / "share"
    share.mkdir()
    # /dev/vda: the physical volume; vdb: era metadata; vdc: the mirror; vdd, vde: dm-cache
    disks = [create_disk_image(tmp_path / "pv.img", 256 * MiB),
             create_disk_image(tmp_path / "meta.img", 16 * MiB),
             create_disk_image(tmp_path / "mirror.img", 128 * MiB),
             create_disk_image(tmp_path / "cmeta.img", 8 * MiB),
             create_disk_image(tmp_path / "cdata.img", 32 * MiB)]
    result = kernel_guest.run(SCRIPT, disks, share, timeout_s=1800, memory_mb=2048,
                              env={"REPO": str(Path(__file__).resolve().parents[2])})
    out = result.stdout
    assert "live-done" in out, (out, result.stderr)
    assert (share / "table-tracked.txt").read_text().split()[2] == "era"
    rounds = [_json(share, f"round{i}.json") for i in range(1, 6)]
    assert rounds[0]["full"] and not rounds[1]["full"] and not rounds[2]["full"]
    assert rounds[1]["bytes_copied"] < 128 * MiB
    assert "mirror-equal-1" in out and "mirror-fsck-clean" in out
    backups = [_json(share, f"backup{i}.json") for i in range(1, 4)]
    assert backups[0]["tracked"]["full"] and backups[0]["bytes_read"] == 128 * MiB
    assert not backups[1]["tracked"]["full"] and not backups[2]["tracked"]["full"], backups
    assert backups[1]["bytes_read"] < 128 * MiB
    assert "backup-equal" in out
    # taken under a mounted, written ext4: crash-consistent, so the journal replays cleanly
    assert re.search(r"fsck-b2=[01]\b", out), (share / "fsck-b2.txt").read_text()
    restic = Restic(share / "repo", "kernel-test")
    restic.run("check", "--read-data")
    assert _json(share, "inval.json")["ranges"] == [[100, 103]]
    assert "activated" in (share / "activate1.txt").read_text()
    assert not rounds[3]["full"], rounds[3]            # nothing was lost over that reboot
    assert "mirror-equal-2" in out
    assert "already open" in (share / "activate2.txt").read_text()
    assert rounds[4]["full"]                            # lost tracking noticed: all copied
    assert "mirror-equal-3" in out
    status = _json(share, "status.json")[0]
    assert status["state"] == "active" and status["epoch"] == 1
    before = _mappings((share / "cache-before.xml").read_text())
    after = _mappings((share / "cache-after.xml").read_text())
    inval2 = _json(share, "inval2.json")
    assert inval2["ranges"] == [[204, 206]]
    written = {204, 205}
    assert written & set(before), "the test did not get the written blocks into the cache"
    assert not written & set(after)
    assert set(before) - written <= set(after)          # nothing else was dropped
    assert "writethrough" in (share / "cache-table-after.txt").read_text()
    assert (share / "table-untracked.txt").read_text().split()[2] == "linear"
    assert "vg-lv-real" not in (share / "ls.txt").read_text()
