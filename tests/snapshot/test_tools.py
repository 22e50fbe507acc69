"""The COW tools: `cow changed`, `cow dump`, `cow extract`, as functions and through the command
line (exit codes, one-line errors, no tracebacks, no writes on bad input)."""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from blockera.blockdev import FileDevice, MemoryDevice
from blockera.errors import MetadataError
from blockera.snapshot import changed_chunks, merge_ranges, open_store, read_cow, write_store
from blockera.snapshot.changed import write_text
from blockera.snapshot.dump import dump_cow
from blockera.snapshot.dump import write_text as dump_text
from blockera.snapshot.extract import plan_extract, read_stream, write_stream

from .helpers import add_exceptions, payload, run_cow


def run_cow_in_process(capfd: pytest.CaptureFixture[bytes], *args: str) -> tuple[int, str, str]:
    """`blockera cow ARGS` through the entry point's error handling, without a new process."""
    from blockera.cli.cow import cow
    from blockera.cli.main import cli, main

    cli.add_command(cow)
    capfd.readouterr()
    try:
        main(["cow", *args])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capfd.readouterr()
    return code, captured.out.decode(), captured.err.decode()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_cow(path: Path, cs: int, olds: list[int], size_bytes: int = 4 << 20,
             data: bool = True) -> list[tuple[int, int]]:
    with open(path, "wb") as f:
        f.truncate(size_bytes)
    with FileDevice(path) as dev:
        store = open_store("P", dev, cs)
        return add_exceptions(store, olds, batch=5, data=data)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(0, 5000), max_size=400))
def test_merge_ranges_matches_a_plain_model(chunks: list[int]) -> None:
    begins, ends = merge_ranges(np.array(chunks, dtype=np.uint64))
    expected: list[list[int]] = []
    for c in sorted(set(chunks)):
        if expected and expected[-1][1] == c:
            expected[-1][1] = c + 1
        else:
            expected.append([c, c + 1])
    assert [[b, e] for b, e in zip(begins.tolist(), ends.tolist())] == expected


def test_changed_ranges_text_and_json(tmp_path: Path) -> None:
    cow = tmp_path / "cow.img"
    olds = [7, 3, 4, 5, 100, 6, 101, 300] + list(range(1000, 1300))   # spans two areas
    make_cow(cow, 8, olds)
    with FileDevice(cow, writable=False) as dev:
        result = changed_chunks(read_cow(dev))
    assert result.ranges() == [[3, 8], [100, 102], [300, 301], [1000, 1300]]
    assert result.sector_ranges() == [[24, 64], [800, 816], [2400, 2408], [8000, 10400]]
    out = io.BytesIO()
    write_text(result, out)
    lines = out.getvalue().decode().splitlines()
    assert lines[0].startswith("# chunk_size 8 sectors, valid, 308 exceptions, 308 chunks in "
                               "4 ranges")
    assert lines[1:] == ["3 8 24 64", "100 102 800 816", "300 301 2400 2408",
                         "1000 1300 8000 10400"]
    r = run_cow("changed", "--json", str(cow))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {
        "chunk_size": 8, "valid": True, "exceptions": 308,
        "ranges": [[3, 8], [100, 102], [300, 301], [1000, 1300]],
        "sector_ranges": [[24, 64], [800, 816], [2400, 2408], [8000, 10400]]}
    r = run_cow("changed", str(cow), "-o", str(tmp_path / "list.txt"))
    assert r.returncode == 0 and (tmp_path / "list.txt").read_text().splitlines()[1:] == lines[1:]


def test_changed_on_an_invalid_snapshot_is_a_finding(tmp_path: Path) -> None:
    cow = tmp_path / "cow.img"
    make_cow(cow, 8, [1, 2])
    with FileDevice(cow) as dev:
        open_store("P", dev, 8).invalidate()
    r = run_cow("changed", "--json", str(cow))
    assert r.returncode == 1
    assert json.loads(r.stdout)["valid"] is False and json.loads(r.stdout)["ranges"] == [[1, 3]]
    assert b"incomplete" in r.stderr and r.stderr.count(b"\n") == 1


def test_empty_store(tmp_path: Path) -> None:
    cow = tmp_path / "cow.img"
    make_cow(cow, 16, [])
    r = run_cow("changed", "--json", str(cow))
    assert json.loads(r.stdout) == {"chunk_size": 16, "valid": True, "exceptions": 0,
                                    "ranges": [], "sector_ranges": []}


