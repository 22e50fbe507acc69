"""Faults between blockera and a real radosgw: the server killed and restarted while packs are
being saved, a network that drops, stalls, truncates and throttles connections, a user without
write permission, wrong credentials, a skewed clock, a missing bucket, an endpoint nobody
listens on. Writes either complete (and read back exactly, and restic finds the repository
sound) or fail with an error that says what to do."""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest

from blockera.backup import (BlobType, FileType, Node,
                             Repository, Snapshot, Tree)
from blockera.backup.s3 import (S3AccessDeniedError, S3BucketNotFoundError, S3ClockSkewError,
                                S3ConnectionError,
                                S3CredentialsError, S3Backend)

from ..helpers import FAST_KDF, PASSWORD, MiB, compressible_bytes, need_restic, random_bytes
from .cluster import RadosGW, free_port
from .conftest import (READONLY_ACCESS_KEY, READONLY_SECRET_KEY, ResticS3, make_backend,
                       s3_url)
from .proxy import FAULTS, FaultyProxy

pytestmark = pytest.mark.xdist_group("s3")


def write_image(repo: Repository, chunks: list[bytes], name: str,
                parent: bytes | None = None) -> bytes:
    with repo.lock(recheck_delay_s=0.01):
        ids = [repo.save_blob(BlobType.DATA, c) for c in chunks]
        tree = repo.save_tree(Tree([Node.file(name, sum(map(len, chunks)), ids)]))
        return repo.save_snapshot(Snapshot.new(tree, [f"/{name}"], parent=parent))


def assert_restic_check(url: str) -> ResticS3:
    restic = ResticS3(url)
    out = restic.run("check", "--read-data").stdout.decode()
    assert "no errors were found" in out
    return restic


# -- radosgw killed ---------------------------------------------------------------------------

def test_radosgw_restarted_while_saving_packs(rgw: RadosGW, bucket: str,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """radosgw is killed (SIGKILL) after a few packs and started again a second later: the
    saves in flight retry and the backup completes; restic finds it sound; the next backup
    completes too."""
    need_restic()
    url = s3_url(rgw, bucket)
    repo = Repository.init(make_backend(url, limit_upload_kib=8192, retries=8,
                                        backoff_initial_s=0.2, backoff_max_s=2.0),
                           PASSWORD, kdf_params=FAST_KDF, pack_size_bytes=MiB)
    chunks = [random_bytes(MiB, 100 + i) for i in range(20)]
    watcher = make_backend(url)
    seen: list[int] = []

    def kill_after_some_packs() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            packs = sum(1 for _ in watcher.list(FileType.PACK))
            if packs >= 3:
                seen.append(packs)
                rgw.kill_rgw()
                time.sleep(1.0)
                rgw.start_rgw()
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_after_some_packs)
    killer.start()
    with caplog.at_level(logging.WARNING, logger="blockera.backup.s3"):
        snap = write_image(repo, chunks, "disk.img")
    killer.join()
    repo.close()
    assert seen and seen[0] < len(chunks), "radosgw was not killed in the middle of the saves"
    assert any("retrying" in r.getMessage() for r in caplog.records)

    restic = assert_restic_check(url)
    assert restic.run("dump", snap.hex(), "/disk.img").stdout == b"".join(chunks)
    repo = Repository.open(make_backend(url), PASSWORD)
    more = [compressible_bytes(MiB, 9), random_bytes(MiB, 10)]
    write_image(repo, more, "next.img", parent=snap)
    repo.close()
    assert restic.run("dump", "latest", "/next.img").stdout == b"".join(more)
    assert_restic_check(url)


def test_radosgw_down_longer_than_the_retries(rgw: RadosGW, bucket: str) -> None:
    """With radosgw gone for good, saving fails with an error naming the endpoint; after it is
    back, the repository is sound and the next backup completes."""
    need_restic()
    url = s3_url(rgw, bucket)
    repo = Repository.init(make_backend(url, retries=2, backoff_initial_s=0.05),
                           PASSWORD, kdf_params=FAST_KDF, pack_size_bytes=MiB)
    chunks = [random_bytes(MiB, 200 + i) for i in range(4)]
    lock = repo.lock(recheck_delay_s=0.01)
    rgw.kill_rgw()
    start = time.monotonic()
    with pytest.raises(S3ConnectionError) as err:
        for c in chunks:
            repo.save_blob(BlobType.DATA, c)
        repo.flush()
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert f"cannot reach http://127.0.0.1:{rgw.rgw_port}" in message
    assert "connection refused" in message and "server is running" in message
    rgw.start_rgw()
    lock.release()
    repo.close()

    assert_restic_check(url)
    repo = Repository.open(make_backend(url), PASSWORD)
    snap = write_image(repo, chunks, "disk.img")
    repo.close()
    restic = assert_restic_check(url)
    assert restic.run("dump", snap.hex(), "/disk.img").stdout == b"".join(chunks)


