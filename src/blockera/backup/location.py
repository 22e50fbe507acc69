"""Repository locations as restic spells them, turned into backends (docs/backup-repository.md
§1.1, §1.2 and §17): a location string, as given to `-r/--repo` or `BLOCKERA_REPOSITORY`,
becomes a backend. Every command goes through `open_backend`, so a new kind of location is
wired here and nowhere else.

    /srv/backup, ./repo, local:/srv/backup     a local directory (restic's `local:` prefix)
    s3:http://host:port/bucket/prefix          an S3 bucket (s3:host/bucket is HTTPS)

restic's other schemes (sftp, rest, b2, azure, gs, swift, rclone) are recognised and refused
with a message, as is a string with a colon that is not a path (restic's rule: such a local
directory needs the `local:` prefix).

    backend = open_backend(args.repo, connections=5, cacert=None)
"""

from __future__ import annotations

import os

from blockera.backup.backend import Backend
from blockera.backup.local import LocalBackend
from blockera.errors import UsageError

UNSUPPORTED_SCHEMES = ("sftp", "rest", "b2", "azure", "gs", "swift", "rclone")


def open_backend(location: str, *, connections: int | None = None,
                 cacert: str | os.PathLike[str] | None = None,
                 limit_upload_kib: float | None = None,
                 limit_download_kib: float | None = None) -> Backend:
    """The backend for a repository location (`-r` / `RESTIC_REPOSITORY` syntax). The options
    apply to S3; `UsageError` for a location blockera cannot use. Nothing is contacted yet."""
    scheme, colon, rest = location.partition(":")
    if colon and scheme == "s3":
        from blockera.backup.s3 import DEFAULT_CONNECTIONS, S3Backend
        try:
            return S3Backend.from_url(location, connections=connections or DEFAULT_CONNECTIONS,
                                      cacert=cacert, limit_upload_kib=limit_upload_kib,
                                      limit_download_kib=limit_download_kib)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    if colon and scheme == "local":
        if not rest:
            raise UsageError(f"{location}: no path after local:")
        return LocalBackend(rest)
    if colon and scheme in UNSUPPORTED_SCHEMES:
        raise UsageError(f"{location}: restic's {scheme} backend is not supported by blockera; "
                         "use a local directory or s3:")
    if ":" in location and not _is_path(location):
        raise UsageError(f"{location}: not a repository location blockera knows (s3:..., "
                         "local:PATH or a path); a local directory whose name has a colon "
                         "needs the local: prefix")
    if not location:
        raise UsageError("no repository given (empty location): use -r/--repo LOCATION or set "
                         "BLOCKERA_REPOSITORY")
    return LocalBackend(location)


def _is_path(s: str) -> bool:
    """restic's test: absolute or explicitly relative (`/`, `./`, `../`)."""
    return s.startswith(("/", "./", "../"))
