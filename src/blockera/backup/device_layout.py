"""How a device backup is laid out in a snapshot (docs/backup-repository.md §14): the root
tree holds one file node named after the source, whose content is the device cut into
fixed-size data blobs; the snapshot's `paths` is the absolute source path, and its tags record
what a later incremental needs:

    blockera                      every device backup
    blockera:size=<bytes>         the source size
    blockera:chunk=<bytes>        the blob (chunk) size
    blockera:from=<how>           full | era | cow | changed
    blockera:era=<era>            the current era of the era metadata read (era incrementals
                                  and full backups given --era-metadata)
    blockera:era-id=<hex>-<sectors>
                                  that metadata's superblock UUID and era block size
    blockera:since=<era>          the era threshold a changed-block list was made with
    blockera:cow-chunk=<sectors>  the COW chunk size of a COW-driven incremental

Tags survive `restic tag --add/--remove` and every restic command that does not rewrite tags;
the size and chunk size are also recoverable from the tree and the index, so a snapshot whose
tags were replaced still restores and can still be a parent (era facts cannot be recovered:
an era incremental then needs an explicit --since).

This module also finds the file node of a snapshot (blockera's own or a file restic backed up)
and computes where each blob of it lies in the image (`ContentLayout`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from blockera.backup.crypto import EXTENSION_BYTES
from blockera.backup.ids import BlobType, short
from blockera.backup.job_errors import BackupInputError, DamagedBackupError
from blockera.backup.node import Node
from blockera.backup.repository import Repository
from blockera.backup.snapshots import Snapshot

TAG = "blockera"
_PREFIX = "blockera:"
MADE_FROM = ("full", "era", "cow", "changed")
MIN_CHUNK_BYTES = 64 << 10
MAX_CHUNK_BYTES = 8 << 20
DEFAULT_CHUNK_BYTES = 1 << 20


def check_chunk_bytes(chunk_bytes: int) -> None:
    if chunk_bytes < MIN_CHUNK_BYTES or chunk_bytes > MAX_CHUNK_BYTES or \
            chunk_bytes & (chunk_bytes - 1):
        raise BackupInputError(f"chunk size {chunk_bytes} bytes: it must be a power of two "
                               "from 64 KiB to 8 MiB")


def source_path(source: str) -> str:
    """The absolute path recorded as the snapshot's `paths` (symbolic links are kept as
    given: `/dev/vg/lv` stays `/dev/vg/lv`)."""
    return os.path.abspath(source)


def node_name(source: str) -> str:
    """The file node's name: the last component of the source path."""
    name = os.path.basename(source_path(source).rstrip("/"))
    return name or "device"


@dataclass
class DeviceFacts:
    """What a device snapshot records about how it was made (its `blockera:` tags)."""

    size_bytes: int
    chunk_bytes: int
    made_from: str = "full"
    era: int | None = None
    era_uuid: str | None = None
    era_block_sectors: int | None = None
    since: int | None = None
    cow_chunk_sectors: int | None = None
    extra: list[str] = field(default_factory=list)
    """Other tags of the snapshot (the user's), kept in order."""

    def tags(self) -> list[str]:
        tags = [TAG, f"{_PREFIX}size={self.size_bytes}", f"{_PREFIX}chunk={self.chunk_bytes}",
                f"{_PREFIX}from={self.made_from}"]
        if self.era is not None:
            tags.append(f"{_PREFIX}era={self.era}")
        if self.era_uuid is not None and self.era_block_sectors is not None:
            tags.append(f"{_PREFIX}era-id={self.era_uuid}-{self.era_block_sectors}")
        if self.since is not None:
            tags.append(f"{_PREFIX}since={self.since}")
        if self.cow_chunk_sectors is not None:
            tags.append(f"{_PREFIX}cow-chunk={self.cow_chunk_sectors}")
        return tags + [t for t in self.extra if t not in tags]

    @classmethod
    def from_tags(cls, tags: list[str]) -> "DeviceFacts | None":
        """The facts in a snapshot's tags; None when it carries no (usable) blockera tags."""
        values: dict[str, str] = {}
        extra = []
        for tag in tags:
            if tag.startswith(_PREFIX) and "=" in tag:
                key, _, value = tag[len(_PREFIX):].partition("=")
                values.setdefault(key, value)
            elif tag != TAG:
                extra.append(tag)
        if TAG not in tags:
            return None
        try:
            facts = cls(size_bytes=int(values["size"]), chunk_bytes=int(values["chunk"]),
                        made_from=values.get("from", "full"), extra=extra)
            if "era" in values:
                facts.era = int(values["era"])
            if "era-id" in values:
                uuid, _, sectors = values["era-id"].rpartition("-")
                facts.era_uuid, facts.era_block_sectors = uuid, int(sectors)
            if "since" in values:
                facts.since = int(values["since"])
            if "cow-chunk" in values:
                facts.cow_chunk_sectors = int(values["cow-chunk"])
        except (KeyError, ValueError):
            return None
        if facts.size_bytes < 0 or facts.chunk_bytes <= 0:
            return None
        return facts


