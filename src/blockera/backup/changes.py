"""Where an incremental backup gets its changed ranges (docs/backup-repository.md §15): era
metadata read directly, a COW store, or the JSON of `blockera era invalidate --json` /
`blockera cow changed --json`. Every source is turned into byte ranges `[begin, end)` of the
source device, checked against the source size, and then into the set of blob-sized chunks
that cover them (any era block size or COW chunk size against any chunk size).

    EraChanges(dev, use_snapshot)          .current_era, .uuid_hex, .block_sectors,
                                           .ranges(since, source_size_bytes)
    cow_ranges(dev, source_size_bytes)     a COW store's changed chunks (refused if invalid)
    json_ranges(raw, source_size_bytes)    either JSON form
    chunks_covering(ranges, chunk_bytes, nr_chunks)   bool mask of chunks to read
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from blockera.backup.job_errors import BackupInputError
from blockera.blockdev import BlockDevice
from blockera.units import SECTOR_BYTES, div_up

ERA_BLOCK_MULTIPLE_SECTORS = 8
"""The era target takes block sizes that are multiples of 8 sectors (4 KiB)."""


@dataclass
class ChangedRanges:
    """Changed byte ranges of a source, and what to record about where they came from."""

    begins_bytes: np.ndarray
    ends_bytes: np.ndarray
    made_from: str
    """era | cow | changed"""
    facts: dict[str, int | str] = field(default_factory=dict)
    """DeviceFacts fields: era, era_uuid, era_block_sectors, since, cow_chunk_sectors."""
    description: str = ""

    @property
    def changed_bytes(self) -> int:
        return int((self.ends_bytes - self.begins_bytes).sum()) if len(self.begins_bytes) else 0


def _units_to_bytes(begins: np.ndarray, ends: np.ndarray, unit_bytes: int,
                    source_size_bytes: int, unit: str, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Ranges in units of `unit_bytes` as byte ranges clipped to the source; a range that
    starts at or beyond the end of the source is refused."""
    begins = np.asarray(begins, dtype=np.int64)
    ends = np.asarray(ends, dtype=np.int64)
    if not len(begins):
        return begins, ends
    if (begins < 0).any() or (ends <= begins).any():
        bad = int(np.flatnonzero((begins < 0) | (ends <= begins))[0])
        raise BackupInputError(f"{what}: range [{int(begins[bad])}, {int(ends[bad])}) is not a "
                               "valid [begin, end) range")
    units_in_source = div_up(source_size_bytes, unit_bytes)
    beyond = begins >= units_in_source
    if beyond.any() or int(ends.max()) > units_in_source:
        bad = int(np.flatnonzero(beyond | (ends > units_in_source))[0])
        raise BackupInputError(
            f"{what}: changed {unit}s [{int(begins[bad])}, {int(ends[bad])}) do not fit the "
            f"source ({source_size_bytes} bytes = {units_in_source} {unit}s of {unit_bytes} "
            "bytes): the list belongs to another device, or the device was resized; run a "
            "full backup")
    return begins * unit_bytes, np.minimum(ends * unit_bytes, source_size_bytes)


def _check_era_geometry(nr_blocks: int, block_sectors: int, source_size_bytes: int,
                        what: str) -> None:
    if block_sectors <= 0 or block_sectors % ERA_BLOCK_MULTIPLE_SECTORS:
        raise BackupInputError(f"{what}: era block size {block_sectors} sectors is not a "
                               f"positive multiple of {ERA_BLOCK_MULTIPLE_SECTORS}")
    block_bytes = block_sectors * SECTOR_BYTES
    if div_up(source_size_bytes, block_bytes) != nr_blocks:
        raise BackupInputError(
            f"{what}: the era metadata tracks {nr_blocks} blocks of {block_sectors} sectors "
            f"({nr_blocks * block_bytes} bytes), which does not match the source "
            f"({source_size_bytes} bytes): it belongs to another device, or the device was "
            "resized; run a full backup")


