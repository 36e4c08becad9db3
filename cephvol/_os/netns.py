"""Enter a named network namespace (`ip netns add NAME`) for this process.

The dev cluster's daemons must bind an address that only exists inside a
namespace a test made (the qemu guest's tap network); entering it before
anything is started means every daemon, every ceph-authtool and librados in
this process live there, with no `ip netns exec` wrapper (which would also
give the daemons a private mount namespace). Python 3.11 has no os.setns.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from cephvol.errors import NotFound, SystemCommandError

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = Path("/run/netns")


def enter(name: str, run_dir: Path = NETNS_RUN_DIR) -> None:
    if not name or "/" in name or name in (".", ".."):
        raise NotFound(f"invalid network namespace name {name!r}")
    path = run_dir / name
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError as exc:
        raise NotFound(f"network namespace {name!r} does not exist ({path})") from exc
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise SystemCommandError(f"cannot enter network namespace {name!r}: "
                                     f"{os.strerror(err)}")
    finally:
        os.close(fd)
