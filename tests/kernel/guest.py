"""Run shell scripts inside a real Linux kernel booted under qemu.

The real device-mapper ``era`` and ``snapshot`` targets are the reference the
userspace engine is compared against.  This module boots Debian's stock
``linux-image-amd64`` kernel under qemu (TCG, no KVM needed) with a tiny
initramfs whose ``/init``:

1. loads the virtio, 9p and device-mapper modules (dependency order resolved
   on the host from ``modules.dep``),
2. mounts the host's root filesystem read-only over 9p and a per-run host
   folder (the *share*) read-write over a second 9p export,
3. mounts proc/sys/devtmpfs/tmpfs on top of the read-only host root and
   chroots into it, so the test script uses the host's own ``dmsetup``,
   ``era_dump``, python interpreter and installed packages,
4. runs the script with ``/bin/sh -e`` (stdout/stderr go to files in the
   share), records its exit code in the share, syncs and powers off.

Raw image files given by the caller are attached as virtio disks
(``/dev/vda``, ``/dev/vdb``, ...) in order.  The kernel package, the kernel
image and the initramfs are cached (see :func:`default_cache_dir`); the
initramfs file name carries a hash of everything it is built from, so it is
rebuilt only when those inputs change.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import lzma
import os
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

QEMU = "qemu-system-x86_64"
KERNEL_META_PACKAGE = "linux-image-amd64"

#: Guest path at which the per-run share folder is mounted (also ``$SHARE``).
GUEST_SHARE = "/tmp/share"

SCRIPT_NAME = "guest-script.sh"
ENV_NAME = "guest-env.sh"
DISK_COUNT_NAME = "guest-disk-count"
STDOUT_NAME = "guest-stdout.txt"
STDERR_NAME = "guest-stderr.txt"
EXIT_CODE_NAME = "guest-exit-code"
CONSOLE_NAME = "guest-console.log"
QEMU_LOG_NAME = "guest-qemu.log"
HARNESS_FILES = (SCRIPT_NAME, ENV_NAME, DISK_COUNT_NAME, STDOUT_NAME, STDERR_NAME,
                 EXIT_CODE_NAME, CONSOLE_NAME, QEMU_LOG_NAME)

#: Modules the guest needs; their dependencies are added from ``modules.dep``.
#: The guest cannot load modules on demand (the host's ``/lib/modules`` is not
#: for this kernel), so every device-mapper target a test uses must be listed.
#: ``crc32c_generic`` provides the crc32c algorithm ``libcrc32c`` looks up at
#: load time (a soft dependency that ``modules.dep`` does not record).
GUEST_MODULES = (
    "virtio_pci",
    "virtio_blk",
    "9pnet_virtio",
    "9p",
    "crc32c_generic",
    "libcrc32c",
    "dm-mod",
    "dm-bufio",
    "dm-persistent-data",
    "dm-era",
    "dm-snapshot",
    "dm-zero",
    "dm-cache",
    "dm-cache-smq",
    "dm-flakey",
    "dm-delay",
    "loop",
    "overlay",
    "ext4",
)

#: 9p payload size: the largest the kernel's virtio transport accepts.
NINEP_MSIZE = 512000
MAX_DISKS = 20
DISK_SERIAL_PREFIX = "blockera-disk"
SYNC_WAIT_TENTHS = 100
KERNEL_CMDLINE = "console=ttyS0 panic=-1 oops=panic loglevel=7"
ASSET_FORMAT_VERSION = "1"

INIT_TEMPLATE = r"""#!/bin/busybox sh
# PID 1 of the test guest: load modules, chroot into the host root, run the
# test script, record its exit code, power off.
/bin/busybox mkdir -p /bin /proc /sys /dev /host
/bin/busybox --install -s /bin
export PATH=/bin

say() { echo "guest-init: $*"; }
die() {
    say "FATAL: $*"
    poweroff -f -n
    echo o > /proc/sysrq-trigger
    sleep 1000000
}

