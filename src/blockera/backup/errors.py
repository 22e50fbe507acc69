"""Errors of the backup repository (docs/backup-repository.md §12).

Every failure a user can meet while opening, reading or writing a repository is one of these,
with a message naming the repository (or the file in it) and what to do:

    RepositoryError                  anything about a repository
    ├── NotARepositoryError          no repository at that location (exit 1)
    ├── WrongPasswordError           no key file opens with the password (exit 1)
    ├── IntegrityError               a MAC, a storage ID or a blob ID does not match (exit 1)
    ├── RepositoryFormatError        authentic but not understood: version, JSON, header (exit 1)
    ├── BackendError                 the storage failed (I/O, permissions); exit 2
    │   └── BackendNotFoundError     a file that should be there is not
    ├── LockConflictError            another process holds a conflicting lock (exit 1)
    └── LockLostError                our own lock went stale or vanished; stop writing (exit 1)
"""

from __future__ import annotations

from blockera.errors import BlockeraError


class RepositoryError(BlockeraError):
    """Base of all backup repository errors."""


class NotARepositoryError(RepositoryError):
    """The location holds no repository (no config file), or is not a directory at all."""

    exit_code = 1
    errno_name = "ENOENT"


class WrongPasswordError(RepositoryError):
    """None of the repository's key files could be opened with the password given."""

    exit_code = 1
    errno_name = "EACCES"


class IntegrityError(RepositoryError):
    """Stored bytes are not what was written: a MAC failed, a file's content does not hash to
    its name, or a blob does not hash to its ID. The repository is damaged (or tampered with)."""

    exit_code = 1
    errno_name = "EILSEQ"


class RepositoryFormatError(RepositoryError):
    """A file decrypted correctly but its content is not understood (unsupported version,
    malformed JSON, impossible pack header)."""

    exit_code = 1
    errno_name = "EILSEQ"


class BackendError(RepositoryError):
    """The storage behind the repository failed (I/O error, permission, short read)."""

    exit_code = 2


class BackendNotFoundError(BackendError):
    """A file the repository needs is missing from the storage."""

    errno_name = "ENOENT"


class LockConflictError(RepositoryError):
    """The repository is locked by another process in a way that conflicts with the lock
    requested (an exclusive lock conflicts with every other lock)."""

    exit_code = 1
    errno_name = "EBUSY"


class LockLostError(RepositoryError):
    """Our own lock could not be kept fresh, or was removed by someone else. Writing on would
    race a prune that no longer sees us, so the operation stops."""

    exit_code = 1
    errno_name = "ESTALE"
