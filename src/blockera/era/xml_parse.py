"""Parsing era metadata XML (the `era_dump` format) into an `EraDescription`.

Grammar (as thin-provisioning-tools 0.9.0 reads it): one `<superblock uuid block_size nr_blocks
current_era>` holding any number of `<writeset era nr_bits>` (each holding `<bit block value>`
elements, value "true" or "false") and one `<era_array>` (holding `<era block era>` elements).

Two parsers produce the same events. The fast one scans the whole buffer with numpy: it finds
every tag, checks that only whitespace lies between tags, and decodes the tens of millions of
`<bit .../>` and `<era .../>` lines in the exact layout era_dump writes with vectorised byte
comparisons; any other tag is parsed one by one. Documents with comments, entities, CDATA or a
DOCTYPE go to expat instead. Either way every element is checked and errors name the line.

See docs/era.md §5.
"""

from __future__ import annotations

import mmap
import os
import re
import stat
import sys
import xml.parsers.expat
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np

from blockera.errors import DeviceError, NoSpaceError, XmlInputError
from blockera.era.superblock import MAX_ORIGIN_BLOCKS
from blockera.pdata.array import array_max_entries
from blockera.pdata.bitset import words_for_bits

U32_MAX = (1 << 32) - 1
CHUNK_BYTES = 1 << 17          # bytes of XML scanned at a time (bounds the scanner's memory)
_ASCII_DECIMAL = re.compile(r"[0-9]{1,20}\Z")


@dataclass
class WritesetDescription:
    era: int
    nr_bits: int
    words: np.ndarray   # uint64, bits >= nr_bits clear


@dataclass
class EraDescription:
    """Everything an era metadata image holds, independent of block placement."""

    uuid: str
    block_size: int
    nr_blocks: int
    current_era: int
    writesets: list[WritesetDescription] = field(default_factory=list)
    era_array: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint32))


