"""The repository config (docs/backup-repository.md §4).

`config` is encrypted with the master key and holds plain JSON (never compressed, even in
version 2):

    {"version":2,"id":"<32 random bytes, hex>","chunker_polynomial":"<hex>"}

The chunker polynomial parameterises restic's content-defined chunking: a random irreducible
polynomial of degree 53 over GF(2). blockera cuts fixed-size blobs and never uses it, but restic
refuses to open a repository whose polynomial is reducible, so a new one is drawn exactly as
restic's chunker does: 64 random bits, masked to bits 0..53, bits 53 and 0 set, kept if Ben-Or's
test says irreducible.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from blockera.backup import gojson
from blockera.backup.errors import RepositoryFormatError
from blockera.backup.ids import ID_HEX_DIGITS, random_id

MIN_VERSION = 1
MAX_VERSION = 2
STABLE_VERSION = 2
POLYNOMIAL_DEGREE = 53
_RANDOM_POLYNOMIAL_TRIES = 1_000_000


# -- polynomials over GF(2), as Python ints (bit i = coefficient of x^i) ------------------------

def pol_degree(x: int) -> int:
    return x.bit_length() - 1


def pol_mod(x: int, d: int) -> int:
    if d == 0:
        raise ZeroDivisionError("polynomial division by zero")
    deg_d = d.bit_length()
    while x.bit_length() >= deg_d:
        x ^= d << (x.bit_length() - deg_d)
    return x


def pol_mulmod(x: int, f: int, g: int) -> int:
    """x·f mod g (carry-less multiplication)."""
    result = 0
    x = pol_mod(x, g)
    while f:
        if f & 1:
            result ^= x
        f >>= 1
        x <<= 1
        if x.bit_length() == g.bit_length():
            x ^= g
    return pol_mod(result, g)


def pol_gcd(x: int, f: int) -> int:
    while f:
        x, f = f, pol_mod(x, f)
    return x


def _qp(p: int, g: int) -> int:
    """(x^(2^p) − x) mod g."""
    res = 2  # x
    for _ in range(p):
        res = pol_mulmod(res, res, g)
    return pol_mod(res ^ 2, g)


def is_irreducible(pol: int) -> bool:
    """Ben-Or's test, as restic's chunker applies it: gcd(pol, x^(2^i) − x mod pol) = 1 for
    every i up to deg/2."""
    if pol < 2:
        return False
    for i in range(1, pol_degree(pol) // 2 + 1):
        if pol_gcd(pol, _qp(i, pol)) != 1:
            return False
    return True


def random_polynomial() -> int:
    """A random irreducible polynomial of degree 53."""
    for _ in range(_RANDOM_POLYNOMIAL_TRIES):
        f = int.from_bytes(os.urandom(8), "little")
        f &= (1 << 54) - 1
        f |= (1 << POLYNOMIAL_DEGREE) | 1
        if is_irreducible(f):
            return f
    raise RuntimeError("no irreducible polynomial found")  # pragma: no cover


@dataclass(frozen=True)
class RepoConfig:
    version: int
    id: str
    chunker_polynomial: int

    @classmethod
    def new(cls, version: int = STABLE_VERSION) -> "RepoConfig":
        if not MIN_VERSION <= version <= MAX_VERSION:
            raise ValueError(f"repository version {version} is not {MIN_VERSION} or "
                             f"{MAX_VERSION}")
        return cls(version, random_id().hex(), random_polynomial())

    def encode(self) -> bytes:
        return gojson.obj([
            ("version", str(self.version)),
            ("id", gojson.string(self.id)),
            ("chunker_polynomial", f'"{self.chunker_polynomial:x}"'),
        ]).encode("ascii")

    @classmethod
    def decode(cls, raw: bytes, location: str) -> "RepoConfig":
        what = f"{location}: config"
        try:
            doc = json.loads(raw)
            version = doc["version"]
            repo_id = doc["id"]
            pol = int(doc["chunker_polynomial"], 16)
        except (ValueError, KeyError, TypeError) as exc:
            raise RepositoryFormatError(f"{what} is malformed ({exc})") from None
        if not isinstance(version, int) or not MIN_VERSION <= version <= MAX_VERSION:
            raise RepositoryFormatError(f"{what}: repository version {version!r} is not "
                                        f"supported (only {MIN_VERSION} and {MAX_VERSION})")
        if not isinstance(repo_id, str) or len(repo_id) != ID_HEX_DIGITS:
            raise RepositoryFormatError(f"{what}: repository id {repo_id!r} is malformed")
        if not is_irreducible(pol):
            raise RepositoryFormatError(f"{what}: chunker polynomial {pol:x} is not "
                                        "irreducible (restic would refuse this repository)")
        return cls(version, repo_id, pol)