mount -t proc proc /proc || die "cannot mount /proc"
mount -t sysfs sysfs /sys || die "cannot mount /sys"
mount -t devtmpfs devtmpfs /dev || die "cannot mount /dev"

while read -r name file; do
    if [ -e "/sys/module/$name" ]; then
        say "module $name already present"
        continue
    fi
    insmod "/modules/$file" || die "insmod $file failed"
done < /modules/order

OPTS="trans=virtio,version=9p2000.L,msize=@MSIZE@"
mkdir -p /lower /rw
mount -t 9p -o "ro,$OPTS,cache=loose" hostroot /lower \
    || die "cannot mount the host root (9p tag hostroot)"
mount -t tmpfs -o mode=755 tmpfs /rw || die "cannot mount the overlay's tmpfs"
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /host \
    || die "cannot mount the overlay over the host root"
for d in proc sys dev tmp run; do
    [ -d "/host/$d" ] || die "the host root has no /$d directory to mount over"
done
mount -t proc proc /host/proc || die "cannot mount proc in the host root"
mount -t sysfs sysfs /host/sys || die "cannot mount sysfs in the host root"
mount -t devtmpfs devtmpfs /host/dev || die "cannot mount devtmpfs in the host root"
mkdir -p /host/dev/shm
mount -t tmpfs -o mode=1777 tmpfs /host/dev/shm || die "cannot mount /dev/shm"
for l in fd:/proc/self/fd stdin:/proc/self/fd/0 stdout:/proc/self/fd/1 stderr:/proc/self/fd/2; do
    [ -e "/host/dev/${l%%:*}" ] || ln -s "${l#*:}" "/host/dev/${l%%:*}"
done
mount -t tmpfs -o mode=755 tmpfs /host/run || die "cannot mount /run"
SHARE_IN=/host@SHARE@
mkdir -p "$SHARE_IN"
mount -t 9p -o "$OPTS,cache=none" share "$SHARE_IN" \
    || die "cannot mount the share (9p tag share)"

DISKS=$(cat "$SHARE_IN/@DISKS@") || die "no disk count in the share"
i=0
for letter in a b c d e f g h i j k l m n o p q r s t; do
    [ "$i" -lt "$DISKS" ] || break
    n=0
    while [ ! -e "/sys/block/vd$letter/serial" ]; do
        n=$((n + 1))
        [ "$n" -le 100 ] || die "disk /dev/vd$letter did not appear"
        sleep 0.1
    done
    serial=$(cat "/sys/block/vd$letter/serial")
    [ "$serial" = "@SERIAL@$i" ] \
        || die "/dev/vd$letter has serial '$serial', expected '@SERIAL@$i'"
    i=$((i + 1))
done

say "running the test script"
env -i HOME=/tmp SHARE=@SHARE@ TERM=dumb chroot /host /bin/sh -c \
    '. "$SHARE/@ENV@" && cd "$SHARE" && exec /bin/sh -e "$SHARE/@SCRIPT@"' \
    < /dev/null > "$SHARE_IN/@STDOUT@" 2> "$SHARE_IN/@STDERR@"
rc=$?
echo "$rc" > "$SHARE_IN/@EXIT@.tmp" && mv "$SHARE_IN/@EXIT@.tmp" "$SHARE_IN/@EXIT@"
say "test script exited with status $rc"

sync &
spid=$!
n=0
while [ -e "/proc/$spid/stat" ]; do
    read -r _ _ state _ < "/proc/$spid/stat" || break
    [ "$state" != Z ] || break
    n=$((n + 1))
    if [ "$n" -gt @SYNC_WAIT@ ]; then
        say "sync did not finish (is a device left suspended?); powering off anyway"
        break
    fi
    sleep 0.1
