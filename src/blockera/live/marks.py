"""Marks and cache invalidation (docs/live-devices.md §5): `mark` checkpoints the era target and
records the new era under a name (for instance when a storage-side snapshot is taken); after a
rollback to that snapshot, `changed_since_mark` gives exactly the blocks written after the mark,
which a cache above the device must drop. A mark taken before tracking was lost cannot answer:
then every block is listed, and the answer says why.
"""

from __future__ import annotations

from dataclasses import dataclass


from blockera.era.image import EraImage, mask_to_ranges
from blockera.errors import UsageError
from blockera.live import engines
from blockera.live.engines import DmControl
from blockera.live.metadata import open_metadata
from blockera.live.state import StateDir, TrackedDevice
from blockera.live.stack import repair
from blockera.units import SECTOR_BYTES


@dataclass
class Invalidation:
    """Blocks written since a mark: [begin, end) ranges in era blocks of `block_sectors`."""

    device: str
    mark: str
    since_era: int | None
    block_sectors: int
    size_sectors: int
    ranges: list[tuple[int, int]]
    reason: str

    def sector_ranges(self) -> list[tuple[int, int]]:
        bs = self.block_sectors
        return [(b * bs, min(e * bs, self.size_sectors)) for b, e in self.ranges]

    def byte_ranges(self) -> list[tuple[int, int]]:
        return [(b * SECTOR_BYTES, e * SECTOR_BYTES) for b, e in self.sector_ranges()]

    def as_dict(self) -> dict[str, object]:
        return {"device": self.device, "mark": self.mark, "since_era": self.since_era,
                "block_size_sectors": self.block_sectors, "ranges": self.ranges,
                "sector_ranges": self.sector_ranges(), "reason": self.reason}


def mark(engine: DmControl, state: StateDir, record: TrackedDevice, name: str) -> int:
    """Checkpoint and record the new era under `name` (replacing a mark of that name)."""
    if not name or "/" in name:
        raise UsageError(f"{name!r} cannot name a mark")
    repair(engine, record)
    engine.message(record.name, 0, ["checkpoint"])
    era, _ = engines.era_status(engine, record.name)
    record.marks[name] = {"epoch": record.epoch, "era": era}
    record.note_era(era)
    state.save(record)
    return era


def changed_since_mark(engine: DmControl, record: TrackedDevice, name: str) -> Invalidation:
    point = record.marks.get(name)
    if point is None:
        known = ", ".join(sorted(record.marks)) or "none"
        raise UsageError(f"{record.name} has no mark {name!r} (marks: {known})")
    nr_blocks = -(-record.size_sectors // record.block_sectors)
    since = record.starting_era(point)
    if since is None:
        return Invalidation(record.name, name, None, record.block_sectors, record.size_sectors,
                            [(0, nr_blocks)], "tracking may have missed writes since the mark "
                            f"({record.lost[-1] if record.lost else 'epoch changed'}): every "
                            "block is listed")
    repair(engine, record)
    engine.message(record.name, 0, ["take_metadata_snap"])
    try:
        with open_metadata(record) as dev:
            mask = EraImage(dev, use_snapshot=True).changed_since(since)[:nr_blocks]
    finally:
        engine.message(record.name, 0, ["drop_metadata_snap"])
    begins, ends = mask_to_ranges(mask)
    return Invalidation(record.name, name, since, record.block_sectors, record.size_sectors,
                        list(zip(begins.tolist(), ends.tolist())),
                        f"blocks written since era {since}")
