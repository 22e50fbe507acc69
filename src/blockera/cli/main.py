"""Entry point: the `blockera` command group and the mapping of errors to exit codes
(0 success, 1 a finding such as failed validation, 2 usage or I/O error). A traceback reaching a
user is a bug; set BLOCKERA_DEBUG=1 to see one."""

from __future__ import annotations

import os
import sys
import traceback

import click

from blockera import __version__
from blockera.errors import BlockeraError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="blockera")
def cli() -> None:
    """Block-level change tracking, snapshots and incremental backup: dm-era and dm-snapshot
    formats, tools and a userspace device-mapper engine.

    \b
    Example:
      blockera era invalidate --written-since 3 /dev/mapper/era-access
    """


def _register() -> None:
    from blockera.cli.cow import cow
    from blockera.cli.daemon import daemon
    from blockera.cli.dd import dd
    from blockera.cli.dmsetup import dmsetup
    from blockera.cli.era import era
    from blockera.cli.live import activate, invalidate, mark, replicate, status, track, untrack
    from blockera.cli.nbd import nbd

    from blockera.cli.backup import COMMANDS as backup_commands

    for command in (era, cow, dmsetup, daemon, dd, nbd, *backup_commands, track, activate,
                    untrack, status, replicate, mark, invalidate):
        cli.add_command(command)


_register()


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
