"""Pack files: blobs, an encrypted header, then its length (docs/backup-repository.md §6).

    blob_1 || … || blob_n || IV || AES-CTR(header) || MAC || header_length (u32 LE)

Each blob is encrypted on its own (`IV || ciphertext || MAC`, its plaintext optionally zstd
compressed first). The header lists the blobs in order, one entry each:

    type 0  data blob        u8 type, u32 LE length, 32-byte ID                 (37 bytes)
    type 1  tree blob        u8 type, u32 LE length, 32-byte ID                 (37 bytes)
    type 2  compressed data  u8 type, u32 LE length, u32 LE raw length, ID      (41 bytes)
    type 3  compressed tree  u8 type, u32 LE length, u32 LE raw length, ID      (41 bytes)

`length` is the stored (encrypted) length; offsets follow from the order. The ID is the SHA-256
of the blob's plaintext before compression. A pack holds data blobs or tree blobs, never both
(version 2 requires it). The pack's name is the SHA-256 of the whole file.

Packs are cut at restic's default target of 16 MiB; the encrypted header may not exceed
16 MiB (restic's limit), so a pack also closes when its header would.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from blockera.backup.crypto import EXTENSION_BYTES, MasterKey
from blockera.backup.errors import RepositoryFormatError
from blockera.backup.ids import ID_BYTES, BlobType, hash_id, short

PACK_SIZE_BYTES = 16 << 20
MIN_PACK_SIZE_BYTES = 4 << 20
MAX_PACK_SIZE_BYTES = 128 << 20
HEADER_LENGTH_BYTES = 4
PLAIN_ENTRY_BYTES = 1 + 4 + ID_BYTES
COMPRESSED_ENTRY_BYTES = 1 + 4 + 4 + ID_BYTES
MAX_HEADER_BYTES = (16 << 20) + HEADER_LENGTH_BYTES
"""restic's limit on the encrypted header plus its length field."""
MIN_PACK_FILE_BYTES = PLAIN_ENTRY_BYTES + EXTENSION_BYTES + HEADER_LENGTH_BYTES
MAX_BLOB_BYTES = (1 << 32) - 1 - EXTENSION_BYTES
"""Lengths are u32 fields."""

_PLAIN = struct.Struct("<BI32s")
_COMPRESSED = struct.Struct("<BII32s")
_TYPE_CODES = {(BlobType.DATA, False): 0, (BlobType.TREE, False): 1,
               (BlobType.DATA, True): 2, (BlobType.TREE, True): 3}


class PackEntry(NamedTuple):
    """One blob in a pack. `uncompressed_length_bytes` is 0 for a blob stored uncompressed
    (then its plaintext is `length_bytes - 32` bytes). (A named tuple: an index of a million
    blobs builds a million of these.)"""

    blob_type: BlobType
    blob_id: bytes
    offset_bytes: int
    length_bytes: int
    uncompressed_length_bytes: int = 0

    @property
    def compressed(self) -> bool:
        return self.uncompressed_length_bytes != 0

    @property
    def plaintext_length_bytes(self) -> int:
        if self.uncompressed_length_bytes:
            return self.uncompressed_length_bytes
        return self.length_bytes - EXTENSION_BYTES

    @property
    def header_entry_bytes(self) -> int:
        return COMPRESSED_ENTRY_BYTES if self.compressed else PLAIN_ENTRY_BYTES


def encode_header(entries: list[PackEntry]) -> bytes:
    out = bytearray()
    for e in entries:
        code = _TYPE_CODES[(e.blob_type, e.compressed)]
        if e.compressed:
            out += _COMPRESSED.pack(code, e.length_bytes, e.uncompressed_length_bytes, e.blob_id)
        else:
            out += _PLAIN.pack(code, e.length_bytes, e.blob_id)
    return bytes(out)


