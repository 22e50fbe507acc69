"""The backup repository: restic's repository format (version 2; version 1 read), so that the
real `restic` can check, restore, dump and prune what blockera writes and blockera can read
and continue what restic wrote. docs/backup-repository.md describes the format as blockera
writes it; each module here owns one kind of file:

    backend, local, s3    byte storage (interface; local directory and S3 bucket in restic's
                          layout); location turns a -r/--repo string into one
    crypto                AES-256-CTR + Poly1305-AES
    keys                  key files (scrypt), opening with a password
    config                the config file, the chunker polynomial
    compression           zstd for blobs and for index/snapshot/lock files
    pack                  pack files and their headers
    index                 index files, the in-memory master index
    node, tree            tree blobs
    snapshots             snapshot files
    locks                 lock files, locking rules, refresh
    repository            Repository: init/open, save/load blobs, flush, snapshots

and the jobs on top: device_backup, restore, check, forget, prune, mount (§14-§21).
"""

from __future__ import annotations

import importlib
from typing import Any

# Names are imported on first use (PEP 562), so that a command importing one module (the key
# files, to start deriving a key while the rest loads) does not pay for all of them.
_EXPORTS = {
    "Backend": "backend", "FileInfo": "backend", "FileType": "backend",
    "BackendError": "errors", "BackendNotFoundError": "errors", "IntegrityError": "errors",
    "LockConflictError": "errors", "LockLostError": "errors", "NotARepositoryError": "errors",
    "RepositoryError": "errors", "RepositoryFormatError": "errors",
    "WrongPasswordError": "errors",
    "GoTime": "gojson", "BlobType": "ids", "KdfParams": "keys", "LocalBackend": "local",
    "RepositoryLock": "locks", "remove_stale_locks": "locks", "Node": "node",
    "BlobNotFoundError": "repository", "Repository": "repository",
    "open_backend": "location", "S3Backend": "s3",
    "Snapshot": "snapshots", "SnapshotNotFoundError": "snapshots", "Tree": "tree",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'blockera.backup' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"blockera.backup.{module}"), name)
    globals()[name] = value
    return value
