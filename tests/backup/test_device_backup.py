"""`blockera backup / restore / dump / snapshots` end to end through the command line: full and
incremental backups restore exactly, only the chunks covering changes are read, zero chunks
are one blob, sparse and delta restores, and every refusal says what was wrong."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from blockera.backup.source_lock import SourceLock

from .helpers import tree_listing
from .jobs import KiB, MiB, Cli, make_repo, overwrite, snapshot_image, write_image

CHUNK = 256 * KiB


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(make_repo(tmp_path / "repo"), tmp_path / "locks")


def _restored(cli: Cli, snapshot: str, tmp_path: Path, *args: str) -> bytes:
    out = tmp_path / f"restored-{snapshot[:8]}.img"
    cli.run("restore", snapshot, str(out), *args)
    return out.read_bytes()


def test_full_and_incrementals_restore_and_dump_exactly(cli: Cli, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    images = [write_image(disk, 12 * MiB, seed=1)]
    s1 = cli.backup(disk, "--chunk-size", "256K")
    assert (s1["made_from"], s1["chunks_total"], s1["chunks_read"], s1["chunks_reused"]) == \
        ("full", 48, 48, 0)
    assert s1["parent_id"] is None and 0 < s1["bytes_stored"] < 12 * MiB

    # a COW change list (64 KiB chunks): two writes inside chunks 0 and 20 of 256 KiB
    overwrite(disk, [(100_000, 5000), (5 * MiB + 70 * KiB, 1)], seed=2)
    images.append(disk.read_bytes())
    (tmp_path / "cow.json").write_text(json.dumps(
        {"chunk_size": 128, "valid": True, "exceptions": 2, "ranges": [[1, 2], [81, 82]]}))
    s2 = cli.backup(disk, "--changed", str(tmp_path / "cow.json"))
    assert (s2["made_from"], s2["chunks_read"], s2["chunks_reused"], s2["chunks_new"]) == \
        ("changed", 2, 46, 2)
    assert s2["parent_id"] == s1["snapshot_id"] and s2["bytes_read"] == 2 * CHUNK

    # an era change list (4 MiB blocks): block 2 written
    overwrite(disk, [(9 * MiB + 3, 300 * KiB)], seed=3)
    images.append(disk.read_bytes())
    era_json = json.dumps({"nr_blocks": 3, "written_since": 4, "ranges": [[2, 3]],
                           "block_size_sectors": 8192})
    s3 = cli.json("backup", str(disk), "--changed", "-", input=era_json.encode())
    assert (s3["chunks_read"], s3["chunks_reused"]) == (16, 32)
    assert s3["parent_id"] == s2["snapshot_id"]

    listed = cli.json("snapshots")
    assert [s["id"] for s in listed] == [s1["snapshot_id"], s2["snapshot_id"],
                                        s3["snapshot_id"]]
    assert all(s["paths"] == [str(disk)] and s["chunk_bytes"] == CHUNK and
               s["size_bytes"] == 12 * MiB for s in listed)
    assert [s["made_from"] for s in listed] == ["full", "changed", "changed"]
    assert "blockera:since=4" in listed[2]["tags"]
    for summary, image in zip((s1, s2, s3), images):
        assert snapshot_image(cli.repo, summary["snapshot_id"]) == image
    assert _restored(cli, s2["snapshot_id"], tmp_path) == images[1]
    assert cli.run("dump", s1["snapshot_id"][:10]).stdout == images[0]
    assert _restored(cli, "latest", tmp_path, "--sparse") == images[-1]


def test_zero_chunks_are_one_blob_and_sparse_restore_leaves_holes(cli: Cli,
                                                                   tmp_path: Path) -> None:
    disk = tmp_path / "zeros.img"
    data = bytearray(16 * MiB)
    data[3 * MiB:3 * MiB + 100] = b"x" * 100
    disk.write_bytes(bytes(data))
    s = cli.backup(disk, "--chunk-size", "1M")
    assert (s["chunks_read"], s["chunks_new"]) == (16, 2)   # one zero blob, one with x
    out = tmp_path / "out.img"
    r = cli.json("restore", "latest", str(out), "--sparse")
    assert (r["chunks_zero"], r["chunks_written"]) == (15, 1)
    assert out.read_bytes() == bytes(data)
    assert out.stat().st_blocks * 512 <= 2 * MiB          # holes, not written zeros
    # over an existing file full of garbage, --sparse punches the zero chunks out
    out.write_bytes(b"\xff" * (16 * MiB))
    cli.run("restore", "latest", str(out), "--sparse")
    assert out.read_bytes() == bytes(data)
    assert out.stat().st_blocks * 512 <= 2 * MiB
    # without --sparse the zeros are written
    full = tmp_path / "full.img"
    cli.run("restore", "latest", str(full))
    assert full.read_bytes() == bytes(data) and full.stat().st_blocks * 512 >= 16 * MiB


def test_delta_restore_writes_only_chunks_that_differ(cli: Cli, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    write_image(disk, 8 * MiB, seed=5)
    first = cli.backup(disk, "--chunk-size", "64K")
    overwrite(disk, [(MiB + 10, 3), (7 * MiB, 200 * KiB)], seed=6)
    (tmp_path / "c.json").write_text(json.dumps(
        {"chunk_size": 8, "valid": True, "ranges": [[256, 257], [1792, 1842]]}))
    second = cli.backup(disk, "--changed", str(tmp_path / "c.json"))
    target = tmp_path / "target.img"
    cli.run("restore", first["snapshot_id"], str(target))
    r = cli.json("restore", second["snapshot_id"], str(target), "--delta-from",
                 first["snapshot_id"])
    assert r["chunks_written"] + r["chunks_zero"] == 5   # chunk 16 and chunks 112..115
    assert r["chunks_unchanged"] == 128 - 5
    assert target.read_bytes() == disk.read_bytes()


def test_dry_run_estimates_and_writes_nothing(cli: Cli, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    write_image(disk, 4 * MiB, seed=7)
    cli.backup(disk)
    before = tree_listing(cli.repo)
    (tmp_path / "c.json").write_text(json.dumps({"chunk_size": 8, "valid": True,
                                                 "ranges": [[0, 1], [1000, 1001]]}))
    s = cli.backup(disk, "--changed", str(tmp_path / "c.json"), "--dry-run")
    assert s["dry_run"] and s["snapshot_id"] is None
    assert (s["chunks_total"], s["chunks_read"], s["bytes_read"]) == (4, 2, 2 * MiB)
    text = cli.run("backup", str(disk), "--dry-run").stdout.decode()
    assert "would back up" in text and "read 4 (4.0 MiB)" in text
    assert tree_listing(cli.repo) == before


def test_resized_source_and_misfit_ranges_are_refused(cli: Cli, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    write_image(disk, 4 * MiB, seed=8)
    cli.backup(disk, "--chunk-size", "128K")
    (tmp_path / "beyond.json").write_text(json.dumps(
        {"chunk_size": 8, "valid": True, "ranges": [[1020, 1030]]}))
    r = cli.run("backup", str(disk), "--changed", str(tmp_path / "beyond.json"), check=False)
    assert r.returncode == 1
    assert b"changed COW chunks [1020, 1030) do not fit the source (4194304 bytes" in r.stderr
    with open(disk, "ab") as f:
        f.write(bytes(MiB))
    (tmp_path / "ok.json").write_text(json.dumps({"chunk_size": 8, "valid": True,
                                                  "ranges": [[0, 1]]}))
    r = cli.run("backup", str(disk), "--changed", str(tmp_path / "ok.json"), check=False)
    assert r.returncode == 1
    assert b"is 5242880 bytes, but the parent snapshot" in r.stderr
    assert b"is 4194304 bytes: the device was resized" in r.stderr
    assert b"Traceback" not in r.stderr
    full = cli.backup(disk)                    # a full backup is always possible
    assert (full["chunks_total"], full["chunk_bytes"]) == (40, 128 * KiB)
    assert snapshot_image(cli.repo) == disk.read_bytes()
    r = cli.run("backup", str(disk), "--changed", str(tmp_path / "ok.json"), "--chunk-size",
                "1M", check=False)
    assert r.returncode == 1 and b"differs from the parent's chunk size" in r.stderr


def test_incremental_needs_a_parent_of_this_source_and_host(cli: Cli, tmp_path: Path) -> None:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    write_image(a, 2 * MiB, seed=9)
    write_image(b, 2 * MiB, seed=10)
    (tmp_path / "c.json").write_text(json.dumps({"chunk_size": 8, "valid": True,
                                                 "ranges": [[0, 1]]}))
    r = cli.run("backup", str(a), "--changed", str(tmp_path / "c.json"), check=False)
    assert r.returncode == 1 and b"no earlier backup of this source" in r.stderr
    sa = cli.backup(a)
    sb = cli.backup(b, "--host", "other")
    overwrite(a, [(0, 10)], seed=11)
    inc = cli.backup(a, "--changed", str(tmp_path / "c.json"))
    assert inc["parent_id"] == sa["snapshot_id"]
    r = cli.run("backup", str(b), "--changed", str(tmp_path / "c.json"), check=False)
    assert r.returncode == 1 and b"from host" in r.stderr
    inc_b = cli.backup(b, "--changed", str(tmp_path / "c.json"), "--host", "other")
    assert inc_b["parent_id"] == sb["snapshot_id"]
    explicit = cli.backup(a, "--changed", str(tmp_path / "c.json"), "--parent",
                          sa["snapshot_id"][:12])
    assert explicit["parent_id"] == sa["snapshot_id"]
    r = cli.run("backup", str(a), "--chunk-size", "3M", check=False)
    assert r.returncode == 1 and b"power of two from 64 KiB to 8 MiB" in r.stderr


def test_two_backups_of_one_source_are_refused(cli: Cli, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    other = tmp_path / "other.img"
    write_image(disk, MiB, seed=12)
    write_image(other, MiB, seed=13)
    alias = tmp_path / "alias.img"
    alias.symlink_to(disk)
    with SourceLock(str(disk), tmp_path / "locks"):       # as a running backup holds it
        r = cli.run("backup", str(alias), check=False)
        assert r.returncode == 1
        assert (f"another backup of this source is running (PID {os.getpid()})".encode()
                in r.stderr)
        cli.backup(other)                                 # another source is fine
    cli.backup(alias)


def test_password_and_repository_errors(cli: Cli, tmp_path: Path) -> None:
    r = cli.run("snapshots", env={"BLOCKERA_PASSWORD": "wrong"}, check=False)
    assert r.returncode == 1 and b"wrong password" in r.stderr
    (tmp_path / "pw").write_text("wrong\n")
    r = cli.run("snapshots", "--password-file", str(tmp_path / "pw"), check=False)
    assert r.returncode == 1 and b"wrong password" in r.stderr
    (tmp_path / "empty").mkdir()
    r = cli.run("snapshots", "-r", str(tmp_path / "empty"), check=False)
    assert r.returncode == 1 and b"not a repository" in r.stderr
    r = cli.run("snapshots", env={"BLOCKERA_PASSWORD": ""}, check=False, input=b"")
    assert r.returncode == 2 and b"no password" in r.stderr
    r = cli.run("restore", "latest", str(tmp_path / "x.img"), check=False)
    assert r.returncode == 1 and b"no snapshot matches" in r.stderr
    r = cli.run("backup", str(tmp_path / "missing.img"), check=False)
    assert r.returncode == 2 and b"no such file" in r.stderr
    r = cli.run("backup", str(tmp_path), "--cow", "x", "--changed", "y", check=False)
    assert r.returncode == 2 and b"give one change source" in r.stderr
    assert not list(cli.repo.glob("locks/*"))


def test_every_command_has_help_with_an_example() -> None:
    from click.testing import CliRunner

    from blockera.cli.main import cli as main

    for command in ("init", "backup", "snapshots", "restore", "dump", "check", "forget",
                    "prune", "mount"):
        r = CliRunner().invoke(main, [command, "--help"])
        assert r.exit_code == 0 and "Example" in r.output, command


def test_engine_devices_as_source_and_target(daemon, cli: Cli, tmp_path: Path) -> None:
    src, dst, small = (tmp_path / "src.img", tmp_path / "dst.img", tmp_path / "small.img")
    data = write_image(src, 6 * MiB, seed=14)
    dst.write_bytes(b"\xee" * (6 * MiB))
    small.write_bytes(bytes(MiB))
    for name, path in (("src", src), ("dst", dst), ("small", small)):
        daemon.run("dmsetup", "create", name, "--table",
                   f"0 {path.stat().st_size // 512} linear {path} 0")
    env = {"BLOCKERA_SOCKET": str(daemon.socket_path)}
    s = json.loads(cli.run("backup", "/dev/mapper/src", "--json", env=env).stdout)
    assert s["source"] == "/dev/mapper/src" and s["chunks_read"] == 6
    snaps = cli.json("snapshots")
    assert snaps[0]["paths"] == ["/dev/mapper/src"]
    cli.run("restore", "latest", "/dev/mapper/dst", "--sparse", env=env)
    assert dst.read_bytes() == data
    r = cli.run("restore", "latest", "/dev/mapper/small", env=env, check=False)
    assert r.returncode == 1
    assert b"/dev/mapper/small is 1048576 bytes, smaller than the image (6291456" in r.stderr
    assert small.read_bytes() == bytes(MiB)


def test_a_file_of_uneven_blobs_is_not_taken_for_uniform_chunks(tmp_path: Path) -> None:
    """A file restic stored (content-defined chunks, no blockera tags) whose blob count happens
    to equal size / first blob's length, rounded up: restored from the blobs' real lengths."""
    from blockera.backup import BlobType, Node, Snapshot, Tree

    from .helpers import new_repo

    parts = [os.urandom(1000), os.urandom(600), os.urandom(600)]   # 3 == ceil(2200 / 1000)
    repo = new_repo(tmp_path / "repo")
    with repo.lock(recheck_delay_s=0.01):
        ids = [repo.save_blob(BlobType.DATA, p) for p in parts]
        root = repo.save_tree(Tree([Node.file("f.img", 2200, ids)]))
        repo.save_snapshot(Snapshot.new(root, ["/f.img"]))
    repo.close()
    assert snapshot_image(tmp_path / "repo") == b"".join(parts)


def test_engine_devices_of_two_daemons_are_different_sources(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    """/dev/mapper/disk of one engine daemon and of another are not the same source."""
    from blockera.backup.source_lock import source_identity

    monkeypatch.setenv("BLOCKERA_SOCKET", str(tmp_path / "a.sock"))
    first = source_identity("/dev/mapper/blockera-test-disk")
    assert source_identity("/dev/mapper/blockera-test-disk") == first
    monkeypatch.setenv("BLOCKERA_SOCKET", str(tmp_path / "b.sock"))
    assert source_identity("/dev/mapper/blockera-test-disk") != first