def decode_header(plain: bytes, what: str) -> list[PackEntry]:
    """The entries of a decrypted header, with their offsets."""
    entries: list[PackEntry] = []
    pos = 0
    offset = 0
    while pos < len(plain):
        code = plain[pos]
        if code in (0, 1):
            if pos + PLAIN_ENTRY_BYTES > len(plain):
                raise RepositoryFormatError(f"{what}: header entry {len(entries)} is truncated")
            _, length, blob_id = _PLAIN.unpack_from(plain, pos)
            uncompressed = 0
            pos += PLAIN_ENTRY_BYTES
        elif code in (2, 3):
            if pos + COMPRESSED_ENTRY_BYTES > len(plain):
                raise RepositoryFormatError(f"{what}: header entry {len(entries)} is truncated")
            _, length, uncompressed, blob_id = _COMPRESSED.unpack_from(plain, pos)
            pos += COMPRESSED_ENTRY_BYTES
        else:
            raise RepositoryFormatError(f"{what}: header entry {len(entries)} has invalid blob "
                                        f"type {code}")
        blob_type = BlobType.TREE if code in (1, 3) else BlobType.DATA
        entries.append(PackEntry(blob_type, blob_id, offset, length, uncompressed))
        offset += length
    return entries


def parse_pack_tail(key: MasterKey, tail: bytes, pack_size_bytes: int,
                    what: str) -> list[PackEntry] | int:
    """Entries from the last bytes of a pack. `tail` must end at the end of the file; if it is
    too short to hold the whole header, the number of tail bytes needed is returned instead."""
    if pack_size_bytes < MIN_PACK_FILE_BYTES:
        raise RepositoryFormatError(f"{what}: {pack_size_bytes} bytes is too small for a pack")
    (header_bytes,) = struct.unpack_from("<I", tail, len(tail) - HEADER_LENGTH_BYTES)
    if header_bytes < EXTENSION_BYTES:
        raise RepositoryFormatError(f"{what}: header length {header_bytes} is too small")
    if header_bytes > pack_size_bytes - HEADER_LENGTH_BYTES:
        raise RepositoryFormatError(f"{what}: header length {header_bytes} is larger than the "
                                    "file")
    if header_bytes > MAX_HEADER_BYTES - HEADER_LENGTH_BYTES:
        raise RepositoryFormatError(f"{what}: header length {header_bytes} exceeds restic's "
                                    "limit of 16 MiB")
    needed = header_bytes + HEADER_LENGTH_BYTES
    if len(tail) < needed:
        return needed
    encrypted = tail[len(tail) - needed:len(tail) - HEADER_LENGTH_BYTES]
    entries = decode_header(key.decrypt(encrypted, f"{what} header"), what)
    end = entries[-1].offset_bytes + entries[-1].length_bytes if entries else 0
    if end + needed != pack_size_bytes:
        raise RepositoryFormatError(f"{what}: the header describes {end} bytes of blobs, the "
                                    f"file has {pack_size_bytes - needed}")
    return entries


class PackBuilder:
    """Collects encrypted blobs of one type in memory and closes them into a pack file."""

    def __init__(self, blob_type: BlobType, target_bytes: int = PACK_SIZE_BYTES) -> None:
        self.blob_type = blob_type
        self.target_bytes = target_bytes
        self.entries: list[PackEntry] = []
        self._data = bytearray()
        self.size_bytes = 0
        self._header_plain_bytes = 0

    def add(self, blob_id: bytes, ciphertext: bytes | bytearray,
            uncompressed_length_bytes: int) -> None:
        if len(ciphertext) > (1 << 32) - 1:
            raise ValueError(f"blob {short(blob_id)} is too large for a pack "
                             f"({len(ciphertext)} bytes)")
        entry = PackEntry(self.blob_type, blob_id, self.size_bytes, len(ciphertext),
                          uncompressed_length_bytes)
        self.entries.append(entry)
        self._data += ciphertext
        self.size_bytes += len(ciphertext)
        self._header_plain_bytes += entry.header_entry_bytes

    @property
    def count(self) -> int:
        return len(self.entries)

    def full(self) -> bool:
        header_next = (self._header_plain_bytes + COMPRESSED_ENTRY_BYTES + EXTENSION_BYTES
                       + HEADER_LENGTH_BYTES)
        return self.size_bytes >= self.target_bytes or header_next > MAX_HEADER_BYTES

    def finish(self, key: MasterKey) -> tuple[bytes, bytearray]:
        """(pack ID, pack file bytes)."""
        if not self.entries:
            raise ValueError("an empty pack cannot be written")
        header = key.encrypt(encode_header(self.entries))
        data, self._data = self._data, bytearray()
        data += header
        data += struct.pack("<I", len(header))
        return hash_id(data), data
