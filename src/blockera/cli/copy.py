"""`blockera copy --from-repo A -r B [SNAPSHOT]...`: copy snapshots between repositories
(docs/backup-repository.md §22; the work is in `blockera.backup.copy`).

The target is -r/--repo (or BLOCKERA_REPOSITORY) with its password as for every command; the
source is --from-repo (or BLOCKERA_FROM_REPOSITORY) with --from-password-file,
BLOCKERA_FROM_PASSWORD_FILE or BLOCKERA_FROM_PASSWORD (restic 0.14's spelling). The S3 options
apply to both.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import click

from blockera.cli.backup import (RepositoryArgs, _Bar, human_bytes, print_json, read_password,
                                 repository_options, tune_malloc)
from blockera.errors import UsageError

FROM_REPOSITORY_ENV = "BLOCKERA_FROM_REPOSITORY"
FROM_PASSWORD_ENV = "BLOCKERA_FROM_PASSWORD"
FROM_PASSWORD_FILE_ENV = "BLOCKERA_FROM_PASSWORD_FILE"
COPY_THREADS = max(2, min(8, 2 * (os.cpu_count() or 1)))


def read_from_password(password_file: str | None) -> str:
    return read_password(password_file, option="--from-password-file", env=FROM_PASSWORD_ENV,
                         file_env=FROM_PASSWORD_FILE_ENV, which="source repository")


def _open_both(source: RepositoryArgs, target: RepositoryArgs, from_password: str,
               password: str):  # type: ignore[no-untyped-def]
    """Both repositories, their keys derived at once (scrypt, two threads). Opening writes
    nothing, so a wrong password leaves both untouched."""
    from blockera.backup.backend import FileType
    from blockera.backup.counting import CountingBackend
    from blockera.backup.errors import NotARepositoryError, WrongPasswordError
    from blockera.backup.keys import open_master_key
    from blockera.backup.repository import Repository

    backends = {"source": source.backend(), "target": CountingBackend(target.backend())}
    for role, backend in backends.items():
        if not backend.exists(FileType.CONFIG, ""):
            raise NotARepositoryError(f"{role} {backend.location}: not a repository (there is "
                                      "no config file)")
    keys: dict[str, Any] = {}

    def derive(role: str, pw: str) -> None:
        try:
            keys[role] = open_master_key(backends[role], pw)
        except BaseException as exc:  # handed to the caller
            keys[role] = exc

    workers = [threading.Thread(target=derive, args=(role, pw), daemon=True)
               for role, pw in (("source", from_password), ("target", password))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for role in ("source", "target"):
        if isinstance(keys[role], WrongPasswordError):
            option = "--from-repo" if role == "source" else "-r/--repo"
            raise WrongPasswordError(f"{role} repository ({option}) {keys[role]}")
        if isinstance(keys[role], BaseException):
            raise keys[role]
    opened = []
    try:
        for role, threads in (("source", 0), ("target", None)):
            opened.append(Repository.open_with_key(backends[role], *keys[role],
                                                   threads=threads))
    except BaseException:
        for r in opened:
            r.close()
        raise
    return opened[0], opened[1]


@click.command()
@click.argument("snapshot_refs", nargs=-1, metavar="[SNAPSHOT]...")
@repository_options
@click.option("--from-repo", "from_repo", envvar=FROM_REPOSITORY_ENV, metavar="LOCATION",
              help=f"The source repository (or ${FROM_REPOSITORY_ENV}).")
@click.option("--from-password-file", envvar=FROM_PASSWORD_FILE_ENV, metavar="FILE",
              type=click.Path(dir_okay=False),
              help=f"The source's password from FILE (or ${FROM_PASSWORD_FILE_ENV}; else "
                   f"${FROM_PASSWORD_ENV}).")
@click.option("--host", metavar="HOST", help="Only snapshots from this host.")
@click.option("--path", "source_path_", metavar="SOURCE",
              help="Only snapshots of this source path.")
@click.option("-n", "--dry-run", is_flag=True,
              help="Only say what would be copied; write nothing to the target.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def copy(snapshot_refs: tuple[str, ...], repo: RepositoryArgs, from_repo: str | None,
         from_password_file: str | None, host: str | None, source_path_: str | None,
         dry_run: bool, as_json: bool) -> None:
    """Copy snapshots (all, or those named: IDs or `latest`) from --from-repo to the
    repository -r. Only the blobs the target lacks are transferred, re-encrypted for the
    target; snapshots copied before are skipped.

    \b
    Example:
      blockera copy --from-repo /srv/backup -r s3:https://s3.example.com/backups/vm1
    """
    tune_malloc()
    from blockera.backup.copy import CopyResult, plan_copy, run_copy
    from blockera.backup.device_layout import source_path

    if not from_repo:
        raise UsageError(f"no source repository: give --from-repo LOCATION or set "
                         f"{FROM_REPOSITORY_ENV}")
    source_args = RepositoryArgs(from_repo, from_password_file, repo.connections, repo.cacert,
                                 repo.limit_upload_kib, repo.limit_download_kib)
    from_password = read_from_password(from_password_file)
    password = read_password(repo.password_file)
    source, target = _open_both(source_args, repo, from_password, password)
    try:
        with source.lock():
            paths = [source_path(source_path_)] if source_path_ else None
            listed = [s for s in source.list_snapshots()
                      if (host is None or s.hostname == host)
                      and (paths is None or sorted(s.paths) == paths)]
            if snapshot_refs:
                chosen = {}
                for ref in snapshot_refs:
                    s = source.find_snapshot(ref, hostname=host, paths=paths)
                    chosen[s.id] = s
                listed = list(chosen.values())
            if dry_run:
                target.load_index()  # reading only: no lock on the target
                result = CopyResult(plan_copy(source, target, listed), dry_run=True)
            else:
                with target.lock():
                    plan = plan_copy(source, target, listed)
                    bar = _Bar("copy")
                    bar.total(plan.data_bytes)

                    def done(item) -> None:  # type: ignore[no-untyped-def]
                        if as_json:
                            return
                        src = item.snapshot.short_id
                        if item.existing is not None:
                            click.echo(f"skipping snapshot {src}: already copied to "
                                       f"{item.existing.short_id}", err=True)
                        else:
                            click.echo(f"snapshot {src} copied to {item.copy_id.hex()[:8]}: "
                                       f"{len(item.data)} data blobs "
                                       f"({human_bytes(item.data_bytes)}), {len(item.trees)} "
                                       "trees", err=True)
                    try:
                        result = run_copy(source, target, plan, threads=COPY_THREADS,
                                          on_progress=bar.update, on_snapshot=done)
                    finally:
                        bar.close()
                    result.bytes_stored = target.backend.stored_bytes()
    finally:
        source.close()
        target.close()
    if as_json:
        print_json(result.as_json())
        return
    doc = result.as_json()
    verb = "would copy" if dry_run else "copied"
    plural = "" if doc["copied"] == 1 else "s"
    click.echo(f"{verb} {doc['copied']} snapshot{plural} ({doc['data_blobs']} data blobs, "
               f"{human_bytes(doc['data_bytes'])}; {doc['tree_blobs']} trees), skipped "
               f"{doc['skipped']} already in {target.location}"
               + ("" if dry_run else f"; stored {human_bytes(doc['bytes_stored'] or 0)} in "
                  f"{doc['duration_s']:.2f} s"))

