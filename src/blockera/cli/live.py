"""`blockera track | activate | untrack | status | replicate | mark | invalidate`: live devices,
on the engine daemon or the kernel's device-mapper. See docs/live-devices.md."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time

import click

from blockera.errors import BlockeraError, UsageError

state_dir_option = click.option(
    "--state-dir", type=click.Path(file_okay=False), envvar="BLOCKERA_STATE_DIR",
    help="Where tracked devices are recorded (default /var/lib/blockera; "
         "$BLOCKERA_STATE_DIR).")
socket_option = click.option(
    "--socket", "socket_path", type=click.Path(dir_okay=False),
    help="Engine daemon socket, for devices on the userspace engine (default: the one "
         "recorded, else $BLOCKERA_SOCKET).")


def _name(device: str) -> str:
    return device.rsplit("/", 1)[-1]


def _open(state_dir: str | None, device: str, socket_path: str | None):
    from blockera.live.engines import open_engine
    from blockera.live.state import StateDir

    state = StateDir(state_dir)
    record = state.load(_name(device))
    return state, record, open_engine(record.engine, socket_path or record.socket)


@click.command()
@click.argument("device")
@click.option("--metadata", required=True, type=click.Path(dir_okay=False),
              help="Era metadata device or image file (blank, or use --force).")
@click.option("--block-size", "block_sectors", type=int, default=2048, show_default=True,
              metavar="SECTORS", help="Era block size in 512-byte sectors (a multiple of 8).")
@click.option("--name", help="Name of the era device for a plain device or image file "
                             "(default: its file name).")
@click.option("--force", is_flag=True, help="Format metadata that holds data.")
@state_dir_option
@socket_option
def track(device: str, metadata: str, block_sectors: int, name: str | None, force: bool,
          state_dir: str | None, socket_path: str | None) -> None:
    """Put era tracking under a device's users, in place.

    A device-mapper device (an LVM volume included) keeps its name and stays open: its table
    moves to NAME-real and NAME becomes an era layer over it. A block device or an image file
    gets NAME-real over it and a new era device /dev/mapper/NAME, which its users open
    instead. The metadata device is sized with the exact calculator first; nothing is changed
    when it is too small.

    \b
    Example:
      blockera track /dev/mapper/vg-data --metadata /dev/vg/data-era
      blockera track disk.img --metadata disk-era.img --socket engine.sock
    """
    from blockera.live.engines import engine_kind_for, open_engine
    from blockera.live.stack import track as do_track
    from blockera.live.state import StateDir

    kind = engine_kind_for(device)
    engine = open_engine(kind, socket_path)
    record = do_track(engine, StateDir(state_dir), device, metadata, engine_kind=kind,
                      socket=socket_path if kind == "userspace" else None, name=name,
                      block_sectors=block_sectors, force=force)
    click.echo(f"tracking /dev/mapper/{record.name} in blocks of {record.block_sectors} "
               f"sectors from era {record.era_at_track} ({record.kind} device, "
               f"{record.engine} engine)", err=True)


@click.command()
@click.argument("names", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Every tracked device.")
@state_dir_option
@socket_option
def activate(names: tuple[str, ...], all_: bool, state_dir: str | None,
             socket_path: str | None) -> None:
    """Build the recorded stacks again after a reboot (or an engine daemon restart).

    Idempotent. When tracking may have missed writes (metadata replaced or reformatted, era
    numbering gone backwards, the device already in use when its stack was rebuilt), the next
    backup or replication of it reads everything, and this says so.

    \b
    Example:
      blockera activate --all
    """
    from blockera.live.engines import open_engine
    from blockera.live.stack import activate as do_activate
    from blockera.live.state import StateDir

    state = StateDir(state_dir)
    selected = state.names() if all_ else [_name(n) for n in names]
    if not selected:
        if all_:
            click.echo("no tracked devices", err=True)
            return
        raise UsageError("name the devices to activate, or give --all")
    failed = 0
    for name in selected:
        try:
            record = state.load(name)
            engine = open_engine(record.engine, socket_path or record.socket)
            with state.locked(name):
                for note in do_activate(engine, state, record):
                    click.echo(note, err=True)
        except BlockeraError as exc:
            click.echo(f"blockera: {name}: {exc}", err=True)
            failed += 1
    if failed:
        sys.exit(2)


@click.command()
@click.argument("device")
@state_dir_option
@socket_option
def untrack(device: str, state_dir: str | None, socket_path: str | None) -> None:
    """Take the era layer away and leave the device as it was (its metadata is kept).

    \b
    Example:
      blockera untrack /dev/mapper/vg-data
    """
    from blockera.live.stack import untrack as do_untrack

    state, record, engine = _open(state_dir, device, socket_path)
    with state.locked(record.name):
        for note in do_untrack(engine, state, record):
            click.echo(note, err=True)


@click.command()
@click.option("--json", "as_json", is_flag=True)
@state_dir_option
@socket_option
def status(as_json: bool, state_dir: str | None, socket_path: str | None) -> None:
    """Tracked devices: current era, and for each backup repository, mirror and mark the
    era it starts from and the blocks written since.

    \b
    Example:
      blockera status --json
    """
    from blockera.live.report import device_report

    from blockera.live.state import StateDir

    state = StateDir(state_dir)
    reports = [device_report(state, name, socket_path) for name in state.names()]
    if as_json:
        click.echo(json.dumps(reports, indent=2))
        return
    if not reports:
        click.echo("no tracked devices")
    for report in reports:
        click.echo(f"{report['name']}: {report['state']}, era {report['current_era']}, "
                   f"blocks of {report['block_size_sectors']} sectors, epoch "
                   f"{report['epoch']}")
        for kind in ("backups", "mirrors", "marks"):
            for key, point in report[kind].items():
                changed = point["changed_blocks"]
                click.echo(f"  {kind[:-1]} {key}: from era {point['era']}, "
                           f"{'everything (tracking lost since)' if changed is None else changed}"
                           f"{'' if changed is None else ' blocks written since'}")


@click.command()
@click.argument("device")
@click.argument("mirror")
@click.option("--interval", type=float, metavar="SECONDS",
              help="Repeat every SECONDS until stopped (default: one round).")
@click.option("--once", is_flag=True, help="One round (the default; for cron).")
@click.option("--cow", type=click.Path(dir_okay=False),
              help="File or device for the snapshot's copies (default: a scratch file).")
@click.option("--scratch-dir", type=click.Path(file_okay=False),
              help="Where the scratch COW file goes (default: the temporary directory).")
@click.option("--verify-sample", "verify_percent", type=click.FloatRange(0, 100), default=1.0,
              show_default=True, metavar="PERCENT",
              help="Compare this share of the blocks not listed as changed with the mirror.")
@click.option("--json", "as_json", is_flag=True, help="One JSON line per round.")
@state_dir_option
@socket_option
def replicate(device: str, mirror: str, interval: float | None, once: bool, cow: str | None,
              scratch_dir: str | None, verify_percent: float, as_json: bool,
              state_dir: str | None, socket_path: str | None) -> None:
    """Bring MIRROR up to date with a tracked device, copying only what changed.

    MIRROR is an image file (created at the device's size when missing or empty), a block
    device, or an NBD URI (nbd://host[:port]/export, nbd+unix:///export?socket=PATH). Each
    round copies from a frozen view, flushes the mirror, then records where the next round
    starts: an interrupted round is simply done again.

    \b
    Example:
      blockera replicate /dev/mapper/vg-data /dev/backup/data-mirror --interval 300
    """
    from blockera.live.replicate import replicate_once

    if once and interval is not None:
        raise UsageError("--once and --interval exclude each other")
    state, record, engine = _open(state_dir, device, socket_path)
    stop = threading.Event()
    if interval is not None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    while True:
        started = time.monotonic()
        with state.locked(record.name):
            record = state.load(record.name)
            result = replicate_once(engine, state, record, mirror, cow=cow,
                                    scratch_dir=scratch_dir, verify_percent=verify_percent,
                                    show_progress=False)
        if as_json:
            click.echo(json.dumps(result.as_dict()))
        else:
            click.echo(f"{record.name} -> {result.mirror}: {result.reason}; copied "
                       f"{result.bytes_copied} bytes in {result.ranges} ranges "
                       f"({result.seconds:.2f} s); next round from era {result.next_era}",
                       err=True)
        if interval is None or stop.wait(max(0.0, interval - (time.monotonic() - started))):
            return


@click.command()
@click.argument("mark_name", metavar="NAME")
@click.argument("device")
@state_dir_option
@socket_option
def mark(mark_name: str, device: str, state_dir: str | None, socket_path: str | None) -> None:
    """Record the current moment under NAME (checkpoints the era target), e.g. when a
    storage-side snapshot is taken.

    \b
    Example:
      blockera mark before-upgrade /dev/mapper/vg-data
    """
    from blockera.live.marks import mark as do_mark

    state, record, engine = _open(state_dir, device, socket_path)
    with state.locked(record.name):
        era = do_mark(engine, state, record, mark_name)
    click.echo(f"{record.name}: mark {mark_name!r} at era {era}", err=True)


@click.command()
@click.argument("device")
@click.option("--since-mark", "mark_name", required=True, metavar="NAME",
              help="List the blocks written after this mark.")
@click.option("--units", type=click.Choice(["blocks", "sectors", "bytes"]), default="sectors",
              show_default=True, help="Units of the ranges printed.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--dm-cache", "dm_cache", metavar="NAME",
              help="Also invalidate those blocks in this dm-cache device (kernel only).")
@state_dir_option
@socket_option
def invalidate(device: str, mark_name: str, units: str, as_json: bool, dm_cache: str | None,
               state_dir: str | None, socket_path: str | None) -> None:
    """The blocks written since a mark: what a cache above the device must drop after the
    device was rolled back to the state of the mark. Ranges are [begin, end).

    \b
    Example:
      blockera invalidate --since-mark before-upgrade --json /dev/mapper/vg-data
    """
    from blockera.live.marks import changed_since_mark

    state, record, engine = _open(state_dir, device, socket_path)
    with state.locked(record.name):
        result = changed_since_mark(engine, record, mark_name)
        if dm_cache is not None:
            from blockera.live.dm_cache import invalidate_cache
            if record.engine != "kernel":
                raise UsageError("--dm-cache needs a device on the kernel's device-mapper")
            done = invalidate_cache(engine, dm_cache, result.sector_ranges())
            click.echo(f"{dm_cache}: invalidated {done} cache blocks", err=True)
    ranges = {"blocks": result.ranges, "sectors": result.sector_ranges(),
              "bytes": result.byte_ranges()}[units]
    if as_json:
        click.echo(json.dumps(result.as_dict()))
        return
    click.echo(f"# {result.device} since mark {result.mark!r}: {result.reason} "
               f"(begin end, {units})", err=True)
    for begin, end in ranges:
        click.echo(f"{begin} {end}")
