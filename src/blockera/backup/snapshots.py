"""Snapshot files (docs/backup-repository.md §9).

`snapshots/<id>` is an unpacked file (encrypted, `0x02 || zstd(JSON)` in version 2) holding

    {"time":"2026-12-03T08:58:49.171223492+01:00","parent":"<id>","tree":"<tree id>",
     "paths":["/dev/vda"],"hostname":"…","username":"…","uid":1000,"gid":1000,
     "excludes":[…],"tags":["…"],"original":"<id>","program_version":"blockera 0.1.0",
     "summary":{…}}

in this order; `parent`, `hostname`, `username`, `uid`, `gid`, `excludes`, `tags`, `original`,
`program_version` and `summary` are left out when empty. The time keeps nanoseconds and the
writer's UTC offset. restic 0.14 ignores `program_version` and `summary` (newer restic writes
them) and drops unknown fields when it rewrites a snapshot (`restic tag`), so anything a later
backup needs must live in `tags`, `paths` or the tree, not in extra fields.

A snapshot is found by a unique prefix of its ID or as `latest` (the newest by time,
optionally among those of one host, path set or tag).
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field
from typing import Any

from blockera import __version__
from blockera.backup import gojson
from blockera.backup.errors import RepositoryError, RepositoryFormatError
from blockera.backup.gojson import GoTime
from blockera.backup.ids import parse_id
from blockera.backup.keys import current_username

PROGRAM_VERSION = f"blockera {__version__}"


class SnapshotNotFoundError(RepositoryError):
    """No snapshot (or more than one) matches what was asked for."""

    exit_code = 1
    errno_name = "ENOENT"


@dataclass
class Snapshot:
    tree: bytes
    paths: list[str]
    time: GoTime = field(default_factory=GoTime.now)
    parent: bytes | None = None
    hostname: str = ""
    username: str = ""
    uid: int = 0
    gid: int = 0
    excludes: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    original: bytes | None = None
    program_version: str = ""
    summary: dict[str, Any] | None = None
    id: bytes | None = None
    """The storage ID, once saved or loaded (not part of the file)."""

    @classmethod
    def new(cls, tree: bytes, paths: list[str], *, tags: list[str] | None = None,
            parent: bytes | None = None, hostname: str | None = None,
            time: GoTime | None = None) -> "Snapshot":
        """A snapshot for this host and user, now, as restic would fill it."""
        return cls(tree=tree, paths=list(paths), time=time or GoTime.now(), parent=parent,
                   hostname=socket.gethostname() if hostname is None else hostname,
                   username=current_username(), uid=os.getuid(), gid=os.getgid(),
                   tags=list(tags or []), program_version=PROGRAM_VERSION)

    @property
    def short_id(self) -> str:
        return self.id.hex()[:8] if self.id else "(unsaved)"

    def encode(self) -> bytes:
        f: list[tuple[str, str]] = [("time", self.time.json())]
        if self.parent is not None:
            f.append(("parent", f'"{self.parent.hex()}"'))
        f += [("tree", f'"{self.tree.hex()}"'), ("paths", gojson.string_list(self.paths))]
        if self.hostname:
            f.append(("hostname", gojson.string(self.hostname)))
        if self.username:
            f.append(("username", gojson.string(self.username)))
        if self.uid:
            f.append(("uid", str(self.uid)))
        if self.gid:
            f.append(("gid", str(self.gid)))
        if self.excludes:
            f.append(("excludes", gojson.string_list(self.excludes)))
        if self.tags:
            f.append(("tags", gojson.string_list(self.tags)))
        if self.original is not None:
            f.append(("original", f'"{self.original.hex()}"'))
        if self.program_version:
            f.append(("program_version", gojson.string(self.program_version)))
        if self.summary:
            f.append(("summary", json.dumps(self.summary, separators=(",", ":"))))
        return gojson.obj(f).encode("utf-8")

    @classmethod
    def decode(cls, raw: bytes, snapshot_id: bytes | None, what: str) -> "Snapshot":
        try:
            doc = json.loads(raw)
            tree = doc.get("tree")
            if tree is None:
                raise ValueError("it has no tree")
            return cls(
                tree=parse_id(tree, "tree ID"),
                paths=list(doc.get("paths") or []),
                time=GoTime.parse(doc["time"]),
                parent=parse_id(doc["parent"], "parent ID") if doc.get("parent") else None,
                hostname=doc.get("hostname") or "", username=doc.get("username") or "",
                uid=int(doc.get("uid") or 0), gid=int(doc.get("gid") or 0),
                excludes=list(doc.get("excludes") or []), tags=list(doc.get("tags") or []),
                original=parse_id(doc["original"], "original ID") if doc.get("original")
                else None,
                program_version=doc.get("program_version") or "",
                summary=doc.get("summary") or None,
                id=snapshot_id)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise RepositoryFormatError(f"{what}: not a valid snapshot ({exc})") from None


def find_snapshot(snapshots: list[Snapshot], ref: str, *, hostname: str | None = None,
                  paths: list[str] | None = None, tags: list[str] | None = None,
                  location: str = "repository") -> Snapshot:
    """The snapshot named by `ref`: `latest` (newest by time among those matching the
    filters) or a unique prefix of its ID."""
    if ref == "latest":
        candidates = [s for s in snapshots
                      if (hostname is None or s.hostname == hostname)
                      and (paths is None or sorted(s.paths) == sorted(paths))
                      and (tags is None or set(tags) <= set(s.tags))]
        if not candidates:
            raise SnapshotNotFoundError(f"{location}: no snapshot matches (latest"
                                        f"{_filters(hostname, paths, tags)})")
        return max(candidates, key=lambda s: (s.time.unix_ns, s.id or b""))
    prefix = ref.lower()
    if not prefix or any(c not in "0123456789abcdef" for c in prefix):
        raise SnapshotNotFoundError(f"{location}: {ref!r} is neither 'latest' nor a snapshot "
                                    "ID (hexadecimal)")
    matches = [s for s in snapshots if s.id is not None and s.id.hex().startswith(prefix)]
    if not matches:
        raise SnapshotNotFoundError(f"{location}: no snapshot ID starts with {ref!r}")
    if len(matches) > 1:
        raise SnapshotNotFoundError(f"{location}: {len(matches)} snapshots start with {ref!r}; "
                                    "give more digits")
    return matches[0]


def _filters(hostname: str | None, paths: list[str] | None, tags: list[str] | None) -> str:
    parts = []
    if hostname is not None:
        parts.append(f"host {hostname}")
    if paths is not None:
        parts.append(f"paths {', '.join(paths)}")
    if tags is not None:
        parts.append(f"tags {', '.join(tags)}")
    return (" with " + "; ".join(parts)) if parts else ""
