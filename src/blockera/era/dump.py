"""`era dump`: the metadata as XML, byte-identical to thin-provisioning-tools 0.9.0 `era_dump`
(docs/era.md §5).

Differences from 0.9.0, on purpose: `--logical` reports the newest era a block was written in
(0.9.0 keeps the lowest writeset era), counting the live current writeset (0.9.0 ignores it),
and `--metadata-snapshot` dumps the held snapshot.
"""

from __future__ import annotations

from typing import BinaryIO

import numpy as np

from blockera.era.image import EraImage
from blockera.row_render import Choice, Num, render_lines
from blockera.progress import progress


def _uuid_text(uuid: bytes) -> bytes:
    """The uuid field printed as a C string, as 0.9.0 does."""
    return uuid.split(b"\0", 1)[0]


def dump_xml(image: EraImage, out: BinaryIO, *, logical: bool = False) -> None:
    sb = image.sb
    # Read everything first so that damage is reported before any output is written.
    writesets = [] if logical else image.writesets()
    eras = image.logical_eras() if logical else image.era_array()
    out.write(b'<superblock uuid="%s" block_size="%d" nr_blocks="%d" current_era="%d">\n'
              % (_uuid_text(sb.uuid), sb.data_block_size, sb.nr_blocks, sb.current_era))
    rows = sum(ws.nr_bits for ws in writesets) + len(eras)
    with progress(rows, "era dump", unit="rows") as bar:
        for ws in writesets:
            out.write(b'  <writeset era="%d" nr_bits="%d">\n' % (ws.era, ws.nr_bits))
            index = np.arange(ws.nr_bits, dtype=np.uint64)
            parts = [b'    <bit block="', Num(index), b'" value="',
                     Choice(ws.bools().astype(np.uint8), (b"false", b"true")), b'"/>\n']
            for chunk in render_lines(parts, ws.nr_bits, on_rows=bar.update):
                out.write(chunk)
            out.write(b"  </writeset>\n")
        out.write(b"  <era_array>\n")
        index = np.arange(len(eras), dtype=np.uint64)
        parts = [b'    <era block="', Num(index), b'" era="', Num(eras), b'"/>\n']
        for chunk in render_lines(parts, len(eras), on_rows=bar.update):
            out.write(chunk)
    out.write(b"  </era_array>\n</superblock>\n")
