"""`blockera era ...`: the era metadata tools, with thin-provisioning-tools' flags and output.
See docs/era.md §5, §6."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from blockera.cli.files import open_for_reading, output_file
from blockera.errors import DeviceError, UsageError
from blockera.units import parse_size_bytes, SECTOR_BYTES


@click.group()
def era() -> None:
    """dm-era metadata tools (drop-in for era_dump, era_invalidate, era_check, era_restore)."""


@era.command()
@click.argument("metadata", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the XML here.")
@click.option("--logical", is_flag=True,
              help="No writesets; each block's era is the newest era it was written in.")
@click.option("--metadata-snapshot", is_flag=True,
              help="Dump the held metadata snapshot instead of the live superblock.")
def dump(metadata: str, output: str | None, logical: bool, metadata_snapshot: bool) -> None:
    """Print era metadata as XML (byte-identical to era_dump).

    \b
    Example:
      blockera era dump --logical /dev/mapper/era-access
    """
    from blockera.era.dump import dump_xml
    from blockera.era.image import EraImage

    with open_for_reading(metadata) as dev:
        image = EraImage(dev, use_snapshot=metadata_snapshot)
        with output_file(output, inputs=(metadata,)) as out:
            dump_xml(image, out, logical=logical)


@era.command()
@click.argument("metadata", type=click.Path(dir_okay=False))
@click.option("--written-since", "era_threshold", type=click.IntRange(0, 2**32 - 1),
              required=True, metavar="ERA",
              help="List blocks written in this era or later.")
@click.option("--metadata-snapshot", is_flag=True,
              help="Read the held metadata snapshot (safe on live metadata).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the result here.")
@click.option("--json", "as_json", is_flag=True,
              help='Print {"nr_blocks", "written_since", "ranges": [[begin, end), ...], '
                   '"block_size_sectors"}.')
def invalidate(metadata: str, era_threshold: int, metadata_snapshot: bool, output: str | None,
               as_json: bool) -> None:
    """List the blocks written since an era (era_invalidate's output).

    \b
    Example:
      dmsetup message era 0 take_metadata_snap
      blockera era invalidate --written-since 3 --metadata-snapshot /dev/mapper/era-access
      dmsetup message era 0 drop_metadata_snap
    """
    from blockera.era.invalidate import write_json, write_xml, written_since
    from blockera.era.image import EraImage

    with open_for_reading(metadata) as dev:
        image = EraImage(dev, use_snapshot=metadata_snapshot)
        if not metadata_snapshot and image.live.current_writeset.root:
            click.echo("blockera: note: this metadata has a current writeset, so its era device "
                       "is active (or crashed): the answer can change while it is read. For a "
                       "consistent answer send take_metadata_snap and use --metadata-snapshot.",
                       err=True)
        result = written_since(image, era_threshold)
        with output_file(output, inputs=(metadata,)) as out:
            (write_json if as_json else write_xml)(result, out)


@era.command()
@click.argument("metadata", type=click.Path(dir_okay=False))
@click.option("-q", "--quiet", is_flag=True, help="Print nothing; only the exit code tells.")
@click.option("--super-block-only", is_flag=True, help="Check only the superblock.")
def check(metadata: str, quiet: bool, super_block_only: bool) -> None:
    """Validate era metadata: exit 0 if sound, 1 if damaged.

    Checks everything era_check does, plus the current writeset, the metadata snapshot and the
    space map's reference counts.

    \b
    Example:
      blockera era check /dev/mapper/era-access
    """
    from blockera.era.check import check_era_metadata

    if not Path(metadata).exists() and not metadata.startswith("/dev/mapper/"):
        raise DeviceError(f"{metadata}: no such file or directory")
    with open_for_reading(metadata) as dev:
        report = check_era_metadata(dev, superblock_only=super_block_only)
    if not quiet:
        for line in report.lines():
            click.echo(line, err=True)
    sys.exit(0 if report.ok else 1)


@era.command()
@click.option("-i", "--input", "input_path", required=True, type=click.Path(dir_okay=False),
              help='era_dump XML to restore ("-" = standard input).')
@click.option("-o", "--output", "output_path", required=True, type=click.Path(dir_okay=False),
              help="Metadata device, engine device (/dev/mapper/NAME) or file (must exist and "
                   "have room for the metadata).")
@click.option("-q", "--quiet", is_flag=True)
def restore(input_path: str, output_path: str, quiet: bool) -> None:
    """Write fresh era metadata from XML (like era_restore).

    Nothing is written unless the whole input parses and fits: sizes are checked against
    the output before the input's arrays are even allocated.

    \b
    Example:
      truncate -s 4M meta.img
      blockera era restore -i era.xml -o meta.img
    """
    from blockera.cli.files import open_output_device, refuse_output_over_input
    from blockera.era.restore import restore_xml
    from blockera.units import METADATA_BLOCK_BYTES

    refuse_output_over_input(output_path, input_path)
    with open_output_device(output_path) as dev:
        if dev.size_bytes < METADATA_BLOCK_BYTES:
            raise DeviceError(f"{output_path}: output is smaller than one 4 KiB metadata block")
        desc, used = restore_xml(dev, input_path)
    if not quiet:
        click.echo(f"restored {desc.nr_blocks} blocks, {len(desc.writesets)} writesets, era "
                   f"{desc.current_era}: {used} metadata blocks used", err=True)


@era.command("metadata-size")
@click.option("--origin-size", required=True, metavar="SIZE",
              help="Origin size: bytes, or with a unit (s = sectors, K, M, G, T).")
@click.option("--block-size", required=True, type=int, metavar="SECTORS",
              help="Era block size in 512-byte sectors (a multiple of 8).")
@click.option("--checkpoints", default=2, show_default=True, type=click.IntRange(0, 1000),
              help="Checkpoints that may pile up undigested (recommended size).")
@click.option("--json", "as_json", is_flag=True)
def metadata_size_cmd(origin_size: str, block_size: int, checkpoints: int, as_json: bool) -> None:
    """Exact metadata device size an era target needs.

    \b
    Example:
      blockera era metadata-size --origin-size 1T --block-size 4096
    """
    from blockera.era.size import describe, metadata_size

    try:
        origin_bytes = parse_size_bytes(origin_size)
        size = metadata_size(origin_bytes // SECTOR_BYTES, block_size, checkpoints)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if as_json:
        click.echo(json.dumps(size.as_dict()))
    else:
        click.echo(describe(size, origin_bytes // SECTOR_BYTES, block_size))
