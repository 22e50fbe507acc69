"""Invalidating, in a kernel dm-cache device, the cache blocks that hold origin blocks in given
sector ranges (docs/live-devices.md §5) — the cache above a device that was rolled back.

The kernel allows `invalidate_cblocks` only in passthrough mode, and refuses passthrough while
the cache holds dirty blocks. So: suspend the cache (its metadata is committed), read which
cache block holds which origin block with thin-provisioning-tools' `cache_dump` (from a copy), reload the
table in passthrough mode, resume, send `invalidate_cblocks` for the cache blocks whose origin
block meets a range, and reload the original table. Whatever happens, the original table is
put back.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from blockera.blockdev import FileDevice
from blockera.errors import BlockeraError, DeviceError, UsageError
from blockera.live import engines
from blockera.live.engines import DmControl

MODES = ("writeback", "writethrough", "passthrough")
MESSAGE_RANGES = 512                       # cblock ranges per message
COPY_PIECE_BYTES = 4 << 20
_MAPPING_RE = re.compile(rb'<mapping cache_block="(\d+)" origin_block="(\d+)"')


def _device_path(reference: str) -> str:
    """A table's device reference (MAJ:MIN or a path) as a path that can be opened: the node
    sysfs names for the number (udev's /dev/block links may be missing)."""
    if not re.fullmatch(r"\d+:\d+", reference):
        return reference
    try:
        uevent = Path(f"/sys/dev/block/{reference}/uevent").read_text()
    except OSError:
        return f"/dev/block/{reference}"
    for line in uevent.splitlines():
        if line.startswith("DEVNAME="):
            return f"/dev/{line.split('=', 1)[1]}"
    return f"/dev/block/{reference}"


def cached_origin_blocks(metadata_device: str) -> dict[int, int]:
    """cache block -> origin block, from the cache's metadata: cache_dump will not open
    metadata a live cache holds, so the metadata is copied (O_DIRECT, while the cache is
    suspended) and read from a read-only loop device over the copy (cache_dump opens with
    O_DIRECT, which a temporary filesystem may not offer)."""
    tool = shutil.which("cache_dump")
    if tool is None:
        raise DeviceError("cache_dump (thin-provisioning-tools) is needed to read the cache's "
                          "metadata: apt-get install thin-provisioning-tools")
    with tempfile.NamedTemporaryFile(prefix="blockera-cache-meta-") as copy:
        with FileDevice(_device_path(metadata_device), writable=False, direct=True) as dev:
            for offset in range(0, dev.size_bytes, COPY_PIECE_BYTES):
                copy.write(dev.read(offset, min(COPY_PIECE_BYTES, dev.size_bytes - offset)))
        copy.flush()
        loop = subprocess.run(["losetup", "--find", "--show", "--read-only", copy.name],
                              capture_output=True, text=True)
        if loop.returncode != 0:
            raise DeviceError(f"cannot attach a loop device to read the cache metadata: "
                              f"{loop.stderr.strip()}")
        try:
            r = subprocess.run([tool, loop.stdout.strip()], capture_output=True)
        finally:
            subprocess.run(["losetup", "--detach", loop.stdout.strip()], capture_output=True)
    if r.returncode != 0:
        raise DeviceError(f"cache_dump of {metadata_device} failed: "
                          f"{r.stderr.decode(errors='replace').strip()}")
    return {int(c): int(o) for c, o in _MAPPING_RE.findall(r.stdout)}


def cblocks_to_invalidate(mappings: dict[int, int], block_sectors: int,
                          sector_ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """[begin, end) ranges of cache blocks whose origin block meets a sector range."""
    if not sector_ranges:
        return []
    starts = sorted(sector_ranges)
    import bisect
    begins = [b for b, _ in starts]
    hit = []
    for cblock, oblock in mappings.items():
        lo, hi = oblock * block_sectors, (oblock + 1) * block_sectors
        i = bisect.bisect_right(begins, hi - 1) - 1
        if i >= 0 and starts[i][1] > lo:
            hit.append(cblock)
    hit.sort()
    ranges: list[tuple[int, int]] = []
    for cblock in hit:
        if ranges and ranges[-1][1] == cblock:
            ranges[-1] = (ranges[-1][0], cblock + 1)
        else:
            ranges.append((cblock, cblock + 1))
    return ranges


def _passthrough(words: list[str]) -> str:
    """The cache table line with its mode feature replaced by passthrough."""
    nr_features = int(words[7])
    features = [f for f in words[8: 8 + nr_features] if f not in MODES] + ["passthrough"]
    return " ".join(words[:7] + [str(len(features))] + features + words[8 + nr_features:])


def invalidate_cache(engine: DmControl, cache: str, sector_ranges: list[tuple[int, int]]) -> int:
    """Invalidate the cache blocks of `cache` holding origin blocks in `sector_ranges`; returns
    how many cache blocks were invalidated."""
    lines = engines.table_lines(engine, cache)
    if len(lines) != 1 or lines[0][2] != "cache":
        raise UsageError(f"{cache} is not a dm-cache device")
    words = lines[0]
    block_sectors = int(words[6])
    original = " ".join(words)
    engine.suspend(cache)
    try:
        mappings = cached_origin_blocks(words[3])
        ranges = cblocks_to_invalidate(mappings, block_sectors, sector_ranges)
        engine.load(cache, _passthrough(words))
        try:
            engine.resume(cache)
        except BlockeraError as exc:
            raise DeviceError(f"{cache}: the kernel refused passthrough mode ({exc}); a cache "
                              "with dirty blocks must be cleaned first (e.g. the cleaner "
                              "policy)") from None
        for i in range(0, len(ranges), MESSAGE_RANGES):
            engine.message(cache, 0, ["invalidate_cblocks"] +
                           [f"{b}-{e}" for b, e in ranges[i: i + MESSAGE_RANGES]])
    finally:
        engine.suspend(cache)
        engine.load(cache, original)
        engine.resume(cache)
    return sum(e - b for b, e in ranges)
