"""blockera.snapshot against the real kernel's dm-snapshot (Debian 6.1 under qemu).

One boot runs every scenario; the tests below check its results:

(a) The kernel writes COW stores: one origin with five snapshots (chunk sizes 4, 8, 16, 32,
    128 sectors), O_DIRECT writes to the origin (copy-outs) and to each snapshot (full-chunk,
    partial-chunk and 1 MiB writes), several areas everywhere (two for CS=128). Our reader
    must list exactly the chunks written, find each exception's data where its record points,
    see the kernel's allocation order, and load with the kernel's status line. The CS=8 COW
    is then reactivated with a table chunk size of 16.
(b) We write COW stores with data; the kernel activates them: the snapshot device's SHA-256
    equals our expected view and the status lines equal ours; an invalidated store comes up
    Invalid; duplicate records resolve the way our lookup does.
(c) Twins: the kernel and our store perform the same snapshot writes on identical stale COWs
    (a fresh store over three areas; the capacity edge where the 256th exception cannot zero
    area 1; a store with garbage behind its terminator). The COW images must be identical.
(d) The kernel merges a store we wrote (snapshot-merge without handover): the origin must
    equal the snapshot's view and the COW must equal our own merge's result byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import textwrap
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from blockera.blockdev import FileDevice, MemoryDevice
from blockera.snapshot import (Geometry, StoreWriteError, changed_chunks, merge_ranges,
                               open_store, read_cow, write_store)
from blockera.snapshot.store import ExceptionStore

from .guest import KernelGuest, create_disk_image, file_lock

# one worker runs the whole module: its fixture boots the guest once for all of them
pytestmark = [pytest.mark.kernel, pytest.mark.xdist_group("cow-kernel")]

KiB = 1024
MiB = 1024 * KiB
SECTOR = 512
PAYLOAD_BYTES = 4 * MiB
ORIGIN_A_BYTES = 272 * MiB
RANDOM_PREFIX_BYTES = 16 * MiB
ORIGIN_B_BYTES = 8 * MiB
SNAPS_A = {"s4": 4, "s8": 8, "s16": 16, "s32": 32, "s128": 128}
STALE = 0xA5

WRITER = r'''
import json, mmap, os, sys
ops = json.load(open(sys.argv[1]))
payload = open("payload.bin", "rb").read()
buf = mmap.mmap(-1, max([op[2] for op in ops] + [4096]))
fds, results = {}, []
for dev, offset, length, src in ops:
    if dev not in fds:
        fds[dev] = os.open("/dev/mapper/" + dev, os.O_RDWR | os.O_DIRECT)
    buf[:length] = payload[src:src + length]
    try:
        results.append(os.pwritev(fds[dev], [memoryview(buf)[:length]], offset))
    except OSError as exc:
        results.append(-exc.errno)
for fd in fds.values():
    os.close(fd)
json.dump(results, open(sys.argv[2], "w"))
'''


@dataclass(frozen=True)
class Write:
    dev: str
    offset: int
    length: int
    src: int


@dataclass
class Scenario:
    """Everything prepared on the host, and the paths the guest's results land in."""

    tmp: Path
    share: Path
    payload: bytes
    origin_a_prefix: bytes
    origin_b: bytes
    origin_c: bytes
    disks: list[Path] = field(default_factory=list)
    names: dict[str, Path] = field(default_factory=dict)
    ops_a: list[Write] = field(default_factory=list)
    expected_view: dict[str, bytes] = field(default_factory=dict)     # b-stores: sha256
    twins: dict[str, bytes] = field(default_factory=dict)            # expected COW images
    twin_status: dict[str, str] = field(default_factory=dict)
    merge_expected_origin: bytes = b""
    merge_expected_cow: bytes = b""

    def disk(self, name: str, path: Path) -> str:
        self.disks.append(path)
        self.names[name] = path
        return f"/dev/vd{chr(ord('a') + len(self.disks) - 1)}"

    def data(self, w: Write) -> bytes:
        return self.payload[w.src: w.src + w.length]

    def status(self, name: str) -> str:
        words = (self.share / f"status-{name}.txt").read_text().split()
        return " ".join(words[3:])

    def table(self, name: str) -> str:
        return (self.share / f"table-{name}.txt").read_text().strip()