def _mask_runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    padded = np.zeros(len(mask) + 2, dtype=np.int8)
    padded[1:-1] = mask
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return edges[0::2].astype(np.int64), edges[1::2].astype(np.int64)


class EraChanges:
    """dm-era metadata as a change source: its identity and the blocks written since an
    era (the live metadata, or the held metadata snapshot with `use_snapshot`)."""

    def __init__(self, dev: BlockDevice, *, use_snapshot: bool) -> None:
        from blockera.era.image import EraImage

        self.name = dev.name
        self.image = EraImage(dev, use_snapshot=use_snapshot)
        self.use_snapshot = use_snapshot

    @property
    def current_era(self) -> int:
        return int(self.image.current_era)

    @property
    def block_sectors(self) -> int:
        return int(self.image.sb.data_block_size)

    @property
    def nr_blocks(self) -> int:
        return int(self.image.nr_blocks)

    @property
    def uuid_hex(self) -> str:
        return bytes(self.image.sb.uuid).hex()

    def ranges(self, since: int, source_size_bytes: int) -> ChangedRanges:
        what = f"era metadata {self.name}"
        if since > self.current_era:
            raise BackupInputError(f"{what}: era {since} is after its current era "
                                   f"{self.current_era}")
        _check_era_geometry(self.nr_blocks, self.block_sectors, source_size_bytes, what)
        mask = self.image.changed_since(since)
        begins, ends = _mask_runs(mask)
        begins, ends = _units_to_bytes(begins, ends, self.block_sectors * SECTOR_BYTES,
                                       source_size_bytes, "era block", what)
        return ChangedRanges(begins, ends, "era", {
            "era": self.current_era, "era_uuid": self.uuid_hex,
            "era_block_sectors": self.block_sectors, "since": since},
            f"era metadata {self.name}{' (held snapshot)' if self.use_snapshot else ''}: "
            f"blocks written since era {since} (current era {self.current_era})")


def cow_ranges(dev: BlockDevice, source_size_bytes: int) -> ChangedRanges:
    """The chunks a COW store holds exceptions for (refused when the snapshot is invalid:
    its list is then incomplete)."""
    from blockera.snapshot.changed import changed_chunks, load_checked

    what = f"COW {dev.name}"
    image, _report = load_checked(dev)
    result = changed_chunks(image)
    if not result.valid:
        raise BackupInputError(f"{what}: the snapshot is invalid (it overflowed or failed), so "
                               "its list of changed chunks is incomplete; run a full backup")
    chunk_sectors = int(result.chunk_sectors)
    begins, ends = _units_to_bytes(result.begins, result.ends, chunk_sectors * SECTOR_BYTES,
                                   source_size_bytes, "COW chunk", what)
    return ChangedRanges(begins, ends, "cow", {"cow_chunk_sectors": chunk_sectors},
                         f"{what}: {int(result.exceptions)} exceptions of {chunk_sectors} "
                         "sectors")


def _ranges_field(doc: dict, what: str) -> tuple[np.ndarray, np.ndarray]:
    ranges = doc.get("ranges")
    if not isinstance(ranges, list) or not all(
            isinstance(r, list) and len(r) == 2 and all(type(v) is int for v in r)
            for r in ranges):
        raise BackupInputError(f"{what}: \"ranges\" must be a list of [begin, end] integer "
                               "pairs")
    if not ranges:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy()
    pairs = np.array(ranges, dtype=object)
    if any(abs(v) >= 1 << 62 for r in ranges for v in r):
        raise BackupInputError(f"{what}: a range is out of bounds")
    pairs = pairs.astype(np.int64)
    return pairs[:, 0].copy(), pairs[:, 1].copy()


def _positive_int(doc: dict, key: str, what: str) -> int:
    value = doc.get(key)
    if type(value) is not int or value <= 0:
        raise BackupInputError(f"{what}: \"{key}\" must be a positive integer")
    return value


