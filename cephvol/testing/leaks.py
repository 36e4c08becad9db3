"""What a test session left on the host, and tearing it down by force.

Shared by cephvol's own suite (tests/conftest.py) and the pytest plugin
(cephvol.testing.plugin). Everything a session makes lives under one
directory (cluster, state, rbd-fuse mounts, mountpoints), so a mount, loop
device or process is the session's when its path names that directory. Loop
devices are also found by difference with a snapshot taken at the start: a
loop whose rbd-fuse mount was lazily detached shows its backing file as
"/IMAGE", outside the directory.

Host-only and cheap to import: no rados, no rbd.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Collection
from pathlib import Path

from cephvol import proc

_LOSETUP = ["losetup", "-l", "-n", "-O", "NAME,BACK-FILE"]


def bound_loops() -> set[str]:
    """Every bound loop device as "NAME BACK-FILE" (whitespace squeezed)."""
    out = proc.run(_LOSETUP, check=False, timeout=30).stdout
    return {" ".join(line.split()) for line in out.splitlines() if line.strip()}


def _mountinfo() -> list[list[str]]:
    return [line.split() for line in Path("/proc/self/mountinfo").read_text().splitlines()]


def leftovers(base: Path, loops_at_start: set[str] | None = None, *,
              ignore_pids: Collection[int] = ()) -> list[str]:
    """Mounts, loop devices and live processes of the session under `base`.

    With `loops_at_start`, every loop device bound since then counts too,
    wherever its backing file is (pass None where other sessions run beside
    this one, e.g. pytest-xdist workers, whose loops are not ours). Processes
    in `ignore_pids` (a kept cluster's own daemons) are not leftovers.
    """
    found = []
    b = str(base)
    if loops_at_start is not None:
        for lo in sorted(bound_loops() - loops_at_start):
            if b not in lo:
                found.append(f"loop {lo}")
    for f in _mountinfo():
        if f[4].startswith(b):
            found.append(f"mount {f[4]}")
    for line in proc.run(_LOSETUP, check=False, timeout=30).stdout.splitlines():
        if b in line:
            found.append(f"loop {line.strip()}")
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) in ignore_pids or int(pid) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b in cmd and state not in ("Z", "X"):
            found.append(f"process {pid}: {cmd.strip()}")
    return found


def detached_loops(since: set[str], images: Collection[str]) -> list[str]:
    """Loop devices bound after `since` whose backing file shows as "/IMAGE"
    for one of `images`: the path a backing file has once its rbd-fuse mount
    was lazily detached, so no longer under the session's directory. Loops
    other sessions on the same machine bind (and lazily detach) meanwhile
    are not reported."""
    want = {f"/{name}" for name in images}
    found = []
    for lo in sorted(bound_loops() - since):
        back = lo.split(" ", 1)[1] if " " in lo else ""
        if back in want:
            found.append(f"loop {lo}")
    return found


def free_loop(device: str) -> None:
    proc.run(["losetup", "-d", device], check=False, timeout=30)


def brute_force_cleanup(base: Path, *, kill_all: bool = False,
                        ignore_pids: Collection[int] = ()) -> None:
    """Abort FUSE connections, lazily unmount, free loops under `base`, kill
    its rbd-fuse processes (every process mentioning it with `kill_all`,
    except `ignore_pids`)."""
    b = str(base)
    mounts = []
    for f in _mountinfo():
        if f[4].startswith(b):
            mounts.append((f[4], f[2], f[f.index("-") + 1]))
    # loops first: once their rbd-fuse mount is lazily detached, their backing
    # path no longer names `base` and they could not be found any more
    for line in proc.run(_LOSETUP, check=False, timeout=30).stdout.splitlines():
        if b in line:
            free_loop(line.split()[0])
    fusectl = Path("/sys/fs/fuse/connections")
    if any(t.startswith("fuse") for _, _, t in mounts) and not any(fusectl.iterdir()):
        proc.run(["mount", "-t", "fusectl", "none", str(fusectl)], check=False, timeout=30)
    for mp, majmin, fstype in sorted(mounts, key=lambda m: -len(m[0])):
        if fstype.startswith("fuse"):
            abort = fusectl / majmin.split(":")[1] / "abort"
            if abort.exists():
                abort.write_text("1")
        proc.run(["umount", "-l", mp], check=False, timeout=30)
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) not in ignore_pids:
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if (b.encode() in cmd and int(pid) != os.getpid()
                    and (kill_all or cmd.startswith(b"rbd-fuse"))):
                with contextlib.suppress(OSError):
                    os.kill(int(pid), signal.SIGKILL)
