"""Free a loop device only when nothing holds it, through the loop ioctls.

`losetup -d` (LOOP_CLR_FD) on a loop device that anything else holds open
does not fail: the kernel sets LO_FLAGS_AUTOCLEAR and frees the device
when its last opener closes it. Callers check beforehand that nothing
mounts or opens the device, but a process may make a mount namespace
between that check and the unmap, and its copy of the volume's mount keeps
the device claimed for as long as it lives: the device would then be
half-released (autoclear set, still bound) and the next command would find
a mapping that was "unmapped by force" although nobody forced anything.

`release()` closes that window from the kernel's side: it opens the device
with O_EXCL, which fails with EBUSY while a filesystem is mounted on it in
any mount namespace (the superblock is shared and claims the device), and,
once open, keeps anyone from mounting it; LOOP_CLR_FD on that descriptor,
when it is the only one, marks the device for rundown and the kernel frees
it when the descriptor closes. When another process holds a plain
descriptor, `keep()` clears the autoclear flag again (LOOP_SET_STATUS64
may change it since Linux 4.10), so a refused unmap leaves the mapping as
it was. The ioctl numbers and struct loop_info64 are from
include/uapi/linux/loop.h.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from collections.abc import Callable

from cephvol.errors import Busy, SystemCommandError
from cephvol.waiting import wait_for

LOOP_CLR_FD = 0x4C01
LOOP_SET_STATUS64 = 0x4C04
LOOP_GET_STATUS64 = 0x4C05
LO_FLAGS_AUTOCLEAR = 4

# struct loop_info64: 5 x __u64, 4 x __u32 (lo_flags last), 64 + 64 + 32
# bytes of names and key, 2 x __u64
_INFO64 = struct.Struct("=5Q4I64s64s32s2Q")
_FLAGS_INDEX = 8


class Claimed(Exception):
    """The device is mounted or claimed (O_EXCL open gave EBUSY)."""


def release(device: str, *, force: bool = False) -> None:
    """Ask the kernel to free loop `device` (LOOP_CLR_FD).

    Raises Claimed when a filesystem is mounted on the device anywhere (or
    another exclusive holder has it) unless `force`, which detaches it
    anyway: the kernel frees it when its last opener goes. Without force
    and with only plain openers left, the device stays bound with autoclear
    set; the caller sees it still bound and calls keep(). OSError for
    anything else (e.g. ENXIO: the device is not bound any more).
    """
    try:
        fd = os.open(device, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as e:
        if e.errno != errno.EBUSY:
            raise
        if not force:
            raise Claimed(device) from None
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, LOOP_CLR_FD)
    finally:
        os.close(fd)


def keep(device: str) -> bool:
    """Clear the autoclear flag a refused release() left on `device`, so
    the loop stays bound after its last opener closes. False when the
    device was freed meanwhile (its last opener went first)."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        buf = bytearray(_INFO64.size)
        fcntl.ioctl(fd, LOOP_GET_STATUS64, buf)
        fields = list(_INFO64.unpack(buf))
        if not fields[_FLAGS_INDEX] & LO_FLAGS_AUTOCLEAR:
            return True
        fields[_FLAGS_INDEX] &= ~LO_FLAGS_AUTOCLEAR
        fcntl.ioctl(fd, LOOP_SET_STATUS64, _INFO64.pack(*fields))
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def detach(device: str, bound: Callable[[], bool], *, force: bool, timeout: float) -> bool:
    """Free loop `device` for a backend's unmap; `bound()` says whether the
    device still serves this mapping (read from sysfs by the caller).

    True when the device is free. Without force, Busy when a filesystem is
    mounted on it anywhere or another process keeps it open past `timeout`
    (a udev probe closes within it): the loop is then left bound exactly as
    it was, autoclear cleared, and a later detach can finish. With force,
    False when the device is still open: the kernel frees it when the last
    opener closes it.
    """
    try:
        release(device, force=force)
    except Claimed:
        raise Busy(f"{device} is still mounted, perhaps in a mount namespace made after "
                   "the check (a container or unshare): not unmapped, nothing changed; "
                   "detach again when that namespace is gone (findmnt -N PID)") from None
    except OSError as e:
        if e.errno not in (errno.ENXIO, errno.ENOENT):  # ENXIO: not bound any more
            raise SystemCommandError(f"cannot free {device}: {e.strerror}") from None
    if wait_for(lambda: not bound(), timeout=timeout, interval=0.02, max_interval=0.2):
        return True
    if force:
        return False
    if not keep(device) and not bound():
        return True  # its last opener closed it between the wait and keep()
    raise Busy(f"{device} is still open by another process: not unmapped, nothing changed "
               f"(fuser -v {device} names it; --force frees the device when it closes)")
