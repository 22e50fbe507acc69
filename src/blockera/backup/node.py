"""Nodes: the entries of a tree (docs/backup-repository.md §8.1).

A node is one JSON object per file, directory or other item, with restic's fields in restic's
order (Go's struct order), empty optional fields left out exactly where restic leaves them out:

    name, type, mode*, mtime, atime, ctime, uid, gid, user*, group*, inode*, device_id*,
    size*, links*, linktarget*, linktarget_raw*, extended_attributes*, generic_attributes*,
    device*, content, subtree*, error*                         (* omitted when empty/zero)

`mode` is Go's `os.FileMode`: permission bits plus type bits (a directory 0755 is
`2147484141`, i.e. 1<<31 | 0o755). Times are always written, Go's zero time when unknown.
`content` is the list of data blob IDs of a file (`[]` for an empty file; `null` for anything
that is not a file) and `subtree` the tree ID of a directory.
"""

from __future__ import annotations

import base64
import json
import stat as stat_mod
from dataclasses import dataclass, field
from typing import Any

from blockera.backup import gojson
from blockera.backup.gojson import GoTime
from blockera.backup.ids import parse_id

# Go's os.FileMode type bits.
MODE_DIR = 1 << 31
MODE_APPEND = 1 << 30
MODE_EXCLUSIVE = 1 << 29
MODE_TEMPORARY = 1 << 28
MODE_SYMLINK = 1 << 27
MODE_DEVICE = 1 << 26
MODE_NAMED_PIPE = 1 << 25
MODE_SOCKET = 1 << 24
MODE_SETUID = 1 << 23
MODE_SETGID = 1 << 22
MODE_CHAR_DEVICE = 1 << 21
MODE_STICKY = 1 << 20
MODE_PERM = 0o777

NODE_TYPES = ("file", "dir", "symlink", "dev", "chardev", "fifo", "socket", "irregular")


def go_mode(st_mode: int) -> int:
    """Go's FileMode for a POSIX st_mode, masked as restic stores it (permissions, type,
    setuid/setgid/sticky)."""
    mode = st_mode & MODE_PERM
    fmt = stat_mod.S_IFMT(st_mode)
    mode |= {stat_mod.S_IFDIR: MODE_DIR, stat_mod.S_IFLNK: MODE_SYMLINK,
             stat_mod.S_IFBLK: MODE_DEVICE, stat_mod.S_IFCHR: MODE_DEVICE | MODE_CHAR_DEVICE,
             stat_mod.S_IFIFO: MODE_NAMED_PIPE, stat_mod.S_IFSOCK: MODE_SOCKET}.get(fmt, 0)
    if st_mode & stat_mod.S_ISUID:
        mode |= MODE_SETUID
    if st_mode & stat_mod.S_ISGID:
        mode |= MODE_SETGID
    if st_mode & stat_mod.S_ISVTX:
        mode |= MODE_STICKY
    return mode


def _parse_ids(hex_ids: list[str]) -> list[bytes]:
    """A list of hex IDs (a device's file node can hold a million: one join, one fromhex)."""
    joined = "".join(hex_ids)
    raw = bytes.fromhex(joined)
    if len(joined) != 64 * len(hex_ids) or len(raw) != 32 * len(hex_ids):
        raise ValueError("a content blob ID is not 64 hexadecimal digits")
    return [raw[i:i + 32] for i in range(0, len(raw), 32)]


