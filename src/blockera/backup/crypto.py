"""restic's authenticated encryption (docs/backup-repository.md §2).

Every encrypted object is `IV(16) || AES-256-CTR(ciphertext) || MAC(16)`. The MAC is
Poly1305-AES over the ciphertext only: the one-time Poly1305 key is `r || AES-128_k(IV)`, where
`k` and `r` are the two halves of the 32-byte MAC key and `r` is clamped as Poly1305 requires.
The same 16 random bytes serve as the CTR initial counter block and as the Poly1305 nonce.

The MAC is always verified before anything is decrypted; a mismatch is an `IntegrityError`.
`MasterKey` is also the shape of a user key derived from a password (keys.py): restic uses the
same construction for both.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import poly1305
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from blockera.backup.errors import IntegrityError, RepositoryFormatError

IV_BYTES = 16
MAC_BYTES = 16
EXTENSION_BYTES = IV_BYTES + MAC_BYTES
"""How much encrypting makes anything longer."""

ENCRYPTION_KEY_BYTES = 32
MAC_KEY_BYTES = 32  # k (AES-128) || r (Poly1305)

# Poly1305's clamp on r: the top four bits of bytes 3, 7, 11, 15 and the bottom two bits of
# bytes 4, 8, 12 are cleared.
_R_MASK = bytes([0xFF, 0xFF, 0xFF, 0x0F, 0xFC, 0xFF, 0xFF, 0x0F,
                 0xFC, 0xFF, 0xFF, 0x0F, 0xFC, 0xFF, 0xFF, 0x0F])


def clamp_r(r: bytes) -> bytes:
    return bytes(a & b for a, b in zip(r, _R_MASK))


def poly1305_aes(mac_k: bytes, mac_r: bytes, nonce: bytes,
                 message: bytes | bytearray | memoryview) -> bytes:
    """Poly1305-AES: Poly1305 with the one-time key `clamp(r) || AES-128_k(nonce)`."""
    enc = Cipher(algorithms.AES(mac_k), modes.ECB()).encryptor()
    one_time = clamp_r(mac_r) + enc.update(nonce) + enc.finalize()
    return poly1305.Poly1305.generate_tag(one_time, message)


def ciphertext_length(plaintext_bytes: int) -> int:
    return plaintext_bytes + EXTENSION_BYTES


def plaintext_length(ciphertext_bytes: int) -> int:
    return ciphertext_bytes - EXTENSION_BYTES


@dataclass(frozen=True)
class MasterKey:
    """AES-256 encryption key plus Poly1305-AES MAC key (`mac_k` for AES-128, `mac_r` clamped)."""

    encryption: bytes
    mac_k: bytes
    mac_r: bytes

    def __post_init__(self) -> None:
        if (len(self.encryption) != ENCRYPTION_KEY_BYTES or len(self.mac_k) != 16
                or len(self.mac_r) != 16):
            raise ValueError("a key needs 32 encryption bytes and 16 + 16 MAC bytes")
        object.__setattr__(self, "mac_r", clamp_r(self.mac_r))

    @classmethod
    def random(cls) -> "MasterKey":
        return cls(os.urandom(32), os.urandom(16), os.urandom(16))

    @classmethod
    def from_kdf_output(cls, derived: bytes) -> "MasterKey":
        """64 bytes of scrypt output: encryption key, then k, then r."""
        return cls(derived[:32], derived[32:48], derived[48:64])

    def valid(self) -> bool:
        """restic refuses all-zero keys."""
        return any(self.encryption) and any(self.mac_k) and any(self.mac_r)

    # -- the master key as stored (encrypted) in a key file ---------------------------------

    def to_json(self) -> bytes:
        b64 = lambda b: base64.b64encode(b).decode("ascii")  # noqa: E731
        return (f'{{"mac":{{"k":"{b64(self.mac_k)}","r":"{b64(self.mac_r)}"}},'
                f'"encrypt":"{b64(self.encryption)}"}}').encode("ascii")

    @classmethod
    def from_json(cls, data: bytes, what: str) -> "MasterKey":
        try:
            doc = json.loads(data)
            key = cls(base64.b64decode(doc["encrypt"], validate=True),
                      base64.b64decode(doc["mac"]["k"], validate=True),
                      base64.b64decode(doc["mac"]["r"], validate=True))
        except (ValueError, KeyError, TypeError) as exc:
            raise RepositoryFormatError(f"{what}: the master key inside is malformed "
                                        f"({exc})") from None
        if not key.valid():
            raise RepositoryFormatError(f"{what}: the master key inside is all zeros")
        return key

    # -- encryption ---------------------------------------------------------------------------

    def _poly_key(self, iv: bytes) -> bytes:
        enc = Cipher(algorithms.AES(self.mac_k), modes.ECB()).encryptor()
        return self.mac_r + enc.update(iv) + enc.finalize()

    def encrypt(self, plaintext: bytes | bytearray | memoryview) -> bytearray:
        """IV || ciphertext || MAC for `plaintext`, with a fresh random IV. (Built in place in
        one buffer: allocating and joining the parts costs more than AES itself.)"""
        iv = os.urandom(IV_BYTES)
        while not any(iv):  # restic rejects an all-zero nonce
            iv = os.urandom(IV_BYTES)
        size = len(plaintext)
        # update_into wants room for one block more than it writes
        out = bytearray(IV_BYTES + size + MAC_BYTES + 15)
        out[:IV_BYTES] = iv
        enc = Cipher(algorithms.AES(self.encryption), modes.CTR(iv)).encryptor()
        with memoryview(out) as view:
            enc.update_into(plaintext, view[IV_BYTES:IV_BYTES + size + 15])
            enc.finalize()
            mac = poly1305.Poly1305.generate_tag(self._poly_key(iv),
                                                 view[IV_BYTES:IV_BYTES + size])
        out[IV_BYTES + size:IV_BYTES + size + MAC_BYTES] = mac
        del out[IV_BYTES + size + MAC_BYTES:]
        return out

    def decrypt(self, data: bytes | bytearray | memoryview, what: str) -> bytes:
        """Verify the MAC of `IV || ciphertext || MAC`, then decrypt. `what` names the object
        in the error (e.g. "snapshot 1a2b3c4d in /srv/repo")."""
        view = memoryview(data)
        if len(view) < EXTENSION_BYTES:
            raise IntegrityError(f"{what}: {len(view)} bytes is too short to be encrypted "
                                 f"data (at least {EXTENSION_BYTES})")
        iv = bytes(view[:IV_BYTES])
        ciphertext = view[IV_BYTES:len(view) - MAC_BYTES]
        mac = bytes(view[len(view) - MAC_BYTES:])
        if not any(iv):
            raise IntegrityError(f"{what}: the IV is all zeros, which no writer produces")
        try:
            poly1305.Poly1305.verify_tag(self._poly_key(iv), ciphertext, mac)
        except InvalidSignature:
            raise IntegrityError(f"{what}: MAC verification failed: the data is damaged or was "
                                 "not written with this repository's key") from None
        dec = Cipher(algorithms.AES(self.encryption), modes.CTR(iv)).decryptor()
        return dec.update(ciphertext) + dec.finalize()

    def authentic(self, data: bytes | bytearray | memoryview) -> bool:
        """Does the MAC of `data` verify (without decrypting)? Used to try a password."""
        view = memoryview(data)
        if len(view) < EXTENSION_BYTES:
            return False
        iv = bytes(view[:IV_BYTES])
        try:
            poly1305.Poly1305.verify_tag(self._poly_key(iv), view[IV_BYTES:len(view) - MAC_BYTES],
                                         bytes(view[len(view) - MAC_BYTES:]))
        except InvalidSignature:
            return False
        return True
