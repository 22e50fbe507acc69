"""Parsing the arguments of `snapshot` and `snapshot-merge` table lines (docs/snapshot.md §6;
the kernel's snapshot_ctr(), parse_snapshot_features() and dm_exception_store_create()).

    <origin dev> <COW dev> <P|PO|N> <chunk sectors> [<#features> <feature>...]

Errors carry the kernel's `ti->error` text. Like the kernel, every problem with the store word
or the chunk size is reported as "Couldn't create exception store"; the specific reason the
kernel logs separately follows in parentheses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from blockera.errors import TableError
from blockera.snapshot.header import chunk_size_error
from blockera.snapshot.store import parse_store_type, persistent_overflow_option
from blockera.units import SECTOR_BYTES

_UINT_RE = re.compile(r"^\+?\d+\n?$", re.ASCII)
_FEATURES = ("discard_zeroes_cow", "discard_passdown_origin")
MAX_FEATURES = 2


@dataclass(frozen=True)
class Features:
    discard_zeroes_cow: bool = False
    discard_passdown_origin: bool = False

    def table_text(self) -> str:
        """The features as the kernel reports them: count first, fixed order, none: ''."""
        names = [n for n, on in zip(_FEATURES, (self.discard_zeroes_cow,
                                                 self.discard_passdown_origin)) if on]
        return f" {len(names)} {' '.join(names)}" if names else ""


@dataclass(frozen=True)
class StoreArgs:
    kind: str              # "P", "PO" or "N"
    chunk_sectors: int     # 0: not given (P: default or the header's; N: an error later)

    @property
    def persistent(self) -> bool:
        return self.kind != "N"


def parse_features(args: list[str]) -> Features:
    """The optional feature group after the four fixed arguments."""
    if not args:
        return Features()
    count_text = args[0]
    if (not _UINT_RE.match(count_text) or int(count_text) > MAX_FEATURES
            or int(count_text) > len(args) - 1):
        raise TableError("Invalid number of feature arguments")
    zeroes = passdown = False
    for name in args[1: 1 + int(count_text)]:
        if name.lower() == "discard_zeroes_cow":
            zeroes = True
        elif name.lower() == "discard_passdown_origin":
            passdown = True
        else:
            raise TableError("Unrecognised feature requested")
    if passdown and not zeroes:
        raise TableError("discard_passdown_origin feature depends on discard_zeroes_cow")
    return Features(zeroes, passdown)


def parse_store_args(word: str, chunk_text: str,
                     logical_block_bytes: int = SECTOR_BYTES) -> StoreArgs:
    """The store type word and the chunk size, validated as dm_exception_store_create()
    does."""
    try:
        persistent, options = parse_store_type(word)
        if not _UINT_RE.match(chunk_text) or int(chunk_text) >= 1 << 32:
            raise TableError("Invalid chunk size")
        chunk_sectors = int(chunk_text)
        if chunk_sectors:
            reason = chunk_size_error(chunk_sectors, logical_block_bytes)
            if reason is not None:
                raise TableError(reason)
        overflow = persistent and persistent_overflow_option(options)
    except TableError as exc:
        raise TableError(f"Couldn't create exception store ({exc})") from None
    kind = ("PO" if overflow else "P") if persistent else "N"
    return StoreArgs(kind, chunk_sectors)
