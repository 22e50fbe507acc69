"""`blockera daemon`: run the userspace device-mapper engine, with its devices exported over
NBD (a unix socket beside the control socket by default; TCP on request, loopback only unless
remote clients are allowed explicitly)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import click

from blockera.errors import UsageError

if TYPE_CHECKING:
    from blockera.nbd.engine_service import NbdSettings

# The engine, its targets (numpy) and the NBD server are imported when the daemon starts, not
# for every `blockera` command.


def _nbd_settings(control_socket: Path, nbd_socket: str | None, nbd_tcp: str | None,
                  allow_remote: bool, no_nbd: bool) -> "NbdSettings | None":
    from blockera.nbd.engine_service import NbdSettings, default_nbd_socket_path
    from blockera.nbd.listeners import parse_tcp_address

    if no_nbd:
        if nbd_socket or nbd_tcp or allow_remote:
            raise click.UsageError("--no-nbd cannot be combined with other --nbd options")
        return None
    if allow_remote and not nbd_tcp:
        raise click.UsageError("--nbd-allow-remote needs --nbd-tcp")
    try:
        tcp = parse_tcp_address(nbd_tcp) if nbd_tcp else None
    except UsageError as exc:
        raise click.BadParameter(str(exc), param_hint="--nbd-tcp") from None
    if nbd_socket == "":
        if tcp is None:
            raise click.UsageError("--nbd-socket '' (no unix socket) needs --nbd-tcp, "
                                   "or use --no-nbd")
        unix_path = None
    else:
        unix_path = Path(nbd_socket) if nbd_socket else default_nbd_socket_path(control_socket)
    return NbdSettings(unix_path=unix_path, tcp=tcp, allow_remote=allow_remote)


@click.command()
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False),
              help="Control socket (default: $BLOCKERA_SOCKET or the runtime directory).")
@click.option("--state-dir", type=click.Path(file_okay=False),
              help="Directory for the pid file (default: the socket's directory).")
@click.option("--nbd-socket", metavar="PATH",
              help="Unix socket of the NBD export (default: beside the control socket, "
                   "engine.sock -> engine-nbd.sock; '' for none).")
@click.option("--nbd-tcp", metavar="[HOST:]PORT",
              help="Also export over TCP (default host 127.0.0.1; port 0: any free port). "
                   "Off unless given.")
@click.option("--nbd-allow-remote", is_flag=True,
              help="Allow a --nbd-tcp host reachable from other machines (NBD has no "
                   "authentication or encryption: trusted networks only).")
@click.option("--no-nbd", is_flag=True, help="Do not export the devices over NBD.")
@click.option("--allow-path", "allowed_paths", multiple=True, metavar="PATH",
              help="Tables may name only files and block devices inside PATH (repeatable; "
                   "symbolic links resolved). Default: any path the daemon can open.")
@click.option("-v", "--verbose", is_flag=True, help="Log each operation.")
def daemon(socket_path: str | None, state_dir: str | None, nbd_socket: str | None,
           nbd_tcp: str | None, nbd_allow_remote: bool, no_nbd: bool,
           allowed_paths: tuple[str, ...], verbose: bool) -> None:
    """Run the device-mapper engine in the foreground until SIGTERM or Ctrl-C.

    Every engine device is exported over NBD under its own name, read and written through
    its table (an era device tracks what NBD clients write). On shutdown NBD clients are
    disconnected, then every device is suspended (so era metadata is committed) and removed.

    Whoever can connect to the control socket (mode 0600: its owner) can make the daemon open
    and write any file the daemon can; run it as root only for root, or confine it with
    --allow-path.

    \b
    Example:
      blockera daemon --socket /run/blockera/engine.sock --nbd-tcp 10809 &
      blockera dmsetup create era --table "0 524288 era meta.img origin.img 4096"
      nbdinfo 'nbd+unix:///era?socket=/run/blockera/engine-nbd.sock'
      qemu-img info nbd://127.0.0.1:10809/era
    """
    from blockera.dm.daemon import Daemon, DaemonService
    from blockera.dm.engine import Engine
    from blockera.dm.protocol import default_socket_path
    from blockera.nbd.engine_service import EngineNbdService
    from blockera.nbd.errors import RemoteBindRefusedError

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="blockera daemon: %(message)s")
    path = Path(socket_path) if socket_path else default_socket_path()
    settings = _nbd_settings(path, nbd_socket, nbd_tcp, nbd_allow_remote, no_nbd)
    engine = Engine(allowed_paths=list(allowed_paths) if allowed_paths else None)
    services: list[DaemonService] = []
    nbd: EngineNbdService | None = None
    if settings is not None:
        nbd = EngineNbdService(engine, settings)
        services.append(nbd)

    def started() -> None:
        where = f"; {nbd.describe()}" if nbd is not None else ""
        click.echo(f"blockera daemon: control socket {path}{where}", err=True)

    try:
        Daemon(engine, path, Path(state_dir) if state_dir else None, services).run(started)
    except RemoteBindRefusedError as exc:
        raise RemoteBindRefusedError(f"{exc} On the command line: --nbd-allow-remote.") \
            from None
