"""A frozen view of a live tracked device, and the blocks written since an era up to it
(docs/live-devices.md §3).

The device NAME is an era layer over NAME-real. For the view, NAME is suspended (the era
target commits its metadata and archives the current writeset), a snapshot NAME-snap of
NAME-real (its COW on a scratch file or a device the caller gives) and a snapshot-origin
NAME-origin over NAME-real are created, NAME is reloaded with its era layer over NAME-origin,
and resumed: from then on every write to NAME copies the old data to the snapshot first. Then
the era metadata snapshot is taken, and the changed blocks are read from it. Writes made after
the suspend land in the era that the resume began (or later), so "since that era" is where the
next run starts: nothing is skipped, and at most a few blocks are read twice. Leaving the view
puts everything back (drop the metadata snapshot, reload NAME over NAME-real, remove the
snapshot stack); a view left by a killed process is put back by `stack.repair`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from blockera.blockdev import BlockDevice, FileDevice
from blockera.era.image import EraImage, mask_to_ranges
from blockera.errors import BlockeraError, DeviceError, NoSpaceError
from blockera.live import engines
from blockera.live.engines import DmControl
from blockera.live.metadata import kernel_metadata_device, open_metadata
from blockera.live.stack import era_table, repair
from blockera.live.state import TrackedDevice
from blockera.units import SECTOR_BYTES

COW_CHUNK_SECTORS = 16                    # 8 KiB
MIN_COW_BYTES = 64 << 20


class SnapshotOverflowError(NoSpaceError):
    """The COW filled up while the view was in use: the snapshot is invalid, so what was read
    from it cannot be trusted."""


@dataclass
class FrozenView:
    """The snapshot of the device as of the suspend (`device`, to read), the era the next run
    starts from (`next_era`), and the era metadata snapshot for `changed_since`."""

    record: TrackedDevice
    device: BlockDevice
    next_era: int
    metadata: BlockDevice

    def changed_ranges_bytes(self, since_era: int | None) -> list[tuple[int, int]]:
        """[begin, end) byte ranges of the device written since `since_era` (up to at least the
        frozen moment); everything when `since_era` is None."""
        size_bytes = self.record.size_sectors * SECTOR_BYTES
        if since_era is None:
            return [(0, size_bytes)] if size_bytes else []
        mask = EraImage(self.metadata, use_snapshot=True).changed_since(since_era)
        begins, ends = mask_to_ranges(mask)
        block_bytes = self.record.block_sectors * SECTOR_BYTES
        return [(b * block_bytes, min(e * block_bytes, size_bytes))
                for b, e in zip(begins.tolist(), ends.tolist()) if b * block_bytes < size_bytes]


def cow_bytes_for(record: TrackedDevice, changed_blocks: int) -> int:
    """A scratch COW big enough for as much new writing during the view as was written since
    the last run, with a floor (the COW only has to absorb writes made while the view is
    open)."""
    size = record.size_sectors * SECTOR_BYTES
    changed = changed_blocks * record.block_sectors * SECTOR_BYTES
    return min(max(MIN_COW_BYTES, 2 * changed), size + (16 << 20))


@contextlib.contextmanager
def frozen_view(engine: DmControl, record: TrackedDevice, *, cow: str | None = None,
                cow_bytes: int | None = None, scratch_dir: str | None = None
                ) -> Iterator[FrozenView]:
    """Freeze the device (see the module docstring); `cow` is a file or device to hold the
    snapshot's copies, else a scratch file of `cow_bytes` in `scratch_dir` is made and removed.
    """
    repair(engine, record)
    name = record.name
    era_before, _ = engines.era_status(engine, name)
    with contextlib.ExitStack() as cleanup:
        cow_path = cow or _scratch_cow(cleanup, cow_bytes or MIN_COW_BYTES, scratch_dir)
        cow_device = kernel_metadata_device(cow_path) if record.engine == "kernel" \
            else os.path.abspath(cow_path)
        if record.engine == "kernel" and cow is None:
            cleanup.callback(_detach_loop, cow_device)
        with FileDevice(cow_path, writable=True) as dev:      # a fresh persistent store
            dev.write(0, bytes(COW_CHUNK_SECTORS * SECTOR_BYTES))
            dev.flush()
        cleanup.callback(_put_back, engine, record)
        _stack_snapshot(engine, record, cow_device)
        engine.message(name, 0, ["take_metadata_snap"])
        metadata = open_metadata(record)
        cleanup.callback(metadata.close)
        snapshot = engine.device(record.snapshot_name)
        cleanup.callback(snapshot.close)
        view = FrozenView(record, snapshot, era_before + 1, metadata)
        yield view
        check_snapshot_valid(engine, record)


def check_snapshot_valid(engine: DmControl, record: TrackedDevice) -> None:
    words = engine.status(record.snapshot_name).split()
    if len(words) >= 4 and words[3] in ("Invalid", "Overflow"):
        raise SnapshotOverflowError(
            f"{record.snapshot_name}: the snapshot's COW filled up while it was read (status "
            f"{words[3]}): nothing read from it is kept; give a larger --cow")


def _scratch_cow(cleanup: contextlib.ExitStack, size_bytes: int, directory: str | None) -> str:
    fd, path = tempfile.mkstemp(prefix="blockera-cow-", suffix=".img", dir=directory)
    os.close(fd)
    cleanup.callback(os.unlink, path)
    with open(path, "r+b") as f:
        f.truncate(size_bytes)
    return path


def _detach_loop(loop: str) -> None:
    import subprocess
    subprocess.run(["losetup", "--detach", loop], capture_output=True)


def _stack_snapshot(engine: DmControl, record: TrackedDevice, cow_device: str) -> None:
    name, real = record.name, record.real_name
    size = record.size_sectors
    with engines.signals_held():
        engine.suspend(name)
        try:
            engine.create(record.snapshot_name,
                          f"0 {size} snapshot {engines.device_path(real)} {cow_device} P "
                          f"{COW_CHUNK_SECTORS}")
            engine.create(record.origin_name,
                          f"0 {size} snapshot-origin {engines.device_path(real)}")
            engine.load(name, era_table(record, record.origin_name))
        except BlockeraError:
            engine.resume(name)       # NAME's own table; `_put_back` removes what was made
            raise
        engine.resume(name)


def _put_back(engine: DmControl, record: TrackedDevice) -> None:
    """Undo the view whatever state it reached (the same as `repair`, which also drops the
    metadata snapshot)."""
    try:
        repair(engine, record)
    except BlockeraError as exc:
        raise DeviceError(f"{record.name}: could not put the stack back after the frozen view "
                          f"({exc}); run 'blockera activate {record.name}' to finish") from None


def changed_block_count(metadata_path: str, since_era: int | None, nr_blocks: int) -> int:
    """Blocks written since an era according to the live metadata (for sizing a COW)."""
    if since_era is None:
        return nr_blocks
    try:
        with FileDevice(metadata_path, writable=False) as dev:
            return int(np.count_nonzero(EraImage(dev).changed_since(since_era)))
    except BlockeraError:
        return nr_blocks
