"""Which chunks an origin write copies out: the bulk lookup gives the chunks the kernel's
per-chunk rule gives (a chunk counts when the write's part inside it starts before the
snapshot's end, and it has no exception yet)."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest

from blockera.snapshot.chunkmap import ChunkMap
from blockera.snapshot.copyout import chunks_to_copy


def _per_chunk(cs: int, length: int, known: ChunkMap, sector: int, nr: int) -> list[int]:
    out = []
    for chunk in range(sector // cs, (sector + nr - 1) // cs + 1):
        if max(chunk * cs, sector) >= length:
            break
        if known.lookup(chunk) is None:
            out.append(chunk)
    return out


@pytest.mark.parametrize("seed", range(20))
def test_bulk_lookup_matches_the_per_chunk_rule(seed: int) -> None:
    rnd = random.Random(seed)
    cs = rnd.choice([1, 8, 16, 128])
    length = rnd.randrange(1, 5000)
    population = range(0, 5200 // cs + 2)
    old = np.array(rnd.sample(population, rnd.randrange(0, min(200, len(population)))),
                   np.uint64)
    known = ChunkMap(old, np.arange(len(old), dtype=np.uint64))
    snap = SimpleNamespace(chunk_sectors=cs, length_sectors=length,
                           store=SimpleNamespace(missing=known.missing))
    for _ in range(300):
        sector = rnd.randrange(0, 5200)
        nr = rnd.randrange(1, 600)
        assert chunks_to_copy(snap, sector, nr) == _per_chunk(cs, length, known, sector, nr)


def test_append_keeps_list_order_and_first_duplicate() -> None:
    m = ChunkMap()
    m.append([(5, 1), (7, 2)])
    m.append([])
    m.append([(5, 9), (8, 3)])
    old, new = m.arrays()
    assert old.tolist() == [5, 7, 5, 8] and new.tolist() == [1, 2, 9, 3]
    assert m.lookup(5) == 1 and m.missing(4, 10) == [4, 6, 9]
