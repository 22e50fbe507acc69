"""What `blockera status` reports for a tracked device (docs/live-devices.md §1): whether its
stack is up, the current era, and for each backup repository, mirror and mark the era it
starts from and how many blocks were written since (read from the live metadata, current
writeset included: an answer for now, not a consistent one)."""

from __future__ import annotations

import numpy as np

from blockera.era.image import EraImage
from blockera.errors import BlockeraError
from blockera.live import engines
from blockera.live.engines import open_engine
from blockera.live.metadata import open_metadata
from blockera.live.state import StateDir


def device_report(state: StateDir, name: str, socket: str | None) -> dict[str, object]:
    record = state.load(name)
    report: dict[str, object] = {
        "name": name, "kind": record.kind, "engine": record.engine,
        "size_sectors": record.size_sectors, "block_size_sectors": record.block_sectors,
        "metadata": record.metadata, "epoch": record.epoch, "lost": record.lost,
        "state": "inactive", "current_era": None}
    try:
        engine = open_engine(record.engine, socket or record.socket)
        if engines.exists(engine, name) and engines.exists(engine, record.real_name):
            era, _ = engines.era_status(engine, name)
            report["state"] = "active"
            report["current_era"] = era
            if engines.exists(engine, record.snapshot_name):
                report["state"] = "active, frozen view open"
    except BlockeraError as exc:
        report["state"] = f"unknown ({exc})"
    eras: np.ndarray | None = None
    try:
        with open_metadata(record) as dev:
            image = EraImage(dev)
            if report["current_era"] is None:
                report["current_era"] = image.current_era
            eras = image.logical_eras()
            current = image.current_writeset()
            current_bits = current.bools()[: len(eras)] if current is not None else None
    except BlockeraError as exc:
        report["metadata_problem"] = str(exc)
    for kind in ("backups", "mirrors", "marks"):
        points: dict[str, dict[str, object]] = {}
        for key, point in getattr(record, kind).items():
            since = record.starting_era(point)
            changed = None
            if since is not None and eras is not None:
                mask = eras >= since
                if current_bits is not None:
                    mask[: len(current_bits)] |= current_bits
                changed = int(np.count_nonzero(mask))
            points[key] = {"era": point["era"], "epoch": point["epoch"],
                           "changed_blocks": changed}
        report[kind] = points
    return report
