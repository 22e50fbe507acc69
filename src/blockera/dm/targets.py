"""The built-in targets, registered by importing their modules: linear, error, zero, era."""

from blockera.dm import targets_basic  # noqa: F401  (registers linear, error, zero)
from blockera.era import target as era_target  # noqa: F401  (registers era)
