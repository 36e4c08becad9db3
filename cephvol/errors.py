"""One small exception hierarchy; each class carries the process exit code.

Exit codes are part of cephvol's interface (systemd units and scripts branch on
them), so they live here, in one table, and are documented in the README.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    USAGE = 2  # bad input: spec, size, option, path
    NOT_FOUND = 3  # pool, image, snapshot or mapping does not exist
    BUSY = 4  # device mounted/open, image mapped or watched
    CONFLICT = 5  # exists, but not as asked (e.g. image with another size)
    OWNED = 6  # volume owned (locked) by another host
    CLUSTER = 7  # cluster unreachable, auth failed, config unusable
    TIMEOUT = 8  # a step did not finish within its bound
    UNSUPPORTED = 9  # backend/kernel cannot do what was asked
    UNSAFE = 10  # refused to protect data (would format a used device, ...)
    SYSTEM = 11  # a host command failed (mount, losetup, rbd-fuse, ...)
    DATA_LOST = 12  # a flush failed or the mapping died: writes did not reach the cluster
    INTERNAL = 70  # a bug in cephvol


class CephvolError(Exception):
    """Base of every error cephvol means to report to a person.

    `message` must be one line a person can act on; it must never contain
    secrets (keys are never passed to code that builds messages).
    """

    exit_code: ExitCode = ExitCode.INTERNAL

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class UsageError(CephvolError):
    exit_code = ExitCode.USAGE


class NotFound(CephvolError):
    exit_code = ExitCode.NOT_FOUND


class Busy(CephvolError):
    exit_code = ExitCode.BUSY


class Conflict(CephvolError):
    exit_code = ExitCode.CONFLICT


class Owned(CephvolError):
    exit_code = ExitCode.OWNED


class ClusterError(CephvolError):
    exit_code = ExitCode.CLUSTER


class StepTimeout(CephvolError):
    exit_code = ExitCode.TIMEOUT


class Unsupported(CephvolError):
    exit_code = ExitCode.UNSUPPORTED


class Unsafe(CephvolError):
    exit_code = ExitCode.UNSAFE


class SystemCommandError(CephvolError):
    exit_code = ExitCode.SYSTEM


class DataLost(CephvolError):
    """Writes did not reach the cluster: a flush failed, or the daemon serving
    the mapping died (rbd-fuse killed, this host fenced). Never reported as
    success; the message says "not written" so a person knows what it means."""

    exit_code = ExitCode.DATA_LOST
