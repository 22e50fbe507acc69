"""The block manager: 4 KiB metadata blocks read and validated on the way in, written with their
location and checksum stamped on the way out (the kernel's dm-block-manager / dm-bufio role).

Reads are cached (validated contents, bounded LRU); blocks changed in the current transaction are
held dirty until `flush`, which writes them in ascending order (adjacent blocks in one write)
and then issues a device flush.

See docs/persistent-data.md §1, §2.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from blockera.blockdev import BlockDevice, FileDevice
from blockera.errors import DeviceError, MetadataError
from blockera.pdata.checksum import Validator
from blockera.units import METADATA_BLOCK_BYTES

BLOCK = METADATA_BLOCK_BYTES


class BlockManager:
    """Validated block I/O over a metadata device."""

    def __init__(self, dev: BlockDevice, *, cache_blocks: int = 8192) -> None:
        self.dev = dev
        self.nr_blocks = dev.size_bytes // BLOCK
        self._clean: OrderedDict[int, tuple[bytes, Validator | None]] = OrderedDict()
        self._dirty: dict[int, tuple[bytearray, Validator]] = {}
        self._cache_blocks = cache_blocks

    # -- reading -------------------------------------------------------------------------
    def check_location(self, location: int, what: str = "block") -> None:
        if not 0 <= location < self.nr_blocks:
            raise MetadataError(f"{what} pointer {location} is beyond the end of the metadata "
                                f"device ({self.nr_blocks} blocks)")

    def read_raw(self, location: int) -> bytes:
        """The block as stored, unvalidated (for checks that must see damaged blocks)."""
        self.check_location(location)
        dirty = self._dirty.get(location)
        if dirty is not None:
            return bytes(dirty[0])
        try:
            return self.dev.read(location * BLOCK, BLOCK)
        except DeviceError as exc:
            raise MetadataError(f"cannot read metadata block: {exc}", block=location) from None

    def read(self, location: int, validator: Validator) -> bytes | bytearray:
        """The block's contents, validated with `validator`. A block dirty in the current
        transaction is returned as its (mutable) buffer."""
        dirty = self._dirty.get(location)
        if dirty is not None:
            return dirty[0]
        cached = self._clean.get(location)
        if cached is not None:
            data, checked_by = cached
            if checked_by is not validator:
                validator.check(location, data)
                self._clean[location] = (data, validator)
            self._clean.move_to_end(location)
            return data
        data = self.read_raw(location)
        validator.check(location, data)
        self._remember(location, data, validator)
        return data

    def _remember(self, location: int, data: bytes, validator: Validator | None) -> None:
        self._clean[location] = (data, validator)
        if len(self._clean) > self._cache_blocks:
            self._clean.popitem(last=False)

    def read_many(self, locations: np.ndarray) -> np.ndarray:
        """Raw contents of many blocks as a (k, 4096) uint8 array (bulk tool paths). Locations
        must already be range-checked."""
        out = np.empty((len(locations), BLOCK), dtype=np.uint8)
        if len(locations) == 0:
            return out
        dev = self.dev
        if isinstance(dev, FileDevice) and not dev.direct and not self._dirty:
            mm = np.memmap(dev.path, dtype=np.uint8, mode="r",
                           shape=(self.nr_blocks, BLOCK)) if self.nr_blocks else None
            if mm is not None:
                np.take(mm, locations, axis=0, out=out)
                del mm
                return out
        for i, loc in enumerate(locations.tolist()):
            out[i] = np.frombuffer(self.read_raw(loc), dtype=np.uint8)
        return out

    # -- writing -------------------------------------------------------------------------

    def write_lock(self, location: int, validator: Validator) -> bytearray:
        """A mutable buffer holding the block's current (validated) contents; it is written at
        the next flush."""
        dirty = self._dirty.get(location)
        if dirty is not None:
            self._dirty[location] = (dirty[0], validator)
            return dirty[0]
        buf = bytearray(self.read(location, validator))
        self._clean.pop(location, None)
        self._dirty[location] = (buf, validator)
        return buf

    def write_lock_zero(self, location: int, validator: Validator) -> bytearray:
        """A zero-filled buffer for `location` (its old contents are not read)."""
        self.check_location(location)
        buf = bytearray(BLOCK)
        self._clean.pop(location, None)
        self._dirty[location] = (buf, validator)
        return buf


    def flush(self) -> None:
        """Write every dirty block (ascending; a run of adjacent blocks in one write: a
        commit's new shadows usually are one run), then flush the device."""
        run: list[tuple[int, bytes, Validator]] = []
        for location in sorted(self._dirty):
            buf, validator = self._dirty[location]
            validator.prepare(location, buf)
            if run and location != run[-1][0] + 1:
                self._write_run(run)
                run = []
            run.append((location, bytes(buf), validator))
        if run:
            self._write_run(run)
        self._dirty.clear()
        self.dev.flush()

    def _write_run(self, run: list[tuple[int, bytes, Validator]]) -> None:
        """Write adjacent blocks at once; they are then the cache's clean copies."""
        self.dev.write(run[0][0] * BLOCK,
                       run[0][1] if len(run) == 1 else b"".join(data for _, data, _ in run))
        for location, data, validator in run:
            self._remember(location, data, validator)

    def write_now(self, location: int, validator: Validator, buf: bytearray) -> None:
        """Stamp and write one block immediately, then flush (the superblock at commit)."""
        validator.prepare(location, buf)
        self.dev.write(location * BLOCK, buf)
        self.dev.flush()
        self._dirty.pop(location, None)
        self._remember(location, bytes(buf), validator)

    def discard_dirty(self) -> None:
        """Forget uncommitted changes (after a failed transaction)."""
        self._dirty.clear()

    def forget_cache(self) -> None:
        self._clean.clear()
