"""The kernel's file-descriptor mount API (fsopen, fsconfig, fsmount, move_mount).

Why not mount(2) or mount(8): both take the target as a path that the kernel
resolves at mount time, following symlinks, so a directory checked a moment
earlier can have been swapped for a link to /etc. move_mount() takes the
target as a file descriptor opened without following links: the mount lands
on the directory that was checked, or nowhere. The filesystem context also
keeps the kernel's own reason for a refusal (`e ext4: Unrecognized mount
option "x" or missing value`), which mount(2) only writes to dmesg.

The syscall numbers of these calls are the same on every architecture that
has them (they were added after the tables were unified), except alpha.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform

_NR = {"open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431,
       "fsmount": 432, "openat2": 437}
_ARCHES = ("x86_64", "aarch64", "armv7l", "ppc64le", "s390x", "riscv64")

FSOPEN_CLOEXEC = 0x1
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6
FSMOUNT_CLOEXEC = 0x1
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_EMPTY_PATH = 0x40

MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
MOUNT_ATTR_RELATIME = 0x0
MOUNT_ATTR_NOATIME = 0x10
MOUNT_ATTR_STRICTATIME = 0x20
MOUNT_ATTR_NODIRATIME = 0x80
MOUNT_ATTR_NOSYMFOLLOW = 0x200000

# per-mount options (fsmount's attributes); everything else goes to the
# filesystem through fsconfig
MOUNT_ATTRS = {
    "ro": MOUNT_ATTR_RDONLY, "nosuid": MOUNT_ATTR_NOSUID, "nodev": MOUNT_ATTR_NODEV,
    "noexec": MOUNT_ATTR_NOEXEC, "noatime": MOUNT_ATTR_NOATIME,
    "relatime": MOUNT_ATTR_RELATIME, "strictatime": MOUNT_ATTR_STRICTATIME,
    "nodiratime": MOUNT_ATTR_NODIRATIME, "nosymfollow": MOUNT_ATTR_NOSYMFOLLOW,
}


class MountAPIError(OSError):
    """A refused mount, with the kernel's own messages (newest last)."""

    def __init__(self, err: int, call: str, messages: list[str]) -> None:
        super().__init__(err, f"{call}: {os.strerror(err)}")
        self.call = call
        self.messages = messages

    @property
    def reason(self) -> str:
        """The kernel's words if it gave any (errors first), else strerror."""
        errs = [m[2:] for m in self.messages if m.startswith("e ")]
        if errs:
            return errs[-1]
        if self.messages:
            return self.messages[-1][2:] if self.messages[-1][1:2] == " " else self.messages[-1]
        return os.strerror(self.errno or 0)


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def _syscall(name: str, *args: object) -> int:
    if platform.machine() not in _ARCHES:
        raise OSError(errno.ENOSYS, f"{name}: unknown syscall number on {platform.machine()}")
    res = _libc().syscall(ctypes.c_long(_NR[name]), *args)
    if res < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")
    return int(res)


def _b(text: str | None) -> ctypes.c_char_p:
    return ctypes.c_char_p(None if text is None else os.fsencode(text))


def fsopen(fstype: str) -> int:
    return _syscall("fsopen", _b(fstype), ctypes.c_uint(FSOPEN_CLOEXEC))


def fsconfig(fs_fd: int, cmd: int, key: str | None = None, value: str | None = None,
             aux: int = 0) -> None:
    _syscall("fsconfig", ctypes.c_int(fs_fd), ctypes.c_uint(cmd), _b(key), _b(value),
             ctypes.c_int(aux))


def fsmount(fs_fd: int, attrs: int) -> int:
    return _syscall("fsmount", ctypes.c_int(fs_fd), ctypes.c_uint(FSMOUNT_CLOEXEC),
                    ctypes.c_uint(attrs))


def move_mount_to_fd(mount_fd: int, target_fd: int) -> None:
    """Attach a detached mount onto the directory `target_fd` refers to."""
    _syscall("move_mount", ctypes.c_int(mount_fd), _b(""), ctypes.c_int(target_fd), _b(""),
             ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH))