def user_tags(snapshot: Snapshot) -> list[str]:
    """The snapshot's tags other than blockera's own."""
    return [t for t in snapshot.tags if t != TAG and not t.startswith(_PREFIX)]


def is_device_backup(snapshot: Snapshot) -> bool:
    return TAG in snapshot.tags


# -- finding the file ------------------------------------------------------------------------

def find_file_node(repo: Repository, snapshot: Snapshot, file_path: str | None = None
                   ) -> tuple[str, Node]:
    """The file node to restore: the one at `file_path` inside the snapshot, or, when not
    given, the snapshot's only file (descending through directories that hold a single
    entry, as restic roots a backed-up file under its whole path)."""
    tree = repo.load_tree(snapshot.tree)
    if file_path:
        parts = [p for p in file_path.split("/") if p]
        path = ""
        node: Node | None = None
        for i, part in enumerate(parts):
            node = tree.find(part)
            path += "/" + part
            if node is None:
                raise BackupInputError(f"snapshot {snapshot.short_id} has no {path}")
            if i < len(parts) - 1:
                if node.type != "dir" or node.subtree is None:
                    raise BackupInputError(f"snapshot {snapshot.short_id}: {path} is not a "
                                           "directory")
                tree = repo.load_tree(node.subtree)
        if node is None:
            raise BackupInputError("give a file path inside the snapshot, e.g. --file /vda")
    else:
        path = ""
        while True:
            if len(tree.nodes) != 1:
                names = ", ".join(sorted(n.name for n in tree.nodes)[:8]) or "nothing"
                raise BackupInputError(f"snapshot {snapshot.short_id} holds {path or '/'} "
                                       f"with {names}: choose the file with --file PATH")
            node = tree.nodes[0]
            path += "/" + node.name
            if node.type == "file":
                break
            if node.type != "dir" or node.subtree is None:
                raise BackupInputError(f"snapshot {snapshot.short_id}: {path} is a "
                                       f"{node.type}, not a file")
            tree = repo.load_tree(node.subtree)
    if node.type != "file" or node.content is None:
        raise BackupInputError(f"snapshot {snapshot.short_id}: {path} is a {node.type}, not a "
                               "file")
    return path, node


# -- where each blob lies ----------------------------------------------------------------------

@dataclass
class ContentLayout:
    """A file node's blobs and their byte ranges in the image: blob i covers
    [offsets_bytes[i], offsets_bytes[i + 1])."""

    ids: list[bytes]
    offsets_bytes: np.ndarray
    uniform_chunk_bytes: int | None = None
    """Set when every blob but the last has this size (a blockera device backup)."""

    @property
    def size_bytes(self) -> int:
        return int(self.offsets_bytes[-1])

    def __len__(self) -> int:
        return len(self.ids)

    def range_of(self, i: int) -> tuple[int, int]:
        return int(self.offsets_bytes[i]), int(self.offsets_bytes[i + 1])

    def blob_at(self, offset_bytes: int) -> int:
        """The index of the blob holding byte `offset_bytes`."""
        if self.uniform_chunk_bytes:
            return offset_bytes // self.uniform_chunk_bytes
        return int(np.searchsorted(self.offsets_bytes, offset_bytes, side="right")) - 1


def blob_plaintext_bytes(repo: Repository, blob_id: bytes) -> int | None:
    found = repo.index.lookup(blob_id, BlobType.DATA)
    if found is None:
        return None
    return found.uncompressed_length_bytes or found.length_bytes - EXTENSION_BYTES


def content_layout(repo: Repository, node: Node, facts: DeviceFacts | None,
                   what: str) -> ContentLayout:
    """Where each blob of `node` goes. A blockera snapshot (uniform chunks, recorded chunk
    size) needs no index lookups; any other file's blob lengths come from the index (a blob
    missing from the index makes the layout unknown from there on: an error)."""
    ids = list(node.content or [])
    n = len(ids)
    chunk = facts.chunk_bytes if facts is not None else None
    if chunk is None and n >= 2:
        # tags replaced: the first blob's length is the chunk size if the node is uniform
        first = blob_plaintext_bytes(repo, ids[0])
        if first and -(-node.size // first) == n:
            chunk = first
    if chunk and n == -(-node.size // chunk) and (n == 0 or node.size > (n - 1) * chunk):
        offsets = np.minimum(np.arange(n + 1, dtype=np.int64) * chunk, node.size)
        return ContentLayout(ids, offsets, chunk)
    lengths = np.zeros(n, dtype=np.int64)
    for i, blob_id in enumerate(ids):
        length = blob_plaintext_bytes(repo, blob_id)
        if length is None:
            raise DamagedBackupError(f"{what}: data blob {short(blob_id)} (blob {i} of the "
                                     "file) is in no index, so where the rest of the file lies "
                                     "is unknown; run `blockera check`")
        lengths[i] = length
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if int(offsets[-1]) != node.size:
        raise DamagedBackupError(f"{what}: its blobs hold {int(offsets[-1])} bytes, the file "
                                 f"node says {node.size}")
    return ContentLayout(ids, offsets)
