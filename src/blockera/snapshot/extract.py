"""`blockera cow extract`: copy out just the changed chunks (docs/snapshot.md §8, §6).

Which data (`source`):

* `origin` (default): the origin's current contents of every changed chunk, i.e. what changed
  since the snapshot was taken. Applied to a copy of the snapshot's view it brings that copy up
  to date (an incremental backup, as lvmsync does). For a consistent result the origin must not
  be written meanwhile (stop the writers, or extract from a second, newer snapshot's view).
* `snapshot`: the snapshot's contents of those chunks, read from their COW chunks. Applied to
  the origin it rolls the origin back to the snapshot's view.

Output formats:

* `sparse` (default): a regular file exactly as large as the origin, holding the changed
  chunks at their own offsets (the origin's last partial chunk clipped) and holes elsewhere.
  `blockera cow changed --json` lists the ranges that carry data.
* `stream`: a self-describing byte stream, every integer little-endian:

      header   b"BLKCOWX1", u32 chunk_sectors, u32 source (0 origin, 1 snapshot),
               u64 origin_bytes, u64 record_count                              (32 bytes)
      record   u64 offset_bytes, u64 length_bytes, then length_bytes of data
               (records ascending and non-overlapping)
      trailer  b"BLKCOWXE", u64 total_data_bytes                               (16 bytes)

  `read_stream()` reads one back and detects truncation.

Nothing is written unless the COW parses cleanly, is valid, has no anomalies and all its
chunks lie inside the origin. Live devices should be opened with O_DIRECT
(`FileDevice(..., direct=True)`): the kernel writes the COW with bios, so the COW device's page
cache goes stale (§4.9).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO, Iterator

import numpy as np

from blockera.blockdev import BlockDevice
from blockera.errors import MetadataError
from blockera.snapshot.changed import merge_ranges
from blockera.snapshot.cow_image import CowImage

SOURCES = ("origin", "snapshot")
STREAM_MAGIC = b"BLKCOWX1"
STREAM_END_MAGIC = b"BLKCOWXE"
_STREAM_HEADER = struct.Struct("<8sIIQQ")
_RECORD = struct.Struct("<QQ")
_TRAILER = struct.Struct("<8sQ")
PIECE_BYTES = 4 << 20


@dataclass(frozen=True)
class Segment:
    """`length_bytes` of output at `offset_bytes`, read from `source_offset_bytes` of the
    source device (the origin, or the COW)."""

    offset_bytes: int
    length_bytes: int
    source_offset_bytes: int


@dataclass
class ExtractPlan:
    source: str
    chunk_sectors: int
    origin_bytes: int
    segments: list[Segment]

    @property
    def data_bytes(self) -> int:
        return sum(s.length_bytes for s in self.segments)


def plan_extract(image: CowImage, origin_bytes: int, source: str) -> ExtractPlan:
    """Work out every copy before anything is written; MetadataError if the COW cannot be
    trusted for this (invalid, or chunks outside the origin)."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}")
    table = image.table
    assert table is not None
    if not image.valid:
        raise MetadataError("the snapshot is invalid (header valid=0): origin writes after the "
                            "invalidation were not recorded, so the change list is incomplete; "
                            "refusing to extract")
    chunk_bytes = image.geometry.chunk_bytes
    if len(table) and int(table.old.max()) * chunk_bytes >= origin_bytes:
        worst = int(table.old.max())
        raise MetadataError(f"the COW has an exception for origin chunk {worst} (byte "
                            f"{worst * chunk_bytes}), beyond the end of the origin "
                            f"({origin_bytes} bytes): is --origin this snapshot's origin?")
    segments: list[Segment] = []
    if source == "origin":
        begins, ends = merge_ranges(table.old)
        for b, e in zip(begins.tolist(), ends.tolist()):
            start = b * chunk_bytes
            segments.append(Segment(start, min(e * chunk_bytes, origin_bytes) - start, start))
    elif len(table):
        order = np.argsort(table.old, kind="stable")
        old, new = table.old[order], table.new[order]
        breaks = np.flatnonzero((np.diff(old) != 1) | (np.diff(new) != 1)) + 1
        starts = np.concatenate(([0], breaks)).astype(np.int64)
        stops = np.concatenate((breaks, [len(old)])).astype(np.int64)
        for i, j in zip(starts.tolist(), stops.tolist()):
            start = int(old[i]) * chunk_bytes
            end = min(int(old[j - 1] + 1) * chunk_bytes, origin_bytes)
            segments.append(Segment(start, end - start, int(new[i]) * chunk_bytes))
    return ExtractPlan(source, image.chunk_sectors, origin_bytes, segments)


