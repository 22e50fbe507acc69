"""Tree and snapshot JSON exactly as restic writes it."""

from __future__ import annotations

import hashlib
import json
import stat

import pytest

from blockera.backup import GoTime, Node, Snapshot, SnapshotNotFoundError, Tree
from blockera.backup.errors import RepositoryFormatError
from blockera.backup.node import MODE_DIR, go_mode
from blockera.backup.snapshots import find_snapshot

# A directory listing written by restic 0.14 `backup` (names with <, >, & and an empty file);
# blockera must reproduce these bytes, and so the tree ID.
RESTIC_TREE = (
    b'{"nodes":[{"name":"a\\u003cb\\u003e\\u0026c","type":"file","mode":420,'
    b'"mtime":"2026-12-03T08:58:49.140878422Z","atime":"2026-12-03T08:58:49.140878422Z",'
    b'"ctime":"2026-12-03T08:58:49.140878422Z","uid":0,"gid":0,"user":"root","group":"root",'
    b'"inode":2147009,"device_id":65024,"size":3,"links":1,"content":'
    b'["98ea6e4f216f2fb4b69fff9b3a44842c38686ca685f3f55dc48c5d3fb1107be4"]},'
    b'{"name":"empty","type":"file","mode":420,"mtime":"2026-12-03T08:58:49.140878422Z",'
    b'"atime":"2026-12-03T08:58:49.140878422Z","ctime":"2026-12-03T08:58:49.140878422Z",'
    b'"uid":0,"gid":0,"user":"root","group":"root","inode":2146993,"device_id":65024,'
    b'"links":1,"content":[]},{"name":"sub","type":"dir","mode":2147484141,'
    b'"mtime":"2026-12-03T08:58:49.108878422Z","atime":"2026-12-03T08:58:49.108878422Z",'
    b'"ctime":"2026-12-03T08:58:49.108878422Z","uid":0,"gid":0,"user":"root","group":"root",'
    b'"inode":2146961,"device_id":65024,"content":null,'
    b'"subtree":"cf2d13d6471da886d593bf8cc4b383c342328df984aa4ce2940cf14fc7576401"}]}\n')


def test_restic_tree_round_trips_byte_for_byte() -> None:
    tree = Tree.decode(RESTIC_TREE, "t")
    assert [n.name for n in tree.nodes] == ["a<b>&c", "empty", "sub"]
    assert tree.nodes[1].content == [] and tree.nodes[2].content is None
    assert tree.encode() == RESTIC_TREE
    assert tree.id() == hashlib.sha256(RESTIC_TREE).digest()


def test_nodes_built_by_blockera() -> None:
    t = GoTime.parse("2026-01-02T03:04:05.5+01:00")
    blob = bytes.fromhex("aa" * 32)
    file_node = Node.file("disk.img", 4 << 20, [blob] * 4, mtime=t)
    dir_node = Node.directory("dev", b"\xbb" * 32, mtime=t)
    tree = Tree([file_node, dir_node])
    raw = tree.encode()
    assert raw.startswith(b'{"nodes":[{"name":"dev","type":"dir","mode":2147484141,')
    assert raw.endswith(b"]}\n")
    nodes = json.loads(raw)["nodes"]
    assert list(nodes[1]) == ["name", "type", "mode", "mtime", "atime", "ctime", "uid", "gid",
                              "size", "links", "content"]
    assert nodes[1]["content"] == ["aa" * 32] * 4 and nodes[1]["size"] == 4 << 20
    assert nodes[0]["content"] is None and nodes[0]["subtree"] == "bb" * 32
    assert Tree.decode(raw, "t").encode() == raw
    with pytest.raises(ValueError, match="two nodes named"):
        Tree([file_node, Node.file("disk.img", 0, [])]).encode()


def test_go_file_modes() -> None:
    assert go_mode(stat.S_IFDIR | 0o755) == MODE_DIR | 0o755 == 2147484141
    assert go_mode(stat.S_IFREG | 0o4755) == (1 << 23) | 0o755
    assert go_mode(stat.S_IFBLK | 0o660) == (1 << 26) | 0o660
    assert go_mode(stat.S_IFCHR | 0o600) == (1 << 26) | (1 << 21) | 0o600


