"""A model-based test of the snapshot targets: any interleaving of writes to the origin and to
each snapshot, creating, reloading and removing snapshots (P, PO, N; chunk sizes 8-32;
COWs small enough to fill), and merging a snapshot back keeps every device equal to a plain
in-memory model, the status lines equal to what the model predicts from the layout rules of
docs/snapshot.md §1/§2.5/§4.3, and `cow changed` equal to the model's set of changed
chunks.

The model knows nothing of the implementation: a snapshot is the origin's bytes when it was
created plus its own writes, and the set of chunks that have an exception; the j-th exception
of a persistent store lives in data chunk 2 + j + j // EPA, fits if that chunk ends inside the
COW, and when it fills an area the next area must fit too.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from blockera.blockdev import MemoryDevice
from blockera.engine.userspace import Engine
from blockera.errors import DeviceError
from blockera.snapshot import changed_chunks, read_cow

SECTOR = 512
ORIGIN_SECTORS = 2048                    # 1 MiB
MAX_SNAPSHOTS = 3


def payload_for(seed: int, length: int) -> bytes:
    out = bytearray()
    while len(out) < length:
        out += hashlib.sha256(f"{seed}:{len(out)}".encode()).digest()
    return bytes(out[:length])


@dataclass
class ModelSnapshot:
    name: str
    cow_path: str
    kind: str                 # P, PO, N
    cs: int                   # chunk size in sectors
    cow_sectors: int
    view: bytearray
    exceptions: list[int] = field(default_factory=list)      # old chunks, allocation order
    valid: bool = True
    overflowed: bool = False

    @property
    def epa(self) -> int:
        return self.cs * 32

    def fits(self, j: int) -> tuple[bool, bool]:
        """(the j-th exception's chunk can be allocated, its commit can succeed)."""
        if self.kind == "N":
            return (j + 1) * self.cs <= self.cow_sectors, True
        chunk = 2 + j + j // self.epa
        if (chunk + 1) * self.cs > self.cow_sectors:
            return False, False
        if (j + 1) % self.epa:
            return True, True
        successor = 1 + ((j + 1) // self.epa) * (self.epa + 1)
        return True, (successor + 1) * self.cs <= self.cow_sectors

    def copy_out(self, start: int, end: int) -> None:
        """The origin's sectors [start, end) are about to change: the chunks without an
        exception get one, in ascending order, until the COW is full (then: invalid)."""
        for chunk in range(start // self.cs, (end - 1) // self.cs + 1):
            if not self.valid:
                return
            if chunk in self.exceptions:
                continue
            allocated, committed = self.fits(len(self.exceptions))
            if not (allocated and committed):
                self.valid = False
                return
            self.exceptions.append(chunk)

    def status(self) -> str:
        if not self.valid:
            return "Invalid"
        if self.overflowed:
            return "Overflow"
        n = len(self.exceptions)
        if self.kind == "N":
            return f"{n * self.cs}/{self.cow_sectors} 0"
        return (f"{(2 + n + n // self.epa) * self.cs}/{self.cow_sectors} "
                f"{(n // self.epa + 2) * self.cs}")


class SnapshotMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="snapmodel-")
        self.memory: dict[str, MemoryDevice] = {}

        def opener(path: str, writable: bool) -> MemoryDevice:
            return self.memory[os.path.realpath(path)]

        self.engine = Engine(file_opener=opener)
        self.origin = bytearray(payload_for(0, ORIGIN_SECTORS * SECTOR))
        self.origin_path = self._file("origin", bytes(self.origin))
        self.snaps: list[ModelSnapshot] = []
        self.counter = 0

    def _file(self, name: str, content: bytes) -> str:
        path = os.path.realpath(os.path.join(self.dir, f"{name}.img"))
        open(path, "wb").close()           # the engine stats the path; I/O goes to memory
        self.memory[path] = MemoryDevice(data=bytearray(content))
        return path

    @initialize(cs=st.sampled_from([4, 8]), kind=st.sampled_from(["P", "PO"]),
                cow_chunks=st.integers(120, 300))
    def stack(self, cs: int, kind: str, cow_chunks: int) -> None:
        """The origin stack, with a first snapshot whose store can span several areas."""
        e = self.engine
        e.create("real", f"0 {ORIGIN_SECTORS} linear {self.origin_path} 0")
        e.create("base", f"0 {ORIGIN_SECTORS} snapshot-origin /dev/mapper/real")
        self.create_snapshot(cs, kind, cow_chunks, stale=True)

    def teardown(self) -> None:
        self.engine.shutdown()
        for name in os.listdir(self.dir):
            os.unlink(os.path.join(self.dir, name))
        os.rmdir(self.dir)

    # -- snapshots come and go ------------------------------------------------------------
    @precondition(lambda self: len(self.snaps) < MAX_SNAPSHOTS)
    @rule(cs=st.sampled_from([4, 8, 16, 32]), kind=st.sampled_from(["P", "PO", "N"]),
          cow_chunks=st.one_of(st.integers(3, 40), st.integers(120, 300)), stale=st.booleans())
    def create_snapshot(self, cs: int, kind: str, cow_chunks: int, stale: bool) -> None:
        """Chunk size 4 gives 128 exceptions per area: big COWs then span several areas."""
        self.counter += 1
        name = f"snap{self.counter}"
        fill = b"\xa5" if stale else b"\0"
        content = bytearray(fill * (cow_chunks * cs * SECTOR))
        content[:cs * SECTOR] = bytes(cs * SECTOR)      # header chunk zeroed: a new store
        path = self._file(name, bytes(content))
        e = self.engine
        e.suspend("base")
        e.create(name, f"0 {ORIGIN_SECTORS} snapshot /dev/mapper/real {path} {kind} {cs}")
        e.resume("base")
        self.snaps.append(ModelSnapshot(name, path, kind, cs, cow_chunks * cs,
                                        bytearray(self.origin)))

    @precondition(lambda self: self.snaps)
    @rule(data=st.data())
    def remove_snapshot(self, data: st.DataObject) -> None:
        snap = self._draw_snapshot(data, self.snaps)
        e = self.engine
        e.suspend("base")
        e.remove(snap.name)
        e.resume("base")
        self.snaps.remove(snap)

    @precondition(lambda self: self.snaps)
    @rule(data=st.data())
    def reload_snapshot(self, data: st.DataObject) -> None:
        """A table reload hands the store over to the new table instance."""
        snap = self._draw_snapshot(data, self.snaps)
        e = self.engine
        e.suspend("base")
        e.load(snap.name, f"0 {ORIGIN_SECTORS} snapshot /dev/mapper/real {snap.cow_path} "
                          f"{snap.kind} {snap.cs}")
        e.resume(snap.name)
        e.resume("base")

    @staticmethod
    def _draw_snapshot(data: st.DataObject, snaps: list[ModelSnapshot]) -> ModelSnapshot:
        names = {s.name: s for s in snaps}
        return names[data.draw(st.sampled_from(sorted(names)), label="snapshot")]

    # -- writes ---------------------------------------------------------------------------
    def _range(self, data: st.DataObject) -> tuple[int, int]:
        start = data.draw(st.integers(0, ORIGIN_SECTORS - 1))
        count = data.draw(st.integers(1, min(512, ORIGIN_SECTORS - start)))
        return start, count

    @rule(data=st.data())
    def write_origin(self, data: st.DataObject) -> None:
        start, count = self._range(data)
        self.counter += 1
        payload = payload_for(self.counter, count * SECTOR)
        for snap in self.snaps:
            snap.copy_out(start, start + count)
        self.engine.device("base").write(start * SECTOR, payload)
        self.origin[start * SECTOR: (start + count) * SECTOR] = payload

    @precondition(lambda self: self.snaps)
    @rule(data=st.data())
    def write_snapshot(self, data: st.DataObject) -> None:
        snap = self._draw_snapshot(data, self.snaps)
        start, count = self._range(data)
        self.counter += 1
        payload = payload_for(self.counter, count * SECTOR)
        expect_error = not snap.valid or snap.overflowed
        applied_end = start if expect_error else start + count
        if not expect_error:
            for chunk in range(start // snap.cs, (start + count - 1) // snap.cs + 1):
                if chunk in snap.exceptions:
                    continue
                allocated, committed = snap.fits(len(snap.exceptions))
                if allocated and not committed:
                    snap.valid = False
                elif not allocated:
                    if snap.kind == "PO":
                        snap.overflowed = True
                    else:
                        snap.valid = False
                    applied_end = max(start, chunk * snap.cs)
                if not (allocated and committed):
                    expect_error = True
                    break
                snap.exceptions.append(chunk)
        try:
            self.engine.device(snap.name).write(start * SECTOR, payload)
        except DeviceError as exc:
            assert expect_error, f"unexpected error: {exc}"
            assert exc.errno_name == "EIO"
        else:
            assert not expect_error, "the write should have failed"
        if snap.valid and applied_end > start:
            snap.view[start * SECTOR: applied_end * SECTOR] = \
                payload[: (applied_end - start) * SECTOR]

    # -- merging a snapshot back (lvconvert --merge) ----------------------------------------
    @precondition(lambda self: any(s.valid and s.kind != "N" for s in self.snaps))
    @rule(data=st.data())
    def merge(self, data: st.DataObject) -> None:
        snap = self._draw_snapshot(data, [s for s in self.snaps if s.valid and s.kind != "N"])
        e = self.engine
        e.suspend(snap.name)
        e.suspend("base")
        e.load("base", f"0 {ORIGIN_SECTORS} snapshot-merge /dev/mapper/real {snap.cow_path} "
                       f"P {snap.cs}")
        e.resume("base")
        e.load(snap.name, f"0 {ORIGIN_SECTORS} error")
        e.resume(snap.name)
        e.remove(snap.name)
        e.settle()
        # the Overflow state is handed over with the store (as in the kernel) and shown first
        done = "Overflow" if snap.overflowed else \
            f"{2 * snap.cs}/{snap.cow_sectors} {2 * snap.cs}"
        assert e.status("base") == f"0 {ORIGIN_SECTORS} snapshot-merge {done}\n"
        self.snaps.remove(snap)
        # the other snapshots got copy-outs for the merged chunks, like any origin write
        for other in self.snaps:
            for old in snap.exceptions:
                other.copy_out(old * snap.cs, min((old + 1) * snap.cs, ORIGIN_SECTORS))
        self.origin[:] = snap.view
        event(f"merged a {snap.kind} snapshot with "
              f"{'several areas' if len(snap.exceptions) > snap.epa else 'one area'} of "
              f"{'no ' if not snap.exceptions else ''}exceptions")
        e.suspend("base")
        e.load("base", f"0 {ORIGIN_SECTORS} snapshot-origin /dev/mapper/real")
        e.resume("base")

    # -- what every device shows ------------------------------------------------------------
    @invariant()
    def devices_match_the_model(self) -> None:
        e = self.engine
        if "base" not in e.devices:
            return
        e.settle()
        assert e.device("base").read(0, ORIGIN_SECTORS * SECTOR) == bytes(self.origin)
        for snap in self.snaps:
            event(f"{snap.kind} snapshot state: "
                  f"{'invalid' if not snap.valid else 'overflow' if snap.overflowed else 'ok'}")
            status = e.status(snap.name).split(" ", 3)[3].rstrip("\n")
            assert status == snap.status(), snap
            dev = e.device(snap.name)
            if not snap.valid:
                try:
                    dev.read(0, SECTOR)
                except DeviceError:
                    continue
                raise AssertionError("an invalid snapshot must fail reads")
            assert dev.read(0, ORIGIN_SECTORS * SECTOR) == bytes(snap.view), snap.name
            if snap.kind != "N":
                result = changed_chunks(read_cow(self.memory[snap.cow_path]))
                expected = sorted(snap.exceptions)
                runs: list[list[int]] = []
                for chunk in expected:
                    if runs and runs[-1][1] == chunk:
                        runs[-1][1] += 1
                    else:
                        runs.append([chunk, chunk + 1])
                assert result.ranges() == runs


TestSnapshotModel = SnapshotMachine.TestCase
TestSnapshotModel.settings = settings(max_examples=80, stateful_step_count=50, deadline=None,
                                      suppress_health_check=[HealthCheck.too_slow])
