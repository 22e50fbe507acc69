"""The `snapshot` target (docs/snapshot.md §6; the kernel's snapshot_ctr,
snapshot_map, snapshot_preresume, snapshot_resume and snapshot_status in dm-snap.c, target
version 1.16.0).

    snapshot <origin dev> <COW dev> <P|PO|N> <chunk sectors> [<#features> <feature>...]

A frozen view of the origin: a chunk with an exception is read from (and written to) the COW,
any other chunk is read from the origin. A write to a chunk without an exception allocates one:
a write covering the whole chunk goes straight to the COW chunk, a partial write first copies
the origin chunk; the exception is committed (data, flush, record, flush) before the write
completes. When the COW is full the snapshot is invalidated (`P`, `N`), or with `PO` goes to
the in-memory Overflow state in which reads still work and every write fails. An invalid
snapshot fails all I/O with EIO.

Life cycle as in the kernel: the constructor registers the snapshot with its origin (which
is how copy-outs find it) but it receives copy-outs only once resumed ("active"). A table
naming a COW that a live snapshot of the same origin already uses is a handover destination:
it does not read the COW; at its resume (the source must be suspended) it takes over the
source's store and exception table, and the source becomes invalid (table `P 0`).
"""

from __future__ import annotations

import logging
from typing import ClassVar, Iterator

from blockera.dm.devref import DeviceRef, Opener
from blockera.dm.target import Target
from blockera.errors import DeviceError, MetadataError, NoSpaceError, TableError, TargetError
from blockera.snapshot.copyout import copy_runs
from blockera.snapshot.origin_registry import OriginGroup, Sharing, registry_for
from blockera.snapshot.store import ExceptionStore, StoreWriteError
from blockera.snapshot.store_open import open_store
from blockera.snapshot.table_args import StoreArgs, parse_features, parse_store_args
from blockera.units import SECTOR_BYTES

log = logging.getLogger(__name__)


class _Piece:
    """The part of a request inside one chunk."""

    __slots__ = ("chunk", "offset_sectors", "nr_sectors", "request_sectors")

    def __init__(self, chunk: int, offset_sectors: int, nr_sectors: int,
                 request_sectors: int) -> None:
        self.chunk = chunk
        self.offset_sectors = offset_sectors       # inside the chunk
        self.nr_sectors = nr_sectors
        self.request_sectors = request_sectors     # from the start of the request


def _eio(message: str) -> DeviceError:
    return DeviceError(message, errno_name="EIO")


