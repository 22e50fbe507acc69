"""The S3 tests' cluster: one real Ceph radosgw on loopback (cluster.py) for the whole test
session, shared by every S3 test in one xdist worker (they are all in xdist group "s3").

It needs the Debian packages radosgw, ceph-mon and ceph-osd. Without them the tests skip,
unless BLOCKERA_REQUIRE_S3 is set (CI), where they fail.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterator

import pytest

from blockera.backup.s3 import S3Backend

from ..helpers import PASSWORD, Restic
from .cluster import RadosGW, missing_binaries

REQUIRE_ENV = "BLOCKERA_REQUIRE_S3"
ACCESS_KEY, SECRET_KEY = "BLOCKERATESTACCESS", "blockera-test-secret-key"
"""The owner of every test bucket."""
READONLY_ACCESS_KEY, READONLY_SECRET_KEY = "BLOCKERATESTREADER", "blockera-test-reader-key"
"""A read-only subuser of the same user (radosgw's `subuser create --access read`)."""

_bucket_numbers = itertools.count()


def need_ceph() -> None:
    missing = missing_binaries()
    if missing:
        reason = (f"{', '.join(missing)} not installed: apt-get install "
                  "--no-install-recommends radosgw ceph-mon ceph-osd")
        if os.environ.get(REQUIRE_ENV, "") not in ("", "0"):
            pytest.fail(f"{reason} (and {REQUIRE_ENV} is set)")
        pytest.skip(reason)


@pytest.fixture(scope="session")
def radosgw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RadosGW]:
    need_ceph()
    rgw = RadosGW(tmp_path_factory.mktemp("ceph"))
    rgw.start()
    try:
        rgw.create_user("blockera", ACCESS_KEY, SECRET_KEY)
        rgw.admin("subuser", "create", "--uid", "blockera", "--subuser", "blockera:reader",
                  "--access", "read", "--key-type", "s3", "--access-key", READONLY_ACCESS_KEY,
                  "--secret", READONLY_SECRET_KEY)
        yield rgw
    finally:
        rgw.stop()


@pytest.fixture
def rgw(radosgw: RadosGW) -> Iterator[RadosGW]:
    """The cluster, with radosgw running again after the test (for tests that kill it)."""
    yield radosgw
    if not radosgw.rgw_running():
        radosgw.start_rgw()


@pytest.fixture
def bucket(request: pytest.FixtureRequest) -> str:
    """A fresh bucket name for this test (not created)."""
    stem = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")
    return f"b{next(_bucket_numbers)}-{stem}"[:63].rstrip("-")


def s3_url(rgw: RadosGW, bucket: str, prefix: str = "") -> str:
    return f"s3:{rgw.endpoint}/{bucket}" + (f"/{prefix}" if prefix else "")


def make_backend(url: str, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY,
                 **options: object) -> S3Backend:
    """The backend as the tests use it: the test user, quick backoff."""
    options.setdefault("backoff_initial_s", 0.05)
    options.setdefault("backoff_max_s", 1.0)
    return S3Backend.from_url(url, access_key_id=access_key, secret_access_key=secret_key,
                              **options)  # type: ignore[arg-type]


class ResticS3(Restic):
    """The real restic against a repository on radosgw (`restic -r s3:http://...`)."""

    def __init__(self, url: str, password: str = PASSWORD) -> None:
        super().__init__(url, password)  # type: ignore[arg-type]

    def env(self, password: str | None = None) -> dict[str, str]:
        env = super().env(password)
        env.update({"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY})
        env.pop("AWS_PROFILE", None)
        return env