done
say "powering off"
poweroff -f -n
"""


class GuestError(RuntimeError):
    """Base class of the harness errors."""


class AssetError(GuestError):
    """The kernel, its modules or the initramfs could not be prepared."""


class GuestBootError(GuestError):
    """qemu exited without the guest having run the script to completion."""


class GuestTimeout(GuestError):
    """The guest did not power off in time and qemu was killed.

    The partial script output and the console log are attached so that a test
    that expects a hang can inspect them.
    """

    def __init__(self, message: str, stdout: str, stderr: str, console_log: Path) -> None:
        super().__init__(message)
        self.stdout = stdout
        self.stderr = stderr
        self.console_log = console_log


class ScriptFailed(GuestError):
    """The guest script exited with a non-zero status (raised by ``check``)."""


@dataclass(frozen=True)
class KernelAssets:
    """Everything qemu needs to boot the test guest."""

    kernel_version: str
    kernel_image: Path
    initramfs: Path
    modules: tuple[str, ...]


@dataclass(frozen=True)
class GuestResult:
    """Outcome of one guest run."""

    returncode: int
    stdout: str
    stderr: str
    console_log: Path
    duration_s: float

    def console_text(self) -> str:
        return read_text(self.console_log)

    def check(self) -> GuestResult:
        """Return ``self`` if the script succeeded, else raise :class:`ScriptFailed`."""
        if self.returncode != 0:
            raise ScriptFailed(
                f"guest script exited with status {self.returncode}\n"
                f"--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}\n"
                f"--- console log: {self.console_log} (tail) ---\n"
                f"{tail(self.console_text())}")
        return self


# ---------------------------------------------------------------------------
# small helpers


def read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def find_program(name: str) -> str | None:
    """Locate ``name`` in ``PATH`` or the sbin directories (absent from some users' PATH)."""
    found = shutil.which(name)
    if found:
        return found
    extra = os.pathsep.join(("/usr/local/sbin", "/usr/sbin", "/sbin"))
    return shutil.which(name, path=extra)


def is_static_elf(path: Path) -> bool:
    """True if ``path`` is a 64-bit ELF executable without a program interpreter."""
    with open(path, "rb") as f:
        header = f.read(64)
        if len(header) < 64 or header[:4] != b"\x7fELF" or header[4] != 2:
            return False
        phoff, = struct.unpack_from("<Q", header, 32)
        phentsize, phnum = struct.unpack_from("<HH", header, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    pt_interp = 3
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != pt_interp
               for i in range(phnum))


def find_busybox() -> Path | None:
    """Return a statically linked busybox, or None."""
    candidates = [shutil.which("busybox"), "/bin/busybox", "/usr/bin/busybox"]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and is_static_elf(Path(candidate)):
            return Path(candidate)
    return None


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def default_cache_dir() -> Path:
    """``$BLOCKERA_KERNEL_CACHE`` if set, else ``<repo>/.cache/kernel``."""
    override = os.environ.get("BLOCKERA_KERNEL_CACHE")
    return Path(override) if override else repo_root() / ".cache" / "kernel"


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock, shared by concurrent test processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_checked(argv: Sequence[str], what: str, cwd: Path | None = None,
                timeout: float = 600) -> str:
    """Run a host command, raising :class:`AssetError` with its output on failure."""
    try:
        proc = subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True,
                              timeout=timeout)
    except FileNotFoundError as exc:
        raise AssetError(f"{what}: {argv[0]} not found") from exc
    except subprocess.TimeoutExpired as exc:
        raise AssetError(f"{what}: {' '.join(argv)} timed out after {timeout} s") from exc
    if proc.returncode != 0:
        raise AssetError(f"{what}: {' '.join(argv)} exited with {proc.returncode}\n"
                         f"{proc.stdout}{proc.stderr}")
    return proc.stdout


# ---------------------------------------------------------------------------
# availability


