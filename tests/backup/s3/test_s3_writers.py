"""Many hosts, one repository on radosgw: four writer processes (`blockera backup --host hN`,
`blockera forget --host hN`) and one `blockera prune` race each other over rounds of random
operations. After every round `restic check` passes (with --read-data every tenth round and at
the end), the snapshots listed are exactly those made and not forgotten, each restores to the
image it was made from, and the chunks every image shares (stored before the rounds) are
stored once however many hosts back them up. Prune and forget take the exclusive lock and
refuse while a backup holds its lock; a writer killed with SIGKILL leaves a stale lock that
keeps prune out until `restic unlock` removes it, and the pack it left unindexed is pruned.

BLOCKERA_STRESS_ROUNDS sets the number of rounds (default 3, for CI); a few hundred is the
long run."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from blockera.backup import FileType, Repository
from blockera.backup.device_layout import DeviceFacts, content_layout, find_file_node
from blockera.backup.ids import hash_id
from blockera.backup.index_view import load_index_view
from blockera.backup.restore import dump_to_stream

from ..helpers import FAST_KDF, PASSWORD, need_restic
from ..jobs import KiB, MiB, Cli
from .cluster import RadosGW
from .conftest import ResticS3, make_backend, s3_url
from .test_s3_jobs import s3_cli

pytestmark = pytest.mark.xdist_group("s3")

ROUNDS = int(os.environ.get("BLOCKERA_STRESS_ROUNDS", "3"))
WRITERS = 4
CHUNK = 64 * KiB
POOL = [random.Random(1000 + i).randbytes(CHUNK) for i in range(48)]
"""Chunks every host's images draw from (an operating system's files, say)."""
REFUSED = "cannot take"
"""What a command says when another process's lock is in its way."""


def random_image(rnd: random.Random) -> bytes:
    """16 to 32 chunks: mostly from the pool, some zero, some found nowhere else."""
    out = []
    for _ in range(rnd.randint(16, 32)):
        kind = rnd.random()
        if kind < 0.6:
            out.append(rnd.choice(POOL))
        elif kind < 0.7:
            out.append(bytes(CHUNK))
        else:
            out.append(rnd.randbytes(CHUNK))
    return b"".join(out)


class Hash:
    def __init__(self) -> None:
        self.h = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.h.update(data)
        return len(data)

    def flush(self) -> None:
        pass


def image_digests(url: str) -> dict[str, str]:
    """Every listed snapshot's image, restored (in this process) and hashed."""
    repo = Repository.open(make_backend(url), PASSWORD)
    try:
        out = {}
        for s in repo.list_snapshots():
            _, node = find_file_node(repo, s)
            layout = content_layout(repo, node, DeviceFacts.from_tags(s.tags), "test")
            sink = Hash()
            dump_to_stream(repo, layout, sink)  # type: ignore[arg-type]
            assert s.id is not None
            out[s.id.hex()] = sink.h.hexdigest()
        return out
    finally:
        repo.close()


def stored_copies(url: str) -> Counter[bytes]:
    """How many index entries each data blob has."""
    repo = Repository.open(make_backend(url), PASSWORD)
    try:
        view = load_index_view(repo, strict=True)
    finally:
        repo.close()
    counts: Counter[bytes] = Counter()
    for p in view.packs.values():
        for raw in np.ascontiguousarray(p.ids[p.types == 0]):
            counts[raw.tobytes()] += 1
    return counts


class Fleet:
    """The writers' images and what the repository should hold."""

    def __init__(self, cli: Cli, root: Path) -> None:
        self.cli = cli
        self.root = root
        self.expected: dict[str, str] = {}           # snapshot ID -> image digest
        self.outcomes: Counter[str] = Counter()

    def start(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "blockera", *args, "--json"],
                                env=self.cli.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)

    def finish(self, what: str, proc: subprocess.Popen) -> dict | None:
        out, err = proc.communicate(timeout=300)
        if proc.returncode == 0:
            self.outcomes[f"{what} ok"] += 1
            return json.loads(out)
        text = err.decode(errors="replace")
        assert proc.returncode == 1 and REFUSED in text, f"{what} exited " \
            f"{proc.returncode}:\n{text}"
        self.outcomes[f"{what} refused"] += 1
        return None


def _names(url: str, ftype: FileType) -> set[str]:
    be = make_backend(url)
    try:
        return {fi.name for fi in be.list(ftype)}
    finally:
        be.close()


