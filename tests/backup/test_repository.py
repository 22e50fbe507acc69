"""The repository on its own: deduplication, compression choice, packs, index files, write
order, threads, bounded memory, and clear errors (with nothing written) for a wrong password,
a missing repository and damaged files."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from blockera.backup import (BackendError, BlobNotFoundError, BlobType, FileType, IntegrityError,
                             LocalBackend, Node, NotARepositoryError, Repository,
                             RepositoryError, Snapshot, Tree, WrongPasswordError)
from blockera.backup import repository as repository_module
from blockera.backup.ids import hash_id
from blockera.backup.index import IndexFile

from .helpers import (FAST_KDF, PASSWORD, MiB, compressible_bytes, image_chunks, new_repo,
                      random_bytes, tree_listing)


def _index_files(repo: Repository) -> list[IndexFile]:
    return [IndexFile.decode(repo.load_unpacked(FileType.INDEX, fi.name), fi.name)
            for fi in repo.backend.list(FileType.INDEX)]


def _backup(repo: Repository, chunks: list[bytes], name: str = "disk.img") -> bytes:
    with repo.lock(recheck_delay_s=0.01):
        ids = [repo.save_blob(BlobType.DATA, c) for c in chunks]
        root = repo.save_tree(Tree([Node.file(name, sum(map(len, chunks)), ids)]))
        return repo.save_snapshot(Snapshot.new(root, ["/dev/vda"]))


def _restore(repo: Repository, snapshot_id: bytes, name: str = "disk.img") -> bytes:
    tree = repo.load_tree(repo.load_snapshot(snapshot_id).tree)
    node = tree.find(name)
    assert node is not None and node.content is not None
    return b"".join(repo.load_blob(i) for i in node.content)


@pytest.mark.parametrize("threads", [0, 2])
def test_round_trip_dedup_and_compression_choice(tmp_path: Path, threads: int) -> None:
    repo = new_repo(tmp_path / "repo", threads=threads)
    chunks = image_chunks(seed=3)
    chunks += [chunks[0], chunks[2]]                    # repeats inside one batch
    sid = _backup(repo, chunks)
    repo.close()
    repo = Repository.open(LocalBackend(tmp_path / "repo"), PASSWORD)
    assert _restore(repo, sid) == b"".join(chunks)
    entries = {e.blob_id: e for f in _index_files(repo) for _, es in f.packs for e in es}
    data = {k: v for k, v in entries.items() if v.blob_type is BlobType.DATA}
    assert len(data) == 5                               # 6 distinct chunks, two of them zero
    zero, rnd, text = hash_id(bytes(MiB)), hash_id(chunks[2]), hash_id(chunks[0])
    assert data[zero].compressed and data[zero].length_bytes < 1000
    assert not data[rnd].compressed and data[rnd].length_bytes == MiB + 32
    assert data[text].compressed and data[text].length_bytes < MiB // 2
    repo.close()


def test_known_blobs_are_not_stored_again(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo")
    chunks = image_chunks(seed=4)
    _backup(repo, chunks)
    packs_before = {fi.name for fi in repo.backend.list(FileType.PACK)}
    changed = list(chunks)
    changed[3] = random_bytes(MiB, 99)
    _backup(repo, changed)
    new_packs = {fi.name for fi in repo.backend.list(FileType.PACK)} - packs_before
    new_entries = [e for name in new_packs for e in repo.list_pack(bytes.fromhex(name))]
    assert sorted(e.blob_type.value for e in new_entries) == ["data", "tree"]
    assert [e.blob_id for e in new_entries if e.blob_type is BlobType.DATA] == \
        [hash_id(changed[3])]
    repo.close()


def test_packs_are_cut_at_the_target_and_never_mix_types(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo", pack_size_bytes=2 * MiB)
    chunks = [random_bytes(MiB, i) for i in range(7)]
    _backup(repo, chunks)
    kinds = []
    for fi in repo.backend.list(FileType.PACK):
        entries = repo.list_pack(bytes.fromhex(fi.name))
        types = {e.blob_type for e in entries}
        assert len(types) == 1
        kinds.append((types.pop(), len(entries)))
    assert sorted(n for t, n in kinds if t is BlobType.DATA) == [1, 2, 2, 2]
    assert [n for t, n in kinds if t is BlobType.TREE] == [1]
    repo.close()


def test_index_files_are_split_and_keep_packs_whole(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo", pack_size_bytes=2000, index_max_blobs=5)
    chunks = [random_bytes(700, i) for i in range(20)]
    sid = _backup(repo, chunks)
    files = _index_files(repo)
    assert len(files) >= 4 and all(f.blob_count <= 5 for f in files)
    packs = [p for f in files for p, _ in f.packs]
    assert len(packs) == len(set(packs)) == len(list(repo.backend.list(FileType.PACK)))
    repo.close()
    assert _restore(Repository.open(LocalBackend(tmp_path / "repo"), PASSWORD), sid) == \
        b"".join(chunks)


class RecordingBackend(LocalBackend):
    """Remembers the order of saves, and can be told to fail or slow down."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.saved: list[tuple[FileType, str]] = []
        self.fail_on: FileType | None = None
        self.delay_s = 0.0

    def save(self, ftype: FileType, name: str, data: bytes) -> None:  # type: ignore[override]
        if ftype is self.fail_on:
            raise BackendError(f"{self.location}: injected failure writing {ftype.value}")
        time.sleep(self.delay_s if ftype is FileType.PACK else 0)
        super().save(ftype, name, data)
        self.saved.append((ftype, name))