def test_dump_text_golden() -> None:
    cow = MemoryDevice(2048 * 512)
    store = open_store("P", cow, 8)
    add_exceptions(store, [3, 5, 10])
    out = io.BytesIO()
    dump_text(dump_cow(cow), out)
    assert out.getvalue().decode() == (
        "header: magic 0x70416e53 (SnAp), valid 1, version 1, chunk_size 8 sectors\n"
        "cow: 2048 sectors (1048576 bytes)\n"
        "geometry: 4096-byte chunks, 256 whole chunks, 256 exceptions per area, area a at "
        "chunk 1 + 257*a\n"
        "exceptions: 3; current_area 0, current_committed 3, next_free 5\n"
        "status: 40/2048 16\n"
        "# area slot old_chunk new_chunk\n"
        "0 0 3 2\n0 1 5 3\n0 2 10 4\n"
        "anomalies: no anomalies\n")


def test_dump_json_and_anomalies(tmp_path: Path) -> None:
    cow = tmp_path / "cow.img"
    with open(cow, "wb") as f:
        f.truncate(1 << 20)
    with FileDevice(cow) as dev:
        write_store(dev, 8, [4, 9, 4, 12, 13], [2, 1, 3, 257 + 1 + 1000, 3])
    r = run_cow("dump", "--json", str(cow))
    assert r.returncode == 1                         # anomalies found
    doc = json.loads(r.stdout)
    assert doc["records"] == [[0, 0, 4, 2], [0, 1, 9, 1], [0, 2, 4, 3], [0, 3, 12, 1258],
                              [0, 4, 13, 3]]
    assert doc["header"]["magic_ok"] and doc["status"] == "10072/2048 16" and doc["error"] is None
    kinds = [(a["kind"], a["index"]) for a in doc["anomalies"]]
    assert kinds == [("metadata_chunk", 1), ("duplicate_old", 2), ("beyond_end", 3),
                     ("shared_new", 4)]
    r = run_cow("changed", str(cow))
    assert r.returncode == 1 and r.stdout == b""
    assert r.stderr.decode().startswith("blockera: corrupt exception table, 4 anomalies")
    assert r.stderr.count(b"\n") == 1


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(b"XXXX" + p.read_bytes()[4:]), "Invalid or corrupt snapshot"),
    (lambda p: p.write_bytes(p.read_bytes()[:8] + b"\x02\0\0\0" + p.read_bytes()[12:]),
     "unable to handle snapshot disk version 2"),
    (lambda p: p.write_bytes(p.read_bytes()[:12] + b"\x0c\0\0\0" + p.read_bytes()[16:]),
     "invalid on-disk chunk size 12: Chunk size is not a power of 2."),
    (lambda p: p.write_bytes(p.read_bytes()[:10]), "too small to hold the 16-byte header"),
    (lambda p: p.write_bytes(p.read_bytes()[:3000]), "smaller than its own header chunk"),
    (lambda p: p.write_bytes(bytes(4096) + p.read_bytes()[4096:]), "not initialised"),
    (lambda p: p.write_bytes(p.read_bytes()[:258 * 4096 + 100]),
     "metadata area 1 at chunk 258 .* lies beyond the end"),
])
def test_damaged_cows_fail_cleanly_without_writes(tmp_path: Path, damage, message: str,
                                                  capfdbinary) -> None:
    cow = tmp_path / "cow.img"
    origin = tmp_path / "origin.img"
    origin.write_bytes(bytes(8 << 20))
    make_cow(cow, 8, list(range(256)) + [5000])
    damage(cow)
    before = sha(cow)
    for args in (["changed", str(cow)], ["changed", "--json", str(cow)],
                 ["extract", str(cow), "--origin", str(origin), "-o", str(tmp_path / "x")],
                 ["dump", str(cow)]):
        code, out, err = run_cow_in_process(capfdbinary, *args)
        assert code == 1, (args, err)
        if args[0] == "dump":
            assert re.search(message, out), out[-300:]
        else:
            assert err.count("\n") == 1 and err.startswith("blockera: ") and \
                re.search(message, err), err
            assert "Traceback" not in err
    assert sha(cow) == before and not (tmp_path / "x").exists()
    assert not list(tmp_path.glob("x.tmp*"))


def test_missing_file_and_usage_errors(tmp_path: Path) -> None:
    r = run_cow("changed", str(tmp_path / "nope"))
    assert r.returncode == 2 and b"no such file" in r.stderr and r.stderr.count(b"\n") == 1
    r = run_cow("extract", str(tmp_path / "nope"))
    assert r.returncode == 2 and b"--origin" in r.stderr
    for args in ([], ["dump"], ["changed"], ["extract"]):
        r = run_cow(*args, "--help")
        assert r.returncode == 0 and b"Usage:" in r.stdout
        if args:
            assert b"Example" in r.stdout


