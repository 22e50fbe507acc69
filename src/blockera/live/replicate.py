"""Replication of a tracked device to a mirror, round by round (docs/live-devices.md §4): each
round freezes the device, copies every block written since the mirror's era from the frozen
view to the mirror, flushes the mirror, and only then records the era the next round starts
from. A round interrupted at any point leaves the record as it was, so the next round copies
everything since the same era again: the mirror is whole after every completed round, and
nothing is skipped. A sample of blocks not listed as changed is compared with the mirror; any
difference means the mirror or the tracking cannot be trusted, and the round copies all.
"""

from __future__ import annotations

import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from blockera.blockdev import BlockDevice, FileDevice
from blockera.errors import DeviceError, UsageError
from blockera.live.engines import DmControl
from blockera.live.frozen import changed_block_count, cow_bytes_for, frozen_view
from blockera.live.state import StateDir, TrackedDevice
from blockera.progress import progress
from blockera.units import SECTOR_BYTES

COPY_PIECE_BYTES = 4 << 20
COPY_THREADS = 4


@dataclass
class Round:
    """What one round did (the `--json` line)."""

    device: str
    mirror: str
    since_era: int | None
    next_era: int
    full: bool
    reason: str
    ranges: int
    bytes_copied: int
    verified_blocks: int
    seconds: float

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def mirror_key(mirror: str) -> str:
    return mirror if "://" in mirror else os.path.abspath(mirror)


def open_mirror(mirror: str, size_bytes: int) -> BlockDevice:
    """The mirror as a device: an NBD URI, a block device, or an image file (created, or
    extended from empty, to the device's size). A mirror of another size is refused."""
    if "://" in mirror:
        from blockera.nbd.client import open_nbd
        dev: BlockDevice = open_nbd(mirror, writable=True)
    else:
        if not os.path.exists(mirror) or (os.path.isfile(mirror) and
                                          os.path.getsize(mirror) == 0):
            with open(mirror, "ab") as f:
                f.truncate(size_bytes)
        dev = FileDevice(mirror, writable=True)
    if dev.size_bytes != size_bytes:
        actual = dev.size_bytes
        dev.close()
        raise UsageError(f"{mirror}: the mirror is {actual} bytes, the device {size_bytes}: "
                         "give a mirror of the same size")
    return dev


def _copy(source: BlockDevice, target: BlockDevice, ranges: list[tuple[int, int]],
          on_bytes: Callable[[int], object]) -> int:
    pieces = [(offset, min(COPY_PIECE_BYTES, end - offset))
              for begin, end in ranges for offset in range(begin, end, COPY_PIECE_BYTES)]

    def one(piece: tuple[int, int]) -> int:
        offset, length = piece
        target.write(offset, source.read(offset, length))
        on_bytes(length)
        return length

    with ThreadPoolExecutor(max_workers=COPY_THREADS) as pool:
        return sum(pool.map(one, pieces))


def _verify_sample(source: BlockDevice, target: BlockDevice, changed: list[tuple[int, int]],
                   record: TrackedDevice, percent: float, rng: random.Random) -> tuple[int, bool]:
    """Compare `percent` of the blocks not listed as changed; (blocks compared, all equal)."""
    block_bytes = record.block_sectors * SECTOR_BYTES
    nr_blocks = -(-record.size_sectors * SECTOR_BYTES // block_bytes)
    listed = set()
    for begin, end in changed:
        listed.update(range(begin // block_bytes, -(-end // block_bytes)))
    unchanged = nr_blocks - len(listed)
    want = min(unchanged, int(unchanged * percent / 100 + 0.999999)) if percent > 0 else 0
    picked: set[int] = set()
    while len(picked) < want:
        block = rng.randrange(nr_blocks)
        if block not in listed:
            picked.add(block)
    size = record.size_sectors * SECTOR_BYTES
    for block in sorted(picked):
        offset = block * block_bytes
        length = min(block_bytes, size - offset)
        if source.read(offset, length) != target.read(offset, length):
            return len(picked), False
    return len(picked), True


def replicate_once(engine: DmControl, state: StateDir, record: TrackedDevice, mirror: str, *,
                   cow: str | None = None, scratch_dir: str | None = None,
                   verify_percent: float = 1.0, show_progress: bool = False) -> Round:
    started = time.monotonic()
    key = mirror_key(mirror)
    since = record.starting_era(record.mirrors.get(key))
    reason = "changes since the last round" if since is not None else (
        "first round" if key not in record.mirrors else
        "tracking may have missed writes since the last round")
    size = record.size_sectors * SECTOR_BYTES
    target = open_mirror(mirror, size)
    try:
        nr_blocks = -(-record.size_sectors // record.block_sectors)
        cow_bytes = cow_bytes_for(record, changed_block_count(record.metadata, since, nr_blocks))
        with frozen_view(engine, record, cow=cow, cow_bytes=cow_bytes,
                         scratch_dir=scratch_dir) as view:
            ranges = view.changed_ranges_bytes(since)
            verified = 0
            if since is not None and verify_percent > 0:
                verified, same = _verify_sample(view.device, target, ranges, record,
                                                verify_percent, random.Random())
                if not same:
                    since = None
                    reason = ("a block not listed as changed differs on the mirror: copying "
                              "everything")
                    ranges = view.changed_ranges_bytes(None)
            total = sum(end - begin for begin, end in ranges)
            with progress(total, f"replicate {record.name}", force=show_progress) as bar:
                copied = _copy(view.device, target, ranges, bar.update)
            target.flush()
            next_era = view.next_era
    except OSError as exc:
        raise DeviceError(f"{mirror}: {exc.strerror or exc}") from None
    finally:
        target.close()
    record.mirrors[key] = {"epoch": record.epoch, "era": next_era}
    record.note_era(next_era)
    state.save(record)
    return Round(record.name, key, since, next_era, since is None, reason, len(ranges), copied,
                 verified, time.monotonic() - started)
