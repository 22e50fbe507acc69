"""What changed includes the live current writeset: on metadata left by a crash (the engine
daemon killed with SIGKILL) the writes of the current era are marked only there, and
`era invalidate` and `era dump --logical` must still list them."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from tests.conftest import DaemonProcess, sparse_file


def test_writes_of_the_current_era_survive_a_crash(tmp_path: Path) -> None:
    meta = sparse_file(tmp_path / "meta.img", 4 << 20)
    origin = sparse_file(tmp_path / "origin.img", 64 << 20)
    d = DaemonProcess(tmp_path / "engine.sock")
    try:
        d.run("dmsetup", "create", "era", "--table", f"0 131072 era {meta} {origin} 128")
        d.run("dd", "if=/dev/urandom", "of=/dev/mapper/era", "bs=64k", "seek=5", "count=3")
        d.run("dd", "if=/dev/urandom", "of=/dev/mapper/era", "bs=64k", "seek=100", "count=1")
    finally:
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(timeout=30)
    listed = d.run("era", "invalidate", "--json", "--written-since", "1", str(meta))
    assert json.loads(listed.stdout)["ranges"] == [[5, 8], [100, 101]]
    logical = d.run("era", "dump", "--logical", str(meta)).stdout
    assert [line.strip() for line in logical.splitlines() if line.strip().startswith('<era ') and 'era="1"' in line] == [
        f'<era block="{b}" era="1"/>' for b in (5, 6, 7, 100)]
    assert json.loads(d.run("era", "invalidate", "--json", "--written-since", "2",
                            str(meta)).stdout)["ranges"] == []
