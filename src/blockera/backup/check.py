"""`blockera check`: restic's checks that matter, and what damage means for each snapshot
(docs/backup-repository.md §18).

1. Every index file loads; a pack listed by several index files and a pack mixing tree and
   data blobs are notes (restic calls them non-critical), gaps or overlaps in a pack's
   entries are errors.
2. Every pack the index lists exists with the size its entries imply; packs no index lists
   are notes (an interrupted backup leaves them; prune removes them).
3. Every pack's header (read from the end of the pack) lists exactly the blobs the index
   says, at the same offsets and lengths.
4. Every snapshot loads, every tree it reaches is indexed and loads, and every data blob of
   every file is indexed.
5. With `read_data`: every pack is read whole and must hash to its name, and every blob in it
   must verify (MAC, decompression, blob ID).

A blob is damaged when every stored copy of it is missing, unlisted by its pack's header, in a
pack of the wrong size, or fails to verify. Damage is reported per snapshot and file as byte
ranges of the image, merged; a damaged tree makes the files beneath it unreadable as a whole.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from blockera.backup.backend import FileType
from blockera.backup.compression import decompress
from blockera.backup.crypto import EXTENSION_BYTES
from blockera.backup.device_layout import DeviceFacts
from blockera.backup.errors import BackendNotFoundError, RepositoryError
from blockera.backup.ids import ID_BYTES, BlobType, is_id_hex, short
from blockera.backup.index_view import IndexView, PackEntries, load_index_view
from blockera.backup.node import Node
from blockera.backup.pack import parse_pack_tail
from blockera.backup.repository import Repository
from blockera.backup.snapshots import Snapshot

_CODE = {BlobType.DATA: 0, BlobType.TREE: 1}
_PACK_TAIL_BYTES = 64 << 10


@dataclass
class FileDamage:
    snapshot_id: str
    time: str
    hostname: str
    paths: list[str]
    file: str
    ranges: list[list[int]] = field(default_factory=list)
    """[begin, end) byte ranges of the file's image; an end of -1: to the end of the file."""
    reasons: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, object]:
        return {"snapshot": self.snapshot_id, "time": self.time, "hostname": self.hostname,
                "paths": self.paths, "file": self.file, "ranges": self.ranges,
                "reasons": self.reasons}

    def describe(self) -> str:
        spans = ", ".join(f"[{b}, {'end' if e < 0 else e})" for b, e in self.ranges[:8])
        more = f" and {len(self.ranges) - 8} more" if len(self.ranges) > 8 else ""
        return (f"snapshot {self.snapshot_id[:8]} ({', '.join(self.paths)} on {self.hostname}, "
                f"{self.time}): {self.file} bytes {spans}{more}")


@dataclass
class CheckReport:
    read_data: bool
    snapshots: int = 0
    index_files: int = 0
    packs: int = 0
    blobs: int = 0
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    damage: list[FileDamage] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors and not self.damage

    def as_json(self) -> dict[str, object]:
        return {"ok": self.ok, "read_data": self.read_data, "snapshots": self.snapshots,
                "index_files": self.index_files, "packs": self.packs, "blobs": self.blobs,
                "errors": self.errors, "notes": self.notes,
                "damage": [d.as_json() for d in self.damage]}


class _Damage:
    """Damaged copies of blobs, and which blobs have no intact copy left."""

    def __init__(self, view: IndexView) -> None:
        self.view = view
        self.bad: dict[tuple[int, bytes], dict[bytes, str]] = {}   # blob -> pack -> reason
        self._mutex = threading.Lock()

    def mark(self, code: int, blob_id: bytes, pack_id: bytes, reason: str) -> None:
        with self._mutex:
            self.bad.setdefault((code, blob_id), {}).setdefault(pack_id, reason)

    def mark_pack(self, pack: PackEntries, reason: str) -> None:
        ids = pack.ids.tobytes()
        for k, code in enumerate(pack.types.tolist()):
            self.mark(code, ids[k * ID_BYTES:(k + 1) * ID_BYTES], pack.pack_id, reason)

    def lost(self) -> dict[tuple[int, bytes], str]:
        """Blobs every copy of which is damaged, with a reason."""
        if not self.bad:
            return {}
        copies: dict[tuple[int, bytes], int] = {key: 0 for key in self.bad}
        for pack in self.view.packs.values():
            ids = pack.ids.tobytes()
            for k, code in enumerate(pack.types.tolist()):
                key = (code, ids[k * ID_BYTES:(k + 1) * ID_BYTES])
                if key in copies:
                    copies[key] += 1
        return {key: "; ".join(f"{reason} (pack {short(p)})" for p, reason in packs.items())
                for key, packs in self.bad.items() if len(packs) >= copies[key]}


