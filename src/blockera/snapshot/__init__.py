"""dm-snapshot exception stores and COW tools (docs/snapshot.md).

The on-disk format of the persistent store (`P`/`PO`), the in-memory transient store (`N`),
and the tools that read COW devices (`cow dump`, `cow changed`, `cow extract`). Byte-compatible
with Linux's dm-snap-persistent.c / dm-snap-transient.c; checked against a real kernel in
tests/kernel/test_cow_kernel.py.

Modules: `layout` (chunk arithmetic), `header` (header and chunk-size rules), `records`
(exception records), `cow_image` (bulk load with the kernel's stopping rules), `anomalies` (what
the kernel accepts but a reader reports), `chunkmap` (the in-memory table), `store` (the
interface), `store_open` (`open_store`), `persistent` and `transient` (the two stores), `build`
(whole-image writer), `changed`, `dump`, `extract` (the tools); the targets in
`snapshot_target`, `origin_target`, `merge_target`, with `origin_registry` and `copyout`.

Store API for the snapshot, snapshot-origin and snapshot-merge targets
-----------------------------------------------------------------------

`open_store(kind, cow, chunk_sectors, *, logical_block_bytes=512) -> ExceptionStore`
    What the snapshot constructor does with `<P|PO|N> <chunk_sectors>`. `kind` is the table's
    word (first letter P/N, case-insensitive; for P the rest must be empty or start with O).
    `chunk_sectors` 0 means the default (P: max(32, block size), N: rejected). For P/PO a COW
    whose header magic is 0 is initialised as a new store; otherwise the header's chunk size
    wins over the table's (`store.chunk_sectors`, with a message in `store.warnings`), the
    version must be 1, and `valid=0` yields a store with `valid == False` and no exceptions.
    Raises TableError (bad store word or chunk size, kernel texts), MetadataError ("Invalid or
    corrupt snapshot", "invalid on-disk chunk size N: ...", "unable to handle snapshot disk
    version N", "Failed to read snapshot metadata: ..." for an area beyond the end), or
    DeviceError (I/O, COW smaller than a chunk).

Helper: `cow_offset_bytes(new_chunk)` (where an exception's data lives). Errors:
`StoreInvalidError` and `StoreWriteError` are DeviceErrors (errno EIO).

Attributes: `kind` ("P", "PO", "N"), `chunk_sectors` (in force), `chunk_bytes`, `valid`,
`overflowed`, `persistent`, `supports_merge`, `overflow_capable` (PO), `warnings` (kernel log
lines), `cow`. PersistentStore also has `next_free`, `current_area`, `current_committed`,
`created` (a new store was written) and `anomalies` (an `AnomalyReport` of the loaded table:
duplicates and bad pointers are loaded like the kernel does, first duplicate wins in lookups).

`lookup(old_chunk) -> int | None`
    COW chunk of a committed exception (dict lookup; test with `is None`, 0 is a valid N
    answer). Pending (allocated, uncommitted) exceptions are not visible.
`len(store)`, `exceptions() -> (old, new)`
    Committed exceptions as uint64 numpy arrays in list order.
`allocate() -> new_chunk`
    The kernel's prepare_exception: re-reads the COW size, raises NoSpaceError (ENOSPC) when
    `cow_sectors < (next_free + 1) * chunk_sectors` (N: `< next_free_sectors + CS`), skips
    metadata chunks. StoreInvalidError if invalid; TargetError while merging. The chunk joins
    `pending`. A NoSpaceError does not change the store: the target decides between
    `invalidate()` (origin writes; snapshot writes on P/N) and `mark_overflowed()` (snapshot
    writes on PO).
`commit(pairs: Iterable[tuple[old_chunk, new_chunk]]) -> None`
    The caller has written (not necessarily flushed) each exception's data to
    `cow_offset_bytes(new_chunk)`. `pairs` must be the oldest pending allocations in order
    (ValueError otherwise; the kernel also commits in allocation order). P/PO: records go into
    the area buffer; each area that fills is written after zeroing its successor; then flush,
    area write, flush. When `commit()` returns every pair is durable and visible to
    `lookup()`: only then may the caller complete the I/O (release the origin write, end the
    snapshot write). Several pairs in one call share one area write (batching). On an I/O
    error (including a successor area beyond the end of the COW, §2.7 `r == 0`) the store
    invalidates itself, writes the header with valid=0 and raises StoreWriteError, whose
    `committed` counts the pairs that did become durable. N: nothing is written.
`invalidate() -> bool`
    P/PO: valid=0 in memory, header rewritten with valid=0 (only that) and flushed; False if
    that write failed. N: memory only.
`mark_overflowed()`
    PO only (ValueError otherwise): the in-memory Overflow state; not written to disk.
`status_fields() -> (sectors_allocated, total_sectors, metadata_sectors)`
    P: `(next_free*CS, live COW sectors, (current_area+2)*CS)`; N: `(next_free_sectors, COW
    sectors, 0)`. `status_text(merge_failed=False)` gives the whole status word(s): "Invalid",
    "Merge failed", "Overflow" or "A/T M"; `table_text()` gives "P 8" / "PO 8" / "N 8".
`prepare_merge() -> MergeBatch(old_first, new_first, count) | None`
    P/PO: the last run of records that is ascending-consecutive in both fields, within the
    current area, ending with the last record; steps back to (and re-reads) the previous area
    when the current one is empty; None when nothing is left. The merge target copies
    `count*CS` sectors from COW `new_first*CS` to origin `old_first*CS` (clipped at the
    origin's end), flushes the origin, then calls `commit_merge(count)`. After the first call
    the store refuses new allocations. N: TargetError ("... does not support snapshot-merge.").
`commit_merge(count)`
    Zeroes the last `count` records, then flush, area write, flush; removes them from the
    table; `next_free = area_location(current_area) + current_committed + 1`. On an I/O error
    raises StoreWriteError and changes nothing (the target reports "Merge failed").

Thread safety: each method holds the store's lock, so concurrent calls are serialised, and
`lookup()` is safe at any time. Ordering is the caller's: data before `commit()`, commits in
allocation order (a multi-threaded target holds completions that finish early, as the kernel
does), no new exceptions once merging. A handover between table instances is simply passing
the same store object on.

Tools: `read_cow(dev)`, `find_anomalies(table, cow_bytes)`, `changed_chunks(image)`,
`dump_cow(dev)`, `plan_extract(image, origin_bytes, source)` + `write_sparse` / `write_stream`,
`write_store(dev, chunk_sectors, old, new)` for whole images.
"""

