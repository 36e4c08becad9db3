"""Abort a FUSE connection through the fusectl filesystem.

Writing to /sys/fs/fuse/connections/N/abort fails every request waiting on
connection N at once (and every later one) instead of letting it sleep
until the daemon answers: for a daemon that cannot answer any more (its
host was fenced, it hangs on a dead cluster) this is the only way to free
the processes waiting on it. N is the minor number of the FUSE mount's
device, as /proc/self/mountinfo shows it. fusectl is mounted on first use.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from cephvol import proc
from cephvol.hostfs import read_mounts


def abort(mountpoint: str, fstype: str, proc_root: Path, sys_root: Path) -> bool:
    """Abort the connection of the FUSE mount at `mountpoint` (of `fstype`,
    e.g. "fuse" or "fuse.rbd-fuse"). False when no such mount is there."""
    for m in read_mounts(proc_root / "self" / "mountinfo"):
        if m.mountpoint == mountpoint and m.fstype == fstype:
            conns = sys_root / "fs" / "fuse" / "connections"
            if not (conns / str(m.minor)).exists():
                proc.run(["mount", "-t", "fusectl", "fusectl", str(conns)], check=False,
                         timeout=10)
            with contextlib.suppress(OSError):
                (conns / str(m.minor) / "abort").write_text("1")
            return True
    return False
