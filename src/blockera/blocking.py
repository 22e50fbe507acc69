"""A request about to wait says so, so that whoever serves requests on the calling thread can
hand the next ones to another thread first.

Device code calls `about_to_wait()` just before a wait that lasts a metadata commit or longer
(an era write's first mark, a snapshot copy-out, I/O to a suspended device). A server that runs
requests on the thread that read them (the NBD export, docs/nbd.md §3) installs a hook with
`waits_announced_to(hook)` around each such request; the hook runs at most once per request,
on the calling thread. Without a hook, `about_to_wait()` does nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_local = threading.local()


def about_to_wait() -> None:
    """Run the calling thread's hook, if one is installed and has not run yet."""
    hook = getattr(_local, "hook", None)
    if hook is not None:
        _local.hook = None
        hook()


@contextmanager
def waits_announced_to(hook: Callable[[], None]) -> Iterator[None]:
    """Within the block, `about_to_wait()` on this thread calls `hook` (once)."""
    _local.hook = hook
    try:
        yield
    finally:
        _local.hook = None
