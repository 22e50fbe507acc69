"""Shared pieces of the input fuzzers: fixed seeds, a scale for longer hunts, byte mutations,
and the rule every fuzzer checks (an input is either accepted or refused with a BlockeraError;
anything else is an internal error).

`BLOCKERA_FUZZ_SCALE=N` multiplies every fuzzer's case count (CI runs 1); `BLOCKERA_FUZZ_SEED`
moves all of them to other seeds, for a background hunt:

    BLOCKERA_FUZZ_SCALE=50 BLOCKERA_FUZZ_SEED=7 python3 -m pytest tests/hardening -k fuzz
"""

from __future__ import annotations

import os
import random
from collections import Counter
from dataclasses import dataclass, field

from blockera.blockdev import MemoryDevice

SCALE = int(os.environ.get("BLOCKERA_FUZZ_SCALE", "1"))
SEED = int(os.environ.get("BLOCKERA_FUZZ_SEED", "0"))


def cases(base: int) -> int:
    return base * SCALE


def rng_for(name: str) -> random.Random:
    """A generator whose seed depends only on the fuzzer's name and BLOCKERA_FUZZ_SEED."""
    return random.Random(f"{name}:{SEED}")


INTERESTING_NUMBERS = [b"0", b"1", b"7", b"8", b"4095", b"4096", b"65535", b"2147483647",
                       b"2147483648", b"4294967295", b"4294967296", b"18446744073709551615",
                       b"18446744073709551616", b"-1", b"+3", b"1e3", b"0x10", b"\xc2\xb2",
                       b"\xd9\xa1", b"9" * 400, b""]


def mutate_bytes(data: bytes, rng: random.Random, *, max_edits: int = 4) -> bytes:
    """Flips, overwrites, insertions, deletions, duplicated or truncated stretches, and
    numbers swapped for interesting ones."""
    out = bytearray(data)
    for _ in range(rng.randint(1, max_edits)):
        if not out:
            out += rng.randbytes(rng.randint(1, 16))
            continue
        pos = rng.randrange(len(out))
        kind = rng.randrange(7)
        if kind == 0:
            out[pos] ^= 1 << rng.randrange(8)
        elif kind == 1:
            out[pos: pos + 4] = rng.randbytes(4)
        elif kind == 2:
            out[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif kind == 3:
            del out[pos: pos + rng.randint(1, 32)]
        elif kind == 4:
            end = min(len(out), pos + rng.randint(1, 200))
            out[pos:pos] = out[pos:end]
        elif kind == 5:
            del out[pos:]
        else:
            digits = [i for i in range(len(out)) if 48 <= out[i] <= 57]
            if digits:
                start = end = rng.choice(digits)
                while start > 0 and 48 <= out[start - 1] <= 57:
                    start -= 1
                while end < len(out) and 48 <= out[end] <= 57:
                    end += 1
                out[start:end] = rng.choice(INTERESTING_NUMBERS)
    return bytes(out)


class ReadOnlyDevice(MemoryDevice):
    """A device a reading tool must never write."""

    def write(self, offset_bytes: int, data: bytes | bytearray | memoryview) -> None:
        raise AssertionError("a read-only tool tried to write")

    def discard(self, offset_bytes: int, length_bytes: int) -> None:
        raise AssertionError("a read-only tool tried to discard")


@dataclass
class Tally:
    """Outcomes of one fuzzer: accepted inputs and refusals by exception class."""

    name: str
    accepted: int = 0
    refused: Counter = field(default_factory=Counter)

    def report(self) -> str:
        refused = ", ".join(f"{n} {k}" for k, n in self.refused.most_common())
        return (f"{self.name}: {self.accepted + sum(self.refused.values())} cases, "
                f"{self.accepted} accepted, refused: {refused or 'none'}; 0 internal errors")