def guest_available() -> tuple[bool, str]:
    """Tell whether the guest can be booted on this host, and if not, why."""
    missing = []
    if not find_program(QEMU):
        missing.append(f"{QEMU} (Debian package qemu-system-x86)")
    if find_busybox() is None:
        missing.append("a statically linked busybox (Debian package busybox-static)")
    if not find_program("depmod"):
        missing.append("depmod (Debian package kmod)")
    if not find_program("dmsetup"):
        missing.append("dmsetup (Debian package dmsetup)")
    if not cached_kernels(default_cache_dir()):
        for tool in ("apt-get", "apt-cache", "dpkg-deb"):
            if not find_program(tool):
                missing.append(f"{tool} (needed to fetch the Debian kernel package)")
    if missing:
        return False, "kernel guest unavailable, missing: " + "; ".join(missing)
    return True, "qemu, busybox-static, kmod and dmsetup are available"


# ---------------------------------------------------------------------------
# kernel package


def cached_kernels(cache_dir: Path) -> list[str]:
    """Kernel versions whose package is already in the cache, oldest first."""
    prefix = "linux-image-"
    found = [p.name[len(prefix):].split("_", 1)[0]
             for p in cache_dir.glob(f"{prefix}*.deb")]
    return sorted(set(found), key=version_key)


def version_key(version: str) -> list[tuple[int, int | str]]:
    """Sort key ordering ``6.1.0-9`` before ``6.1.0-10``."""
    return [(0, int(part)) if part.isdigit() else (1, part)
            for part in re.split(r"[.-]", version)]


def resolve_kernel_version(cache_dir: Path) -> str:
    """Kernel version to use, e.g. ``6.1.0-50-amd64``.

    ``$BLOCKERA_KERNEL_VERSION`` pins it; otherwise it is the version the
    ``linux-image-amd64`` meta-package depends on, or, without apt, the
    newest kernel already in the cache.
    """
    pinned = os.environ.get("BLOCKERA_KERNEL_VERSION")
    if pinned:
        return pinned
    if find_program("apt-cache"):
        out = run_checked([find_program("apt-cache") or "apt-cache", "depends",
                           KERNEL_META_PACKAGE], "resolving the kernel version")
        match = re.search(r"Depends:\s*linux-image-(\S+)", out)
        if match:
            return match.group(1)
    cached = cached_kernels(cache_dir)
    if cached:
        return cached[-1]
    raise AssetError(
        f"cannot tell which kernel to use: apt-cache does not know {KERNEL_META_PACKAGE} "
        "(run apt-get update on a Debian host) and no kernel package is cached; "
        "or set BLOCKERA_KERNEL_VERSION")


def ensure_kernel_package(cache_dir: Path, version: str) -> Path:
    """Return the cached ``linux-image-<version>`` .deb, downloading it if needed."""
    pattern = f"linux-image-{version}_*.deb"
    existing = sorted(cache_dir.glob(pattern))
    if existing:
        return existing[-1]
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix="download-") as tmp:
        run_checked([find_program("apt-get") or "apt-get", "download",
                     f"linux-image-{version}"],
                    f"downloading linux-image-{version} (try apt-get update)", cwd=Path(tmp))
        debs = sorted(Path(tmp).glob(pattern))
        if not debs:
            raise AssetError(f"apt-get download produced no {pattern} file")
        target = cache_dir / debs[-1].name
        os.replace(debs[-1], target)
    return target


# ---------------------------------------------------------------------------
# modules


@dataclass(frozen=True)
class ModuleTree:
    """Dependency information of an unpacked ``/lib/modules/<version>`` tree."""

    paths: dict[str, str]
    deps: dict[str, list[str]]
    builtin: set[str]


def module_name(path_or_name: str) -> str:
    """Canonical module name: basename without ``.ko*``, dashes as underscores."""
    base = path_or_name.rsplit("/", 1)[-1]
    base = re.sub(r"\.ko(\.(xz|gz|zst))?$", "", base)
    return base.replace("-", "_")


def load_module_tree(root: Path) -> ModuleTree:
    paths: dict[str, str] = {}
    deps: dict[str, list[str]] = {}
    for line in (root / "modules.dep").read_text().splitlines():
        if ":" not in line:
            continue
        target, _, rest = line.partition(":")
        name = module_name(target)
        paths[name] = target
        deps[name] = [module_name(dep) for dep in rest.split()]
    builtin_file = root / "modules.builtin"
    builtin = ({module_name(line) for line in builtin_file.read_text().split()}
               if builtin_file.exists() else set())
    return ModuleTree(paths, deps, builtin)


