"""The kernel's device-mapper, driven through `dmsetup`, behind the same interface as the
userspace `Engine`: create, load, suspend, resume, remove, clear, rename, message, status,
table, info, ls, mknodes, settle, and `device(name)` for I/O on /dev/mapper/NAME.

dmsetup reports only an errno ("reload ioctl on era failed: Invalid argument"); the reason the
target gave (its `ti->error`, or a DMERR line) is in the kernel log, so after a failure the new
device-mapper lines of the log are read and the reason is attached to the exception, which has
the same class as the userspace engine would raise (TableError for a rejected table,
TargetError for a refused message, DeviceMapperError otherwise).

See docs/engine.md §4.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

from blockera.blockdev import FileDevice
from blockera.errors import BlockeraError, DeviceMapperError, TableError, TargetError

_ERRNO = {"Invalid argument": "EINVAL", "Device or resource busy": "EBUSY",
          "No space left on device": "ENOSPC", "No such device or address": "ENXIO",
          "Input/output error": "EIO", "File exists": "EEXIST", "Operation not permitted": "EPERM",
          "No such device": "ENODEV", "Read-only file system": "EROFS"}
# "device-mapper: reload ioctl on era  failed: Invalid argument" (newer dmsetup versions
# put the device number in: "... on era (253:0) failed: ...")
_FAILED_RE = re.compile(r"(\w+) ioctl on (\S*)(?: \(\d+:\d+\))?\s+failed: (.+)$", re.M)
# Time the kernel's era worker needs per era block to digest an archived writeset (measured
# under qemu TCG: 262144 blocks in about 0.4 s), with a wide margin.
_DIGEST_SECONDS_PER_BLOCK = 4e-6
_SETTLE_SECONDS = 0.02
# After a checkpoint (which archives a writeset for the worker to digest) the waits are longer:
# a guest sharing a loaded host's CPU can fall behind the measured rate. Digestion starts only
# with the worker's next pass, i.e. with whatever the caller does after the checkpoint (a write,
# another message), so the two waits that follow a checkpoint both get the margin.
_SETTLE_AFTER_CHECKPOINT_SECONDS = 0.25
_SETTLES_AFTER_CHECKPOINT = 2


class KernelEngine:
    """Device-mapper through `dmsetup` (needs root and the dm modules)."""

    def __init__(self, dmsetup: str = "dmsetup", udev: bool = False) -> None:
        self.dmsetup = dmsetup
        self.env = dict(os.environ)
        if not udev:
            self.env["DM_DISABLE_UDEV"] = "1"   # libdevmapper then makes /dev/mapper nodes
        self._era_blocks: dict[str, int] = {}    # era blocks of the tables loaded, per device
        self._digest_settles = 0                 # settles still to wait for a digestion

    def _note_table(self, name: str, table: str | None) -> None:
        """Remember how many era blocks the device's tables have (for `settle`)."""
        blocks = self._era_blocks.get(name, 0)
        for line in (table or "").replace(";", "\n").splitlines():
            words = line.split()
            if len(words) == 6 and words[2] == "era" and words[5].isdigit() and words[1].isdigit():
                blocks = max(blocks, -(-int(words[1]) // max(1, int(words[5]))))
        self._era_blocks[name] = blocks

    # -- plumbing ---------------------------------------------------------------------------------
    def _run(self, args: list[str], *, stdin: str | None = None,
             error_class: type[BlockeraError] = DeviceMapperError) -> str:
        with _KernelLog() as kernel_log:
            r = subprocess.run([self.dmsetup, *args], input=stdin, capture_output=True,
                               text=True, env=self.env)
            if r.returncode == 0:
                return r.stdout
            logged = kernel_log.new_lines()
        match = _FAILED_RE.search(r.stderr)
        errno_text = match.group(3).strip() if match else ""
        if match and match.group(1) == "create":
            error_class = DeviceMapperError   # the device itself, not its table
        errno_name = _ERRNO.get(errno_text, "EIO" if errno_text else "EINVAL")
        reasons = [line.split("device-mapper: ", 1)[1] for line in logged
                   if "device-mapper: " in line]
        stderr_lines = r.stderr.strip().splitlines()
        detail = "; ".join(reasons) or (stderr_lines[0] if stderr_lines else "dmsetup failed")
        if not match and "not found" in r.stderr.lower():
            errno_name = "ENXIO"
        raise error_class(f"{errno_text or 'failed'}: {detail}", errno_name=errno_name)

    # -- control ---------------------------------------------------------------------------------
    def create(self, name: str, table: str | None = None, *, uuid: str = "",
               read_only: bool = False) -> None:
        args = ["create", name]
        if uuid:
            args += ["-u", uuid]
        if read_only:
            args.append("--readonly")
        if table is None:
            args.append("--notable")
        self._run(args, stdin=table, error_class=TableError if table else DeviceMapperError)
        self._note_table(name, table)

    def load(self, name: str, table: str) -> None:
        self._run(["load", name], stdin=table, error_class=TableError)
        self._note_table(name, table)

    def clear(self, name: str) -> None:
        self._run(["clear", name])

    def suspend(self, name: str) -> None:
        self._run(["suspend", name])

    def resume(self, name: str) -> None:
        self._run(["resume", name], error_class=TargetError)

    def remove(self, name: str) -> None:
        self._run(["remove", name])
        self._era_blocks.pop(name, None)

    def rename(self, name: str, new_name: str) -> None:
        self._run(["rename", name, new_name])
        self.mknodes()

    def message(self, name: str, sector: int, args: list[str]) -> str:
        if args and args[0] in ("checkpoint", "take_metadata_snap"):   # both archive
            self._digest_settles = _SETTLES_AFTER_CHECKPOINT
        return self._run(["message", name, str(sector), *args], error_class=TargetError).strip()

    def status(self, name: str | None = None) -> str:
        return self._run(["status"] + ([name] if name else []))

    def table(self, name: str | None = None) -> str:
        return self._run(["table"] + ([name] if name else []))

    def info(self, name: str | None = None) -> str:
        return self._run(["info"] + ([name] if name else []))

    def ls(self) -> str:
        return self._run(["ls"])

    def mknodes(self) -> None:
        self._run(["mknodes"])

    def settle(self, name: str | None = None) -> None:
        """The kernel's workers run on their own and report no progress (a status call would
        itself commit the era metadata): wait as long as the era worker can need to digest a
        whole writeset of the largest era device this engine loaded, or a moment."""
        budget = _SETTLE_SECONDS + max(self._era_blocks.values(), default=0) \
            * _DIGEST_SECONDS_PER_BLOCK
        if self._digest_settles:    # a writeset archived since: more margin
            self._digest_settles -= 1
            budget = max(budget + _SETTLE_AFTER_CHECKPOINT_SECONDS, 2 * budget)
        time.sleep(budget)

    def dev_t(self, name: str) -> str:
        """MAJ:MIN of a device (as the kernel prints it in tables)."""
        for line in self.info(name).splitlines():
            if line.startswith("Major, minor:"):
                major, minor = line.split(":", 1)[1].split(",")
                return f"{int(major)}:{int(minor)}"
        raise DeviceMapperError(f"{name}: no device number in dmsetup info")

    # -- I/O ---------------------------------------------------------------------------------------
    def device(self, name: str) -> FileDevice:
        """/dev/mapper/NAME opened with O_DIRECT (the page cache of a dm device is not shared
        with the devices under it)."""
        path = Path("/dev/mapper") / name
        if not path.exists():
            self.mknodes()
        return FileDevice(path, writable=True, direct=True)


class _KernelLog:
    """New kernel log lines while a command runs, read from /dev/kmsg (positioned at its end
    when entered), falling back to comparing `dmesg` output before and after."""

    def __enter__(self) -> "_KernelLog":
        self._fd: int | None = None
        self._before = 0
        try:
            self._fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
            os.lseek(self._fd, 0, os.SEEK_END)
        except OSError:
            self._fd = None
            self._before = len(_dmesg())
        return self

    def new_lines(self) -> list[str]:
        if self._fd is None:
            return _dmesg()[self._before:]
        lines = []
        while True:
            try:
                record = os.read(self._fd, 8192)
            except BlockingIOError:
                return lines
            except OSError:          # a record overwritten while we read: skip it
                continue
            if not record:
                return lines
            # "<prio>,<seq>,<usec>,<flags>;<message>\n" plus continuation lines
            text = record.decode(errors="replace").split(";", 1)[-1]
            lines.append(text.split("\n", 1)[0])

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)


def _dmesg() -> list[str]:
    r = subprocess.run(["dmesg"], capture_output=True, text=True)
    return r.stdout.splitlines() if r.returncode == 0 else []

