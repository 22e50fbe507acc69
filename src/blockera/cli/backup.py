"""`blockera init | backup | snapshots | restore | dump | check | forget | prune | mount`:
device backups in a restic repository (docs/backup-repository.md §14-§21). Thin: the work
is in `blockera.backup`.

Every command finds the repository with -r/--repo or BLOCKERA_REPOSITORY (see
`blockera.backup.location`) and the password in --password-file, BLOCKERA_PASSWORD_FILE,
BLOCKERA_PASSWORD, or by asking on a terminal. Exit status: 0 success, 1 a finding (damage,
a refused input, a conflicting lock, a wrong password), 2 usage or I/O errors.
"""

from __future__ import annotations

import functools
import getpass
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click

from blockera.errors import UsageError

PASSWORD_ENV = "BLOCKERA_PASSWORD"
PASSWORD_FILE_ENV = "BLOCKERA_PASSWORD_FILE"
REPOSITORY_ENV = "BLOCKERA_REPOSITORY"
BACKUP_THREADS = max(2, min(8, 2 * (os.cpu_count() or 1)))
"""Compress/encrypt workers of a backup: twice the CPUs, so that a worker writing (and
syncing) a full pack does not leave a CPU idle."""


# -- shared options -----------------------------------------------------------------------------

@dataclass(frozen=True)
class RepositoryArgs:
    """Where the repository is and how to reach it: -r/--repo, the password source, and the
    S3 connection options (ignored for a local directory)."""

    location: str | None
    password_file: str | None = None
    connections: int | None = None
    cacert: str | None = None
    limit_upload_kib: float | None = None
    limit_download_kib: float | None = None

    def backend(self):  # type: ignore[no-untyped-def]
        from blockera.backup.location import open_backend

        return open_backend(self.location or "", connections=self.connections,
                            cacert=self.cacert, limit_upload_kib=self.limit_upload_kib,
                            limit_download_kib=self.limit_download_kib)


def repository_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """-r/--repo, the password and the S3 options; the command receives them as one
    `repo: RepositoryArgs`."""

    @functools.wraps(f)
    def command(*args: Any, repo: str | None, password_file: str | None,
                connections: int | None, cacert: str | None, limit_upload: float | None,
                limit_download: float | None, **kwargs: Any) -> Any:
        return f(*args, repo=RepositoryArgs(repo, password_file, connections, cacert,
                                            limit_upload, limit_download), **kwargs)

    for option in reversed(_REPOSITORY_OPTIONS):
        command = option(command)
    return command


_REPOSITORY_OPTIONS = (
    click.option("-r", "--repo", "repo", envvar=REPOSITORY_ENV, metavar="LOCATION",
                 help=f"The repository: a directory, local:DIR or s3:URL (or ${REPOSITORY_ENV})."),
    click.option("--password-file", envvar=PASSWORD_FILE_ENV, metavar="FILE",
                 type=click.Path(dir_okay=False),
                 help=f"Read the password from FILE (or ${PASSWORD_FILE_ENV}; else "
                      f"${PASSWORD_ENV}; else asked on a terminal)."),
    click.option("--connections", type=click.IntRange(1, 256), metavar="N",
                 help="S3: parallel connections (default 5, as restic)."),
    click.option("--cacert", type=click.Path(dir_okay=False, exists=True), metavar="FILE",
                 help="S3: trust this CA certificate (PEM) for TLS."),
    click.option("--limit-upload", type=click.FloatRange(min=1), metavar="KIB_S",
                 help="S3: upload bandwidth limit in KiB/s."),
    click.option("--limit-download", type=click.FloatRange(min=1), metavar="KIB_S",
                 help="S3: download bandwidth limit in KiB/s."),
)


def read_password(password_file: str | None, *, confirm: bool = False,
                  option: str = "--password-file", env: str = PASSWORD_ENV,
                  file_env: str = PASSWORD_FILE_ENV, which: str = "repository") -> str:
    """The password from the file option, else `env`, else a prompt on a terminal."""
    if password_file:
        try:
            with open(password_file, encoding="utf-8") as f:
                return f.read().strip()
        except OSError as exc:
            raise UsageError(f"{option} {password_file}: {exc.strerror}") from None
    if os.environ.get(env):
        return os.environ[env]
    if sys.stdin.isatty():
        password = getpass.getpass(f"enter password for {which}: ")
        if confirm and getpass.getpass("enter password again: ") != password:
            raise UsageError("the passwords do not match")
        if not password:
            raise UsageError("an empty password is not allowed")
        return password
    raise UsageError(f"no password for the {which}: give {option} FILE, or set {file_env} or "
                     f"{env}")


