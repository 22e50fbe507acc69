"""Putting the era layer under a device's users and taking it away again (docs/live-devices.md
§1, §2).

A device-mapper device NAME (an LVM logical volume included) is tracked the way LVM puts a
snapshot origin under a volume: its table moves to a new device NAME-real, and NAME is reloaded
with an era target over NAME-real, with a suspend/resume, so NAME stays open and mounted. A
plain block device or image file gets NAME-real (linear over it) and a new era device NAME over
that, which its users then open instead. `activate` builds the same stack again after a reboot
(or an engine daemon restart) from the state record, `untrack` gives NAME its own table back.

Before anything is changed the metadata device is sized with the exact calculator; a failure
part-way undoes what was done. A stack left half-changed by a killed frozen view
(NAME-origin, NAME-snap) is put back first (`repair`).
"""

from __future__ import annotations

import os
from pathlib import Path

from blockera.errors import BlockeraError, DeviceMapperError, UsageError
from blockera.live import engines
from blockera.live.engines import DmControl
from blockera.live.metadata import (check_matches, check_size, is_blank, kernel_metadata_device,
                                    read_facts, release_kernel_metadata_device, wipe_superblock)
from blockera.live.state import StateDir, TrackedDevice, check_name

DEFAULT_BLOCK_SECTORS = 2048           # 1 MiB: the backup's default chunk size


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def metadata_device(record: TrackedDevice) -> str:
    """What the era table names as its metadata device."""
    if record.engine == "kernel":
        return kernel_metadata_device(record.metadata)
    return os.path.abspath(record.metadata)


def era_table(record: TrackedDevice, lower: str) -> str:
    return (f"0 {record.size_sectors} era {metadata_device(record)} "
            f"{engines.device_path(lower)} {record.block_sectors}")


def _is_era_over(engine: DmControl, name: str, lower: str) -> bool:
    """Whether NAME's live table is one era target over the device `lower`."""
    lines = engines.table_lines(engine, name)
    if len(lines) != 1 or lines[0][2] != "era" or not engines.exists(engine, lower):
        return False
    return lines[0][4] in (engines.device_path(lower), engines.dev_t(engine, lower))


def track(engine: DmControl, state: StateDir, device: str, metadata: str, *,
          engine_kind: str, socket: str | None = None, name: str | None = None,
          block_sectors: int = DEFAULT_BLOCK_SECTORS, force: bool = False) -> TrackedDevice:
    """Put an era layer under `device` (see the module docstring); returns the saved record."""
    if block_sectors <= 0 or block_sectors % 8:
        raise UsageError("the era block size must be a positive multiple of 8 sectors")
    if device.startswith(engines.MAPPER):
        kind = "dm"
        name = check_name(name or device[len(engines.MAPPER):])
        if name != device[len(engines.MAPPER):]:
            raise UsageError("a device-mapper device keeps its own name: leave out --name")
        if not engines.exists(engine, name):
            raise UsageError(f"{device}: no such device-mapper device")
        lines = engines.table_lines(engine, name)
        if any(words[2] in ("era", "snapshot-origin", "snapshot", "snapshot-merge")
               for words in lines):
            raise UsageError(f"{device} is already stacked ({lines[0][2]} target): untrack it, "
                             "or track the device under it")
        size = engines.size_sectors(engine, name)
        original = engine.table(name)
        source = None
    else:
        kind = "plain"
        name = check_name(name or Path(device).name.split(".")[0])
        if engines.exists(engine, name):
            raise UsageError(f"a device named {name} exists already: choose --name")
        size = engines.source_size_sectors(device)
        original = None
        source = os.path.abspath(device)
    if state.exists(name):
        raise UsageError(f"{name} is tracked already (state in {state.devices})")
    for other in (f"{name}-real", f"{name}-origin", f"{name}-snap"):
        if engines.exists(engine, other):
            raise UsageError(f"a device named {other} exists already: {name} is in use by "
                             "another stack")
    check_size(metadata, size, block_sectors)
    if not is_blank(metadata):
        if not force:
            raise UsageError(f"{metadata} holds data (block 0 is not zero): give blank "
                             "metadata, or --force to format it anew")
        wipe_superblock(metadata)
    record = TrackedDevice(name=name, kind=kind, engine=engine_kind, size_sectors=size,
                           block_sectors=block_sectors, metadata=os.path.abspath(metadata),
                           source=source, socket=socket, original_table=original,
                           boot_id=_boot_id())
    state.save(record)           # first: a crash from here on is finished by `activate`
    try:
        _build(engine, record)
        era, _ = engines.era_status(engine, name)
    except BaseException:
        state.delete(name)
        raise
    record.era_at_track = era
    record.note_era(era)
    state.save(record)
    return record


def _build(engine: DmControl, record: TrackedDevice) -> None:
    """Create NAME-real and the era layer over it; undo every step on failure."""
    name, real = record.name, record.real_name
    if record.kind == "dm":
        lower_table = engine.table(name)
        engine.create(real, lower_table)
        try:
            engine.load(name, era_table(record, real))
            with engines.signals_held():
                try:
                    engine.suspend(name)
                except BlockeraError:
                    engine.clear(name)
                    raise
                try:
                    engine.resume(name)
                except BlockeraError:
                    engine.clear(name)  # drop the era table; the old one goes live again
                    engine.resume(name)
                    raise
        except BaseException:
            _remove_quietly(engine, real)
            raise
        return
    assert record.source is not None
    engine.create(real, f"0 {record.size_sectors} linear {record.source} 0")
    try:
        engine.create(name, era_table(record, real))
    except BaseException:
        _remove_quietly(engine, real)
        raise


