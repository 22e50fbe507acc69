"""`blockera nbd serve`: export image files or block devices over NBD without the engine (the
engine daemon exports its own devices itself). See docs/nbd.md."""

from __future__ import annotations

import logging
import signal
import threading

import click

from blockera.errors import UsageError


@click.group()
def nbd() -> None:
    """NBD export of plain files and block devices."""


@nbd.command()
@click.argument("exports", nargs=-1, required=True, metavar="NAME=PATH[:ro]...")
@click.option("--unix", "unix_path", metavar="PATH", help="Listen on this unix socket (0600).")
@click.option("--tcp", metavar="[HOST:]PORT",
              help="Listen on TCP (host 127.0.0.1 unless given; loopback only unless "
                   "--allow-remote).")
@click.option("--allow-remote", is_flag=True,
              help="Allow a TCP address reachable from other hosts (NBD has no "
                   "authentication or encryption).")
@click.option("--read-only", is_flag=True, help="Export everything read-only.")
@click.option("--direct", is_flag=True, help="O_DIRECT I/O on the files and devices.")
@click.option("--workers", type=click.IntRange(1, 1024), default=16, show_default=True,
              help="Worker threads per connection.")
@click.option("-v", "--verbose", count=True, help="Log connections (-vv: requests).")
def serve(exports: tuple[str, ...], unix_path: str | None, tcp: str | None, allow_remote: bool,
          read_only: bool, direct: bool, workers: int, verbose: int) -> None:
    """Serve files or block devices over NBD until SIGTERM or Ctrl-C.

    Each export is NAME=PATH, with `:ro` for a read-only one; the first is also served to
    clients that ask for the empty export name.

    \b
    Example:
      blockera nbd serve --unix nbd.sock disk=disk.img base=base.img:ro
      nbdinfo 'nbd+unix:///disk?socket=nbd.sock'
    """
    from blockera.blockdev import FileDevice
    from blockera.nbd.listeners import parse_tcp_address
    from blockera.nbd.exports import Export
    from blockera.nbd.server import serve as serve_nbd

    logging.basicConfig(level=logging.WARNING - 10 * min(verbose, 2),
                        format="blockera nbd: %(message)s")
    if unix_path is None and tcp is None:
        raise UsageError("give --unix PATH and/or --tcp [HOST:]PORT")
    served: dict[str, Export] = {}
    try:
        for spec in exports:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise UsageError(f"export {spec!r}: use NAME=PATH or NAME=PATH:ro")
            if name in served:
                raise UsageError(f"export name {name!r} is given twice")
            export_read_only = path.endswith(":ro")
            path = path.removesuffix(":ro")
            device = FileDevice(path, writable=not (export_read_only or read_only),
                                direct=direct)
            served[name] = Export(device, read_only=export_read_only)
        server = serve_nbd(served, unix_path=unix_path,
                           tcp=parse_tcp_address(tcp) if tcp else None,
                           allow_remote=allow_remote, read_only=read_only,
                           default_export=next(iter(served)), workers_per_connection=workers)
    except BaseException:
        for export in served.values():
            export.device.close()
        raise
    where = [f"nbd+unix:///NAME?socket={unix_path}"] if unix_path else []
    if server.tcp_address:
        where.append(f"nbd://{server.tcp_address[0]}:{server.tcp_address[1]}/NAME")
    click.echo(f"blockera nbd: serving {', '.join(served)} at {' and '.join(where)}", err=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.shutdown()
    for export in served.values():
        export.device.close()
