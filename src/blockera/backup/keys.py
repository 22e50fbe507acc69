"""Key files: the master key, encrypted under a password (docs/backup-repository.md §3).

`keys/<id>` is plain (unencrypted) JSON, named by the SHA-256 of its bytes:

    {"created":"…","username":"…","hostname":"…","kdf":"scrypt","N":32768,"r":8,"p":3,
     "salt":"<64 bytes, base64>","data":"<IV || AES-CTR(master key JSON) || MAC, base64>"}

scrypt(password, salt, N, r, p) gives 64 bytes: a user key (encryption key, MAC k, MAC r) that
opens `data`, which holds the master key JSON (`{"mac":{"k","r"},"encrypt"}`, base64 fields).
A repository may have several key files (passwords) for the same master key; opening tries
each until one's MAC verifies.

restic chooses scrypt's cost on each machine (`KdfParams.calibrate`, the same rule: N for 60 MiB
of memory, r = 8, p raised until the derivation takes about half a second); any N, r, p it
finds in a key file are used as given.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import json
import os
import pwd
import socket
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from blockera.backup import gojson
from blockera.backup.backend import FileType
from blockera.backup.crypto import MasterKey
from blockera.backup.errors import (BackendNotFoundError, IntegrityError, RepositoryFormatError,
                                    WrongPasswordError)
from blockera.backup.gojson import GoTime
from blockera.backup.ids import hash_id, is_id_hex

if TYPE_CHECKING:
    from blockera.backup.backend import Backend

SALT_BYTES = 64
"""restic accepts exactly 64 bytes of salt."""
KDF_OUTPUT_BYTES = 64
KDF_TIMEOUT_S = 0.5
KDF_MEMORY_MIB = 60
KDF_MAX_MEMORY_BYTES = 2 << 30
"""Refuse key files asking scrypt for more memory than this."""


@dataclass(frozen=True)
class KdfParams:
    """scrypt's cost parameters."""

    n: int
    r: int
    p: int

    def check(self) -> None:
        """The limits restic (simple-scrypt) enforces, plus a memory cap."""
        max_int = (1 << 31) - 1
        if not (1 < self.n <= max_int) or self.n & (self.n - 1):
            raise ValueError(f"scrypt N={self.n} must be a power of two above 1")
        if self.r < 1 or self.p < 1 or self.r * self.p >= 1 << 30:
            raise ValueError(f"scrypt r={self.r}, p={self.p} are out of range")
        if self.r > max_int // 128 // self.p or self.r > max_int // 256 \
                or self.n > max_int // 128 // self.r:
            raise ValueError(f"scrypt parameters N={self.n}, r={self.r}, p={self.p} are too "
                             "large")
        if self.memory_bytes() > KDF_MAX_MEMORY_BYTES:
            raise ValueError(f"scrypt N={self.n}, r={self.r} would need "
                             f"{self.memory_bytes() >> 20} MiB")

    def memory_bytes(self) -> int:
        return 128 * self.r * (self.n + self.p + 2)

    def derive(self, password: bytes, salt: bytes, *, cores: int | None = None) -> bytes:
        """The 64 bytes of scrypt. Its p lanes are independent; OpenSSL (hashlib) and restic
        run them one after another, pycryptodome runs them on `cores` threads (default:
        every core, as many as `KDF_MAX_MEMORY_BYTES` holds at 128·r·N bytes a lane)
        with the same result."""
        from Crypto.Protocol.KDF import scrypt

        self.check()
        threads = min(self.p, cores if cores is not None else os.cpu_count() or 1,
                      KDF_MAX_MEMORY_BYTES // (128 * self.r * self.n))   # >= 1 once checked
        return scrypt(password, salt, KDF_OUTPUT_BYTES, self.n, self.r, self.p,
                      threads=threads)

    def derive_on_one_core(self, password: bytes, salt: bytes) -> bytes:
        """The same bytes by OpenSSL on one core, restic's way (for `calibrate`)."""
        self.check()
        return hashlib.scrypt(password, salt=salt, n=self.n, r=self.r, p=self.p,
                              maxmem=self.memory_bytes() + (1 << 20), dklen=KDF_OUTPUT_BYTES)

    @classmethod
    def calibrate(cls, timeout_s: float = KDF_TIMEOUT_S,
                  memory_mib: int = KDF_MEMORY_MIB) -> "KdfParams":
        """restic's choice for a new key on this machine: the largest power-of-two N whose
        memory (128·r·N) stays under `memory_mib`, halved while one derivation exceeds the
        timeout; then p as high as fits in the timeout. Timed as restic derives (OpenSSL's
        scrypt, like Go's, on one core): a key made here costs restic what it would cost had
        restic made it."""
        salt = os.urandom(SALT_BYTES)
        r = 8
        n = n_for_memory(memory_mib, r)

        def run(params: "KdfParams") -> float:
            start = time.perf_counter()
            params.derive_on_one_core(b"weakpassword", salt)
            return time.perf_counter() - start

        duration = run(cls(n, r, 1))
        while duration > timeout_s and n > 2:
            n >>= 1
            duration = run(cls(n, r, 1))
        p = max(1, int(timeout_s / duration))
        duration = run(cls(n, r, p))
        while duration > timeout_s and p > 1:
            p = max(1, int(timeout_s / (duration / p)))
            duration = run(cls(n, r, p))
        return cls(n, r, p)


def n_for_memory(memory_mib: int, r: int = 8) -> int:
    """The largest power-of-two N whose 128·r·N bytes stay below `memory_mib` (restic: 32768
    for its 60 MiB)."""
    n = 1
    while 128 * r * n < memory_mib << 20:
        n <<= 1
    return max(2, n >> 1)


_calibrated: KdfParams | None = None


def default_kdf_params() -> KdfParams:
    """The calibrated parameters, measured once per process (as restic does)."""
    global _calibrated
    if _calibrated is None:
        _calibrated = KdfParams.calibrate()
    return _calibrated


def _password_bytes(password: str | bytes) -> bytes:
    return password.encode("utf-8") if isinstance(password, str) else bytes(password)


def current_username() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return getpass.getuser()


@dataclass(frozen=True)
class KeyFile:
    """One `keys/<id>` file."""

    created: GoTime
    username: str
    hostname: str
    kdf: str
    params: KdfParams
    salt: bytes
    data: bytes
    name: str = ""

    def encode(self) -> bytes:
        return gojson.obj([
            ("created", self.created.json()),
            ("username", gojson.string(self.username)),
            ("hostname", gojson.string(self.hostname)),
            ("kdf", gojson.string(self.kdf)),
            ("N", str(self.params.n)),
            ("r", str(self.params.r)),
            ("p", str(self.params.p)),
            ("salt", gojson.bytes_b64(self.salt)),
            ("data", gojson.bytes_b64(self.data)),
        ]).encode("utf-8")

    @classmethod
    def decode(cls, raw: bytes, name: str, location: str) -> "KeyFile":
        what = f"key {name[:8]} in {location}"
        try:
            doc = json.loads(raw)
            return cls(created=GoTime.parse(doc.get("created") or "0001-01-01T00:00:00Z"),
                       username=doc.get("username") or "",
                       hostname=doc.get("hostname") or "",
                       kdf=doc["kdf"],
                       params=KdfParams(int(doc["N"]), int(doc["r"]), int(doc["p"])),
                       salt=base64.b64decode(doc["salt"], validate=True),
                       data=base64.b64decode(doc["data"], validate=True),
                       name=name)
        except (ValueError, KeyError, TypeError) as exc:
            raise RepositoryFormatError(f"{what} is not a key file ({exc})") from None

    def user_key(self, password: str | bytes) -> MasterKey:
        what = f"key {self.name[:8]}"
        if self.kdf != "scrypt":
            raise RepositoryFormatError(f"{what}: key derivation {self.kdf!r} is not supported "
                                        "(only scrypt)")
        if len(self.salt) != SALT_BYTES:
            raise RepositoryFormatError(f"{what}: salt is {len(self.salt)} bytes, "
                                        f"not {SALT_BYTES}")
        try:
            derived = self.params.derive(_password_bytes(password), self.salt)
        except ValueError as exc:
            raise RepositoryFormatError(f"{what}: {exc}") from None
        return MasterKey.from_kdf_output(derived)

    def open(self, password: str | bytes) -> MasterKey | None:
        """The master key, or None when the password does not fit this key file."""
        user = self.user_key(password)
        if not user.authentic(self.data):
            return None
        what = f"key {self.name[:8]}"
        return MasterKey.from_json(user.decrypt(self.data, what), what)


def make_key_file(password: str | bytes, master: MasterKey, params: KdfParams,
                  username: str | None = None, hostname: str | None = None) -> KeyFile:
    """A new key file for `master`, protected by `password`."""
    params.check()
    salt = os.urandom(SALT_BYTES)
    user = MasterKey.from_kdf_output(params.derive(_password_bytes(password), salt))
    data = user.encrypt(master.to_json())
    key = KeyFile(created=GoTime.now(),
                  username=current_username() if username is None else username,
                  hostname=socket.gethostname() if hostname is None else hostname,
                  kdf="scrypt", params=params, salt=salt, data=data)
    raw = key.encode()
    return replace(key, name=hash_id(raw).hex())


def save_key_file(backend: "Backend", key: KeyFile) -> str:
    raw = key.encode()
    name = hash_id(raw).hex()
    backend.save(FileType.KEY, name, raw)
    return name


def load_key_file(backend: "Backend", name: str) -> KeyFile:
    raw = backend.load(FileType.KEY, name)
    if hash_id(raw).hex() != name:
        raise IntegrityError(f"key {name[:8]} in {backend.location}: content does not match "
                             "its name")
    return KeyFile.decode(raw, name, backend.location)


def list_key_names(backend: "Backend") -> list[str]:
    return sorted(fi.name for fi in backend.list(FileType.KEY) if is_id_hex(fi.name))


def open_master_key(backend: "Backend", password: str | bytes,
                    key_hint: str | None = None) -> tuple[str, MasterKey]:
    """Try the key files (the hinted one first) until one opens with `password`."""
    names = list_key_names(backend)
    if key_hint:
        hinted = [n for n in names if n.startswith(key_hint)]
        names = hinted + [n for n in names if n not in hinted]
    damaged: list[str] = []
    for name in names:
        try:
            key = load_key_file(backend, name)
            master = key.open(password)
        except (RepositoryFormatError, IntegrityError, BackendNotFoundError) as exc:
            damaged.append(f"{name[:8]}: {exc}")
            continue
        if master is not None:
            return name, master
    if not names:
        raise WrongPasswordError(f"{backend.location}: the repository has no key files, so no "
                                 "password can open it")
    detail = f" ({len(damaged)} key files could not be read: {'; '.join(damaged)})" \
        if damaged else ""
    raise WrongPasswordError(f"{backend.location}: wrong password: none of the "
                             f"{len(names)} key files opens with it{detail}")
