"""Errors of the device backup commands (docs/backup-repository.md §14-§18), beside the
repository's own (`errors.py`):

    BackupInputError        an input was understood and refused: a source whose size changed
                            since the parent, changed ranges that do not fit the source, an
                            invalid COW, a target too small, a snapshot that is not a device
                            backup (exit 1)
    SourceBusyError         another backup of the same source is running (exit 1)
    DamagedBackupError      restoring met damaged or missing data (exit 1)
"""

from __future__ import annotations

from blockera.errors import BlockeraError


class BackupInputError(BlockeraError):
    """An input the job understood and refuses to use (the message says why and what to do)."""

    exit_code = 1
    errno_name = "EINVAL"


class SourceBusyError(BlockeraError):
    """Another backup of the same source holds its source lock."""

    exit_code = 1
    errno_name = "EBUSY"


class DamagedBackupError(BlockeraError):
    """Data a restore, dump or mount needs is damaged or missing from the repository."""

    exit_code = 1
    errno_name = "EILSEQ"
