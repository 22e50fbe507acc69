"""Bad input from a careless or hostile user: one clear error (exit 1 for a finding, 2 for
usage or I/O), no traceback, no hang, nothing overwritten."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from blockera.blockdev import FileDevice
from blockera.era.superblock import SUPERBLOCK, Superblock
from blockera.snapshot.build import write_store
from tests.conftest import sparse_file

XML = ('<superblock uuid="" block_size="8" nr_blocks="4" current_era="3">\n'
       '  <era_array>\n    <era block="1" era="2"/>\n  </era_array>\n</superblock>\n')


def run(*args: str, stdin: bytes | None = None, timeout: float = 60
        ) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "blockera", *args], capture_output=True,
                          input=stdin, timeout=timeout)


def one_clear_error(r: subprocess.CompletedProcess[bytes], code: int, words: str) -> None:
    err = r.stderr.decode()
    assert r.returncode == code, err
    assert words in err, err
    assert "Traceback" not in err and "internal error" not in err, err


@pytest.fixture
def meta(tmp_path: Path) -> Path:
    (tmp_path / "in.xml").write_text(XML)
    image = sparse_file(tmp_path / "meta.img", 1 << 20)
    assert run("era", "restore", "-q", "-i", str(tmp_path / "in.xml"), "-o",
               str(image)).returncode == 0
    return image


@pytest.fixture
def cow(tmp_path: Path) -> tuple[Path, Path]:
    """A valid persistent COW with no exceptions, and its 1 MiB origin."""
    store = sparse_file(tmp_path / "cow.img", 1 << 20)
    with FileDevice(store) as dev:
        write_store(dev, 8, np.zeros(0, dtype=np.uint64))
    origin = tmp_path / "origin.img"
    origin.write_bytes(os.urandom(1 << 20))
    return store, origin


# -- outputs that would overwrite inputs (4) ------------------------------------------------------
def test_outputs_never_overwrite_inputs(tmp_path: Path, meta: Path,
                                        cow: tuple[Path, Path]) -> None:
    store, origin = cow
    kept = {p: p.read_bytes() for p in (meta, store, origin)}
    link = tmp_path / "alias"
    os.link(meta, link)
    for args in (["cow", "extract", str(store), "--origin", str(origin), "-o", str(origin)],
                 ["cow", "extract", str(store), "--origin", str(origin), "-o", str(store)],
                 ["cow", "changed", "-o", str(store), str(store)],
                 ["era", "dump", "-o", str(meta), str(meta)],
                 ["era", "dump", "-o", str(link), str(meta)],
                 ["era", "invalidate", "--written-since", "0", "-o", str(meta), str(meta)]):
        one_clear_error(run(*args), 2, "same file as the input")
    xml = tmp_path / "x.xml"
    xml.write_text(XML)
    one_clear_error(run("era", "restore", "-i", str(xml), "-o", str(xml)), 2,
                    "same file as the input")
    assert xml.read_text() == XML
    assert {p: p.read_bytes() for p in kept} == kept


# -- era restore (5, 6, 11, 22) -------------------------------------------------------------------
@pytest.mark.parametrize("xml, words", [
    ('<superblock uuid="" block_size="8" nr_blocks="4" current_era="1"><era_array>'
     '<era block="0" era="7"/></era_array></superblock>', "after the current era 1"),
    ('<superblock uuid="" block_size="8" nr_blocks="4" current_era="1"><writeset era="2" '
     'nr_bits="4"></writeset><era_array></era_array></superblock>', "after the current era 1"),
    ('<superblock uuid="" block_size="8" nr_blocks="4" current_era="1"><era_array>'
     '<era block="\u00b2" era="0"/></era_array></superblock>', "not a non-negative integer"),
    ('<superblock uuid="" block_size="8" nr_blocks="4" current_era="1"><era_array>'
     f'<era block="{"9" * 5000}" era="0"/></era_array></superblock>',
     "not a non-negative integer"),
    ('<superblock uuid="" block_size="8" nr_blocks="2147483647" current_era="1">'
     '<era_array></era_array></superblock>', "metadata device too small"),
])
def test_restore_refuses_what_the_kernel_could_not_use(tmp_path: Path, xml: str,
                                                       words: str) -> None:
    (tmp_path / "in.xml").write_text(xml)
    out = sparse_file(tmp_path / "out.img", 1 << 20)
    started = time.monotonic()
    r = run("era", "restore", "-i", str(tmp_path / "in.xml"), "-o", str(out))
    assert time.monotonic() - started < 20     # no 9 GB allocation before the size check
    one_clear_error(r, 1 if "too small" not in words else 2, words)
    assert out.read_bytes() == bytes(1 << 20)


def test_restore_reads_standard_input_and_reports_missing_input(tmp_path: Path) -> None:
    out = sparse_file(tmp_path / "out.img", 1 << 20)
    r = run("era", "restore", "-i", "-", "-o", str(out), stdin=XML.encode())
    assert r.returncode == 0, r.stderr
    assert 'current_era="3"' in run("era", "dump", str(out)).stdout.decode()
    one_clear_error(run("era", "restore", "-i", str(tmp_path / "nope.xml"), "-o", str(out)),
                    2, "cannot read input")


# -- superblocks that claim too much (7) ---------------------------------------------------------
def test_dump_and_invalidate_refuse_an_impossible_superblock_at_once(meta: Path) -> None:
    with FileDevice(meta) as dev:
        block = bytearray(dev.read(0, 4096))
        sb = Superblock.unpack(block)
        sb.nr_blocks = sb.metadata_block_size = 0xFFFFFFFF
        sb.pack_into(block)
        SUPERBLOCK.prepare(0, block)
        dev.write(0, block)
    for args in (["era", "dump", str(meta)], ["era", "dump", "--logical", str(meta)],
                 ["era", "invalidate", "--written-since", "1", str(meta)]):
        started = time.monotonic()
        r = run(*args)
        assert time.monotonic() - started < 10
        one_clear_error(r, 1, "superblock is invalid")
    r = run("era", "check", str(meta))
    assert r.returncode == 1 and b"metadata block size is 4294967295" in r.stderr


# -- metadata-size (8) ---------------------------------------------------------------------------
def test_metadata_size_says_what_cannot_be_done() -> None:
    r = run("era", "metadata-size", "--origin-size", "99999999999999999999999T",
            "--block-size", "8", timeout=20)
    one_clear_error(r, 2, "tracks at most 2147483647 blocks")
    one_clear_error(run("era", "metadata-size", "--origin-size", "64T", "--block-size", "8"),
                    2, "use a block size of at least 72 sectors")
    r = run("era", "metadata-size", "--json", "--origin-size", "8191G", "--block-size", "8")
    size = json.loads(r.stdout)
    assert size["minimum_blocks"] == 2184121 and size["recommended_blocks"] is None


# -- cow extract (9, 19) -------------------------------------------------------------------------
def test_extract_of_a_store_without_exceptions(tmp_path: Path, cow: tuple[Path, Path]) -> None:
    store, origin = cow
    for data in ("origin", "snapshot"):
        out = tmp_path / f"extract-{data}.img"
        r = run("cow", "extract", str(store), "--origin", str(origin), "--data", data,
                "-o", str(out))
        assert r.returncode == 0, r.stderr
        assert out.stat().st_size == 1 << 20 and out.read_bytes() == bytes(1 << 20)


def test_extract_does_not_replace_a_file_without_force(tmp_path: Path,
                                                       cow: tuple[Path, Path]) -> None:
    store, origin = cow
    mirror = tmp_path / "mirror.img"
    mirror.write_bytes(b"m" * 65536)
    r = run("cow", "extract", str(store), "--origin", str(origin), "-o", str(mirror))
    one_clear_error(r, 2, "--force")
    assert mirror.read_bytes() == b"m" * 65536
    r = run("cow", "extract", str(store), "--origin", str(origin), "-o", str(mirror), "--force")
    assert r.returncode == 0 and mirror.stat().st_size == 1 << 20


# -- dd (10, 17, 18) ------------------------------------------------------------------------------
@pytest.mark.parametrize("operands, words", [
    (["if=/nonexistent", "of=/dev/null"], "failed to open '/nonexistent' for reading"),
    (["if=/dev/zero", "of=/nonexistent/x", "count=1"], "failed to open '/nonexistent/x'"),
    (["if=/dev/zero", "of=/tmp", "count=1"], "Is a directory"),
    (["if=/dev/zero", "of=/dev/null", "conv=bogus"], "invalid conv value 'bogus'"),
    (["if=/dev/zero", "of=/dev/null", "status=bogus"], "invalid status value 'bogus'"),
    (["if=/dev/zero", "of=/dev/null", "iflag=whatever"], "invalid iflag value 'whatever'"),
])
def test_dd_errors(operands: list[str], words: str) -> None:
    one_clear_error(run("dd", *operands), 2, words)


def test_dd_status_progress(tmp_path: Path) -> None:
    r = run("dd", "if=/dev/zero", f"of={tmp_path / 'out'}", "bs=1M", "count=64",
            "status=progress")
    assert r.returncode == 0
    assert b"64.0M/64.0M" in r.stderr and b"67108864 bytes copied" in r.stderr
