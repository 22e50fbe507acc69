"""The threads of one connection (`blockera.nbd.workers`) and the replies held back while the
reading thread has more requests buffered: blocked requests never hold up the others,
concurrency is bounded, shutdown waits for requests in flight, and no reply is held back
while the server waits."""

from __future__ import annotations

import queue
import struct
import threading
import time
from collections.abc import Callable

import pytest

from blockera.blockdev import MemoryDevice
from blockera.blocking import about_to_wait, reports_together
from blockera.errors import DeviceError
from blockera.nbd.protocol import ENOSPC
from blockera.nbd import workers as workers_module
from blockera.nbd.workers import Workers

from .conftest import GatedDevice, wait_until
from .rawclient import CMD_DISC, CMD_READ, CMD_WRITE, REQUEST_MAGIC, RawClient

MiB = 1 << 20


class Harness:
    """Requests come from a queue (None ends the connection); `execute` runs `behaviour`."""

    def __init__(self, max_workers: int) -> None:
        self.requests: queue.Queue[str | None] = queue.Queue()
        self.gates: dict[str, threading.Event] = {}
        self.lock = threading.Lock()
        self.executing = 0
        self.most_at_once = 0
        self.done: list[str] = []
        self.receives = 0
        self.finished = threading.Event()
        self.finish_calls = 0
        self.workers: Workers[str] = Workers(receive=self.receive, execute=self.execute,
                                             interrupt=lambda: self.requests.put(None),
                                             max_workers=max_workers, name="test",
                                             on_finished=self.on_finished)
        self.thread = threading.Thread(target=self.workers.run, daemon=True)

    def receive(self) -> str | None:
        with self.lock:
            self.receives += 1
        return self.requests.get(timeout=30)

    def execute(self, request: str, inline: bool) -> None:
        with self.lock:
            self.executing += 1
            self.most_at_once = max(self.most_at_once, self.executing)
        try:
            if request.startswith("announce"):
                about_to_wait()
            if request == "boom":
                raise RuntimeError("a bug")
            gate = self.gates.get(request)
            if gate is not None:
                assert gate.wait(30)
        finally:
            with self.lock:
                self.executing -= 1
                self.done.append(request)

    def on_finished(self) -> None:
        with self.lock:
            self.finish_calls += 1
        self.finished.set()

    def gate(self, request: str) -> threading.Event:
        self.gates[request] = threading.Event()
        return self.gates[request]

    def feed(self, *requests: str | None) -> None:
        for r in requests:
            self.requests.put(r)


def test_a_blocked_request_does_not_hold_up_the_others() -> None:
    h = Harness(max_workers=4)
    gate = h.gate("slow")
    h.thread.start()
    h.feed("slow", "a", "b", "c")
    wait_until(lambda: {"a", "b", "c"} <= set(h.done))
    assert "slow" not in h.done and h.executing == 1
    gate.set()
    wait_until(lambda: "slow" in h.done)
    h.feed(None)
    assert h.finished.wait(10)
    h.thread.join(10)
    assert h.finish_calls == 1 and h.workers.thread_count == 0


def test_a_request_announcing_a_wait_hands_the_reading_over_at_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # the standby's poll would take a minute to notice: only the announcement lets others by
    monkeypatch.setattr(workers_module, "STALL_POLL_S", 60.0)
    h = Harness(max_workers=8)
    waiting = [f"announce{i}" for i in range(3)]
    gates = [h.gate(n) for n in waiting]
    h.thread.start()
    h.feed("a")
    wait_until(lambda: "a" in h.done)
    time.sleep(0.05)            # a second thread is the standby now: reads run inline
    h.feed(*waiting, "b", "c")
    wait_until(lambda: h.executing == 3 and {"a", "b", "c"} <= set(h.done), timeout_s=10)
    for g in gates:
        g.set()
    wait_until(lambda: len(h.done) == 6)
    h.feed(None)
    assert h.finished.wait(10)


def test_requests_in_the_device_are_bounded_by_max_workers() -> None:
    h = Harness(max_workers=3)
    names = [f"r{i}" for i in range(10)]
    gates = [h.gate(n) for n in names]
    h.thread.start()
    h.feed(*names)
    wait_until(lambda: h.executing == 3)
    time.sleep(0.1)  # give a fourth thread every chance to appear
    assert h.executing == 3 and h.workers.thread_count == 3
    for g in gates:
        g.set()
    wait_until(lambda: len(h.done) == 10)
    assert h.most_at_once == 3
    h.feed(None)
    assert h.finished.wait(10)


