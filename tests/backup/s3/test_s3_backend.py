"""The S3 backend on a real radosgw: the backend contract (save, load, stat, list, remove,
create), restic's object names, conditional saves, many objects, TLS with a private CA,
bandwidth limits; and the parts that need no server (locations, signatures)."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import pytest

from blockera.backup import BackendError, BackendNotFoundError, FileType, Repository
from blockera.backup.s3 import (Credentials, RateLimiter, S3Backend, S3ConnectionError,
                                S3BucketNotFoundError, S3Location, S3ObjectExistsError,
                                SigV4Signer)

from ..helpers import FAST_KDF, PASSWORD, need_restic, random_bytes
from .cluster import RadosGW
from .conftest import ACCESS_KEY, SECRET_KEY, ResticS3, make_backend, s3_url

pytestmark = pytest.mark.xdist_group("s3")


def name_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- no server needed -----------------------------------------------------------------------

@pytest.mark.parametrize("url, scheme, host, bucket, prefix", [
    ("s3:http://127.0.0.1:7480/bucket", "http", "127.0.0.1:7480", "bucket", ""),
    ("s3:http://127.0.0.1:7480/bucket/", "http", "127.0.0.1:7480", "bucket", ""),
    ("s3:https://s3.example.com/bucket/a/b/", "https", "s3.example.com", "bucket", "a/b"),
    ("s3:s3.amazonaws.com/bucket/restic", "https", "s3.amazonaws.com", "bucket", "restic"),
    ("s3://minio.local:9000/bucket/x//y", "https", "minio.local:9000", "bucket", "x/y"),
    ("s3:Host.Example/bkt/./p", "https", "host.example", "bkt", "p"),
])
def test_location_parse_as_restic(url: str, scheme: str, host: str, bucket: str,
                                  prefix: str) -> None:
    loc = S3Location.parse(url)
    assert (loc.scheme, loc.host, loc.bucket, loc.prefix) == (scheme, host, bucket, prefix)
    assert S3Location.parse(loc.url) == loc


@pytest.mark.parametrize("url, message", [
    ("s3:http://127.0.0.1:7480", "no bucket name"),
    ("s3:http://127.0.0.1:7480/", "no bucket name"),
    ("s3:host-only", "expected s3:host/bucket"),
    ("/srv/backup", "not an S3 location"),
    ("s3:ftp://host/bucket", "expected s3:host/bucket"),
])
def test_location_parse_errors(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        S3Location.parse(url)


def test_object_keys_are_restics() -> None:
    pid = "ab" + "0" * 62
    with_prefix = S3Location.parse("s3:http://h/b/repo/one")
    assert with_prefix.key(FileType.CONFIG, "") == "repo/one/config"
    assert with_prefix.key(FileType.PACK, pid) == f"repo/one/data/ab/{pid}"
    assert with_prefix.key(FileType.KEY, pid) == f"repo/one/keys/{pid}"
    assert with_prefix.key(FileType.LOCK, pid) == f"repo/one/locks/{pid}"
    assert with_prefix.key(FileType.SNAPSHOT, pid) == f"repo/one/snapshots/{pid}"
    assert with_prefix.key(FileType.INDEX, pid) == f"repo/one/index/{pid}"
    top = S3Location.parse("s3:http://h/b")
    assert top.key(FileType.CONFIG, "") == "config"
    assert top.key(FileType.PACK, pid) == f"data/ab/{pid}"
    assert top.dir_prefix(FileType.PACK) == "data/"


def test_signature_matches_botocore() -> None:
    """Our SigV4 against botocore's for the same request and time (both sign the body's
    SHA-256). botocore's add_auth takes the time from the clock, so its steps are run here
    with a fixed timestamp."""
    import botocore.auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials as BotoCredentials

    when = datetime(2026, 12, 3, 8, 9, 10, tzinfo=timezone.utc)
    body = b"some bytes"
    for token in (None, "session-token"):
        for query in ([], [("list-type", "2"), ("prefix", "a b/ü"),
                           ("continuation-token", "x+y=")]):
            path = "/bucket/data/ab/key%20with%20space"
            req = AWSRequest("PUT", "http://127.0.0.1:7480" + path, data=body,
                             params=dict(query),
                             headers={"If-None-Match": "*", "Content-Type": "x/y"})
            req.context["timestamp"] = when.strftime("%Y%m%dT%H%M%SZ")
            auth = botocore.auth.S3SigV4Auth(BotoCredentials("AK", "SECRET", token), "s3",
                                             "eu-west-1")
            auth._modify_request_before_signing(req)
            signature = auth.signature(auth.string_to_sign(req, auth.canonical_request(req)),
                                       req)
            auth._inject_signature_to_request(req, signature)
            ours = SigV4Signer("eu-west-1").sign(
                "PUT", "127.0.0.1:7480", path, query,
                {"If-None-Match": "*", "Content-Type": "x/y"},
                hashlib.sha256(body).hexdigest(), Credentials("AK", "SECRET", token),
                when.timestamp())
            assert ours["Authorization"] == req.headers["Authorization"]
            assert ours["X-Amz-Date"] == req.headers["X-Amz-Date"]


def test_rate_limiter_shares_its_budget_between_threads() -> None:
    limiter = RateLimiter(4 << 20)   # 4 MiB/s

    def take() -> None:
        for _ in range(8):
            limiter.take(128 << 10)

    start = time.monotonic()
    threads = [threading.Thread(target=take) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    assert 0.3 <= elapsed <= 1.5   # 2 MiB at 4 MiB/s, less the 0.1 s burst


# -- on radosgw -----------------------------------------------------------------------------

def test_backend_contract(radosgw: RadosGW, bucket: str) -> None:
    be = make_backend(s3_url(radosgw, bucket, "some/prefix"))
    with pytest.raises(S3BucketNotFoundError, match="does not exist.*init creates the bucket"):
        be.exists(FileType.CONFIG, "")
    be.create()   # makes the bucket
    assert not be.exists(FileType.CONFIG, "")
    assert list(be.list(FileType.CONFIG)) == []
    be.save(FileType.CONFIG, "", b"config bytes")
    with pytest.raises(BackendError, match="a repository already exists"):
        be.create()
    files = {}
    for ftype in (FileType.KEY, FileType.LOCK, FileType.SNAPSHOT, FileType.INDEX,
                  FileType.PACK):
        for i in range(3):
            data = random_bytes(1000 + i, hash(ftype.value) % 1000 + i)
            be.save(ftype, name_of(data), data)
            files[ftype, name_of(data)] = data
    for (ftype, name), data in files.items():
        assert be.load(ftype, name) == data
        assert be.load(ftype, name, 10, 20) == data[10:30]
        assert be.load(ftype, name, 990) == data[990:]
        assert be.load(ftype, name, 5, 0) == b""
        assert be.stat(ftype, name).size_bytes == len(data)
        assert be.exists(ftype, name)
    for ftype in (FileType.KEY, FileType.LOCK, FileType.SNAPSHOT, FileType.INDEX,
                  FileType.PACK):
        assert sorted((f.name, f.size_bytes) for f in be.list(ftype)) == \
            sorted((n, len(d)) for (t, n), d in files.items() if t is ftype)
    assert [(f.name, f.size_bytes) for f in be.list(FileType.CONFIG)] == [("config", 12)]
    assert be.load(FileType.CONFIG, "") == b"config bytes"

    (ftype, name), data = next(iter(files.items()))
    with pytest.raises(BackendError, match="shorter than expected"):
        be.load(ftype, name, len(data) - 5, 10)
    with pytest.raises(BackendError, match="shorter than expected"):
        be.load(ftype, name, len(data) + 5, 10)
    be.remove(ftype, name)
    assert not be.exists(ftype, name)
    with pytest.raises(BackendNotFoundError):
        be.remove(ftype, name)
    with pytest.raises(BackendNotFoundError):
        be.load(ftype, name)
    with pytest.raises(BackendNotFoundError):
        be.stat(ftype, name)
    with pytest.raises(BackendError, match="invalid"):
        be.save(FileType.KEY, "../escape", b"x")
    # another prefix in the same bucket sees none of it
    other = make_backend(s3_url(radosgw, bucket, "some"))
    assert list(other.list(FileType.KEY)) == [] and not other.exists(FileType.CONFIG, "")
    be.close()


def test_save_never_replaces_different_content(radosgw: RadosGW, bucket: str) -> None:
    be = make_backend(s3_url(radosgw, bucket))
    be.create()
    data = b"content-addressed"
    be.save(FileType.INDEX, name_of(data), data)
    be.save(FileType.INDEX, name_of(data), data)   # the same bytes again: fine
    with pytest.raises(S3ObjectExistsError, match="different content"):
        be.save(FileType.INDEX, name_of(data), b"something else")
    assert be.load(FileType.INDEX, name_of(data)) == data


def test_many_objects_and_parallel_saves(radosgw: RadosGW, bucket: str) -> None:
    """More than one list page (1000 keys), saved from 16 threads over 5 connections."""
    be = make_backend(s3_url(radosgw, bucket), connections=5)
    be.create()
    blobs = [i.to_bytes(4, "little") * 8 for i in range(1100)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda d: be.save(FileType.LOCK, name_of(d), d), blobs))
    listed = {f.name: f.size_bytes for f in be.list(FileType.LOCK)}
    assert listed == {name_of(d): 32 for d in blobs}
    assert be._pool.num_connections <= 5
    with ThreadPoolExecutor(16) as pool:
        back = list(pool.map(lambda d: be.load(FileType.LOCK, name_of(d)), blobs[::50]))
    assert back == blobs[::50]


def test_tls_with_private_ca(radosgw: RadosGW, bucket: str) -> None:
    url = f"s3:{radosgw.tls_endpoint}/{bucket}"
    with pytest.raises(S3ConnectionError, match="not trusted.*cacert"):
        make_backend(url).create()
    be = make_backend(url, cacert=radosgw.ca_path)
    be.create()
    be.save(FileType.LOCK, name_of(b"over tls"), b"over tls")
    assert be.load(FileType.LOCK, name_of(b"over tls")) == b"over tls"
    be.remove(FileType.LOCK, name_of(b"over tls"))
    # a repository made over HTTPS opens in restic given the same CA
    need_restic()
    repo = Repository.init(make_backend(url + "/repo", cacert=radosgw.ca_path), PASSWORD,
                           kdf_params=FAST_KDF)
    restic = ResticS3(url + "/repo")
    cfg = json.loads(restic.run("--cacert", str(radosgw.ca_path), "cat", "config").stdout)
    assert cfg["id"] == repo.config.id
    repo.close()
    # plain HTTP spelled as HTTPS: the error says which
    wrong = make_backend(f"s3:https://127.0.0.1:{radosgw.rgw_port}/{bucket}", retries=0)
    with pytest.raises(S3ConnectionError, match="s3:http://"):
        wrong.stat(FileType.CONFIG, "")


def test_bandwidth_limits(radosgw: RadosGW, bucket: str) -> None:
    data = random_bytes(3 << 20, 5)
    be = make_backend(s3_url(radosgw, bucket), limit_upload_kib=8192,
                      limit_download_kib=8192)
    be.create()
    start = time.monotonic()
    be.save(FileType.PACK, name_of(data), data)
    upload_s = time.monotonic() - start
    start = time.monotonic()
    assert be.load(FileType.PACK, name_of(data)) == data
    download_s = time.monotonic() - start
    # 3 MiB at 8 MiB/s: at least 0.375 s less the 0.1 s burst
    assert upload_s >= 0.27 and download_s >= 0.27
    fast = make_backend(s3_url(radosgw, bucket))
    start = time.monotonic()
    assert fast.load(FileType.PACK, name_of(data)) == data
    assert time.monotonic() - start < download_s


def test_credentials_from_environment(radosgw: RadosGW, bucket: str,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    be = S3Backend.from_url(s3_url(radosgw, bucket))
    be.create()
    assert not be.exists(FileType.CONFIG, "")


def test_credentials_from_profile(radosgw: RadosGW, bucket: str, tmp_path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    creds = tmp_path / "credentials"
    creds.write_text(f"[other]\naws_access_key_id = {ACCESS_KEY}\n"
                     f"aws_secret_access_key = {SECRET_KEY}\n")
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_PROFILE", "other")
    be = S3Backend.from_url(s3_url(radosgw, bucket))
    be.create()
    assert not be.exists(FileType.CONFIG, "")


def test_server_refuses_a_body_that_does_not_match_its_signed_hash(radosgw: RadosGW,
                                                                   bucket: str) -> None:
    """Saves sign the body's SHA-256, so bytes changed on the way are refused, not stored."""
    be = make_backend(s3_url(radosgw, bucket))
    be.create()
    sent = b"what arrives"
    resp = be._request("PUT", "keys/" + name_of(sent), what="test",
                       body=memoryview(sent), payload_sha256=name_of(b"what was signed"))
    assert resp.status == 400 and resp.code == "XAmzContentSHA256Mismatch"
    assert not be.exists(FileType.KEY, name_of(sent))
