"""The era conformance scenarios (run by test_era_conformance.py): block sizes 8, 24, 128 and
4096, checkpoints with and without writes, a metadata snapshot held across writes, reload,
remove/recreate, suspend/resume, resize, seed 000's stacking, constructor and message errors,
many blocks, pending writesets; the kernel's own status trace of docs/era.md §3."""

from __future__ import annotations

from .scenarios import K64, MiB, Scenario


def _era(bs: int, sectors: int = 65536) -> str:
    return f"0 {sectors} era {{meta}} {{origin}} {bs}"


TRACE = [
    ("create", "era", _era(128)), ("status", "era"),
    ("write", "era", K64, [3], 1), ("write", "era", K64, [200], 2), ("write", "era", K64, [201], 3),
    ("status", "era"), ("message", "era", "checkpoint"), ("status", "era"),
    ("write", "era", K64, [5], 4), ("write", "era", K64, [3], 5), ("status", "era"),
    ("message", "era", "take_metadata_snap"), ("status", "era"),
    ("invalidate", "meta", 1, True),
    ("write", "era", K64, [7], 6), ("status", "era"),
    ("message", "era", "drop_metadata_snap"), ("status", "era"),
    ("message", "era", "CHECKPOINT"), ("status", "era"), ("table", "era"),
    ("sha", "era"), ("remove", "era"), ("check", "meta"), ("dump", "meta"),
]

