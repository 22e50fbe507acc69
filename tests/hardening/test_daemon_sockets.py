"""The engine daemon's control socket: private from the moment it listens, whatever the umask;
a daemon removes only what it created."""

from __future__ import annotations

import os
import signal
import time
import socket
import subprocess
from pathlib import Path


from tests.conftest import DaemonProcess

def test_control_socket_is_private_before_it_listens(tmp_path: Path, monkeypatch) -> None:
    """With umask 000, the socket file must already be 0600 when listen() is called: a client
    can connect from that moment on."""
    from blockera.engine.daemon import Daemon
    from blockera.engine.userspace import Engine

    modes: list[int] = []
    real_listen = socket.socket.listen

    def listen(sock: socket.socket, *args: object) -> None:
        if sock.family == socket.AF_UNIX:
            modes.append(os.stat(sock.getsockname()).st_mode & 0o777)
        real_listen(sock, *args)

    monkeypatch.setattr(socket.socket, "listen", listen)
    old = os.umask(0)
    try:
        daemon = Daemon(Engine(), tmp_path / "engine.sock")
        daemon.start()
    finally:
        os.umask(old)
    try:
        assert modes == [0o600]
    finally:
        daemon.stop()


def test_socket_option_never_deletes_a_regular_file(tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.write_text("keep me")
    r = subprocess.run(["blockera", "daemon", "--no-nbd", "--socket", str(precious)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "is not a socket" in r.stderr and "Traceback" not in r.stderr
    assert precious.read_text() == "keep me"


def test_a_live_daemon_keeps_its_socket(tmp_path: Path) -> None:
    first = DaemonProcess(tmp_path / "engine.sock")
    try:
        r = subprocess.run(["blockera", "daemon", "--socket", str(tmp_path / "engine.sock")],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "in use by a running server" in r.stderr
        assert first.run("dmsetup", "ls").returncode == 0
    finally:
        first.stop()


def test_two_daemons_in_one_directory_keep_their_own_files(tmp_path: Path) -> None:
    a = DaemonProcess(tmp_path / "a.sock")
    b = DaemonProcess(tmp_path / "b.sock")
    try:
        assert (tmp_path / "a.pid").read_text().strip() == str(a.proc.pid)
        assert (tmp_path / "b.pid").read_text().strip() == str(b.proc.pid)
        b.stop()
        assert not (tmp_path / "b.pid").exists() and not (tmp_path / "b.sock").exists()
        assert (tmp_path / "a.pid").read_text().strip() == str(a.proc.pid)
        probe = socket.socket(socket.AF_UNIX)
        probe.connect(str(tmp_path / "a.sock"))
        probe.close()
    finally:
        a.stop()
        b.stop()
    assert not (tmp_path / "a.pid").exists()


def test_detach_returns_once_listening_or_with_the_error(tmp_path: Path) -> None:
    sock = tmp_path / "engine.sock"
    r = subprocess.run(["blockera", "daemon", "--socket", str(sock), "--detach"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "control socket" in r.stderr
    pid = int((tmp_path / "engine.pid").read_text())
    try:
        probe = socket.socket(socket.AF_UNIX)
        probe.connect(str(sock))               # listening when --detach returned
        probe.close()
        again = subprocess.run(["blockera", "daemon", "--socket", str(sock), "--detach",
                                "--no-nbd"], capture_output=True, text=True, timeout=60)
        assert again.returncode == 2 and "in use by a running server" in again.stderr
    finally:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while sock.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not sock.exists() and not (tmp_path / "engine.pid").exists()
