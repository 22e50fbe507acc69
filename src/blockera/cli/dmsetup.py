"""`blockera dmsetup ...`: dmsetup's commands, syntax and output, on the userspace engine.

Tables come from `--table TEXT`, a table file argument, or standard input; failures print
dmsetup's own words (`device-mapper: reload ioctl on NAME failed: Invalid argument`) with the
target's reason, then `Command failed.`, and exit 1.

See docs/engine.md §1, §2.
"""

from __future__ import annotations

import sys

import click

from blockera.engine.client import EngineClient
from blockera.errors import BlockeraError

_STRERROR = {"EINVAL": "Invalid argument", "EBUSY": "Device or resource busy",
             "ENOSPC": "No space left on device", "ENXIO": "No such device or address",
             "EIO": "Input/output error", "EEXIST": "File exists", "EROFS": "Read-only file system",
             "EPERM": "Operation not permitted", "ENOTBLK": "Block device required",
             "EILSEQ": "Invalid or incomplete multibyte or wide character",
             "EOPNOTSUPP": "Operation not supported", "EAGAIN": "Resource temporarily unavailable"}

socket_option = click.option("--socket", "socket_path", type=click.Path(dir_okay=False),
                             help="Engine daemon socket (default: $BLOCKERA_SOCKET or the "
                                  "runtime directory).")


def _client(socket_path: str | None) -> EngineClient:
    """`--socket` given to the command, else to `dmsetup` itself, else the default."""
    return EngineClient(socket_path or click.get_current_context().obj)


def _fail(ioctl: str, name: str, exc: BlockeraError) -> None:
    reason = _STRERROR.get(exc.errno_name, exc.errno_name)
    if exc.errno_name == "ENXIO" and "no such device" in str(exc):
        click.echo(f"Device {name} not found", err=True)
    else:
        click.echo(f"device-mapper: {ioctl} ioctl on {name} failed: {reason} ({exc})", err=True)
    click.echo("Command failed.", err=True)
    sys.exit(1)


def _read_table(table: str | None, table_file: str | None) -> str:
    if table is not None:
        return table.replace(";", "\n") if "\n" not in table else table
    if table_file is not None:
        with open(table_file) as f:
            return f.read()
    if sys.stdin.isatty():
        raise click.UsageError("give a table with --table, a table file, or on standard input")
    return sys.stdin.read()


@click.group()
@socket_option
@click.pass_context
def dmsetup(ctx: click.Context, socket_path: str | None) -> None:
    """Device-mapper control with dmsetup's syntax, on the blockera engine daemon.

    \b
    Example (image files for disks):
      truncate -s 1M meta.img; truncate -s 256M origin.img
      blockera dmsetup create era-meta --table "0 256 linear meta.img 0"
      blockera dmsetup create era --table "0 524288 era /dev/mapper/era-meta origin.img 4096"
      blockera dmsetup --socket /run/blockera/engine.sock status era
    """
    ctx.obj = socket_path


@dmsetup.command()
@click.argument("name")
@click.argument("table_file", required=False, type=click.Path(exists=True, dir_okay=False))
@click.option("--table", help="The table; several lines may be separated by ';'.")
@click.option("-u", "--uuid", default="", help="Device UUID.")
@click.option("-r", "--readonly", is_flag=True)
@click.option("-n", "--notable", is_flag=True, help="Create the device without a table.")
@socket_option
def create(name: str, table_file: str | None, table: str | None, uuid: str, readonly: bool,
           notable: bool, socket_path: str | None) -> None:
    """Create a device, load its table and resume it."""
    text = None if notable else _read_table(table, table_file)
    with _client(socket_path) as c:
        try:
            c.create(name, text, uuid=uuid, read_only=readonly)
        except BlockeraError as exc:
            _fail("reload" if text else "create", name, exc)


@dmsetup.command(name="load")
@click.argument("name")
@click.argument("table_file", required=False, type=click.Path(exists=True, dir_okay=False))
@click.option("--table", help="The table; several lines may be separated by ';'.")
@socket_option
def load(name: str, table_file: str | None, table: str | None, socket_path: str | None) -> None:
    """Load a table into the device's inactive slot (it goes live at the next resume)."""
    text = _read_table(table, table_file)
    with _client(socket_path) as c:
        try:
            c.load(name, text)
        except BlockeraError as exc:
            _fail("reload", name, exc)


dmsetup.add_command(load, name="reload")


def _simple(op: str, ioctl: str, doc: str) -> click.Command:
    @click.command(name=op, help=doc)
    @click.argument("name")
    @socket_option
    def command(name: str, socket_path: str | None) -> None:
        with _client(socket_path) as c:
            try:
                getattr(c, op)(name)
            except BlockeraError as exc:
                _fail(ioctl, name, exc)
    return command


dmsetup.add_command(_simple("suspend", "suspend", "Suspend a device (I/O waits until resume)."))
dmsetup.add_command(_simple("resume", "resume",
                            "Resume a device, making a loaded table live."))
dmsetup.add_command(_simple("remove", "remove", "Remove a device (suspending it first)."))
dmsetup.add_command(_simple("clear", "clear", "Drop the inactive table."))


@dmsetup.command()
@click.argument("name")
@click.argument("new_name")
@socket_option
def rename(name: str, new_name: str, socket_path: str | None) -> None:
    """Rename a device."""
    with _client(socket_path) as c:
        try:
            c.rename(name, new_name)
        except BlockeraError as exc:
            _fail("rename", name, exc)


@dmsetup.command()
@click.argument("name")
@click.argument("sector", type=int)
@click.argument("words", nargs=-1, required=True)
@socket_option
def message(name: str, sector: int, words: tuple[str, ...], socket_path: str | None) -> None:
    """Send a message to the target at SECTOR (e.g. `message era 0 checkpoint`)."""
    with _client(socket_path) as c:
        try:
            reply = c.message(name, sector, list(words))
        except BlockeraError as exc:
            _fail("message", name, exc)
            return
    if reply:
        click.echo(reply)


def _report(kind: str, doc: str) -> click.Command:
    @click.command(name=kind, help=doc)
    @click.argument("name", required=False)
    @socket_option
    def command(name: str | None, socket_path: str | None) -> None:
        with _client(socket_path) as c:
            try:
                text = getattr(c, kind)(name)
            except BlockeraError as exc:
                _fail(kind if kind != "status" else "status", name or "", exc)
                return
        click.echo(text, nl=False)
    return command


dmsetup.add_command(_report("status", "Print the status line of each target (all devices if "
                                      "no NAME)."))
dmsetup.add_command(_report("table", "Print the live table (devices as MAJ:MIN)."))
dmsetup.add_command(_report("info", "Print device information."))


@dmsetup.command()
@socket_option
def ls(socket_path: str | None) -> None:
    """List devices."""
    with _client(socket_path) as c:
        click.echo(c.ls(), nl=False)


@dmsetup.command()
@socket_option
def mknodes(socket_path: str | None) -> None:
    """Nothing to do: engine devices are named /dev/mapper/NAME in tables and exported over NBD."""
    _client(socket_path).close()