def _compare_header(pack: PackEntries, header: list, damage: _Damage) -> list[str]:
    """Differences between a pack's header entries and its index entries."""
    indexed = {(int(t), pack.ids[k].tobytes(), int(o), int(n), int(u))
               for k, (t, o, n, u) in enumerate(zip(pack.types, pack.offsets, pack.lengths,
                                                    pack.ulengths))}
    found = {(_CODE[e.blob_type], e.blob_id, e.offset_bytes, e.length_bytes,
              e.uncompressed_length_bytes) for e in header}
    problems = []
    for code, blob_id, offset, length, _ in sorted(indexed - found):
        damage.mark(code, blob_id, pack.pack_id, "not in its pack's header as the index says")
        problems.append(f"{'tree' if code else 'data'} blob {short(blob_id)} at offset "
                        f"{offset} (+{length}) is not in the header as the index says")
    for code, blob_id, offset, length, _ in sorted(found - indexed):
        problems.append(f"the header lists {'tree' if code else 'data'} blob "
                        f"{short(blob_id)} at offset {offset} (+{length}), the index does not")
    return problems


def _read_pack(repo: Repository, pack: PackEntries, size_bytes: int,
               damage: _Damage) -> list[str]:
    """Read a whole pack and verify it (read-data); problems found."""
    name = pack.pack_id.hex()
    what = f"pack {short(pack.pack_id)}"
    try:
        data = repo.backend.load(FileType.PACK, name)
    except RepositoryError as exc:
        damage.mark_pack(pack, f"cannot be read: {exc}")
        return [f"{what} cannot be read: {exc}"]
    problems = []
    if hashlib.sha256(data).hexdigest() != name:
        problems.append(f"{what}: its content does not hash to its name (the file is damaged)")
    try:
        header = parse_pack_tail(repo.key, data, len(data), f"{what} of {repo.location}")
        assert not isinstance(header, int)
        problems += [f"{what}: {p}" for p in _compare_header(pack, header, damage)]
    except RepositoryError as exc:
        problems.append(f"{what}: the header cannot be read: {exc}")
    ids = pack.ids.tobytes()
    for k, (code, offset, length, ulength) in enumerate(zip(
            pack.types.tolist(), pack.offsets.tolist(), pack.lengths.tolist(),
            pack.ulengths.tolist())):
        blob_id = ids[k * ID_BYTES:(k + 1) * ID_BYTES]
        blob_what = f"{'tree' if code else 'data'} blob {short(blob_id)} in {what}"
        try:
            if offset + length > len(data):
                raise RepositoryError(f"{blob_what}: beyond the end of the pack")
            plain = repo.key.decrypt(memoryview(data)[offset:offset + length], blob_what)
            if ulength:
                plain = decompress(plain, ulength, blob_what, expected_bytes=ulength)
            if hashlib.sha256(plain).digest() != blob_id:
                raise RepositoryError(f"{blob_what}: the content does not match the blob ID")
        except RepositoryError as exc:
            damage.mark(code, blob_id, pack.pack_id, str(exc).split(": ", 1)[-1])
            problems.append(str(exc))
    return problems


