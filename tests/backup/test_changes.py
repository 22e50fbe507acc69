"""Changed ranges into chunks to read: any era block size or COW chunk size against any blob
size, checked against the source; both JSON forms; refusals with clear messages."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from blockera.backup.changes import chunks_covering, derive_era_block_sectors, json_ranges
from blockera.backup.job_errors import BackupInputError

MiB = 1 << 20


def _brute(ranges: list[tuple[int, int]], chunk: int, nr_chunks: int) -> np.ndarray:
    mask = np.zeros(nr_chunks, dtype=bool)
    for b, e in ranges:
        for c in range(b // chunk, min(nr_chunks, -(-e // chunk))):
            mask[c] = True
    return mask


@pytest.mark.parametrize("chunk", [64 << 10, 1 << 20, 8 << 20])
@pytest.mark.parametrize("unit", [512, 4096, 3 * 4096, 64 << 10, 2 << 20])
def test_chunks_covering_matches_a_brute_force_mapping(chunk: int, unit: int) -> None:
    rnd = random.Random(chunk ^ unit)
    size = 37 * MiB + 4096
    nr_chunks = -(-size // chunk)
    units = -(-size // unit)
    ranges = []
    for _ in range(40):
        b = rnd.randrange(units)
        e = min(units, b + rnd.randint(1, 5))
        ranges.append((b * unit, min(e * unit, size)))
    got = chunks_covering(np.array([r[0] for r in ranges]), np.array([r[1] for r in ranges]),
                          chunk, nr_chunks)
    assert (got == _brute(ranges, chunk, nr_chunks)).all()


def test_era_json_with_block_size() -> None:
    doc = {"nr_blocks": 64, "written_since": 3, "ranges": [[0, 1], [10, 12], [63, 64]],
           "block_size_sectors": 8192}
    r = json_ranges(json.dumps(doc).encode(), 256 * MiB, "x.json")
    assert r.made_from == "changed" and r.facts == {"since": 3}
    assert r.begins_bytes.tolist() == [0, 10 * 4 * MiB, 63 * 4 * MiB]
    assert r.ends_bytes.tolist() == [4 * MiB, 12 * 4 * MiB, 256 * MiB]


def test_era_json_last_block_partial_is_clipped() -> None:
    doc = {"nr_blocks": 3, "written_since": 1, "ranges": [[2, 3]], "block_size_sectors": 8}
    r = json_ranges(json.dumps(doc).encode(), 2 * 4096 + 512, "x.json")
    assert (r.begins_bytes.tolist(), r.ends_bytes.tolist()) == ([8192], [8704])


def test_era_json_for_another_device_is_refused() -> None:
    doc = {"nr_blocks": 64, "written_since": 1, "ranges": [], "block_size_sectors": 8192}
    with pytest.raises(BackupInputError, match="tracks 64 blocks of 8192 sectors .* does not "
                                               "match the source"):
        json_ranges(json.dumps(doc).encode(), 300 * MiB, "x.json")


def test_ranges_beyond_the_source_are_refused() -> None:
    doc = {"chunk_size": 8, "valid": True, "ranges": [[10, 20], [2560, 2561]]}
    with pytest.raises(BackupInputError, match=r"changed COW chunks \[2560, 2561\) do not fit "
                                               r"the source \(10485760 bytes"):
        json_ranges(json.dumps(doc).encode(), 10 * MiB, "c.json")


def test_invalid_cow_json_is_refused() -> None:
    doc = {"chunk_size": 8, "valid": False, "ranges": [[1, 2]]}
    with pytest.raises(BackupInputError, match="invalid .* incomplete"):
        json_ranges(json.dumps(doc).encode(), MiB, "c.json")


@pytest.mark.parametrize("raw, message", [
    (b"not json", "not JSON"),
    (b"[1, 2]", "expected a JSON object"),
    (b'{"ranges": []}', "neither"),
    (b'{"chunk_size": 8, "valid": true, "ranges": [[3, 1]]}', r"\[3, 1\) is not a valid"),
    (b'{"chunk_size": 8, "valid": true, "ranges": [[1.5, 2]]}', "integer pairs"),
    (b'{"chunk_size": 0, "valid": true, "ranges": []}', "positive integer"),
    (b'{"nr_blocks": 2, "written_since": -1, "ranges": []}', "non-negative"),
    (b'{"nr_blocks": 2, "written_since": 1, "ranges": [], "block_size_sectors": 12}',
     "not a positive multiple of 8"),
])
def test_malformed_json_is_refused(raw: bytes, message: str) -> None:
    with pytest.raises(BackupInputError, match=message):
        json_ranges(raw, MiB, "in.json")


def test_era_block_size_is_derived_only_when_unique() -> None:
    # 1 TiB in 4 MiB blocks: only one multiple of 8 sectors gives 262144 blocks
    assert derive_era_block_sectors(262144, 1 << 40, "x") == 8192
    # a small device: several block sizes give the same count
    with pytest.raises(BackupInputError, match=r"no block_size_sectors, and several era block sizes \(8192, 8200"):
        derive_era_block_sectors(64, 256 * MiB, "x")
    with pytest.raises(BackupInputError, match="no era block size"):
        derive_era_block_sectors(2, 4096, "x")
    doc = {"nr_blocks": 262144, "written_since": 2, "ranges": [[5, 6]]}
    r = json_ranges(json.dumps(doc).encode(), 1 << 40, "x.json")
    assert (r.begins_bytes.tolist(), r.ends_bytes.tolist()) == ([20 * MiB], [24 * MiB])
