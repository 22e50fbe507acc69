"""Sizes and unit conversions.

Device-mapper tables and status lines speak 512-byte sectors, persistent-data metadata speaks
4 KiB blocks, the era array speaks origin blocks of `block_size` sectors. Names in this project
carry their unit (`offset_bytes`, `length_sectors`, `nr_blocks`); these helpers convert.
"""

import re
from fractions import Fraction

SECTOR_BYTES = 512
METADATA_BLOCK_BYTES = 4096
METADATA_BLOCK_SECTORS = METADATA_BLOCK_BYTES // SECTOR_BYTES


def div_up(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "s": SECTOR_BYTES,
    "k": 1 << 10,
    "m": 1 << 20,
    "g": 1 << 30,
    "t": 1 << 40,
    "p": 1 << 50,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([bskmgtp]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size_bytes(text: str) -> int:
    """Parse a size such as `1T`, `512MiB`, `4096s` (sectors) or `1048576` (bytes).

    Units are binary multiples (K = 1024); `s` means 512-byte sectors."""
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError(f"cannot parse size {text!r}: use a number with an optional unit "
                         "s (sectors), K, M, G, T or P (binary multiples)")
    number, unit = match.groups()
    if len(number) > 40:
        raise ValueError(f"size {text!r} is too large")
    value = Fraction(number) * _SIZE_UNITS[unit.lower()]
    if value.denominator != 1:
        raise ValueError(f"size {text!r} is not a whole number of bytes")
    return int(value)
