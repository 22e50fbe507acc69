"""The XML reader: the vectorised fast path and expat agree; bad input gets a one-line error
naming the line."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from blockera.errors import XmlInputError
from blockera.era.xml_parse import _parse_with_expat, parse_era_xml_bytes
from tests.era.model import Desc, descs


def _same(a, b) -> None:
    assert (a.block_size, a.nr_blocks, a.current_era) == (b.block_size, b.nr_blocks, b.current_era)
    assert np.array_equal(a.era_array, b.era_array)
    assert [(w.era, w.nr_bits) for w in a.writesets] == [(w.era, w.nr_bits) for w in b.writesets]
    for wa, wb in zip(a.writesets, b.writesets):
        assert np.array_equal(wa.words, wb.words)


def _reformat(xml: str, style: int) -> str:
    if style == 1:   # a space before "/>", tabs for indentation
        return xml.replace('"/>', '" />').replace("  <", "\t<")
    if style == 2:   # everything on one line, with an XML declaration
        return '<?xml version="1.0"?>' + xml.replace("\n", "")
    return xml


@settings(max_examples=60, deadline=None)
@given(desc=descs(max_blocks=300), style=st.integers(0, 2))
def test_fast_path_and_expat_agree(desc: Desc, style: int) -> None:
    xml = _reformat(desc.xml(), style).encode()
    fast = parse_era_xml_bytes(xml)
    _same(fast, _parse_with_expat(xml))
    assert fast.nr_blocks == desc.nr_blocks
    assert np.array_equal(fast.era_array, desc.eras)
    for w in fast.writesets:
        bits = np.unpackbits(w.words.view(np.uint8), bitorder="little")[: w.nr_bits].astype(bool)
        assert np.array_equal(bits, desc.writesets[w.era])


def test_comments_and_entities_go_through_expat() -> None:
    xml = (b'<superblock uuid="&amp;" block_size="8" nr_blocks="2" current_era="1">\n'
           b"<!-- a comment -->\n<era_array>\n<era block='1' era='1'/>\n</era_array>\n"
           b"</superblock>\n")
    desc = parse_era_xml_bytes(xml)
    assert desc.uuid == "&" and desc.era_array.tolist() == [0, 1]


def test_repeated_bits_keep_the_last_value() -> None:
    xml = (b'<superblock uuid="" block_size="8" nr_blocks="4" current_era="2">\n'
           b'  <writeset era="1" nr_bits="4">\n'
           b'    <bit block="2" value="true"/>\n    <bit block="2" value="false"/>\n'
           b'    <bit block="3" value="false"/>\n    <bit block="3" value="true"/>\n'
           b'    <bit block="0" value="true"/>\n'
           b"  </writeset>\n  <era_array>\n  </era_array>\n</superblock>\n")
    (ws,) = parse_era_xml_bytes(xml).writesets
    assert int(ws.words[0]) == 0b1001


HEAD = '<superblock uuid="" block_size="8" nr_blocks="4" current_era="2">\n'


@pytest.mark.parametrize("xml, message, line", [
    ("", "no <superblock>", None),
    ("hello", "text outside elements", 1),
    (HEAD, "ends inside <superblock>", None),
    (HEAD + '<era_array>\n<era block="4" era="1"/>\n', "outside the era array of 4", 3),
    (HEAD + '<writeset era="1" nr_bits="2">\n<bit block="2" value="true"/>\n',
     "outside writeset era 1 of 2 bits", 3),
    (HEAD + '<writeset era="1" nr_bits="2">\n<bit block="1" value="yes"/>\n',
     'must be "true" or "false"', 3),
    (HEAD + '<bit block="1" value="true"/>\n', "belongs inside <writeset>", 2),
    (HEAD + '<era block="1" era="1"/>\n', "belongs inside <era_array>", 2),
    (HEAD + '<writeset era="1" nr_bits="2"></writeset>\n<writeset era="1" nr_bits="2">',
     "second <writeset> for era 1", 3),
    (HEAD + "<thing/>\n", "unknown element <thing>", 2),
    (HEAD + '<era_array>\n<era block="x" era="1"/>\n', "not a non-negative integer", 3),
    (HEAD + '<era_array>\n<era block="1" era="99999999999"/>\n', "larger than", 3),
    ('<superblock uuid="" block_size="7" nr_blocks="4" current_era="2">',
     "multiple of 8 sectors", 1),
    ('<superblock uuid="" nr_blocks="4" current_era="2">', "missing attribute 'block_size'", 1),
    (HEAD + "</writeset>", "does not close the open element", 2),
    (HEAD + "</superblock>\n<superblock>", "after </superblock>", 3),
    ("<superblock <<", "not well-formed", 1),
])
def test_bad_xml_is_reported_with_its_line(xml: str, message: str, line: int | None) -> None:
    with pytest.raises(XmlInputError) as info:
        parse_era_xml_bytes(xml.encode())
    assert message in str(info.value)
    if line is not None:
        assert str(info.value).startswith(f"line {line}:")
    assert "\n" not in str(info.value)
