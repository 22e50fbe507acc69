"""`blockera cow ...`: tools for dm-snapshot COW devices (persistent stores, P/PO).

All commands only read the COW (with O_DIRECT on block devices, so a live COW is not seen
through a stale page cache). Exit status: 0 success, 1 the COW is damaged or unusable (one-line
message), 2 usage or I/O errors.

See docs/snapshot.md §8.
"""

from __future__ import annotations

import sys

import click

from blockera.cli.files import open_for_reading, output_file, refuse_output_over_input
from blockera.errors import UsageError


@click.group()
def cow() -> None:
    """dm-snapshot COW tools: inspect a persistent store, list or extract changed chunks."""


@cow.command()
@click.argument("cow_path", metavar="COW", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True,
              help='Print {"header", ..., "records": [[area, slot, old, new], ...], '
                   '"anomalies": [...], "error"}.')
def dump(cow_path: str, as_json: bool) -> None:
    """Print a COW's header, load state and every exception record.

    Records are listed in on-disk order as `area slot old_chunk new_chunk`, followed by
    anomalies the kernel would accept silently (duplicate old_chunk, new_chunk on a
    metadata chunk or beyond the end, ...) and, if reading had to stop, why. Exit 1 when
    there are anomalies or the COW is unreadable (after printing what could be read).

    \b
    Example:
      blockera cow dump /dev/mapper/vg-snap-cow
    """
    from blockera.snapshot.dump import dump_cow, write_json, write_text

    with open_for_reading(cow_path) as dev:
        result = dump_cow(dev)
    with output_file(None) as out:
        (write_json if as_json else write_text)(result, out)
    if not result.ok:
        sys.exit(1)


@cow.command()
@click.argument("cow_path", metavar="COW", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True,
              help='Print {"chunk_size": SECTORS, "valid": bool, "exceptions": N, '
                   '"ranges": [[begin, end], ...], "sector_ranges": [[begin, end], ...]}.')
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the list here.")
def changed(cow_path: str, as_json: bool, output: str | None) -> None:
    """List the origin chunks a snapshot holds exceptions for, as merged ranges.

    These are the chunks that differ between the snapshot and its origin (copied out before
    an origin write, or written through the snapshot). Ranges are [begin, end) in origin
    chunks of the COW's chunk size, and in sectors. Text output: one range per line,
    `begin_chunk end_chunk begin_sector end_sector`, after a `#` comment line. An invalid
    snapshot's list is incomplete: it is printed ("valid": false in JSON) and the exit
    status is 1.

    \b
    Example:
      blockera cow changed --json /dev/mapper/vg-snap-cow
    """
    from blockera.snapshot.changed import changed_chunks, load_checked, write_json, write_text

    with open_for_reading(cow_path) as dev:
        image, _ = load_checked(dev)
    result = changed_chunks(image)
    with output_file(output, inputs=(cow_path,)) as out:
        (write_json if as_json else write_text)(result, out)
    if not result.valid:
        click.echo("blockera: the snapshot is invalid (header valid=0): origin writes after "
                   "the invalidation were not recorded, so this list is incomplete", err=True)
        sys.exit(1)


@cow.command()
@click.argument("cow_path", metavar="COW", type=click.Path(dir_okay=False))
@click.option("--origin", "origin_path", required=True, type=click.Path(dir_okay=False),
              help="The snapshot's origin device (the -real device under LVM) or image.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help='Output file ("-" = stdout, stream format only).')
@click.option("--format", "fmt", type=click.Choice(["sparse", "stream"]), default="sparse",
              show_default=True, help="sparse: an origin-sized file with holes; stream: "
              "(offset, length, data) records.")
@click.option("--data", "source", type=click.Choice(["origin", "snapshot"]), default="origin",
              show_default=True, help="origin: the origin's current contents of the changed "
              "chunks; snapshot: the snapshot's contents of them (from the COW).")
@click.option("--force", is_flag=True,
              help="Replace OUTPUT even if it exists and is not empty.")
def extract(cow_path: str, origin_path: str, output: str, fmt: str, source: str,
            force: bool) -> None:
    """Copy out only the changed chunks of a snapshot's origin (or of the snapshot).

    sparse: OUTPUT is a new regular file as large as the origin; the changed chunks hold
    their data at their own offsets, everything else is a hole. Get the ranges with
    `blockera cow changed --json`. OUTPUT is always a new file, never written into: an
    existing non-empty OUTPUT is refused unless --force replaces it, and OUTPUT may not be
    the COW or the origin.

    \b
    stream (little-endian integers):
      header  "BLKCOWX1", u32 chunk_sectors, u32 source (0 origin, 1 snapshot),
              u64 origin_bytes, u64 record_count
      record  u64 offset_bytes, u64 length_bytes, data (ascending, non-overlapping)
      trailer "BLKCOWXE", u64 total_data_bytes

    For a consistent copy of --data origin, stop writes to the origin first. Nothing is
    written if the COW is invalid, damaged, or has chunks beyond the origin's end.

    \b
    Example:
      blockera cow extract /dev/mapper/vg-snap-cow --origin /dev/mapper/vg-base-real \\
          -o changes.img
    """
    from blockera.snapshot.changed import load_checked
    from blockera.snapshot.extract import plan_extract, write_sparse, write_stream

    if fmt == "sparse" and output == "-":
        raise UsageError("--format sparse needs a file for -o (use --format stream for stdout)")
    refuse_output_over_input(output, cow_path, origin_path)
    with open_for_reading(cow_path) as cow_dev, open_for_reading(origin_path) as origin_dev:
        image, _ = load_checked(cow_dev)
        plan = plan_extract(image, origin_dev.size_bytes, source)
        data_dev = origin_dev if source == "origin" else cow_dev
        with output_file(output, replace_nonempty=force) as out:
            (write_sparse if fmt == "sparse" else write_stream)(plan, data_dev, out)
    click.echo(f"extracted {plan.data_bytes} bytes of {source} data in {len(plan.segments)} "
               f"ranges ({len(image.table or ())} changed chunks) to {output}", err=True)