from blockera.snapshot.anomalies import Anomaly, AnomalyReport, find_anomalies
from blockera.snapshot.build import write_store
from blockera.snapshot.changed import ChangedChunks, changed_chunks, merge_ranges
from blockera.snapshot.header import DiskHeader
from blockera.snapshot.layout import SNAP_MAGIC, SNAPSHOT_DISK_VERSION, Geometry
from blockera.snapshot.persistent import PersistentStore
from blockera.snapshot.cow_image import CowImage, ExceptionTable, read_cow, read_exception_table
from blockera.snapshot.store import (ExceptionStore, MergeBatch, StoreInvalidError,
                                     StoreWriteError, parse_store_type)
from blockera.snapshot.store_open import open_store
from blockera.snapshot.transient import TransientStore

__all__ = [
    "Anomaly", "AnomalyReport", "ChangedChunks", "CowImage", "DiskHeader", "ExceptionStore",
    "ExceptionTable", "Geometry", "MergeBatch", "PersistentStore", "SNAP_MAGIC",
    "SNAPSHOT_DISK_VERSION", "StoreInvalidError", "StoreWriteError", "TransientStore",
    "changed_chunks", "find_anomalies", "merge_ranges", "open_store", "parse_store_type",
    "read_cow", "read_exception_table", "write_store",
]
