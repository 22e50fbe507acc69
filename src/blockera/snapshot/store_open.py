"""Opening the exception store a snapshot table names: `P`, `PO` (persistent, docs/snapshot.md
§1-§4) or `N` (transient, §5), with the constructor's checks of the chunk size."""

from __future__ import annotations

from blockera.blockdev import BlockDevice
from blockera.errors import TableError
from blockera.snapshot.header import check_table_chunk_size
from blockera.snapshot.persistent import PersistentStore
from blockera.snapshot.store import ExceptionStore, parse_store_type, persistent_overflow_option
from blockera.snapshot.transient import TransientStore
from blockera.units import SECTOR_BYTES


def open_store(kind: str, cow: BlockDevice, chunk_sectors: int, *,
               logical_block_bytes: int = SECTOR_BYTES) -> ExceptionStore:
    """Open (or, for a persistent store whose header magic is 0, create) the exception store
    on `cow`, as the snapshot constructor does. `kind` is the table's store word (`P`, `PO`,
    `N`, any case); `chunk_sectors` is the table's chunk size (0: the default for a new P
    store, the header's for an existing one); `logical_block_bytes` is the larger logical
    block size of the COW and origin devices."""
    persistent, options = parse_store_type(kind)
    if chunk_sectors < 0:
        raise TableError("Invalid chunk size")
    if chunk_sectors:
        check_table_chunk_size(chunk_sectors, logical_block_bytes)
    if persistent:
        overflow = persistent_overflow_option(options)
        return PersistentStore.open(cow, chunk_sectors, overflow=overflow,
                                    logical_block_bytes=logical_block_bytes)
    return TransientStore(cow, chunk_sectors)
