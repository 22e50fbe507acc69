"""The in-memory exception table (the kernel's "complete" `dm_exception_table` in dm-snap.c,
docs/snapshot.md §6).

Holds the committed exceptions in list order (numpy arrays, for bulk access and merging from
the tail) and a dict `old_chunk -> new_chunk` for O(1) lookups. When an `old_chunk` occurs
twice (a corrupt store, §2.4) the first record wins, as in the kernel, whose hash chains are
kept sorted by `old_chunk` and insert a duplicate behind the existing entry.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

_INITIAL_CAPACITY = 1024


class ChunkMap:
    def __init__(self, old: np.ndarray | None = None, new: np.ndarray | None = None) -> None:
        old = np.zeros(0, np.uint64) if old is None else np.asarray(old, dtype=np.uint64)
        new = np.zeros(0, np.uint64) if new is None else np.asarray(new, dtype=np.uint64)
        self._n = len(old)
        capacity = max(_INITIAL_CAPACITY, self._n)
        self._old = np.zeros(capacity, dtype=np.uint64)
        self._new = np.zeros(capacity, dtype=np.uint64)
        self._old[: self._n] = old
        self._new[: self._n] = new
        # Reversed so that, among duplicates, the earliest record is assigned last and wins.
        self._map: dict[int, int] = dict(zip(old[::-1].tolist(), new[::-1].tolist()))
        self._has_duplicates = len(self._map) != self._n

    def __len__(self) -> int:
        return self._n

    def lookup(self, old_chunk: int) -> int | None:
        return self._map.get(old_chunk)

    def missing(self, first: int, stop: int) -> list[int]:
        """The old chunks in [first, stop) without an exception."""
        known = self._map
        return [chunk for chunk in range(first, stop) if chunk not in known]

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Copies of (old, new) in list order."""
        return self._old[: self._n].copy(), self._new[: self._n].copy()

    def append(self, pairs: Iterable[tuple[int, int]]) -> None:
        pairs = list(pairs)
        need = self._n + len(pairs)
        if need > len(self._old):
            capacity = max(need, 2 * len(self._old))
            self._old = np.resize(self._old, capacity)
            self._new = np.resize(self._new, capacity)
        if len(pairs) < 8:          # numpy's set-up costs more than a few stores
            for i, (old, new) in enumerate(pairs, self._n):
                self._old[i] = old
                self._new[i] = new
        else:
            columns = np.array(pairs, dtype=np.uint64)
            self._old[self._n: need] = columns[:, 0]
            self._new[self._n: need] = columns[:, 1]
        self._n = need
        added = dict(pairs)
        if len(added) == len(pairs) and self._map.keys().isdisjoint(added):
            self._map.update(added)         # the usual case: all new chunks
            return
        for old, new in pairs:              # an earlier record of a chunk stays the one used
            if old in self._map:
                self._has_duplicates = True
            else:
                self._map[old] = new

    def pop_tail(self, count: int) -> list[tuple[int, int]]:
        """Remove the last `count` records (merged ones); returns them, last first."""
        if not 0 <= count <= self._n:
            raise ValueError(f"cannot remove {count} of {self._n} exceptions")
        removed = []
        for _ in range(count):
            self._n -= 1
            old, new = int(self._old[self._n]), int(self._new[self._n])
            removed.append((old, new))
            if not self._has_duplicates:
                del self._map[old]
                continue
            earlier = np.flatnonzero(self._old[: self._n] == np.uint64(old))
            if len(earlier):
                self._map[old] = int(self._new[earlier[0]])
            else:
                self._map.pop(old, None)
        return removed
