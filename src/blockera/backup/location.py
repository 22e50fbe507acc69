"""Where a repository is (docs/backup-repository.md §17): a location string, as given to
`-r/--repo` or `BLOCKERA_REPOSITORY`, becomes a backend. Every command goes through
`backend_for`, so a new kind of location (an `s3:` URL) is wired here and nowhere else.

    /srv/backup, ./repo, local:/srv/backup     a local directory (restic's `local:` prefix)
    s3:...                                     not available in this build
"""

from __future__ import annotations

from blockera.backup.backend import Backend
from blockera.backup.local import LocalBackend
from blockera.errors import UsageError

_LOCAL_PREFIX = "local:"
_OTHER_SCHEMES = ("s3:", "sftp:", "rest:", "rclone:", "b2:", "azure:", "gs:", "swift:")


def backend_for(location: str) -> Backend:
    """The backend for a repository location."""
    if not location:
        raise UsageError("no repository given: use -r/--repo LOCATION or set "
                         "BLOCKERA_REPOSITORY")
    if location.startswith(_LOCAL_PREFIX):
        return LocalBackend(location[len(_LOCAL_PREFIX):])
    for scheme in _OTHER_SCHEMES:
        if location.startswith(scheme):
            raise UsageError(f"{location}: {scheme[:-1]} repositories are not supported by this "
                             "build (a local directory is)")
    return LocalBackend(location)
