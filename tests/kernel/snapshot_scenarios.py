"""The snapshot conformance scenarios (run by test_snapshot_conformance.py): chunk sizes 8, 16,
32 (the kernel's default for `P 0`) and 128; P, PO and N stores; a store spanning several
metadata areas; overflow and Invalid; two snapshots of one origin; writes to the snapshot
itself; discards with discard_zeroes_cow; a handover by reload; a full merge (LVM's
lvconvert --merge) and a merge straight from disk; seed 004's snapshot-origin backup stack;
constructor errors. Scenarios with a handoff point also run with the COW (and origin) written
by one engine and used -- loaded, written, merged -- by the other.

Every origin starts with known data (written through a linear device) so that copy-outs move
real data; "{origin}" and "{cowN}" are the scenario's disks.
"""

from __future__ import annotations

from .scenarios import MiB, Scenario

S = 8192                    # 4 MiB origins
K4 = 4096


def _stack(cs: int = 8, kind: str = "P", cow: str = "cow", name: str = "snap",
           features: str = "") -> list[tuple]:
    """seed 003's layering: real (linear), base (snapshot-origin), one snapshot."""
    return [
        ("create", "real", f"0 {S} linear {{origin}} 0"),
        ("write_at", "real", 0, S * 512, 1),
        ("create", "base", f"0 {S} snapshot-origin /dev/mapper/real"),
        ("suspend", "base"),
        ("create", name, f"0 {S} snapshot /dev/mapper/real {{{cow}}} {kind} {cs}{features}"),
        ("resume", "base"),
        ("status", name), ("table", name), ("status", "base"), ("table", "base"),
    ]


def _resume(cs: int = 8, kind: str = "P") -> list[tuple]:
    """The stack again over disks that already hold a COW (the second half of a handoff)."""
    return [
        ("create", "real", f"0 {S} linear {{origin}} 0"),
        ("create", "base", f"0 {S} snapshot-origin /dev/mapper/real"),
        ("suspend", "base"),
        ("create", "snap", f"0 {S} snapshot /dev/mapper/real {{cow}} {kind} {cs}"),
        ("resume", "base"),
    ]


def _merge(cs: int = 8, snap: str = "snap", cow: str = "cow") -> list[tuple]:
    """lvconvert --merge: the origin takes the store over as snapshot-merge, the snapshot
    gets the error target; then wait for the merge, and drop the merge layer."""
    return [
        ("suspend", snap), ("suspend", "base"),
        ("load", "base", f"0 {S} snapshot-merge /dev/mapper/real {{{cow}}} P {cs}"),
        ("resume", "base"),
        ("load", snap, f"0 {S} error"), ("resume", snap), ("remove", snap),
        ("wait_merge", "base"), ("table", "base"), ("sha", "base"), ("cow", cow),
        ("suspend", "base"), ("load", "base", f"0 {S} linear /dev/mapper/real 0"),
        ("resume", "base"), ("sha", "base"),
    ]


def _origin_writes(seed: int) -> list[tuple]:
    return [
        ("write", "base", K4, [3, 700, 1023], seed),               # whole 4 KiB chunks
        ("write_at", "base", 41 * 512, 512, seed + 1),             # one sector
        ("write_at", "base", 100 * K4 + 1024, 3 * K4, seed + 2),   # unaligned, 4 chunks
    ]


_TEARDOWN = [("remove", "snap"), ("remove", "base"), ("remove", "real")]

