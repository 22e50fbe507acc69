"""Progress of long work on standard error: a `tqdm` bar when standard error is a terminal (or
when the user asked for it, e.g. `dd status=progress`), nothing otherwise, so logs and pipes
stay clean. Data output never goes to standard error."""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress(total: int | None, description: str, *, unit: str = "B",
             force: bool = False) -> tqdm:
    """A progress bar over `total` units (bytes by default, scaled to KiB/MiB/...); call
    `update(n)` as work is done and `close()` (or use it as a context manager) at the end."""
    shown = force or sys.stderr.isatty()
    return tqdm(total=total, desc=description, unit=unit, unit_scale=unit == "B",
                unit_divisor=1024 if unit == "B" else 1000, disable=not shown,
                file=sys.stderr, leave=force, dynamic_ncols=True, mininterval=0.5)
