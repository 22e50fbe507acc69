"""The exception hierarchy. Every error a user can cause is one of these, with a message that
says what was wrong and what to do; the command line maps them to exit codes (a traceback is a
bug). `errno_name` records the kernel's errno where the behaviour mirrors a kernel path."""

from __future__ import annotations


class BlockeraError(Exception):
    """Base of all blockera errors."""

    exit_code = 2
    errno_name = "EIO"

    def __init__(self, message: str, *, errno_name: str | None = None) -> None:
        super().__init__(message)
        if errno_name is not None:
            self.errno_name = errno_name


class UsageError(BlockeraError):
    """Bad command-line arguments or options."""

    errno_name = "EINVAL"


class DeviceError(BlockeraError):
    """A device or file could not be opened, read or written."""


class NoSpaceError(DeviceError):
    """A device (metadata or COW) has no room left."""

    errno_name = "ENOSPC"


class MetadataError(BlockeraError):
    """On-disk metadata failed validation. `block` is the metadata block concerned, if any."""

    exit_code = 1
    errno_name = "EILSEQ"

    def __init__(self, message: str, *, block: int | None = None,
                 errno_name: str | None = None) -> None:
        if block is not None:
            message = f"block {block}: {message}"
        super().__init__(message, errno_name=errno_name)
        self.block = block


class XmlInputError(BlockeraError):
    """An XML metadata description (era restore input) is malformed or inconsistent."""

    exit_code = 1
    errno_name = "EINVAL"

    def __init__(self, message: str, *, line: int | None = None) -> None:
        if line is not None:
            message = f"line {line}: {message}"
        super().__init__(message)
        self.line = line


class TableError(BlockeraError):
    """A device-mapper table line was rejected (the kernel's `ti->error` message)."""

    errno_name = "EINVAL"


class TargetError(BlockeraError):
    """A target refused an operation (message, resume, I/O) the way the kernel would."""

    errno_name = "EINVAL"


class DeviceMapperError(BlockeraError):
    """A device-mapper engine operation failed (unknown device, wrong state, ...)."""

    errno_name = "EINVAL"


class ListenError(BlockeraError):
    """A listening socket could not be created (address in use, bad path, ...)."""
