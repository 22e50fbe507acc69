"""Which snapshots belong to which origin (the kernel's `_origins` hash in dm-snap.c,
docs/snapshot.md §6).

Snapshots are paired with their origin by the identity of the origin device their table names
(the real origin, LVM's `-real` device), so a `snapshot-origin` or `snapshot-merge` target
finds every snapshot it must copy out to. Each engine has its own registry.

Each origin has an `OriginGroup`: its snapshots, largest chunk size first as in the kernel,
and one shared/exclusive lock that orders all I/O touching the group's exception tables:

* shared: snapshot reads, snapshot writes to chunks that already have an exception, origin
  writes that need no copy-out;
* exclusive: copy-outs (and the origin write that waits for them), new exceptions from
  snapshot writes, merge steps, and the activation or handover of a snapshot (the kernel
  suspends the origin internally for that).

`find_sharing()` is the kernel's `__find_snapshots_sharing_cow()`: the snapshots of the same
origin that use the same COW device, which is how an exception-store handover is recognised.

A registry also owns the thread pools that copy out to several snapshots of one origin at
once and read the old chunks of a copy-out batch in parallel; a group queues the origin writes
waiting for the next copy-out batch. What the registry and the copy-out path need of a snapshot is `OriginSnapshot`.
"""

from __future__ import annotations

import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Hashable, Iterator, Protocol

from blockera.dm.devref import DeviceRef
from blockera.snapshot.store import ExceptionStore

# Copy-outs to several snapshots at once (their COW flushes overlap).
COPY_OUT_THREADS = 4
# Reads of old chunks in parallel within one copy-out batch.
READ_THREADS = 4


class OriginSnapshot(Protocol):
    """A snapshot as its origin sees it: what the registry and the copy-out path use."""

    origin: DeviceRef
    cow: DeviceRef
    store: ExceptionStore | None
    chunk_sectors: int
    length_sectors: int
    cow_identity: Hashable
    is_merge: bool

    @property
    def active(self) -> bool: ...

    @property
    def valid(self) -> bool: ...

    def invalidate(self, reason: str) -> None: ...


class SharedExclusiveLock:
    """A readers-writer lock that lets a waiting writer in before new readers."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cv:
            while self._writer or self._writers_waiting:
                self._cv.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cv:
                self._readers -= 1
                if not self._readers:
                    self._cv.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cv:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cv.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cv:
                self._writer = False
                self._cv.notify_all()


@dataclass(eq=False)
class CopyOutBatches:
    """The origin writes waiting for a copy-out batch (the kernel's pending exceptions) and
    whether one is running; `copyout.write_origin` runs them."""

    cv: threading.Condition = field(default_factory=threading.Condition)
    waiting: list = field(default_factory=list)
    running: bool = False


@dataclass(eq=False)
class OriginGroup:
    """One origin device: its snapshots, the lock ordering I/O on them, and the registry's
    copy-out threads. It lives as long as a snapshot or an origin target refers to it
    (`users`)."""

    identity: Hashable
    copy_pool: ThreadPoolExecutor
    read_pool: ThreadPoolExecutor
    snapshots: list[OriginSnapshot] = field(default_factory=list)
    io: SharedExclusiveLock = field(default_factory=SharedExclusiveLock)
    batches: CopyOutBatches = field(default_factory=CopyOutBatches)
    users: int = 0

    def insert(self, snap: OriginSnapshot) -> None:
        """Keep the list sorted by chunk size, largest first (the kernel's __insert_snapshot:
        a snapshot goes after those with a chunk size at least as large)."""
        at = next((i for i, other in enumerate(self.snapshots)
                   if other.chunk_sectors < snap.chunk_sectors), len(self.snapshots))
        self.snapshots.insert(at, snap)


@dataclass
class Sharing:
    """The result of `find_sharing`: how many snapshots of the origin use the same COW, the
    active one (a handover source), the inactive one (a handover destination), and the origin's
    merging snapshot if there is one."""

    count: int = 0
    source: "OriginSnapshot | None" = None
    destination: "OriginSnapshot | None" = None
    merging: "OriginSnapshot | None" = None


class SnapshotRegistry:
    """The origins of one engine and their snapshots."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._groups: dict[Hashable, OriginGroup] = {}
        self.copy_pool = ThreadPoolExecutor(max_workers=COPY_OUT_THREADS,
                                            thread_name_prefix="snapshot-copy-out")
        self.read_pool = ThreadPoolExecutor(max_workers=READ_THREADS,
                                            thread_name_prefix="snapshot-copy-read")

    def acquire(self, origin_identity: Hashable) -> OriginGroup:
        """The group of an origin device, created on first use; pair with `release()`."""
        with self.lock:
            group = self._groups.get(origin_identity)
            if group is None:
                group = self._groups[origin_identity] = OriginGroup(
                    origin_identity, self.copy_pool, self.read_pool)
            group.users += 1
            return group

    def release(self, group: OriginGroup) -> None:
        with self.lock:
            group.users -= 1
            if not group.users and self._groups.get(group.identity) is group:
                del self._groups[group.identity]

    def add(self, group: OriginGroup, snap: OriginSnapshot) -> None:
        with self.lock:
            group.insert(snap)

    def reinsert(self, group: OriginGroup, snap: OriginSnapshot) -> None:
        """Move a snapshot to its place for the chunk size now in force."""
        with self.lock:
            group.snapshots.remove(snap)
            group.insert(snap)

    def remove(self, group: OriginGroup, snap: OriginSnapshot) -> None:
        with self.lock:
            if snap in group.snapshots:
                group.snapshots.remove(snap)

    def find_sharing(self, group: OriginGroup, snap: OriginSnapshot) -> Sharing:
        result = Sharing()
        with self.lock:
            for other in group.snapshots:
                if other.is_merge:
                    result.merging = other
                if other.cow_identity != snap.cow_identity:
                    continue
                if other.active:
                    result.source = other
                else:
                    result.destination = other
                result.count += 1
        return result


_REGISTRIES: "weakref.WeakKeyDictionary[object, SnapshotRegistry]" = weakref.WeakKeyDictionary()
_REGISTRIES_LOCK = threading.Lock()


def registry_for(engine: object) -> SnapshotRegistry:
    """The registry of the engine (the opener that built the tables)."""
    with _REGISTRIES_LOCK:
        registry = _REGISTRIES.get(engine)
        if registry is None:
            registry = _REGISTRIES[engine] = SnapshotRegistry()
        return registry
