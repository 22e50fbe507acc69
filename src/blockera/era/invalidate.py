"""`era invalidate --written-since ERA`: the blocks written in ERA or later, as 0.9.0
`era_invalidate` prints them (maximal runs; `<range begin="b" end = "e"/>` with an exclusive
end, `<block block="b"/>` for runs of one), or as JSON (docs/era.md §5).

A block is listed when its era-array entry is >= ERA or it is set in an archived writeset whose
era is >= ERA, or in the live current writeset when the current era is >= ERA (0.9.0 ignores
the current writeset, and so misses every write of the current era on metadata copied from an
active device or left by a crash). With `--metadata-snapshot` the held snapshot is read (0.9.0
reads the live superblock there).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from blockera.era.image import EraImage, mask_to_ranges
from blockera.row_render import Choice, Num, render_lines


@dataclass
class Invalidation:
    nr_blocks: int
    block_size_sectors: int
    written_since: int
    begins: np.ndarray
    ends: np.ndarray

    def ranges(self) -> list[list[int]]:
        return [[b, e] for b, e in zip(self.begins.tolist(), self.ends.tolist())]


def written_since(image: EraImage, threshold: int) -> Invalidation:
    begins, ends = mask_to_ranges(image.changed_since(threshold))
    return Invalidation(image.nr_blocks, image.sb.data_block_size, threshold, begins, ends)


def write_xml(result: Invalidation, out: BinaryIO) -> None:
    out.write(b"<blocks>\n")
    is_range = (result.ends - result.begins) > 1
    parts = [b"  <", Choice(is_range.astype(np.uint8), (b'block block="', b'range begin="')),
             Num(result.begins), Choice(is_range.astype(np.uint8), (b"", b'" end = "')),
             Num(result.ends, show=is_range), b'"/>\n']
    for chunk in render_lines(parts, len(result.begins)):
        out.write(chunk)
    out.write(b"</blocks>\n")


def write_json(result: Invalidation, out: BinaryIO) -> None:
    doc = {"nr_blocks": result.nr_blocks, "written_since": result.written_since,
           "ranges": result.ranges(), "block_size_sectors": result.block_size_sectors}
    out.write(json.dumps(doc, separators=(", ", ": ")).encode() + b"\n")
