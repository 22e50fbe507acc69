"""The exception table as a changed-block list: `blockera cow changed`
(docs/snapshot.md §2, §8).

Every record's `old_chunk` is an origin chunk whose snapshot view differs from the origin,
whether the exception came from a copy-out on an origin write or from a write to the snapshot.
The `old_chunk` values are sorted, de-duplicated and merged into maximal ranges `[begin, end)`
with numpy; nothing per record runs in Python.

A store whose header says invalid is still listed (with `"valid": false`), but the list is
then incomplete: origin writes after the invalidation made no copies (§2.10).

Output: text, one range per line (`begin_chunk end_chunk begin_sector end_sector`, ends
exclusive) after a `#` comment line; or JSON
`{"chunk_size": S, "valid": b, "exceptions": n, "ranges": [[b, e], ...],
"sector_ranges": [[b, e], ...]}`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from blockera.blockdev import BlockDevice
from blockera.row_render import Num, render_lines
from blockera.errors import MetadataError
from blockera.snapshot.anomalies import AnomalyReport, find_anomalies
from blockera.snapshot.cow_image import CowImage, read_cow


@dataclass
class ChangedChunks:
    chunk_sectors: int
    valid: bool
    exceptions: int
    begins: np.ndarray      # origin chunks, uint64
    ends: np.ndarray        # exclusive

    @property
    def chunks(self) -> int:
        return int((self.ends - self.begins).sum()) if len(self.begins) else 0

    def sector_begins(self) -> np.ndarray:
        return self.begins * np.uint64(self.chunk_sectors)

    def sector_ends(self) -> np.ndarray:
        return self.ends * np.uint64(self.chunk_sectors)

    def ranges(self) -> list[list[int]]:
        return [[b, e] for b, e in zip(self.begins.tolist(), self.ends.tolist())]

    def sector_ranges(self) -> list[list[int]]:
        return [[b, e] for b, e in zip(self.sector_begins().tolist(),
                                       self.sector_ends().tolist())]


def merge_ranges(chunks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Maximal runs of the distinct values in `chunks`: (begins, exclusive ends)."""
    ordered = np.sort(np.asarray(chunks, dtype=np.uint64))
    if not len(ordered):
        empty = np.zeros(0, dtype=np.uint64)
        return empty, empty.copy()
    keep = np.ones(len(ordered), dtype=bool)
    keep[1:] = ordered[1:] != ordered[:-1]
    unique = ordered[keep]      # (np.unique is several times slower on uint64 here)
    breaks = np.flatnonzero(np.diff(unique) != 1)
    begins = unique[np.concatenate(([0], breaks + 1))]
    ends = unique[np.concatenate((breaks, [len(unique) - 1]))] + np.uint64(1)
    return begins, ends


def load_checked(dev: BlockDevice) -> tuple[CowImage, AnomalyReport]:
    """Read a COW for the tools that trust its records: any anomaly is an error."""
    image = read_cow(dev)
    assert image.table is not None
    report = find_anomalies(image.table, image.size_bytes)
    first = report.first()
    if first is not None:
        raise MetadataError(f"corrupt exception table, {report.summary()}; first: area "
                            f"{first.area} slot {first.slot}: {first.message} (see "
                            "'blockera cow dump')")
    return image, report


def changed_chunks(image: CowImage) -> ChangedChunks:
    assert image.table is not None
    begins, ends = merge_ranges(image.table.old)
    return ChangedChunks(image.chunk_sectors, image.valid, len(image.table), begins, ends)


def _pairs_json(begins: np.ndarray, ends: np.ndarray) -> bytes:
    if not len(begins):
        return b"[]"
    body = b"".join(render_lines([b"[", Num(begins), b", ", Num(ends), b"], "], len(begins)))
    return b"[" + body[:-2] + b"]"


def write_json(result: ChangedChunks, out: BinaryIO) -> None:
    out.write(b'{"chunk_size": %d, "valid": %s, "exceptions": %d, "ranges": '
              % (result.chunk_sectors, b"true" if result.valid else b"false",
                 result.exceptions))
    out.write(_pairs_json(result.begins, result.ends))
    out.write(b', "sector_ranges": ')
    out.write(_pairs_json(result.sector_begins(), result.sector_ends()))
    out.write(b"}\n")


def write_text(result: ChangedChunks, out: BinaryIO) -> None:
    state = "valid" if result.valid else "INVALID (list incomplete)"
    out.write((f"# chunk_size {result.chunk_sectors} sectors, {state}, {result.exceptions} "
               f"exceptions, {result.chunks} chunks in {len(result.begins)} ranges; columns: "
               "begin_chunk end_chunk begin_sector end_sector (ends exclusive)\n").encode())
    if len(result.begins):
        parts = [Num(result.begins), b" ", Num(result.ends), b" ", Num(result.sector_begins()),
                 b" ", Num(result.sector_ends()), b"\n"]
        for chunk in render_lines(parts, len(result.begins)):
            out.write(chunk)