class _Builder:
    """Receives parse events, checks nesting and attribute values, accumulates the image."""

    def __init__(self, metadata_blocks: int | None = None, *, keep_eras: bool = True,
                 keep_bits: bool = True,
                 on_eras: Callable[[np.ndarray, np.ndarray], None] | None = None) -> None:
        """`keep_eras` / `keep_bits`: hold the era array / the writesets' bits in the
        description (else they are checked and dropped); `on_eras(blocks, eras)` receives the
        era entries as they are parsed (checked, in document order)."""
        self.metadata_blocks = metadata_blocks
        self.keep_eras = keep_eras
        self.keep_bits = keep_bits
        self.on_eras = on_eras
        self.eras_ascending = True      # every <era> block number above the one before it
        self.last_era_block = -1
        self.needed_blocks = 1          # the superblock; arrays are added as they are declared
        self.result: EraDescription | None = None
        self.finished = False
        self.stack: list[str] = []
        self.ws: WritesetDescription | None = None
        self.seen_eras: set[int] = set()
        self.seen_era_array = False
        self.last_bit = -1

    # -- helpers ---------------------------------------------------------------------------------
    @staticmethod
    def _int(attrs: dict[str, str], name: str, tag: str, line: int, limit: int = U32_MAX) -> int:
        if name not in attrs:
            raise XmlInputError(f"<{tag}> is missing attribute {name!r}", line=line)
        text = attrs[name].strip()
        if not _ASCII_DECIMAL.match(text):
            shown = text if len(text) <= 40 else f"{text[:40]}... ({len(text)} characters)"
            raise XmlInputError(f"<{tag} {name}={shown!r}>: not a non-negative integer "
                                f"(ASCII decimal digits, at most {limit})", line=line)
        value = int(text)
        if value > limit:
            raise XmlInputError(f"<{tag} {name}={text!r}>: larger than {limit}", line=line)
        return value

    def _reserve(self, entries: int, value_size: int, what: str, line: int) -> None:
        """Count the array blocks `what` needs at least, before its memory is allocated:
        refuse input whose arrays alone cannot fit the output."""
        self.needed_blocks += -(-entries // array_max_entries(value_size))
        if self.metadata_blocks is not None and self.needed_blocks > self.metadata_blocks:
            raise NoSpaceError(
                f"metadata device too small: {what} (line {line}) needs at least "
                f"{self.needed_blocks} metadata blocks with what comes before it, the output "
                f"has {self.metadata_blocks}: use a larger output, or check the sizes in the "
                "XML")

    def _context(self, expected: str, tag: str, line: int) -> None:
        if not self.stack or self.stack[-1] != expected:
            where = f"inside <{self.stack[-1]}>" if self.stack else "at top level"
            raise XmlInputError(f"<{tag}> found {where}; it belongs inside <{expected}>",
                                line=line)

    # -- events ----------------------------------------------------------------------------------
    def start(self, tag: str, attrs: dict[str, str], line: int) -> None:
        if self.finished:
            raise XmlInputError(f"<{tag}> after </superblock>", line=line)
        if tag == "superblock":
            if self.stack or self.result is not None:
                raise XmlInputError("a second <superblock>", line=line)
            if "uuid" not in attrs:
                raise XmlInputError("<superblock> is missing attribute 'uuid'", line=line)
            block_size = self._int(attrs, "block_size", tag, line)
            nr_blocks = self._int(attrs, "nr_blocks", tag, line, MAX_ORIGIN_BLOCKS - 1)
            current_era = self._int(attrs, "current_era", tag, line)
            if block_size == 0 or block_size % 8:
                raise XmlInputError(f"<superblock block_size=\"{block_size}\">: the era target "
                                    "needs a block size that is a positive multiple of 8 "
                                    "sectors", line=line)
            self._reserve(nr_blocks, 4, f"the era array of {nr_blocks} blocks", line)
            self.result = EraDescription(attrs["uuid"], block_size, nr_blocks, current_era,
                                         [], np.zeros(nr_blocks if self.keep_eras else 0,
                                                      dtype=np.uint32))
        elif tag == "writeset":
            self._context("superblock", tag, line)
            era = self._int(attrs, "era", tag, line)
            nr_bits = self._int(attrs, "nr_bits", tag, line, MAX_ORIGIN_BLOCKS - 1)
            if era in self.seen_eras:
                raise XmlInputError(f"a second <writeset> for era {era}", line=line)
            assert self.result is not None
            if era > self.result.current_era:
                raise XmlInputError(f"<writeset era=\"{era}\"> is after the current era "
                                    f"{self.result.current_era}", line=line)
            self._reserve(words_for_bits(nr_bits), 8, f"the writeset of era {era} "
                          f"({nr_bits} bits)", line)
            self.seen_eras.add(era)
            self.ws = WritesetDescription(era, nr_bits, np.zeros(
                words_for_bits(nr_bits) if self.keep_bits else 0, dtype=np.uint64))
            self.last_bit = -1
        elif tag == "bit":
            self._context("writeset", tag, line)
            block = self._int(attrs, "block", tag, line)
            value = attrs.get("value")
            if value not in ("true", "false"):
                raise XmlInputError(f"<bit value={value!r}>: must be \"true\" or \"false\""
                                    if value is not None else "<bit> is missing attribute "
                                    "'value'", line=line)
            self.bits(np.array([block], dtype=np.uint64), np.array([value == "true"]),
                      lambda _: line)
        elif tag == "era_array":
            self._context("superblock", tag, line)
            if self.seen_era_array:
                raise XmlInputError("a second <era_array>", line=line)
            self.seen_era_array = True
        elif tag == "era":
            self._context("era_array", tag, line)
            block = self._int(attrs, "block", tag, line)
            era = self._int(attrs, "era", tag, line)
            self.eras(np.array([block], dtype=np.uint64), np.array([era], dtype=np.uint64),
                      lambda _: line)
        else:
            raise XmlInputError(f"unknown element <{tag}>", line=line)
        self.stack.append(tag)

    def end(self, tag: str, line: int) -> None:
        if not self.stack or self.stack[-1] != tag:
            raise XmlInputError(f"</{tag}> does not close the open element", line=line)
        self.stack.pop()
        if tag == "writeset":
            assert self.result is not None and self.ws is not None
            self.result.writesets.append(self.ws)
            self.ws = None
        elif tag == "superblock":
            self.finished = True

    def bits(self, blocks: np.ndarray, values: np.ndarray,
             line_of: Callable[[int], int]) -> None:
        """Set or clear writeset bits; a bit listed twice keeps its last value."""
        ws = self.ws
        assert ws is not None
        if not len(blocks):
            return
        bad = np.flatnonzero(blocks >= ws.nr_bits)
        if len(bad):
            i = int(bad[0])
            raise XmlInputError(f"<bit block=\"{int(blocks[i])}\"> is outside writeset era "
                                f"{ws.era} of {ws.nr_bits} bits", line=line_of(i))
        if not self.keep_bits:
            return
        ascending = len(blocks) == 1 or bool(np.all(blocks[1:] > blocks[:-1]))
        if not (ascending and int(blocks[0]) > self.last_bit):
            # out of order or repeated: keep the last value given for each block
            order = np.unique(blocks[::-1], return_index=True)[1]
            keep = len(blocks) - 1 - order
            blocks, values = blocks[keep], values[keep]
            off = blocks[~values]
            if len(off):
                np.bitwise_and.at(ws.words, (off >> np.uint64(6)).astype(np.intp),
                                  ~np.left_shift(np.uint64(1), off & np.uint64(63)))
        on = blocks[values]
        if len(on):
            np.bitwise_or.at(ws.words, (on >> np.uint64(6)).astype(np.intp),
                             np.left_shift(np.uint64(1), on & np.uint64(63)))
        self.last_bit = max(self.last_bit, int(blocks.max()))

    def eras(self, blocks: np.ndarray, eras: np.ndarray,
             line_of: Callable[[int], int]) -> None:
        result = self.result
        assert result is not None
        if not len(blocks):
            return
        bad = np.flatnonzero(blocks >= result.nr_blocks)
        if len(bad):
            i = int(bad[0])
            raise XmlInputError(f"<era block=\"{int(blocks[i])}\"> is outside the era array "
                                f"of {result.nr_blocks} blocks", line=line_of(i))
        bad = np.flatnonzero(eras > result.current_era)
        if len(bad):
            raise XmlInputError(f"<era era=\"{int(eras[bad[0]])}\"> is after the current era "
                                f"{result.current_era}", line=line_of(int(bad[0])))
        if self.eras_ascending:
            self.eras_ascending = int(blocks[0]) > self.last_era_block and (
                len(blocks) == 1 or bool(np.all(blocks[1:] > blocks[:-1])))
            self.last_era_block = int(blocks[-1])
        if self.keep_eras:
            result.era_array[blocks.astype(np.intp)] = eras.astype(np.uint32)
        if self.on_eras is not None:
            self.on_eras(blocks, eras)

    def finish(self) -> EraDescription:
        if self.result is None:
            raise XmlInputError("no <superblock> element: is this era_dump output?")
        if not self.finished:
            raise XmlInputError(f"the document ends inside <{self.stack[-1]}> (truncated?)")
        return self.result


# -- the general tag parser (also used by the fast path for its odd tags) ------------------------
_TAG_RE = re.compile(rb"<\s*(/?)\s*([A-Za-z_][\w.:-]*)((?:\s+[^\s=/>]+\s*=\s*(?:\"[^\"]*\"|'[^']*'))*)\s*(/?)\s*>\Z")
_ATTR_RE = re.compile(rb"([^\s=/>]+)\s*=\s*(?:\"([^\"]*)\"|'([^']*)')")


def _parse_tag(text: bytes, line: int) -> tuple[bool, str, dict[str, str], bool]:
    """(closing, name, attributes, self_closing) of one tag's text."""
    match = _TAG_RE.match(text)
    if not match:
        shown = text[:80].decode("utf-8", "replace")
        raise XmlInputError(f"malformed tag {shown!r}", line=line)
    closing, name, attr_text, self_closing = match.groups()
    attrs: dict[str, str] = {}
    for attr in _ATTR_RE.finditer(attr_text):
        key = attr.group(1).decode("utf-8", "replace")
        value = attr.group(2) if attr.group(2) is not None else attr.group(3)
        attrs[key] = value.decode("utf-8", "replace")
    if closing and (attrs or self_closing):
        raise XmlInputError(f"malformed closing tag </{name.decode()}>", line=line)
    return bool(closing), name.decode(), attrs, bool(self_closing)


# -- the fast path -------------------------------------------------------------------------------
_MAX_DIGITS = 10


class _NotCanonical(Exception):
    """The buffer uses XML features the fast path leaves to expat."""


def _u64_view(c: np.ndarray) -> np.ndarray:
    """Little-endian u64 loads at every byte offset of `c` (unaligned, read-only)."""
    if len(c) < 8:
        return np.zeros(0, dtype="<u8")
    return np.ndarray((len(c) - 7,), dtype="<u8", buffer=c, strides=(1,))


def _match(c64: np.ndarray, positions: np.ndarray, literal: bytes) -> np.ndarray:
    """Which `positions` start `literal`, comparing 8 bytes per load."""
    ok = positions + len(literal) <= len(c64) + 7
    safe = np.where(ok, positions, 0)
    for off in range(0, len(literal), 8):
        part = literal[off: off + 8]
        want = np.uint64(int.from_bytes(part, "little"))
        word = c64[np.minimum(safe + off, len(c64) - 1)]
        if len(part) < 8:
            word = word & np.uint64((1 << (8 * len(part))) - 1)
        ok &= word == want
    return ok


_ZEROS = np.uint64(0x3030303030303030)
_HIGH_NIBBLES = np.uint64(0xF0F0F0F0F0F0F0F0)
_SIX = np.uint64(0x0606060606060606)


def _swar8(c64: np.ndarray, end: np.ndarray, ndig: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Values and validity of the last min(ndig, 8) characters before `end` as decimal
    digits, eight at a time in a u64 (SWAR)."""
    n8 = np.minimum(ndig, 8).astype(np.uint64)
    word = c64[np.maximum(end - 8, 0)]
    keep = ~((np.uint64(1) << (np.uint64(8) * (np.uint64(8) - n8))) - np.uint64(1))
    keep[n8 == 0] = np.uint64(0)
    word = (word & keep) | (_ZEROS & ~keep)
    ok = ((word & _HIGH_NIBBLES) == _ZEROS) & (((word + _SIX) & _HIGH_NIBBLES) == _ZEROS)
    x = word - _ZEROS
    x = (x * np.uint64(10) + (x >> np.uint64(8))) & np.uint64(0x00FF00FF00FF00FF)
    x = (x * np.uint64(100) + (x >> np.uint64(16))) & np.uint64(0x0000FFFF0000FFFF)
    x = (x * np.uint64(10000) + (x >> np.uint64(32))) & np.uint64(0xFFFFFFFF)
    return x, ok


def _decimal(c: np.ndarray, c64: np.ndarray, begin: np.ndarray, end: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray]:
    """(values, ok) of the decimal numbers occupying [begin, end) (1 to 10 digits)."""
    ndig = end - begin
    ok = (ndig >= 1) & (ndig <= _MAX_DIGITS) & (begin >= 8)
    low, low_ok = _swar8(c64, end, np.where(ok, ndig, 0))
    ok &= low_ok
    long = np.flatnonzero(ok & (ndig > 8))
    if len(long):
        high, high_ok = _swar8(c64, end[long] - 8, ndig[long] - 8)
        low[long] += high * np.uint64(100_000_000)
        ok[long] &= high_ok
    return low, ok


def _whitespace(values: np.ndarray) -> np.ndarray:
    return (values == 32) | (values == 10) | (values == 9) | (values == 13)


class _FastScanner:
    def __init__(self, data: mmap.mmap | bytes | BinaryIO, builder: _Builder) -> None:
        self.data = data
        self.builder = builder
        self.lines_before = 0
        self.newlines = np.zeros(0, dtype=np.intp)

    def line_of(self, chunk: np.ndarray, offset: int) -> int:
        return self.lines_before + int(np.searchsorted(self.newlines, offset)) + 1

    def run(self) -> None:
        if not isinstance(self.data, (bytes, bytearray, mmap.mmap)):
            self._run_file(self.data)
            return
        data = self.data
        size = len(data)
        start = 0
        if data[:5] == b"<?xml":
            end = data.find(b"?>")
            if end < 0:
                raise _NotCanonical()
            start = end + 2
            self.lines_before = data[:start].count(b"\n")
        while start < size:
            stop = data.find(b">", min(size, start + CHUNK_BYTES))
            stop = size if stop < 0 else stop + 1
            chunk = np.frombuffer(data, dtype=np.uint8, count=stop - start, offset=start)
            self.newlines = np.flatnonzero(chunk == 10)
            self.scan_chunk(chunk)
            self.lines_before += len(self.newlines)
            del chunk
            if isinstance(data, mmap.mmap):
                data.madvise(mmap.MADV_DONTNEED, start - start % mmap.PAGESIZE,
                             stop - start + start % mmap.PAGESIZE)
            start = stop

    def _run_file(self, f: BinaryIO) -> None:
        """`run` over a file read CHUNK_BYTES at a time: each chunk ends after its last '>',
        the rest is carried into the next one (so only about two chunks are ever held)."""
        carry = b""
        first = True
        while True:
            block = f.read(CHUNK_BYTES)
            data = carry + block if carry else block
            if first:
                first = False
                if data[:5] == b"<?xml":
                    end = data.find(b"?>")
                    if end < 0:
                        raise _NotCanonical()
                    self.lines_before = data[: end + 2].count(b"\n")
                    data = data[end + 2:]
            if block:
                stop = data.rfind(b">") + 1
                if stop == 0:
                    carry = data
                    continue
            else:
                stop = len(data)
            if stop:
                chunk = np.frombuffer(data, dtype=np.uint8, count=stop)
                self.newlines = np.flatnonzero(chunk == 10)
                self.scan_chunk(chunk)
                self.lines_before += len(self.newlines)
                del chunk
            carry = data[stop:]
            if not block:
                return

    def _check_gaps(self, c: np.ndarray, lt: np.ndarray, gt: np.ndarray) -> None:
        """Only whitespace may lie between tags (and before the first / after the last)."""
        begins = np.concatenate(([0], gt + 1))
        ends = np.concatenate((lt, [len(c)]))
        lengths = ends - begins
        longest = int(lengths.max()) if len(lengths) else 0
        bad_at: int | None = None
        if longest <= 64:
            for k in range(longest):
                live = np.flatnonzero(lengths > k)
                pos = begins[live] + k
                bad = ~_whitespace(c[pos])
                if bad.any():
                    bad_at = int(pos[np.argmax(bad)])
                    break
        else:
            delta = np.zeros(len(c) + 1, dtype=np.int8)
            delta[lt] = 1
            delta[gt + 1] -= 1
            outside = np.cumsum(delta[:-1], dtype=np.int8) == 0
            bad = outside & ~_whitespace(c)
            if bad.any():
                bad_at = int(np.argmax(bad))
        if bad_at is not None:
            raise XmlInputError("text outside elements (only whitespace may appear between "
                                "tags)", line=self.line_of(c, bad_at))

    def scan_chunk(self, c: np.ndarray) -> None:
        lt = np.flatnonzero(c == 60)
        gt = np.flatnonzero(c == 62)
        if len(lt) != len(gt) or (len(lt) and (np.any(gt < lt) or np.any(lt[1:] < gt[:-1]))):
            raise _NotCanonical()
        self._check_gaps(c, lt, gt)
        if not len(lt):
            return
        if np.any(np.isin(c[lt + 1], (33, 63))) or bool((c == 38).any()):
            raise _NotCanonical()   # comments, DOCTYPE, CDATA, processing instructions, entities
        c64 = _u64_view(c)
        quotes = np.flatnonzero(c == 34)
        first_q = np.searchsorted(quotes, lt)
        nr_q = np.searchsorted(quotes, gt) - first_q
        cand = np.flatnonzero((nr_q == 4) & (c[gt - 1] == 47) & (gt - lt > 12))
        qidx = first_q[cand]
        q1, q2, q3, q4 = (quotes[np.minimum(qidx + j, len(quotes) - 1)] for j in range(4))
        start, close = lt[cand], gt[cand]
        common = (q1 == start + 11) & (close == q4 + 2)
        number1, ok1 = _decimal(c, c64, q1 + 1, q2)
        # <bit block="N" value="true|false"/>
        bit_ok = common & ok1 & _match(c64, start, b"<bit block=") & (q3 == q2 + 8) \
            & _match(c64, q2, b'" value="')
        is_true = (q4 == q3 + 5) & _match(c64, q3 + 1, b"true")
        is_false = (q4 == q3 + 6) & _match(c64, q3 + 1, b"false")
        bit_ok &= is_true | is_false
        # <era block="N" era="M"/>
        number2, ok2 = _decimal(c, c64, q3 + 1, q4)
        era_ok = common & ok1 & ok2 & _match(c64, start, b"<era block=") & (q3 == q2 + 6) \
            & _match(c64, q2, b'" era="')
        bit_idx = cand[bit_ok]
        bit_blocks = number1[bit_ok]
        bit_values = is_true[bit_ok]
        era_idx = cand[era_ok]
        era_blocks = number1[era_ok]
        era_values = number2[era_ok]
        kind = np.full(len(lt), 2, dtype=np.int8)      # 0 bit, 1 era, 2 other
        kind[bit_idx] = 0
        kind[era_idx] = 1
        others = np.flatnonzero(kind == 2).tolist()
        if len(others) > 1000 and len(others) * 10 > len(lt):
            raise _NotCanonical()   # mostly hand-formatted: expat is faster tag by tag
        boundaries = others + [len(lt)]
        prev = 0
        b = self.builder
        for tag_index in boundaries:
            # bulk tags between the previous odd tag and this one
            lo_b, hi_b = np.searchsorted(bit_idx, [prev, tag_index])
            if hi_b > lo_b:
                first = int(bit_idx[lo_b])
                b._context("writeset", "bit", self.line_of(c, int(lt[first])))
                b.bits(bit_blocks[lo_b:hi_b], bit_values[lo_b:hi_b],
                       lambda i, lo=lo_b: self.line_of(c, int(lt[bit_idx[lo + i]])))
            lo_e, hi_e = np.searchsorted(era_idx, [prev, tag_index])
            if hi_e > lo_e:
                first = int(era_idx[lo_e])
                b._context("era_array", "era", self.line_of(c, int(lt[first])))
                b.eras(era_blocks[lo_e:hi_e], era_values[lo_e:hi_e],
                       lambda i, lo=lo_e: self.line_of(c, int(lt[era_idx[lo + i]])))
            if tag_index == len(lt):
                break
            text = c[lt[tag_index]: gt[tag_index] + 1].tobytes()
            line = self.line_of(c, int(lt[tag_index]))
            if text.startswith(b"<?") or text.startswith(b"<!"):
                raise _NotCanonical()
            closing, name, attrs, self_closing = _parse_tag(text, line)
            if closing:
                b.end(name, line)
            else:
                b.start(name, attrs, line)
                if self_closing:
                    b.end(name, line)
            prev = tag_index + 1


def _parse_with_expat(data: bytes | mmap.mmap | BinaryIO, builder: _Builder | None = None
                      ) -> EraDescription:
    builder = builder or _Builder()
    parser = xml.parsers.expat.ParserCreate()
    parser.buffer_text = True

    def start(name: str, attrs: dict[str, str]) -> None:
        builder.start(name, attrs, parser.CurrentLineNumber)

    def end(name: str) -> None:
        builder.end(name, parser.CurrentLineNumber)

    def text(content: str) -> None:
        if content.strip():
            raise XmlInputError("text outside elements (only whitespace may appear between "
                                "tags)", line=parser.CurrentLineNumber)

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = text
    try:
        if isinstance(data, (bytes, bytearray, mmap.mmap)):
            parser.Parse(bytes(data), True)
        else:
            parser.ParseFile(data)
    except xml.parsers.expat.ExpatError as exc:
        raise XmlInputError(f"not well-formed XML: {xml.parsers.expat.ErrorString(exc.code)}",
                            line=exc.lineno) from None
    return builder.finish()


def parse_era_xml(path: str | Path, metadata_blocks: int | None = None) -> EraDescription:
    """Parse an era metadata XML file; "-" is standard input. A regular file is mapped,
    anything else (a pipe) is read whole. With `metadata_blocks`, input whose arrays cannot fit
    that many metadata blocks is refused before their memory is allocated."""
    with EraXmlSource(path) as source:
        return source.parse(metadata_blocks)


class EraXmlSource:
    """An era XML input opened for one or more passes: a regular file is read a chunk at a
    time (again for each pass), anything else (standard input "-", a pipe) is read whole once.

    `describe()` parses everything once, checking it all, and holds the writesets' bits but
    not the era array when the entries come in ascending block order (as era_dump writes
    them) and the input can be read again; `replay_eras()` then parses again, handing the
    entries over as they come, so a restore writes the era array without ever holding it."""

    def __init__(self, path: str | Path) -> None:
        self.path = path
        self.data: bytes | None = None
        try:
            if str(path) == "-":
                self.data = sys.stdin.buffer.read()
            else:
                with open(path, "rb") as f:
                    if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                        self.data = f.read()
                    elif f.seek(0, 2) == 0:
                        self.data = b""
        except OSError as exc:
            raise DeviceError(f"{path}: cannot read input: {exc.strerror}") from None
        if self.data is not None and not self.data:
            raise XmlInputError(f"{path}: the input is empty")
        self.eras_streamed = False
        self._entries = 0

    def __enter__(self) -> "EraXmlSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.data = None

    def _pass(self, builder: _Builder) -> EraDescription:
        if self.data is not None:
            return _parse(self.data, builder)
        try:
            with open(self.path, "rb") as f:
                return _parse(f, builder)
        except OSError as exc:
            raise DeviceError(f"{self.path}: cannot read input: {exc.strerror}") from None

    def parse(self, metadata_blocks: int | None = None) -> EraDescription:
        """Everything, the era array included."""
        return self._pass(_Builder(metadata_blocks))

    def describe(self, metadata_blocks: int | None = None) -> EraDescription:
        """Everything checked; the era array is left out (`eras_streamed`, see `replay_eras`)
        when that is possible, else included as by `parse`."""
        if self.data is not None:
            return self.parse(metadata_blocks)
        counter = _Counter()
        builder = _Builder(metadata_blocks, keep_eras=False, on_eras=counter)
        try:
            desc = self._pass(builder)
        except _NotCanonical:          # hand-formatted XML: expat, one pass
            return self.parse(metadata_blocks)
        if not builder.eras_ascending:
            return self.parse(metadata_blocks)
        self.eras_streamed = True
        self._entries = counter.entries
        return desc

    def replay_eras(self, on_eras: Callable[[np.ndarray, np.ndarray], None]) -> None:
        """Parse again (after `describe` left the era array out), calling `on_eras(blocks,
        eras)` with the era entries in ascending block order."""
        assert self.eras_streamed
        counter = _Counter()

        def entries(blocks: np.ndarray, eras: np.ndarray) -> None:
            counter(blocks, eras)
            on_eras(blocks, eras)

        builder = _Builder(None, keep_eras=False, keep_bits=False, on_eras=entries)
        try:
            self._pass(builder)
        except _NotCanonical:
            raise XmlInputError(f"{self.path}: the input changed while it was being "
                                "restored") from None
        if not builder.eras_ascending or counter.entries != self._entries:
            raise XmlInputError(f"{self.path}: the input changed while it was being restored")


class _Counter:
    def __init__(self) -> None:
        self.entries = 0

    def __call__(self, blocks: np.ndarray, eras: np.ndarray) -> None:
        self.entries += len(blocks)


def parse_era_xml_bytes(data: bytes | mmap.mmap,
                        metadata_blocks: int | None = None) -> EraDescription:
    return _parse(data, _Builder(metadata_blocks))


def _parse(data: bytes | mmap.mmap | BinaryIO, builder: _Builder) -> EraDescription:
    """The fast scanner, else expat (which starts again from the beginning: a builder that
    hands entries on as they come must not go there, see `EraXmlSource.describe`)."""
    try:
        _FastScanner(data, builder).run()
    except _NotCanonical:
        if builder.on_eras is not None:
            raise
        if not isinstance(data, (bytes, bytearray, mmap.mmap)):
            data.seek(0)
        return _parse_with_expat(data, _Builder(builder.metadata_blocks,
                                                keep_eras=builder.keep_eras,
                                                keep_bits=builder.keep_bits))
    return builder.finish()
