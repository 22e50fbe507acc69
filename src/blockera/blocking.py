"""Hints between device code and a server of requests about how requests flow: a request about
to wait says so, and completions reported together say so.

Device code calls `about_to_wait()` just before a wait that lasts a metadata commit or longer
(an era write's first mark, a snapshot copy-out, I/O to a suspended device). A server that runs
requests on the thread that read them (the NBD export, docs/nbd.md §3) installs a hook with
`waits_announced_to(hook)` around each such request, to hand the next ones to another thread
first; the hook runs at most once per request, on the calling thread. Without a hook,
`about_to_wait()` does nothing.

Device code that reports many submitted writes at once (an era pass's batch) does so within
`reports_together()`; a server answering them may then register, with `at_end_of_reports`, a
function that sends the answers it held back, once, when the batch ends.
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


@contextmanager
def reports_together() -> Iterator[None]:
    """Completions reported on this thread within the block form one batch; the functions
    registered with `at_end_of_reports` run at its end."""
    pending: list[Callable[[], None]] = []
    _local.end_of_reports = pending
    try:
        yield
    finally:
        _local.end_of_reports = None
        for fn in pending:
            fn()


def at_end_of_reports(fn: Callable[[], None]) -> bool:
    """Run `fn` (once, however often registered) when the current batch of reports ends;
    False, with nothing registered, when no batch is open on this thread."""
    pending = getattr(_local, "end_of_reports", None)
    if pending is None:
        return False
    if fn not in pending:
        pending.append(fn)
    return True
