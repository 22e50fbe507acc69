"""A restic repository (format version 2, also reads version 1): open it, store and load blobs,
trees and snapshots (docs/backup-repository.md §11 writing, §12 reading; the other sections
for each file).

    repo = Repository.open(LocalBackend("/srv/backup"), password)
    with repo.lock():                                  # non-exclusive; loads the index
        ids = [repo.save_blob(BlobType.DATA, chunk) for chunk in chunks]
        tree = Tree([Node.file("disk.img", size, ids)])
        root = repo.save_tree(tree)
        repo.save_snapshot(Snapshot.new(root, ["/dev/vda"]))   # flushes first
    repo.close()

Writing follows the repository's ordering rule: packs are written (and durable) first, then the
index files that point into them, then the snapshot that points at the trees; a crash at any
point leaves a valid repository (at worst, packs no index mentions, which `restic prune` removes).

`save_blob` hashes the blob in the caller's thread (its ID is returned at once, and a blob the
index or the current batch already holds is not stored again), then compresses (zstd level 3;
kept raw when that does not make it smaller) and encrypts it in a small thread pool; hashlib,
zstd and AES release the GIL, so the pool uses the other cores. At most `max_in_flight` blobs
wait in the pool, so memory stays bounded whatever the caller feeds in. A pack is written when
it reaches the target size; `flush()` writes the partial packs, then the index.

Every write needs a lock (`lock()`), and stops with `LockLostError` once the lock is lost.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import TypeVar

from blockera.backup.backend import Backend, FileType
from blockera.backup.compression import compress, decode_unpacked, decompress, encode_unpacked
from blockera.backup.config import STABLE_VERSION, RepoConfig
from blockera.backup.crypto import MasterKey
from blockera.backup.errors import (BackendError, BackendNotFoundError, IntegrityError,
                                    NotARepositoryError, RepositoryError)
from blockera.backup.ids import BlobType, hash_id, is_id_hex, short
from blockera.backup.index import INDEX_MAX_BLOBS, IndexColumns, MasterIndex, split_into_files
from blockera.backup.keys import (KdfParams, KeyFile, default_kdf_params, list_key_names,
                                  load_key_file, make_key_file, open_master_key, save_key_file)
from blockera.backup.locks import RepositoryLock
from blockera.backup.pack import (MAX_BLOB_BYTES, PACK_SIZE_BYTES, PackBuilder, PackEntry,
                                  parse_pack_tail)
from blockera.backup.snapshots import Snapshot, find_snapshot
from blockera.backup.tree import Tree

log = logging.getLogger(__name__)

_TYPE_CODE = {BlobType.DATA: b"\x00", BlobType.TREE: b"\x01"}
_PACK_TAIL_GUESS_BYTES = 64 << 10
INDEX_MAX_AGE_S = 10 * 60
"""Packs written this long ago get an index file at the next pack, however few blobs wait
(restic's rule: a long backup keeps its progress indexed)."""
LOAD_CONCURRENCY = 8
"""Index and snapshot files loaded at once (S3 requests: the backend's connection pool
bounds them further)."""
T = TypeVar("T")


class BlobNotFoundError(RepositoryError):
    """A blob is in no index of the repository."""

    exit_code = 1
    errno_name = "ENOENT"


class Repository:
    """An open repository: its backend, master key and config."""

    def __init__(self, backend: Backend, key: MasterKey, key_name: str, config: RepoConfig, *,
                 threads: int | None = None, pack_size_bytes: int = PACK_SIZE_BYTES,
                 compression: bool = True, index_max_blobs: int = INDEX_MAX_BLOBS,
                 max_in_flight: int | None = None) -> None:
        """Use `init` or `open`. `threads`: compress/encrypt workers (0: do everything in the
        caller's thread; default: one per CPU, at most 4). `pack_size_bytes`: when a pack is
        closed (restic's default 16 MiB; restic writes 4 to 128 MiB, reads any).
        `compression`: zstd for blobs (version 2 only). `index_max_blobs`: blobs per index
        file. `max_in_flight`: blobs waiting for a worker (default twice the workers)."""
        if pack_size_bytes <= 0 or index_max_blobs <= 0:
            raise ValueError("pack size and index size must be positive")
        self.backend = backend
        self.key = key
        self.key_name = key_name
        self.config = config
        self.pack_size_bytes = pack_size_bytes
        self.compression = compression and config.version >= 2
        self.index_max_blobs = index_max_blobs
        self.threads = min(4, os.cpu_count() or 1) if threads is None else threads
        self.max_in_flight = max_in_flight or max(2, 2 * self.threads)
        self._executor = ThreadPoolExecutor(self.threads, "blob") if self.threads else None
        self._slots = threading.BoundedSemaphore(self.max_in_flight)
        self._state = threading.Lock()           # index, pending, unindexed, failure, futures
        self._packer_mutex = threading.Lock()    # the open packs
        self._index_write = threading.Lock()     # one index writer at a time
        self._index: MasterIndex | None = None
        self._pending: set[bytes] = set()        # blobs accepted but not yet in a written pack
        self._packers: dict[BlobType, PackBuilder] = {}
        self._unindexed: list[tuple[bytes, list[PackEntry]]] = []
        self._unindexed_blobs = 0
        self._unindexed_since = 0.0              # monotonic time of the oldest unindexed pack
        self._futures: set[Future[None]] = set()
        self._failure: BaseException | None = None
        self._lock: RepositoryLock | None = None
        self._closed = False

    @property
    def location(self) -> str:
        return self.backend.location

    # -- creating and opening -------------------------------------------------------------

    @classmethod
    def init(cls, backend: Backend, password: str | bytes, *, version: int = STABLE_VERSION,
             kdf_params: KdfParams | None = None, threads: int | None = None,
             pack_size_bytes: int = PACK_SIZE_BYTES, compression: bool = True,
             index_max_blobs: int = INDEX_MAX_BLOBS,
             max_in_flight: int | None = None) -> "Repository":
        """Create a repository: restic's directory layout, a new master key under `password`
        (scrypt parameters calibrated like restic's unless given), and the config. The other
        options are those of the constructor."""
        try:
            exists = backend.exists(FileType.CONFIG, "")
        except BackendError:
            exists = False
        if exists:
            raise RepositoryError(f"{backend.location}: a repository already exists here")
        config = RepoConfig.new(version)
        backend.create()
        master = MasterKey.random()
        key = make_key_file(password, master, kdf_params or default_kdf_params())
        key_name = save_key_file(backend, key)
        backend.save(FileType.CONFIG, "", master.encrypt(config.encode()))
        return cls(backend, master, key_name, config, threads=threads,
                   pack_size_bytes=pack_size_bytes, compression=compression,
                   index_max_blobs=index_max_blobs, max_in_flight=max_in_flight)

    @classmethod
    def open(cls, backend: Backend, password: str | bytes, *, key_hint: str | None = None,
             threads: int | None = None, pack_size_bytes: int = PACK_SIZE_BYTES,
             compression: bool = True, index_max_blobs: int = INDEX_MAX_BLOBS,
             max_in_flight: int | None = None) -> "Repository":
        """Open an existing repository with one of its passwords (the key file whose name
        starts with `key_hint` is tried first)."""
        if not backend.exists(FileType.CONFIG, ""):  # storage failures stay BackendErrors
            raise NotARepositoryError(f"{backend.location}: not a repository (there is no "
                                      "config file); create one with init")
        key_name, master = open_master_key(backend, password, key_hint)
        return cls.open_with_key(backend, key_name, master, threads=threads,
                                 pack_size_bytes=pack_size_bytes, compression=compression,
                                 index_max_blobs=index_max_blobs, max_in_flight=max_in_flight)

    @classmethod
    def open_with_key(cls, backend: Backend, key_name: str, master: MasterKey, *,
                      threads: int | None = None, pack_size_bytes: int = PACK_SIZE_BYTES,
                      compression: bool = True, index_max_blobs: int = INDEX_MAX_BLOBS,
                      max_in_flight: int | None = None) -> "Repository":
        """Open a repository whose master key was already opened (`keys.open_master_key`, e.g.
        in a thread while the caller was busy with something else)."""
        raw = backend.load(FileType.CONFIG, "")
        try:
            plain = master.decrypt(raw, f"{backend.location}: config")
        except IntegrityError as exc:
            raise IntegrityError(f"{exc} (the config or key {key_name[:8]} is damaged)") from None
        config = RepoConfig.decode(plain, backend.location)
        return cls(backend, master, key_name, config, threads=threads,
                   pack_size_bytes=pack_size_bytes, compression=compression,
                   index_max_blobs=index_max_blobs, max_in_flight=max_in_flight)

    def close(self) -> None:
        """Stop the workers and release the lock. Blobs not flushed are dropped."""
        if self._closed:
            return
        self._closed = True
        with self._state:
            unflushed = len(self._pending) + self._unindexed_blobs
        if unflushed and self._failure is None:
            log.warning("%s: closed with %d blobs not flushed; they are in no "
                        "index", self.location, unflushed)
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> "Repository":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- keys ------------------------------------------------------------------------------

    def add_key(self, password: str | bytes, *, kdf_params: KdfParams | None = None,
                username: str | None = None, hostname: str | None = None) -> str:
        """A further key file (password) for this repository's master key; its name."""
        key = make_key_file(password, self.key, kdf_params or default_kdf_params(),
                            username=username, hostname=hostname)
        return save_key_file(self.backend, key)

    def list_keys(self) -> list[KeyFile]:
        return [load_key_file(self.backend, name) for name in list_key_names(self.backend)]

    # -- unpacked files --------------------------------------------------------------------

    def save_unpacked(self, ftype: FileType, json_bytes: bytes) -> str:
        """Encrypt (and in version 2 compress) a JSON document into a file named by the
        SHA-256 of the stored bytes; returns the name."""
        plaintext = encode_unpacked(json_bytes, self.config.version)
        data = self.key.encrypt(plaintext)
        name = hash_id(data).hex()
        self.backend.save(ftype, name, data)
        return name

    def load_unpacked(self, ftype: FileType, name: str) -> bytes:
        """The JSON document of an index, snapshot or lock file, verified."""
        what = f"{ftype.value[:-1] if ftype.value.endswith('s') else ftype.value} " \
               f"{name[:8]} in {self.location}"
        data = self.backend.load(ftype, name)
        if hash_id(data).hex() != name:
            raise IntegrityError(f"{what}: the content does not match its name (the file is "
                                 "damaged)")
        return decode_unpacked(self.key.decrypt(data, what), self.config.version, what)

    # -- locking ---------------------------------------------------------------------------

    def lock(self, exclusive: bool = False, *, defer_recheck: bool = False,
             **lock_options: object) -> RepositoryLock:
        """Take a lock (restic's rules) and (re)load the index under it. Use the result as a
        context manager, or call its `release()`. `defer_recheck`: see
        `RepositoryLock.acquire` (the index loads while the recheck's moment passes)."""
        if self._lock is not None and self._lock.name is not None:
            raise RepositoryError(f"{self.location}: this repository object already holds a "
                                  "lock")
        lock = RepositoryLock(self, exclusive, **lock_options)  # type: ignore[arg-type]
        lock.acquire(defer_recheck=defer_recheck)
        try:
            self.load_index()
        except BaseException:
            lock.release()
            raise
        self._lock = lock
        return lock

    def _check_writable(self, *, writing: bool = False) -> None:
        """Raise unless this repository may be written; `writing`: a file is about to be
        (see `RepositoryLock.check`)."""
        if self._closed:
            raise RepositoryError(f"{self.location}: the repository was closed")
        if self._failure is not None:
            raise self._failure
        if self._lock is None or self._lock.name is None:
            raise RepositoryError(f"{self.location}: writing needs a lock: call lock() first")
        self._lock.check(writing=writing)

    def _load_each(self, load: Callable[[str], T], names: list[str]
                   ) -> list[T | BaseException]:
        """`load(name)` for every name, `LOAD_CONCURRENCY` at a time (on S3 each is a
        request: index and snapshot files load in parallel, not one round trip after
        another); results, or the exception each raised, in the order of `names`."""
        def attempt(name: str) -> T | BaseException:
            try:
                return load(name)
            except Exception as exc:  # handed to the caller, in order
                return exc

        if len(names) <= 1:
            return [attempt(name) for name in names]
        with ThreadPoolExecutor(min(LOAD_CONCURRENCY, len(names)), "load") as pool:
            return list(pool.map(attempt, names))

    # -- index -----------------------------------------------------------------------------

    @property
    def index(self) -> MasterIndex:
        if self._index is None:
            self.load_index()
        assert self._index is not None
        return self._index

    def load_index(self, *, skip_damaged: bool = False) -> list[str]:
        """Read every index file into a fresh master index (plus the packs this process wrote
        but has not indexed yet). With `skip_damaged` (for checking), an index file that
        cannot be read is left out and its error returned instead of raised."""
        index = MasterIndex()
        files = []
        skipped: list[str] = []
        names = sorted(fi.name for fi in self.backend.list(FileType.INDEX)
                       if is_id_hex(fi.name))

        def load(name: str) -> IndexColumns:
            raw = self.load_unpacked(FileType.INDEX, name)
            return IndexColumns.parse(raw, f"index {name[:8]} in {self.location}")

        for loaded in self._load_each(load, names):
            if isinstance(loaded, RepositoryError) and skip_damaged:
                skipped.append(str(loaded))
            elif isinstance(loaded, BaseException):
                raise loaded
            else:
                files.append(loaded)
        index.add_index_files(files)
        with self._state:
            for pack_id, entries in self._unindexed:
                index.add_pack(pack_id, entries)
            self._index = index
        return skipped

    def has_blob(self, blob_id: bytes, blob_type: BlobType) -> bool:
        """Is the blob stored or being stored?"""
        index = self.index
        with self._state:
            return _TYPE_CODE[blob_type] + blob_id in self._pending or \
                index.has(blob_id, blob_type)

    # -- saving blobs ----------------------------------------------------------------------

    def save_blob(self, blob_type: BlobType, data: bytes | bytearray | memoryview) -> bytes:
        """Store a blob unless the repository already has it; returns its ID (SHA-256)."""
        return self.store_blob(blob_type, data)[0]

    def store_blob(self, blob_type: BlobType,
                   data: bytes | bytearray | memoryview) -> tuple[bytes, bool]:
        """`save_blob`, also saying whether the blob was new (stored by this call) or
        already in the repository (or being stored)."""
        self._check_writable()
        if len(data) > MAX_BLOB_BYTES:
            raise ValueError(f"a blob of {len(data)} bytes is larger than a pack can describe "
                             f"({MAX_BLOB_BYTES} bytes)")
        data = bytes(data)
        blob_id = hash_id(data)
        key = _TYPE_CODE[blob_type] + blob_id
        index = self.index
        with self._state:
            if key in self._pending or index.has(blob_id, blob_type):
                return blob_id, False
            self._pending.add(key)
        if self._executor is None:
            try:
                self._store(blob_type, blob_id, data)
            except BaseException as exc:
                self._fail(exc)
                raise
            return blob_id, True
        try:
            self._slots.acquire()
        except BaseException:  # interrupted while waiting: the blob was not taken
            with self._state:
                self._pending.discard(key)
            raise
        try:
            future = self._executor.submit(self._store, blob_type, blob_id, data)
        except BaseException:
            self._slots.release()
            with self._state:
                self._pending.discard(key)
            raise
        with self._state:
            self._futures.add(future)
        future.add_done_callback(self._done)
        return blob_id, True

    def save_tree(self, tree: Tree) -> bytes:
        return self.save_blob(BlobType.TREE, tree.encode())

    def _done(self, future: Future[None]) -> None:
        self._slots.release()
        with self._state:
            self._futures.discard(future)
        if not future.cancelled() and future.exception() is not None:
            self._fail(future.exception())  # type: ignore[arg-type]

    def _fail(self, exc: BaseException) -> None:
        with self._state:
            if self._failure is None:
                self._failure = exc

    def _store(self, blob_type: BlobType, blob_id: bytes, data: bytes) -> None:
        """Compress, encrypt and add one blob to its open pack (a worker's job)."""
        payload, uncompressed = data, 0
        if self.compression and data:
            packed = compress(data)
            if len(packed) < len(data):
                payload, uncompressed = packed, len(data)
        ciphertext = self.key.encrypt(payload)
        full = None
        with self._packer_mutex:
            builder = self._packers.get(blob_type)
            if builder is None:
                builder = self._packers[blob_type] = PackBuilder(blob_type, self.pack_size_bytes)
            builder.add(blob_id, ciphertext, uncompressed)
            if builder.full():
                full = self._packers.pop(blob_type)
        if full is not None:
            self._write_pack(full)

    def _write_pack(self, builder: PackBuilder) -> None:
        """Write a pack (durably), then make its blobs known."""
        assert self._lock is not None
        self._lock.check(writing=True)
        pack_id, data = builder.finish(self.key)
        self.backend.save(FileType.PACK, pack_id.hex(), data)
        with self._state:
            assert self._index is not None
            self._index.add_pack(pack_id, builder.entries)
            for e in builder.entries:
                self._pending.discard(_TYPE_CODE[e.blob_type] + e.blob_id)
            if not self._unindexed:
                self._unindexed_since = time.monotonic()
            self._unindexed.append((pack_id, builder.entries))
            self._unindexed_blobs += len(builder.entries)
            index_due = (self._unindexed_blobs >= self.index_max_blobs
                         or time.monotonic() - self._unindexed_since >= INDEX_MAX_AGE_S)
        if index_due:
            self._write_index()

    def _write_index(self) -> None:
        """Write index files for every pack written but not yet indexed."""
        with self._index_write:
            with self._state:
                packs, self._unindexed, self._unindexed_blobs = self._unindexed, [], 0
            try:
                files = split_into_files(packs, self.index_max_blobs)
                while files:
                    assert self._lock is not None
                    self._lock.check(writing=True)
                    self.save_unpacked(FileType.INDEX, files[0].encode())
                    files.pop(0)
            except BaseException:
                rest = [p for f in files for p in f.packs]
                with self._state:
                    self._unindexed = rest + self._unindexed
                    self._unindexed_blobs = sum(len(e) for _, e in self._unindexed)
                raise

    def _wait_workers(self) -> None:
        while True:
            with self._state:
                futures = set(self._futures)
            if not futures:
                break
            wait_futures(futures)
        if self._failure is not None:
            raise self._failure

    def _flush_packs(self) -> None:
        self._wait_workers()
        with self._packer_mutex:
            builders = [b for b in self._packers.values() if b.count]
            self._packers = {}
        for builder in builders:
            try:
                self._write_pack(builder)
            except BaseException as exc:
                self._fail(exc)
                raise

    def flush(self) -> None:
        """Write every pending blob: the open packs first, then the index files for all packs
        not yet indexed. When it returns, everything saved so far is durable and indexed."""
        self._check_writable()
        self._flush_packs()
        with self._state:
            lost = len(self._pending)
        if lost:  # cannot happen unless a worker died unnoticed; never reference such blobs
            exc = RepositoryError(f"{self.location}: {lost} blobs were accepted but not stored; "
                                  "nothing more is written through this repository object")
            self._fail(exc)
            raise exc
        try:
            self._write_index()
        except BaseException as exc:
            self._fail(exc)
            raise

    # -- loading blobs ---------------------------------------------------------------------

    def load_blob(self, blob_id: bytes, blob_type: BlobType = BlobType.DATA) -> bytes:
        """A blob's plaintext, verified against its ID."""
        found = self.index.lookup(blob_id, blob_type)
        if found is None:
            with self._state:
                pending = _TYPE_CODE[blob_type] + blob_id in self._pending
            if pending:
                self._flush_packs()
                found = self.index.lookup(blob_id, blob_type)
        if found is None:
            # Perhaps written by another process after our index was loaded (a snapshot listed
            # later than the index was read): read the index again, once.
            self.load_index()
            found = self.index.lookup(blob_id, blob_type)
        if found is None:
            raise BlobNotFoundError(f"{self.location}: {blob_type.value} blob "
                                    f"{blob_id.hex()} is not in the index")
        what = (f"{blob_type.value} blob {short(blob_id)} in pack {short(found.pack_id)} of "
                f"{self.location}")
        data = self.backend.load(FileType.PACK, found.pack_id.hex(), found.offset_bytes,
                                 found.length_bytes)
        plain = self.key.decrypt(data, what)
        if found.uncompressed_length_bytes:
            plain = decompress(plain, found.uncompressed_length_bytes, what,
                               expected_bytes=found.uncompressed_length_bytes)
        if hash_id(plain) != blob_id:
            raise IntegrityError(f"{what}: the content does not match the blob ID")
        return plain

    def load_tree(self, tree_id: bytes) -> Tree:
        return Tree.decode(self.load_blob(tree_id, BlobType.TREE),
                           f"tree {short(tree_id)} in {self.location}")

    def list_pack(self, pack_id: bytes) -> list[PackEntry]:
        """The blobs a pack's own header lists (the pack file alone, no index)."""
        name = pack_id.hex()
        what = f"pack {short(pack_id)} in {self.location}"
        size = self.backend.stat(FileType.PACK, name).size_bytes
        guess = min(size, _PACK_TAIL_GUESS_BYTES)
        tail = self.backend.load(FileType.PACK, name, size - guess, guess)
        result = parse_pack_tail(self.key, tail, size, what)
        if isinstance(result, int):
            tail = self.backend.load(FileType.PACK, name, size - result, result)
            result = parse_pack_tail(self.key, tail, size, what)
            assert not isinstance(result, int)
        return result

    # -- snapshots -------------------------------------------------------------------------

    def save_snapshot(self, snapshot: Snapshot) -> bytes:
        """Flush, then write the snapshot (whose tree must be stored); returns its ID."""
        self.flush()
        if not self.index.has(snapshot.tree, BlobType.TREE):
            raise RepositoryError(f"{self.location}: snapshot tree {short(snapshot.tree)} is "
                                  "not in the repository; save the tree first")
        self._check_writable(writing=True)
        name = self.save_unpacked(FileType.SNAPSHOT, snapshot.encode())
        snapshot.id = bytes.fromhex(name)
        return snapshot.id

    def load_snapshot(self, snapshot_id: bytes) -> Snapshot:
        name = snapshot_id.hex()
        raw = self.load_unpacked(FileType.SNAPSHOT, name)
        return Snapshot.decode(raw, snapshot_id, f"snapshot {name[:8]} in {self.location}")

    def list_snapshots(self) -> list[Snapshot]:
        """Every snapshot, oldest first."""
        out = []
        names = [fi.name for fi in self.backend.list(FileType.SNAPSHOT) if is_id_hex(fi.name)]
        for loaded in self._load_each(lambda name: self.load_snapshot(bytes.fromhex(name)),
                                      names):
            if isinstance(loaded, BackendNotFoundError):
                continue  # removed (forget) while listing
            if isinstance(loaded, BaseException):
                raise loaded
            out.append(loaded)
        out.sort(key=lambda s: (s.time.unix_ns, s.id or b""))
        return out

    def find_snapshot(self, ref: str, *, hostname: str | None = None,
                      paths: list[str] | None = None,
                      tags: list[str] | None = None) -> Snapshot:
        """`latest` (optionally filtered) or a unique ID prefix."""
        return find_snapshot(self.list_snapshots(), ref, hostname=hostname, paths=paths,
                             tags=tags, location=self.location)
