"""The backup job: one device (an image file, a block device or an engine device) into one
snapshot (docs/backup-repository.md §14 layout, §15 the job).

    summary = run_backup(repo, device, BackupOptions(source="/dev/vda", changes=...))

A **full** backup reads the whole source; an **incremental** one takes changed ranges from a
change source (era metadata, a COW store, or their JSON), reads only the chunks that cover
them and takes every other chunk's blob ID from the parent snapshot (the latest device backup
of the same source path and host, or the one named). Either way only blobs the repository
lacks are stored; an all-zero chunk is one known blob, hashed once.

One backup of a source runs at a time (`source_lock`). The source is read ahead in large
sequential reads by a background thread, hashed in this thread and compressed and encrypted
by the repository's workers, with bounded memory. Writing follows the repository's order (packs, index, snapshot) under a non-exclusive repository lock,
so a crash never leaves a snapshot pointing at missing data.
"""

from __future__ import annotations

import hashlib
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np

from blockera.backup.changes import ChangedRanges, EraChanges, chunks_covering, cow_ranges, \
    json_ranges
from blockera.backup.counting import CountingBackend
from blockera.backup.device_layout import (DEFAULT_CHUNK_BYTES, DeviceFacts, check_chunk_bytes,
                                           content_layout, find_file_node, is_device_backup,
                                           node_name, source_path)
from blockera.backup.gojson import GoTime
from blockera.backup.ids import BlobType
from blockera.backup.job_errors import BackupInputError
from blockera.backup.node import Node
from blockera.backup.read_ahead import ReadAhead
from blockera.backup.repository import Repository
from blockera.backup.snapshots import Snapshot
from blockera.backup.source_lock import SourceLock
from blockera.backup.tree import Tree
from blockera.blockdev import BlockDevice
from blockera.units import div_up


class ChangeSource(Protocol):
    """Where an incremental backup's changed ranges come from."""

    def changed_ranges(self, parent: DeviceFacts, source_size_bytes: int) -> ChangedRanges: ...

    def facts_for_full(self) -> dict[str, int | str]:
        """What a full backup given this source records for the next incremental."""
        ...


@dataclass
class EraMetadataSource:
    """Era metadata read directly; `since` defaults to the era the parent recorded."""

    era: EraChanges
    since: int | None = None

    def changed_ranges(self, parent: DeviceFacts, source_size_bytes: int) -> ChangedRanges:
        what = f"era metadata {self.era.name}"
        if parent.era_uuid is not None and (parent.era_uuid != self.era.uuid_hex
                                            or parent.era_block_sectors != self.era.block_sectors):
            raise BackupInputError(
                f"{what} is not the metadata the parent backup was taken with (UUID "
                f"{self.era.uuid_hex}, {self.era.block_sectors}-sector blocks; the parent "
                f"recorded {parent.era_uuid}, {parent.era_block_sectors}-sector blocks); run a "
                "full backup")
        if parent.era is not None and self.era.current_era < parent.era:
            raise BackupInputError(
                f"{what} is at era {self.era.current_era}, before era {parent.era} that the "
                "parent backup recorded: the metadata was recreated or rolled back, so writes "
                "since the parent may be missing from it; run a full backup")
        since = self.since
        if since is None:
            if parent.era is None:
                raise BackupInputError(
                    "the parent backup recorded no era (it was not taken with era "
                    "metadata): give --since ERA, the era that was current when the parent's "
                    "data was read, or run a full backup")
            since = parent.era
        return self.era.ranges(since, source_size_bytes)

    def facts_for_full(self) -> dict[str, int | str]:
        return {"era": self.era.current_era, "era_uuid": self.era.uuid_hex,
                "era_block_sectors": self.era.block_sectors}


@dataclass
class CowSource:
    """A COW store: the chunks written on the origin since its snapshot was created."""

    device: BlockDevice

    def changed_ranges(self, parent: DeviceFacts, source_size_bytes: int) -> ChangedRanges:
        return cow_ranges(self.device, source_size_bytes)

    def facts_for_full(self) -> dict[str, int | str]:
        return {}


@dataclass
class JsonSource:
    """`blockera era invalidate --json` or `blockera cow changed --json` output."""

    raw: bytes
    name: str

    def changed_ranges(self, parent: DeviceFacts, source_size_bytes: int) -> ChangedRanges:
        return json_ranges(self.raw, source_size_bytes, self.name)

    def facts_for_full(self) -> dict[str, int | str]:
        return {}


