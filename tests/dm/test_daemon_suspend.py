"""A device suspended through the daemon by a client that dies before resuming it: resumed
when the client asked for that (the live jobs), left suspended when it did not (`blockera
dmsetup suspend`, which is meant to outlive the command)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from blockera.engine.client import EngineClient
from tests.conftest import DaemonProcess, sparse_file

SUSPEND_AND_DIE = """
import os, sys
from blockera.engine.client import EngineClient
client = EngineClient(sys.argv[1], resume_if_gone=sys.argv[3] == "guard")
client.suspend(sys.argv[2])
os.kill(os.getpid(), 9)
"""


def _state(client: EngineClient, name: str) -> str:
    return next(line.split()[-1] for line in client.info(name).splitlines()
                if line.startswith("State:"))


def test_suspend_of_a_dead_client(daemon: DaemonProcess, tmp_path: Path) -> None:
    disk = sparse_file(tmp_path / "disk.img", 1 << 20)
    daemon.run("dmsetup", "create", "a", "--table", f"0 2048 linear {disk} 0")
    daemon.run("dmsetup", "create", "b", "--table", f"0 2048 linear {disk} 0")
    with EngineClient(str(daemon.socket_path)) as client:
        for name, mode in (("a", "guard"), ("b", "plain")):
            r = subprocess.run([sys.executable, "-c", SUSPEND_AND_DIE, str(daemon.socket_path),
                                name, mode])
            assert r.returncode == -9
        for _ in range(100):                  # the daemon notices the closed connection
            if _state(client, "a") == "ACTIVE":
                break
            time.sleep(0.05)
        assert _state(client, "a") == "ACTIVE"
        assert _state(client, "b") == "SUSPENDED"
        client.resume("b")
