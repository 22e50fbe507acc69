"""blockera: the Linux device-mapper era and snapshot targets, their on-disk formats and tools,
in Python, plus an incremental block backup built on them."""

__version__ = "0.1.0"