def test_one_worker_serves_requests_one_at_a_time_in_order() -> None:
    h = Harness(max_workers=1)
    names = [f"r{i}" for i in range(50)]
    h.thread.start()
    h.feed(*names, None)
    assert h.finished.wait(10)
    assert h.done == names and h.most_at_once == 1


def test_stop_receives_nothing_more_and_waits_for_requests_in_flight() -> None:
    h = Harness(max_workers=4)
    gate = h.gate("slow")
    h.thread.start()
    h.feed("slow")
    wait_until(lambda: h.executing == 1 and h.receives == 2)  # the reader waits for more
    h.workers.stop()
    h.feed("in-flight", "later")   # the receive under way completes; no new one starts
    wait_until(lambda: "in-flight" in h.done)
    time.sleep(0.1)
    assert not h.finished.is_set()
    gate.set()
    assert h.finished.wait(10)
    assert sorted(h.done) == ["in-flight", "slow"] and h.receives == 2
    assert h.finish_calls == 1


def test_an_unexpected_error_in_a_request_ends_the_connection() -> None:
    h = Harness(max_workers=2)
    h.thread.start()
    h.feed("ok", "boom")        # then nothing: a receive under way must be interrupted
    assert h.finished.wait(10)
    assert sorted(h.done) == ["boom", "ok"] and h.finish_calls == 1


def _requests(*reqs: tuple[int, int, int, int]) -> bytes:
    return b"".join(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, command, cookie, offset, length)
                    for command, cookie, offset, length in reqs)


def test_a_reply_is_not_held_back_behind_a_blocked_request(start_server) -> None:
    device = GatedDevice(MiB)
    device.data[4096:4100] = b"fast"
    server = start_server({"disk": device})
    c = RawClient(server.unix_path)
    try:
        c.connect_export("disk")
        # One send: the fast read is executed with the blocked one already buffered.
        c.sock.sendall(_requests((CMD_READ, 1, 4096, 4), (CMD_READ, 2, 0, 4)))
        assert c.simple_reply(4) == (0, 1, b"fast")       # while the other is blocked
        assert device.waiting.wait(10)
        device.gate.set()
        assert c.simple_reply(4) == (0, 2, bytes(4))
    finally:
        device.gate.set()
        c.close()


def test_pipelined_requests_all_get_their_replies(start_server) -> None:
    device = MemoryDevice(4 * MiB)
    for i in range(1024):
        device.data[i * 4096:i * 4096 + 8] = struct.pack(">Q", i)
    server = start_server({"disk": device})
    c = RawClient(server.unix_path)
    try:
        c.connect_export("disk")
        for burst in range(4):
            cookies = range(burst * 256, burst * 256 + 256)
            c.sock.sendall(_requests(*((CMD_READ, i, (i % 1024) * 4096, 8) for i in cookies)))
            replies = {}
            for _ in cookies:
                error, cookie, data = c.simple_reply(8)
                assert error == 0
                replies[cookie] = data
            assert replies == {i: struct.pack(">Q", i % 1024) for i in cookies}
    finally:
        c.close()


class HoldingDevice(MemoryDevice):
    """A device that reports submitted writes only when the test says so (as an era device
    reports a first write once its mark is committed)."""

    def __init__(self, size_bytes: int) -> None:
        super().__init__(size_bytes)
        self.held: dict[int, tuple[int, bytes, Callable]] = {}   # by arrival
        self.arrivals = 0
        self.lock = threading.Lock()

    def submit_write(self, offset_bytes: int, data, done) -> None:
        with self.lock:
            self.held[self.arrivals] = (offset_bytes, bytes(data), done)
            self.arrivals += 1

    def report(self, offset_bytes: int, error: BaseException | None = None) -> None:
        """Report the earliest held write to `offset_bytes`."""
        with self.lock:
            token = next(t for t, held in self.held.items() if held[0] == offset_bytes)
            self._report(token, error)

    def _report(self, token: int, error: BaseException | None) -> None:
        offset, data, done = self.held.pop(token)
        if error is None:
            self.write(offset, data)
        done(error)

    def report_held(self, error: BaseException | None = None) -> int:
        """Report every write held now; how many."""
        with self.lock:
            tokens = list(self.held)
            for token in tokens:
                self._report(token, error)
        return len(tokens)

    def report_all(self) -> None:
        self.report_held(DeviceError("test over"))


