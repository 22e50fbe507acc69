"""The command line: exit codes, one-line errors, no tracebacks, no writes on bad input."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import sparse_file

XML = """<superblock uuid="" block_size="128" nr_blocks="8" current_era="3">
  <writeset era="2" nr_bits="8">
    <bit block="6" value="true"/>
  </writeset>
  <era_array>
    <era block="1" era="1"/>
    <era block="2" era="2"/>
  </era_array>
</superblock>
"""


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["blockera", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    (tmp_path / "in.xml").write_text(XML)
    meta = sparse_file(tmp_path / "meta.img", 1 << 20)
    assert run("era", "restore", "-q", "-i", str(tmp_path / "in.xml"), "-o", str(meta)).returncode == 0
    return meta


def test_help_everywhere() -> None:
    for args in ([], ["era"], ["era", "dump"], ["era", "invalidate"], ["era", "check"],
                 ["era", "restore"], ["era", "metadata-size"]):
        r = run(*args, "--help")
        assert r.returncode == 0 and "Usage:" in r.stdout
    assert "Example" in run("era", "invalidate", "--help").stdout


def test_invalidate_json_and_output_file(image: Path, tmp_path: Path) -> None:
    r = run("era", "invalidate", "--written-since", "2", "--json", str(image))
    assert r.returncode == 0
    assert json.loads(r.stdout) == {"nr_blocks": 8, "written_since": 2, "ranges": [[2, 3], [6, 7]],
                                    "block_size_sectors": 128}
    out = tmp_path / "out.xml"
    assert run("era", "invalidate", "--written-since", "1", "-o", str(out), str(image)).returncode == 0
    assert out.read_text() == ('<blocks>\n  <range begin="1" end = "3"/>\n'
                               '  <block block="6"/>\n</blocks>\n')


def test_usage_errors_exit_2(image: Path) -> None:
    r = run("era", "invalidate", str(image))
    assert r.returncode == 2 and "--written-since" in r.stderr
    r = run("era", "invalidate", "--written-since", "-1", str(image))
    assert r.returncode == 2
    r = run("era", "metadata-size", "--origin-size", "lots", "--block-size", "8")
    assert r.returncode == 2 and "cannot parse size" in r.stderr


def test_restore_errors_do_not_touch_the_output(tmp_path: Path, image: Path) -> None:
    before = image.read_bytes()
    bad = tmp_path / "bad.xml"
    bad.write_text(XML.replace('era="2"/>', 'era="2">'))
    r = run("era", "restore", "-i", str(bad), "-o", str(image))
    assert r.returncode == 1 and r.stderr.startswith("blockera: line ")
    assert len(r.stderr.strip().splitlines()) == 1
    small = sparse_file(tmp_path / "small.img", 4 * 4096)
    big_xml = tmp_path / "big.xml"
    big_xml.write_text('<superblock uuid="" block_size="8" nr_blocks="100000" current_era="1">'
                       "<era_array></era_array></superblock>")
    r = run("era", "restore", "-i", str(big_xml), "-o", str(small))
    assert r.returncode == 2 and "metadata device too small" in r.stderr
    assert small.read_bytes() == bytes(4 * 4096)
    assert image.read_bytes() == before
    r = run("era", "restore", "-i", str(tmp_path / "missing.xml"), "-o", str(image))
    assert r.returncode == 2 and "cannot read input" in r.stderr


def test_check_exit_codes(image: Path) -> None:
    assert run("era", "check", str(image)).returncode == 0
    data = bytearray(image.read_bytes())
    data[300] ^= 1
    image.write_bytes(bytes(data))
    r = run("era", "check", str(image))
    assert r.returncode == 1 and "bad checksum in superblock" in r.stderr
    assert run("era", "check", "-q", str(image)).stderr == ""


def test_metadata_size_json() -> None:
    r = run("era", "metadata-size", "--origin-size", "1T", "--block-size", "4096", "--json")
    assert r.returncode == 0
    assert json.loads(r.stdout)["minimum_blocks"] == 545