def _remove_quietly(engine: DmControl, name: str) -> None:
    try:
        engine.remove(name)
    except BlockeraError:
        pass


def repair(engine: DmControl, record: TrackedDevice) -> list[str]:
    """Put back a stack a killed frozen view left changed: NAME's era layer over NAME-real
    again, NAME-origin and NAME-snap removed, the metadata snapshot dropped. Returns what was
    done (empty when nothing was left over)."""
    done = []
    name = record.name
    if engines.exists(engine, name) and engines.is_suspended(engine, name):
        # a job killed between its suspend and its resume: resume with whatever table it
        # had loaded (NAME over NAME-origin is a whole stack; it is taken down below)
        engine.resume(name)
        done.append(f"{name}: resumed (left suspended by an interrupted job)")
    if engines.exists(engine, record.origin_name) and engines.exists(engine, name) and \
            _is_era_over(engine, name, record.origin_name):
        with engines.signals_held():
            engine.suspend(name)    # before the load: the new era table reads committed metadata
            engine.load(name, era_table(record, record.real_name))
            engine.resume(name)
        done.append(f"{name}: era layer put back over {record.real_name}")
    for leftover in (record.origin_name, record.snapshot_name):
        if engines.exists(engine, leftover):
            engine.remove(leftover)
            done.append(f"removed {leftover}")
    if engines.exists(engine, name) and _is_era_over(engine, name, record.real_name):
        _, snap = engines.era_status(engine, name)
        if snap is not None:
            engine.message(name, 0, ["drop_metadata_snap"])
            done.append(f"{name}: dropped a metadata snapshot left held")
    return done


def activate(engine: DmControl, state: StateDir, record: TrackedDevice) -> list[str]:
    """Build the recorded stack again (after a reboot or a daemon restart); idempotent.
    Returns what was done, including any reason tracking may have missed writes (the record's
    epoch then grows, so the next backup or replication reads everything once)."""
    name, real = record.name, record.real_name
    notes = repair(engine, record)
    if engines.exists(engine, name) and engines.exists(engine, real) and \
            _is_era_over(engine, name, real):
        era, _ = engines.era_status(engine, name)
        _check_era(record, era, notes)
        state.save(record)
        return notes + [f"{name}: active (era {era})"]
    if record.kind == "dm":
        if not engines.exists(engine, name):
            raise DeviceMapperError(f"{name} does not exist: activate the volume under it "
                                    "first (e.g. vgchange -ay), then blockera activate")
        size = engines.size_sectors(engine, name)
        in_use = engines.open_count(engine, name)
    else:
        if engines.exists(engine, name):
            raise DeviceMapperError(f"a device named {name} exists but is not {name}'s era "
                                    "layer: remove it, then activate again")
        assert record.source is not None
        size = engines.source_size_sectors(record.source)
        in_use = 0
    facts = read_facts(record.metadata)
    check_matches(facts, record.block_sectors)
    reasons = []
    if facts.problem:
        reasons.append(facts.problem)
    elif facts.current_era is not None and facts.current_era < record.highest_era_seen:
        reasons.append(f"era numbering went backwards (metadata at era {facts.current_era}, "
                       f"era {record.highest_era_seen} was seen): the metadata was replaced")
    if size != record.size_sectors:
        reasons.append(f"the device is {size} sectors now, {record.size_sectors} when tracked")
        record.size_sectors = size
    boot = _boot_id()
    if in_use and boot != record.boot_id:
        reasons.append(f"{name} was already open ({in_use} users) when the era layer was put "
                       "back after a reboot: writes before that are not tracked")
    if facts.problem is None:
        check_size(record.metadata, size, record.block_sectors)
    _build(engine, record)
    record.boot_id = boot
    era, _ = engines.era_status(engine, name)
    for reason in reasons:
        record.new_epoch(reason)
        notes.append(f"{name}: tracking may have missed writes: {reason}; the next backup or "
                     "replication reads everything")
    _check_era(record, era, notes)
    state.save(record)
    return notes + [f"{name}: activated (era {era})"]


def _check_era(record: TrackedDevice, era: int, notes: list[str]) -> None:
    if era < record.highest_era_seen:
        reason = (f"era numbering went backwards (era {era}, era {record.highest_era_seen} "
                  "was seen)")
        record.new_epoch(reason)
        notes.append(f"{record.name}: tracking may have missed writes: {reason}")
    record.note_era(era)


def untrack(engine: DmControl, state: StateDir, record: TrackedDevice) -> list[str]:
    """Take the era layer away and leave the device as it was (the metadata device is kept)."""
    name, real = record.name, record.real_name
    notes = repair(engine, record)
    if record.kind == "dm":
        if engines.exists(engine, real):
            engine.load(name, engine.table(real))
            with engines.signals_held():
                engine.suspend(name)
                engine.resume(name)
            engine.remove(real)
            notes.append(f"{name}: own table back, {real} removed")
    else:
        for device in (name, real):
            if engines.exists(engine, device):
                engine.remove(device)
                notes.append(f"removed {device}")
    if record.engine == "kernel":
        release_kernel_metadata_device(record.metadata)
    state.delete(name)
    return notes
