"""`blockera copy`: copy snapshots from one repository to another (docs/backup-repository.md
§22), e.g. from a fast local repository to an S3 bucket, with restic 0.14's rules:

* a source snapshot is skipped when the target already holds a copy of it: a snapshot whose
  `original` (or, if it has none, its own ID) is the source snapshot's `original` (or ID), and
  which has the same time, tree, host name, user name, uid, gid, paths, excludes and tags;
* every tree of a snapshot to copy is walked; each tree and data blob the target lacks is
  loaded from the source (verified: MAC, decompression, ID) and saved into the target, where
  it is compressed by the target's settings and encrypted with the target's key. A blob ID is
  the SHA-256 of the plaintext, so no tree changes and blobs already in the target (from its
  own backups or an earlier copy) are not transferred again;
* the copy has no `parent` (it means nothing in the target) and has `original` set to the
  source snapshot's `original`, or to the source snapshot's ID.

Per snapshot: its blobs are saved, then the target is flushed (packs, then index), then the
snapshot file is written, so an interrupted copy leaves at worst unreferenced packs, and the
snapshots already copied are complete. Both repositories hold non-exclusive locks (backups
may run meanwhile in either; prune may not).

    plan = plan_copy(source, target, source.list_snapshots())
    result = run_copy(source, target, plan)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from blockera.backup.blob_fetch import DEFAULT_THREADS, BlobFetcher
from blockera.backup.crypto import EXTENSION_BYTES
from blockera.backup.errors import RepositoryError
from blockera.backup.ids import BlobType, short
from blockera.backup.repository import BlobNotFoundError, Repository
from blockera.backup.snapshots import Snapshot


def similar(a: Snapshot, b: Snapshot) -> bool:
    """restic's test for "b is a copy of a": everything but parent and original is equal
    (paths and tags as sets of the same size, excludes in order)."""
    return (a.time.unix_ns == b.time.unix_ns and a.tree == b.tree
            and a.hostname == b.hostname and a.username == b.username
            and a.uid == b.uid and a.gid == b.gid
            and len(a.paths) == len(b.paths) and set(a.paths) == set(b.paths)
            and a.excludes == b.excludes
            and len(a.tags) == len(b.tags) and set(a.tags) == set(b.tags))


def persistent_id(snapshot: Snapshot) -> bytes:
    """The ID that follows a snapshot through copies: its `original`, else its own ID."""
    assert snapshot.id is not None
    return snapshot.original or snapshot.id


def find_copy(snapshot: Snapshot, by_original: dict[bytes, list[Snapshot]]) -> Snapshot | None:
    """The target snapshot that is already a copy of `snapshot`, if any."""
    for candidate in by_original.get(persistent_id(snapshot), []):
        if similar(candidate, snapshot):
            return candidate
    return None


@dataclass
class SnapshotCopy:
    """One source snapshot: skipped (`existing` is its copy in the target), or to copy with
    the blobs the target lacks that no earlier snapshot of this copy brings."""

    snapshot: Snapshot
    existing: Snapshot | None = None
    trees: list[bytes] = field(default_factory=list)
    data: list[bytes] = field(default_factory=list)
    data_bytes: int = 0
    """Plaintext bytes of `data`."""
    copy_id: bytes | None = None
    """The new snapshot's ID, once written."""


@dataclass
class CopyPlan:
    items: list[SnapshotCopy]

    @property
    def to_copy(self) -> list[SnapshotCopy]:
        return [i for i in self.items if i.existing is None]

    @property
    def data_bytes(self) -> int:
        return sum(i.data_bytes for i in self.items)


@dataclass
class CopyResult:
    plan: CopyPlan
    dry_run: bool = False
    duration_s: float = 0.0
    bytes_stored: int | None = None
    """Bytes of packs, index files and snapshots written to the target (when counted)."""

    def as_json(self) -> dict[str, object]:
        items = self.plan.items
        return {
            "dry_run": self.dry_run,
            "snapshots": [{"source": i.snapshot.id.hex() if i.snapshot.id else None,
                           "copy": (i.existing.id.hex() if i.existing and i.existing.id
                                    else i.copy_id.hex() if i.copy_id else None),
                           "skipped": i.existing is not None,
                           "data_blobs": len(i.data), "tree_blobs": len(i.trees),
                           "data_bytes": i.data_bytes} for i in items],
            "copied": sum(1 for i in items if i.existing is None),
            "skipped": sum(1 for i in items if i.existing is not None),
            "data_blobs": sum(len(i.data) for i in items),
            "tree_blobs": sum(len(i.trees) for i in items),
            "data_bytes": self.plan.data_bytes,
            "bytes_stored": self.bytes_stored,
            "duration_s": round(self.duration_s, 3),
        }