@dataclass
class Node:
    name: str
    type: str
    mode: int = 0
    mtime: GoTime = field(default_factory=GoTime.zero)
    atime: GoTime = field(default_factory=GoTime.zero)
    ctime: GoTime = field(default_factory=GoTime.zero)
    uid: int = 0
    gid: int = 0
    user: str = ""
    group: str = ""
    inode: int = 0
    device_id: int = 0
    size: int = 0
    links: int = 0
    linktarget: str = ""
    linktarget_raw: bytes = b""
    extended_attributes: list[tuple[str, bytes]] = field(default_factory=list)
    generic_attributes: dict[str, Any] = field(default_factory=dict)
    device: int = 0
    content: list[bytes] | None = None
    subtree: bytes | None = None
    error: str = ""

    # -- constructors ----------------------------------------------------------------------

    @classmethod
    def file(cls, name: str, size_bytes: int, content: list[bytes], *, mode: int = 0o644,
             mtime: GoTime | None = None, uid: int = 0, gid: int = 0, user: str = "",
             group: str = "") -> "Node":
        """A regular file whose bytes are the data blobs `content`, in order."""
        t = mtime or GoTime.now()
        return cls(name=name, type="file", mode=mode, mtime=t, atime=t, ctime=t, uid=uid,
                   gid=gid, user=user, group=group, size=size_bytes, links=1,
                   content=list(content))

    @classmethod
    def directory(cls, name: str, subtree: bytes, *, mode: int = 0o755,
                  mtime: GoTime | None = None, uid: int = 0, gid: int = 0, user: str = "",
                  group: str = "") -> "Node":
        t = mtime or GoTime.now()
        return cls(name=name, type="dir", mode=MODE_DIR | mode, mtime=t, atime=t, ctime=t,
                   uid=uid, gid=gid, user=user, group=group, subtree=subtree)

    # -- JSON ------------------------------------------------------------------------------

    def encode(self) -> str:
        f: list[tuple[str, str]] = [("name", gojson.string(self.name)),
                                    ("type", gojson.string(self.type))]
        if self.mode:
            f.append(("mode", str(self.mode)))
        f += [("mtime", self.mtime.json()), ("atime", self.atime.json()),
              ("ctime", self.ctime.json()), ("uid", str(self.uid)), ("gid", str(self.gid))]
        if self.user:
            f.append(("user", gojson.string(self.user)))
        if self.group:
            f.append(("group", gojson.string(self.group)))
        for name in ("inode", "device_id", "size", "links"):
            value = getattr(self, name)
            if value:
                f.append((name, str(value)))
        if self.linktarget:
            f.append(("linktarget", gojson.string(self.linktarget)))
        if self.linktarget_raw:
            f.append(("linktarget_raw", gojson.bytes_b64(self.linktarget_raw)))
        if self.extended_attributes:
            f.append(("extended_attributes", "[" + ",".join(
                gojson.obj([("name", gojson.string(n)),
                            ("value", gojson.bytes_b64(v) if v is not None else "null")])
                for n, v in self.extended_attributes) + "]"))
        if self.generic_attributes:
            f.append(("generic_attributes", gojson.obj([
                (k, json.dumps(self.generic_attributes[k], separators=(",", ":")))
                for k in sorted(self.generic_attributes)])))
        if self.device:
            f.append(("device", str(self.device)))
        f.append(("content", gojson.id_list(self.content)))
        if self.subtree is not None:
            f.append(("subtree", f'"{self.subtree.hex()}"'))
        if self.error:
            f.append(("error", gojson.string(self.error)))
        return gojson.obj(f)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "Node":
        """From a decoded JSON object (ValueError/KeyError/TypeError if malformed)."""
        def time_field(name: str) -> GoTime:
            value = doc.get(name)
            return GoTime.parse(value) if value else GoTime.zero()

        content = doc.get("content")
        subtree = doc.get("subtree")
        xattrs = [(a["name"], base64.b64decode(a["value"]) if a.get("value") is not None
                   else None) for a in doc.get("extended_attributes") or []]
        return cls(
            name=doc["name"], type=doc["type"], mode=int(doc.get("mode") or 0),
            mtime=time_field("mtime"), atime=time_field("atime"), ctime=time_field("ctime"),
            uid=int(doc.get("uid") or 0), gid=int(doc.get("gid") or 0),
            user=doc.get("user") or "", group=doc.get("group") or "",
            inode=int(doc.get("inode") or 0), device_id=int(doc.get("device_id") or 0),
            size=int(doc.get("size") or 0), links=int(doc.get("links") or 0),
            linktarget=doc.get("linktarget") or "",
            linktarget_raw=base64.b64decode(doc["linktarget_raw"])
            if doc.get("linktarget_raw") else b"",
            extended_attributes=xattrs,  # type: ignore[arg-type]
            generic_attributes=dict(doc.get("generic_attributes") or {}),
            device=int(doc.get("device") or 0),
            content=None if content is None else _parse_ids(content),
            subtree=None if subtree is None else parse_id(subtree, "subtree ID"),
            error=doc.get("error") or "")