def open_repository(repo: RepositoryArgs, *,  # type: ignore[no-untyped-def]
                    preload: tuple[str, ...] = (), **options: Any):
    """The repository, opened. The key is derived (scrypt, half a second by design) in a
    thread while this one imports the repository code and the modules in `preload`."""
    import importlib

    from blockera.backup.backend import FileType
    from blockera.backup.counting import CountingBackend
    from blockera.backup.errors import NotARepositoryError

    backend = CountingBackend(repo.backend())
    if not backend.exists(FileType.CONFIG, ""):  # storage failures stay BackendErrors (exit 2)
        raise NotARepositoryError(f"{backend.location}: not a repository (there is no config "
                                  "file); create one with `blockera init`")
    password = read_password(repo.password_file)
    opened: dict[str, Any] = {}

    def derive() -> None:
        from blockera.backup.keys import open_master_key

        try:
            opened["key"] = open_master_key(backend, password)
        except BaseException as exc:  # handed to the caller
            opened["error"] = exc

    worker = threading.Thread(target=derive, name="open key", daemon=True)
    worker.start()
    from blockera.backup.repository import Repository

    for module in preload:
        importlib.import_module(module)
    worker.join()
    if "error" in opened:
        raise opened["error"]
    return Repository.open_with_key(backend, *opened["key"], **options)