ERA_SCENARIOS: list[Scenario] = [
    Scenario("status-trace-128", {"meta": 8 * MiB, "origin": 32 * MiB}, TRACE,
             handoff_after=11, notes="docs/era.md §3, one bio per block"),
    Scenario("block-size-8", {"meta": 4 * MiB, "origin": 16 * MiB}, [
        ("create", "era", _era(8, 32768)), ("status", "era"),
        ("write", "era", 4096, [0, 1, 2, 100, 4095], 7), ("status", "era"),
        ("message", "era", "checkpoint"), ("write", "era", 4096, [1, 2000], 8),
        ("message", "era", "take_metadata_snap"), ("status", "era"),
        ("invalidate", "meta", 0, True), ("invalidate", "meta", 2, True),
        ("message", "era", "drop_metadata_snap"), ("status", "era"), ("sha", "era"),
        ("remove", "era"), ("check", "meta"), ("dump", "meta")], handoff_after=6),
    Scenario("block-size-24", {"meta": 4 * MiB, "origin": 16 * MiB}, [
        ("create", "era", _era(24, 32760)), ("status", "era"),
        ("write_at", "era", 71 * 512, 512, 9), ("write_at", "era", 72 * 512, 512, 10),
        ("write_at", "era", 24 * 512 * 40 + 4096, 4096, 11),
        ("message", "era", "take_metadata_snap"), ("status", "era"),
        ("invalidate", "meta", 1, True), ("message", "era", "drop_metadata_snap"),
        ("table", "era"), ("sha", "era"), ("remove", "era"), ("dump", "meta")],
        notes="not a power of two: sector 71 is block 2, sector 72 block 3"),
    Scenario("block-size-4096", {"meta": 4 * MiB, "origin": 128 * MiB}, [
        ("create", "era", _era(4096, 262144)), ("status", "era"),
        ("write_at", "era", 30 * 2 * MiB, 64 << 10, 12),
        ("write_at", "era", 49 * 2 * MiB + MiB, 64 << 10, 13),
        ("message", "era", "checkpoint"), ("status", "era"),
        ("write_at", "era", 0, 4096, 14),
        ("message", "era", "take_metadata_snap"), ("status", "era"),
        ("invalidate", "meta", 1, True), ("invalidate", "meta", 2, True),
        ("message", "era", "drop_metadata_snap"), ("remove", "era"), ("dump", "meta")],
        handoff_after=5),
    Scenario("checkpoints-without-writes", {"meta": 4 * MiB, "origin": 16 * MiB}, [
        ("create", "era", _era(128, 32768)),
        ("message", "era", "checkpoint"), ("status", "era"),
        ("message", "era", "checkpoint"), ("message", "era", "checkpoint"), ("status", "era"),
        ("write", "era", K64, [10], 15), ("message", "era", "checkpoint"), ("status", "era"),
        ("message", "era", "take_metadata_snap"), ("status", "era"),
        ("invalidate", "meta", 4, True), ("invalidate", "meta", 5, True),
        ("message", "era", "drop_metadata_snap"), ("remove", "era"), ("check", "meta")]),
    Scenario("snapshot-held-across-writes", {"meta": 4 * MiB, "origin": 32 * MiB}, [
        ("create", "era", _era(128)),
        ("write", "era", K64, [1, 2, 3], 16), ("message", "era", "take_metadata_snap"),
        ("status", "era"),
        ("write", "era", K64, [4, 5, 300], 17), ("message", "era", "checkpoint"),
        ("write", "era", K64, [6], 18), ("status", "era"),
        ("invalidate", "meta", 1, True), ("status", "era"),
        ("message", "era", "drop_metadata_snap"), ("message", "era", "take_metadata_snap"),
        ("status", "era"), ("invalidate", "meta", 1, True), ("invalidate", "meta", 3, True),
        ("message", "era", "drop_metadata_snap"), ("remove", "era"), ("check", "meta"),
        ("dump", "meta")], handoff_after=4),
    Scenario("reload", {"meta": 4 * MiB, "origin": 32 * MiB}, [
        ("create", "era", _era(128)), ("write", "era", K64, [8], 19), ("status", "era"),
        ("suspend", "era"), ("load", "era", _era(128)), ("resume", "era"), ("status", "era"),
        ("write", "era", K64, [9], 20), ("load", "era", _era(128)), ("resume", "era"),
        ("status_era", "era"), ("message", "era", "take_metadata_snap"),
        ("invalidate", "meta", 1, True), ("invalidate", "meta", 3, True),
        ("message", "era", "drop_metadata_snap"), ("remove", "era"), ("check", "meta")],
        notes="reload while suspended, and reload of a live device (the kernel's reload race: "
              "the kernel's new table goes on from the superblock it read at load, blockera's "
              "reads the metadata again before resuming, so block usage differs afterwards)"),
    Scenario("remove-recreate", {"meta": 4 * MiB, "origin": 32 * MiB}, [
        ("create", "era", _era(128)), ("write", "era", K64, [11, 12], 21), ("remove", "era"),
        ("create", "era", _era(128)), ("status", "era"), ("write", "era", K64, [13], 22),
        ("remove", "era"), ("create", "era", _era(128)), ("status", "era"),
        ("message", "era", "take_metadata_snap"), ("invalidate", "meta", 1, True),
        ("invalidate", "meta", 3, True), ("message", "era", "drop_metadata_snap"),
        ("remove", "era"), ("check", "meta"), ("dump", "meta")], handoff_after=3),
    Scenario("suspend-resume", {"meta": 4 * MiB, "origin": 32 * MiB}, [
        ("create", "era", _era(128)), ("write", "era", K64, [14], 23), ("suspend", "era"),
        ("resume", "era"), ("status", "era"), ("suspend", "era"), ("resume", "era"),
        ("status", "era"), ("write", "era", K64, [14, 15], 24), ("status", "era"),
        ("remove", "era"), ("check", "meta"), ("dump", "meta")]),
    Scenario("resize", {"meta": 4 * MiB, "origin": 64 * MiB}, [
        ("create", "era", _era(128)), ("write", "era", K64, [511], 25), ("status", "era"),
        ("suspend", "era"), ("load", "era", _era(128, 65544)), ("resume", "era"),
        ("status", "era"), ("write_at", "era", 512 * K64, 4096, 26),
        ("suspend", "era"), ("load", "era", _era(128, 131072)), ("resume", "era"),
        ("status", "era"),
        ("suspend", "era"), ("load", "era", _era(128, 32768)), ("resume", "era"),
        ("status", "era"),
        ("message", "era", "take_metadata_snap"), ("invalidate", "meta", 0, True),
        ("message", "era", "drop_metadata_snap"), ("remove", "era"), ("check", "meta")],
        notes="512 -> 513 -> 1024 -> 256 blocks, each reload of a suspended device (a live "
              "reload is the reload scenario's)"),
    Scenario("shrink-to-array-block-multiple", {"meta": 4 * MiB, "origin": 16 * MiB}, [
        ("create", "era", _era(8, 1020 * 8)), ("write", "era", 4096, [1019], 27),
        ("suspend", "era"), ("load", "era", _era(8, 1018 * 8)), ("resume", "era"),
        ("status", "era"),
        ("message", "era", "checkpoint"), ("status", "era"), ("remove", "era"),
        ("check", "meta"), ("dump", "meta")],
        notes="dm_array_resize leaves the old partial tail block (0.9.0 tools reject this)"),
    Scenario("seed-000-stack", {"sdb": 256 * MiB, "sdc": 256 * MiB}, [
        ("create", "era-meta", "0 256 linear {sdb} 0"),
        ("create", "era", "0 524288 era /dev/mapper/era-meta {sdc} 4096"),
        ("create", "era-access", "0 256 linear /dev/mapper/era-meta 0"),
        ("status", "era"), ("table", "era"), ("table", "era-access"),
        ("message", "era", "take_metadata_snap"), ("status", "era"),
        ("message", "era", "drop_metadata_snap"),
        ("write_at", "era", 60 * MiB, MiB, 28), ("write_at", "era", 62 * MiB, MiB, 29),
        ("message", "era", "take_metadata_snap"), ("status", "era"),
        ("invalidate", "sdb", 1, True), ("message", "era", "drop_metadata_snap"),
        ("message", "era", "drop_metadata_snap"),
        ("remove", "era-meta"), ("remove", "era-access"), ("remove", "era"),
        ("remove", "era-meta"), ("check", "sdb")], metadata_disks=["sdb"]),
    Scenario("constructor-errors", {"meta": 4 * MiB, "origin": 16 * MiB}, [
        ("create", "era", "0 32768 era {meta} {origin}"),
        ("create", "era", "0 32768 era {meta} {origin} 128 1"),
        ("create", "era", "0 32768 era {meta} {origin} 128k"),
        ("create", "era", "0 32768 era {meta} {origin} 7"),
        ("create", "era", "0 32768 era {meta} {origin} 0"),
        ("create", "era", _era(128, 32768)), ("remove", "era"),
        ("create", "era", _era(256, 32768)),
        ("create", "era", _era(128, 32768)), ("status", "era"), ("remove", "era")]),
    Scenario("message-errors", {"meta": 4 * MiB, "origin": 16 * MiB}, [
        ("create", "era", _era(128, 32768)),
        ("message", "era", "bogus"), ("message", "era", "checkpoint", "now"),
        ("message", "era", "drop_metadata_snap"), ("status", "era"),
        ("message", "era", "take_metadata_snap"), ("message", "era", "take_metadata_snap"),
        ("status", "era"), ("message", "era", "drop_metadata_snap"),
        ("message", "era", "Drop_Metadata_Snap"), ("status", "era"), ("remove", "era")]),
    Scenario("many-blocks", {"meta": 16 * MiB, "origin": 1024 * MiB}, [
        ("create", "era", _era(8, 2 * 1024 * 1024)), ("status", "era"),
        ("write", "era", 4096, [0, 1017, 1018, 100000, 262143], 30), ("status", "era"),
        ("message", "era", "checkpoint"), ("status", "era"),
        ("write", "era", 4096, [5, 200000], 31),
        ("message", "era", "take_metadata_snap"), ("status", "era"),
        ("invalidate", "meta", 1, True), ("message", "era", "drop_metadata_snap"),
        ("remove", "era"), ("check", "meta")], handoff_after=6,
        notes="262144 blocks: a 258-block era array under a two-level btree"),
    Scenario("pending-writesets", {"meta": 4 * MiB, "origin": 32 * MiB}, [
        ("create", "era", _era(8)),
        ("write", "era", 4096, [1], 32), ("message", "era", "checkpoint"),
        ("write", "era", 4096, [2], 33), ("message", "era", "checkpoint"),
        ("write", "era", 4096, [3], 34), ("message", "era", "checkpoint"),
        ("write", "era", 4096, [1, 4], 35), ("message", "era", "take_metadata_snap"),
        ("status", "era"), ("invalidate", "meta", 2, True), ("invalidate", "meta", 4, True),
        ("message", "era", "drop_metadata_snap"), ("status", "era"), ("remove", "era"),
        ("check", "meta"), ("dump", "meta")]),
]
