"""`blockera daemon`: run the userspace device-mapper engine."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from blockera.dm.daemon import Daemon
from blockera.dm.engine import Engine
from blockera.dm.protocol import default_socket_path


@click.command()
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False),
              help="Control socket (default: $BLOCKERA_SOCKET or the runtime directory).")
@click.option("--state-dir", type=click.Path(file_okay=False),
              help="Directory for the pid file (default: the socket's directory).")
@click.option("-v", "--verbose", is_flag=True, help="Log each operation.")
def daemon(socket_path: str | None, state_dir: str | None, verbose: bool) -> None:
    """Run the device-mapper engine in the foreground until SIGTERM or Ctrl-C.

    On shutdown every device is suspended (so era metadata is committed) and removed.

    \b
    Example:
      blockera daemon --socket /run/blockera/engine.sock &
      blockera dmsetup --help
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="blockera daemon: %(message)s")
    path = Path(socket_path) if socket_path else default_socket_path()
    Daemon(Engine(), path, Path(state_dir) if state_dir else None).run()