def tune_malloc() -> None:
    """Keep freed memory for reuse: the data commands allocate and free megabyte buffers at
    hundreds of MB/s, and glibc's default hands each back to the kernel (mmap/munmap), so every
    new one is faulted in and zeroed again (a third of a restore's time went to that). With
    a fixed mmap threshold of 64 MiB and no trimming below 1 GiB, the heap is reused.

    All threads share one heap (one arena): by default each thread gets its own, and as every
    worker in turn holds the most (a pack being closed, blobs waiting) each arena grows to
    that peak and keeps it, so a full backup held about twice the memory it uses, a little
    more the longer it ran. The large buffers are few (a handful per megabyte), so sharing the
    heap costs no measurable time. Call before any thread starts. Not glibc: nothing to do."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    mallopt(m_mmap_threshold, 64 << 20)
    mallopt(m_trim_threshold, 1 << 30)
    mallopt(m_arena_max, 1)


def print_json(doc: object) -> None:
    click.echo(json.dumps(doc, indent=2))


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def find_snapshot(repo, ref: str, host: str | None, path: str | None):  # type: ignore[no-untyped-def]
    from blockera.backup.device_layout import source_path

    return repo.find_snapshot(ref, hostname=host,
                              paths=[source_path(path)] if path else None)


def snapshot_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--path", "snapshot_path", metavar="SOURCE",
                     help="With `latest`: the newest snapshot of this source path.")(f)
    f = click.option("--host", metavar="HOST",
                     help="With `latest`: the newest snapshot from this host.")(f)
    f = click.option("--file", "file_path", metavar="PATH",
                     help="The file inside the snapshot (default: its only file).")(f)
    return f


class _Bar:
    """A progress bar on standard error, created once its total is known."""

    def __init__(self, description: str, unit: str = "B") -> None:
        self.description = description
        self.unit = unit
        self.bar = None

    def total(self, n: int) -> None:
        from blockera.progress import progress

        self.bar = progress(n, self.description, unit=self.unit)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# -- init ---------------------------------------------------------------------------------------

@click.command()
@repository_options
@click.option("--repository-version", type=click.Choice(["1", "2"]), default="2",
              show_default=True, help="restic's repository format (2 compresses).")
def init(repo: RepositoryArgs, repository_version: str) -> None:
    """Create a repository (restic's format, usable by restic 0.14 and later).

    \b
    Example:
      BLOCKERA_PASSWORD=secret blockera init -r /srv/backup
    """
    from blockera.backup.repository import Repository

    backend = repo.backend()
    password = read_password(repo.password_file, confirm=True)
    created = Repository.init(backend, password, version=int(repository_version))
    created.close()
    click.echo(f"created repository {created.config.id[:10]} at {backend.location} (format "
               f"version {repository_version})")


# -- backup -------------------------------------------------------------------------------------

def _parse_time(text: str):  # type: ignore[no-untyped-def]
    import datetime as dt

    from blockera.backup.gojson import GoTime

    try:
        return GoTime.parse(text)
    except ValueError:
        pass
    try:
        return GoTime.from_datetime(dt.datetime.fromisoformat(text))
    except ValueError:
        raise UsageError(f"--time {text!r}: use RFC 3339 or 'YYYY-MM-DD HH:MM:SS'") from None


@click.command()
@click.argument("source")
@repository_options
@click.option("--chunk-size", metavar="SIZE",
              help="Blob size, a power of two from 64K to 8M (default: the parent's, else 1M).")
@click.option("--host", metavar="HOST", help="Host name to record (default: this machine's).")
@click.option("--parent", metavar="SNAPSHOT",
              help="Build on this snapshot (default: the latest of this source and host).")
@click.option("--changed", "changed_file", metavar="FILE", type=click.Path(dir_okay=False),
              help="Changed ranges: `era invalidate --json` or `cow changed --json` output "
                   "(- for standard input).")
@click.option("--era-metadata", metavar="META",
              help="Era metadata to read the changed blocks from.")
@click.option("--since", type=click.IntRange(0, 2**32 - 1), metavar="ERA",
              help="With --era-metadata: blocks written in ERA or later (default: the era the "
                   "parent recorded).")
@click.option("--metadata-snapshot", is_flag=True,
              help="With --era-metadata: read the held metadata snapshot.")
@click.option("--cow", metavar="COW",
              help="A COW store whose exceptions are the changes; for a tracked device: the "
                   "file or device to hold the snapshot's copies (default: a scratch file).")
@click.option("--full", is_flag=True,
              help="Read everything even with a change source (which then only records its "
                   "position for the next incremental).")
@click.option("--tag", "tags", multiple=True, metavar="TAG", help="Add a tag (repeatable).")
@click.option("--time", "time_text", metavar="TIME",
              help="Record this time instead of now (RFC 3339 or 'YYYY-MM-DD HH:MM:SS').")
@click.option("-n", "--dry-run", is_flag=True,
              help="Only say what would be read and reused; read and write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--state-dir", type=click.Path(file_okay=False), envvar="BLOCKERA_STATE_DIR",
              help="Tracked devices' records (default /var/lib/blockera; $BLOCKERA_STATE_DIR): "
                   "a tracked SOURCE is backed up from a snapshot, incrementally.")
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False),
              help="Engine daemon socket of a tracked device on the userspace engine "
                   "(default: the one recorded).")
@click.option("--scratch-dir", type=click.Path(file_okay=False),
              help="Tracked device: where the scratch COW file goes (default: the temporary "
                   "directory).")
@click.option("--verify-sample", "verify_percent", type=click.FloatRange(0, 100), default=1.0,
              show_default=True, metavar="PERCENT",
              help="Tracked device: compare this share of the chunks tracking calls unchanged "
                   "with the parent; a difference makes the backup read everything.")
def backup(source: str, repo: RepositoryArgs, chunk_size: str | None,
           host: str | None, parent: str | None, changed_file: str | None,
           era_metadata: str | None, since: int | None, metadata_snapshot: bool,
           cow: str | None, full: bool, tags: tuple[str, ...], time_text: str | None,
           dry_run: bool, as_json: bool, state_dir: str | None, socket_path: str | None,
           scratch_dir: str | None, verify_percent: float) -> None:
    """Back up SOURCE (an image file, a block device or /dev/mapper/NAME).

    Without change options the whole source is read (only blobs the repository lacks are
    stored). With --changed, --era-metadata or --cow only the chunks covering the changed
    ranges are read; everything else comes from the parent snapshot.

    A device tracked with `blockera track` needs no change options: it is frozen in a
    snapshot for the backup, the blocks written since its last backup into this repository
    are read from the snapshot, and a full read is made (and the reason given) whenever
    tracking cannot vouch for the changes.

    \b
    Example:
      blockera backup -r /srv/backup /dev/vg/data
      blockera dmsetup message era 0 take_metadata_snap
      blockera backup -r /srv/backup /dev/vg/data --era-metadata /dev/vg/era-meta \\
          --metadata-snapshot
      blockera backup -r /srv/backup /dev/mapper/vg-data      # tracked: consistent
    """
    tune_malloc()
    from blockera.live.state import StateDir
    from blockera.units import parse_size_bytes

    state = StateDir(state_dir)
    tracked = state.tracked_name(source)
    if tracked is None and (socket_path or scratch_dir):
        raise UsageError(f"--socket and --scratch-dir are for tracked devices, and {source} is "
                         f"not tracked (no record in {state.devices})")
    given = [x for x in (changed_file, era_metadata, cow) if x]
    if len(given) > 1:
        raise UsageError("give one change source: --changed, --era-metadata or --cow")
    if (since is not None or metadata_snapshot) and not era_metadata:
        raise UsageError("--since and --metadata-snapshot go with --era-metadata")
    chunk_bytes = None
    if chunk_size is not None:
        try:
            chunk_bytes = parse_size_bytes(chunk_size)
        except ValueError as exc:
            raise UsageError(f"--chunk-size: {exc}") from None
    for tag in tags:
        if not tag or "," in tag or tag.startswith("blockera"):
            raise UsageError(f"--tag {tag!r}: a tag may not be empty, contain a comma or start "
                             "with 'blockera' (blockera's own tags)")
    if tracked is not None:
        refused = [name for name, value in (("--changed", changed_file),
                                            ("--era-metadata", era_metadata),
                                            ("--parent", parent), ("--full", full),
                                            ("--time", time_text), ("--dry-run", dry_run))
                   if value]
        if refused:
            raise UsageError(f"{source} is a tracked device: its changes come from its own "
                             f"tracking, so {', '.join(refused)} cannot be given")
        _backup_tracked(state, tracked, repo, chunk_bytes=chunk_bytes, host=host,
                        tags=list(tags), cow=cow, scratch_dir=scratch_dir,
                        socket_path=socket_path, verify_percent=verify_percent,
                        as_json=as_json)
        return
    opened = []
    try:
        repository = open_repository(repo, threads=BACKUP_THREADS,
                                     preload=("blockera.backup.device_backup",
                                              "blockera.cli.files"))
        opened.append(repository)
        from blockera.backup.changes import EraChanges
        from blockera.backup.device_backup import (BackupOptions, CowSource,
                                                   EraMetadataSource, JsonSource, run_backup)
        from blockera.cli.files import open_for_reading

        changes = None
        if changed_file:
            if changed_file == "-":
                raw = sys.stdin.buffer.read()
            else:
                try:
                    with open(changed_file, "rb") as f:
                        raw = f.read()
                except OSError as exc:
                    raise UsageError(f"--changed {changed_file}: {exc.strerror}") from None
            changes = JsonSource(raw, changed_file)
        elif era_metadata:
            meta = open_for_reading(era_metadata)
            opened.append(meta)
            changes = EraMetadataSource(EraChanges(meta, use_snapshot=metadata_snapshot), since)
        elif cow:
            cow_dev = open_for_reading(cow)
            opened.append(cow_dev)
            changes = CowSource(cow_dev)
        device = open_for_reading(source)
        opened.append(device)
        options = BackupOptions(source=source, chunk_bytes=chunk_bytes, hostname=host,
                                parent=parent, changes=changes, full=full, tags=list(tags),
                                time=_parse_time(time_text) if time_text else None,
                                dry_run=dry_run)
        bar = _Bar(f"backup {os.path.basename(source)}")
        try:
            summary = run_backup(repository, device, options, on_plan=bar.total,
                                 on_progress=bar.update)
        finally:
            bar.close()
    finally:
        for item in reversed(opened):
            item.close()
    if as_json:
        print_json(summary.as_json())
        return
    _print_summary(summary)


def _print_summary(summary) -> None:  # type: ignore[no-untyped-def]
    kind = "full" if summary.made_from == "full" else f"incremental ({summary.made_from})"
    if summary.dry_run:
        click.echo(f"would back up {summary.source}: {kind}, {summary.chunks_total} chunks of "
                   f"{human_bytes(summary.chunk_bytes)}: read {summary.chunks_read} "
                   f"({human_bytes(summary.bytes_read)}), reuse {summary.chunks_reused}")
        return
    parent_note = f", parent {summary.parent_id[:8]}" if summary.parent_id else ""
    click.echo(f"snapshot {summary.snapshot_id[:8]} saved: {summary.source}, {kind}"
               f"{parent_note}")
    click.echo(f"  chunks: {summary.chunks_total} of {human_bytes(summary.chunk_bytes)}: "
               f"{summary.chunks_reused} reused, {summary.chunks_read} read, "
               f"{summary.chunks_new} new")
    stored = human_bytes(summary.bytes_stored) if summary.bytes_stored is not None else "?"
    click.echo(f"  read {human_bytes(summary.bytes_read)}, new {human_bytes(summary.bytes_new)}, "
               f"stored {stored}, in {summary.duration_s:.2f} s")


def _backup_tracked(state, name: str, repo: RepositoryArgs, *,  # type: ignore[no-untyped-def]
                    chunk_bytes: int | None, host: str | None, tags: list[str],
                    cow: str | None, scratch_dir: str | None, socket_path: str | None,
                    verify_percent: float, as_json: bool) -> None:
    """A tracked device, backed up from a snapshot (docs/live-devices.md §6)."""
    from blockera.live.backup import backup_tracked
    from blockera.live.engines import open_engine

    record = state.load(name)
    engine = open_engine(record.engine, socket_path or record.socket)
    repository = open_repository(repo, threads=BACKUP_THREADS,
                                 preload=("blockera.backup.device_backup",))
    try:
        with state.locked(name):
            record = state.load(name)
            bar = _Bar(f"backup {name}")
            try:
                result = backup_tracked(repository, repository.config.id, engine, state,
                                        record, hostname=host, chunk_bytes=chunk_bytes,
                                        tags=tags, cow=cow, scratch_dir=scratch_dir,
                                        verify_percent=verify_percent, on_plan=bar.total,
                                        on_progress=bar.update)
            finally:
                bar.close()
    finally:
        repository.close()
    if as_json:
        doc = result.summary.as_json()
        doc["tracked"] = {"full": result.full, "reason": result.reason,
                          "verified_chunks": result.verified_chunks}
        print_json(doc)
        return
    click.echo(f"{name}: {result.reason}"
               + (f" (verified {result.verified_chunks} unchanged chunks)"
                  if result.verified_chunks else ""), err=True)
    _print_summary(result.summary)


# -- snapshots ----------------------------------------------------------------------------------

@click.command()
@repository_options
@click.option("--host", metavar="HOST", help="Only snapshots from this host.")
@click.option("--path", "source", metavar="SOURCE", help="Only snapshots of this source path.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def snapshots(repo: RepositoryArgs, host: str | None,
              source: str | None, as_json: bool) -> None:
    """List the snapshots (restic's too), oldest first.

    \b
    Example:
      blockera snapshots -r /srv/backup --json
    """
    from blockera.backup.device_layout import DeviceFacts, source_path, user_tags

    repository = open_repository(repo)
    try:
        found = [s for s in repository.list_snapshots()
                 if (host is None or s.hostname == host)
                 and (source is None or s.paths == [source_path(source)])]
    finally:
        repository.close()
    rows = []
    for s in found:
        facts = DeviceFacts.from_tags(s.tags)
        rows.append({"id": s.id.hex() if s.id else None, "short_id": s.short_id,
                     "time": s.time.format(), "hostname": s.hostname, "username": s.username,
                     "paths": s.paths, "tags": s.tags, "user_tags": user_tags(s),
                     "parent": s.parent.hex() if s.parent else None, "tree": s.tree.hex(),
                     "device": facts is not None,
                     "size_bytes": facts.size_bytes if facts else None,
                     "chunk_bytes": facts.chunk_bytes if facts else None,
                     "made_from": facts.made_from if facts else None,
                     "era": facts.era if facts else None})
    if as_json:
        print_json(rows)
        return
    click.echo(f"{'ID':<9} {'Time':<20} {'Host':<12} {'Kind':<12} {'Size':>10}  Source")
    for r, s in zip(rows, found):
        kind = (r["made_from"] if r["made_from"] else "restic") if r["device"] else "restic"
        size = human_bytes(r["size_bytes"]) if r["size_bytes"] is not None else "-"
        when = s.time.to_datetime().strftime("%Y-%m-%d %H:%M:%S")
        extra = f"  [{', '.join(r['user_tags'])}]" if r["user_tags"] else ""
        click.echo(f"{r['short_id']:<9} {when:<20} {s.hostname[:12]:<12} {kind:<12} "
                   f"{size:>10}  {', '.join(s.paths)}{extra}")
    click.echo(f"{len(rows)} snapshots")


# -- restore and dump ---------------------------------------------------------------------------

def _layout_for(repository, ref: str, host: str | None, path: str | None,  # type: ignore[no-untyped-def]
                file_path: str | None):
    from blockera.backup.device_layout import DeviceFacts, content_layout, find_file_node

    snapshot = find_snapshot(repository, ref, host, path)
    where, node = find_file_node(repository, snapshot, file_path)
    facts = DeviceFacts.from_tags(snapshot.tags)
    layout = content_layout(repository, node, facts, f"snapshot {snapshot.short_id} {where}")
    return snapshot, where, layout


def _report_damage(result, as_json: bool, doc: dict[str, object]) -> None:  # type: ignore[no-untyped-def]
    if as_json:
        print_json(doc)
    if result.damaged:
        for d in result.damaged:
            click.echo(f"blockera: damaged: bytes [{d.begin_bytes}, {d.end_bytes}) written as "
                       f"zeros ({d.reason})", err=True)
        sys.exit(1)


@click.command()
@click.argument("snapshot")
@click.argument("target")
@repository_options
@snapshot_options
@click.option("--sparse", is_flag=True,
              help="Leave all-zero chunks unwritten (holes in files, punched ranges on devices).")
@click.option("--delta-from", metavar="SNAPSHOT",
              help="TARGET already holds this snapshot: write only the chunks that differ.")
@click.option("--ignore-errors", is_flag=True,
              help="On a damaged blob write zeros there, list the ranges and exit 1.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def restore(snapshot: str, target: str, repo: RepositoryArgs,
            file_path: str | None, host: str | None, snapshot_path: str | None, sparse: bool,
            delta_from: str | None, ignore_errors: bool, as_json: bool) -> None:
    """Write a snapshot's image to TARGET (a file, created or extended as needed, a block
    device, or /dev/mapper/NAME). SNAPSHOT is an ID (prefix) or `latest`.

    \b
    Example:
      blockera restore -r /srv/backup latest /dev/vg/data-copy --sparse
    """
    tune_malloc()
    from blockera.backup.restore import open_restore_target, restore_to_device

    repository = open_repository(repo)
    try:
        with repository.lock():
            snap, where, layout = _layout_for(repository, snapshot, host, snapshot_path,
                                              file_path)
            old = None
            if delta_from is not None:
                _, _, old = _layout_for(repository, delta_from, host, snapshot_path, file_path)
            tgt = open_restore_target(target, layout.size_bytes)
            bar = _Bar(f"restore {snap.short_id}")
            bar.total(layout.size_bytes)
            try:
                result = restore_to_device(repository, layout, tgt, sparse=sparse,
                                           delta_from=old, ignore_errors=ignore_errors,
                                           on_progress=bar.update,
                                           what=f"snapshot {snap.short_id} {where}")
            finally:
                bar.close()
                tgt.device.close()
    finally:
        repository.close()
    doc = {"snapshot": snap.id.hex() if snap.id else None, "file": where, "target": target,
           **result.as_json()}
    if not as_json:
        click.echo(f"restored snapshot {snap.short_id} {where} to {target}: "
                   f"{human_bytes(result.size_bytes)}, {result.chunks_written} chunks written, "
                   f"{result.chunks_zero} zero, {result.chunks_unchanged} unchanged")
    _report_damage(result, as_json, doc)


@click.command()
@click.argument("snapshot")
@repository_options
@snapshot_options
@click.option("--ignore-errors", is_flag=True,
              help="On a damaged blob write zeros there, list the ranges and exit 1.")
def dump(snapshot: str, repo: RepositoryArgs, file_path: str | None,
         host: str | None, snapshot_path: str | None, ignore_errors: bool) -> None:
    """Write a snapshot's image to standard output.

    \b
    Example:
      blockera dump -r /srv/backup latest | qemu-img convert -O qcow2 /dev/stdin vm.qcow2
    """
    tune_malloc()
    from blockera.backup.restore import dump_to_stream

    if sys.stdout.isatty():
        raise UsageError("standard output is a terminal: redirect it to a file or a pipe")
    repository = open_repository(repo)
    try:
        with repository.lock():
            snap, where, layout = _layout_for(repository, snapshot, host, snapshot_path,
                                              file_path)
            result = dump_to_stream(repository, layout, sys.stdout.buffer,
                                    ignore_errors=ignore_errors,
                                    what=f"snapshot {snap.short_id} {where}")
    finally:
        repository.close()
    _report_damage(result, False, {})


# -- check --------------------------------------------------------------------------------------

@click.command()
@repository_options
@click.option("--read-data", is_flag=True, help="Also read and verify every blob of every pack.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def check(repo: RepositoryArgs, read_data: bool, as_json: bool) -> None:
    """Check the repository; name the snapshots and byte ranges any damage affects. Exit 0
    when sound, 1 on errors or damage.

    \b
    Example:
      blockera check -r /srv/backup --read-data
    """
    tune_malloc()
    from blockera.backup.check import check_repository
    from blockera.backup.locks import RepositoryLock

    repository = open_repository(repo)
    try:
        # a non-exclusive lock (no prune runs meanwhile); index files that cannot be read
        # are findings, not a reason to stop
        with RepositoryLock(repository):
            repository.load_index(skip_damaged=True)
            bar = _Bar("check", unit="B" if read_data else "packs")
            try:
                report = check_repository(repository, read_data=read_data,
                                          on_total=bar.total, on_progress=bar.update)
            finally:
                bar.close()
    finally:
        repository.close()
    if as_json:
        print_json(report.as_json())
    else:
        for note in report.notes:
            click.echo(f"note: {note}")
        for error in report.errors:
            click.echo(f"error: {error}")
        for d in report.damage:
            click.echo(f"damaged: {d.describe()}")
            for reason in d.reasons[:8]:
                click.echo(f"  {reason}")
        click.echo(f"checked {report.snapshots} snapshots, {report.index_files} index files, "
                   f"{report.packs} packs, {report.blobs} blobs: "
                   + ("no errors were found" if report.ok else
                      f"{len(report.errors)} errors, damage in "
                      f"{len({d.snapshot_id for d in report.damage})} snapshots"))
    if not report.ok:
        sys.exit(1)


# -- forget and prune ---------------------------------------------------------------------------

def prune_options(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--max-unused", default="5%", show_default=True, metavar="LIMIT",
                        help="Unused data to tolerate after pruning: a percentage of the used "
                             "data, a size (0: repack every partly used pack), or "
                             "'unlimited'.")(f)


def _prune_report(result, as_json: bool, dry_run: bool) -> dict[str, object]:  # type: ignore[no-untyped-def]
    doc = {**result.as_json(), "dry_run": dry_run}
    if not as_json:
        s = result.plan.summary()
        verb = "would " if dry_run else ""
        click.echo(f"prune: {s['snapshots']} snapshots use {s['used_blobs']} blobs "
                   f"({human_bytes(s['used_bytes'])}); unused {human_bytes(s['unused_bytes'])}")
        click.echo(f"  {verb}delete {s['packs_removed']} unused packs and "
                   f"{s['unindexed_packs']} packs no index lists, {verb}repack "
                   f"{s['packs_repacked']}, keep {s['packs_kept']}: {verb}free "
                   f"{human_bytes(s['bytes_freed'])}")
    return doc


@click.command()
@repository_options
@prune_options
@click.option("-n", "--dry-run", is_flag=True, help="Only say what would be done.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def prune(repo: RepositoryArgs, max_unused: str, dry_run: bool,
          as_json: bool) -> None:
    """Remove data no snapshot uses (under an exclusive lock).

    \b
    Example:
      blockera prune -r /srv/backup --max-unused 0
    """
    tune_malloc()
    from blockera.backup.prune import max_unused_rule, run_prune

    max_unused_rule(max_unused)
    repository = open_repository(repo)
    try:
        with repository.lock(exclusive=True) as lock:
            result = run_prune(repository, max_unused=max_unused, dry_run=dry_run,
                               check_lock=lock.check)
    finally:
        repository.close()
    doc = _prune_report(result, as_json, dry_run)
    if as_json:
        print_json(doc)


@click.command()
@click.argument("snapshot_ids", nargs=-1, metavar="[SNAPSHOT]...")
@repository_options
@click.option("--keep-last", "last", type=click.IntRange(0), default=0, metavar="N",
              help="Keep the N newest snapshots.")
@click.option("--keep-hourly", "hourly", type=click.IntRange(0), default=0, metavar="N",
              help="Keep the newest snapshot of each of the N newest hours.")
@click.option("--keep-daily", "daily", type=click.IntRange(0), default=0, metavar="N",
              help="... of each of the N newest days.")
@click.option("--keep-weekly", "weekly", type=click.IntRange(0), default=0, metavar="N",
              help="... of each of the N newest ISO weeks.")
@click.option("--keep-monthly", "monthly", type=click.IntRange(0), default=0, metavar="N",
              help="... of each of the N newest months.")
@click.option("--keep-yearly", "yearly", type=click.IntRange(0), default=0, metavar="N",
              help="... of each of the N newest years.")
@click.option("--group-by", default="host,paths", show_default=True, metavar="KEYS",
              help="Apply the policy to each group of host, paths and/or tags ('' for one "
                   "group).")
@click.option("--host", "hosts", multiple=True, metavar="HOST",
              help="Only consider snapshots from this host (repeatable).")
@click.option("--path", "paths", multiple=True, metavar="SOURCE",
              help="Only consider snapshots that include this path (repeatable).")
@click.option("--prune", "then_prune", is_flag=True,
              help="Then remove the data no snapshot uses any more (as `blockera prune`).")
@prune_options
@click.option("-n", "--dry-run", is_flag=True, help="Only say what would be removed.")
@click.option("--json", "as_json", is_flag=True, help="Print the groups as JSON.")
def forget(snapshot_ids: tuple[str, ...], repo: RepositoryArgs,
           last: int, hourly: int, daily: int, weekly: int, monthly: int, yearly: int,
           group_by: str, hosts: tuple[str, ...], paths: tuple[str, ...], then_prune: bool,
           max_unused: str, dry_run: bool, as_json: bool) -> None:
    """Remove snapshots by a retention policy (restic's rules, groups by host and paths), or
    the snapshots named.

    \b
    Example:
      blockera forget -r /srv/backup --keep-daily 7 --keep-weekly 5 --keep-monthly 12 --prune
    """
    from blockera.backup.device_layout import source_path
    from blockera.backup.forget import (KeepPolicy, parse_group_by, plan_forget,
                                        remove_snapshots)
    from blockera.backup.prune import max_unused_rule, run_prune

    policy = KeepPolicy(last, hourly, daily, weekly, monthly, yearly)
    keys = parse_group_by(group_by)
    max_unused_rule(max_unused)
    if policy.empty() and not snapshot_ids:
        raise UsageError("no policy given (--keep-last, --keep-daily, ...) and no snapshot "
                         "named: nothing would be removed")
    if snapshot_ids and not policy.empty():
        raise UsageError("give either snapshot IDs or a policy, not both")
    repository = open_repository(repo)
    prune_doc = None
    try:
        with repository.lock(exclusive=True) as lock:
            everything = repository.list_snapshots()
            if snapshot_ids:
                from blockera.backup.forget import ForgetGroup

                chosen = [repository.find_snapshot(ref) for ref in snapshot_ids]
                groups = [ForgetGroup(None, None, None, remove=chosen)]
            else:
                groups = plan_forget(everything, policy, group_by=keys, hosts=list(hosts),
                                     paths=[source_path(p) for p in paths])
            doomed = [s for g in groups for s in g.remove]
            if not dry_run:
                remove_snapshots(repository, doomed)
            if then_prune and doomed:
                result = run_prune(repository, max_unused=max_unused, dry_run=dry_run,
                                   check_lock=lock.check)
                prune_doc = _prune_report(result, as_json, dry_run)
    finally:
        repository.close()
    if as_json:
        print_json({"dry_run": dry_run, "groups": [g.as_json() for g in groups],
                    "removed": [s.id.hex() for s in doomed if s.id], "prune": prune_doc})
        return
    for g in groups:
        if g.hostname is not None or g.paths is not None:
            click.echo(f"group host {g.hostname!r}, paths {', '.join(g.paths or [])}:")
        for s in g.keep:
            click.echo(f"  keep   {s.short_id}  {s.time.format()}  "
                       f"({', '.join(g.reasons.get(s.id or b'', []))})")
        for s in g.remove:
            click.echo(f"  {'would remove' if dry_run else 'remove'} {s.short_id}  "
                       f"{s.time.format()}")
    click.echo(f"{'would remove' if dry_run else 'removed'} {len(doomed)} snapshots")


# -- mount --------------------------------------------------------------------------------------

@click.command()
@click.argument("snapshot")
@repository_options
@snapshot_options
@click.option("--unix", "unix_path", metavar="PATH", help="Serve NBD on this unix socket (0600).")
@click.option("--tcp", metavar="[HOST:]PORT",
              help="Serve NBD on TCP (host 127.0.0.1 unless given).")
@click.option("--allow-remote", is_flag=True,
              help="Allow a TCP address reachable from other hosts (NBD has no authentication).")
@click.option("--name", "export_name", default="", metavar="NAME",
              help="Export name (default: the file's name; the empty name works too).")
@click.option("--writable", is_flag=True,
              help="Accept writes into a copy-on-write overlay (never the repository).")
@click.option("--overlay", "overlay_dir", metavar="DIR",
              help="With --writable: keep the overlay in a sparse temporary file in DIR "
                   "(default: in memory).")
@click.option("--cache-size", default="64M", show_default=True, metavar="SIZE",
              help="Blobs kept in memory.")
def mount(snapshot: str, repo: RepositoryArgs, file_path: str | None,
          host: str | None, snapshot_path: str | None, unix_path: str | None, tcp: str | None,
          allow_remote: bool, export_name: str, writable: bool, overlay_dir: str | None,
          cache_size: str) -> None:
    """Export a snapshot's image over NBD until SIGTERM or Ctrl-C (read-only, or with a
    copy-on-write overlay), for qemu, nbdcopy, nbdfuse or the kernel's nbd client.

    \b
    Example:
      blockera mount -r /srv/backup latest --unix backup.sock &
      nbdinfo 'nbd+unix:///?socket=backup.sock'
    """
    tune_malloc()
    from blockera.backup.mount import OverlayDevice, SnapshotDevice, parse_tcp
    from blockera.nbd import Export, serve
    from blockera.units import parse_size_bytes

    if unix_path is None and tcp is None:
        raise UsageError("give --unix PATH and/or --tcp [HOST:]PORT")
    if overlay_dir and not writable:
        raise UsageError("--overlay goes with --writable")
    try:
        cache_bytes = parse_size_bytes(cache_size)
    except ValueError as exc:
        raise UsageError(f"--cache-size: {exc}") from None
    address = parse_tcp(tcp) if tcp else None
    repository = open_repository(repo)
    try:
        with repository.lock():
            snap, where, layout = _layout_for(repository, snapshot, host, snapshot_path,
                                              file_path)
            device = SnapshotDevice(repository, layout, name=f"snapshot {snap.short_id}",
                                    cache_bytes=cache_bytes)
            exported = OverlayDevice(device, overlay_dir) if writable else device
            name = export_name or where.rsplit("/", 1)[-1]
            server = serve({name: Export(exported, read_only=not writable,
                                         description=f"snapshot {snap.short_id} {where}")},
                           unix_path=unix_path, tcp=address, allow_remote=allow_remote,
                           default_export=name)
            stop = threading.Event()
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: stop.set())
            where_text = [f"nbd+unix:///{name}?socket={unix_path}"] if unix_path else []
            if server.tcp_address:
                where_text.append(f"nbd://{server.tcp_address[0]}:{server.tcp_address[1]}/"
                                  f"{name}")
            click.echo(f"blockera mount: serving snapshot {snap.short_id} {where} "
                       f"({'writable overlay' if writable else 'read-only'}) at "
                       f"{' and '.join(where_text)}", err=True)
            # wake up now and then: a signal delivered to another thread only runs its
            # handler once the main thread runs Python code again
            while not stop.wait(0.25):
                pass
            server.shutdown()
            exported.close()
    finally:
        repository.close()


COMMANDS = (init, backup, snapshots, restore, dump, check, forget, prune, mount)
