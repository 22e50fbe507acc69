"""IDs and blob types (docs/backup-repository.md §1).

Every file but `config` is named by the SHA-256 of its stored bytes (its storage ID); every blob
is named by the SHA-256 of its plaintext (its blob ID). IDs are 32 bytes, written as 64
lower-case hex digits.
"""

from __future__ import annotations

import enum
import hashlib
import os
import re

ID_BYTES = 32
ID_HEX_DIGITS = 2 * ID_BYTES
_HEX_ID = re.compile(r"^[0-9a-f]{64}$")


class BlobType(enum.Enum):
    """What a blob in a pack holds. Data and tree blobs live in separate packs."""

    DATA = "data"
    TREE = "tree"

    def __str__(self) -> str:
        return self.value


def hash_id(data: bytes | bytearray | memoryview) -> bytes:
    """SHA-256 of `data`: a blob ID or a storage ID."""
    return hashlib.sha256(data).digest()


def random_id() -> bytes:
    return os.urandom(ID_BYTES)


def is_id_hex(name: str) -> bool:
    """Is `name` a full storage ID (64 lower-case hex digits)?"""
    return bool(_HEX_ID.match(name))


def parse_id(text: str, what: str = "ID") -> bytes:
    """A 64-digit hex ID as bytes; ValueError with `what` in the message otherwise."""
    if not isinstance(text, str) or not _HEX_ID.match(text.lower()):
        raise ValueError(f"{what} {text!r} is not 64 hexadecimal digits")
    return bytes.fromhex(text)


def short(id_: bytes) -> str:
    """The 8-digit form restic prints."""
    return id_.hex()[:8]