def write_file(path: Path, data: bytes | bytearray) -> Path:
    path.write_bytes(bytes(data))
    return path


def stale_image(size_bytes: int) -> bytearray:
    image = bytearray([STALE]) * size_bytes
    image[:4096] = bytes(4096)                 # what LVM wipes before attaching a COW
    return image


# -- (a) kernel-written stores --------------------------------------------------------------

def plan_a(rng: np.random.Generator, payload_src) -> list[Write]:
    ops: list[Write] = []

    def random_writes(dev: str, count: int, limit: int, sizes: list[int]) -> None:
        for _ in range(count):
            length = int(rng.choice(sizes))
            offset = int(rng.integers(0, (limit - length) // SECTOR)) * SECTOR
            ops.append(Write(dev, offset, length, payload_src(length)))

    origin_sizes = [512, 1024, 4096, 8192, 12288, 65536]
    random_writes("orig", 350, RANDOM_PREFIX_BYTES, origin_sizes)
    for dev in ("s4", "s8"):
        random_writes(dev, 60, 32 * MiB, [512, 2048, 4096, 16384])
    for chunk in rng.choice(np.arange(2048, 34816), 600, replace=False).tolist():
        ops.append(Write("s16", chunk * 8192, 8192, payload_src(8192)))
    random_writes("s16", 20, 64 * MiB, [512])
    for i in range(27):
        ops.append(Write("s32", 100 * MiB + i * MiB, MiB, payload_src(MiB)))
    random_writes("s32", 20, 64 * MiB, [512, 4096])
    for i in range(263):
        ops.append(Write("s128", 4 * MiB + i * MiB, MiB, payload_src(MiB)))
    random_writes("s128", 5, ORIGIN_A_BYTES, [512, 1024])
    random_writes("orig", 350, RANDOM_PREFIX_BYTES, origin_sizes)
    for dev in ("s4", "s8"):
        random_writes(dev, 30, RANDOM_PREFIX_BYTES, [512, 4096])
    return ops


def chunks_of(w: Write, chunk_bytes: int) -> range:
    return range(w.offset // chunk_bytes, (w.offset + w.length - 1) // chunk_bytes + 1)


def expected_changes_a(sc: Scenario, name: str, cs: int) -> tuple[set[int],
                                                                  dict[int, list[Write]]]:
    cb = cs * SECTOR
    changed: set[int] = set()
    own: dict[int, list[Write]] = defaultdict(list)
    for w in sc.ops_a:
        if w.dev == "orig" or w.dev == name:
            changed.update(chunks_of(w, cb))
        if w.dev == name:
            for c in chunks_of(w, cb):
                own[c].append(w)
    return changed, own


def view_chunk_a(sc: Scenario, chunk: int, cb: int, own: list[Write]) -> bytes:
    """The snapshot's view of one chunk: the original origin plus the snapshot's own writes."""
    start = chunk * cb
    view = bytearray(sc.origin_a_prefix[start: start + cb].ljust(cb, b"\0"))
    for w in own:
        lo, hi = max(w.offset, start), min(w.offset + w.length, start + cb)
        view[lo - start: hi - start] = sc.data(w)[lo - w.offset: hi - w.offset]
    return bytes(view)


def prepare_a(sc: Scenario, rng: np.random.Generator, payload_src) -> str:
    origin = create_disk_image(sc.tmp / "origin-a.img", ORIGIN_A_BYTES)
    with open(origin, "r+b") as f:
        f.write(sc.origin_a_prefix)
    dev_origin = sc.disk("origin-a", origin)
    sc.ops_a = plan_a(rng, payload_src)
    (sc.share / "ops-a.json").write_text(json.dumps(
        [[w.dev, w.offset, w.length, w.src] for w in sc.ops_a]))
    lines = []
    length = ORIGIN_A_BYTES // SECTOR
    for name, cs in SNAPS_A.items():
        g = Geometry(cs)
        count = len(expected_changes_a(sc, name, cs)[0])
        chunks = count + 2 * (count // g.exceptions_per_area) + 16
        cow = sc.disk(name, create_disk_image(sc.tmp / f"cow-{name}.img",
                                              chunks * g.chunk_bytes))
        lines.append(f'dmsetup create {name} --table "0 {length} snapshot {dev_origin} {cow} '
                     f'P {cs}"')
    lines.append(f'dmsetup create orig --table "0 {length} snapshot-origin {dev_origin}"')
    lines.append("dmsetup mknodes")
    lines.append('python3 cowio.py ops-a.json results-a.json')
    for name in [*SNAPS_A, "orig"]:
        lines.append(f"dmsetup status {name} > status-{name}.txt")
        lines.append(f"dmsetup table {name} > table-{name}.txt")
    lines.append("dmsetup remove orig")
    lines.extend(f"dmsetup remove {name}" for name in SNAPS_A)
    cow8 = f"/dev/vd{chr(ord('a') + sc.disks.index(sc.names['s8']))}"
    lines.append(f'dmsetup create r8 --table "0 {length} snapshot {dev_origin} {cow8} P 16"')
    lines.append("dmsetup status r8 > status-r8.txt; dmsetup table r8 > table-r8.txt")
    lines.append("dmsetup remove r8")
    return "\n".join(lines)


# -- (b) stores we write --------------------------------------------------------------------

def build_store(size_bytes: int, cs: int, olds: list[int], rng: np.random.Generator,
                batches: list[int] | None = None) -> tuple[MemoryDevice, ExceptionStore,
                                                           dict[int, bytes]]:
    cow = MemoryDevice(size_bytes)
    store = open_store("P", cow, cs)
    data: dict[int, bytes] = {}
    pos = 0
    turn = 0
    while pos < len(olds):
        k = batches[turn % len(batches)] if batches else 1
        pairs = []
        for old in olds[pos: pos + k]:
            new = store.allocate()
            chunk = rng.integers(0, 256, store.chunk_bytes, dtype=np.uint8).tobytes()
            cow.write(store.cow_offset_bytes(new), chunk)
            data[old] = chunk
            pairs.append((old, new))
        store.commit(pairs)
        pos += k
        turn += 1
    return cow, store, data


def view_sha(origin: bytes, cb: int, store: ExceptionStore, cow: MemoryDevice) -> str:
    view = bytearray(origin)
    old, new = store.exceptions()
    for o, n in zip(old.tolist(), new.tolist()):
        end = min((o + 1) * cb, len(view))
        view[o * cb: end] = cow.read(n * cb, cb)[: end - o * cb]
    return hashlib.sha256(view).hexdigest()


def runs(rng: np.random.Generator, count: int, limit_chunks: int) -> list[int]:
    olds: list[int] = []
    while len(olds) < count:
        start = int(rng.integers(0, limit_chunks - 16))
        olds.extend(range(start, start + int(rng.integers(1, 9))))
        olds = list(dict.fromkeys(olds))
    return olds[:count]


def prepare_b(sc: Scenario, rng: np.random.Generator) -> str:
    origin = write_file(sc.tmp / "origin-b.img", sc.origin_b)
    dev_b = sc.disk("origin-b", origin)
    length = ORIGIN_B_BYTES // SECTOR
    lines = []
    specs = {
        "b1": (4 * MiB, 8, rng.choice(2048, 600, replace=False).tolist(), [1, 5, 17, 64]),
        "b2": (12288 * SECTOR, 16, rng.permutation(1024)[:512].tolist(), [3, 100, 7]),
        "b3": (4 * MiB, 8, runs(rng, 400, 2048), [9]),
        "b4": (4 * MiB, 32, rng.choice(256, 20, replace=False).tolist(), [4]),
        "b5": (4 * MiB, 8, [], None),
    }
    for name, (size, cs, olds, batches) in specs.items():
        cow, store, _ = build_store(size, cs, olds, rng, batches)
        if name == "b3":                       # merged down to 250, back across an area
            while len(store) > 250:
                store.commit_merge(store.prepare_merge().count)
            store = open_store("P", cow, cs)
        if name == "b4":
            store.invalidate()
        sc.expected_view[name] = view_sha(sc.origin_b, cs * SECTOR, store, cow)
        sc.twin_status[name] = store.status_text()
        dev = sc.disk(name, write_file(sc.tmp / f"cow-{name}.img", cow.data))
        lines.append(f'dmsetup create {name} --table "0 {length} snapshot {dev_b} {dev} P {cs}"')
        lines.append(f"dmsetup mknodes; dmsetup status {name} > status-{name}.txt")
        lines.append(f"dmsetup table {name} > table-{name}.txt")
        if name == "b4":
            lines.append(f"if dd if=/dev/mapper/{name} of=/dev/null bs=4096 count=1 "
                         f"iflag=direct 2>/dev/null; then echo ok; else echo failed; fi "
                         f"> read-{name}.txt")
        else:
            lines.append(f"sha256sum < /dev/mapper/{name} | cut -d' ' -f1 > sha-{name}.txt")
        lines.append(f"dmsetup remove {name}")
    # Duplicate old_chunk 10 (COW chunks 2 then 3), plus 11 -> 4.
    dup = MemoryDevice(4 * MiB)
    write_store(dup, 8, [10, 10, 11], [2, 3, 4])
    for chunk, fill in ((2, b"A"), (3, b"B"), (4, b"C")):
        dup.write(chunk * 4096, fill * 4096)
    dev = sc.disk("b6", write_file(sc.tmp / "cow-b6.img", dup.data))
    lines.append(f'dmsetup create b6 --table "0 {length} snapshot {dev_b} {dev} P 8"')
    lines.append("dmsetup mknodes; dmsetup status b6 > status-b6.txt")
    lines.append("dd if=/dev/mapper/b6 of=dup.bin bs=4096 skip=10 count=2 iflag=direct "
                 "status=none")
    lines.append("dmsetup remove b6")
    return "\n".join(lines)


# -- (c) twins -----------------------------------------------------------------------------

def twin_run(image: bytearray, cs: int, ops: list[Write], sc: Scenario,
             origin: bytes) -> tuple[bytes, str]:
    """Replay snapshot writes the way the kernel's snapshot target does them, with our store."""
    cow = MemoryDevice(data=image)
    store = open_store("P", cow, cs)
    cb = store.chunk_bytes
    for w in ops:
        old = w.offset // cb
        new = store.allocate()
        if w.length == cb and w.offset % cb == 0:
            cow.write(new * cb, sc.data(w))
            try:
                store.commit([(old, new)])
            except StoreWriteError:
                break
        else:
            cow.write(new * cb, origin[old * cb: (old + 1) * cb])
            store.commit([(old, new)])
            cow.write(new * cb + w.offset % cb, sc.data(w))
    return bytes(cow.data), store.status_text()


def prepare_c(sc: Scenario, rng: np.random.Generator, payload_src) -> str:
    dev_b = f"/dev/vd{chr(ord('a') + sc.disks.index(sc.names['origin-b']))}"
    length = ORIGIN_B_BYTES // SECTOR
    lines = []
    chunks = rng.choice(2048, 600, replace=False).tolist()
    twin_ops = []
    for i, c in enumerate(chunks):
        if i % 12 == 5:
            sector = int(rng.integers(0, 8))
            twin_ops.append(Write("tw", c * 4096 + sector * SECTOR, SECTOR, payload_src(SECTOR)))
        else:
            twin_ops.append(Write("tw", c * 4096, 4096, payload_src(4096)))
    cap_ops = [Write("cap", c * 4096, 4096, payload_src(4096))
               for c in rng.choice(2048, 256, replace=False).tolist()]
    garbage = MemoryDevice(4 * MiB)
    write_store(garbage, 8, [1, 2, 3])
    garbage.write(4096 + 4 * 16, b"\x55" * 48)         # slots 4..6, behind the terminator
    after_garbage = [Write("gb", 100 * 4096, 4096, payload_src(4096))]
    for name, image, ops in (("tw", stale_image(8 * MiB), twin_ops),
                             ("cap", stale_image(258 * 4096), cap_ops),
                             ("gb", bytearray(garbage.data), after_garbage)):
        dev = sc.disk(name, write_file(sc.tmp / f"cow-{name}.img", image))
        sc.twins[name], sc.twin_status[name] = twin_run(bytearray(image), 8, ops, sc,
                                                        sc.origin_b)
        (sc.share / f"ops-{name}.json").write_text(json.dumps(
            [[w.dev, w.offset, w.length, w.src] for w in ops]))
        lines.append(f'dmsetup create {name} --table "0 {length} snapshot {dev_b} {dev} P 8"')
        lines.append(f"dmsetup mknodes; python3 cowio.py ops-{name}.json results-{name}.json")
        lines.append(f"dmsetup status {name} > status-{name}.txt; dmsetup remove {name}")
    return "\n".join(lines)


# -- (d) merge -----------------------------------------------------------------------------

def prepare_d(sc: Scenario, rng: np.random.Generator) -> str:
    cow, store, data = build_store(4 * MiB, 8, runs(rng, 600, 2048), rng, [1, 6, 30])
    origin = bytearray(sc.origin_c)
    for old, chunk in data.items():
        origin[old * 4096: (old + 1) * 4096] = chunk
    sc.merge_expected_origin = bytes(origin)
    merged = MemoryDevice(data=cow.data)
    ours = open_store("P", merged, 8)
    while (batch := ours.prepare_merge()) is not None:
        ours.commit_merge(batch.count)
    assert ours.status_text() == "16/8192 16"
    sc.merge_expected_cow = bytes(merged.data)
    dev_origin = sc.disk("origin-c", write_file(sc.tmp / "origin-c.img", sc.origin_c))
    dev_cow = sc.disk("merge-cow", write_file(sc.tmp / "cow-merge.img", cow.data))
    length = ORIGIN_B_BYTES // SECTOR
    return textwrap.dedent(f"""\
        dmsetup create m --table "0 {length} snapshot-merge {dev_origin} {dev_cow} P 8"
        dmsetup status m > status-m-start.txt
        i=0
        while :; do
            set -- $(dmsetup status m)
            case "$4" in Invalid|Merge|Overflow) echo "merge failed: $*" >&2; exit 1;; esac
            [ "${{4%%/*}}" = "$5" ] && break
            i=$((i + 1)); [ $i -lt 1200 ] || {{ echo "merge stuck: $*" >&2; exit 1; }}
            sleep 0.1
        done
        dmsetup status m > status-m.txt
        dmsetup remove m
        """)


def run_scenario(kernel_guest: KernelGuest, tmp: Path) -> Scenario:
    share = tmp / "share"
    share.mkdir(parents=True)
    rng = np.random.default_rng(20240601)
    payload = rng.integers(0, 256, PAYLOAD_BYTES, dtype=np.uint8).tobytes()
    (share / "payload.bin").write_bytes(payload)
    (share / "cowio.py").write_text(WRITER)
    sc = Scenario(tmp, share, payload,
                  rng.integers(0, 256, RANDOM_PREFIX_BYTES, dtype=np.uint8).tobytes(),
                  rng.integers(0, 256, ORIGIN_B_BYTES, dtype=np.uint8).tobytes(),
                  rng.integers(0, 256, ORIGIN_B_BYTES, dtype=np.uint8).tobytes())

    def payload_src(length: int) -> int:
        return int(rng.integers(0, (PAYLOAD_BYTES - length) // SECTOR)) * SECTOR

    script = "\n".join([prepare_a(sc, rng, payload_src), prepare_b(sc, rng),
                        prepare_c(sc, rng, payload_src), prepare_d(sc, rng),
                        "echo cow-kernel-done", ""])
    result = kernel_guest.run(script, sc.disks, share, timeout_s=600).check()
    assert result.stdout.strip().endswith("cow-kernel-done")
    return sc


@pytest.fixture(scope="module")
def run(kernel_guest: KernelGuest, tmp_path_factory: pytest.TempPathFactory,
        request: pytest.FixtureRequest) -> Scenario:
    """The one boot. Under pytest-xdist the first worker to get here runs it and the others
    load its results, so the guest boots once per session."""
    if not hasattr(request.config, "workerinput"):
        return run_scenario(kernel_guest, tmp_path_factory.mktemp("cow-kernel"))
    shared = tmp_path_factory.getbasetemp().parent / "cow-kernel"
    with file_lock(shared.parent / "cow-kernel.lock"):
        saved = shared / "scenario.pickle"
        failure = shared / "failure.txt"
        if failure.exists():
            pytest.fail(f"the shared kernel run failed in another worker: {failure.read_text()}")
        if saved.exists():
            return pickle.loads(saved.read_bytes())
        shared.mkdir(parents=True, exist_ok=True)
        try:
            sc = run_scenario(kernel_guest, shared)
        except Exception as exc:
            failure.write_text(f"{type(exc).__name__}: {exc}")
            raise
        saved.write_bytes(pickle.dumps(sc))
        return sc


# -- checks -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(SNAPS_A))
def test_kernel_written_store_is_read_exactly(run: Scenario, name: str) -> None:
    sc = run
    cs = SNAPS_A[name]
    g = Geometry(cs)
    cb = g.chunk_bytes
    results = json.loads((sc.share / "results-a.json").read_text())
    assert results == [w.length for w in sc.ops_a]
    changed, own = expected_changes_a(sc, name, cs)
    with FileDevice(sc.names[name], writable=False) as dev:
        image = read_cow(dev)
        table = image.table
        n = len(table)
        assert n == len(changed)
        assert n > (2 if cs < 128 else 1) * g.exceptions_per_area      # several areas
        # §2.5: a modern kernel allocates in order, skipping metadata chunks.
        assert (table.new == g.allocation_chunks(n)).all()
        result = changed_chunks(image)
        begins, ends = merge_ranges(np.array(sorted(changed), dtype=np.uint64))
        assert result.ranges() == [[b, e] for b, e in zip(begins.tolist(), ends.tolist())]
        assert result.valid and result.chunk_sectors == cs
        store = open_store("P", dev, cs)
        assert store.status_text() == sc.status(name)
        assert sc.table(name).endswith(f" P {cs}")
        assert not store.anomalies
        for old, new in zip(table.old.tolist(), table.new.tolist()):
            assert dev.read(new * cb, cb) == view_chunk_a(sc, old, cb, own.get(old, [])), \
                f"{name}: chunk {old} (COW chunk {new})"


def test_changed_cli_on_a_kernel_written_cow(run: Scenario) -> None:
    from tests.snapshot.helpers import run_cow

    r = run_cow("changed", "--json", str(run.names["s8"]))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    changed, _ = expected_changes_a(run, "s8", 8)
    assert doc["chunk_size"] == 8 and doc["valid"] is True and doc["exceptions"] == len(changed)
    assert sum(e - b for b, e in doc["ranges"]) == len(changed)
    assert doc["sector_ranges"] == [[b * 8, e * 8] for b, e in doc["ranges"]]


def test_header_chunk_size_wins_over_the_table(run: Scenario) -> None:
    with FileDevice(run.names["s8"], writable=False) as dev:
        store = open_store("P", dev, 16)
        status = store.status_text()
    assert run.table("r8").endswith(" P 8")
    assert store.chunk_sectors == 8 and run.status("r8") == status
    assert store.warnings == ["chunk size 8 in device metadata overrides table chunk size "
                              "of 16."]


def test_cow_area_one_at_chunk_130_for_chunk_size_4(run: Scenario) -> None:
    with FileDevice(run.names["s4"], writable=False) as dev:
        raw = dev.read(0x41000, 16)
        table = read_cow(dev).table
    assert int.from_bytes(raw[8:], "little") == 131      # record 128's new_chunk
    assert table.old[128] == int.from_bytes(raw[:8], "little")


@pytest.mark.parametrize("name", ["b1", "b2", "b3", "b5"])
def test_kernel_activates_our_stores(run: Scenario, name: str) -> None:
    assert run.status(name) == run.twin_status[name]
    assert (run.share / f"sha-{name}.txt").read_text().strip() == run.expected_view[name]


def test_kernel_status_of_our_store_edge_cases(run: Scenario) -> None:
    assert run.status("b2") == "8240/12288 48"          # exactly full area 0
    assert run.status("b5") == "16/8192 16"              # a fresh store we created
    assert run.table("b4").endswith(" P 32")
    assert run.status("b4") == "Invalid"
    assert (run.share / "read-b4.txt").read_text().strip() == "failed"


def test_duplicate_records_first_one_wins(run: Scenario) -> None:
    data = (run.share / "dup.bin").read_bytes()
    with FileDevice(run.names["b6"], writable=False) as dev:
        store = open_store("P", dev, 8)
        assert [a.kind for a in store.anomalies] == ["duplicate_old"]
        assert store.lookup(10) == 2 and store.lookup(11) == 4
    assert data == b"A" * 4096 + b"C" * 4096
    assert run.status("b6") == "40/8192 16"


@pytest.mark.parametrize("name", ["tw", "cap", "gb"])
def test_twin_images_are_byte_identical(run: Scenario, name: str) -> None:
    kernel = run.names[name].read_bytes()
    ours = run.twins[name]
    assert len(kernel) == len(ours)
    if kernel != ours:
        diff = np.flatnonzero(np.frombuffer(kernel, np.uint8) != np.frombuffer(ours, np.uint8))
        pytest.fail(f"{name}: {len(diff)} bytes differ, first at {int(diff[0]):#x}")
    assert run.status(name) == run.twin_status[name]
    results = json.loads((run.share / f"results-{name}.json").read_text())
    if name == "cap":      # 255 exceptions fit in 258 chunks; the 256th write fails (EIO)
        assert results[:255] == [4096] * 255 and results[255] == -5
        assert run.status(name) == "Invalid"
    else:
        assert all(r > 0 for r in results)


def test_garbage_behind_the_terminator_becomes_records(run: Scenario) -> None:
    with FileDevice(run.names["gb"], writable=False) as dev:
        table = read_cow(dev).table
    garbage = int.from_bytes(b"\x55" * 8, "little")
    assert table.old.tolist() == [1, 2, 3, 100, garbage, garbage, garbage]
    assert table.new.tolist()[:4] == [2, 3, 4, 5]


def test_kernel_merge_matches_ours(run: Scenario) -> None:
    assert run.status("m") == "16/8192 16"
    assert run.names["origin-c"].read_bytes() == run.merge_expected_origin
    kernel_cow = run.names["merge-cow"].read_bytes()
    assert kernel_cow == run.merge_expected_cow