def _plaintext_bytes(repo: Repository, blob_id: bytes, blob_type: BlobType) -> int:
    found = repo.index.lookup(blob_id, blob_type)
    if found is None:
        raise BlobNotFoundError(f"{repo.location}: {blob_type.value} blob {short(blob_id)} "
                                "is not in the index; run `blockera check` on the source")
    return found.uncompressed_length_bytes or found.length_bytes - EXTENSION_BYTES


def plan_copy(source: Repository, target: Repository, snapshots: list[Snapshot]) -> CopyPlan:
    """Which snapshots need copying and which blobs each brings. Reads the source's trees;
    writes nothing. Both repositories' indexes must be loaded (their locks taken)."""
    by_original: dict[bytes, list[Snapshot]] = {}
    for s in target.list_snapshots():
        by_original.setdefault(persistent_id(s), []).append(s)
    planned: set[tuple[BlobType, bytes]] = set()
    visited: set[bytes] = set()
    items = []
    for snapshot in sorted(snapshots, key=lambda s: (s.time.unix_ns, s.id or b"")):
        item = SnapshotCopy(snapshot, find_copy(snapshot, by_original))
        items.append(item)
        if item.existing is not None:
            continue
        # trees already visited by an earlier snapshot of this copy bring nothing new
        stack = [snapshot.tree]
        while stack:
            tree_id = stack.pop()
            if tree_id in visited:
                continue
            visited.add(tree_id)
            if (BlobType.TREE, tree_id) not in planned and \
                    not target.has_blob(tree_id, BlobType.TREE):
                planned.add((BlobType.TREE, tree_id))
                item.trees.append(tree_id)
            for node in source.load_tree(tree_id).nodes:
                if node.type == "dir" and node.subtree is not None:
                    stack.append(node.subtree)
                elif node.type == "file":
                    for blob_id in node.content or ():
                        key = (BlobType.DATA, blob_id)
                        if key in planned or target.has_blob(blob_id, BlobType.DATA):
                            continue
                        planned.add(key)
                        item.data.append(blob_id)
                        item.data_bytes += _plaintext_bytes(source, blob_id, BlobType.DATA)
    return CopyPlan(items)


def copied_snapshot(snapshot: Snapshot) -> Snapshot:
    """The target's snapshot for a source snapshot: the same fields, no parent, `original`
    kept or set to the source's ID."""
    return Snapshot(tree=snapshot.tree, paths=list(snapshot.paths), time=snapshot.time,
                    parent=None, hostname=snapshot.hostname, username=snapshot.username,
                    uid=snapshot.uid, gid=snapshot.gid, excludes=list(snapshot.excludes),
                    tags=list(snapshot.tags), original=persistent_id(snapshot),
                    program_version=snapshot.program_version, summary=snapshot.summary)


def run_copy(source: Repository, target: Repository, plan: CopyPlan, *,
             threads: int = DEFAULT_THREADS,
             on_progress: Callable[[int], None] | None = None,
             on_snapshot: Callable[[SnapshotCopy], None] | None = None) -> CopyResult:
    """Copy the planned snapshots, oldest first: for each, its data blobs (loaded from the
    source by `threads` readers, saved in order), its trees, a flush, then the snapshot.
    `on_progress(n)` after each data blob (plaintext bytes); `on_snapshot(item)` after each
    snapshot written or skipped."""
    started = time.monotonic()
    fetcher: BlobFetcher[bytes] = BlobFetcher(source, threads=threads)
    for item in plan.items:
        if item.existing is None:
            for blob_id, data in fetcher.fetch((b, b, None) for b in item.data):
                if isinstance(data, BaseException):
                    raise data
                assert data is not None
                _save(target, BlobType.DATA, blob_id, data)
                if on_progress is not None:
                    on_progress(len(data))
            for tree_id in item.trees:
                _save(target, BlobType.TREE, tree_id, source.load_blob(tree_id, BlobType.TREE))
            item.copy_id = target.save_snapshot(copied_snapshot(item.snapshot))
        if on_snapshot is not None:
            on_snapshot(item)
    return CopyResult(plan, duration_s=time.monotonic() - started)


def _save(target: Repository, blob_type: BlobType, blob_id: bytes, data: bytes) -> None:
    saved = target.save_blob(blob_type, data)
    if saved != blob_id:  # load_blob verified the ID; this would be a bug
        raise RepositoryError(f"{blob_type.value} blob {short(blob_id)} changed while copied")