def test_write_order_packs_then_index_then_snapshot(tmp_path: Path) -> None:
    backend = RecordingBackend(tmp_path / "repo")
    repo = Repository.init(backend, PASSWORD, kdf_params=FAST_KDF, pack_size_bytes=MiB,
                           index_max_blobs=3)
    chunks = [random_bytes(MiB // 2, i) for i in range(9)]
    backend.saved.clear()
    _backup(repo, chunks)
    order = [t for t, _ in backend.saved if t is not FileType.LOCK]
    assert order[-1] is FileType.SNAPSHOT and order.count(FileType.SNAPSHOT) == 1
    saved_packs: set[str] = set()
    for ftype, name in backend.saved:
        if ftype is FileType.PACK:
            saved_packs.add(name)
        elif ftype is FileType.INDEX:     # an index only ever names packs already written
            f = IndexFile.decode(repo.load_unpacked(FileType.INDEX, name), name)
            assert {p.hex() for p, _ in f.packs} <= saved_packs
    # with 3 blobs per index file, index files were written during the backup already
    first_index = order.index(FileType.INDEX)
    assert FileType.PACK in order[first_index:]
    repo.close()


def test_a_failed_pack_write_stops_everything(tmp_path: Path) -> None:
    backend = RecordingBackend(tmp_path / "repo")
    repo = Repository.init(backend, PASSWORD, kdf_params=FAST_KDF, pack_size_bytes=MiB)
    backend.fail_on = FileType.PACK
    with repo.lock(recheck_delay_s=0.01):
        with pytest.raises(BackendError, match="injected failure"):
            for i in range(8):
                repo.save_blob(BlobType.DATA, random_bytes(MiB, i))
            repo.flush()
        with pytest.raises(BackendError):
            repo.save_snapshot(Snapshot.new(b"\x00" * 32, ["/x"]))
    assert list(backend.list(FileType.INDEX)) == [] and list(backend.list(FileType.SNAPSHOT)) == []
    repo.close()


def test_memory_is_bounded_by_blobs_in_flight(tmp_path: Path, monkeypatch) -> None:
    repo = new_repo(tmp_path / "repo", threads=2, max_in_flight=3)
    seen = []
    real = repository_module.compress

    def slow_compress(data: bytes) -> bytes:
        seen.append(len(repo._futures))
        time.sleep(0.01)
        return real(data)

    monkeypatch.setattr(repository_module, "compress", slow_compress)
    chunks = [compressible_bytes(64 << 10, i) for i in range(40)]
    sid = _backup(repo, chunks)
    assert len(seen) == 41 and max(seen) <= 3           # 40 data blobs and the tree
    assert _restore(repo, sid) == b"".join(chunks)
    repo.close()


def test_loading_a_blob_not_yet_flushed(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo")
    with repo.lock(recheck_delay_s=0.01):
        blob_id = repo.save_blob(BlobType.DATA, b"pending bytes")
        assert repo.has_blob(blob_id, BlobType.DATA)
        assert repo.load_blob(blob_id) == b"pending bytes"
        with pytest.raises(BlobNotFoundError):
            repo.load_blob(blob_id, BlobType.TREE)
        repo.flush()
    repo.close()


def test_snapshot_needs_its_tree(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo")
    with repo.lock(recheck_delay_s=0.01):
        with pytest.raises(RepositoryError, match="save the tree first"):
            repo.save_snapshot(Snapshot.new(b"\x01" * 32, ["/dev/vda"]))
    assert list(repo.backend.list(FileType.SNAPSHOT)) == []
    repo.close()


def test_keys_can_be_added_and_listed(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo")
    name = repo.add_key("second password", kdf_params=FAST_KDF, username="bob", hostname="h2")
    keys = {k.name: k for k in repo.list_keys()}
    assert set(keys) == {repo.key_name, name} and keys[name].username == "bob"
    other = Repository.open(LocalBackend(tmp_path / "repo"), "second password")
    assert other.key == repo.key and other.key_name == name
    repo.close()
    other.close()


def test_version_1_repository_stores_nothing_compressed(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo", version=1)
    sid = _backup(repo, image_chunks(seed=8))
    raw = repo.key.decrypt(repo.backend.load(FileType.SNAPSHOT, sid.hex()), "s")
    assert raw.startswith(b'{"time":')
    assert not any(e.compressed for f in _index_files(repo) for _, es in f.packs for e in es)
    repo.close()


# -- errors: clear exceptions, nothing written ---------------------------------------------

def test_wrong_password(tmp_path: Path) -> None:
    new_repo(tmp_path / "repo").close()
    before = tree_listing(tmp_path)
    with pytest.raises(WrongPasswordError, match="wrong password") as info:
        Repository.open(LocalBackend(tmp_path / "repo"), "not the password")
    assert str(tmp_path / "repo") in str(info.value) and info.value.exit_code == 1
    assert tree_listing(tmp_path) == before


@pytest.mark.parametrize("kind", ["missing", "empty dir", "regular file", "other files"])
def test_not_a_repository(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "target"
    if kind == "empty dir":
        target.mkdir()
    elif kind == "regular file":
        target.write_bytes(b"just a file")
    elif kind == "other files":
        target.mkdir()
        (target / "notes.txt").write_text("hello")
    before = tree_listing(tmp_path)
    with pytest.raises(NotARepositoryError, match="not a repository") as info:
        Repository.open(LocalBackend(target), PASSWORD)
    assert info.value.exit_code == 1
    assert tree_listing(tmp_path) == before


def _flip(path: Path, offset: int) -> None:
    path.chmod(0o600)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x04
    path.write_bytes(bytes(data))
    path.chmod(0o400)


@pytest.fixture
def written(tmp_path: Path) -> tuple[Path, bytes, list[bytes]]:
    repo = new_repo(tmp_path / "repo")
    chunks = image_chunks(seed=5)
    sid = _backup(repo, chunks)
    repo.close()
    return tmp_path / "repo", sid, chunks


def test_flipped_bit_in_a_pack(written) -> None:
    root, sid, chunks = written
    repo = Repository.open(LocalBackend(root), PASSWORD)
    target = repo.index.lookup(hash_id(chunks[2]), BlobType.DATA)
    _flip(root / "data" / target.pack_id.hex()[:2] / target.pack_id.hex(),
          target.offset_bytes + 1000)
    before = tree_listing(root)
    assert repo.load_blob(hash_id(chunks[0])) == chunks[0]      # other blobs still fine
    with pytest.raises(IntegrityError, match=r"data blob \w{8} in pack \w{8} .*MAC") as info:
        _restore(repo, sid)
    assert info.value.exit_code == 1
    assert tree_listing(root) == before
    repo.close()


def test_flipped_bit_in_an_index(written) -> None:
    root, sid, chunks = written
    index_file = next((root / "index").iterdir())
    _flip(index_file, 40)
    before = tree_listing(root)
    repo = Repository.open(LocalBackend(root), PASSWORD)
    with pytest.raises(IntegrityError, match=f"index {index_file.name[:8]} .*does not match"):
        repo.lock(recheck_delay_s=0.01)
    with pytest.raises(IntegrityError):
        repo.load_index()
    assert tree_listing(root) == before                   # the lock taken was removed again
    repo.close()


def test_flipped_bit_in_a_snapshot(written) -> None:
    root, sid, chunks = written
    _flip(root / "snapshots" / sid.hex(), 20)
    before = tree_listing(root)
    repo = Repository.open(LocalBackend(root), PASSWORD)
    with pytest.raises(IntegrityError, match=f"snapshot {sid.hex()[:8]}"):
        repo.list_snapshots()
    assert tree_listing(root) == before
    repo.close()


def test_damaged_content_with_a_matching_name_is_caught_by_the_mac(written) -> None:
    # A file rewritten under the name of its new content (so the name check passes):
    # the MAC catches it.
    root, sid, chunks = written
    path = root / "snapshots" / sid.hex()
    data = bytearray(path.read_bytes())
    data[20] ^= 1
    path.chmod(0o600)
    path.unlink()
    (root / "snapshots" / hash_id(bytes(data)).hex()).write_bytes(bytes(data))
    repo = Repository.open(LocalBackend(root), PASSWORD)
    with pytest.raises(IntegrityError, match="MAC verification failed"):
        repo.list_snapshots()
    repo.close()


def test_flipped_bit_in_the_config_and_key(written) -> None:
    root, _, _ = written
    _flip(root / "config", 30)
    with pytest.raises(IntegrityError, match="config .*damaged"):
        Repository.open(LocalBackend(root), PASSWORD)
    key_file = next((root / "keys").iterdir())
    _flip(key_file, 100)
    with pytest.raises(WrongPasswordError, match="could not be read"):
        Repository.open(LocalBackend(root), PASSWORD)


def test_concurrent_writers_in_one_process(tmp_path: Path) -> None:
    # Two threads saving through one repository object: every blob lands once.
    repo = new_repo(tmp_path / "repo")
    chunks = [random_bytes(256 << 10, i % 12) for i in range(48)]
    with repo.lock(recheck_delay_s=0.01):
        results: list[list[bytes]] = [[], []]

        def work(k: int) -> None:
            results[k] = [repo.save_blob(BlobType.DATA, c) for c in chunks[k::2]]

        workers = [threading.Thread(target=work, args=(k,)) for k in (0, 1)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        repo.flush()
    entries = [e for f in _index_files(repo) for _, es in f.packs for e in es]
    assert len(entries) == len({e.blob_id for e in entries}) == 12
    repo.close()


def test_index_written_when_packs_wait_too_long(tmp_path: Path, monkeypatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(repository_module.time, "monotonic", lambda: clock[0])
    repo = new_repo(tmp_path / "repo", pack_size_bytes=MiB, threads=0)
    with repo.lock(recheck_delay_s=0.01):
        repo.save_blob(BlobType.DATA, random_bytes(MiB, 1))       # a pack, not yet indexed
        assert list(repo.backend.list(FileType.INDEX)) == []
        clock[0] += 9 * 60
        repo.save_blob(BlobType.DATA, random_bytes(MiB, 2))
        assert list(repo.backend.list(FileType.INDEX)) == []
        clock[0] += 61
        repo.save_blob(BlobType.DATA, random_bytes(MiB, 3))       # 10 minutes: index now
        assert sum(f.blob_count for f in _index_files(repo)) == 3
        repo.flush()
    repo.close()


def test_an_interrupted_save_leaves_no_phantom_blob(tmp_path: Path) -> None:
    # A blob the workers never got must not count as stored (a later snapshot would point
    # at nothing).
    repo = new_repo(tmp_path / "repo", threads=1)
    real_slots = repo._slots

    class Interrupted:
        def acquire(self) -> None:
            raise KeyboardInterrupt

        def release(self) -> None:
            real_slots.release()

    with repo.lock(recheck_delay_s=0.01):
        repo._slots = Interrupted()
        with pytest.raises(KeyboardInterrupt):
            repo.save_blob(BlobType.DATA, b"never taken")
        repo._slots = real_slots
        assert not repo.has_blob(hash_id(b"never taken"), BlobType.DATA)
        blob_id = repo.save_blob(BlobType.DATA, b"never taken")
        repo.flush()
    assert repo.load_blob(blob_id) == b"never taken"
    repo.close()


def test_a_reader_sees_snapshots_written_after_it_loaded_the_index(tmp_path: Path) -> None:
    writer = new_repo(tmp_path / "repo")
    reader = Repository.open(LocalBackend(tmp_path / "repo"), PASSWORD)
    assert len(reader.index) == 0                      # index loaded, still empty
    sid = _backup(writer, image_chunks(seed=9))
    assert _restore(reader, sid) == b"".join(image_chunks(seed=9))
    with pytest.raises(BlobNotFoundError, match="not in the index"):
        reader.load_blob(b"\x07" * 32)
    writer.close()
    reader.close()
