"""Index files and the in-memory master index (docs/backup-repository.md §7).

An index file (`index/<id>`, an unpacked file: encrypted, `0x02 || zstd(JSON)` in version 2,
plain JSON in version 1) says where blobs are:

    {"supersedes":["<index id>",…],                         (omitted when empty)
     "packs":[{"id":"<pack id>","blobs":[
         {"id":"<blob id>","type":"data","offset":0,"length":1048608},
         {"id":"…","type":"data","offset":1048608,"length":4128,"uncompressed_length":1048576},
         …]},…]}

`length` is the stored length (encrypted, compressed or not); `uncompressed_length` appears only
for compressed blobs. The oldest format, a bare JSON array of packs, is still read. A new index
file `supersedes` the files it replaces (prune deletes those afterwards). blockera writes at
most 50 000 blobs per file (restic's limit, which keeps files well under the 8 MiB the design
asks for), never splitting one pack's entries across files.

`MasterIndex` answers "where is blob X?" for a whole repository. It keeps entries in numpy
arrays sorted by the first 8 bytes of the ID (about 57 bytes per blob) plus a small dict for
recent additions that is merged in by bulk sorts, so a million blobs fit in tens of MiB instead
of the hundreds a dict of objects would take.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from blockera.backup import gojson
from blockera.backup.errors import RepositoryFormatError
from blockera.backup.ids import ID_BYTES, BlobType, parse_id
from blockera.backup.pack import PackEntry

INDEX_MAX_BLOBS = 50_000

_TYPE_CODE = {BlobType.DATA: 0, BlobType.TREE: 1}
_CODE_TYPE = {0: BlobType.DATA, 1: BlobType.TREE}
_TYPE_CODE_BY_NAME = {"data": 0, "tree": 1}


class IndexedBlob(NamedTuple):
    """Where a blob is: its pack and its place in it."""

    blob_id: bytes
    blob_type: BlobType
    pack_id: bytes
    offset_bytes: int
    length_bytes: int
    uncompressed_length_bytes: int

    def entry(self) -> PackEntry:
        return PackEntry(self.blob_type, self.blob_id, self.offset_bytes, self.length_bytes,
                         self.uncompressed_length_bytes)


@dataclass
class IndexFile:
    """The content of one index file."""

    packs: list[tuple[bytes, list[PackEntry]]] = field(default_factory=list)
    supersedes: list[bytes] = field(default_factory=list)

    @property
    def blob_count(self) -> int:
        return sum(len(entries) for _, entries in self.packs)

    def encode(self) -> bytes:
        """The JSON as restic's encoder writes it (with the trailing newline)."""
        parts = []
        for pack_id, entries in self.packs:
            blobs = []
            for e in entries:
                text = (f'{{"id":"{e.blob_id.hex()}","type":"{e.blob_type.value}",'
                        f'"offset":{e.offset_bytes},"length":{e.length_bytes}')
                if e.uncompressed_length_bytes:
                    text += f',"uncompressed_length":{e.uncompressed_length_bytes}'
                blobs.append(text + "}")
            parts.append(f'{{"id":"{pack_id.hex()}","blobs":[{",".join(blobs)}]}}')
        fields = []
        if self.supersedes:
            fields.append(("supersedes", gojson.id_list(self.supersedes)))
        fields.append(("packs", "[" + ",".join(parts) + "]"))
        return (gojson.obj(fields) + "\n").encode("ascii")

    @classmethod
    def decode(cls, raw: bytes, what: str) -> "IndexFile":
        cols = IndexColumns.parse(raw, what)
        packs = []
        ids = cols.ids.tobytes()
        types = [_CODE_TYPE[t] for t in cols.types.tolist()]
        offsets, lengths = cols.offsets.tolist(), cols.lengths.tolist()
        ulengths = cols.ulengths.tolist()
        i = 0
        for pack_id, count in zip(cols.pack_ids, cols.counts.tolist()):
            packs.append((pack_id, [
                PackEntry(types[k], ids[k * ID_BYTES:(k + 1) * ID_BYTES], offsets[k], lengths[k],
                          ulengths[k]) for k in range(i, i + count)]))
            i += count
        return cls(packs, cols.supersedes)


