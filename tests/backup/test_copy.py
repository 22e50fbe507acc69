"""`blockera copy --from-repo A -r B` between local repositories: the copies pass `restic check
--read-data` and restore exactly (blockera and restic); only blobs the target lacks are
transferred, re-encrypted for the target's key; copying twice transfers nothing; restic's own
`copy` and blockera's recognise each other's copies; a wrong source password writes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from blockera.backup import LocalBackend, Repository

from .helpers import FAST_KDF, Restic, need_restic, tree_listing
from .jobs import KiB, MiB, Cli, make_repo, overwrite, snapshot_image, write_image

CHUNK = 256 * KiB
TARGET_PASSWORD = "a different password for the target"


class Pair:
    """A source repository with two snapshots (full, incremental) of one 6 MiB image, and an
    empty target under another password (so another master key)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.source = Cli(make_repo(root / "source"), root / "locks")
        self.target_repo = root / "target"
        Repository.init(LocalBackend(self.target_repo), TARGET_PASSWORD,
                        kdf_params=FAST_KDF).close()
        self.target = Cli(self.target_repo, root / "locks", password=TARGET_PASSWORD)
        self.disk = root / "disk.img"
        self.images = [write_image(self.disk, 6 * MiB, seed=51)]
        self.s1 = self.source.backup(self.disk, "--chunk-size", "256K", "--host", "h1")
        overwrite(self.disk, [(MiB + 5, 3 * KiB)], seed=52)
        self.images.append(self.disk.read_bytes())
        self.s2 = self.source.backup(self.disk, "--host", "h1")

    def copy(self, *args: str, check: bool = True, password: str | None = None):  # type: ignore[no-untyped-def]
        return self.target.run("copy", "--from-repo", str(self.source.repo), *args,
                               check=check, env={"BLOCKERA_FROM_PASSWORD":
                                                 password or self.source.env[
                                                     "BLOCKERA_PASSWORD"]})

    def copy_json(self, *args: str) -> dict:
        import json

        return json.loads(self.copy(*args, "--json").stdout)


@pytest.fixture
def pair(tmp_path: Path) -> Pair:
    return Pair(tmp_path)


def _without_locks(listing: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in listing.items() if not k.startswith("locks/")}


def test_copy_all_restores_exactly_and_restic_checks_it(pair: Pair, tmp_path: Path) -> None:
    need_restic()
    doc = pair.copy_json()
    assert (doc["copied"], doc["skipped"]) == (2, 0)
    # the distinct chunks of the full backup, then the one chunk that changed
    chunks = {pair.images[0][i:i + CHUNK] for i in range(0, 6 * MiB, CHUNK)}
    assert doc["snapshots"][0]["data_blobs"] == len(chunks)
    assert doc["snapshots"][1]["data_blobs"] == 1
    assert doc["data_bytes"] == (len(chunks) + 1) * CHUNK
    copies = pair.target.json("snapshots")
    assert len(copies) == 2
    for copy, original in zip(copies, (pair.s1, pair.s2)):
        assert copy["parent"] is None            # as restic: a parent means nothing there
        assert copy["hostname"] == "h1" and copy["paths"] == [str(pair.disk)]
        assert copy["id"] != original["snapshot_id"]
    restic = Restic(pair.target_repo, TARGET_PASSWORD)
    restic.run("check", "--read-data")
    for copy, image in zip(copies, pair.images):
        assert snapshot_image_with(pair.target_repo, copy["id"]) == image
        assert restic.run("dump", copy["id"], "/disk.img").stdout == image
    restic.run("restore", "latest", "--target", str(tmp_path / "out"))
    assert (tmp_path / "out" / "disk.img").read_bytes() == pair.images[1]
    out = tmp_path / "restored.img"
    pair.target.run("restore", copies[0]["id"], str(out))
    assert out.read_bytes() == pair.images[0]
    # the target's own key: the source password does not open it
    assert restic.run("snapshots", check=False,
                      password=pair.source.env["BLOCKERA_PASSWORD"]).returncode != 0

    # twice: nothing transferred, nothing written but the lock that came and went
    before = _without_locks(tree_listing(pair.target_repo))
    again = pair.copy_json()
    assert (again["copied"], again["skipped"], again["data_blobs"], again["tree_blobs"]) == \
        (0, 2, 0, 0)
    assert [s["copy"] for s in again["snapshots"]] == [c["id"] for c in copies]
    assert _without_locks(tree_listing(pair.target_repo)) == before


def snapshot_image_with(repo: Path, ref: str) -> bytes:
    """`snapshot_image` for a repository under the target's password."""
    return snapshot_image(repo, ref, TARGET_PASSWORD)


def test_only_missing_blobs_travel_and_snapshots_can_be_chosen(pair: Pair) -> None:
    # the target already backed up the same image itself: a copy brings no data blob
    pair.disk.write_bytes(pair.images[0])
    own = pair.target.backup(pair.disk, "--chunk-size", "256K", "--host", "h2")
    assert own["chunks_new"] > 0
    doc = pair.copy_json(pair.s1["snapshot_id"][:10])
    assert (doc["copied"], doc["data_blobs"]) == (1, 0)
    assert doc["tree_blobs"] == 1     # the file node's times differ: another tree
    doc = pair.copy_json("latest", "--dry-run")
    assert doc["dry_run"] and doc["copied"] == 1 and doc["data_blobs"] == 1
    assert len(pair.target.json("snapshots")) == 2     # the dry run wrote nothing
    doc = pair.copy_json("latest")
    assert (doc["copied"], doc["data_blobs"]) == (1, 1)
    assert snapshot_image_with(pair.target_repo, doc["snapshots"][0]["copy"]) == pair.images[1]
    assert snapshot_image(pair.source.repo, "latest") == pair.images[1]


def test_a_wrong_source_password_fails_clearly_and_writes_nothing(pair: Pair) -> None:
    before = (tree_listing(pair.source.repo), tree_listing(pair.target_repo))
    r = pair.copy(check=False, password="not the password")
    assert r.returncode == 1
    err = r.stderr.decode()
    assert "source repository (--from-repo)" in err and "wrong password" in err
    assert (tree_listing(pair.source.repo), tree_listing(pair.target_repo)) == before
    # no source given at all
    r = pair.target.run("copy", check=False, env={"BLOCKERA_FROM_PASSWORD": "x"})
    assert r.returncode == 2 and "--from-repo" in r.stderr.decode()


def test_restic_copy_and_blockera_copy_recognise_each_other(pair: Pair, tmp_path: Path) -> None:
    need_restic()
    pair.copy_json(pair.s1["snapshot_id"])
    restic = Restic(pair.target_repo, TARGET_PASSWORD)
    env_pw = pair.source.env["BLOCKERA_PASSWORD"]
    r = restic.run("copy", "--from-repo", str(pair.source.repo), "--from-password-file",
                   _write(tmp_path / "pw", env_pw))
    text = r.stdout.decode() + r.stderr.decode()
    assert "skipping source snapshot" in text and pair.s1["snapshot_id"][:8] in text
    # restic copied the second one; blockera sees that copy and skips both
    doc = pair.copy_json()
    assert (doc["copied"], doc["skipped"]) == (0, 2)
    restic.run("check", "--read-data")


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)
