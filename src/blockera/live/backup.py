"""A consistent, incremental backup of a tracked device (docs/live-devices.md §6).

The device is frozen (`frozen_view`); the blocks written since the era the record gives for
this repository are listed from the era metadata snapshot, and the backup job reads the chunks
covering them from the frozen view and takes every other chunk's blob ID from the parent
snapshot. Only after the snapshot is saved does the record move on to the era the frozen view
began. On any doubt the backup reads the whole view, stores only what differs, and says why:
no parent, a parent other than the one recorded (someone else backed up the device, or the
recorded snapshot was forgotten), tracking lost since (a newer epoch), a device of another size,
or a sampled chunk that tracking calls unchanged but whose content differs from the parent's.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from blockera.backup.changes import ChangedRanges
from blockera.backup.device_backup import BackupOptions, BackupSummary, run_backup
from blockera.backup.device_layout import (DeviceFacts, content_layout, find_file_node,
                                           is_device_backup, source_path)
from blockera.backup.repository import Repository
from blockera.blockdev import BlockDevice
from blockera.live.engines import DmControl
from blockera.live.frozen import (FrozenView, changed_block_count, check_snapshot_valid,
                                  cow_bytes_for, frozen_view)
from blockera.live.state import StateDir, TrackedDevice

VERIFY_READ_BYTES = 8 << 20


@dataclass
class FrozenChanges:
    """The change source of the backup job: the frozen view's blocks written since `since`."""

    view: FrozenView
    since: int

    def changed_ranges(self, parent: DeviceFacts, source_size_bytes: int) -> ChangedRanges:
        ranges = self.view.changed_ranges_bytes(self.since)
        begins = np.array([b for b, _ in ranges], dtype=np.int64)
        ends = np.array([e for _, e in ranges], dtype=np.int64)
        return ChangedRanges(begins, ends, "era", self.facts(),
                             f"blocks written since era {self.since} (tracked device)")

    def facts(self) -> dict[str, int | str]:
        return {"era": self.view.next_era, "since": self.since,
                "era_block_sectors": self.view.record.block_sectors}

    def facts_for_full(self) -> dict[str, int | str]:
        return self.facts()


@dataclass
class FullWithFacts:
    """A full read that still records where the next incremental starts."""

    view: FrozenView

    def changed_ranges(self, parent: DeviceFacts, source_size_bytes: int) -> ChangedRanges:
        raise AssertionError("a full backup lists no changes")

    def facts_for_full(self) -> dict[str, int | str]:
        return {"era": self.view.next_era,
                "era_block_sectors": self.view.record.block_sectors}


@dataclass
class TrackedBackup:
    summary: BackupSummary
    full: bool
    reason: str
    verified_chunks: int
    notes: list[str] = field(default_factory=list)


def _latest_parent(repo: Repository, path: str, hostname: str | None):  # type: ignore[no-untyped-def]
    import socket
    host = hostname or socket.gethostname()
    candidates = [s for s in repo.list_snapshots()
                  if s.paths == [path] and s.hostname == host and is_device_backup(s)]
    if not candidates:
        return None
    return max(candidates, key=lambda s: (s.time.unix_ns, s.id or b""))


def _verify_sample(repo: Repository, parent, view: FrozenView, since: int,  # type: ignore[no-untyped-def]
                   percent: float, rng: random.Random) -> tuple[int, bool]:
    """Hash `percent` of the chunks the tracking lists as unchanged and compare them with the
    parent's blob IDs; (chunks compared, all equal)."""
    _name, node = find_file_node(repo, parent)
    facts = DeviceFacts.from_tags(parent.tags)
    layout = content_layout(repo, node, facts, f"parent snapshot {parent.short_id}")
    chunk = layout.uniform_chunk_bytes
    size = view.record.size_sectors * 512
    if chunk is None or node.size != size:
        return 0, False
    nr_chunks = len(layout.ids)
    listed = np.zeros(nr_chunks, dtype=bool)
    for begin, end in view.changed_ranges_bytes(since):
        listed[begin // chunk: -(-end // chunk)] = True
    unchanged = np.flatnonzero(~listed)
    want = min(len(unchanged), int(np.ceil(len(unchanged) * percent / 100))) if percent else 0
    picked = sorted(rng.sample(unchanged.tolist(), want)) if want else []
    for index in picked:
        offset = index * chunk
        data = _read(view.device, offset, min(chunk, size - offset))
        if hashlib.sha256(data).digest() != layout.ids[index]:
            return len(picked), False
    return len(picked), True


def _read(device: BlockDevice, offset: int, length: int) -> bytes:
    parts = []
    for start in range(offset, offset + length, VERIFY_READ_BYTES):
        parts.append(device.read(start, min(VERIFY_READ_BYTES, offset + length - start)))
    return b"".join(parts)


def backup_tracked(repo: Repository, repo_key: str, engine: DmControl, state: StateDir,
                   record: TrackedDevice, *, hostname: str | None = None,
                   chunk_bytes: int | None = None, tags: list[str] | None = None,
                   cow: str | None = None, scratch_dir: str | None = None,
                   verify_percent: float = 1.0,
                   on_plan: Callable[[int], None] | None = None,
                   on_progress: Callable[[int], None] | None = None) -> TrackedBackup:
    """Back up the tracked device into `repo` (see the module docstring)."""
    path = source_path(f"/dev/mapper/{record.name}")
    point = record.backups.get(repo_key)
    since = record.starting_era(point)
    parent = _latest_parent(repo, path, hostname)
    reason = "changes since the last backup"
    if parent is None:
        since, reason = None, "no earlier backup of this device in the repository"
    elif point is None:
        since, reason = None, "first backup of this device into this repository"
    elif since is None:
        reason = (f"tracking may have missed writes since the last backup "
                  f"({record.lost[-1] if record.lost else 'a newer epoch'})")
    elif point.get("snapshot") != (parent.id.hex() if parent.id else None):
        since, reason = None, ("the latest backup of this device is not the one this host "
                               "recorded (another backup, or the recorded one was forgotten)")
    elif chunk_bytes is not None and \
            chunk_bytes != DeviceFacts.from_tags(parent.tags).chunk_bytes:
        since, reason = None, "a new chunk size: every chunk is read again"
    nr_blocks = -(-record.size_sectors // record.block_sectors)
    cow_bytes = cow_bytes_for(record, changed_block_count(record.metadata, since, nr_blocks))
    verified = 0
    with frozen_view(engine, record, cow=cow, cow_bytes=cow_bytes,
                     scratch_dir=scratch_dir) as view:
        if since is not None and verify_percent > 0:
            verified, same = _verify_sample(repo, parent, view, since, verify_percent,
                                            random.Random())
            if not same:
                since, reason = None, ("a chunk the tracking lists as unchanged differs from "
                                       "the parent backup: reading everything")
        changes = FrozenChanges(view, since) if since is not None else FullWithFacts(view)
        options = BackupOptions(source=path, chunk_bytes=chunk_bytes, hostname=hostname,
                                parent=parent.id.hex() if parent is not None and parent.id
                                else None,
                                changes=changes, full=since is None, tags=list(tags or []),
                                before_save=lambda: check_snapshot_valid(engine, record))
        summary = run_backup(repo, view.device, options, on_plan=on_plan,
                             on_progress=on_progress)
        next_era = view.next_era
    record.backups[repo_key] = {"epoch": record.epoch, "era": next_era,
                                "snapshot": summary.snapshot_id or ""}
    record.note_era(next_era)
    state.save(record)
    return TrackedBackup(summary, since is None, reason, verified)
