"""`blockera prune`: remove the data no snapshot uses (docs/backup-repository.md §20).

Under an exclusive lock:

1. find every blob the snapshots use (walking all their trees); refuse to go on if one of them
   is in no index or a snapshot or tree cannot be read, since what it uses is then unknown;
2. classify each pack by its entries (all index files, duplicates included): wholly unused
   packs are deleted, wholly used ones kept, partly used ones repacked while the unused bytes
   left would exceed `--max-unused` (restic's rule and default, 5 % of the used bytes; tree
   and mixed packs, then small ones, then those with the highest share of unused bytes go
   first; `0` repacks every partly used pack); a blob stored twice counts as used once;
3. delete the packs no index lists (left by interrupted backups; nobody else writes while the
   exclusive lock is held);
4. repack: copy the used blobs of the packs to repack into new packs, each blob verified
   (MAC, decompression, ID) before its stored bytes are copied, so damage is never spread;
5. write new index files for every pack that stays (superseding all the old ones), and only
   then delete the old index files;
6. delete the unused and repacked packs, last.

A crash at any step leaves a repository restic accepts: before step 5 only unindexed packs
were added; during step 5 old and new index files overlap (non-critical for restic); from
step 6 on, no index lists a pack being deleted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from blockera.backup.backend import FileType
from blockera.backup.compression import decompress
from blockera.backup.errors import BackendNotFoundError, RepositoryError
from blockera.backup.ids import ID_BYTES, BlobType, hash_id, is_id_hex, short
from blockera.backup.index import split_into_files
from blockera.backup.index_view import IndexView, PackEntries, load_index_view
from blockera.backup.pack import PackBuilder, PackEntry
from blockera.backup.repository import Repository
from blockera.errors import UsageError
from blockera.units import parse_size_bytes

_TYPES = (BlobType.DATA, BlobType.TREE)


class PruneRefusedError(RepositoryError):
    """Pruning would risk deleting data a snapshot needs; nothing was changed."""

    exit_code = 1
    errno_name = "EILSEQ"


def max_unused_rule(text: str) -> Callable[[int], float]:
    """restic's --max-unused: `unlimited`, a percentage of the used bytes below 100 (`5%`), or
    a size (`0`, `100M`); returns used bytes -> unused bytes tolerated after pruning."""
    value = text.strip()
    if value == "unlimited":
        return lambda used: float("inf")
    if value.endswith("%"):
        try:
            p = float(value[:-1])
        except ValueError:
            raise UsageError(f"--max-unused {text!r}: not a percentage") from None
        if not 0 <= p < 100:
            raise UsageError("--max-unused: a percentage must be at least 0 and below 100")
        return lambda used: p / (100 - p) * used
    try:
        size = parse_size_bytes(value)
    except ValueError as exc:
        raise UsageError(f"--max-unused: {exc}") from None
    return lambda used: float(size)


@dataclass
class PackStats:
    pack: PackEntries
    used: np.ndarray               # bool per entry
    stored_bytes: int | None       # None: missing from the storage

    @property
    def used_bytes(self) -> int:
        return int(self.pack.lengths[self.used].sum())

    @property
    def unused_bytes(self) -> int:
        return int(self.pack.lengths[~self.used].sum())

    @property
    def total_bytes(self) -> int:
        return self.pack.size_bytes()


@dataclass
class PrunePlan:
    unindexed: list[str] = field(default_factory=list)
    remove: set[bytes] = field(default_factory=set)
    repack: set[bytes] = field(default_factory=set)
    forget_missing: set[bytes] = field(default_factory=set)
    keep: set[bytes] = field(default_factory=set)
    stats: dict[bytes, PackStats] = field(default_factory=dict)
    snapshots: int = 0
    used_blobs: int = 0
    used_bytes: int = 0
    unused_bytes: int = 0
    unindexed_bytes: int = 0

    def summary(self) -> dict[str, object]:
        removed = sum(self.stats[p].total_bytes for p in self.remove)
        repack_unused = sum(self.stats[p].unused_bytes for p in self.repack)
        return {"snapshots": self.snapshots, "used_blobs": self.used_blobs,
                "used_bytes": self.used_bytes, "unused_bytes": self.unused_bytes,
                "unindexed_packs": len(self.unindexed), "unindexed_bytes": self.unindexed_bytes,
                "packs_kept": len(self.keep), "packs_removed": len(self.remove),
                "packs_repacked": len(self.repack),
                "missing_packs_forgotten": len(self.forget_missing),
                "bytes_freed": removed + repack_unused + self.unindexed_bytes,
                "unused_bytes_after": self.unused_bytes - repack_unused
                - sum(self.stats[p].unused_bytes for p in self.remove)}


def used_blobs(repo: Repository) -> tuple[np.ndarray, set[bytes], int]:
    """(used data blob IDs as sorted unique S32, used tree IDs, snapshot count)."""
    names = sorted(fi.name for fi in repo.backend.list(FileType.SNAPSHOT) if is_id_hex(fi.name))
    trees: set[bytes] = set()
    data_parts: list[np.ndarray] = []
    count = 0
    for name in names:
        try:
            snapshot = repo.load_snapshot(bytes.fromhex(name))
        except BackendNotFoundError:
            continue
        except RepositoryError as exc:
            raise PruneRefusedError(f"snapshot {name[:8]} cannot be read ({exc}); refusing to "
                                    "prune, since the data it uses is unknown") from None
        count += 1
        stack = [snapshot.tree]
        while stack:
            tree_id = stack.pop()
            if tree_id in trees:
                continue
            try:
                tree = repo.load_tree(tree_id)
            except RepositoryError as exc:
                raise PruneRefusedError(f"tree {short(tree_id)} of snapshot {name[:8]} cannot "
                                        f"be read ({exc}); refusing to prune (run `blockera "
                                        "check`)") from None
            trees.add(tree_id)
            for node in tree.nodes:
                if node.type == "dir" and node.subtree is not None:
                    stack.append(node.subtree)
                elif node.type == "file" and node.content:
                    data_parts.append(np.frombuffer(b"".join(node.content), dtype="S32"))
    data = np.unique(np.concatenate(data_parts)) if data_parts else np.zeros(0, dtype="S32")
    return data, trees, count


def plan_prune(repo: Repository, view: IndexView, max_unused: str = "5%") -> PrunePlan:
    rule = max_unused_rule(max_unused)
    used_data, used_trees, snapshot_count = used_blobs(repo)
    plan = PrunePlan(snapshots=snapshot_count)
    tree_array = np.array(sorted(used_trees), dtype="S32") if used_trees else \
        np.zeros(0, dtype="S32")

    # which entries are used; a blob stored in several packs is used in one of them
    packs = list(view.packs.values())
    used_masks = []
    for pack in packs:
        ids = np.ascontiguousarray(pack.ids).view("S32").reshape(-1)
        used = np.where(pack.types == 0, np.isin(ids, used_data), np.isin(ids, tree_array))
        used_masks.append(used)
    keys_per_pack = [np.char.add(p.types.astype("S1"), np.ascontiguousarray(p.ids).view("S32")
                                 .reshape(-1)) if len(p) else np.zeros(0, dtype="S33")
                     for p in packs]
    all_used_keys = np.concatenate([k[m] for k, m in zip(keys_per_pack, used_masks)]) \
        if packs else np.zeros(0, dtype="S33")
    uniq, counts = np.unique(all_used_keys, return_counts=True)
    found_data = int((np.char.startswith(uniq, b"0")).sum()) if len(uniq) else 0
    found_trees = len(uniq) - found_data
    if found_data != len(used_data) or found_trees != len(used_trees):
        raise PruneRefusedError(
            f"{len(used_data) - found_data} data blobs and {len(used_trees) - found_trees} trees "
            "that snapshots use are in no index; refusing to prune (run `blockera check`)")
    duplicates = set(uniq[counts > 1].tolist())
    if duplicates:
        # keep the copy in the pack with the most other used blobs
        copies: dict[bytes, list[tuple[int, int, int]]] = {}
        for n, (keys, used) in enumerate(zip(keys_per_pack, used_masks)):
            for k in np.flatnonzero(used).tolist():
                if keys[k] in duplicates:
                    copies.setdefault(keys[k], []).append((int(used.sum()), n, k))
        for entries in copies.values():
            entries.sort(reverse=True)
            for _, n, k in entries[1:]:
                used_masks[n][k] = False

    stored = {fi.name: fi.size_bytes for fi in repo.backend.list(FileType.PACK)
              if is_id_hex(fi.name)}
    for pack, used in zip(packs, used_masks):
        stats = PackStats(pack, used, stored.pop(pack.pack_id.hex(), None))
        plan.stats[pack.pack_id] = stats
        plan.used_bytes += stats.used_bytes
        plan.used_blobs += int(used.sum())
        plan.unused_bytes += stats.unused_bytes
    plan.unindexed = sorted(stored)
    plan.unindexed_bytes = sum(stored.values())

    candidates = []
    target_bytes = repo.pack_size_bytes
    for pack_id, stats in plan.stats.items():
        any_used = bool(stats.used.any())
        if stats.stored_bytes is None:
            if any_used:
                raise PruneRefusedError(f"pack {short(pack_id)} holds blobs snapshots use but is "
                                        "missing; refusing to prune (run `blockera check`)")
            plan.forget_missing.add(pack_id)
        elif stats.stored_bytes != stats.total_bytes and any_used:
            raise PruneRefusedError(f"pack {short(pack_id)} is {stats.stored_bytes} bytes, its "
                                    f"index entries imply {stats.total_bytes}; refusing to prune "
                                    "(run `blockera check`)")
        elif not any_used:
            plan.remove.add(pack_id)
        elif stats.used.all() and stats.pack.blob_type() is not None:
            plan.keep.add(pack_id)
        else:
            candidates.append(stats)

    def order(s: PackStats) -> tuple:
        data = s.pack.blob_type() is BlobType.DATA
        small = s.total_bytes < target_bytes // 25
        return (data, not small, -(s.unused_bytes / max(1, s.total_bytes)))

    unused_left = plan.unused_bytes - sum(plan.stats[p].unused_bytes for p in plan.remove)
    allowed = rule(plan.used_bytes)
    for stats in sorted(candidates, key=order):
        data = stats.pack.blob_type() is BlobType.DATA
        if data and unused_left <= allowed and stats.total_bytes >= target_bytes // 25:
            plan.keep.add(stats.pack.pack_id)
            continue
        plan.repack.add(stats.pack.pack_id)
        unused_left -= stats.unused_bytes
    return plan


@dataclass
class PruneResult:
    plan: PrunePlan
    new_packs: int = 0
    index_files_written: int = 0
    index_files_removed: int = 0
    packs_deleted: int = 0

    def as_json(self) -> dict[str, object]:
        return {**self.plan.summary(), "new_packs": self.new_packs,
                "index_files_written": self.index_files_written,
                "index_files_removed": self.index_files_removed,
                "packs_deleted": self.packs_deleted}


def _repack(repo: Repository, plan: PrunePlan, check_lock: Callable[[], None]
            ) -> list[tuple[bytes, list[PackEntry]]]:
    """Copy the used blobs of the packs to repack into new packs (verified first)."""
    builders: dict[BlobType, PackBuilder] = {}
    written: list[tuple[bytes, list[PackEntry]]] = []
    copied: set[tuple[int, bytes]] = set()

    def write(builder: PackBuilder) -> None:
        check_lock()
        pack_id, data = builder.finish(repo.key)
        repo.backend.save(FileType.PACK, pack_id.hex(), data)
        written.append((pack_id, builder.entries))

    for pack_id in sorted(plan.repack):
        stats = plan.stats[pack_id]
        pack = stats.pack
        data = repo.backend.load(FileType.PACK, pack_id.hex())
        ids = pack.ids.tobytes()
        for k in np.flatnonzero(stats.used).tolist():
            code = int(pack.types[k])
            blob_id = ids[k * ID_BYTES:(k + 1) * ID_BYTES]
            if (code, blob_id) in copied:
                continue
            offset, length, ulength = (int(pack.offsets[k]), int(pack.lengths[k]),
                                       int(pack.ulengths[k]))
            stored = bytes(data[offset:offset + length])
            what = f"{_TYPES[code].value} blob {short(blob_id)} in pack {short(pack_id)}"
            if len(stored) != length:
                raise PruneRefusedError(f"{what} is truncated; refusing to repack it")
            try:
                plain = repo.key.decrypt(stored, what)
                if ulength:
                    plain = decompress(plain, ulength, what, expected_bytes=ulength)
            except RepositoryError as exc:
                raise PruneRefusedError(f"{exc}; refusing to repack a damaged blob (nothing "
                                        "was deleted; run `blockera check --read-data`)") from None
            if hash_id(plain) != blob_id:
                raise PruneRefusedError(f"{what} does not match its ID; refusing to repack it "
                                        "(nothing was deleted)")
            blob_type = _TYPES[code]
            builder = builders.get(blob_type)
            if builder is None:
                builder = builders[blob_type] = PackBuilder(blob_type, repo.pack_size_bytes)
            builder.add(blob_id, stored, ulength)
            copied.add((code, blob_id))
            if builder.full():
                write(builders.pop(blob_type))
    for builder in builders.values():
        if builder.count:
            write(builder)
    return written


def run_prune(repo: Repository, *, max_unused: str = "5%", dry_run: bool = False,
              check_lock: Callable[[], None] = lambda: None,
              on_step: Callable[[str], None] | None = None) -> PruneResult:
    """Plan and (unless `dry_run`) carry out a prune; the caller holds an exclusive lock and
    passes its `check` as `check_lock`."""
    def step(text: str) -> None:
        if on_step is not None:
            on_step(text)

    step("loading index and snapshots")
    view = load_index_view(repo, strict=True)
    plan = plan_prune(repo, view, max_unused)
    result = PruneResult(plan)
    if dry_run:
        return result

    if plan.unindexed:
        step(f"deleting {len(plan.unindexed)} packs no index lists")
        for name in plan.unindexed:
            check_lock()
            try:
                repo.backend.remove(FileType.PACK, name)
            except BackendNotFoundError:
                pass
            result.packs_deleted += 1

    new_packs: list[tuple[bytes, list[PackEntry]]] = []
    if plan.repack:
        step(f"repacking {len(plan.repack)} packs")
        new_packs = _repack(repo, plan, check_lock)
        result.new_packs = len(new_packs)

    gone = plan.remove | plan.repack | plan.forget_missing
    if gone or new_packs:
        step("writing the new index")
        keep = sorted(p for p in view.packs if p not in gone)
        packs = [(p, view.packs[p].entries()) for p in keep] + new_packs
        files = split_into_files(packs, repo.index_max_blobs)
        supersedes = [bytes.fromhex(n) for n in view.index_files]
        for f in files:
            f.supersedes = supersedes
            check_lock()
            repo.save_unpacked(FileType.INDEX, f.encode())
            result.index_files_written += 1
        step(f"deleting {len(view.index_files)} old index files")
        for name in view.index_files:
            check_lock()
            try:
                repo.backend.remove(FileType.INDEX, name)
            except BackendNotFoundError:
                pass
            result.index_files_removed += 1
        to_delete = sorted(plan.remove | plan.repack)
        step(f"deleting {len(to_delete)} packs")
        for pack_id in to_delete:
            check_lock()
            try:
                repo.backend.remove(FileType.PACK, pack_id.hex())
            except BackendNotFoundError:
                pass
            result.packs_deleted += 1
    repo.load_index()
    return result