# -- a bad network ----------------------------------------------------------------------------

def test_network_that_drops_stalls_truncates_and_throttles(radosgw: RadosGW,
                                                            bucket: str) -> None:
    """Every connection through the proxy meets a fault after a random number of bytes (512 KiB
    on average; the first four connections after a few hundred bytes). Every write that
    returns reads back exactly, through the same bad network; restic, talking to radosgw
    directly, finds the repository sound."""
    need_restic()
    direct = make_backend(s3_url(radosgw, bucket))
    direct.create()
    direct.save(FileType.LOCK, "0" * 64, b"the first object makes radosgw's data pool")
    direct.remove(FileType.LOCK, "0" * 64)
    proxy = FaultyProxy(radosgw.rgw_port, seed=20261203, stall_s=1.5,
                        mean_offset_bytes=512 << 10,
                        script=("slowdown", "drop", "truncate", "stall"))
    try:
        via_proxy = f"s3:http://127.0.0.1:{proxy.port}/{bucket}"

        def backend() -> S3Backend:
            return make_backend(via_proxy, connections=3, retries=12, read_timeout_s=1.0,
                                backoff_initial_s=0.02, backoff_max_s=0.2)

        raw = make_backend(f"{via_proxy}/not-a-repository", connections=3, retries=12,
                           read_timeout_s=1.0, backoff_initial_s=0.02, backoff_max_s=0.2)
        objects = [random_bytes(n, n) for n in (0, 1, 1000, 70_000, 300_000, 900_000)]
        for data in objects:
            raw.save(FileType.SNAPSHOT, _name(data), data)

        repo = Repository.init(backend(), PASSWORD, kdf_params=FAST_KDF,
                               pack_size_bytes=512 << 10, threads=2)
        chunks = [(random_bytes if i % 2 else compressible_bytes)(256 << 10, 300 + i)
                  for i in range(24)]
        snap = write_image(repo, chunks, "disk.img")
        repo.close()

        for data in objects:
            assert raw.load(FileType.SNAPSHOT, _name(data)) == data
        repo = Repository.open(backend(), PASSWORD)
        node = repo.load_tree(repo.load_snapshot(snap).tree).find("disk.img")
        assert node is not None
        assert [repo.load_blob(i) for i in node.content] == chunks
        repo.close()
    finally:
        proxy.stop()
    print(f"proxy: {proxy.connections} connections, faults {dict(proxy.fired)}")
    assert all(proxy.fired[f] >= 1 for f in FAULTS), proxy.fired
    assert sum(proxy.fired.values()) >= 8, proxy.fired
    restic = assert_restic_check(s3_url(radosgw, bucket))
    assert restic.run("dump", "latest", "/disk.img").stdout == b"".join(chunks)


def _name(data: bytes) -> str:
    import hashlib
    return hashlib.sha256(data).hexdigest()


# -- permissions, credentials, clocks, addresses ----------------------------------------------

@pytest.fixture(scope="module")
def small_repo(radosgw: RadosGW) -> tuple[str, bytes, bytes]:
    """A bucket with a one-snapshot repository: (url, snapshot ID, data)."""
    url = s3_url(radosgw, "fault-tests-repo", "r")
    data = compressible_bytes(MiB, 42)
    repo = Repository.init(make_backend(url), PASSWORD, kdf_params=FAST_KDF)
    snap = write_image(repo, [data], "small.img")
    repo.close()
    return url, snap, data


def test_read_only_user_reads_but_cannot_write(small_repo: tuple[str, bytes, bytes],
                                               radosgw: RadosGW, bucket: str) -> None:
    url, snap, data = small_repo
    reader = make_backend(url, READONLY_ACCESS_KEY, READONLY_SECRET_KEY)
    repo = Repository.open(reader, PASSWORD)
    node = repo.load_tree(repo.find_snapshot("latest").tree).find("small.img")
    assert node is not None and repo.load_blob(node.content[0]) == data
    with pytest.raises(S3AccessDeniedError) as err:
        repo.lock()
    message = str(err.value)
    assert "access denied" in message and READONLY_ACCESS_KEY in message
    assert "s3:PutObject" in message and "read-only" in message
    repo.close()
    assert not any(True for _ in make_backend(url).list(FileType.LOCK))
    with pytest.raises(S3AccessDeniedError):
        Repository.init(make_backend(s3_url(radosgw, bucket), READONLY_ACCESS_KEY,
                                     READONLY_SECRET_KEY), PASSWORD, kdf_params=FAST_KDF)