def _ranges_of(node: Node, facts: DeviceFacts | None, lost: dict[tuple[int, bytes], str],
               indexed_length: Callable[[bytes], int | None]) -> tuple[list[list[int]], list[str]]:
    """Byte ranges of a file's image held by lost blobs (merged)."""
    content = node.content or []
    ranges: list[list[int]] = []
    reasons: list[str] = []
    uniform = facts.chunk_bytes if facts is not None and \
        -(-node.size // facts.chunk_bytes) == len(content) else None
    offset: int | None = 0
    for i, blob_id in enumerate(content):
        length = uniform if uniform else indexed_length(blob_id)
        begin = i * uniform if uniform else offset
        end: int | None
        if begin is None:
            end = None
        elif length is None:
            end = None
        else:
            end = min(begin + length, node.size)
        reason = lost.get((0, blob_id))
        if reason is not None and begin is not None:
            stop = -1 if end is None else end
            if ranges and ranges[-1][1] == begin:
                ranges[-1][1] = stop
            elif not ranges or ranges[-1][1] != -1:
                ranges.append([begin, stop])
            text = f"data blob {short(blob_id)}: {reason}"
            if text not in reasons:
                reasons.append(text)
        offset = end
    return ranges, reasons


def check_repository(repo: Repository, *, read_data: bool = False, threads: int = 2,
                     on_progress: Callable[[int], None] | None = None,
                     on_total: Callable[[int], None] | None = None) -> CheckReport:
    """Run the checks (the caller holds a lock). See the module docstring."""
    report = CheckReport(read_data)
    snapshot_names = sorted(fi.name for fi in repo.backend.list(FileType.SNAPSHOT)
                            if is_id_hex(fi.name))
    view = load_index_view(repo, strict=False)
    report.errors += view.errors
    report.index_files = len(view.index_files)
    report.packs = len(view.packs)
    report.blobs = view.blob_count()
    damage = _Damage(view)

    for pack in view.packs.values():
        if len(pack.index_files) > 1:
            report.notes.append(f"pack {short(pack.pack_id)} is listed by "
                                f"{len(pack.index_files)} index files (non-critical)")
        if pack.blob_type() is None and len(pack):
            report.notes.append(f"pack {short(pack.pack_id)} mixes tree and data blobs "
                                "(non-critical)")
        if pack.gaps_or_overlaps():
            report.errors.append(f"pack {short(pack.pack_id)}: its index entries leave gaps or "
                                 "overlap")

    stored = {fi.name: fi.size_bytes for fi in repo.backend.list(FileType.PACK)
              if is_id_hex(fi.name)}
    present: list[tuple[PackEntries, int]] = []
    for pack_id, pack in view.packs.items():
        size = stored.pop(pack_id.hex(), None)
        if size is None:
            report.errors.append(f"pack {short(pack_id)} is missing ({len(pack)} blobs)")
            damage.mark_pack(pack, "its pack is missing")
            continue
        if size != pack.size_bytes():
            report.errors.append(f"pack {short(pack_id)} is {size} bytes, the index implies "
                                 f"{pack.size_bytes()}")
            damage.mark_pack(pack, "its pack has the wrong size")
            continue
        present.append((pack, size))
    for name in sorted(stored):
        report.notes.append(f"pack {name[:8]} is in no index (left by an interrupted backup; "
                            "prune removes it)")

    if on_total is not None:
        on_total(sum(size for _, size in present) if read_data else len(present))
    if read_data:
        with ThreadPoolExecutor(max(1, threads), "check") as pool:
            for (pack, size), problems in zip(present, pool.map(
                    lambda ps: _read_pack(repo, ps[0], ps[1], damage), present)):
                report.errors += problems
                if on_progress is not None:
                    on_progress(size)
    else:
        for pack, size in present:
            what = f"pack {short(pack.pack_id)}"
            try:
                header = repo.list_pack(pack.pack_id)
                problems = [f"{what}: {p}" for p in _compare_header(pack, header, damage)]
            except RepositoryError as exc:
                damage.mark_pack(pack, f"its header cannot be read ({exc})")
                problems = [f"{what}: the header cannot be read: {exc}"]
            report.errors += problems
            if on_progress is not None:
                on_progress(1)

    lost = damage.lost()
    data_ids = view.all_ids(BlobType.DATA)
    tree_ids = view.all_ids(BlobType.TREE)

    def indexed_length(blob_id: bytes) -> int | None:
        found = repo.index.lookup(blob_id, BlobType.DATA)
        if found is None:
            return None
        return found.uncompressed_length_bytes or found.length_bytes - EXTENSION_BYTES

    for name in snapshot_names:
        try:
            snapshot = repo.load_snapshot(bytes.fromhex(name))
        except BackendNotFoundError:
            continue
        except RepositoryError as exc:
            report.errors.append(f"snapshot {name[:8]} cannot be loaded: {exc}")
            continue
        report.snapshots += 1
        facts = DeviceFacts.from_tags(snapshot.tags)
        _check_tree(repo, snapshot, facts, snapshot.tree, "", data_ids, tree_ids, lost,
                    indexed_length, report)
    return report


def _damage_entry(report: CheckReport, snapshot: Snapshot, path: str) -> FileDamage:
    entry = FileDamage(snapshot.id.hex() if snapshot.id else "", snapshot.time.format(),
                       snapshot.hostname, snapshot.paths, path or "/")
    report.damage.append(entry)
    return entry


def _check_tree(repo: Repository, snapshot: Snapshot, facts: DeviceFacts | None,
                tree_id: bytes, path: str, data_ids: np.ndarray, tree_ids: np.ndarray,
                lost: dict[tuple[int, bytes], str],
                indexed_length: Callable[[bytes], int | None], report: CheckReport) -> None:
    sid = snapshot.short_id
    key = np.frombuffer(tree_id, dtype="S32")
    if not np.isin(key, tree_ids)[0]:
        report.errors.append(f"snapshot {sid}: tree {short(tree_id)} ({path or '/'}) is in no "
                             "index")
        _damage_entry(report, snapshot, path).reasons.append(
            f"tree {short(tree_id)} is missing: everything under {path or '/'} is lost")
        return
    if (1, tree_id) in lost:
        report.errors.append(f"snapshot {sid}: tree {short(tree_id)} ({path or '/'}) is "
                             f"damaged: {lost[(1, tree_id)]}")
        _damage_entry(report, snapshot, path).reasons.append(
            f"tree {short(tree_id)} is damaged: everything under {path or '/'} is lost")
        return
    try:
        tree = repo.load_tree(tree_id)
    except RepositoryError as exc:
        report.errors.append(f"snapshot {sid}: tree {short(tree_id)} ({path or '/'}) cannot "
                             f"be loaded: {exc}")
        _damage_entry(report, snapshot, path).reasons.append(
            f"tree {short(tree_id)} cannot be loaded: everything under {path or '/'} is lost")
        return
    for node in tree.nodes:
        node_path = f"{path}/{node.name}"
        if node.type == "dir":
            if node.subtree is None:
                report.errors.append(f"snapshot {sid}: directory {node_path} has no subtree")
                continue
            _check_tree(repo, snapshot, facts, node.subtree, node_path, data_ids, tree_ids,
                        lost, indexed_length, report)
        elif node.type == "file":
            if node.content is None:
                report.errors.append(f"snapshot {sid}: file {node_path} has no content list")
                continue
            if not node.content:
                continue
            content = np.frombuffer(b"".join(node.content), dtype="S32")
            missing = ~np.isin(content, data_ids)
            file_lost = dict(lost)
            if missing.any():
                for k in np.flatnonzero(missing).tolist():
                    file_lost[(0, node.content[k])] = "in no index"
                report.errors.append(f"snapshot {sid}: file {node_path}: "
                                     f"{int(missing.sum())} data blobs are in no index")
            if not any((0, b) in file_lost for b in set(node.content)):
                continue
            ranges, reasons = _ranges_of(node, facts if len(tree.nodes) == 1 and not path
                                         else None, file_lost, indexed_length)
            entry = _damage_entry(report, snapshot, node_path)
            entry.ranges, entry.reasons = ranges, reasons
        elif node.type not in ("symlink", "socket", "chardev", "dev", "fifo", "irregular"):
            report.errors.append(f"snapshot {sid}: {node_path} has the invalid type "
                                 f"{node.type!r}")
