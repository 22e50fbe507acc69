"""Device-mapper table lines: `<start> <length> <target> <args...>`, sizes in 512-byte sectors.

A table is one or more lines that must start at sector 0 and follow each other without gaps,
like the kernel requires (dm_table_add_target: "Gap in table"). Blank lines and `#` comments
are ignored, as dmsetup ignores them in table files. Start and length are ASCII decimal
numbers below 2^64 (what the kernel's parser takes), and the whole device must stay below
2^63 bytes, the largest size Linux (and an NBD client) can address.

See docs/engine.md §1.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from blockera.errors import TableError
from blockera.units import SECTOR_BYTES

MAX_DEVICE_SECTORS = ((1 << 63) - 1) // SECTOR_BYTES
_DECIMAL = re.compile(r"[0-9]{1,20}\Z")


@dataclass(frozen=True)
class TableLine:
    start_sectors: int
    length_sectors: int
    target: str
    args: tuple[str, ...]

    def format(self, args_text: str | None = None) -> str:
        text = " ".join(self.args) if args_text is None else args_text
        return f"{self.start_sectors} {self.length_sectors} {self.target}" + (f" {text}" if text else "")


def _sector_count(text: str, what: str, line_no: int) -> int:
    if not _DECIMAL.match(text) or int(text) >= 1 << 64:
        shown = text if len(text) <= 30 else f"{text[:30]}..."
        raise TableError(f"line {line_no}: {what} {shown!r} is not a whole number of sectors "
                         "(ASCII digits, below 2^64)")
    return int(text)


def parse_table(text: str) -> list[TableLine]:
    """Parse and validate a whole table."""
    lines: list[TableLine] = []
    expected_start = 0
    for line_no, raw in enumerate(text.splitlines(), 1):
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) < 3:
            raise TableError(f"line {line_no}: expected '<start> <length> <target> <args...>', "
                             f"got {raw.strip()!r}")
        start = _sector_count(words[0], "start", line_no)
        length = _sector_count(words[1], "length", line_no)
        if length == 0:
            raise TableError(f"line {line_no}: zero-length target")
        if start != expected_start:
            raise TableError(f"line {line_no}: Gap in table: target starts at sector {start}, "
                             f"the previous one ends at {expected_start}")
        if start + length > MAX_DEVICE_SECTORS:
            raise TableError(f"line {line_no}: the device would end at sector {start + length}, "
                             f"beyond the largest device Linux can address "
                             f"({MAX_DEVICE_SECTORS} sectors)")
        lines.append(TableLine(start, length, words[2], tuple(words[3:])))
        expected_start = start + length
    if not lines:
        raise TableError("empty table: give at least one '<start> <length> <target> <args...>' "
                         "line")
    return lines
