"""The README's examples run as written, each from an empty directory: every ```sh block is a
complete script (a daemon it starts is stopped at the end, and again here if it failed)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from tests.nbd.conftest import need, require_fuse_and_loop

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```sh\n(.*?)^```$", README.read_text(), flags=re.M | re.S)
NBD_CLIENTS = ("nbdinfo", "qemu-img", "nbdcopy", "nbdfuse")


def _stop_daemons(directory: Path) -> None:
    for pid_file in directory.glob("*.pid"):
        try:
            os.kill(int(pid_file.read_text()), signal.SIGTERM)
        except (ValueError, ProcessLookupError):
            pass


def test_there_are_examples() -> None:
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs_as_written(index: int, tmp_path: Path) -> None:
    script = BLOCKS[index]
    if "nbdfuse" in script:
        require_fuse_and_loop()
    need(*[tool for tool in NBD_CLIENTS if re.search(rf"^{tool} |\$\({tool} |\| {tool} ",
                                                        script, flags=re.M)])
    env = {k: v for k, v in os.environ.items() if k != "BLOCKERA_SOCKET"}
    try:
        r = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
    finally:
        _stop_daemons(tmp_path)
    assert r.returncode == 0, f"example {index + 1} failed:\n{script}\n--- stderr:\n{r.stderr}"
