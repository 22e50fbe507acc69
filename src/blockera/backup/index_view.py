"""Every index file as written, pack by pack (docs/backup-repository.md §18): what `check`
and `prune` need and the master index does not keep. The master index answers "where is blob
X?" with one location and drops the others; a pack's size, its header and a rewritten index
need every entry of every pack, including a blob stored twice. Entries are kept in numpy
columns; a pack listed by several index files (an interrupted prune leaves that) has its
entries counted once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from blockera.backup.backend import FileType
from blockera.backup.crypto import EXTENSION_BYTES
from blockera.backup.errors import BackendNotFoundError, RepositoryError
from blockera.backup.ids import ID_BYTES, BlobType, is_id_hex, short
from blockera.backup.index import IndexColumns, IndexFile
from blockera.backup.pack import (COMPRESSED_ENTRY_BYTES, HEADER_LENGTH_BYTES, PLAIN_ENTRY_BYTES,
                                  PackEntry)
from blockera.backup.repository import Repository

_TYPES = (BlobType.DATA, BlobType.TREE)


@dataclass
class PackEntries:
    """The blobs an index lists for one pack, ordered by offset."""

    pack_id: bytes
    ids: np.ndarray          # (n, 32) uint8
    types: np.ndarray        # 0 data, 1 tree
    offsets: np.ndarray
    lengths: np.ndarray
    ulengths: np.ndarray
    index_files: set[str] = field(default_factory=set)

    def __len__(self) -> int:
        return len(self.types)

    def size_bytes(self) -> int:
        """The pack file's size these entries imply (blobs, encrypted header, its length)."""
        header = int(np.where(self.ulengths > 0, COMPRESSED_ENTRY_BYTES,
                              PLAIN_ENTRY_BYTES).sum())
        return int(self.lengths.sum()) + header + EXTENSION_BYTES + HEADER_LENGTH_BYTES

    def entries(self) -> list[PackEntry]:
        ids = self.ids.tobytes()
        return [PackEntry(_TYPES[t], ids[k * ID_BYTES:(k + 1) * ID_BYTES], o, n, u)
                for k, (t, o, n, u) in enumerate(zip(self.types.tolist(), self.offsets.tolist(),
                                                     self.lengths.tolist(),
                                                     self.ulengths.tolist()))]

    def blob_type(self) -> BlobType | None:
        """The pack's blob type (None: mixed or empty)."""
        kinds = set(self.types.tolist())
        return _TYPES[kinds.pop()] if len(kinds) == 1 else None

    def gaps_or_overlaps(self) -> bool:
        ends = self.offsets.astype(np.int64) + self.lengths
        return bool(len(self) and (int(self.offsets[0]) != 0
                                   or (self.offsets[1:].astype(np.int64) != ends[:-1]).any()))


@dataclass
class IndexView:
    index_files: list[str]
    packs: dict[bytes, PackEntries]
    errors: list[str]

    def blob_count(self) -> int:
        return sum(len(p) for p in self.packs.values())

    def all_ids(self, blob_type: BlobType) -> np.ndarray:
        """Sorted unique IDs of one blob type (as 32-byte strings)."""
        code = _TYPES.index(blob_type)
        parts = [p.ids[p.types == code] for p in self.packs.values()]
        if not parts:
            return np.zeros(0, dtype="S32")
        joined = np.ascontiguousarray(np.concatenate(parts))
        return np.unique(joined.view("S32").reshape(-1))

    def index_file(self, packs: list[bytes], supersedes: list[bytes]) -> IndexFile:
        return IndexFile([(pid, self.packs[pid].entries()) for pid in packs], supersedes)


def load_index_view(repo: Repository, *, strict: bool) -> IndexView:
    """Read every index file. A file that cannot be read is an error (raised with `strict`,
    else recorded in `errors`)."""
    names = sorted(fi.name for fi in repo.backend.list(FileType.INDEX) if is_id_hex(fi.name))
    per_pack: dict[bytes, list[tuple[str, IndexColumns, int, int]]] = {}
    errors: list[str] = []
    loaded: list[str] = []
    for name in names:
        what = f"index {name[:8]} in {repo.location}"
        try:
            cols = IndexColumns.parse(repo.load_unpacked(FileType.INDEX, name), what)
        except BackendNotFoundError:
            continue  # removed (prune) while listing
        except RepositoryError as exc:
            if strict:
                raise
            errors.append(f"index {name[:8]} cannot be read: {exc}")
            continue
        loaded.append(name)
        start = 0
        for pack_id, count in zip(cols.pack_ids, cols.counts.tolist()):
            per_pack.setdefault(pack_id, []).append((name, cols, start, start + count))
            start += count
    packs: dict[bytes, PackEntries] = {}
    for pack_id, parts in per_pack.items():
        ids = np.concatenate([c.ids[a:b] for _, c, a, b in parts])
        types = np.concatenate([c.types[a:b] for _, c, a, b in parts])
        offsets = np.concatenate([c.offsets[a:b] for _, c, a, b in parts]).astype(np.int64)
        lengths = np.concatenate([c.lengths[a:b] for _, c, a, b in parts]).astype(np.int64)
        ulengths = np.concatenate([c.ulengths[a:b] for _, c, a, b in parts]).astype(np.int64)
        # the same entry listed by several index files counts once
        keys = np.concatenate([ids, types[:, None], offsets.astype(">u8").view(np.uint8)
                               .reshape(-1, 8)], axis=1)
        _, first = np.unique(np.ascontiguousarray(keys).view(f"V{keys.shape[1]}").reshape(-1),
                             return_index=True)
        order = first[np.argsort(offsets[first], kind="stable")]
        packs[pack_id] = PackEntries(pack_id, ids[order], types[order], offsets[order],
                                     lengths[order], ulengths[order],
                                     {name for name, *_ in parts})
    return IndexView(loaded, packs, errors)


def describe_pack(pack_id: bytes) -> str:
    return f"pack {short(pack_id)}"
