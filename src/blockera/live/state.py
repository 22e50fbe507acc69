"""The state directory: one JSON record per tracked device, saying how its stack was built (so
`activate` rebuilds it identically after a reboot) and what was done with it since (marks, the
era of the last backup per repository and of the last replication round per mirror).

Records are written to a temporary file, fsynced and renamed, so a crash leaves the old record
or the new one. See docs/live-devices.md §1.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from blockera.errors import BlockeraError, UsageError

DEFAULT_STATE_DIR = Path("/var/lib/blockera")
FORMAT_VERSION = 1
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,100}\Z")


class StateError(BlockeraError):
    """A state record is missing, damaged or does not match the device."""

    exit_code = 1


class BusyError(BlockeraError):
    """Another blockera job is working on the same tracked device."""

    errno_name = "EBUSY"


@dataclass
class TrackedDevice:
    """How one device is tracked. `kind` is "dm" (an existing device-mapper device whose table
    moved to NAME-real) or "plain" (a block device or image file under a new NAME-real);
    `engine` is "kernel" or "userspace" (the engine daemon at `socket`)."""

    name: str
    kind: str
    engine: str
    size_sectors: int
    block_sectors: int
    metadata: str
    source: str | None = None           # the block device or image file of a plain device
    socket: str | None = None
    original_table: str | None = None   # a dm device's table before it was tracked
    tracked_since: float = field(default_factory=time.time)
    era_at_track: int = 0
    # Each consumer's starting point: {"epoch": E, "era": N} means "every block written since
    # era N of tracking epoch E". The epoch grows whenever tracking may have missed a write
    # (metadata replaced or reformatted, era numbering gone backwards, the device used before
    # the stack was rebuilt); a consumer of an older epoch must read everything once.
    marks: dict[str, dict[str, int | str]] = field(default_factory=dict)
    backups: dict[str, dict[str, int | str]] = field(default_factory=dict)
    mirrors: dict[str, dict[str, int | str]] = field(default_factory=dict)
    epoch: int = 1
    lost: list[str] = field(default_factory=list)     # why each epoch began
    highest_era_seen: int = 0
    boot_id: str = ""
    version: int = FORMAT_VERSION

    @property
    def real_name(self) -> str:
        return f"{self.name}-real"

    @property
    def origin_name(self) -> str:
        """The snapshot-origin put between the era layer and -real during a frozen view."""
        return f"{self.name}-origin"

    @property
    def snapshot_name(self) -> str:
        return f"{self.name}-snap"

    def note_era(self, era: int) -> None:
        self.highest_era_seen = max(self.highest_era_seen, era)

    def new_epoch(self, reason: str) -> None:
        """Tracking may have missed writes: every consumer starts over with a full read."""
        self.epoch += 1
        self.lost.append(f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {reason}")
        self.highest_era_seen = 0

    def starting_era(self, point: dict[str, int | str] | None) -> int | None:
        """The era to list changes from for a consumer at `point`, or None: read everything."""
        if point is None or point.get("epoch") != self.epoch:
            return None
        return int(point["era"])


def check_name(name: str) -> str:
    if not _NAME_RE.match(name) or name.endswith(("-real", "-origin", "-snap")):
        raise UsageError(f"{name!r} cannot name a tracked device: use letters, digits and "
                         "_.+- (not ending in -real, -origin or -snap, which blockera uses)")
    return name


class StateDir:
    """The records of a state directory (`devices/NAME.json`)."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else DEFAULT_STATE_DIR
        self.devices = self.path / "devices"

    def _file(self, name: str) -> Path:
        return self.devices / f"{check_name(name)}.json"

    def exists(self, name: str) -> bool:
        return self._file(name).exists()

    def load(self, name: str) -> TrackedDevice:
        path = self._file(name)
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise StateError(f"{name} is not tracked (no record in {self.devices}); track it "
                             "with 'blockera track'") from None
        except (OSError, ValueError) as exc:
            raise StateError(f"{path}: unreadable state record ({exc})") from None
        if not isinstance(doc, dict) or doc.get("version") != FORMAT_VERSION:
            raise StateError(f"{path}: not a state record of this version of blockera")
        try:
            return TrackedDevice(**doc)
        except TypeError as exc:
            raise StateError(f"{path}: damaged state record ({exc})") from None

    def save(self, record: TrackedDevice) -> None:
        self.devices.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self._file(record.name)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        data = json.dumps(asdict(record), indent=2, sort_keys=True).encode() + b"\n"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dir_fd = os.open(self.devices, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def delete(self, name: str) -> None:
        self._file(name).unlink(missing_ok=True)

    @contextlib.contextmanager
    def locked(self, name: str) -> Iterator[None]:
        """Hold the device's job lock: one backup, replication round, mark or invalidation of a
        device at a time (the era target holds one metadata snapshot)."""
        self.devices.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.devices / f"{check_name(name)}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise BusyError(f"another blockera job is working on {name} (backup, "
                                "replication, mark or invalidation): try again when it is "
                                "done") from None
            yield
        finally:
            os.close(fd)

    def tracked_name(self, device: str) -> str | None:
        """The name of the tracked device `device` opens (/dev/mapper/NAME, or a kernel node
        such as /dev/vg/lv or /dev/dm-3 whose device-mapper name is NAME), or None."""
        names = [device.rsplit("/", 1)[-1]] if device.startswith("/dev/mapper/") else []
        real = os.path.realpath(device)
        if real.startswith("/dev/dm-"):
            try:
                names.append(Path(f"/sys/block/{real[5:]}/dm/name").read_text().strip())
            except OSError:
                pass
        for name in names:
            try:
                if self.exists(name):
                    return name
            except UsageError:      # not a name blockera tracks under
                continue
        return None

    def names(self) -> list[str]:
        if not self.devices.is_dir():
            return []
        return sorted(p.stem for p in self.devices.glob("*.json"))
