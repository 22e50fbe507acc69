"""The threads of one connection's transmission phase: who reads the next request, and when a
request runs on the reading thread itself or is handed over.

One thread at a time holds the *reader role*: it receives the next request. Two modes:

* **inline** (the start, and whenever requests complete quickly): the reader executes the
  request itself and goes on reading. A fast device is then served by one thread, with no
  thread hand-over and no contention for the interpreter lock per request -- the difference
  between one thread and eight is about a factor of two for 4 KiB requests.
* **dispatch**: the reader gives the role up as soon as it has a request, and another thread
  reads the next one while the first executes, so many requests are in the device at once
  (what an era device needs to share one metadata commit among many first writes, and what a
  blocked request needs so that others still get through).

A *standby* thread watches the inline reader: when the same request has been executing for a
whole poll interval (`STALL_POLL_S`), the standby takes the reader role and the connection
switches to dispatch mode for `DISPATCH_REQUESTS` requests; after that it tries inline again.
The standby polls only while requests are flowing and parks when the connection is idle.
A request that knows it is about to wait says so (`blockera.blocking.about_to_wait`: an era
write's first mark, a snapshot copy-out): the inline reader then hands the reader role over at
once, without waiting for the standby's poll, and the connection stays in inline mode -- so a
device sees every first write a pipelining client has in flight, one thread each, and an era
device commits them together, while requests that do not wait still cost no hand-over.
Threads are started on demand, up to `max_workers` (with 1, requests run one at a time).
No lock is held across `receive` or `execute`.

See docs/nbd.md §3.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from blockera.blocking import waits_announced_to

log = logging.getLogger(__name__)

R = TypeVar("R")

STALL_POLL_S = 0.001
PARK_AFTER_IDLE_POLLS = 200
DISPATCH_REQUESTS = 256

_FREE, _RECEIVING, _EXECUTING = 0, 1, 2


class Workers(Generic[R]):
    """`receive()` returns the next request, or None when the connection is over (it is only
    ever called by one thread at a time); `execute(request, inline)` serves one, `inline`
    telling whether it runs on the reading thread (which will read the next request once it
    returns). `interrupt()` must make a `receive()` under way return None soon; it is called
    when an unexpected error ends the connection. `on_finished` is called once, by the last
    thread to leave. `on_hand_over` is called on a thread whose inline request announced a
    wait, after the reader role went to another thread (the request is no longer inline)."""

    def __init__(self, *, receive: Callable[[], R | None], execute: Callable[[R, bool], None],
                 interrupt: Callable[[], None], max_workers: int, name: str,
                 on_finished: Callable[[], None],
                 on_hand_over: Callable[[], None] | None = None) -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers must be at least 1, not {max_workers}")
        self._receive = receive
        self._execute = execute
        self._interrupt = interrupt
        self._max_workers = max_workers
        self._name = name
        self._on_finished = on_finished
        self._on_hand_over = on_hand_over
        self._lock = threading.Lock()
        self._followers = threading.Condition(self._lock)
        self._standby_cv = threading.Condition(self._lock)
        self._role = _FREE
        self._seq = 0                 # counts inline executions
        self._threads = 1
        self._idle = 0                # followers waiting for the reader role
        self._standby_present = False
        self._standby_parked = False
        self._dispatch_left = 0
        self._closing = False

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def thread_count(self) -> int:
        with self._lock:
            return self._threads

    # -- life cycle --------------------------------------------------------------------------
    def run(self) -> None:
        """Serve with the calling thread as the first worker, until the connection is over and
        every request in flight has been executed."""
        if self._max_workers > 1:
            with self._lock:
                self._threads += 1
            self._spawn()
        self._worker()

    def stop(self) -> None:
        """No new request is received; requests being executed finish."""
        with self._lock:
            self._closing = True
            self._followers.notify_all()
            self._standby_cv.notify_all()

    def _spawn(self) -> None:
        """Start one more thread (already counted in `_threads`)."""
        try:
            threading.Thread(target=self._worker, name=self._name, daemon=True).start()
        except RuntimeError:
            log.warning("%s: cannot start another thread; serving with fewer", self._name)
            with self._lock:
                self._threads -= 1

    def _worker(self) -> None:
        try:
            while self._become_reader():
                self._lead()
        finally:
            self._leave()

    def _leave(self) -> None:
        with self._lock:
            self._threads -= 1
            last = self._threads == 0
        if last:
            self._on_finished()

    # -- the reader role ---------------------------------------------------------------------
    def _lead(self) -> None:
        """Receive and execute requests while this thread holds the reader role."""
        while True:
            request = None if self._closing else self._receive()
            if request is None:
                self.stop()
                return
            mine, spawn = self._started(request)
            if spawn:
                self._spawn()
            try:
                if mine:
                    with waits_announced_to(lambda: self._hand_over(mine)):
                        self._execute(request, True)
                else:
                    self._execute(request, False)
            except Exception:
                log.exception("%s: a request failed unexpectedly; closing", self._name)
                self.stop()
                self._interrupt()
            if not self._keep_role(mine):
                return

    def _started(self, request: R) -> tuple[int, bool]:
        """The reader has a request: keep the role and run it inline (returns its inline
        number), or hand the role over (returns 0). Also: whether to start a thread."""
        with self._lock:
            if self._dispatch_left == 0 and self._standby_present:
                self._seq += 1
                self._role = _EXECUTING
                if self._standby_parked:
                    self._standby_parked = False
                    self._standby_cv.notify()
                return self._seq, False
            if self._dispatch_left:
                self._dispatch_left -= 1
            self._role = _FREE
            return 0, self._wake_reader()

    def _wake_reader(self) -> bool:
        """The reader role is free: wake a thread to take it, or report that a new thread
        should (it is then already counted). Under the lock."""
        if self._idle:
            self._followers.notify()
        elif self._standby_present:
            self._standby_parked = False
            self._standby_cv.notify()
        elif self._threads < self._max_workers:
            self._threads += 1
            return True
        return False

    def _hand_over(self, mine: int) -> None:
        """Inline request `mine` is about to wait: another thread reads the next request."""
        with self._lock:
            if self._closing or self._role != _EXECUTING or self._seq != mine:
                return
            self._role = _FREE
            spawn = self._wake_reader()
        if spawn:
            self._spawn()
        if self._on_hand_over is not None:
            self._on_hand_over()

    def _keep_role(self, mine: int) -> bool:
        """After executing: whether this thread reads the next request itself."""
        with self._lock:
            if self._closing:
                return False
            if mine and self._role == _EXECUTING and self._seq == mine:
                self._role = _RECEIVING
                return True
            if self._role == _FREE:
                self._role = _RECEIVING
                return True
            return False

    def _become_reader(self) -> bool:
        """Wait (as a follower, or as the standby) until this thread holds the reader role;
        False when the connection is closing."""
        spawn = False
        try:
            with self._lock:
                standby = False
                executing_seen = -1     # the inline request seen executing at the last poll
                progress_seen = -1
                idle_polls = 0
                while True:
                    if self._closing:
                        if standby:
                            self._standby_present = False
                        return False
                    if self._role == _FREE:
                        self._role = _RECEIVING
                        if standby:
                            spawn = self._vacate_standby()
                        return True
                    if not standby and not self._standby_present:
                        standby = self._standby_present = True
                    if not standby:
                        self._idle += 1
                        self._followers.wait()
                        self._idle -= 1
                        continue
                    if self._role == _EXECUTING and self._seq == executing_seen:
                        # The same request ran for a whole poll interval: take over reading.
                        self._role = _RECEIVING
                        self._dispatch_left = DISPATCH_REQUESTS
                        spawn = self._vacate_standby()
                        return True
                    executing_seen = self._seq if self._role == _EXECUTING else -1
                    if self._seq != progress_seen:
                        progress_seen, idle_polls = self._seq, 0
                    else:
                        idle_polls += 1
                    if idle_polls >= PARK_AFTER_IDLE_POLLS and self._role != _EXECUTING:
                        self._standby_parked = True
                        while self._standby_parked and not self._closing:
                            self._standby_cv.wait()
                        self._standby_parked = False
                        idle_polls = 0
                    else:
                        self._standby_cv.wait(STALL_POLL_S)
        finally:
            if spawn:
                self._spawn()

    def _vacate_standby(self) -> bool:
        """The standby becomes the reader: pass standby duty on to an idle follower, or
        report that a new thread should take it (it is then already counted)."""
        self._standby_present = False
        if self._idle:
            self._followers.notify()
            return False
        if self._threads < self._max_workers:
            self._threads += 1
            return True
        return False
