"""The era metadata device of a tracked device: sized with the exact calculator before anything
is touched, handed to the kernel as a block device (a loop device over an image file), and read
back to tell whether the tracking it holds is still the one recorded (docs/live-devices.md §2).
"""

from __future__ import annotations

import os
import stat
import subprocess
from dataclasses import dataclass

from blockera.blockdev import FileDevice
from blockera.errors import BlockeraError, DeviceError, MetadataError, NoSpaceError
from blockera.era.image import EraImage
from blockera.era.size import metadata_size
from blockera.live.state import TrackedDevice
from blockera.units import METADATA_BLOCK_BYTES


def check_size(path: str, size_sectors: int, block_sectors: int) -> int:
    """Refuse a metadata device too small for tracking with backups (a checkpoint and a held
    metadata snapshot); returns its size in 4 KiB blocks."""
    try:
        size = metadata_size(size_sectors, block_sectors)
    except ValueError as exc:
        raise NoSpaceError(str(exc)) from None
    with FileDevice(path, writable=False) as dev:
        blocks = dev.size_bytes // METADATA_BLOCK_BYTES
    needed = size.with_snapshot_blocks
    if needed is None or blocks < needed:
        want = size.recommended_blocks or needed
        raise NoSpaceError(
            f"{path}: metadata device too small: {blocks} blocks of 4 KiB; tracking "
            f"{size.origin_blocks} blocks of {block_sectors} sectors needs {needed} (with a "
            f"metadata snapshot held for backups; {want} recommended). Nothing was changed.")
    return blocks


def is_blank(path: str) -> bool:
    with FileDevice(path, writable=False) as dev:
        return dev.read(0, METADATA_BLOCK_BYTES) == bytes(METADATA_BLOCK_BYTES)


def wipe_superblock(path: str) -> None:
    """Zero block 0, so the era target formats fresh metadata when it loads."""
    with FileDevice(path, writable=True) as dev:
        dev.write(0, bytes(METADATA_BLOCK_BYTES))
        dev.flush()


@dataclass(frozen=True)
class MetadataFacts:
    """What the metadata on disk says (None fields: blank or unreadable metadata)."""

    current_era: int | None
    block_sectors: int | None
    nr_blocks: int | None
    problem: str | None


def read_facts(path: str) -> MetadataFacts:
    try:
        with FileDevice(path, writable=False, direct=_is_block_device(path)) as dev:
            if dev.read(0, METADATA_BLOCK_BYTES) == bytes(METADATA_BLOCK_BYTES):
                return MetadataFacts(None, None, None, "the metadata is blank (formatted anew)")
            image = EraImage(dev)
            return MetadataFacts(image.current_era, image.sb.data_block_size, image.nr_blocks,
                                 None)
    except BlockeraError as exc:
        return MetadataFacts(None, None, None, f"the metadata cannot be read ({exc})")


def _is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def kernel_metadata_device(path: str) -> str:
    """A block device for the kernel's era target: `path` itself, or a loop device over an
    image file (an existing one over the same file is reused)."""
    if _is_block_device(path):
        return path
    if not os.path.isfile(path):
        raise DeviceError(f"{path}: the metadata device must be a block device or an image file")
    found = subprocess.run(["losetup", "--noheadings", "--output", "NAME", "--associated",
                            os.path.abspath(path)], capture_output=True, text=True)
    if found.returncode == 0 and found.stdout.split():
        return found.stdout.split()[0]
    made = subprocess.run(["losetup", "--find", "--show", "--direct-io=on",
                           os.path.abspath(path)], capture_output=True, text=True)
    if made.returncode != 0:         # a filesystem without O_DIRECT (tmpfs): buffered
        made = subprocess.run(["losetup", "--find", "--show", os.path.abspath(path)],
                              capture_output=True, text=True)
    if made.returncode != 0:
        raise DeviceError(f"{path}: cannot attach a loop device for the metadata: "
                          f"{made.stderr.strip()}")
    return made.stdout.strip()


def release_kernel_metadata_device(path: str) -> None:
    """Detach the loop devices over an image file used as metadata (nothing for a block
    device)."""
    if _is_block_device(path) or not os.path.isfile(path):
        return
    found = subprocess.run(["losetup", "--noheadings", "--output", "NAME", "--associated",
                            os.path.abspath(path)], capture_output=True, text=True)
    for loop in found.stdout.split():
        subprocess.run(["losetup", "--detach", loop], capture_output=True)


def open_metadata(record: TrackedDevice) -> FileDevice:
    """The metadata of a tracked device for reading while it is live (O_DIRECT through the
    kernel's block device: the era target writes it with bios)."""
    if record.engine == "kernel":
        return FileDevice(kernel_metadata_device(record.metadata), writable=False, direct=True)
    return FileDevice(record.metadata, writable=False)


def check_matches(facts: MetadataFacts, block_sectors: int) -> None:
    if facts.block_sectors is not None and facts.block_sectors != block_sectors:
        raise MetadataError(f"the metadata tracks blocks of {facts.block_sectors} sectors, not "
                            f"{block_sectors}: is it another device's metadata?")
