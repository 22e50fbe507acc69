#!/bin/sh
# blockera end to end on plain files: build dm-era metadata from an era_dump XML, check it,
# and ask which blocks changed since an era, as a backup tool would.
set -eu
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

cat > "$work/era.xml" <<'XML'
<superblock uuid="" block_size="4096" nr_blocks="128" current_era="4">
  <writeset era="3" nr_bits="128">
    <bit block="30" value="true"/>
    <bit block="31" value="true"/>
    <bit block="49" value="true"/>
  </writeset>
  <era_array>
    <era block="0" era="1"/>
    <era block="2" era="1"/>
    <era block="56" era="2"/>
    <era block="57" era="2"/>
    <era block="127" era="1"/>
  </era_array>
</superblock>
XML

echo "== metadata size for a 256 MiB origin tracked in 2 MiB blocks"
blockera era metadata-size --origin-size 256M --block-size 4096

truncate -s 1M "$work/meta.img"
echo "== restore"
blockera era restore -i "$work/era.xml" -o "$work/meta.img"
echo "== check"
blockera era check "$work/meta.img"
echo "== blocks written since era 2"
blockera era invalidate --written-since 2 "$work/meta.img"
echo "== the same as JSON ranges [begin, end)"
blockera era invalidate --written-since 2 --json "$work/meta.img"
echo "== each block's newest era (first lines)"
blockera era dump --logical "$work/meta.img" | head -6

echo
echo "== the era target in the userspace engine, with image files for disks"
export BLOCKERA_SOCKET="$work/engine.sock"
blockera daemon --socket "$BLOCKERA_SOCKET" &
daemon_pid=$!
trap 'kill $daemon_pid 2>/dev/null; wait $daemon_pid 2>/dev/null; rm -rf "$work"' EXIT
while [ ! -S "$BLOCKERA_SOCKET" ]; do sleep 0.1; done
truncate -s 256M "$work/sdb.img" "$work/sdc.img"
blockera dmsetup create era-meta --table "0 256 linear $work/sdb.img 0"
blockera dmsetup create era --table "0 524288 era /dev/mapper/era-meta $work/sdc.img 4096"
blockera dmsetup create era-access --table "0 256 linear /dev/mapper/era-meta 0"
blockera dmsetup status era
blockera dd if=/dev/urandom of=/dev/mapper/era bs=1M seek=60 count=40 status=none
blockera dmsetup message era 0 take_metadata_snap
blockera dmsetup status era
echo "== blocks written since era 1 (40 MiB at 60 MiB = 2 MiB blocks 30..49)"
blockera era invalidate --written-since 1 --metadata-snapshot /dev/mapper/era-access
blockera dmsetup message era 0 drop_metadata_snap
blockera dmsetup remove era-access
blockera dmsetup remove era
blockera dmsetup remove era-meta
blockera era check -q "$work/sdb.img" && echo "metadata consistent after removal"

echo
echo "== a consistent backup of a live device through a snapshot"
truncate -s 64M "$work/md2.img"
dd if=/dev/urandom of="$work/md2.img" bs=1M count=64 conv=notrunc status=none
truncate -s 16M "$work/sdb6.img"
blockera dmsetup create md2 --table "0 131072 linear $work/md2.img 0"
blockera dmsetup create md2_dup --table "0 131072 linear $work/md2.img 0"
blockera dmsetup suspend md2
blockera dmsetup create cow --table "0 131072 snapshot /dev/mapper/md2_dup $work/sdb6.img p 32"
blockera dmsetup create origin --table "0 131072 snapshot-origin /dev/mapper/md2_dup"
blockera dmsetup table origin | blockera dmsetup load md2
blockera dmsetup resume md2
frozen=$(blockera dd if=/dev/mapper/cow bs=1M status=none | sha256sum)
echo "== the live device keeps being written: 2.5 MiB at 1 MiB"
blockera dd if=/dev/urandom of=/dev/mapper/md2 bs=64k seek=16 count=40 status=none
blockera dmsetup status cow
[ "$(blockera dd if=/dev/mapper/cow bs=1M status=none | sha256sum)" = "$frozen" ] &&
    echo "the snapshot still shows the frozen state"
echo "== the chunks the live device changed since the snapshot, from the COW's exception table"
blockera cow changed "$work/sdb6.img"
blockera cow extract "$work/sdb6.img" --origin /dev/mapper/md2_dup -o "$work/changes.img"
echo "== tear down: the live device gets its own table back"
blockera dmsetup suspend md2
blockera dmsetup remove origin
blockera dmsetup remove cow
blockera dmsetup table md2_dup | blockera dmsetup load md2
blockera dmsetup resume md2
blockera dmsetup table md2

echo
echo "== incremental-forever backups of a tracked device into a restic repository"
export BLOCKERA_STATE_DIR="$work/state" BLOCKERA_REPOSITORY="$work/repo"
export BLOCKERA_PASSWORD=correct-horse-battery-staple
truncate -s 4M "$work/vm-era.img"
dd if=/dev/urandom of="$work/vm.img" bs=1M count=128 status=none
blockera track "$work/vm.img" --metadata "$work/vm-era.img" --block-size 128 --name vm
blockera init
echo "== the first backup reads everything"
blockera backup /dev/mapper/vm
echo "== 3 MiB rewritten in place; the next backup reads only the chunks that cover it"
blockera dd if=/dev/urandom of=/dev/mapper/vm bs=64k seek=500 count=48 status=none
blockera backup /dev/mapper/vm
blockera snapshots
echo "== restore the latest snapshot and compare it with the device"
blockera restore latest "$work/restored.img"
cmp "$work/restored.img" "$work/vm.img" && echo "restored image identical"
blockera check --read-data
blockera status
blockera untrack /dev/mapper/vm
