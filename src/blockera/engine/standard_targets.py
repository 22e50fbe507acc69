"""The target types the userspace engine runs unless told otherwise: the kernel's simple
targets (linear, error, zero), era, and the snapshot family (docs/engine.md §1)."""

from __future__ import annotations

from blockera.dm.simple_targets import ErrorTarget, LinearTarget, ZeroTarget
from blockera.dm.target import TargetTypes
from blockera.era.target import EraTarget
from blockera.snapshot.merge_target import SnapshotMergeTarget
from blockera.snapshot.origin_target import SnapshotOriginTarget
from blockera.snapshot.snapshot_target import SnapshotTarget

STANDARD_TARGETS: TargetTypes = {cls.name: cls for cls in (
    LinearTarget, ErrorTarget, ZeroTarget, EraTarget, SnapshotOriginTarget, SnapshotTarget,
    SnapshotMergeTarget)}