def module_load_order(tree: ModuleTree, wanted: Sequence[str]) -> list[str]:
    """Modules to insert, dependencies first; built-in ones are left out."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order or name in tree.builtin:
            return
        if name not in tree.paths:
            raise AssetError(f"kernel module {name} is neither a module nor built in")
        if name in visiting:
            raise AssetError(f"dependency cycle through kernel module {name}")
        visiting.add(name)
        for dep in tree.deps[name]:
            visit(dep)
        visiting.discard(name)
        order.append(name)

    for name in wanted:
        visit(module_name(name))
    return order


def read_module(path: Path) -> bytes:
    """Module bytes, decompressed so that busybox ``insmod`` can load them."""
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko"):
        return data
    raise AssetError(f"unsupported module compression: {path.name}")


# ---------------------------------------------------------------------------
# initramfs


class CpioWriter:
    """Minimal writer of the "newc" cpio format the kernel unpacks as initramfs."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.inode = 1

    def add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        encoded = name.encode() + b"\0"
        fields = (self.inode, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % value for value in fields)
        self.inode += 1
        self.chunks.append(header + encoded)
        self.pad()
        self.chunks.append(data)
        self.pad()

    def pad(self) -> None:
        size = sum(len(chunk) for chunk in self.chunks)
        self.chunks.append(b"\0" * (-size % 4))

    def directory(self, name: str) -> None:
        self.add(name, 0o040755)

    def file(self, name: str, data: bytes, executable: bool = False) -> None:
        self.add(name, 0o100755 if executable else 0o100644, data)

    def char_device(self, name: str, major: int, minor: int) -> None:
        self.add(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self.add("TRAILER!!!", 0)
        return b"".join(self.chunks)


def init_script() -> str:
    replacements = {
        "@MSIZE@": str(NINEP_MSIZE),
        "@SHARE@": GUEST_SHARE,
        "@ENV@": ENV_NAME,
        "@DISKS@": DISK_COUNT_NAME,
        "@SCRIPT@": SCRIPT_NAME,
        "@STDOUT@": STDOUT_NAME,
        "@STDERR@": STDERR_NAME,
        "@EXIT@": EXIT_CODE_NAME,
        "@SERIAL@": DISK_SERIAL_PREFIX,
        "@SYNC_WAIT@": str(SYNC_WAIT_TENTHS),
    }
    text = INIT_TEMPLATE
    for key, value in replacements.items():
        text = text.replace(key, value)
    return text


def initramfs_inputs_hash(kernel_version: str, busybox: Path) -> str:
    digest = hashlib.sha256()
    for part in (ASSET_FORMAT_VERSION, kernel_version, init_script(), "\n".join(GUEST_MODULES)):
        digest.update(part.encode())
        digest.update(b"\0")
    digest.update(hashlib.sha256(busybox.read_bytes()).digest())
    return digest.hexdigest()[:16]


def build_initramfs(modules_root: Path, busybox: Path) -> tuple[bytes, list[str]]:
    """Return the initramfs archive and the module load order it encodes."""
    tree = load_module_tree(modules_root)
    order = module_load_order(tree, GUEST_MODULES)
    cpio = CpioWriter()
    for directory in ("bin", "dev", "proc", "sys", "host", "modules"):
        cpio.directory(directory)
    cpio.char_device("dev/console", 5, 1)
    cpio.char_device("dev/null", 1, 3)
    cpio.file("bin/busybox", busybox.read_bytes(), executable=True)
    cpio.file("init", init_script().encode(), executable=True)
    listing = []
    for index, name in enumerate(order):
        file_name = f"{index:02d}-{name}.ko"
        cpio.file(f"modules/{file_name}", read_module(modules_root / tree.paths[name]))
        listing.append(f"{name} {file_name}\n")
    cpio.file("modules/order", "".join(listing).encode())
    return cpio.finish(), order


def unpack_kernel(deb: Path, version: str, workdir: Path) -> Path:
    """Unpack the kernel package into ``workdir`` and index its modules."""
    run_checked([find_program("dpkg-deb") or "dpkg-deb", "-x", str(deb), str(workdir)],
                f"unpacking {deb.name}")
    candidates = [workdir / "lib" / "modules" / version,
                  workdir / "usr" / "lib" / "modules" / version]
    modules_root = next((c for c in candidates if c.is_dir()), None)
    if modules_root is None:
        raise AssetError(f"{deb.name} contains no lib/modules/{version}")
    base = modules_root.parents[2] if modules_root.parts[-4] == "usr" else workdir
    run_checked([find_program("depmod") or "depmod", "-b", str(base), version],
                "indexing kernel modules (depmod from kmod)")
    return modules_root


def has_pvh_note(elf: bytes) -> bool:
    """True if a 64-bit ELF kernel carries the Xen PVH entry note qemu boots from."""
    if elf[:4] != b"\x7fELF" or len(elf) < 64 or elf[4] != 2:
        return False
    phoff, = struct.unpack_from("<Q", elf, 32)
    phentsize, phnum = struct.unpack_from("<HH", elf, 54)
    pt_note, xen_elfnote_phys32_entry = 4, 18
    for index in range(phnum):
        entry = phoff + index * phentsize
        p_type, = struct.unpack_from("<I", elf, entry)
        if p_type != pt_note:
            continue
        offset, = struct.unpack_from("<Q", elf, entry + 8)
        size, = struct.unpack_from("<Q", elf, entry + 32)
        end = offset + size
        while offset + 12 <= end:
            namesz, descsz, note_type = struct.unpack_from("<III", elf, offset)
            name = elf[offset + 12:offset + 12 + namesz]
            if name == b"Xen\0" and note_type == xen_elfnote_phys32_entry:
                return True
            offset += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def extract_pvh_kernel(bzimage: bytes) -> bytes | None:
    """The uncompressed ``vmlinux`` inside a bzImage, if it can be booted via PVH.

    Booting the ELF directly skips the in-guest decompression, which under
    TCG emulation takes several seconds.  Returns None when the payload is
    compressed with something the standard library cannot read or lacks the
    PVH note; the bzImage is booted then.
    """
    decoders = (
        (b"\xfd7zXZ\x00", lambda: lzma.LZMADecompressor(format=lzma.FORMAT_XZ)),
        (b"\x1f\x8b\x08", lambda: zlib.decompressobj(16 + zlib.MAX_WBITS)),
    )
    for magic, make_decoder in decoders:
        start = bzimage.find(magic)
        while start != -1:
            try:
                elf = make_decoder().decompress(bzimage[start:])
            except (lzma.LZMAError, zlib.error):
                elf = b""
            if has_pvh_note(elf):
                return elf
            start = bzimage.find(magic, start + 1)
    return None


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def prune_stale_assets(cache: Path, keep: set[Path]) -> None:
    """Delete kernel images and initramfs files built from other inputs."""
    for pattern in ("kernel-*.img", "initramfs-*.cpio", "initramfs-*.modules"):
        for path in cache.glob(pattern):
            if path not in keep:
                path.unlink(missing_ok=True)


def ensure_assets(cache_dir: Path | None = None) -> KernelAssets:
    """Prepare (or reuse) the kernel image and the initramfs.

    Safe to call from several processes at once: the work happens under an
    exclusive lock in the cache directory.
    """
    cache = cache_dir or default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    busybox = find_busybox()
    if busybox is None:
        raise AssetError("no statically linked busybox: apt-get install busybox-static")
    with file_lock(cache / "lock"):
        version = resolve_kernel_version(cache)
        key = initramfs_inputs_hash(version, busybox)
        kernel_image = cache / f"kernel-{version}-v{ASSET_FORMAT_VERSION}.img"
        initramfs = cache / f"initramfs-{version}-{key}.cpio"
        order_file = initramfs.with_suffix(".modules")
        if not (kernel_image.exists() and initramfs.exists() and order_file.exists()):
            deb = ensure_kernel_package(cache, version)
            with tempfile.TemporaryDirectory(dir=cache, prefix="unpack-") as tmp:
                modules_root = unpack_kernel(deb, version, Path(tmp))
                bzimage_path = Path(tmp) / "boot" / f"vmlinuz-{version}"
                if not bzimage_path.exists():
                    raise AssetError(f"{deb.name} contains no boot/vmlinuz-{version}")
                archive, order = build_initramfs(modules_root, busybox)
                if not kernel_image.exists():
                    bzimage = bzimage_path.read_bytes()
                    atomic_write(kernel_image, extract_pvh_kernel(bzimage) or bzimage)
                atomic_write(initramfs, archive)
                atomic_write(order_file, ("\n".join(order) + "\n").encode())
            prune_stale_assets(cache, keep={kernel_image, initramfs, order_file})
        order = tuple(order_file.read_text().split())
    return KernelAssets(version, kernel_image, initramfs, order)


# ---------------------------------------------------------------------------
# running


def create_disk_image(path: Path, size_bytes: int) -> Path:
    """Create (or truncate to) a sparse raw image of ``size_bytes`` zero bytes."""
    with open(path, "wb") as image:
        image.truncate(size_bytes)
    return path


def guest_path_dirs() -> str:
    """``PATH`` inside the guest: the test's python first, then the sbin dirs."""
    python_dir = str(Path(sys.executable).parent)
    dirs = [python_dir, "/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin",
            "/sbin", "/bin"]
    return ":".join(dict.fromkeys(dirs))


def write_share_inputs(share_dir: Path, script: str, disk_count: int,
                       env: Mapping[str, str] | None) -> None:
    for name in HARNESS_FILES:
        (share_dir / name).unlink(missing_ok=True)
    variables = {
        "PATH": guest_path_dirs(),
        "PYTHON": sys.executable,
        "LANG": "C.UTF-8",
        "DM_DISABLE_UDEV": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "SHARE": GUEST_SHARE,
        "BLOCKERA_GUEST_DISKS": str(disk_count),
    }
    variables.update(env or {})
    lines = [f"export {key}={shlex.quote(value)}\n" for key, value in variables.items()]
    (share_dir / ENV_NAME).write_text("".join(lines))
    (share_dir / DISK_COUNT_NAME).write_text(f"{disk_count}\n")
    (share_dir / SCRIPT_NAME).write_text(script)


def qemu_command(assets: KernelAssets, disks: Sequence[Path], share_dir: Path,
                 memory_mb: int, cpus: int) -> list[str]:
    qemu = find_program(QEMU)
    if qemu is None:
        raise GuestError(f"{QEMU} not found: apt-get install qemu-system-x86")
    argv = [
        qemu, "-accel", "tcg", "-cpu", "max", "-smp", str(cpus), "-m", str(memory_mb),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-serial", f"file:{share_dir / CONSOLE_NAME}",
        "-kernel", str(assets.kernel_image), "-initrd", str(assets.initramfs),
        "-append", KERNEL_CMDLINE,
    ]
    for index, disk in enumerate(disks):
        drive = f"disk{index}"
        argv += [
            "-drive", f"file={qemu_option_value(str(disk))},format=raw,if=none,id={drive},"
                      "cache=writeback,aio=threads",
            "-device", f"virtio-blk-pci,drive={drive},serial={DISK_SERIAL_PREFIX}{index}",
        ]
    for tag, path, extra in (("hostroot", "/", ",readonly=on"), ("share", str(share_dir), "")):
        argv += [
            "-fsdev", f"local,id={tag},path={qemu_option_value(path)},security_model=none,"
                      f"multidevs=remap{extra}",
            "-device", f"virtio-9p-pci,fsdev={tag},mount_tag={tag}",
        ]
    return argv


def qemu_option_value(value: str) -> str:
    """Escape a value for qemu's comma-separated option syntax."""
    return value.replace(",", ",,")


def run_in_guest(script: str, disks: Sequence[Path], share_dir: Path,
                 timeout_s: float = 300, memory_mb: int = 1024, *,
                 env: Mapping[str, str] | None = None, cpus: int = 1,
                 assets: KernelAssets | None = None) -> GuestResult:
    """Boot the guest, run ``script`` with ``/bin/sh -e`` in it and power off.

    ``disks`` are raw image files attached as ``/dev/vda``, ``/dev/vdb``, ...
    ``share_dir`` is mounted read-write at ``$SHARE`` (the script's working
    directory); the harness's own files in it are named ``guest-*``.  Data
    the guest wrote to a disk and flushed (``sync``, ``O_DIRECT``, ``fsync``;
    the guest also syncs after the script) is in the image file once this
    returns.  ``env`` adds variables to the script's environment.

    Returns the script's exit status and output; raises :class:`GuestTimeout`
    if the guest did not power off within ``timeout_s`` and
    :class:`GuestBootError` if it powered off without running the script.
    """
    if len(disks) > MAX_DISKS:
        raise GuestError(f"at most {MAX_DISKS} disks can be attached, got {len(disks)}")
    disk_paths = [Path(d).resolve() for d in disks]
    for disk in disk_paths:
        if not disk.exists():
            raise GuestError(f"disk image {disk} does not exist")
    share = Path(share_dir).resolve()
    share.mkdir(parents=True, exist_ok=True)
    assets = assets or ensure_assets()
    write_share_inputs(share, script, len(disk_paths), env)
    argv = qemu_command(assets, disk_paths, share, memory_mb, cpus)
    console = share / CONSOLE_NAME
    started = time.monotonic()
    with open(share / QEMU_LOG_NAME, "wb") as qemu_log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=qemu_log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            qemu_rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            kill_process_group(proc)
            raise GuestTimeout(
                f"guest did not power off within {timeout_s:g} s; qemu was killed.\n"
                f"--- script stdout so far ---\n{read_text(share / STDOUT_NAME)}\n"
                f"--- script stderr so far ---\n{read_text(share / STDERR_NAME)}\n"
                f"--- console log: {console} (tail) ---\n{tail(read_text(console))}",
                read_text(share / STDOUT_NAME), read_text(share / STDERR_NAME), console,
            ) from None
        finally:
            if proc.poll() is None:
                kill_process_group(proc)
    duration = time.monotonic() - started
    return collect_result(share, qemu_rc, duration)


def kill_process_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def collect_result(share: Path, qemu_rc: int, duration: float) -> GuestResult:
    console = share / CONSOLE_NAME
    exit_file = share / EXIT_CODE_NAME
    if qemu_rc != 0 or not exit_file.exists():
        raise GuestBootError(
            f"guest stopped without completing the script (qemu exit status {qemu_rc}).\n"
            f"--- qemu output ---\n{read_text(share / QEMU_LOG_NAME)}\n"
            f"--- console log: {console} (tail) ---\n{tail(read_text(console))}")
    return GuestResult(
        returncode=int(exit_file.read_text().strip()),
        stdout=read_text(share / STDOUT_NAME),
        stderr=read_text(share / STDERR_NAME),
        console_log=console,
        duration_s=duration,
    )


@dataclass(frozen=True)
class KernelGuest:
    """Prepared assets plus :func:`run_in_guest`; each ``run`` is one boot."""

    assets: KernelAssets

    @property
    def kernel_version(self) -> str:
        return self.assets.kernel_version

    def run(self, script: str, disks: Sequence[Path], share_dir: Path,
            timeout_s: float = 300, memory_mb: int = 1024, *,
            env: Mapping[str, str] | None = None, cpus: int = 1) -> GuestResult:
        return run_in_guest(script, disks, share_dir, timeout_s, memory_mb,
                            env=env, cpus=cpus, assets=self.assets)