def test_unsorted_names_sort_by_utf8_bytes() -> None:
    names = ["b", "a", "Z", "é", "z"]
    raw = Tree([Node.file(n, 0, []) for n in names]).encode()
    assert [n["name"] for n in json.loads(raw)["nodes"]] == ["Z", "a", "b", "z", "é"]


def test_snapshot_json_as_restic_writes_it() -> None:
    # `restic backup` 0.14 wrote exactly this snapshot (uid/gid 0 left out).
    restic_json = (b'{"time":"2026-12-03T08:58:49.171223492Z","tree":"e6088072a33a031975d0f5a6bf'
                   b'e649d800e03c8e1045a7b60f0ebe64a05358c7","paths":["/tmp/src1"],'
                   b'"hostname":"vm","username":"root"}')
    sn = Snapshot.decode(restic_json, b"\x01" * 32, "s")
    assert sn.time.format() == "2026-12-03T08:58:49.171223492Z"
    assert sn.encode() == restic_json
    full = Snapshot(tree=b"\x02" * 32, paths=["/dev/vda"], time=sn.time, parent=b"\x03" * 32,
                    hostname="h", username="u", uid=1000, gid=100, tags=["blockera", "era:7"],
                    program_version="blockera 0.1.0")
    doc = json.loads(full.encode())
    assert list(doc) == ["time", "parent", "tree", "paths", "hostname", "username", "uid", "gid",
                         "tags", "program_version"]
    assert Snapshot.decode(full.encode(), None, "s").encode() == full.encode()
    with pytest.raises(RepositoryFormatError, match="no tree"):
        Snapshot.decode(b'{"time":"2026-12-03T08:58:49Z","paths":[]}', None, "s")


def test_find_snapshot_by_prefix_and_latest() -> None:
    def snap(i: int, host: str, tags: list[str], ns: int) -> Snapshot:
        return Snapshot(tree=b"\x00" * 32, paths=["/dev/vda" if i % 2 else "/dev/vdb"],
                        time=GoTime(ns), hostname=host, tags=tags,
                        id=bytes([0xA0 + i]) + bytes(31))
    snaps = [snap(0, "h1", ["x"], 30), snap(1, "h1", [], 10), snap(2, "h2", ["x"], 20),
             snap(3, "h2", [], 40)]
    assert find_snapshot(snaps, "latest").id == snaps[3].id
    assert find_snapshot(snaps, "latest", hostname="h1").id == snaps[0].id
    assert find_snapshot(snaps, "latest", tags=["x"], paths=["/dev/vdb"]).id == snaps[0].id
    assert find_snapshot(snaps, "a2").id == snaps[2].id
    with pytest.raises(SnapshotNotFoundError, match="4 snapshots start with 'a'"):
        find_snapshot(snaps, "a")
    with pytest.raises(SnapshotNotFoundError, match="no snapshot ID starts with"):
        find_snapshot(snaps, "b")
    with pytest.raises(SnapshotNotFoundError, match="host h3"):
        find_snapshot(snaps, "latest", hostname="h3")
    with pytest.raises(SnapshotNotFoundError, match="neither"):
        find_snapshot(snaps, "newest")


@pytest.mark.parametrize("content", ['["' + "zz" * 32 + '"]', '["' + "ab" * 31 + ' a"]',
                                     '["' + "ab" * 33 + '"]', "[1]", '"' + "ab" * 32 + '"'])
def test_malformed_content_ids(content: str) -> None:
    raw = ('{"nodes":[{"name":"x","type":"file","content":' + content + "}]}\n").encode()
    with pytest.raises(RepositoryFormatError, match="not a valid tree"):
        Tree.decode(raw, "t")


def test_a_device_sized_content_list_round_trips() -> None:
    ids = [i.to_bytes(32, "big") for i in range(100_000)]
    raw = Tree([Node.file("vda", 100_000 << 20, ids)]).encode()
    assert Tree.decode(raw, "t").nodes[0].content == ids


def test_new_snapshots_carry_the_local_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    import time as time_mod
    monkeypatch.setenv("TZ", "XST-5:30")                  # POSIX form: no zone files needed
    time_mod.tzset()
    try:
        text = Snapshot.new(b"\x00" * 32, ["/dev/vda"]).time.format()
        assert text.endswith("+05:30")
    finally:
        monkeypatch.undo()
        time_mod.tzset()
