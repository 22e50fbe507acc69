"""Repository locations in restic's syntax turned into backends (no server contacted)."""

from __future__ import annotations

import pytest

from blockera.backup import LocalBackend
from blockera.backup.location import open_backend
from blockera.errors import UsageError
from blockera.backup.s3 import S3Backend


def test_paths_and_local_prefix() -> None:
    assert isinstance(open_backend("/srv/backup"), LocalBackend)
    assert open_backend("relative/dir").location == "relative/dir"
    assert open_backend("local:/srv/with:colon").location == "/srv/with:colon"
    assert open_backend("./a:b").location == "a:b"   # (pathlib drops the ./)


def test_s3_locations_with_options() -> None:
    be = open_backend("s3:http://127.0.0.1:7480/bucket/prefix", connections=3,
                      limit_upload_kib=100)
    assert isinstance(be, S3Backend)
    assert be.location == "s3:http://127.0.0.1:7480/bucket/prefix"
    assert be.connections == 3 and be._upload_limit is not None
    assert open_backend("s3:s3.amazonaws.com/b/p").location == "s3:https://s3.amazonaws.com/b/p"


@pytest.mark.parametrize("location, message", [
    ("sftp:host:/srv", "sftp backend is not supported"),
    ("rest:http://host/", "rest backend is not supported"),
    ("weird:thing", "needs the local: prefix"),
    ("s3:http://host", "no bucket name"),
    ("local:", "no path"),
    ("", "empty"),
])
def test_refused(location: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        open_backend(location)