@dataclass
class BackupOptions:
    source: str
    """The source path as given (made absolute for the snapshot's `paths`)."""
    chunk_bytes: int | None = None
    """None: the parent's chunk size, or 1 MiB."""
    hostname: str | None = None
    parent: str | None = None
    """A snapshot ID (prefix) to use as the parent instead of the latest of this source."""
    changes: ChangeSource | None = None
    full: bool = False
    """Read everything even with a change source (which then only records its position)."""
    tags: list[str] = field(default_factory=list)
    time: GoTime | None = None
    dry_run: bool = False
    before_save: Callable[[], None] | None = None
    """Called once every chunk is read and stored, before the tree and the snapshot are saved:
    the last word of a source that can only tell then whether what was read is sound (a
    snapshot that overflowed). An exception from it ends the backup with no snapshot saved."""


@dataclass
class BackupSummary:
    source: str
    snapshot_id: str | None
    parent_id: str | None
    made_from: str
    size_bytes: int
    chunk_bytes: int
    chunks_total: int
    chunks_reused: int
    chunks_read: int
    chunks_new: int
    bytes_read: int
    bytes_new: int
    bytes_stored: int | None
    duration_s: float
    dry_run: bool
    changes: str = ""

    def as_json(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class _Parent:
    snapshot: Snapshot
    facts: DeviceFacts
    content: list[bytes]


def _find_parent(repo: Repository, options: BackupOptions, path: str,
                 hostname: str) -> _Parent | None:
    if options.parent is not None:
        snapshot = repo.find_snapshot(options.parent)
    else:
        candidates = [s for s in repo.list_snapshots()
                      if s.paths == [path] and s.hostname == hostname and is_device_backup(s)]
        if not candidates:
            return None
        snapshot = max(candidates, key=lambda s: (s.time.unix_ns, s.id or b""))
    _file, node = find_file_node(repo, snapshot)
    facts = DeviceFacts.from_tags(snapshot.tags)
    layout = content_layout(repo, node, facts, f"parent snapshot {snapshot.short_id}")
    if layout.uniform_chunk_bytes is None:
        raise BackupInputError(f"snapshot {snapshot.short_id} is not a device backup (its blobs "
                               "are not of one size), so it cannot be a parent: run a full "
                               "backup")
    if facts is None:
        facts = DeviceFacts(size_bytes=node.size, chunk_bytes=layout.uniform_chunk_bytes)
    elif facts.size_bytes != node.size or facts.chunk_bytes != layout.uniform_chunk_bytes:
        raise BackupInputError(f"snapshot {snapshot.short_id}: its tags do not match its file "
                               "node (size or chunk size); it cannot be a parent")
    return _Parent(snapshot, facts, layout.ids)


def run_backup(repo: Repository, device: BlockDevice, options: BackupOptions, *,
               on_progress: Callable[[int], None] | None = None,
               on_plan: Callable[[int], None] | None = None) -> BackupSummary:
    """Back up `device` into `repo` (see the module docstring). `on_plan(bytes_to_read)` is
    called once the plan is known, `on_progress(bytes)` as chunks are read. Refused with
    `SourceBusyError` while another backup of the same source runs (a dry run takes no
    lock)."""
    if options.dry_run:
        return _run_backup(repo, device, options, on_progress, on_plan)
    with SourceLock(options.source):
        return _run_backup(repo, device, options, on_progress, on_plan)


@dataclass
class _Plan:
    parent: _Parent | None
    incremental: bool
    chunk_bytes: int
    to_read: np.ndarray
    content: list[bytes]
    facts: DeviceFacts
    summary: BackupSummary


def _make_plan(repo: Repository, options: BackupOptions, size_bytes: int, path: str,
               hostname: str) -> _Plan:
    """Which parent, chunk size and chunks to read (nothing is read or written)."""
    parent = _find_parent(repo, options, path, hostname)
    incremental = options.changes is not None and not options.full
    changed: ChangedRanges | None = None
    if incremental:
        if parent is None:
            raise BackupInputError(
                f"{path}: no earlier backup of this source from host {hostname} to build an "
                "incremental on; run a full backup first (without change options, or with "
                "--full to record the change source's position)")
        if parent.facts.size_bytes != size_bytes:
            raise BackupInputError(
                f"{path} is {size_bytes} bytes, but the parent snapshot "
                f"{parent.snapshot.short_id} is {parent.facts.size_bytes} bytes: the device "
                "was resized, so its changes cannot be applied to the parent; run a full "
                "backup")
        if options.chunk_bytes is not None and options.chunk_bytes != parent.facts.chunk_bytes:
            raise BackupInputError(
                f"--chunk-size {options.chunk_bytes} differs from the parent's chunk size "
                f"{parent.facts.chunk_bytes}: an incremental keeps its parent's chunk size "
                "(run a full backup to change it)")
        chunk_bytes = parent.facts.chunk_bytes
        assert options.changes is not None
        changed = options.changes.changed_ranges(parent.facts, size_bytes)
    else:
        chunk_bytes = options.chunk_bytes or (parent.facts.chunk_bytes if parent is not None
                                              else DEFAULT_CHUNK_BYTES)
        check_chunk_bytes(chunk_bytes)

    nr_chunks = div_up(size_bytes, chunk_bytes)
    if changed is not None:
        assert parent is not None
        to_read = np.flatnonzero(chunks_covering(changed.begins_bytes, changed.ends_bytes,
                                                 chunk_bytes, nr_chunks))
        content: list[bytes] = list(parent.content)
        made_from = changed.made_from
        facts_extra = dict(changed.facts)
    else:
        to_read = np.arange(nr_chunks, dtype=np.int64)
        content = [b""] * nr_chunks
        made_from = "full"
        facts_extra = options.changes.facts_for_full() if options.changes is not None else {}
    bytes_to_read = int(len(to_read)) * chunk_bytes
    if len(to_read) and int(to_read[-1]) == nr_chunks - 1:
        bytes_to_read -= nr_chunks * chunk_bytes - size_bytes
    facts = DeviceFacts(size_bytes=size_bytes, chunk_bytes=chunk_bytes, made_from=made_from,
                        extra=list(options.tags), **facts_extra)  # type: ignore[arg-type]
    summary = BackupSummary(
        source=path, snapshot_id=None,
        parent_id=parent.snapshot.id.hex() if parent is not None and incremental
        and parent.snapshot.id else None,
        made_from=made_from, size_bytes=size_bytes, chunk_bytes=chunk_bytes,
        chunks_total=nr_chunks, chunks_reused=nr_chunks - len(to_read), chunks_read=len(to_read),
        chunks_new=0, bytes_read=bytes_to_read, bytes_new=0, bytes_stored=None, duration_s=0.0,
        dry_run=options.dry_run, changes=changed.description if changed is not None else "")
    return _Plan(parent, incremental, chunk_bytes, to_read, content, facts, summary)


def _run_backup(repo: Repository, device: BlockDevice, options: BackupOptions,
                on_progress: Callable[[int], None] | None,
                on_plan: Callable[[int], None] | None) -> BackupSummary:
    started = time.monotonic()
    begin_time = options.time or GoTime.now()
    size_bytes = device.size_bytes
    path = source_path(options.source)
    if size_bytes <= 0:
        raise BackupInputError(f"{options.source}: the source is empty (0 bytes)")
    hostname = options.hostname if options.hostname is not None else socket.gethostname()
    if options.chunk_bytes is not None:
        check_chunk_bytes(options.chunk_bytes)
    if options.dry_run:
        plan = _make_plan(repo, options, size_bytes, path, hostname)
        if on_plan is not None:
            on_plan(plan.summary.bytes_read)
        plan.summary.duration_s = round(time.monotonic() - started, 3)
        return plan.summary

    counter = repo.backend if isinstance(repo.backend, CountingBackend) else None
    stored_before = counter.stored_bytes() if counter is not None else 0
    # the lock (which loads the index) comes first: the parent and its blobs are then looked
    # up in an index no prune can change under us. Its recheck of the other locks waits for
    # the first write, so the index loads and the source is read meanwhile
    with repo.lock(defer_recheck=True):
        plan = _make_plan(repo, options, size_bytes, path, hostname)
        summary, content = plan.summary, plan.content
        if on_plan is not None:
            on_plan(summary.bytes_read)
        zero_ids: dict[int, bytes] = {}
        zero = bytes(plan.chunk_bytes)
        for i, view in ReadAhead(device, size_bytes, plan.chunk_bytes, plan.to_read):
            chunk = bytes(view)
            length = len(chunk)
            if chunk == zero[:length]:
                blob_id = zero_ids.get(length)
                if blob_id is None:
                    blob_id, new = repo.store_blob(BlobType.DATA, chunk)
                    zero_ids[length] = blob_id
                else:
                    new = False
            else:
                blob_id, new = repo.store_blob(BlobType.DATA, chunk)
            content[i] = blob_id
            if new:
                summary.chunks_new += 1
                summary.bytes_new += length
            if on_progress is not None:
                on_progress(length)
        if options.before_save is not None:
            options.before_save()
        node = Node.file(node_name(options.source), size_bytes, content, mode=0o600,
                         mtime=begin_time)
        tree_id = repo.save_tree(Tree([node]))
        parent_id = plan.parent.snapshot.id if plan.parent is not None and plan.incremental \
            else None
        snapshot = Snapshot.new(tree_id, [path], tags=plan.facts.tags(), parent=parent_id,
                                hostname=hostname, time=begin_time)
        snapshot_id = repo.save_snapshot(snapshot)
    summary.snapshot_id = snapshot_id.hex()
    if counter is not None:
        summary.bytes_stored = counter.stored_bytes() - stored_before
    summary.duration_s = round(time.monotonic() - started, 3)
    return summary


def zero_blob_id(length_bytes: int) -> bytes:
    """The blob ID of `length_bytes` zero bytes."""
    return hashlib.sha256(bytes(length_bytes)).digest()
