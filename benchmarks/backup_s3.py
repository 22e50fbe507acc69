"""The backup repository on S3 (Ceph radosgw on loopback, memstore OSD: data in RAM).

1. `clients`: the S3 client under `blockera.backup.s3` (urllib3 + its own SigV4) against
   boto3/botocore and obstore (Rust object_store), each as the backend would use it: 16 MiB
   objects PUT with `If-None-Match: *` and read back, `--connections` requests at a time
   (MiB/s), and the latency of single 4 KiB PUTs, GETs and HEADs one after another
   (milliseconds, median). Clients alternate `--rounds` times; medians.
2. `repository`: `--size-mib` MiB of half-compressible 1 MiB blobs (half random, half text)
   saved into a repository on radosgw (`Repository.save_blob` + `flush`), blockera vs
   `restic backup --stdin` of the same bytes to the same radosgw, alternating; throughput and
   the ratio.
3. `jobs`: the commands, as an operator runs them: `blockera backup IMAGE -r s3:...` against
   `restic backup IMAGE` of the same `--image-mib` MiB image (default 2 GiB, half-compressible,
   no two 1 MiB chunks alike: the image of benchmarks/backup.py, so that the incremental ratio
   compares with the local one) into the same radosgw, each into a fresh bucket per round
   (removed after the round), both repositories with restic's calibrated scrypt parameters;
   then an incremental after rewriting 1 % of the 1 MiB chunks (restic re-reads the file;
   blockera is given the changed ranges as `--changed` JSON). Whole commands timed (start-up,
   key derivation, locks), alternating; medians. Goals: blockera's full backup at least 1.2x
   restic's throughput, the incremental 10x faster (as on a local disk).

A one-node cluster is started for the run under a temporary directory (Debian packages
radosgw ceph-mon ceph-osd). Nothing here runs in the test suite.
`python3 benchmarks/backup_s3.py --help`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

from common import compile_sources, report  # noqa: E402

from blockera.backup import BlobType, FileType, KdfParams, Repository  # noqa: E402
from blockera.backup.s3 import S3Backend  # noqa: E402
from tests.backup.s3.cluster import RadosGW, missing_binaries  # noqa: E402

MiB = 1 << 20
PASSWORD = "benchmark"
KDF = KdfParams(1024, 8, 1)
ACCESS_KEY, SECRET_KEY = "BENCHACCESSKEY", "benchsecretkey"


def text_like(size: int, seed: int) -> bytes:
    rnd = random.Random(seed)
    words = [bytes(rnd.choice(b"abcdefghijklmnop") for _ in range(rnd.randint(2, 9)))
             for _ in range(700)]
    out = bytearray()
    while len(out) < size:
        out += b" ".join(rnd.choice(words) for _ in range(1000)) + b"\n"
    return bytes(out[:size])


def half_compressible(count: int) -> list[bytes]:
    """Distinct 1 MiB blobs: 512 KiB random, 512 KiB of text (zstd: about 0.6 overall)."""
    text = text_like(4 * MiB, 1)
    half = MiB // 2
    return [os.urandom(half) + text[(i * 4099) % (3 * MiB):][:half] for i in range(count)]


# -- 1. clients -------------------------------------------------------------------------------

class Client:
    name = ""

    def put(self, key: str, data: bytes) -> None: ...
    def get(self, key: str) -> bytes: ...
    def head(self, key: str) -> int: ...
    def delete(self, key: str) -> None: ...


class BlockeraClient(Client):
    name = "blockera (urllib3)"

    def __init__(self, endpoint: str, bucket: str, connections: int) -> None:
        self.be = S3Backend.from_url(f"s3:{endpoint}/{bucket}", connections=connections,
                                     access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY)

    def put(self, key: str, data: bytes) -> None:
        self.be.save(FileType.PACK, key, data)

    def get(self, key: str) -> bytes:
        return self.be.load(FileType.PACK, key)

    def head(self, key: str) -> int:
        return self.be.stat(FileType.PACK, key).size_bytes

    def delete(self, key: str) -> None:
        self.be.remove(FileType.PACK, key)


class Boto3Client(Client):
    name = "boto3"

    def __init__(self, endpoint: str, bucket: str, connections: int) -> None:
        import boto3
        from botocore.config import Config
        self.bucket = bucket
        self.s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=ACCESS_KEY,
                               aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
                               config=Config(max_pool_connections=connections,
                                             s3={"addressing_style": "path"},
                                             retries={"mode": "standard"}))
        self.name = f"boto3 {boto3.__version__}"

    def _key(self, key: str) -> str:
        return f"data/{key[:2]}/{key}"

    def put(self, key: str, data: bytes) -> None:
        self.s3.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*")

    def get(self, key: str) -> bytes:
        return self.s3.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

    def head(self, key: str) -> int:
        return self.s3.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"]

    def delete(self, key: str) -> None:
        self.s3.delete_object(Bucket=self.bucket, Key=self._key(key))


class ObstoreClient(Client):
    name = "obstore"

    def __init__(self, endpoint: str, bucket: str, connections: int) -> None:
        import obstore
        from obstore.store import S3Store
        self.obs = obstore
        self.store = S3Store(bucket, endpoint=endpoint, access_key_id=ACCESS_KEY,
                             secret_access_key=SECRET_KEY, region="us-east-1",
                             virtual_hosted_style_request=False,
                             client_options={"allow_http": True})
        self.name = f"obstore {getattr(obstore, '__version__', '')}".strip()

    def _key(self, key: str) -> str:
        return f"data/{key[:2]}/{key}"

    def put(self, key: str, data: bytes) -> None:
        self.obs.put(self.store, self._key(key), data, mode="create", use_multipart=False)

    def get(self, key: str) -> bytes:
        return self.obs.get(self.store, self._key(key)).bytes().to_bytes()

    def head(self, key: str) -> int:
        return self.obs.head(self.store, self._key(key))["size"]

    def delete(self, key: str) -> None:
        self.obs.delete(self.store, self._key(key))


def client_round(client: Client, big: list[bytes], small: list[bytes],
                 connections: int) -> dict[str, float]:
    big_names = [hashlib.sha256(b).hexdigest() for b in big]
    small_names = [hashlib.sha256(b).hexdigest() for b in small]
    total_mib = sum(map(len, big)) / MiB
    with ThreadPoolExecutor(connections) as pool:
        start = time.perf_counter()
        list(pool.map(client.put, big_names, big))
        put_s = time.perf_counter() - start
        start = time.perf_counter()
        got = list(pool.map(client.get, big_names))
        get_s = time.perf_counter() - start
    assert got == big, f"{client.name}: read back different bytes"

    def latency(op: Callable[..., object], *args_list: list) -> float:
        times = []
        for args in zip(*args_list):
            start = time.perf_counter()
            op(*args)
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1000

    put_ms = latency(client.put, small_names, small)
    get_ms = latency(client.get, small_names)
    head_ms = latency(client.head, small_names)
    for name in big_names + small_names:
        client.delete(name)
    return {"put": total_mib / put_s, "get": total_mib / get_s, "put_ms": put_ms,
            "get_ms": get_ms, "head_ms": head_ms}


def compare_clients(rgw: RadosGW, rounds: int, connections: int, objects: int,
                    small_objects: int) -> list[dict]:
    factories: list[type[Client]] = [BlockeraClient, Boto3Client, ObstoreClient]
    clients = []
    for i, factory in enumerate(factories):
        bucket = f"clients-{i}"
        try:
            client = factory(rgw.endpoint, bucket, connections)
        except ImportError as exc:
            print(f"skipping {factory.name}: {exc}")
            continue
        BlockeraClient(rgw.endpoint, bucket, 1).be.create()
        clients.append(client)
    big = [os.urandom(16 * MiB) for _ in range(objects)]
    small = [os.urandom(4096) for _ in range(small_objects)]
    runs: dict[str, list[dict[str, float]]] = {c.name: [] for c in clients}
    for _ in range(rounds):
        for client in clients:
            client_round(client, small[:5], small[5:10], 1)  # warm the connections
            runs[client.name].append(client_round(client, big, small, connections))
    rows = []
    for name, results in runs.items():
        med = {k: statistics.median(r[k] for r in results) for k in results[0]}
        rows.append({"client": name,
                     f"PUT 16 MiB x{objects} MiB/s": round(med["put"], 1),
                     f"GET 16 MiB x{objects} MiB/s": round(med["get"], 1),
                     "PUT 4 KiB ms": round(med["put_ms"], 2),
                     "GET 4 KiB ms": round(med["get_ms"], 2),
                     "HEAD ms": round(med["head_ms"], 2)})
    return rows


# -- 2. repository ---------------------------------------------------------------------------

def blockera_run(rgw: RadosGW, bucket: str, data: list[bytes], connections: int) -> float:
    backend = S3Backend.from_url(f"s3:{rgw.endpoint}/{bucket}", connections=connections,
                                 access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY)
    repo = Repository.init(backend, PASSWORD, kdf_params=KDF)
    with repo.lock():
        start = time.perf_counter()
        for chunk in data:
            repo.save_blob(BlobType.DATA, chunk)
        repo.flush()
        elapsed = time.perf_counter() - start
    repo.close()
    return elapsed


def restic_run(rgw: RadosGW, bucket: str, stream: Path, connections: int) -> float:
    env = {**os.environ, "RESTIC_PASSWORD": PASSWORD,
           "RESTIC_REPOSITORY": f"s3:{rgw.endpoint}/{bucket}",
           "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    subprocess.run(["restic", "init", "-q"], env=env, check=True, capture_output=True)
    with open(stream, "rb") as f:
        start = time.perf_counter()
        subprocess.run(["restic", "--no-cache", "-o", f"s3.connections={connections}",
                        "backup", "-q", "--stdin"], stdin=f, env=env, check=True,
                       capture_output=True)
        return time.perf_counter() - start


def compare_repository(rgw: RadosGW, workdir: Path, size_mib: int, rounds: int,
                       connections: int) -> list[dict]:
    data = half_compressible(size_mib)
    stream = workdir / "stream.bin"
    with open(stream, "wb") as f:
        for chunk in data:
            f.write(chunk)
    ours, theirs = [], []
    for i in range(rounds):
        if shutil.which("restic"):
            theirs.append(restic_run(rgw, f"restic-{i}", stream, connections))
        ours.append(blockera_run(rgw, f"blockera-{i}", data, connections))
    row: dict[str, float | str] = {"data": f"{size_mib} x 1 MiB half-compressible",
                                   "blockera MB/s": round(size_mib * MiB /
                                                          statistics.median(ours) / 1e6, 1)}
    if theirs:
        row["restic MB/s"] = round(size_mib * MiB / statistics.median(theirs) / 1e6, 1)
        row["ratio (time blockera / restic)"] = \
            round(statistics.median(ours) / statistics.median(theirs), 3)
    return [row]


# -- 3. jobs ------------------------------------------------------------------------------

def compare_jobs(rgw: RadosGW, workdir: Path, image_mib: int, rounds: int,
                 connections: int) -> list[dict]:
    from backup import changed_json, rewrite_chunks, write_image
    from common import measure

    url = f"s3:{rgw.endpoint}/" + "{}"
    env = {**os.environ, "RESTIC_PASSWORD": PASSWORD, "BLOCKERA_PASSWORD": PASSWORD,
           "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
           "BLOCKERA_LOCK_DIR": str(workdir / "locks"),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    os.environ.update(env)
    image = workdir / "disk.img"
    write_image(image, image_mib * MiB, seed=1)

    def restic(bucket: str, *args: str) -> list[str]:
        return ["restic", "--no-cache", "-q", "-o", f"s3.connections={connections}", "-r",
                url.format(bucket), *args]

    def blockera(bucket: str, *args: str) -> list[str]:
        return [sys.executable, "-m", "blockera", *args[:1], "-r", url.format(bucket),
                "--connections", str(connections), *args[1:]]

    full: dict[str, list[float]] = {"restic": [], "blockera": []}
    inc: dict[str, list[float]] = {"restic": [], "blockera": []}
    for i in range(rounds):
        write_image(image, image_mib * MiB, seed=1)      # the same image every round
        subprocess.run(restic(f"jobs-restic-{i}", "init"), env=env, check=True,
                       capture_output=True)
        probe = S3Backend.from_url(url.format(f"jobs-restic-{i}"), access_key_id=ACCESS_KEY,
                                   secret_access_key=SECRET_KEY)
        key = json.loads(probe.load(FileType.KEY, next(probe.list(FileType.KEY)).name))
        params = KdfParams(key["N"], key["r"], key["p"])
        Repository.init(S3Backend.from_url(url.format(f"jobs-blockera-{i}"),
                                           access_key_id=ACCESS_KEY,
                                           secret_access_key=SECRET_KEY),
                        PASSWORD, kdf_params=params).close()
        full["restic"].append(measure(restic(f"jobs-restic-{i}", "backup",
                                             str(image))).seconds)
        full["blockera"].append(measure(blockera(f"jobs-blockera-{i}", "backup",
                                                 str(image))).seconds)
        changed = rewrite_chunks(image, max(1, image_mib // 100), seed=100 + i)
        changed_json(workdir / "changed.json", changed)
        inc["restic"].append(measure(restic(f"jobs-restic-{i}", "backup",
                                            str(image))).seconds)
        inc["blockera"].append(measure(blockera(f"jobs-blockera-{i}", "backup", str(image),
                                                "--changed",
                                                str(workdir / "changed.json"))).seconds)
        print(f"round {i + 1}: full restic {full['restic'][-1]:.2f} s, blockera "
              f"{full['blockera'][-1]:.2f} s; incremental restic {inc['restic'][-1]:.2f} s, "
              f"blockera {inc['blockera'][-1]:.2f} s", flush=True)
        for bucket in (f"jobs-restic-{i}", f"jobs-blockera-{i}"):   # the OSD keeps it in RAM
            rgw.admin("bucket", "rm", f"--bucket={bucket}", "--purge-objects")
    rows = []
    for name, runs in ((f"full backup, {image_mib} MiB", full),
                       (f"incremental, {max(1, image_mib // 100)} of {image_mib} chunks "
                        "rewritten", inc)):
        r_t, b_t = statistics.median(runs["restic"]), statistics.median(runs["blockera"])
        rows.append({"operation": name, "restic_s": round(r_t, 2), "blockera_s": round(b_t, 2),
                     "restic_MBps": round(image_mib * MiB / r_t / 1e6, 1),
                     "blockera_MBps": round(image_mib * MiB / b_t / 1e6, 1),
                     "speedup": round(r_t / b_t, 2)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", nargs="*",
                    help="clients, repository and/or jobs (default: all)")
    ap.add_argument("--image-mib", type=int, default=2048,
                    help="jobs: image size (2048, as benchmarks/backup.py)")
    ap.add_argument("--size-mib", type=int, default=256, help="repository data (default 256)")
    ap.add_argument("--objects", type=int, default=16, help="16 MiB objects per round")
    ap.add_argument("--small-objects", type=int, default=200, help="4 KiB objects per round")
    ap.add_argument("--connections", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None,
                    help="scratch directory for the cluster (default: a temporary one)")
    args = ap.parse_args()
    compile_sources()
    args.what = args.what or ["clients", "repository", "jobs"]
    if set(args.what) - {"clients", "repository", "jobs"}:
        ap.error("the comparisons are: clients, repository, jobs")
    missing = missing_binaries()
    if missing:
        sys.exit(f"missing {', '.join(missing)}: apt-get install --no-install-recommends "
                 "radosgw ceph-mon ceph-osd")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        memstore = max(4 << 30, (args.size_mib * 2 * args.rounds + 64 * args.objects
                                 + (args.image_mib * 3 if "jobs" in args.what else 0)) * MiB)
        with RadosGW(Path(tmp) / "ceph", memstore_bytes=memstore) as rgw:
            rgw.create_user("bench", ACCESS_KEY, SECRET_KEY)
            extra = {"cpus": os.cpu_count(), "cluster_start_s": round(rgw.startup_s, 2),
                     "connections": args.connections}
            if "clients" in args.what:
                report("backup s3 clients: radosgw PUT/GET throughput and latency",
                       compare_clients(rgw, args.rounds, args.connections, args.objects,
                                       args.small_objects), extra)
            if "repository" in args.what:
                report("backup s3 repository: save_blob + flush vs restic backup --stdin",
                       compare_repository(rgw, Path(tmp), args.size_mib, args.rounds,
                                          args.connections), extra)
            if "jobs" in args.what:
                report("backup s3 jobs: blockera backup vs restic backup of one image",
                       compare_jobs(rgw, Path(tmp), args.image_mib, args.rounds,
                                    args.connections), extra)


if __name__ == "__main__":
    main()