def _pieces(dev: BlockDevice, segment: Segment) -> Iterator[tuple[int, bytes]]:
    done = 0
    while done < segment.length_bytes:
        n = min(PIECE_BYTES, segment.length_bytes - done)
        yield segment.offset_bytes + done, dev.read(segment.source_offset_bytes + done, n)
        done += n


def write_sparse(plan: ExtractPlan, source_dev: BlockDevice, out: BinaryIO) -> None:
    """`out`: a fresh, seekable regular file; it ends up `origin_bytes` long."""
    out.truncate(plan.origin_bytes)
    for segment in plan.segments:
        for offset, data in _pieces(source_dev, segment):
            out.seek(offset)
            out.write(data)


def write_stream(plan: ExtractPlan, source_dev: BlockDevice, out: BinaryIO) -> None:
    out.write(_STREAM_HEADER.pack(STREAM_MAGIC, plan.chunk_sectors,
                                  SOURCES.index(plan.source), plan.origin_bytes,
                                  len(plan.segments)))
    for segment in plan.segments:
        out.write(_RECORD.pack(segment.offset_bytes, segment.length_bytes))
        for _, data in _pieces(source_dev, segment):
            out.write(data)
    out.write(_TRAILER.pack(STREAM_END_MAGIC, plan.data_bytes))


@dataclass(frozen=True)
class StreamHeader:
    chunk_sectors: int
    source: str
    origin_bytes: int
    records: int


def _read_exact(inp: BinaryIO, n: int, what: str) -> bytes:
    data = inp.read(n)
    if len(data) != n:
        raise MetadataError(f"extract stream truncated in the {what} ({len(data)} of {n} bytes)")
    return data


def read_stream(inp: BinaryIO) -> tuple[StreamHeader, Iterator[tuple[int, bytes]]]:
    """The stream's header, and an iterator of (offset_bytes, data) pieces (at most
    PIECE_BYTES each) that checks the trailer at the end."""
    magic, chunk_sectors, source, origin_bytes, count = _STREAM_HEADER.unpack(
        _read_exact(inp, _STREAM_HEADER.size, "header"))
    if magic != STREAM_MAGIC:
        raise MetadataError(f"not a blockera extract stream (magic {magic!r})")
    if source >= len(SOURCES):
        raise MetadataError(f"extract stream has an unknown source code {source}")
    header = StreamHeader(chunk_sectors, SOURCES[source], origin_bytes, count)

    def records() -> Iterator[tuple[int, bytes]]:
        total = 0
        for i in range(count):
            offset, length = _RECORD.unpack(_read_exact(inp, _RECORD.size, f"record {i}"))
            if offset + length > origin_bytes:
                raise MetadataError(f"extract stream record {i} [{offset}, {offset + length}) "
                                    f"goes beyond the origin size {origin_bytes}")
            total += length
            done = 0
            while done < length:
                n = min(PIECE_BYTES, length - done)
                yield offset + done, _read_exact(inp, n, f"data of record {i}")
                done += n
        end, stated = _TRAILER.unpack(_read_exact(inp, _TRAILER.size, "trailer"))
        if end != STREAM_END_MAGIC or stated != total:
            raise MetadataError(f"extract stream trailer does not match ({end!r}, {stated} "
                                f"bytes stated, {total} read)")

    return header, records()
