"""Differential tests against thin-provisioning-tools 0.9.0 (era_dump, era_invalidate,
era_check, era_restore): byte-identical output, accepted images, equal exit codes; and ground
truth where 0.9.0 is wrong."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from blockera.blockdev import FileDevice
from blockera.era.check import check_era_metadata
from blockera.era.dump import dump_xml
from blockera.era.invalidate import write_xml, written_since
from blockera.era.metadata import EraMetadata
from blockera.era.image import EraImage
from blockera.era.restore import write_image
from blockera.era.xml_parse import parse_era_xml
from tests.conftest import EraTools, sparse_file
from tests.era.model import Desc, descs, invalidate_xml

pytestmark = pytest.mark.compat
SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


def _ours_dump(image_path: Path, logical: bool = False) -> bytes:
    out = io.BytesIO()
    with FileDevice(image_path, writable=False) as dev:
        dump_xml(EraImage(dev), out, logical=logical)
    return out.getvalue()


def _ours_invalidate(image_path: Path, since: int, snapshot: bool = False) -> bytes:
    out = io.BytesIO()
    with FileDevice(image_path, writable=False) as dev:
        write_xml(written_since(EraImage(dev, use_snapshot=snapshot), since), out)
    return out.getvalue()


def _thresholds(desc: Desc) -> list[int]:
    eras = sorted(set(desc.writesets) | set(np.unique(desc.eras).tolist()))
    picks = {0, 1, desc.current_era, desc.current_era + 1 if desc.current_era < 2**32 - 1 else 0}
    picks.update(eras[:: max(1, len(eras) // 4)])
    return sorted(picks)


@SETTINGS
@given(desc=descs())
def test_dump_and_invalidate_are_byte_identical(desc: Desc, era_tools: EraTools,
                                                tmp_path: Path) -> None:
    xml = desc.write_xml(tmp_path / "in.xml")
    image = sparse_file(tmp_path / "meta.img", 4 << 20)
    era_tools.restore(xml, image)
    assert _ours_dump(image) == era_tools.dump(image)
    for since in _thresholds(desc):
        expected = era_tools.invalidate(image, since)
        assert _ours_invalidate(image, since) == expected
        assert expected == invalidate_xml(desc.changed_since(since))
    ours_logical = _ours_dump(image, logical=True)
    newest = desc.newest_eras()
    got = [int(line.split(b'era="')[1].split(b'"')[0])
           for line in ours_logical.splitlines() if line.startswith(b"    <era ")]
    assert got == newest.tolist()
    if not desc.blocks_in_several_writesets():
        assert ours_logical == era_tools.dump(image, "--logical")


@SETTINGS
@given(desc=descs())
def test_our_restore_is_accepted_and_dumps_back_identically(desc: Desc, era_tools: EraTools,
                                                             tmp_path: Path) -> None:
    xml = desc.write_xml(tmp_path / "in.xml")
    image = sparse_file(tmp_path / "meta.img", 4 << 20)
    with FileDevice(image) as dev:
        write_image(dev, parse_era_xml(xml))
    assert era_tools.check(image) == 0
    assert era_tools.dump(image) == xml.read_bytes()
    with FileDevice(image, writable=False) as dev:
        report = check_era_metadata(dev)
    assert report.ok and not report.warnings, report.lines()


@pytest.mark.slow
@pytest.mark.parametrize("nr_blocks, nr_writesets", [(1 << 20, 2), (1_100_003, 1), (3000, 230)])
def test_large_and_multi_level_shapes(nr_blocks: int, nr_writesets: int, era_tools: EraTools,
                                      tmp_path: Path) -> None:
    """>= 1 Mi blocks (multi-level array btrees) and > 201 writesets (multi-level writeset
    tree), both ways: 0.9.0 restores and we read; we restore and 0.9.0 reads."""
    rng = np.random.default_rng(nr_blocks)
    current_era = 1000
    eras = rng.integers(0, current_era, nr_blocks, dtype=np.uint32)
    ws_eras = sorted(rng.choice(np.arange(1, current_era), nr_writesets, replace=False).tolist())
    writesets = {int(e): rng.random(nr_blocks) < 0.01 for e in ws_eras}
    desc = Desc(4096, nr_blocks, current_era, writesets, eras)
    xml = desc.write_xml(tmp_path / "in.xml")
    theirs = sparse_file(tmp_path / "theirs.img", 64 << 20)
    era_tools.restore(xml, theirs)
    assert _ours_dump(theirs) == xml.read_bytes()
    since = int(ws_eras[len(ws_eras) // 2])
    assert _ours_invalidate(theirs, since) == era_tools.invalidate(theirs, since)
    ours = sparse_file(tmp_path / "ours.img", 64 << 20)
    assert subprocess.run(["blockera", "era", "restore", "-q", "-i", str(xml), "-o", str(ours)]
                          ).returncode == 0
    assert era_tools.check(ours) == 0
    assert era_tools.dump(ours) == xml.read_bytes()
    assert era_tools.invalidate(ours, since) == _ours_invalidate(ours, since)


def _kernel_like_image(path: Path) -> tuple[list[int], list[int], int]:
    """Metadata made by the era target's own operations: blocks written before a metadata
    snapshot, then more blocks written, digested and committed after it."""
    sparse_file(path, 1 << 20)
    with FileDevice(path) as dev:
        md = EraMetadata(dev, 128)
        md.resize(256)
        md.commit()
        md.era_rollover()
        md.commit()
        since = md.current_era
        before = [3, 4, 5, 200]
        for b in before:
            md.writeset_test_and_set(b)
        md.commit()
        md.take_snap()
        md.commit()
        after = [12, 13, 250]
        for b in after:
            md.writeset_test_and_set(b)
        md.commit()
        md.checkpoint()
        md.commit()
        md.digest_all()
        md.commit()
    return before, after, since


def test_metadata_snapshot_reads_the_snapshot(era_tools: EraTools, tmp_path: Path) -> None:
    image = tmp_path / "meta.img"
    before, after, since = _kernel_like_image(image)
    assert era_tools.check(image) == 0
    assert _ours_invalidate(image, since, snapshot=True) == invalidate_xml(before)
    assert _ours_invalidate(image, since) == invalidate_xml(sorted(before + after))
    # 0.9.0 checks that a snapshot exists, then reads the live superblock anyway
    theirs = era_tools.invalidate(image, since, "--metadata-snapshot")
    assert theirs == invalidate_xml(sorted(before + after)) != invalidate_xml(before)


def test_metadata_snapshot_required(era_tools: EraTools, tmp_path: Path) -> None:
    image = sparse_file(tmp_path / "meta.img", 1 << 20)
    with FileDevice(image) as dev:
        md = EraMetadata(dev, 128)
        md.resize(10)
        md.commit()
    r = subprocess.run(["blockera", "era", "invalidate", "--written-since", "0",
                        "--metadata-snapshot", str(image)], capture_output=True)
    assert r.returncode == 1 and b"no metadata snapshot taken" in r.stderr
    assert era_tools.run("era_invalidate", "--written-since", "0", "--metadata-snapshot",
                         str(image)).returncode == 1


def _damage(image: Path, block: int, offset: int, value: bytes) -> None:
    with open(image, "r+b") as f:
        f.seek(block * 4096 + offset)
        f.write(value)


def _locations(image: Path) -> dict[str, int]:
    with FileDevice(image, writable=False) as dev:
        img = EraImage(dev)
        ws_era, ws_rec = img.writeset_records()[0]
        from blockera.pdata.walkers import read_array
        bitset = read_array(img.bm, ws_rec.root, -(-ws_rec.nr_bits // 64), "<u8", "ws")
        era = read_array(img.bm, img.sb.era_array_root, img.nr_blocks, "<u4", "era")
        return {"superblock": 0, "writeset tree": img.sb.writeset_tree_root,
                "bitset node": ws_rec.root, "bitset block": int(bitset.blocks[0]),
                "era node": img.sb.era_array_root, "era block": int(era.blocks[0]),
                "index": img.sb.space_map_root.bitmap_root}


@pytest.mark.parametrize("target, offset, value, ours_only", [
    ("superblock", 100, b"\xff", False),          # checksum
    ("superblock", 32, b"\x00", False),           # magic
    ("writeset tree", 200, b"\x01", False),       # node checksum
    ("writeset tree", 8, b"\x09", False),         # node blocknr
    ("bitset node", 40, b"\x07", False),
    ("bitset block", 30, b"\x01", False),
    ("era node", 16, b"\x09", False),
    ("era block", 2000, b"\x01", False),
    ("index", 40, b"\x01", True),                 # 0.9.0 never reads the space map
])
def test_check_exit_codes_on_damaged_images(target: str, offset: int, value: bytes,
                                            ours_only: bool, era_tools: EraTools,
                                            tmp_path: Path) -> None:
    desc = Desc(128, 3000, 9, {7: np.arange(3000) % 3 == 0}, np.full(3000, 4, np.uint32))
    xml = desc.write_xml(tmp_path / "in.xml")
    image = sparse_file(tmp_path / "meta.img", 1 << 20)
    era_tools.restore(xml, image)
    assert era_tools.check(image) == 0
    assert subprocess.run(["blockera", "era", "check", "-q", str(image)]).returncode == 0
    _damage(image, _locations(image)[target], offset, value)
    before = image.read_bytes()
    ours = subprocess.run(["blockera", "era", "check", str(image)], capture_output=True)
    assert ours.returncode == 1
    assert b"Traceback" not in ours.stderr
    assert (era_tools.check(image) != 0) == (not ours_only)
    assert image.read_bytes() == before, "check must never write"
    for command in (["dump"], ["invalidate", "--written-since", "0"]):
        r = subprocess.run(["blockera", "era", *command, str(image)], capture_output=True)
        if target != "index":
            assert r.returncode == 1 and b"Traceback" not in r.stderr
            assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert image.read_bytes() == before


def test_eras_above_current_era(era_tools: EraTools, tmp_path: Path) -> None:
    desc = Desc(128, 10, 3, {}, np.array([0, 1, 2, 3, 4, 0, 0, 0, 0, 9], np.uint32))
    xml = desc.write_xml(tmp_path / "in.xml")
    image = sparse_file(tmp_path / "meta.img", 1 << 20)
    era_tools.restore(xml, image)
    assert era_tools.check(image) == 1
    r = subprocess.run(["blockera", "era", "check", str(image)], capture_output=True)
    assert r.returncode == 1 and b"greater than the current era 3" in r.stderr


@pytest.mark.parametrize("content", [b"", b"x" * 100, b"<superblock", bytes(8192)])
def test_bad_files_give_one_line_errors(content: bytes, era_tools: EraTools,
                                        tmp_path: Path) -> None:
    image = tmp_path / "meta.img"
    image.write_bytes(content)
    for command in (["dump"], ["invalidate", "--written-since", "1"], ["check"]):
        r = subprocess.run(["blockera", "era", *command, str(image)], capture_output=True)
        assert r.returncode in (1, 2)
        assert b"Traceback" not in r.stderr
        if command != ["check"]:
            assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert era_tools.run("era_" + command[0], *command[1:], str(image)).returncode != 0
    assert image.read_bytes() == content


@pytest.mark.parametrize("desc", [
    Desc(128, 0, 0, {}, np.zeros(0, np.uint32)),
    Desc(128, 1, 1, {0: np.zeros(0, bool)}, np.ones(1, np.uint32)),
], ids=["no-blocks", "empty-writeset"])
def test_empty_arrays_are_valid_here_but_not_in_0_9_0(desc: Desc, era_tools: EraTools,
                                                      tmp_path: Path) -> None:
    """A device formatted but never resumed has nr_blocks 0, and an empty writeset is an
    empty bitset: 0.9.0 reports both as damaged, even in images it restored itself."""
    xml = desc.write_xml(tmp_path / "in.xml")
    image = sparse_file(tmp_path / "meta.img", 1 << 20)
    era_tools.restore(xml, image)
    assert era_tools.check(image) == 1
    assert era_tools.run("era_dump", str(image)).returncode == 1
    assert _ours_dump(image) == xml.read_bytes()
    assert subprocess.run(["blockera", "era", "check", "-q", str(image)]).returncode == 0