def _origin_and_cow(tmp_path: Path, origin_bytes: int) -> tuple[Path, Path, bytes,
                                                                 list[tuple[int, int]]]:
    rng = np.random.default_rng(3)
    origin = tmp_path / "origin.img"
    content = rng.integers(0, 256, origin_bytes, dtype=np.uint8).tobytes()
    origin.write_bytes(content)
    cow = tmp_path / "cow.img"
    last = (origin_bytes - 1) // 4096
    olds = [0, 1, 2, 9, 40, 41, 7, last]
    records = make_cow(cow, 8, olds)
    return origin, cow, content, records


def test_extract_sparse_origin_data(tmp_path: Path) -> None:
    origin_bytes = 64 * 4096 + 1536                 # partial last chunk
    origin, cow, content, records = _origin_and_cow(tmp_path, origin_bytes)
    out = tmp_path / "changes.img"
    r = run_cow("extract", str(cow), "--origin", str(origin), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert b"extracted" in r.stderr
    data = out.read_bytes()
    assert len(data) == origin_bytes
    changed = {old for old, _ in records}
    for chunk in range(65):
        span = slice(chunk * 4096, min((chunk + 1) * 4096, origin_bytes))
        expected = content[span] if chunk in changed else bytes(len(content[span]))
        assert data[span] == expected, chunk


def test_extract_stream_snapshot_data_roundtrip(tmp_path: Path) -> None:
    origin_bytes = 64 * 4096 + 1536
    origin, cow, _, records = _origin_and_cow(tmp_path, origin_bytes)
    r = run_cow("extract", str(cow), "--origin", str(origin), "-o", "-", "--format", "stream",
                "--data", "snapshot")
    assert r.returncode == 0, r.stderr
    header, pieces = read_stream(io.BytesIO(r.stdout))
    assert (header.chunk_sectors, header.source, header.origin_bytes) == (8, "snapshot",
                                                                         origin_bytes)
    got = {}
    for offset, data in pieces:
        for k in range(0, len(data), 4096):
            got[(offset + k) // 4096] = data[k: k + 4096]
    mapping = dict(records)
    assert set(got) == set(mapping)
    last = (origin_bytes - 1) // 4096
    for old, new in mapping.items():
        expected = payload(old, new, 4096)
        if old == last:
            expected = expected[: origin_bytes - last * 4096]
        assert got[old] == expected
    # Runs consecutive in both fields are single records: old 0,1,2 -> COW 2,3,4 and
    # old 40,41 -> COW 6,7; 7, 9 and the last chunk stand alone.
    assert header.records == 5
    with pytest.raises(MetadataError, match="truncated"):
        _, it = read_stream(io.BytesIO(r.stdout[:-5]))
        list(it)


def test_extract_refuses_invalid_and_foreign_origin(tmp_path: Path) -> None:
    origin, cow, _, _ = _origin_and_cow(tmp_path, 64 * 4096)
    small = tmp_path / "small.img"
    small.write_bytes(bytes(10 * 4096))
    r = run_cow("extract", str(cow), "--origin", str(small), "-o", str(tmp_path / "o1"))
    assert r.returncode == 1 and b"beyond the end of the origin" in r.stderr
    with FileDevice(cow) as dev:
        open_store("P", dev, 8).invalidate()
    r = run_cow("extract", str(cow), "--origin", str(origin), "-o", str(tmp_path / "o2"))
    assert r.returncode == 1 and b"invalid" in r.stderr
    r = run_cow("extract", str(cow), "--origin", str(origin), "-o", "-")
    assert r.returncode == 2 and b"stream" in r.stderr
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_plan_for_stream_in_memory() -> None:
    cow = MemoryDevice(1 << 20)
    store = open_store("P", cow, 8)
    add_exceptions(store, [5, 6, 8])
    origin = MemoryDevice(data=bytes(range(256)) * (40 * 16))
    image = read_cow(cow)
    plan = plan_extract(image, origin.size_bytes, "origin")
    assert [(s.offset_bytes, s.length_bytes) for s in plan.segments] == [(20480, 8192),
                                                                           (32768, 4096)]
    out = io.BytesIO()
    write_stream(plan, origin, out)
    header, pieces = read_stream(io.BytesIO(out.getvalue()))
    assert header.records == 2
    assert [(o, d) for o, d in pieces] == [(20480, origin.read(20480, 8192)),
                                           (32768, origin.read(32768, 4096))]
    assert out.getvalue()[:8] == b"BLKCOWX1" and out.getvalue()[-16:-8] == b"BLKCOWXE"
