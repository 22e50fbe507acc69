"""`blockera daemon`: run the userspace device-mapper engine, with its devices exported over
NBD (a unix socket beside the control socket by default; TCP on request, loopback only unless
remote clients are allowed explicitly). See docs/engine.md §2, §3."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import click

from blockera.errors import BlockeraError, UsageError

if TYPE_CHECKING:
    from blockera.nbd.daemon_service import NbdSettings

# The engine, its targets (numpy) and the NBD server are imported when the daemon starts, not
# for every `blockera` command.


def _nbd_settings(control_socket: Path, nbd_socket: str | None, nbd_tcp: str | None,
                  allow_remote: bool, no_nbd: bool) -> "NbdSettings | None":
    from blockera.nbd.daemon_service import NbdSettings, default_nbd_socket_path
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
@click.option("--detach", is_flag=True,
              help="Run in the background: return once the daemon listens (exit 0) or has "
                   "failed to start (its error, exit 2); it then logs to --log.")
@click.option("--log", "log_path", type=click.Path(dir_okay=False),
              help="With --detach: where the daemon logs (default: <socket>.log beside the "
                   "pid file).")
@click.option("-v", "--verbose", is_flag=True, help="Log each operation.")
def daemon(socket_path: str | None, state_dir: str | None, nbd_socket: str | None,
           nbd_tcp: str | None, nbd_allow_remote: bool, no_nbd: bool,
           allowed_paths: tuple[str, ...], detach: bool, log_path: str | None,
           verbose: bool) -> None:
    """Run the device-mapper engine until SIGTERM or Ctrl-C (in the foreground, or in the
    background with --detach; stop it with `kill $(cat STATE_DIR/engine.pid)`).

    Every engine device is exported over NBD under its own name, read and written through
    its table (an era device tracks what NBD clients write). On shutdown NBD clients are
    disconnected, then every device is suspended (so era metadata is committed) and removed.

    Whoever can connect to the control socket (mode 0600: its owner) can make the daemon open
    and write any file the daemon can; run it as root only for root, or confine it with
    --allow-path.

    \b
    Example:
      blockera daemon --socket /run/blockera/engine.sock --nbd-tcp 10809 --detach
      blockera dmsetup create era --table "0 524288 era meta.img origin.img 4096"
      nbdinfo 'nbd+unix:///era?socket=/run/blockera/engine-nbd.sock'
      qemu-img info nbd://127.0.0.1:10809/era
    """
    from blockera.engine.daemon import Daemon, DaemonService
    from blockera.engine.userspace import Engine
    from blockera.engine.protocol import default_socket_path
    from blockera.nbd.daemon_service import EngineNbdService
    from blockera.nbd.errors import RemoteBindRefusedError

    path = Path(socket_path) if socket_path else default_socket_path()
    settings = _nbd_settings(path, nbd_socket, nbd_tcp, nbd_allow_remote, no_nbd)
    state = Path(state_dir) if state_dir else path.parent
    if log_path is not None and not detach:
        raise click.UsageError("--log goes with --detach (in the foreground the daemon logs "
                               "to standard error)")
    ready = _detach(Path(log_path) if log_path else state / f"{path.stem}.log") \
        if detach else None
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="blockera daemon: %(message)s")
    engine = Engine(allowed_paths=list(allowed_paths) if allowed_paths else None)
    services: list[DaemonService] = []
    nbd: EngineNbdService | None = None
    if settings is not None:
        nbd = EngineNbdService(engine, settings)
        services.append(nbd)

    def started() -> None:
        where = f"; {nbd.describe()}" if nbd is not None else ""
        message = f"blockera daemon: control socket {path}{where}"
        click.echo(message, err=True)
        if ready is not None:
            ready(f"ok {message}")

    try:
        Daemon(engine, path, state, services).run(started)
    except BlockeraError as exc:
        if isinstance(exc, RemoteBindRefusedError):
            exc = RemoteBindRefusedError(f"{exc} On the command line: --nbd-allow-remote.")
        if ready is not None:
            ready(f"error {exc}")
        raise exc from None


def _detach(log_path: Path) -> Callable[[str], None]:
    """Fork: the parent waits until the child reports "ok ..." or "error ..." through a pipe,
    prints it and exits; the child, in a new session with its output going to `log_path`,
    goes on as the daemon and gets the function that reports."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    read_end, write_end = os.pipe()
    if os.fork():
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            report = pipe.read().decode(errors="replace")
        status, _, message = report.partition(" ")
        if status == "ok":
            click.echo(message, err=True)
            sys.exit(0)
        click.echo(f"blockera: {message or 'the daemon exited before it was ready'} "
                   f"(log: {log_path})", err=True)
        sys.exit(2)
    os.close(read_end)
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(null)
    os.close(log)

    def ready(report: str) -> None:
        nonlocal write_end
        if write_end >= 0:
            os.write(write_end, report.encode())
            os.close(write_end)
            write_end = -1

    return ready
