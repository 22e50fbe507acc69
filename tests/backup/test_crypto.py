"""AES-256-CTR + Poly1305-AES as restic uses them."""

from __future__ import annotations

import pytest

from blockera.backup.crypto import EXTENSION_BYTES, MasterKey, clamp_r, poly1305_aes
from blockera.backup.errors import IntegrityError, RepositoryFormatError

H = bytes.fromhex


@pytest.mark.parametrize("r, k, nonce, message, mac", [
    # Bernstein, "The Poly1305-AES message-authentication code" (2005), appendix B
    ("851fc40c3467ac0be05cc20404f3f700", "ec074c835580741701425b623235add6",
     "fb447350c4e868c52ac3275cf9d4327e", "f3f6", "f4c633c3044fc145f84f335cb81953de"),
    ("a0f3080000f46400d0c7e9076c834403", "75deaa25c09f208e1dc4ce6b5cad3fbf",
     "61ee09218d29b0aaed7e154a2c5509cc", "", "dd3fab2251f11ac759f0887129cc2ee7"),
    ("48443d0bb0d21109c89a100b5ce2c208", "6acb5f61a7176dd320c5c1eb2edcdc74",
     "ae212a55399729595dea458bc621ff0e",
     "663cea190ffb83d89593f3f476b6bc24d7e679107ea26adb8caf6652d0656136",
     "0ee1c16bb73f0f4fd19881753c01cdbe"),
])
def test_poly1305_aes_paper_vectors(r: str, k: str, nonce: str, message: str, mac: str) -> None:
    assert poly1305_aes(H(k), H(r), H(nonce), H(message)) == H(mac)


def test_decrypts_known_restic_ciphertext() -> None:
    # A fixed ciphertext from restic's crypto tests ("Dies ist ein Test!"), with an unclamped r
    # that the key clamps, as restic does when it loads a key.
    key = MasterKey(H("303e8687b1d7db18421bdc6bb8588ccadac4d59ee87b8ff70c44e635790cafef"),
                    H("ef4d8824cb80b2bcc5fbff8a9b12a42c"), H("cc8d4b948ee0ebfe1d415de921d10353"))
    data = H("69fb41c62d12def4593bd71757138606338f621aeaeb39da0fe4f99233f8037a54ea63338a813b"
             "cf3f75d8c3cc75dddf8750")
    assert key.decrypt(data, "vector") == b"Dies ist ein Test!"


def test_round_trip_and_layout() -> None:
    key = MasterKey.random()
    for size in (0, 1, 15, 16, 17, 1 << 20):
        plain = bytes(range(256)) * (size // 256) + bytes(size % 256)
        sealed = key.encrypt(plain)
        assert len(sealed) == size + EXTENSION_BYTES
        assert key.decrypt(sealed, "x") == plain
    a, b = key.encrypt(b"same"), key.encrypt(b"same")
    assert a[:16] != b[:16] and a != b          # a fresh IV every time


@pytest.mark.parametrize("position", [0, 15, 16, 20, -17, -16, -1])
def test_any_flipped_bit_is_detected_before_decrypting(position: int) -> None:
    key = MasterKey.random()
    sealed = bytearray(key.encrypt(b"x" * 40))
    sealed[position] ^= 0x10
    with pytest.raises(IntegrityError, match="MAC verification failed"):
        key.decrypt(bytes(sealed), "snapshot 1234abcd")
    assert not key.authentic(bytes(sealed))


def test_other_key_and_short_data() -> None:
    sealed = MasterKey.random().encrypt(b"secret")
    with pytest.raises(IntegrityError, match="index 0badc0de: MAC"):
        MasterKey.random().decrypt(sealed, "index 0badc0de")
    with pytest.raises(IntegrityError, match="too short"):
        MasterKey.random().decrypt(b"\x01" * 31, "x")


def test_r_is_clamped_and_master_key_json() -> None:
    r = bytes([0xFF] * 16)
    assert clamp_r(r) == bytes.fromhex("ffffff0ffcffff0ffcffff0ffcffff0f")
    key = MasterKey.random()
    assert MasterKey.from_json(key.to_json(), "k") == key
    with pytest.raises(RepositoryFormatError):
        MasterKey.from_json(b'{"mac":{"k":"AAAA"}}', "k")
    zero = b'{"mac":{"k":"AAAAAAAAAAAAAAAAAAAAAA==","r":"AAAAAAAAAAAAAAAAAAAAAA=="},' \
           b'"encrypt":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}'
    with pytest.raises(RepositoryFormatError, match="all zeros"):
        MasterKey.from_json(zero, "k")