def test_wrong_credentials(small_repo: tuple[str, bytes, bytes]) -> None:
    url = small_repo[0]
    unknown = make_backend(url, "NOSUCHACCESSKEY", "whatever")
    with pytest.raises(S3CredentialsError, match="does not know the access key ID "
                                                 "'NOSUCHACCESSKEY'.*AWS_ACCESS_KEY_ID"):
        unknown.stat(FileType.CONFIG, "")
    with pytest.raises(S3CredentialsError, match="InvalidAccessKeyId"):
        list(unknown.list(FileType.SNAPSHOT))
    wrong_secret = make_backend(url, secret_key="not-the-secret")
    with pytest.raises(S3CredentialsError, match="secret key does not belong.*"
                                                 "AWS_SECRET_ACCESS_KEY"):
        wrong_secret.save(FileType.LOCK, "0" * 64, b"x")
    # Repository.open reports it as it is (exit 2), not as "not a repository"
    with pytest.raises(S3CredentialsError, match="AWS_SECRET_ACCESS_KEY"):
        Repository.open(make_backend(url, secret_key="not-the-secret"), PASSWORD)


def test_missing_credentials(radosgw: RadosGW, tmp_path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "AWS_DEFAULT_PROFILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    be = S3Backend.from_url(s3_url(radosgw, "anything"))
    with pytest.raises(S3CredentialsError, match="no S3 credentials.*AWS_ACCESS_KEY_ID"):
        be.stat(FileType.CONFIG, "")
    with pytest.raises(S3CredentialsError, match="both"):
        S3Backend.from_url(s3_url(radosgw, "anything"), access_key_id="only-the-id")


@pytest.mark.parametrize("offset_s, side", [(-3600, "behind"), (1200, "ahead of")])
def test_clock_skew(small_repo: tuple[str, bytes, bytes], offset_s: int, side: str) -> None:
    """Signatures made with a clock off by more than S3's 15 minutes are refused; the error
    says by how much and what to do."""
    url = small_repo[0]
    be = make_backend(url)
    be.clock = lambda: time.time() + offset_s
    with pytest.raises(S3ClockSkewError) as err:
        be.load(FileType.CONFIG, "")
    message = str(err.value)
    assert "clock" in message and side in message and "NTP" in message
    assert f"{abs(offset_s) - 5}" <= message.split(" s ")[0].split()[-1] <= f"{abs(offset_s) + 5}"
    with pytest.raises(S3ClockSkewError):
        be.save(FileType.LOCK, "1" * 64, b"x")
    with pytest.raises(S3ClockSkewError, match="clock"):
        Repository.open(be, PASSWORD)
    be.clock = lambda: time.time() + 300       # five minutes: within S3's allowance
    assert be.exists(FileType.CONFIG, "")


def test_missing_bucket(radosgw: RadosGW) -> None:
    url = s3_url(radosgw, "no-such-bucket-here")
    with pytest.raises(S3BucketNotFoundError, match="bucket 'no-such-bucket-here' does not "
                                                  "exist"):
        Repository.open(make_backend(url), PASSWORD)


def test_unreachable_endpoint() -> None:
    be = make_backend(f"s3:http://127.0.0.1:{free_port()}/bucket", retries=2,
                      backoff_initial_s=0.01)
    start = time.monotonic()
    with pytest.raises(S3ConnectionError, match="cannot reach .*connection refused; 3 "
                                                "attempts.*server is running"):
        be.stat(FileType.CONFIG, "")
    assert time.monotonic() - start < 5
    with pytest.raises(S3ConnectionError, match="cannot reach"):
        Repository.open(be, PASSWORD)


def test_restic_sees_the_same_error_for_a_read_only_user(small_repo: tuple[str, bytes, bytes],
                                                         radosgw: RadosGW) -> None:
    """restic, given the reader's keys, reads the repository too (and so agrees it is
    readable with these permissions)."""
    need_restic()
    restic = ResticS3(small_repo[0])
    env = restic.env()
    env.update({"AWS_ACCESS_KEY_ID": READONLY_ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": READONLY_SECRET_KEY})
    import subprocess
    r = subprocess.run(["restic", "--no-cache", "--no-lock", "snapshots", "--json"], env=env,
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert [s["id"] for s in json.loads(r.stdout)] == [small_repo[1].hex()]
