"""Record-level corruption the kernel accepts but a reader should report
(docs/snapshot.md §2: what the kernel does not check when it loads a store).

The kernel's loader registers every record up to the terminator without checking it. A store
written by a healthy kernel never has any of these; each one means the image was damaged or
written by a faulty tool:

* `duplicate_old`: an `old_chunk` mapped twice (the kernel's lookup finds the earlier record);
* `shared_new`: two records share one `new_chunk` (two origin chunks alias one COW chunk);
* `metadata_chunk`: `new_chunk` is a metadata-area chunk (its data is metadata);
* `beyond_end`: `new_chunk` is not a whole chunk inside the COW device;
* `run_length_bits`: `new_chunk >= 2**56`, where the kernel keeps a run length in memory;
* `old_overflow`: `(old_chunk + 1) * chunk_size` does not fit in a 64-bit sector number.

A `new_chunk` pointing at the header (chunk 0) cannot occur: 0 ends the list. Records out of
allocation order are not reported (kernels before 2013 wrote them). Detection is vectorised
(sorts and masks over the whole table).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from blockera.snapshot.layout import RUN_LENGTH_SHIFT, Geometry
from blockera.snapshot.cow_image import ExceptionTable

KINDS = ("duplicate_old", "shared_new", "metadata_chunk", "beyond_end", "run_length_bits",
         "old_overflow")


@dataclass(frozen=True)
class Anomaly:
    kind: str
    index: int
    area: int
    slot: int
    old_chunk: int
    new_chunk: int
    message: str

    def as_dict(self) -> dict[str, int | str]:
        return {"kind": self.kind, "index": self.index, "area": self.area, "slot": self.slot,
                "old_chunk": self.old_chunk, "new_chunk": self.new_chunk,
                "message": self.message}


@dataclass
class AnomalyReport:
    """Record indices per kind (ascending), plus for the two duplicate kinds the index of the
    first record holding the same value."""

    table: ExceptionTable
    cow_chunks: int
    indices: dict[str, np.ndarray] = field(default_factory=dict)
    first_of: dict[str, np.ndarray] = field(default_factory=dict)

    def count(self) -> int:
        return sum(len(v) for v in self.indices.values())

    def __bool__(self) -> bool:
        return self.count() > 0

    def summary(self) -> str:
        parts = [f"{len(self.indices[k])} {k.replace('_', ' ')}" for k in KINDS
                 if len(self.indices.get(k, ()))]
        return f"{self.count()} anomalies ({', '.join(parts)})" if parts else "no anomalies"

    def first(self) -> Anomaly | None:
        return next(iter(self), None)

    def __iter__(self) -> Iterator[Anomaly]:
        """Every anomaly as an object, in record order (kinds in KINDS order per record)."""
        rows = [(int(i), rank, kind, pos) for rank, kind in enumerate(KINDS)
                for pos, i in enumerate(self.indices.get(kind, np.zeros(0, np.int64)).tolist())]
        rows.sort()
        for index, _, kind, pos in rows:
            yield self._make(kind, index, pos)

    def _make(self, kind: str, index: int, pos: int) -> Anomaly:
        geometry = self.table.geometry
        old = int(self.table.old[index])
        new = int(self.table.new[index])
        area, slot = self.table.area_and_slot(index)
        if kind == "duplicate_old":
            first = int(self.first_of[kind][pos])
            message = (f"old_chunk {old} is already mapped by record {first} (area "
                       f"{first // geometry.exceptions_per_area}, slot "
                       f"{first % geometry.exceptions_per_area}); lookups find that earlier "
                       "record")
        elif kind == "shared_new":
            first = int(self.first_of[kind][pos])
            message = (f"new_chunk {new} is also used by record {first}: two origin chunks "
                       "share one COW chunk")
        elif kind == "metadata_chunk":
            which = (new - 1) // geometry.stride_chunks
            message = f"new_chunk {new} is the chunk of metadata area {which}"
        elif kind == "beyond_end":
            message = (f"new_chunk {new} lies beyond the end of the COW device "
                       f"({self.cow_chunks} whole chunks)")
        elif kind == "run_length_bits":
            message = (f"new_chunk {new} is at least 2**{RUN_LENGTH_SHIFT}; the kernel keeps a "
                       "run length in those bits")
        else:
            message = (f"old_chunk {old} at chunk size {geometry.chunk_sectors} sectors ends "
                       "beyond the largest 64-bit sector number")
        return Anomaly(kind, index, area, slot, old, new, message)


def _duplicates(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of values seen earlier in the array (ascending), and the index of each one's
    first occurrence."""
    empty = np.zeros(0, dtype=np.int64)
    if len(values) < 2:
        return empty, empty
    ordered = np.sort(values)
    if not (ordered[1:] == ordered[:-1]).any():     # the common case, without an argsort
        return empty, empty
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts = np.ones(len(values), dtype=bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    group_start = np.flatnonzero(starts)
    group = np.cumsum(starts) - 1
    repeat = ~starts
    later = order[repeat]
    firsts = order[group_start[group[repeat]]]
    by_index = np.argsort(later, kind="stable")
    return later[by_index].astype(np.int64), firsts[by_index].astype(np.int64)


def find_anomalies(table: ExceptionTable, cow_size_bytes: int) -> AnomalyReport:
    geometry: Geometry = table.geometry
    cow_chunks = geometry.whole_chunks(cow_size_bytes)
    report = AnomalyReport(table, cow_chunks)
    old, new = table.old, table.new
    report.indices["duplicate_old"], report.first_of["duplicate_old"] = _duplicates(old)
    report.indices["shared_new"], report.first_of["shared_new"] = _duplicates(new)
    report.indices["metadata_chunk"] = np.flatnonzero(geometry.is_metadata_chunk(new))
    report.indices["beyond_end"] = np.flatnonzero(new >= np.uint64(cow_chunks))
    report.indices["run_length_bits"] = np.flatnonzero(new >> np.uint64(RUN_LENGTH_SHIFT))
    limit = np.uint64(((1 << 64) // geometry.chunk_sectors) - 2)   # end sector must fit
    report.indices["old_overflow"] = np.flatnonzero(old > limit)
    return report
