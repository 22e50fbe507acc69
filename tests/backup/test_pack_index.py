"""Pack headers, index files and the master index."""

from __future__ import annotations

import json
import os
import struct

import pytest

from blockera.backup.crypto import MasterKey
from blockera.backup.errors import IntegrityError, RepositoryFormatError
from blockera.backup.ids import BlobType, hash_id
from blockera.backup.index import IndexFile, MasterIndex, split_into_files
from blockera.backup.pack import (COMPRESSED_ENTRY_BYTES, PLAIN_ENTRY_BYTES, PackBuilder,
                                  PackEntry, decode_header, encode_header, parse_pack_tail)


def _entry(i: int, offset: int = 0, compressed: bool = False,
           blob_type: BlobType = BlobType.DATA) -> PackEntry:
    return PackEntry(blob_type, hash_id(str(i).encode()), offset, 100 + i,
                     1000 + i if compressed else 0)


def test_header_entries_are_restics_layout() -> None:
    entries = [PackEntry(BlobType.DATA, b"\x11" * 32, 0, 48, 0),
               PackEntry(BlobType.DATA, b"\x22" * 32, 48, 60, 4096)]
    raw = encode_header(entries)
    assert len(raw) == PLAIN_ENTRY_BYTES + COMPRESSED_ENTRY_BYTES == 37 + 41
    assert raw[:5] == b"\x00" + struct.pack("<I", 48) and raw[5:37] == b"\x11" * 32
    assert raw[37:46] == b"\x02" + struct.pack("<II", 60, 4096)
    tree = encode_header([PackEntry(BlobType.TREE, b"\x33" * 32, 0, 50, 0),
                          PackEntry(BlobType.TREE, b"\x44" * 32, 50, 50, 99)])
    assert tree[0] == 1 and tree[37] == 3
    assert decode_header(raw, "p") == entries
    with pytest.raises(RepositoryFormatError, match="invalid blob type 7"):
        decode_header(b"\x07" + raw[1:], "p")
    with pytest.raises(RepositoryFormatError, match="truncated"):
        decode_header(raw[:-1], "p")


def test_pack_builder_and_tail_parsing() -> None:
    key = MasterKey.random()
    builder = PackBuilder(BlobType.DATA, target_bytes=900)
    blobs = [os.urandom(n) for n in (10, 300, 500)]
    for i, b in enumerate(blobs):
        assert not builder.full()
        builder.add(hash_id(b), key.encrypt(b), 0)
    assert builder.full()
    pack_id, data = builder.finish(key)
    assert pack_id == hash_id(data)
    header_len = struct.unpack("<I", data[-4:])[0]
    assert header_len == 3 * PLAIN_ENTRY_BYTES + 32
    entries = parse_pack_tail(key, data, len(data), "p")
    assert [e.blob_id for e in entries] == [hash_id(b) for b in blobs]
    for e, b in zip(entries, blobs):
        assert key.decrypt(data[e.offset_bytes:e.offset_bytes + e.length_bytes], "b") == b
    # a short tail asks for what it needs
    assert parse_pack_tail(key, data[-40:], len(data), "p") == header_len + 4
    bad = bytearray(data)
    bad[-10] ^= 1
    with pytest.raises(IntegrityError):
        parse_pack_tail(key, bytes(bad), len(bad), "p")
    with pytest.raises(RepositoryFormatError, match="larger than the file"):
        parse_pack_tail(key, data[:-4] + struct.pack("<I", len(data)), len(data), "p")


def test_index_json_as_restic_encodes_it() -> None:
    pack = bytes(range(32))
    f = IndexFile([(pack, [_entry(1), _entry(2, 101, compressed=True)])])
    raw = f.encode()
    assert raw.endswith(b"}\n") and b"supersedes" not in raw
    doc = json.loads(raw)
    assert list(doc) == ["packs"]
    blobs = doc["packs"][0]["blobs"]
    assert list(blobs[0]) == ["id", "type", "offset", "length"]
    assert list(blobs[1]) == ["id", "type", "offset", "length", "uncompressed_length"]
    assert IndexFile.decode(raw, "i").packs == f.packs
    f.supersedes = [b"\x01" * 32]
    assert json.loads(f.encode())["supersedes"] == ["01" * 32]
    assert IndexFile.decode(f.encode(), "i").supersedes == [b"\x01" * 32]


def _one_blob(fields: bytes) -> bytes:
    return (b'{"packs":[{"id":"' + b"aa" * 32 + b'","blobs":[{"id":"' + b"bb" * 32
            + b'","type":"data",' + fields + b"}]}]}")


