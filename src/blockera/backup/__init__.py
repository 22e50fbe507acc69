"""The backup repository: restic's repository format (version 2; version 1 read), so that the
real `restic` can check, restore, dump and prune what blockera writes and blockera can read
and continue what restic wrote. docs/backup-repository.md describes the format as blockera
writes it; each module here owns one kind of file:

    backend, local        byte storage (interface; local directory in restic's layout)
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
"""

from blockera.backup.backend import Backend, FileInfo, FileType
from blockera.backup.errors import (BackendError, BackendNotFoundError, IntegrityError,
                                    LockConflictError, LockLostError, NotARepositoryError,
                                    RepositoryError, RepositoryFormatError, WrongPasswordError)
from blockera.backup.gojson import GoTime
from blockera.backup.ids import BlobType
from blockera.backup.keys import KdfParams
from blockera.backup.local import LocalBackend
from blockera.backup.locks import RepositoryLock, remove_stale_locks
from blockera.backup.node import Node
from blockera.backup.repository import BlobNotFoundError, Repository
from blockera.backup.snapshots import Snapshot, SnapshotNotFoundError
from blockera.backup.tree import Tree

__all__ = [
    "Backend", "BackendError", "BackendNotFoundError", "BlobNotFoundError", "BlobType",
    "FileInfo", "FileType", "GoTime", "IntegrityError", "KdfParams", "LocalBackend",
    "LockConflictError", "LockLostError", "Node", "NotARepositoryError", "Repository",
    "RepositoryError", "RepositoryFormatError", "RepositoryLock", "Snapshot",
    "SnapshotNotFoundError", "Tree", "WrongPasswordError", "remove_stale_locks",
]
