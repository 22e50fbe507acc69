"""`era dump`: the metadata as XML, byte-identical to thin-provisioning-tools 0.9.0 `era_dump`
(docs/era.md §5).

Differences from 0.9.0, on purpose: `--logical` reports the newest era a block was written in
(0.9.0 keeps the lowest writeset era), counting the live current writeset (0.9.0 ignores it),
and `--metadata-snapshot` dumps the held snapshot.

The metadata is streamed: a slice of each array at a time, so a dump of any size runs in the
same memory (the array indexes aside: 8 bytes per 4 KiB array block).
"""

from __future__ import annotations

from typing import BinaryIO

import numpy as np

from blockera.era.image import EraImage, bits
from blockera.pdata.walkers import ArrayReader
from blockera.row_render import Choice, Num, render_lines
from blockera.progress import progress

# Rows rendered at a time (a multiple of 64: writeset slices start on word boundaries).
ROWS_PER_SLICE = 1 << 13


def _uuid_text(uuid: bytes) -> bytes:
    """The uuid field printed as a C string, as 0.9.0 does."""
    return uuid.split(b"\0", 1)[0]


def dump_xml(image: EraImage, out: BinaryIO, *, logical: bool = False) -> None:
    """Write the XML. The metadata is read twice, a slice at a time: once to validate all of it
    (damage is reported before any output is written), then to render it; memory does not grow
    with the number of blocks."""
    sb = image.sb
    records = [] if logical else image.writeset_records()
    writesets = [(era, rec.nr_bits, image.writeset_reader(era, rec)) for era, rec in records]
    eras = image.era_array_reader()
    logical_sets: list[tuple[int, int, ArrayReader]] = []
    if logical:
        logical_sets = [(era, rec.nr_bits, image.writeset_reader(era, rec))
                        for era, rec in image.writeset_records()]
        live = image.live
        if not image.from_snapshot and live.current_writeset.root:
            logical_sets.append((live.current_era, live.current_writeset.nr_bits,
                                 image.writeset_reader(live.current_era,
                                                       live.current_writeset)))
    for _, _, reader in writesets + logical_sets + [(0, 0, eras)]:
        for _ in reader.chunks():
            pass
    out.write(b'<superblock uuid="%s" block_size="%d" nr_blocks="%d" current_era="%d">\n'
              % (_uuid_text(sb.uuid), sb.data_block_size, sb.nr_blocks, sb.current_era))
    rows = sum(nr_bits for _, nr_bits, _ in writesets) + sb.nr_blocks
    with progress(rows, "era dump", unit="rows") as bar:
        for era, nr_bits, reader in writesets:
            out.write(b'  <writeset era="%d" nr_bits="%d">\n' % (era, nr_bits))
            for start in range(0, nr_bits, ROWS_PER_SLICE):
                values = bits(reader, nr_bits, start, start + ROWS_PER_SLICE)
                index = np.arange(start, start + len(values), dtype=np.uint64)
                parts = [b'    <bit block="', Num(index), b'" value="',
                         Choice(values.astype(np.uint8), (b"false", b"true")), b'"/>\n']
                for chunk in render_lines(parts, len(values), ROWS_PER_SLICE, bar.update):
                    out.write(chunk)
            out.write(b"  </writeset>\n")
        out.write(b"  <era_array>\n")
        for start in range(0, sb.nr_blocks, ROWS_PER_SLICE):
            values = eras.values(start, start + ROWS_PER_SLICE)
            if logical:
                values = _newest(values, start, logical_sets)
            index = np.arange(start, start + len(values), dtype=np.uint64)
            parts = [b'    <era block="', Num(index), b'" era="', Num(values), b'"/>\n']
            for chunk in render_lines(parts, len(values), ROWS_PER_SLICE, bar.update):
                out.write(chunk)
    out.write(b"  </era_array>\n</superblock>\n")


def _newest(eras: np.ndarray, start: int, sets: list[tuple[int, int, ArrayReader]]
            ) -> np.ndarray:
    """`EraImage.logical_eras` for the slice of the era array at `start`: each block's entry,
    raised to the era of the newest writeset holding it."""
    eras = eras.copy()
    for era, nr_bits, reader in sets:
        marked = bits(reader, nr_bits, start, start + len(eras))
        np.maximum(eras[: len(marked)], np.where(marked, era, 0).astype(np.uint32),
                   out=eras[: len(marked)])
    return eras