@dataclass
class IndexColumns:
    """An index file as columns (what loading a large index needs: no object per blob)."""

    pack_ids: list[bytes]
    counts: np.ndarray      # blobs per pack
    ids: np.ndarray         # (n, 32) uint8
    types: np.ndarray       # uint8: 0 data, 1 tree
    offsets: np.ndarray     # uint32
    lengths: np.ndarray     # uint32
    ulengths: np.ndarray    # uint32, 0 = not compressed
    supersedes: list[bytes]

    @classmethod
    def parse(cls, raw: bytes, what: str) -> "IndexColumns":
        """Parse and validate an index file's JSON (the current format or the oldest one, a
        bare array of packs)."""
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            raise RepositoryFormatError(f"{what}: not JSON ({exc})") from None
        try:
            if isinstance(doc, list):
                pack_docs, supersedes = doc, []
            elif isinstance(doc, dict):
                pack_docs = doc.get("packs") or []
                supersedes = [parse_id(s, "superseded index") for s in
                              doc.get("supersedes") or []]
            else:
                raise ValueError("neither an object nor an array")
            pack_ids = [parse_id(p["id"], "pack ID") for p in pack_docs]
            blob_lists = [p.get("blobs") or [] for p in pack_docs]
            blobs = [b for bl in blob_lists for b in bl]
            n = len(blobs)
            ids = bytes.fromhex("".join([b["id"] for b in blobs]))
            if len(ids) != n * ID_BYTES:
                raise ValueError("a blob ID is not 64 hexadecimal digits")
            types = np.array([_TYPE_CODE_BY_NAME[b["type"]] for b in blobs], np.uint8)
            numbers = [np.array([b["offset"] for b in blobs]),
                       np.array([b["length"] for b in blobs]),
                       np.array([b.get("uncompressed_length", 0) for b in blobs])]
        except KeyError as exc:
            raise RepositoryFormatError(f"{what}: malformed entry (missing or unknown "
                                        f"{exc})") from None
        except (ValueError, TypeError, AttributeError) as exc:
            raise RepositoryFormatError(f"{what}: malformed entry ({exc})") from None
        if n and any(a.dtype.kind not in "iu" or a.min() < 0 or a.max() >= 1 << 32
                     for a in numbers):
            raise RepositoryFormatError(f"{what}: a blob has an impossible offset or length")
        offsets, lengths, ulengths = (a.astype(np.uint32) for a in numbers)
        return cls(pack_ids, np.array([len(bl) for bl in blob_lists], np.int64),
                   np.frombuffer(ids, np.uint8).reshape(n, ID_BYTES), types, offsets, lengths,
                   ulengths, supersedes)

    @property
    def blob_count(self) -> int:
        return len(self.types)


def split_into_files(packs: list[tuple[bytes, list[PackEntry]]],
                     max_blobs: int = INDEX_MAX_BLOBS) -> list[IndexFile]:
    """Index files of at most `max_blobs` blobs each (a pack with more gets a file alone)."""
    files: list[IndexFile] = []
    current = IndexFile()
    count = 0
    for pack_id, entries in packs:
        if current.packs and count + len(entries) > max_blobs:
            files.append(current)
            current, count = IndexFile(), 0
        current.packs.append((pack_id, entries))
        count += len(entries)
    if current.packs:
        files.append(current)
    return files


def _columns_of(f: IndexFile) -> IndexColumns:
    entries = [e for _, es in f.packs for e in es]
    n = len(entries)
    return IndexColumns(
        [p for p, _ in f.packs], np.array([len(es) for _, es in f.packs], np.int64),
        np.frombuffer(b"".join(e.blob_id for e in entries), np.uint8).reshape(n, ID_BYTES),
        np.array([_TYPE_CODE[e.blob_type] for e in entries], np.uint8),
        np.array([e.offset_bytes for e in entries], np.uint32),
        np.array([e.length_bytes for e in entries], np.uint32),
        np.array([e.uncompressed_length_bytes for e in entries], np.uint32), f.supersedes)


