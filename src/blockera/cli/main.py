"""Entry point: the `blockera` command group and the mapping of errors to exit codes
(0 success, 1 a finding such as failed validation, 2 usage or I/O error). A traceback reaching a
user is a bug; set BLOCKERA_DEBUG=1 to see one."""

from __future__ import annotations

import importlib
import os
import sys
import traceback

import click

from blockera import __version__
from blockera.errors import BlockeraError


_COMMANDS = {
    "era": "era", "cow": "cow", "dmsetup": "dmsetup", "daemon": "daemon", "dd": "dd",
    "nbd": "nbd",
    **{name: "backup" for name in ("init", "backup", "snapshots", "restore", "dump", "check",
                                   "forget", "prune", "mount")},
    "copy": "copy",
    **{name: "live" for name in ("track", "activate", "untrack", "status", "replicate", "mark",
                                 "invalidate")},
}
"""Each command and the module of `blockera.cli` defining it (under the same name)."""


class _Commands(click.Group):
    """The commands, each imported when it is used (or listed): a command starts without
    loading every other command's code."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module = _COMMANDS.get(cmd_name)
        if module is None:
            return None
        command = getattr(importlib.import_module(f"blockera.cli.{module}"), cmd_name)
        assert isinstance(command, click.Command) and command.name == cmd_name
        return command


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="blockera")
def cli() -> None:
    """Block-level change tracking, snapshots and incremental backup: dm-era and dm-snapshot
    formats, tools and a userspace device-mapper engine.

    \b
    Example:
      blockera era invalidate --written-since 3 /dev/mapper/era-access
    """


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="blockera", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("blockera: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except BlockeraError as exc:
        click.echo(f"blockera: {exc}", err=True)
        sys.exit(exc.exit_code)
    except BrokenPipeError:
        sys.stderr.close()
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("blockera: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # a bug: say so in one line, keep the details for debugging
        if os.environ.get("BLOCKERA_DEBUG"):
            traceback.print_exc()
        click.echo(f"blockera: internal error: {type(exc).__name__}: {exc} "
                   "(set BLOCKERA_DEBUG=1 for details)", err=True)
        sys.exit(2)
