"""zstd compression of blobs and of unpacked files (docs/backup-repository.md §5, §6).

Repository format version 2 compresses with zstd:

* blobs, one frame per blob, each blob compressed or not on its own (the pack header and the
  index say which); blockera keeps a blob uncompressed when compressing does not make it
  smaller;
* index, snapshot and lock files ("unpacked" files): the plaintext is `0x02 || zstd(JSON)`.
  A plaintext starting with `{` or `[` is plain JSON (version 1, or an old writer); the config
  file is always plain JSON.

restic's frames carry no content size, so decompression streams, with a cap on the output: the
known length for a blob, a generous bound for unpacked files.

Compressors are not shared between threads: each thread gets its own.
"""

from __future__ import annotations

import threading

try:  # Python 3.14 has zstd in the standard library
    from compression import zstd as _zstd  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the Python version
    from backports import zstd as _zstd  # type: ignore[no-redef]

from blockera.backup.errors import IntegrityError, RepositoryFormatError

ZSTD_LEVEL = 3
UNPACKED_ENCODING_ZSTD = 2
UNPACKED_MAX_BYTES = 1 << 30
"""Refuse to inflate an index, snapshot or lock file beyond this (restic's are far smaller)."""

_local = threading.local()


def _compressor() -> "_zstd.ZstdCompressor":
    comp = getattr(_local, "compressor", None)
    if comp is None:
        comp = _zstd.ZstdCompressor(level=ZSTD_LEVEL)
        _local.compressor = comp
    return comp


def compress(data: bytes | bytearray | memoryview) -> bytes:
    """One complete zstd frame holding `data` (this thread's compressor, level 3)."""
    return _compressor().compress(data, mode=_zstd.ZstdCompressor.FLUSH_FRAME)


def decompress(frame: bytes | bytearray | memoryview, max_bytes: int, what: str,
               expected_bytes: int | None = None) -> bytes:
    """Inflate one or more zstd frames, never producing more than `max_bytes`; with
    `expected_bytes`, the result must be exactly that long."""
    dec = _zstd.ZstdDecompressor()
    try:
        out = dec.decompress(frame, max_length=max_bytes + 1)
    except _zstd.ZstdError as exc:
        raise IntegrityError(f"{what}: zstd data is damaged ({exc})") from None
    if len(out) > max_bytes:
        raise RepositoryFormatError(f"{what}: decompresses to more than {max_bytes} bytes")
    if not dec.eof:
        raise IntegrityError(f"{what}: zstd data is truncated")
    rest = dec.unused_data
    if rest:  # several frames concatenated: zstd allows it
        out += decompress(rest, max_bytes - len(out), what)
    if expected_bytes is not None and len(out) != expected_bytes:
        raise IntegrityError(f"{what}: decompressed to {len(out)} bytes, the index says "
                             f"{expected_bytes}")
    return out


def encode_unpacked(json_bytes: bytes, repo_version: int) -> bytes:
    """The plaintext of an index, snapshot or lock file."""
    if repo_version < 2:
        return json_bytes
    return bytes([UNPACKED_ENCODING_ZSTD]) + compress(json_bytes)


def decode_unpacked(plaintext: bytes, repo_version: int, what: str) -> bytes:
    """The JSON inside an index, snapshot or lock file's plaintext."""
    if repo_version < 2 or not plaintext or plaintext[:1] in (b"{", b"["):
        return plaintext
    if plaintext[0] != UNPACKED_ENCODING_ZSTD:
        raise RepositoryFormatError(f"{what}: unknown encoding version {plaintext[0]} "
                                    "(this blockera understands plain JSON and 2 = zstd)")
    return decompress(memoryview(plaintext)[1:], UNPACKED_MAX_BYTES, what)
