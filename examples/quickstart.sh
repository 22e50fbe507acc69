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
echo "== the era target in the userspace engine, with image files for disks (seed 000)"
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