def test_old_index_format_and_malformed_ones() -> None:
    old = json.dumps([{"id": "aa" * 32, "blobs": [
        {"id": "bb" * 32, "type": "tree", "offset": 0, "length": 77}]}]).encode()
    f = IndexFile.decode(old, "i")
    assert f.packs == [(b"\xaa" * 32, [PackEntry(BlobType.TREE, b"\xbb" * 32, 0, 77, 0)])]
    for bad in (b"not json", b'{"packs":[{"id":"zz"}]}', b'"string"',
                b'{"packs":[{"id":"' + b"aa" * 32 + b'","blobs":[{"id":"' + b"bb" * 32
                + b'","type":"other","offset":0,"length":1}]}]}',
                _one_blob(b'"offset":-1,"length":1'), _one_blob(b'"offset":1.5,"length":1'),
                _one_blob(b'"offset":0,"length":4294967296'), _one_blob(b'"offset":0'),
                _one_blob(b'"offset":0,"length":true')):
        with pytest.raises(RepositoryFormatError):
            IndexFile.decode(bad, "i")


def test_split_keeps_packs_whole() -> None:
    packs = [(bytes([i]) * 32, [_entry(i * 10 + j) for j in range(n)])
             for i, n in enumerate([3, 4, 2, 6, 1])]
    files = split_into_files(packs, max_blobs=6)
    assert [f.blob_count for f in files] == [3, 6, 6, 1]
    assert [p for f in files for p in f.packs] == packs


def test_master_index_lookup_dedup_and_bulk() -> None:
    idx = MasterIndex()
    pack_a, pack_b = b"\xaa" * 32, b"\xbb" * 32
    idx.add_pack(pack_a, [_entry(1), _entry(2, 101, compressed=True)])
    idx.add_pack(pack_b, [_entry(1, 500)])                    # a duplicate: first one wins
    found = idx.lookup(_entry(2).blob_id, BlobType.DATA)
    assert found is not None and found.pack_id == pack_a and found.uncompressed_length_bytes
    assert idx.lookup(_entry(1).blob_id, BlobType.DATA).offset_bytes == 0
    assert idx.lookup(_entry(1).blob_id, BlobType.TREE) is None       # types are separate
    assert len(idx) == 2
    bulk = IndexFile([(bytes([i]) * 32, [_entry(1000 + i * 10 + j, 37 * j) for j in range(10)])
                      for i in range(50)] + [(pack_b, [_entry(1, 500), _entry(2, 0)])])
    idx.add_index_file(bulk)
    assert len(idx) == 502
    for i in range(50):
        for j in range(10):
            e = idx.lookup(_entry(1000 + i * 10 + j).blob_id, BlobType.DATA)
            assert e is not None and e.pack_id == bytes([i]) * 32 and e.offset_bytes == 37 * j
    assert idx.lookup(_entry(2).blob_id, BlobType.DATA).pack_id == pack_a
    assert {b.blob_id for b in idx} >= {_entry(1).blob_id, _entry(1049).blob_id}


def test_master_index_prefix_collisions() -> None:
    idx = MasterIndex()
    same_prefix = [b"\x42" * 8 + bytes([i]) * 24 for i in range(3)]
    idx.add_index_file(IndexFile([(b"\x01" * 32, [
        PackEntry(BlobType.DATA, same_prefix[0], 0, 40, 0),
        PackEntry(BlobType.DATA, same_prefix[1], 40, 50, 0)])]))
    idx.add_index_file(IndexFile([(b"\x02" * 32, [
        PackEntry(BlobType.DATA, same_prefix[2], 0, 60, 0),
        PackEntry(BlobType.DATA, same_prefix[0], 60, 70, 0),
        PackEntry(BlobType.TREE, same_prefix[0], 130, 80, 0)])]))
    assert len(idx) == 4
    assert idx.lookup(same_prefix[0], BlobType.DATA).length_bytes == 40
    assert idx.lookup(same_prefix[1], BlobType.DATA).length_bytes == 50
    assert idx.lookup(same_prefix[2], BlobType.DATA).length_bytes == 60
    assert idx.lookup(same_prefix[0], BlobType.TREE).length_bytes == 80
    assert idx.lookup(b"\x42" * 8 + b"\x09" * 24, BlobType.DATA) is None


def test_master_index_merges_recent_entries() -> None:
    idx = MasterIndex()
    idx._MERGE_THRESHOLD = 64
    ids = [hash_id(i.to_bytes(4, "little")) for i in range(1000)]
    for start in range(0, 1000, 10):
        idx.add_pack(start.to_bytes(32, "big"),
                     [PackEntry(BlobType.DATA, ids[k], k, 40, 0) for k in range(start, start + 10)])
    assert len(idx._recent) < 64 and len(idx) == 1000
    assert all(idx.lookup(ids[k], BlobType.DATA).offset_bytes == k for k in range(1000))
    assert idx.memory_bytes() < 1000 * 200
