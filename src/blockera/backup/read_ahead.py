"""Reading the source ahead of the hashing (docs/backup-repository.md §15.3): a background
thread reads the chunks a backup needs in large sequential reads (consecutive chunks are read
together, up to `read_bytes` at a time) into a bounded queue, so the disk streams while the
caller hashes and the repository's workers compress and encrypt. Memory is bounded by
`depth` reads in the queue plus the one being consumed.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import numpy as np

from blockera.blockdev import BlockDevice

DEFAULT_READ_BYTES = 8 << 20
DEFAULT_DEPTH = 4
_END = object()


def runs(chunk_indexes: np.ndarray) -> list[tuple[int, int]]:
    """Consecutive runs of sorted chunk indexes as (first, count)."""
    idx = np.asarray(chunk_indexes, dtype=np.int64)
    if not len(idx):
        return []
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(idx)]))
    return [(int(idx[s]), int(e - s)) for s, e in zip(starts.tolist(), ends.tolist())]


class ReadAhead:
    """Iterate over (chunk index, chunk bytes) for `chunk_indexes` (sorted, unique) of a
    device of `size_bytes` cut into chunks of `chunk_bytes` (the last may be shorter)."""

    def __init__(self, device: BlockDevice, size_bytes: int, chunk_bytes: int,
                 chunk_indexes: np.ndarray, *, read_bytes: int = DEFAULT_READ_BYTES,
                 depth: int = DEFAULT_DEPTH) -> None:
        self.device = device
        self.size_bytes = size_bytes
        self.chunk_bytes = chunk_bytes
        self.chunks_per_read = max(1, read_bytes // chunk_bytes)
        self.runs = runs(chunk_indexes)
        self._queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read_all, name="read-ahead", daemon=True)
        self._started = False

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _read_all(self) -> None:
        try:
            for first, count in self.runs:
                done = 0
                while done < count:
                    n = min(self.chunks_per_read, count - done)
                    start = (first + done) * self.chunk_bytes
                    end = min((first + done + n) * self.chunk_bytes, self.size_bytes)
                    data = self.device.read(start, end - start)
                    if not self._put((first + done, data)):
                        return
                    done += n
            self._put(_END)
        except BaseException as exc:  # handed to the consumer
            self._put(exc)

    def __iter__(self) -> Iterator[tuple[int, memoryview]]:
        if not self._started:
            self._started = True
            self._thread.start()
        try:
            while True:
                item = self._queue.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                first, data = item  # type: ignore[misc]
                view = memoryview(data)
                for k in range(0, len(view), self.chunk_bytes):
                    yield first + k // self.chunk_bytes, view[k:k + self.chunk_bytes]
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
        if self._started:
            self._thread.join()