class MasterIndex:
    """Blob (ID, type) → pack, offset, lengths, for every blob of a repository. Safe to use
    from several threads (one internal lock)."""

    _MERGE_THRESHOLD = 1 << 16

    def __init__(self) -> None:
        self._mutex = threading.RLock()
        self._pack_ids: list[bytes] = []
        self._pack_number: dict[bytes, int] = {}
        self._keys = np.empty(0, np.uint64)
        self._ids = np.empty((0, ID_BYTES), np.uint8)
        self._types = np.empty(0, np.uint8)
        self._packs = np.empty(0, np.uint32)
        self._offsets = np.empty(0, np.uint32)
        self._lengths = np.empty(0, np.uint32)
        self._ulengths = np.empty(0, np.uint32)
        # Recent additions, merged into the sorted arrays in bulk:
        # (type code byte + id) -> (pack number, offset, length, uncompressed length).
        self._recent: dict[bytes, tuple[int, int, int, int]] = {}

    # -- adding --------------------------------------------------------------------------

    def _pack_no(self, pack_id: bytes) -> int:
        number = self._pack_number.get(pack_id)
        if number is None:
            number = len(self._pack_ids)
            self._pack_ids.append(pack_id)
            self._pack_number[pack_id] = number
        return number

    def add_pack(self, pack_id: bytes, entries: Iterable[PackEntry]) -> None:
        """Record the blobs of one pack. A blob already known keeps its first location."""
        with self._mutex:
            number = self._pack_no(pack_id)
            for e in entries:
                code = _TYPE_CODE[e.blob_type]
                key = bytes([code]) + e.blob_id
                if key in self._recent or self._find_sorted(e.blob_id, code) >= 0:
                    continue
                self._recent[key] = (number, e.offset_bytes, e.length_bytes,
                                     e.uncompressed_length_bytes)
            if len(self._recent) >= self._MERGE_THRESHOLD:
                self._merge_recent()

    def add_index_file(self, index_file: "IndexFile | IndexColumns") -> None:
        """Record every pack of an index file, in one bulk merge."""
        self.add_index_files([index_file])

    def add_index_files(self, index_files: "list[IndexFile | IndexColumns]") -> None:
        """Record the packs of several index files with a single sort (loading a repository's
        whole index)."""
        with self._mutex:
            self._merge_recent()
            columns = [_columns_of(f) if isinstance(f, IndexFile) else f for f in index_files]
            packs = []
            for c in columns:
                numbers = np.array([self._pack_no(p) for p in c.pack_ids], np.uint32)
                packs.append(np.repeat(numbers, c.counts))
            columns = [c for c in columns if c.blob_count]
            if not columns:
                return
            self._merge_arrays(np.concatenate([c.ids for c in columns]),
                               np.concatenate([c.types for c in columns]),
                               np.concatenate([p for p in packs if len(p)]).astype(np.uint32),
                               np.concatenate([c.offsets for c in columns]),
                               np.concatenate([c.lengths for c in columns]),
                               np.concatenate([c.ulengths for c in columns]))

    def _merge_recent(self) -> None:
        if not self._recent:
            return
        n = len(self._recent)
        raw = b"".join(self._recent.keys())
        rows = np.frombuffer(raw, np.uint8).reshape(n, ID_BYTES + 1)
        values = np.array(list(self._recent.values()), dtype=np.uint64).reshape(n, 4)
        self._recent = {}
        self._merge_arrays(rows[:, 1:], rows[:, 0].copy(), values[:, 0].astype(np.uint32),
                           values[:, 1].astype(np.uint32), values[:, 2].astype(np.uint32),
                           values[:, 3].astype(np.uint32))

    def _merge_arrays(self, ids: np.ndarray, types: np.ndarray, packs: np.ndarray,
                      offsets: np.ndarray, lengths: np.ndarray, ulengths: np.ndarray) -> None:
        new_keys = ids[:, :8].copy().view(">u8").reshape(-1).astype(np.uint64)
        keys = np.concatenate((self._keys, new_keys))
        order = np.argsort(keys, kind="stable")  # existing entries stay first among equals
        keys = keys[order]
        all_ids = np.concatenate((self._ids, ids))[order]
        all_types = np.concatenate((self._types, types))[order]
        columns = [np.concatenate((old, new))[order] for old, new in
                   ((self._packs, packs), (self._offsets, offsets), (self._lengths, lengths),
                    (self._ulengths, ulengths))]
        keep = np.ones(len(keys), dtype=bool)
        same_prefix = np.flatnonzero(keys[1:] == keys[:-1]) + 1
        if len(same_prefix):
            # Equal 8-byte prefixes next to each other: mostly the same blob listed again (by
            # overlapping index files): keep only the first.
            same_blob = ((all_ids[same_prefix] == all_ids[same_prefix - 1]).all(axis=1)
                         & (all_types[same_prefix] == all_types[same_prefix - 1]))
            keep[same_prefix[same_blob]] = False
            # Very rarely, different blobs sharing a prefix: a duplicate may then sit further
            # back in the run of equal prefixes.
            for i in same_prefix[~same_blob]:
                j = i - 1
                while j >= 0 and keys[j] == keys[i]:
                    if keep[j] and all_types[j] == all_types[i] and \
                            np.array_equal(all_ids[j], all_ids[i]):
                        keep[i] = False
                        break
                    j -= 1
        if not keep.all():
            keys, all_ids, all_types = keys[keep], all_ids[keep], all_types[keep]
            columns = [c[keep] for c in columns]
        self._keys, self._ids, self._types = keys, np.ascontiguousarray(all_ids), all_types
        self._packs, self._offsets, self._lengths, self._ulengths = columns

    # -- looking up ----------------------------------------------------------------------

    def _find_sorted(self, blob_id: bytes, type_code: int) -> int:
        if not len(self._keys):
            return -1
        key = np.uint64(int.from_bytes(blob_id[:8], "big"))
        i = int(np.searchsorted(self._keys, key))
        n = len(self._keys)
        while i < n and self._keys[i] == key:
            if self._types[i] == type_code and self._ids[i].tobytes() == blob_id:
                return i
            i += 1
        return -1

    def lookup(self, blob_id: bytes, blob_type: BlobType) -> IndexedBlob | None:
        with self._mutex:
            code = _TYPE_CODE[blob_type]
            hit = self._recent.get(bytes([code]) + blob_id)
            if hit is not None:
                number, offset, length, ulength = hit
                return IndexedBlob(blob_id, blob_type, self._pack_ids[number], offset, length,
                                   ulength)
            i = self._find_sorted(blob_id, code)
            if i < 0:
                return None
            return IndexedBlob(blob_id, blob_type, self._pack_ids[int(self._packs[i])],
                               int(self._offsets[i]), int(self._lengths[i]), int(self._ulengths[i]))

    def has(self, blob_id: bytes, blob_type: BlobType) -> bool:
        with self._mutex:
            code = _TYPE_CODE[blob_type]
            return bytes([code]) + blob_id in self._recent or self._find_sorted(blob_id, code) >= 0

    def __len__(self) -> int:
        with self._mutex:
            return len(self._keys) + len(self._recent)

    def pack_ids(self) -> list[bytes]:
        with self._mutex:
            return list(self._pack_ids)

    def __iter__(self) -> Iterator[IndexedBlob]:
        """Every entry (of the index as it is when iteration starts)."""
        with self._mutex:
            self._merge_recent()
            arrays = (self._keys, self._ids, self._types, self._packs, self._offsets,
                      self._lengths, self._ulengths)
            pack_ids = list(self._pack_ids)
        keys, ids, types, packs, offsets, lengths, ulengths = arrays
        for i in range(len(keys)):
            yield IndexedBlob(ids[i].tobytes(), _CODE_TYPE[int(types[i])],
                              pack_ids[int(packs[i])], int(offsets[i]), int(lengths[i]),
                              int(ulengths[i]))

    def memory_bytes(self) -> int:
        """Approximate memory held (arrays, pack IDs, recent entries)."""
        with self._mutex:
            arrays = sum(a.nbytes for a in (self._keys, self._ids, self._types, self._packs,
                                            self._offsets, self._lengths, self._ulengths))
            packs = len(self._pack_ids) * (ID_BYTES + 33 + 8 + 100)
            recent = len(self._recent) * 250
            return arrays + packs + recent