SNAPSHOT_SCENARIOS: list[Scenario] = [
    Scenario("p8-copy-out", {"origin": 4 * MiB, "cow": 4 * MiB}, _stack(8) + _origin_writes(10) + [
        ("status", "snap"), ("sha", "snap"), ("sha", "base"), ("cow", "cow"),
        ("write", "base", K4, [3], 20), ("status", "snap"),           # already copied
        ("sha", "snap"), ("cow", "cow")] + _TEARDOWN,
        handoff_after=13, carried=["origin", "cow"], resume_steps=_resume(8)),
    Scenario("p8-several-areas", {"origin": 4 * MiB, "cow": 4 * MiB},
             _stack(8) + [
        ("write_at", "base", 0, 3 * MiB, 30),                        # 768 chunks: 3 areas
        ("status", "snap"), ("cow", "cow"), ("sha", "snap"),
        ("write_at", "base", 3 * MiB + 4096, 3 * K4, 31), ("status", "snap"),
        ("sha", "snap"), ("sha", "base")] + _TEARDOWN,
        handoff_after=13, carried=["origin", "cow"], resume_steps=_resume(8),
        notes="256 exceptions per area at chunk size 8"),
    Scenario("p0-default-chunk-32", {"origin": 4 * MiB, "cow": 4 * MiB}, _stack(0) + [
        ("write_at", "base", 7 * K4, 2 * K4, 40), ("status", "snap"), ("table", "snap"),
        ("sha", "snap"), ("cow", "cow")] + _TEARDOWN),
    Scenario("p128", {"origin": 4 * MiB, "cow": 4 * MiB}, _stack(128) + _origin_writes(50) + [
        ("write_at", "snap", 64 * 1024 * 9, 64 * 1024, 53),          # a whole snapshot chunk
        ("write_at", "snap", 64 * 1024 * 20 + 512, 1024, 54),        # part of one
        ("status", "snap"), ("sha", "snap"), ("sha", "base"), ("cow", "cow")] + _TEARDOWN),
    Scenario("po-overflow", {"origin": 4 * MiB, "cow": 64 * 1024},
             _stack(8, "PO") + [
        ("write", "snap", K4, list(range(0, 14)), 60),               # 14 data chunks fit
        ("status", "snap"),
        ("write", "snap", K4, [20], 61),                             # no room: Overflow
        ("status", "snap"), ("sha", "snap"), ("write", "snap", K4, [0], 62),
        ("cow", "cow"), ("remove", "snap"),
        ("suspend", "base"),
        ("create", "snap", f"0 {S} snapshot /dev/mapper/real {{cow}} PO 8"),
        ("resume", "base"), ("status", "snap"),                       # not persistent
        ("write", "base", K4, [30], 63), ("status", "snap"), ("cow", "cow")] + _TEARDOWN,
        notes="docs/persistent-data.md §1.11: writes fail, reads work; reload shows usage again"),
    Scenario("p-invalid-when-full", {"origin": 4 * MiB, "cow": 40 * 1024},
             _stack(8) + [
        ("write", "base", K4, [1, 2, 3, 4, 5, 6, 7, 8], 70),         # exactly fills it
        ("status", "snap"), ("write", "base", K4, [9], 71),          # no room: Invalid
        ("status", "snap"), ("sha", "snap"), ("sha", "base"), ("cow", "cow"),
        ("remove", "snap"), ("suspend", "base"),
        ("create", "snap", f"0 {S} snapshot /dev/mapper/real {{cow}} P 8"),
        ("resume", "base"), ("status", "snap"), ("table", "snap")] + _TEARDOWN,
        notes="an origin write that cannot be copied out invalidates, for good"),
    Scenario("n-transient", {"origin": 4 * MiB, "cow": 4 * MiB}, _stack(8, "N") + [
        ("write", "base", K4, [7, 8, 9], 80), ("write", "snap", K4, [20], 81),
        ("write_at", "snap", 30 * K4 + 512, 512, 82),
        ("status", "snap"), ("sha", "snap"), ("sha", "base")] + _TEARDOWN),
    Scenario("two-snapshots", {"origin": 4 * MiB, "cow": 4 * MiB, "cow2": 4 * MiB},
             _stack(8) + [
        ("suspend", "base"),
        ("create", "snap2", f"0 {S} snapshot /dev/mapper/real {{cow2}} P 32"),
        ("resume", "base"),
        ("write", "base", K4, [1, 5], 90), ("status", "snap"), ("status", "snap2"),
        ("write", "snap2", K4, [40], 91),
        ("sha", "snap"), ("sha", "snap2"), ("cow", "cow"), ("cow", "cow2"),
        ("remove", "snap2")] + _TEARDOWN,
        notes="one origin write copies out to both (docs/persistent-data.md §2.4)"),
    Scenario("snapshot-writes", {"origin": 4 * MiB, "cow": 4 * MiB}, _stack(8) + [
        ("write", "snap", K4, [10, 11], 100),                        # whole chunks
        ("write_at", "snap", 99 * 512, 512, 101),                    # a sector of chunk 12
        ("write_at", "snap", 50 * K4 + 2048, 5 * K4, 102),           # partial at both ends
        ("status", "snap"), ("sha", "snap"), ("sha", "base"), ("cow", "cow"),
        ("write", "base", K4, [10, 51], 103),                        # 10 is already there
        ("status", "snap"), ("sha", "snap")] + _TEARDOWN,
        handoff_after=13, carried=["origin", "cow"], resume_steps=_resume(8)),
    Scenario("discard-zeroes-cow", {"origin": 4 * MiB, "cow": 4 * MiB},
             _stack(8, features=" 1 discard_zeroes_cow") + [
        ("write", "snap", K4, [2], 110), ("discard", "snap", 0, 4 * K4),
        ("status", "snap"), ("sha", "snap"), ("sha", "base")] + _TEARDOWN,
        notes="docs/persistent-data.md §2.5: the chunk with an exception reads zeros, the others the origin"),
    Scenario("reload-handover", {"origin": 4 * MiB, "cow": 4 * MiB}, _stack(8) + [
        ("write", "base", K4, [4], 120),
        ("suspend", "base"),
        ("load", "snap", f"0 {S} snapshot /dev/mapper/real {{cow}} PO 8"),
        ("resume", "snap"), ("resume", "base"),
        ("status", "snap"), ("table", "snap"),
        ("write", "base", K4, [6], 121), ("status", "snap"), ("sha", "snap"),
        ("cow", "cow")] + _TEARDOWN),
    Scenario("merge", {"origin": 4 * MiB, "cow": 4 * MiB},
             _stack(8) + [
        ("write_at", "base", MiB, 300 * K4, 130),                    # 300 chunks, 2 areas
        ("write", "snap", K4, [0], 131), ("write_at", "snap", 99 * 512, 512, 132),
        ("status", "snap"), ("sha", "snap")] + _merge(8) + [("remove", "base"),
                                                            ("remove", "real")],
        handoff_after=14, carried=["origin", "cow"],
        resume_steps=[
            ("create", "real", f"0 {S} linear {{origin}} 0"),
            ("create", "base", f"0 {S} snapshot-origin /dev/mapper/real"),
            ("suspend", "base"),
            ("create", "snap", f"0 {S} snapshot /dev/mapper/real {{cow}} P 8"),
            ("resume", "base"), ("status", "snap")],
        notes="the handoff: one engine's COW merged by the other"),
    Scenario("merge-from-disk", {"origin": 4 * MiB, "cow": 4 * MiB}, _stack(16) + [
        ("write_at", "base", 0, 64 * 8192, 140), ("write", "snap", K4, [900], 141),
        ("sha", "snap"), ("remove", "snap"), ("remove", "base"),
        ("create", "base", f"0 {S} snapshot-merge /dev/mapper/real {{cow}} P 16"),
        ("wait_merge", "base"), ("sha", "base"), ("cow", "cow"),
        ("remove", "base"), ("remove", "real")],
        notes="no handover: the merge target reads the store itself (docs/persistent-data.md §2.7)"),
    Scenario("seed-004-backup-stack", {"md2": 4 * MiB, "sdb6": 4 * MiB}, [
        ("create", "md2", "0 8192 linear {md2} 0"),
        ("create", "md2_dup", "0 8192 linear {md2} 0"),
        ("write_at", "md2", 0, 4 * MiB, 150),
        ("suspend", "md2"),
        ("create", "cow", "0 8192 snapshot /dev/mapper/md2_dup {sdb6} p 32"),
        ("create", "origin", "0 8192 snapshot-origin /dev/mapper/md2_dup"),
        ("load", "md2", "0 8192 snapshot-origin /dev/mapper/md2_dup"),
        ("resume", "md2"),
        ("table", "md2"), ("table", "md2_dup"), ("status", "cow"), ("sha", "cow"),
        ("write_at", "md2", 3 * 64 * 1024, 40 * 64 * 1024, 151),
        ("status", "cow"), ("sha", "cow"), ("sha", "md2"), ("cow", "sdb6"),
        ("suspend", "md2"), ("remove", "origin"), ("remove", "cow"),
        ("load", "md2", "0 8192 linear {md2} 0"), ("resume", "md2"), ("table", "md2"),
        ("sha", "md2"), ("remove", "md2"), ("remove", "md2_dup")]),
    Scenario("snapshot-constructor-errors", {"origin": 4 * MiB, "cow": 4 * MiB}, [
        ("create", "real", f"0 {S} linear {{origin}} 0"),
        ("create", "s", f"0 {S} snapshot /dev/mapper/real {{cow}} P"),
        ("create", "s", f"0 {S} snapshot /dev/mapper/real {{cow}} X 8"),
        ("create", "s", f"0 {S} snapshot /dev/mapper/real {{cow}} PX 8"),
        ("create", "s", f"0 {S} snapshot /dev/mapper/real {{cow}} P 12"),
        ("create", "s", f"0 {S} snapshot /dev/mapper/real {{cow}} N 0"),
        ("create", "s", f"0 {S} snapshot /dev/mapper/real {{cow}} P 8 3 a b c"),
        ("create", "s", f"0 {S} snapshot /dev/mapper/real {{cow}} P 8 1 bogus"),
        ("create", "s", f"0 {S} snapshot /dev/mapper/real {{cow}} P 8 1 "
                        "discard_passdown_origin"),
        ("create", "s", f"0 {S} snapshot /dev/mapper/real /dev/mapper/real P 8"),
        ("create", "s", f"0 {S} snapshot-origin /dev/mapper/real {{cow}}"),
        ("create", "s", f"0 {S} snapshot-merge /dev/mapper/real {{cow}} N 8"),
        ("create", "s", f"0 {S} snapshot /dev/mapper/real {{cow}} pox 08 0"),
        ("table", "s"), ("status", "s"), ("remove", "s"), ("remove", "real")]),
]