def read_messages(fs_fd: int) -> list[str]:
    """Drain the filesystem context's log: one message per read(), each
    prefixed "e " (error), "w " (warning) or "i " (info); ENODATA ends it."""
    out: list[str] = []
    for _ in range(64):  # the kernel keeps at most 8; bound the loop anyway
        try:
            data = os.read(fs_fd, 4096)
        except OSError:
            break
        if not data:
            break
        out.append(data.decode(errors="replace").strip())
    return out


def available() -> bool:
    """False where the kernel (or a seccomp filter) lacks fsopen."""
    try:
        fd = fsopen("tmpfs")
    except OSError as exc:
        return exc.errno != errno.ENOSYS
    os.close(fd)
    return True


def mount_at(target_fd: int, fstype: str, source: str, fs_options: list[str],
             attrs: int) -> None:
    """Mount `source` (a block device) as `fstype` on the directory open as
    `target_fd`. `fs_options` are filesystem options ("noload",
    "commit=5"); `attrs` are MOUNT_ATTR_* bits. Raises MountAPIError with
    the kernel's messages; a plain OSError(ENOSYS) when the API is missing.
    Nothing is left mounted when it fails: a detached mount that was never
    moved into place vanishes when its descriptor is closed."""
    fs_fd = fsopen(fstype)
    try:
        step = "fsconfig"
        try:
            fsconfig(fs_fd, FSCONFIG_SET_STRING, "source", source)
            for opt in fs_options:
                key, sep, value = opt.partition("=")
                if sep:
                    fsconfig(fs_fd, FSCONFIG_SET_STRING, key, value)
                else:
                    fsconfig(fs_fd, FSCONFIG_SET_FLAG, key)
            step = "fsconfig create"
            fsconfig(fs_fd, FSCONFIG_CMD_CREATE)
            step = "fsmount"
            mnt_fd = fsmount(fs_fd, attrs)
        except OSError as exc:
            raise MountAPIError(exc.errno or errno.EIO, step, read_messages(fs_fd)) from exc
        try:
            move_mount_to_fd(mnt_fd, target_fd)
        except OSError as exc:
            raise MountAPIError(exc.errno or errno.EIO, "move_mount", []) from exc
        finally:
            os.close(mnt_fd)
    finally:
        os.close(fs_fd)


class KernelLog:
    """Kernel log records written after this point (/dev/kmsg), for the
    mount(8) fallback, where the kernel's reason only goes to the log."""

    def __init__(self, path: str = "/dev/kmsg") -> None:
        self.fd: int | None = None
        with contextlib.suppress(OSError):
            self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            os.lseek(self.fd, 0, os.SEEK_END)

    def read_new(self) -> list[str]:
        out: list[str] = []
        if self.fd is None:
            return out
        for _ in range(1000):
            try:
                rec = os.read(self.fd, 8192)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EPIPE:  # overwritten records: skip on
                    continue
                break
            if not rec:
                break
            # "prio,seq,usec,flags;message\n continuation lines"
            _head, _, msg = rec.decode(errors="replace").partition(";")
            out.append(msg.split("\n", 1)[0].strip())
        return out

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8

# umount2() run in a child (see umount_argv); stdlib only and `python -S`, so
# it starts in milliseconds. Exit 0, or the errno.
_UMOUNT2_CHILD = (
    "import ctypes,sys\n"
    "libc=ctypes.CDLL(None,use_errno=True)\n"
    "r=libc.umount2(sys.argv[1].encode(),int(sys.argv[2]))\n"
    "sys.exit((ctypes.get_errno() or 1) if r else 0)\n"
)


def umount_argv(path: str, *, lazy: bool = False) -> list[str]:
    """argv for umount2(path, UMOUNT_NOFOLLOW[|MNT_DETACH]) in a child
    process: an unmount flushes, and with the cluster gone that flush can
    sleep uninterruptibly; a child can be abandoned at the step timeout,
    cephvol itself cannot. The child exits with the errno."""
    import sys

    flags = UMOUNT_NOFOLLOW | (MNT_DETACH if lazy else 0)
    return [sys.executable, "-S", "-c", _UMOUNT2_CHILD, path, str(flags)]