def test_four_writers_and_a_prune_over_random_rounds(radosgw: RadosGW, bucket: str,
                                                     tmp_path: Path) -> None:
    need_restic()
    url = s3_url(radosgw, bucket, "fleet")
    Repository.init(make_backend(url), PASSWORD, kdf_params=FAST_KDF).close()
    cli = s3_cli(url, tmp_path)
    restic = ResticS3(url)
    fleet = Fleet(cli, tmp_path)

    # the shared chunks (and the zero chunk) reach the repository first
    seed = tmp_path / "seed.img"
    seed.write_bytes(b"".join(POOL) + bytes(CHUNK))
    s = cli.backup(seed, "--chunk-size", "64K", "--host", "seed")
    fleet.expected[s["snapshot_id"]] = hashlib.sha256(seed.read_bytes()).hexdigest()

    # a writer killed while it holds its lock, after one pack is written
    doomed = tmp_path / "doomed.img"
    doomed.write_bytes(random.Random(7).randbytes(24 * MiB))
    packs = _names(url, FileType.PACK)
    proc = fleet.start("backup", str(doomed), "--host", "doomed", "--limit-upload", "4096")
    deadline = time.monotonic() + 60
    while _names(url, FileType.PACK) == packs or not _names(url, FileType.LOCK):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    before = {k for k in stored_copies(url)}
    r = cli.run("prune", check=False)
    assert r.returncode == 1 and "Wait for that process" in r.stderr.decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    r = cli.run("prune", check=False)
    assert r.returncode == 1 and "stale" in r.stderr.decode()
    r = cli.run("backup", str(seed), "--host", "seed", "--json")  # shared locks coexist
    fleet.expected[json.loads(r.stdout)["snapshot_id"]] = fleet.expected[s["snapshot_id"]]
    restic.run("unlock")
    assert not _names(url, FileType.LOCK)
    pruned = cli.json("prune")
    assert pruned["unindexed_packs"] >= 1               # the dead writer's pack
    assert set(stored_copies(url)) == before
    assert "no errors were found" in restic.run("check").stdout.decode()

    pool_ids = {hash_id(c) for c in POOL} | {hash_id(bytes(CHUNK))}
    for rnd_no in range(ROUNDS):
        rnd = random.Random(rnd_no)
        running: list[tuple[str, subprocess.Popen, str | None]] = []
        for w in range(WRITERS):
            op = rnd.random()
            if op < 0.7:
                image = random_image(rnd)
                path = tmp_path / f"h{w}.img"
                path.write_bytes(image)
                running.append(("backup", fleet.start("backup", str(path), "--host", f"h{w}",
                                                      "--chunk-size", "64K"),
                                hashlib.sha256(image).hexdigest()))
            elif op < 0.9:
                extra = ["--prune"] if rnd.random() < 0.5 else []
                running.append(("forget", fleet.start("forget", "--host", f"h{w}",
                                                      "--keep-last", "2", *extra), None))
        time.sleep(rnd.uniform(0, 1.5))
        running.append(("prune", fleet.start("prune", "--max-unused",
                                             rnd.choice(["0", "5%"])), None))
        for what, p, digest in running:
            doc = fleet.finish(what, p)
            if doc is None:
                continue
            if what == "backup":
                fleet.expected[doc["snapshot_id"]] = digest  # type: ignore[assignment]
            elif what == "forget":
                for sid in doc["removed"]:
                    del fleet.expected[sid]
        if len(fleet.expected) > 16:   # housekeeping, alone, keeps the rounds equally long
            for sid in cli.json("forget", "--keep-last", "2")["removed"]:  # type: ignore[index]
                del fleet.expected[sid]
        last = rnd_no == ROUNDS - 1
        args = ["check", "--read-data"] if rnd_no % 10 == 0 or last else ["check"]
        assert "no errors were found" in restic.run(*args).stdout.decode(), rnd_no
        assert image_digests(url) == fleet.expected, rnd_no
        copies = stored_copies(url)
        assert all(copies[i] == 1 for i in pool_ids), rnd_no
        print(f"round {rnd_no + 1}/{ROUNDS} passed: {len(fleet.expected)} snapshots, "
              f"{len(copies)} data blobs, {dict(sorted(fleet.outcomes.items()))}", flush=True)

    # alone, prune (max-unused 0) leaves every blob stored once
    cli.json("prune", "--max-unused", "0")
    assert set(stored_copies(url).values()) == {1}
    assert image_digests(url) == fleet.expected
    assert "no errors were found" in restic.run("check", "--read-data").stdout.decode()
    assert fleet.outcomes["backup ok"] > 0
    print(f"{ROUNDS} rounds: {dict(sorted(fleet.outcomes.items()))}, "
          f"{len(fleet.expected)} snapshots at the end")
