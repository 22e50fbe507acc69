"""Progress of long work on standard error: a `tqdm` bar when standard error is a terminal (or
when the user asked for it, e.g. `dd status=progress`), nothing otherwise, so logs and pipes
stay clean. Data output never goes to standard error. tqdm is imported only when a bar is
shown (it costs a command tens of milliseconds of start-up and a monitor thread)."""

from __future__ import annotations

import sys
from typing import Any, Protocol


class Bar(Protocol):
    def update(self, n: float = 1) -> Any: ...

    def close(self) -> None: ...

    def __enter__(self) -> "Bar": ...

    def __exit__(self, *exc: object) -> Any: ...


class _Hidden:
    """The bar nobody sees."""

    def update(self, n: float = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "_Hidden":
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def progress(total: int | None, description: str, *, unit: str = "B",
             force: bool = False) -> Bar:
    """A progress bar over `total` units (bytes by default, scaled to KiB/MiB/...); call
    `update(n)` as work is done and `close()` (or use it as a context manager) at the end."""
    if not (force or sys.stderr.isatty()):
        return _Hidden()
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit=unit, unit_scale=unit == "B",
                unit_divisor=1024 if unit == "B" else 1000, file=sys.stderr, leave=force,
                dynamic_ncols=True, mininterval=0.5)