def test_a_submitted_write_is_answered_when_the_device_reports_it(start_server) -> None:
    device = HoldingDevice(MiB)
    server = start_server({"disk": device})
    c = RawClient(server.unix_path)
    try:
        c.connect_export("disk")
        c.request(CMD_WRITE, 1, 0, 4096, payload=b"\x01" * 4096)
        c.request(CMD_WRITE, 2, 4096, 4096, payload=b"\x02" * 4096)
        c.request(CMD_READ, 3, 8192, 4)       # not held up by the writes in the device
        assert c.simple_reply(4) == (0, 3, bytes(4))
        wait_until(lambda: len(device.held) == 2)
        c.sock.settimeout(0.2)
        with pytest.raises(TimeoutError):
            c.recv_exact(1)                   # no write is answered before its report
        c.sock.settimeout(10)
        device.report(0)
        assert c.simple_reply() == (0, 1, b"")
        device.report(4096, DeviceError("the metadata device is full", errno_name="ENOSPC"))
        assert c.simple_reply() == (ENOSPC, 2, b"")
        assert bytes(device.data[:4096]) == b"\x01" * 4096
        assert bytes(device.data[4096:8192]) == bytes(4096)
    finally:
        device.report_all()
        c.close()


def test_a_connection_ends_only_after_its_submitted_writes_are_reported(start_server) -> None:
    device = HoldingDevice(MiB)
    server = start_server({"disk": device})
    c = RawClient(server.unix_path)
    try:
        c.connect_export("disk")
        c.request(CMD_WRITE, 1, 0, 4096, payload=b"\x03" * 4096)
        c.request(CMD_DISC, 2)
        wait_until(lambda: len(device.held) == 1)
        c.sock.settimeout(0.2)
        assert not c.is_closed()              # the write is still in the device
        c.sock.settimeout(10)
        device.report(0)
        assert c.simple_reply() == (0, 1, b"")
        wait_until(c.is_closed)
    finally:
        device.report_all()
        c.close()


def test_replies_to_writes_reported_together_go_out_together_at_the_end(start_server) -> None:
    device = HoldingDevice(MiB)
    server = start_server({"disk": device})
    c = RawClient(server.unix_path)
    try:
        c.connect_export("disk")
        for cookie in range(3):
            c.request(CMD_WRITE, cookie, cookie * 4096, 4096, payload=bytes([cookie]) * 4096)
        wait_until(lambda: len(device.held) == 3)
        with reports_together():
            device.report(0)
            device.report(4096)
            c.sock.settimeout(0.2)
            with pytest.raises(TimeoutError):
                c.recv_exact(1)               # held back until the batch ends
            c.sock.settimeout(10)
        assert sorted([c.simple_reply(), c.simple_reply()]) == [(0, 0, b""), (0, 1, b"")]
        device.report(8192)                   # outside a batch: answered at once
        assert c.simple_reply() == (0, 2, b"")
    finally:
        device.report_all()
        c.close()


def test_a_client_not_reading_its_replies_does_not_hold_up_the_device(start_server) -> None:
    """The device reports writes from its own thread (an era pass); replies the client does
    not take wait in a backlog instead of blocking that thread."""
    device = HoldingDevice(MiB)
    server = start_server({"disk": device})
    c = RawClient(server.unix_path)
    n = 100000
    reported = []

    def reporter() -> None:
        deadline = time.monotonic() + 60
        while len(reported) < n and time.monotonic() < deadline:
            with reports_together():
                reported.extend([1] * device.report_held())
            time.sleep(0.001)

    try:
        c.connect_export("disk")
        thread = threading.Thread(target=reporter, daemon=True)
        thread.start()
        c.sock.settimeout(60)           # a server that stops reading fails the test, not hangs
        c.sock.sendall(b"".join(        # empty writes: 1.6 MB of replies, none read meanwhile
            struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_WRITE, i, (i % 2048) * 512, 0)
            for i in range(n)))
        thread.join(60)
        assert not thread.is_alive() and len(reported) == n
        cookies = {c.simple_reply()[1] for _ in range(n)}
        assert cookies == set(range(n))
    finally:
        c.close()                       # first: a server blocked sending to it gets an error
        device.report_all()
