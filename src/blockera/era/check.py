"""`era check`: validate dm-era metadata (docs/era.md §5).

Checks what 0.9.0 `era_check` checks (superblock, writeset tree and every archived writeset,
era array, eras not above the current era) and what it does not: the current writeset, the held
metadata snapshot, and the space map's reference counts against every structure, with the
persistent-data checker (docs/persistent-data.md §7). Findings are collected (the check goes on
after damage where it can) and the result is `ok` only if there are no errors. Arrays are
checked block by block as they are read, so memory does not grow with the number of origin
blocks.
"""

from __future__ import annotations

import struct

import numpy as np

from blockera.blockdev import BlockDevice
from blockera.errors import MetadataError
from blockera.era.superblock import (SUPERBLOCK, SUPERBLOCK_LOCATION, Superblock,
                                     structural_problems)
from blockera.pdata.bitset import words_for_bits
from blockera.pdata.checker import CheckReport, MetadataChecker

KNOWN_FLAGS = 1   # bit 0: clean shutdown (thin-provisioning-tools)


class _TooGreat:
    """Counts era array entries above the current era as the array's blocks go by, keeping
    the first one."""

    def __init__(self, current_era: int) -> None:
        self.current_era = current_era
        self.count = 0
        self.block = self.era = 0

    def __call__(self, start: int, eras: np.ndarray) -> None:
        above = np.flatnonzero(eras > self.current_era)
        if len(above):
            if not self.count:
                self.block, self.era = start + int(above[0]), int(eras[above[0]])
            self.count += len(above)


class EraChecker(MetadataChecker):
    """The era superblock, its trees and arrays, the held snapshot, then the space map."""

    # -- superblock ------------------------------------------------------------------------------
    def check_superblock(self) -> Superblock | None:
        self.report.sections.append("examining superblock")
        if self.bm.nr_blocks == 0:
            self.error("metadata device/file too small (less than 4 KiB); is this binary "
                       "metadata?")
            return None
        try:
            sb = Superblock.unpack(self.bm.read(SUPERBLOCK_LOCATION, SUPERBLOCK))
        except MetadataError as exc:
            self.error(f"superblock is corrupt: {exc}")
            head = self.bm.read_raw(0)[:64].lstrip()
            self.report.looks_like_xml = head.startswith((b"<superblock", b"<?xml", b"<!DOCTYPE"))
            return None
        if sb.flags & ~KNOWN_FLAGS:
            # the kernel ignores the flags word and writes 0 at its next commit
            self.warning(f"superblock has unknown flags {sb.flags:#x}")
        problems = structural_problems(sb, self.bm.nr_blocks)
        for p in problems:
            self.error(f"superblock is invalid: {p}")
        return None if problems else sb

    def _writeset_tree(self, root: int, what: str) -> None:
        leaves = self.tree(root, 12, what)
        for new, keys, values in leaves or []:
            if not new:
                continue   # a leaf shared with the other superblock: its writesets are counted
            for era, raw in zip(keys.tolist(), values):
                nr_bits, bitset_root = struct.unpack("<IQ", raw.tobytes())
                prefix = "snapshot " if what.startswith("snapshot") else ""
                self.scan_array(bitset_root, words_for_bits(nr_bits), "<u8",
                                f"{prefix}writeset of era {era}")

    # -- the whole check ---------------------------------------------------------------------------
    def run(self, superblock_only: bool = False) -> CheckReport:
        sb = self.check_superblock()
        if sb is None or superblock_only:
            return self.report
        self.refs[SUPERBLOCK_LOCATION] += 1
        self.report.sections.append("examining writeset tree")
        self._writeset_tree(sb.writeset_tree_root, "writeset tree")
        self.report.sections.append("examining era array")
        too_great = _TooGreat(sb.current_era)
        if self.scan_array(sb.era_array_root, sb.nr_blocks, "<u4", "era array", too_great):
            if too_great.count:
                self.error(f"era array: {too_great.count} entries have an era greater than the "
                           f"current era {sb.current_era} (first: block {too_great.block}, era "
                           f"{too_great.era})")
        if sb.current_writeset.root:
            self.report.sections.append("examining current writeset")
            self.scan_array(sb.current_writeset.root,
                            words_for_bits(sb.current_writeset.nr_bits), "<u8",
                            "current writeset")
        if sb.metadata_snap:
            self.report.sections.append("examining metadata snapshot")
            self._snapshot(sb.metadata_snap)
        self.report.sections.append("examining space map")
        self.space_map(sb.space_map_root)
        return self.report

    def _snapshot(self, location: int) -> None:
        self.refs[location] += 1
        try:
            snap = Superblock.unpack(self.bm.read(location, SUPERBLOCK))
        except MetadataError as exc:
            self.error(f"metadata snapshot: {exc}")
            return
        self._writeset_tree(snap.writeset_tree_root, "snapshot writeset tree")
        self.scan_array(snap.era_array_root, snap.nr_blocks, "<u4", "snapshot era array")

def check_era_metadata(dev: BlockDevice, *, superblock_only: bool = False) -> CheckReport:
    return EraChecker(dev).run(superblock_only)
