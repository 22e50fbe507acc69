"""Key files, scrypt parameters and the config (with its chunker polynomial)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from blockera.backup import LocalBackend, WrongPasswordError
from blockera.backup.config import RepoConfig, is_irreducible, random_polynomial
from blockera.backup.crypto import MasterKey
from blockera.backup.errors import RepositoryFormatError
from blockera.backup.keys import (KDF_MEMORY_MIB, KdfParams, KeyFile, load_key_file,
                                  make_key_file, n_for_memory, open_master_key, save_key_file)

from .helpers import FAST_KDF


def test_key_file_opens_with_its_password_only(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "repo")
    backend.create()
    master = MasterKey.random()
    name = save_key_file(backend, make_key_file("pw one", master, FAST_KDF))
    save_key_file(backend, make_key_file("pw two", master, FAST_KDF))
    assert open_master_key(backend, "pw two")[1] == master
    assert open_master_key(backend, b"pw one") == (name, master)
    with pytest.raises(WrongPasswordError) as info:
        open_master_key(backend, "pw three")
    assert str(tmp_path / "repo") in str(info.value)
    assert "2 key files" in str(info.value)
    assert info.value.exit_code == 1


def test_key_file_json_as_restic_writes_it(tmp_path: Path) -> None:
    key = make_key_file("pw", MasterKey.random(), KdfParams(2048, 8, 2), username="alice",
                        hostname="host1")
    raw = key.encode()
    doc = json.loads(raw)
    assert list(doc) == ["created", "username", "hostname", "kdf", "N", "r", "p", "salt",
                         "data"]
    assert (doc["kdf"], doc["N"], doc["r"], doc["p"]) == ("scrypt", 2048, 8, 2)
    assert b" " not in raw and not raw.endswith(b"\n")
    backend = LocalBackend(tmp_path / "repo")
    backend.create()
    name = save_key_file(backend, key)
    assert name == key.name
    loaded = load_key_file(backend, name)
    assert loaded.encode() == raw and len(loaded.salt) == 64


def test_restic_key_file_opens() -> None:
    # restic 0.14's own key file layout (values from a `restic init` with N lowered).
    master = MasterKey.random()
    key = make_key_file("pw", master, FAST_KDF)
    restic_style = json.dumps({"created": "2026-12-03T08:56:51.992535003Z", "username": "root",
                               "hostname": "vm", "kdf": "scrypt", "N": 1024, "r": 8, "p": 1,
                               "salt": json.loads(key.encode())["salt"],
                               "data": json.loads(key.encode())["data"]}).encode()
    assert KeyFile.decode(restic_style, "k" * 64, "repo").open("pw") == master
    assert KeyFile.decode(restic_style, "k" * 64, "repo").open("other") is None


@pytest.mark.parametrize("params", [KdfParams(1000, 8, 1), KdfParams(1, 8, 1),
                                    KdfParams(1024, 0, 1), KdfParams(1 << 30, 8, 1)])
def test_bad_scrypt_parameters_refused(params: KdfParams) -> None:
    with pytest.raises(ValueError):
        params.check()


def test_malformed_key_files(tmp_path: Path) -> None:
    with pytest.raises(RepositoryFormatError, match="not a key file"):
        KeyFile.decode(b"{}", "ab" * 32, "repo")
    key = make_key_file("pw", MasterKey.random(), FAST_KDF)
    doc = json.loads(key.encode())
    doc["kdf"] = "argon2"
    with pytest.raises(RepositoryFormatError, match="only scrypt"):
        KeyFile.decode(json.dumps(doc).encode(), "ab" * 32, "repo").open("pw")


# RFC 7914 section 12's third vector: 16 lanes.
RFC7914_P16 = bytes.fromhex(
    "fdbabe1c9d3472007856e7190d01e9fe7c6ad7cbc8237830e77376634b3731622eaf30d92e22a3886ff109"
    "279d9830dac727afb94a83ee6d8360cbdfa2cc0640")


@pytest.mark.parametrize("cores", [1, 2, 3, 16, None])
def test_scrypt_lanes_on_several_cores_give_the_same_key(cores: int | None) -> None:
    params = KdfParams(1024, 8, 16)
    assert params.derive(b"password", b"NaCl", cores=cores) == RFC7914_P16
    assert params.derive_on_one_core(b"password", b"NaCl") == RFC7914_P16


@pytest.mark.parametrize("n, r, p", [(2, 1, 1), (16, 1, 5), (64, 3, 7), (256, 8, 3),
                                     (128, 2, 2)])
def test_scrypt_lanes_match_openssl(n: int, r: int, p: int) -> None:
    params = KdfParams(n, r, p)
    salt = bytes(range(64))
    assert params.derive(b"pw", salt, cores=2) == params.derive_on_one_core(b"pw", salt)


def test_restics_memory_budget_gives_n_32768() -> None:
    assert n_for_memory(KDF_MEMORY_MIB) == 32768
    assert n_for_memory(64) == 32768 and n_for_memory(65) == 65536


def test_calibration_follows_restics_rule() -> None:
    # N from the memory budget (largest power of two with 128*r*N below it), r = 8, p >= 1.
    params = KdfParams.calibrate(timeout_s=0.05, memory_mib=2)
    assert params.r == 8 and params.p >= 1
    assert params.n <= 2048 and params.n & (params.n - 1) == 0
    start = time.perf_counter()
    params.derive(b"pw", bytes(64))
    assert time.perf_counter() - start < 0.5


# Irreducibility answers from restic's chunker test table.
@pytest.mark.parametrize("pol, irreducible", [
    (0x38F1E565E288DF, False), (0x3DA3358B4DC173, True), (0x30A8295B9D5C91, False),
    (0x255F4350B962CB, False), (0x2482734CACCA49, True), (0x3143D0464B3299, False),
    (0x35867DA8C3A73F, True),   # written by restic 0.14 init on this kind of machine
])
def test_polynomial_irreducibility(pol: int, irreducible: bool) -> None:
    assert is_irreducible(pol) is irreducible


def test_random_polynomial_is_degree_53_and_irreducible() -> None:
    for _ in range(5):
        pol = random_polynomial()
        assert pol.bit_length() == 54 and pol & 1
        assert is_irreducible(pol)


def test_config_json_and_checks() -> None:
    cfg = RepoConfig.new()
    raw = cfg.encode()
    assert raw.startswith(b'{"version":2,"id":"') and b'"chunker_polynomial":"' in raw
    assert RepoConfig.decode(raw, "repo") == cfg
    bad = json.loads(raw)
    bad["chunker_polynomial"] = "38f1e565e288df"
    with pytest.raises(RepositoryFormatError, match="not irreducible"):
        RepoConfig.decode(json.dumps(bad).encode(), "repo")
    bad = json.loads(raw)
    bad["version"] = 3
    with pytest.raises(RepositoryFormatError, match="version 3"):
        RepoConfig.decode(json.dumps(bad).encode(), "repo")
