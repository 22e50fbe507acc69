"""Loading many data blobs in parallel, in order (docs/backup-repository.md §16): restore,
dump and check hand a sequence of blobs to a few threads (reading a pack range, verifying
the MAC, decrypting, decompressing and hashing all release the GIL) and get the results back
in the order asked, with at most `window` blobs loaded or loading at a time. A blob that
cannot be loaded (damaged, missing) comes back as its exception, so the caller decides whether
that is fatal.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

from blockera.backup.errors import BackendError, IntegrityError, RepositoryError
from blockera.backup.ids import BlobType, short
from blockera.backup.repository import Repository

K = TypeVar("K")
DEFAULT_THREADS = max(2, min(8, 2 * (os.cpu_count() or 1)))

FETCH_ERRORS = (RepositoryError, BackendError)
"""What a damaged or missing blob raises (IntegrityError, BlobNotFoundError, storage errors)."""


def load_checked(repo: Repository, blob_id: bytes, expected_bytes: int | None) -> bytes:
    """A data blob, verified, whose length must be `expected_bytes` when given."""
    data = repo.load_blob(blob_id, BlobType.DATA)
    if expected_bytes is not None and len(data) != expected_bytes:
        raise IntegrityError(f"data blob {short(blob_id)} in {repo.location} holds "
                             f"{len(data)} bytes where the file needs {expected_bytes}")
    return data


class BlobFetcher(Generic[K]):
    """`fetch(items)`: items are (key, blob ID, expected length); yields (key, bytes or the
    exception) in the same order. An item whose blob ID is None is passed through as
    (key, None), in its place, without loading anything."""

    def __init__(self, repo: Repository, *, threads: int = DEFAULT_THREADS,
                 window: int | None = None) -> None:
        self.repo = repo
        self.threads = max(1, threads)
        self.window = window or 4 * self.threads

    def fetch(self, items: Iterable[tuple[K, bytes | None, int | None]]
              ) -> Iterator[tuple[K, bytes | BaseException | None]]:
        pending: deque[tuple[K, Future[bytes | None]]] = deque()
        with ThreadPoolExecutor(self.threads, "fetch") as pool:
            try:
                for key, blob_id, expected in items:
                    if blob_id is None:
                        done: Future[bytes | None] = Future()
                        done.set_result(None)
                        pending.append((key, done))
                    else:
                        pending.append((key, pool.submit(load_checked, self.repo, blob_id,
                                                         expected)))
                    if len(pending) >= self.window:
                        yield self._result(*pending.popleft())
                while pending:
                    yield self._result(*pending.popleft())
            finally:
                for _, future in pending:
                    future.cancel()

    @staticmethod
    def _result(key: K, future: Future[bytes | None]
                ) -> tuple[K, bytes | BaseException | None]:
        try:
            return key, future.result()
        except FETCH_ERRORS as exc:
            return key, exc