def derive_era_block_sectors(nr_blocks: int, source_size_bytes: int, what: str) -> int:
    """The era block size that makes `nr_blocks` blocks cover the source, when exactly one
    does (multiples of 8 sectors); refused when none or several do."""
    size_sectors = div_up(source_size_bytes, SECTOR_BYTES)
    unit = ERA_BLOCK_MULTIPLE_SECTORS
    candidates = []
    if nr_blocks > 0:
        low = div_up(div_up(size_sectors, nr_blocks), unit) * unit
        bs = low
        while div_up(size_sectors, bs) == nr_blocks and len(candidates) < 3:
            candidates.append(bs)
            bs += unit
    if len(candidates) != 1:
        found = ("no era block size" if not candidates else
                 "several era block sizes (" + ", ".join(map(str, candidates[:2])) + ", ...)")
        raise BackupInputError(
            f"{what}: the JSON gives no block_size_sectors, and {found} make {nr_blocks} "
            f"blocks cover the source ({source_size_bytes} bytes); produce it with "
            "`blockera era invalidate --json`, which records the block size")
    return candidates[0]


def json_ranges(raw: bytes, source_size_bytes: int, what: str) -> ChangedRanges:
    """The changed ranges in `blockera era invalidate --json` (era blocks) or `blockera cow
    changed --json` (COW chunks) output."""
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise BackupInputError(f"{what}: not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise BackupInputError(f"{what}: expected a JSON object")
    if "nr_blocks" in doc and "written_since" in doc:
        nr_blocks = doc.get("nr_blocks")
        if type(nr_blocks) is not int or nr_blocks < 0:
            raise BackupInputError(f"{what}: \"nr_blocks\" must be a non-negative integer")
        since = doc.get("written_since")
        if type(since) is not int or since < 0:
            raise BackupInputError(f"{what}: \"written_since\" must be a non-negative integer")
        if doc.get("block_size_sectors") is not None:
            block_sectors = _positive_int(doc, "block_size_sectors", what)
        else:
            block_sectors = derive_era_block_sectors(nr_blocks, source_size_bytes, what)
        _check_era_geometry(nr_blocks, block_sectors, source_size_bytes, what)
        begins, ends = _ranges_field(doc, what)
        begins, ends = _units_to_bytes(begins, ends, block_sectors * SECTOR_BYTES,
                                       source_size_bytes, "era block", what)
        return ChangedRanges(begins, ends, "changed", {"since": since},
                             f"{what}: era blocks of {block_sectors} sectors written since "
                             f"era {since}")
    if "chunk_size" in doc and "valid" in doc:
        chunk_sectors = _positive_int(doc, "chunk_size", what)
        if doc.get("valid") is not True:
            raise BackupInputError(f"{what}: the COW snapshot was invalid (\"valid\": false), "
                                   "so its list of changed chunks is incomplete; run a full "
                                   "backup")
        begins, ends = _ranges_field(doc, what)
        begins, ends = _units_to_bytes(begins, ends, chunk_sectors * SECTOR_BYTES,
                                       source_size_bytes, "COW chunk", what)
        return ChangedRanges(begins, ends, "changed", {"cow_chunk_sectors": chunk_sectors},
                             f"{what}: COW chunks of {chunk_sectors} sectors")
    raise BackupInputError(f"{what}: neither `era invalidate --json` output (nr_blocks, "
                           "written_since, ranges) nor `cow changed --json` output (chunk_size, "
                           "valid, ranges)")


def chunks_covering(begins_bytes: np.ndarray, ends_bytes: np.ndarray, chunk_bytes: int,
                    nr_chunks: int) -> np.ndarray:
    """Bool mask of the chunks of `chunk_bytes` that any byte range touches."""
    mask_len = nr_chunks + 1
    if not len(begins_bytes):
        return np.zeros(nr_chunks, dtype=bool)
    first = np.minimum(np.asarray(begins_bytes, dtype=np.int64) // chunk_bytes, nr_chunks)
    last = np.minimum(-(-np.asarray(ends_bytes, dtype=np.int64) // chunk_bytes), nr_chunks)
    diff = (np.bincount(first, minlength=mask_len).astype(np.int64)
            - np.bincount(last, minlength=mask_len))
    return np.cumsum(diff[:nr_chunks]) > 0
