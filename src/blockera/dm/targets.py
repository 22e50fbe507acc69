"""The built-in targets, registered by importing their modules: linear, error, zero, era,
snapshot, snapshot-origin and snapshot-merge."""

from blockera.dm import targets_basic  # noqa: F401  (registers linear, error, zero)
from blockera.era import target as era_target  # noqa: F401  (registers era)
from blockera.snapshot import merge_target  # noqa: F401  (registers snapshot-merge)
from blockera.snapshot import origin_target  # noqa: F401  (registers snapshot-origin)
from blockera.snapshot import snapshot_target  # noqa: F401  (registers snapshot)
