"""The backup commands end to end on a real radosgw, through the command line
(`python3 -m blockera ... -r s3:http://127.0.0.1:PORT/bucket`): init, full and incremental
backups, snapshots, restore, dump, mount (read by nbdcopy), check --read-data, forget --prune;
then restic on the same bucket (check --read-data, restore, dump); blockera backing up into a
bucket restic made; `blockera copy` from a local repository to S3; and wrong credentials or an
endpoint nobody listens on failing with a clear message and exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from blockera.backup import Repository

from ..helpers import FAST_KDF, PASSWORD, need_restic
from ..jobs import KiB, MiB, Cli, make_repo, overwrite, write_image
from .cluster import RadosGW, free_port
from .conftest import ACCESS_KEY, SECRET_KEY, ResticS3, make_backend, s3_url

pytestmark = pytest.mark.xdist_group("s3")

CHUNK = 256 * KiB


def s3_cli(url: str, tmp_path: Path, password: str = PASSWORD) -> Cli:
    """`blockera` against an S3 location, with the test user's keys in the environment."""
    cli = Cli(url, tmp_path / "locks", password)  # type: ignore[arg-type]
    cli.env.update({"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY})
    cli.env.pop("AWS_PROFILE", None)
    return cli


def new_s3_repo(url: str) -> str:
    """A repository made with cheap scrypt parameters (the commands open it quickly)."""
    Repository.init(make_backend(url), PASSWORD, kdf_params=FAST_KDF).close()
    return url


def _nbd_read(cli: Cli, ref: str, tmp_path: Path) -> bytes:
    """The snapshot's image as nbdcopy reads it from `blockera mount`."""
    sock = tmp_path / "mount.sock"
    proc = subprocess.Popen([sys.executable, "-m", "blockera", "mount", ref, "--unix",
                             str(sock)], env=cli.env, stderr=subprocess.PIPE)
    try:
        line = b""
        while b"serving" not in line:
            line = proc.stderr.readline()  # type: ignore[union-attr]
            assert line or proc.poll() is None, "blockera mount exited"
        out = tmp_path / "nbd.img"
        subprocess.run(["nbdcopy", f"nbd+unix:///?socket={sock}", str(out)], check=True,
                       timeout=120)
        return out.read_bytes()
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0


def test_backup_jobs_on_radosgw_and_restic_on_the_same_bucket(radosgw: RadosGW, bucket: str,
                                                               tmp_path: Path) -> None:
    need_restic()
    from tests.nbd.conftest import need
    need("nbdcopy")
    url = new_s3_repo(s3_url(radosgw, bucket, "hosts/vm1"))
    cli = s3_cli(url, tmp_path)
    disk = tmp_path / "disk.img"
    images = [write_image(disk, 8 * MiB, seed=61)]
    s1 = cli.backup(disk, "--chunk-size", "256K", "--host", "vm1")
    assert (s1["made_from"], s1["chunks_read"]) == ("full", 32)
    # incremental from a COW change list (64 KiB chunks): writes in chunks 1 and 20
    overwrite(disk, [(300 * KiB, 4 * KiB), (5 * MiB + 10, 100)], seed=62)
    images.append(disk.read_bytes())
    (tmp_path / "cow.json").write_text(json.dumps(
        {"chunk_size": 128, "valid": True, "exceptions": 2, "ranges": [[4, 5], [80, 81]]}))
    s2 = cli.backup(disk, "--changed", str(tmp_path / "cow.json"), "--host", "vm1")
    assert (s2["made_from"], s2["chunks_read"], s2["chunks_reused"]) == ("changed", 2, 30)
    assert s2["parent_id"] == s1["snapshot_id"]
    listed = cli.json("snapshots")
    assert [s["id"] for s in listed] == [s1["snapshot_id"], s2["snapshot_id"]]

    out = tmp_path / "restored.img"
    cli.run("restore", "latest", str(out))
    assert out.read_bytes() == images[1]
    assert cli.run("dump", s1["snapshot_id"][:8]).stdout == images[0]
    assert _nbd_read(cli, s2["snapshot_id"], tmp_path) == images[1]
    assert cli.json("check", "--read-data")["ok"] is True

    restic = ResticS3(url)
    assert "no errors were found" in restic.run("check", "--read-data").stdout.decode()
    assert restic.run("dump", s1["snapshot_id"], "/disk.img").stdout == images[0]
    restic.run("restore", "latest", "--target", str(tmp_path / "r"))
    assert (tmp_path / "r" / "disk.img").read_bytes() == images[1]

    forgot = cli.json("forget", "--keep-last", "1", "--prune", "--max-unused", "0")
    assert forgot["removed"] == [s1["snapshot_id"]]
    assert forgot["prune"]["packs_removed"] + forgot["prune"]["packs_repacked"] >= 1
    assert "no errors were found" in restic.run("check", "--read-data").stdout.decode()
    cli.run("restore", "latest", str(out))
    assert out.read_bytes() == images[1]
    assert [s["id"] for s in cli.json("snapshots")] == [s2["snapshot_id"]]


def test_init_through_the_command_line_then_restic_opens_it(radosgw: RadosGW, bucket: str,
                                                            tmp_path: Path) -> None:
    need_restic()
    url = s3_url(radosgw, bucket)
    cli = s3_cli(url, tmp_path)
    r = cli.run("init")
    assert f"at {url}" in r.stdout.decode()
    again = cli.run("init", check=False)
    assert again.returncode != 0 and "already exists" in again.stderr.decode()
    assert json.loads(ResticS3(url).run("snapshots", "--json").stdout) == []


def test_blockera_backs_up_into_a_bucket_restic_made(radosgw: RadosGW, bucket: str,
                                                     tmp_path: Path) -> None:
    need_restic()
    url = s3_url(radosgw, bucket, "made-by-restic")
    restic = ResticS3(url)
    restic.run("init")
    src = tmp_path / "src"
    src.mkdir()
    image = write_image(src / "vm.img", 4 * MiB + 4096, seed=63)
    restic.run("backup", str(src / "vm.img"))
    cli = s3_cli(url, tmp_path)
    restic_snap = cli.json("snapshots")[0]["id"]
    out = tmp_path / "from-restic.img"
    cli.run("restore", restic_snap, str(out))
    assert out.read_bytes() == image
    disk = tmp_path / "disk.img"
    mine = write_image(disk, 6 * MiB, seed=64)
    s = cli.backup(disk, "--chunk-size", "512K")
    assert s["made_from"] == "full"
    assert "no errors were found" in restic.run("check", "--read-data").stdout.decode()
    assert restic.run("dump", s["snapshot_id"], "/disk.img").stdout == mine
    assert len(cli.json("snapshots")) == 2


def test_copy_local_to_s3(radosgw: RadosGW, bucket: str, tmp_path: Path) -> None:
    need_restic()
    local = Cli(make_repo(tmp_path / "local"), tmp_path / "locks")
    disk = tmp_path / "disk.img"
    images = [write_image(disk, 6 * MiB, seed=65)]
    local.backup(disk, "--chunk-size", "256K")
    overwrite(disk, [(2 * MiB, 64 * KiB)], seed=66)
    images.append(disk.read_bytes())
    local.backup(disk)
    url = s3_url(radosgw, bucket)
    Repository.init(make_backend(url), "the bucket's own password", kdf_params=FAST_KDF).close()
    remote = s3_cli(url, tmp_path, password="the bucket's own password")
    env = {"BLOCKERA_FROM_REPOSITORY": str(local.repo), "BLOCKERA_FROM_PASSWORD": PASSWORD}
    doc = json.loads(remote.run("copy", "--json", env=env).stdout)
    assert (doc["copied"], doc["skipped"]) == (2, 0)
    assert doc["bytes_stored"] > 0
    restic = ResticS3(url, password="the bucket's own password")
    assert "no errors were found" in restic.run("check", "--read-data").stdout.decode()
    copies = [s["copy"] for s in doc["snapshots"]]
    for copy, image in zip(copies, images):
        assert restic.run("dump", copy, "/disk.img").stdout == image
        assert remote.run("dump", copy).stdout == image
    again = json.loads(remote.run("copy", "--json", env=env).stdout)
    assert (again["copied"], again["skipped"], again["data_blobs"]) == (0, 2, 0)
    assert again["bytes_stored"] == 0


_FAST_FAILING = """
import sys
from blockera.backup import s3
init = s3.S3Backend.__init__
def quick(self, *args, **kwargs):
    kwargs.update(retries=1, backoff_initial_s=0.01)
    init(self, *args, **kwargs)
s3.S3Backend.__init__ = quick
from blockera.cli.main import main
main(sys.argv[1:])
"""
"""The real command, with the retry schedule cut short (the default waits about 40 s before it
gives up on an endpoint, which the backend tests cover)."""


def test_wrong_credentials_missing_bucket_and_unreachable_endpoint_exit_2(radosgw: RadosGW, bucket: str,
                                                           tmp_path: Path) -> None:
    url = new_s3_repo(s3_url(radosgw, bucket))
    cli = s3_cli(url, tmp_path)
    disk = tmp_path / "disk.img"
    write_image(disk, MiB, seed=67)
    r = cli.run("backup", str(disk), check=False,
                env={"AWS_SECRET_ACCESS_KEY": "not-the-secret"})
    assert r.returncode == 2
    assert "AWS_SECRET_ACCESS_KEY" in r.stderr.decode() and "Traceback" not in r.stderr.decode()
    r = cli.run("snapshots", check=False, env={"AWS_ACCESS_KEY_ID": "NOSUCHKEY"})
    assert r.returncode == 2 and "AWS_ACCESS_KEY_ID" in r.stderr.decode()
    r = cli.run("snapshots", "-r", s3_url(radosgw, f"{bucket}-missing"), check=False)
    assert r.returncode == 2 and "does not exist" in r.stderr.decode(), r.stderr.decode()
    nowhere = f"s3:http://127.0.0.1:{free_port()}/{bucket}"
    r = subprocess.run([sys.executable, "-c", _FAST_FAILING, "snapshots", "-r", nowhere],
                       env=cli.env, capture_output=True, timeout=60)
    err = r.stderr.decode()
    assert r.returncode == 2 and "cannot reach" in err and "Traceback" not in err, err
    assert os.path.exists(disk)