class SnapshotTarget(Target):
    name = "snapshot"
    version = (1, 16, 0)
    is_merge: ClassVar[bool] = False

    def __init__(self, opener: Opener, length_sectors: int, args: list[str]) -> None:
        super().__init__(opener, length_sectors, args)
        if len(args) < 4:
            raise TableError("requires 4 or more arguments")
        self.features = parse_features(args[4:])
        self.supports_discard = self.features.discard_zeroes_cow
        try:
            self.origin: DeviceRef = self.get_device(args[0], writable=self.is_merge,
                                                     what="origin device")
        except DeviceError as exc:
            raise TableError(f"Cannot get origin device ({exc})") from None
        try:
            self.cow: DeviceRef = self.get_device(args[1], writable=True, what="COW device")
        except DeviceError as exc:
            raise TableError(f"Cannot get COW device ({exc})") from None
        if self.cow.identity == self.origin.identity:
            raise TableError("COW device cannot be the same as origin device")
        self.store_args: StoreArgs = parse_store_args(args[2], args[3])
        if self.is_merge and not self.store_args.persistent:
            raise TableError("Snapshot exception store does not support snapshot-merge.")
        self.origin_identity = self.origin.identity
        self.cow_identity = self.cow.identity
        self.store: ExceptionStore | None = None
        self.chunk_sectors = 0
        self.active = False
        self.suspended = False
        self.merge_failed = False
        self._valid = True
        self.registry = registry_for(opener)
        self.group: OriginGroup = self.registry.acquire(self.origin_identity)
        try:
            with self.registry.lock:
                destination = self._validate_handover()
                self.registry.add(self.group, self)
            if not destination:
                self._open_store()
                self.registry.reinsert(self.group, self)
        except BaseException:
            self.registry.remove(self.group, self)
            self.registry.release(self.group)
            raise

    def _validate_handover(self) -> bool:
        """The kernel's __validate_exception_handover: True if this table must take its store
        over from a live snapshot at resume."""
        sharing = self.registry.find_sharing(self.group, self)
        if sharing.count == 2 or sharing.destination is not None:
            raise TableError("Snapshot cow pairing for exception table handover failed")
        if sharing.source is None:
            return False
        if not self.is_merge:
            return True
        if sharing.merging is not None:
            raise TableError("A snapshot is already merging.")
        source_store = sharing.source.store
        if source_store is None or not source_store.supports_merge:
            raise TableError("Snapshot exception store does not support snapshot-merge.")
        return True

    def _open_store(self) -> None:
        try:
            store = open_store(self.store_args.kind, self.cow.dev, self.store_args.chunk_sectors)
        except TableError:
            raise
        except (MetadataError, DeviceError) as exc:
            raise TableError(f"Failed to read snapshot metadata ({exc})",
                             errno_name=exc.errno_name) from None
        for warning in store.warnings:
            log.warning("snapshot: %s", warning)
        self.store = store
        self.chunk_sectors = store.chunk_sectors

    # -- state --------------------------------------------------------------------------------
    @property
    def valid(self) -> bool:
        return self._valid and self.store is not None and self.store.valid

    def invalidate(self, reason: str) -> None:
        """The kernel's __invalidate_snapshot: the store is dropped (header valid=0 for P)."""
        if not self.valid:
            return
        assert self.store is not None
        log.error("snapshot: Invalidating snapshot: %s", reason)
        self.store.invalidate()

    def _check_usable(self, write: bool) -> ExceptionStore:
        if not self.valid:
            raise _eio("snapshot is invalid: its COW filled up, failed or was handed over; "
                       "every I/O to it fails")
        assert self.store is not None
        if write and self.store.overflowed:
            raise _eio("snapshot overflowed (its COW is full): writes to it fail, reads work")
        return self.store

    # -- mapping helpers ----------------------------------------------------------------------
    def _pieces(self, sector: int, nr_sectors: int) -> Iterator[_Piece]:
        cs = self.chunk_sectors
        done = 0
        while done < nr_sectors:
            s = sector + done
            offset = s % cs
            n = min(cs - offset, nr_sectors - done)
            yield _Piece(s // cs, offset, n, done)
            done += n

    def _read_mapped(self, store: ExceptionStore, sector: int, nr_sectors: int,
                     cow_only: bool = False) -> bytes:
        """Read through the exception table (caller holds the group's lock): COW chunks where
        there is an exception, the origin elsewhere; contiguous runs are read at once."""
        out = bytearray(nr_sectors * SECTOR_BYTES)
        runs: list[list] = []      # [device, device offset, request offset, length]
        for piece in self._pieces(sector, nr_sectors):
            new = store.lookup(piece.chunk)
            if new is None:
                dev = self.origin.dev
                at = (piece.chunk * self.chunk_sectors + piece.offset_sectors) * SECTOR_BYTES
            else:
                dev = self.cow.dev
                at = store.cow_offset_bytes(new) + piece.offset_sectors * SECTOR_BYTES
            length = piece.nr_sectors * SECTOR_BYTES
            if runs and runs[-1][0] is dev and runs[-1][1] + runs[-1][3] == at:
                runs[-1][3] += length
            else:
                runs.append([dev, at, piece.request_sectors * SECTOR_BYTES, length])
        for dev, at, request_at, length in runs:
            out[request_at: request_at + length] = dev.read(at, length)
        return bytes(out)

    def _write_cow_runs(self, store: ExceptionStore, data: memoryview,
                        items: list[tuple[_Piece, int]]) -> None:
        """Write request pieces to their COW chunks `(piece, new_chunk)`, merging contiguous
        ones into one write."""
        i = 0
        while i < len(items):
            piece, new = items[i]
            at = store.cow_offset_bytes(new) + piece.offset_sectors * SECTOR_BYTES
            start = piece.request_sectors * SECTOR_BYTES
            length = piece.nr_sectors * SECTOR_BYTES
            j = i + 1
            while j < len(items):
                p2, n2 = items[j]
                at2 = store.cow_offset_bytes(n2) + p2.offset_sectors * SECTOR_BYTES
                if at2 != at + length or p2.request_sectors * SECTOR_BYTES != start + length:
                    break
                length += p2.nr_sectors * SECTOR_BYTES
                j += 1
            self.cow.dev.write(at, data[start: start + length])
            i = j

    # -- I/O ------------------------------------------------------------------------------------
    def read(self, sector: int, nr_sectors: int) -> bytes:
        self._check_usable(write=False)
        with self.group.io.shared():
            return self._read_mapped(self._check_usable(write=False), sector, nr_sectors)

    def write(self, sector: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        nr_sectors = len(view) // SECTOR_BYTES
        self._check_usable(write=True)
        with self.group.io.shared():
            store = self._check_usable(write=True)
            pieces = list(self._pieces(sector, nr_sectors))
            mapped = [(p, store.lookup(p.chunk)) for p in pieces]
            if all(new is not None for _, new in mapped):
                self._write_cow_runs(store, view, mapped)    # type: ignore[arg-type]
                return
        with self.group.io.exclusive():
            self._write_allocating(view, list(self._pieces(sector, nr_sectors)))

    def _write_allocating(self, data: memoryview, pieces: list[_Piece]) -> None:
        """A write reaching chunks without an exception (group lock held exclusively)."""
        store = self._check_usable(write=True)
        existing: list[tuple[_Piece, int]] = []
        fresh: list[tuple[_Piece, int]] = []
        full = False
        for piece in pieces:     # as the kernel's per-chunk bios: those after a failure fail
            new = store.lookup(piece.chunk)
            if new is not None:
                existing.append((piece, new))
                continue
            try:
                fresh.append((piece, store.allocate()))
            except NoSpaceError:
                full = True
                break
        if full:
            if store.overflow_capable:
                if not store.overflowed:
                    log.error("snapshot: Snapshot overflowed: Unable to allocate exception.")
                store.mark_overflowed()
            else:
                self.invalidate("Unable to allocate exception.")
        if not self.valid:
            raise _eio("snapshot invalidated: its COW device is full")
        whole = [(p, n) for p, n in fresh if p.nr_sectors == self.chunk_sectors]
        partial = [(p, n) for p, n in fresh if p.nr_sectors != self.chunk_sectors]
        try:
            self._write_cow_runs(store, data, whole)
            copy_runs(self, [(p.chunk, n) for p, n in partial])
            store.commit([(p.chunk, n) for p, n in fresh])
        except StoreWriteError as exc:
            self.invalidate("Error reading/writing.")
            raise _eio(f"snapshot invalidated: {exc}") from None
        except DeviceError as exc:
            self.invalidate("Error reading/writing.")
            raise _eio(f"snapshot invalidated: the COW could not be written: {exc}") from None
        self._write_cow_runs(store, data, sorted(existing + partial,
                                                 key=lambda item: item[0].request_sectors))
        if full:
            raise _eio("snapshot overflowed: its COW device is full, writes to it fail")

    def discard(self, sector: int, nr_sectors: int) -> None:
        if not self.features.discard_zeroes_cow:
            super().discard(sector, nr_sectors)     # not supported: raises
        self._check_usable(write=True)
        with self.group.io.shared():
            store = self._check_usable(write=True)
            for piece in self._pieces(sector, nr_sectors):
                new = store.lookup(piece.chunk)
                if new is None:
                    continue        # no exception: nothing to zero, no copy-out either
                at = store.cow_offset_bytes(new) + piece.offset_sectors * SECTOR_BYTES
                length = piece.nr_sectors * SECTOR_BYTES
                if piece.nr_sectors == self.chunk_sectors:
                    self.cow.dev.write_zeroes(at, length)
                else:
                    self.cow.dev.discard(at, length)
        if self.features.discard_passdown_origin:
            self.origin.dev.discard(sector * SECTOR_BYTES, nr_sectors * SECTOR_BYTES)

    def flush(self) -> None:
        self.cow.dev.flush()

    # -- life cycle -----------------------------------------------------------------------------
    def postsuspend(self) -> None:
        self.suspended = True

    def preresume(self) -> None:
        sharing = self.registry.find_sharing(self.group, self)
        if sharing.source is not None and sharing.destination is not None:
            if sharing.source is self:
                raise TargetError("Unable to resume snapshot source until handover completes.")
            if not sharing.source.suspended:
                raise TargetError("Unable to perform snapshot handover until source is "
                                  "suspended.")

    def resume(self) -> None:
        sharing = self.registry.find_sharing(self.group, self)
        merging = sharing.merging if sharing.merging is not self else None
        restart = merging is not None and merging.stop_merge()
        with self.group.io.exclusive():    # the origin's I/O waits, as under the kernel's
            sharing = self.registry.find_sharing(self.group, self)   # internal suspend
            if sharing.source is not None and sharing.destination is self:
                self._take_over(sharing)
            self.registry.reinsert(self.group, self)
            self.active = True
            self.suspended = False
        if restart:
            assert merging is not None
            merging.start_merge()

    def _take_over(self, sharing: Sharing) -> None:
        """The kernel's __handover_exceptions: this table gets the source's store, exception
        table and state; the source is left with this table's unread store and is invalid."""
        source = sharing.source
        assert source is not None and source.store is not None
        store = source.store
        if store.persistent:
            store.kind = "PO" if self.store_args.kind == "PO" else "P"
        self.store, source.store = store, None
        self.store_args, source.store_args = source.store_args, self.store_args
        self.chunk_sectors = store.chunk_sectors
        self._valid = source._valid
        source._valid = False

    def stop_merge(self) -> bool:
        """Stop merging (snapshot-merge only); True if a merge was running."""
        return False

    def start_merge(self) -> None:
        """Start merging (snapshot-merge only)."""

    def destroy(self) -> None:
        sharing = self.registry.find_sharing(self.group, self)
        if sharing.source is self and sharing.destination is not None:
            sharing.destination._valid = False
            log.error("snapshot: Cancelling snapshot handover.")
        with self.group.io.exclusive():     # no origin write is using this snapshot any more
            self.registry.remove(self.group, self)
        self.registry.release(self.group)
        super().destroy()

    # -- reporting ------------------------------------------------------------------------------
    def status(self) -> str:
        if not self.valid or self.store is None:
            return "Invalid"
        return self.store.status_text(self.merge_failed)

    def table_args(self) -> str:
        store_text = (self.store.table_text() if self.store is not None
                      else f"{self.store_args.kind} 0")
        return (f"{self.origin.table_name} {self.cow.table_name} {store_text}"
                f"{self.features.table_text()}")
