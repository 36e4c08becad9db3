"""FIFREEZE / FITHAW, and a short-lived child process that holds a freeze.

Why a child: a frozen filesystem blocks every writer on it (the container's
database included) until someone thaws it, and the kernel has no timeout of
its own. If cephvol froze the filesystem itself and were then SIGKILLed
(OOM killer, `systemctl kill`), nothing would thaw it. So the freeze is held
by a tiny child (`python -m cephvol._os.freeze MOUNTPOINT BOUND`) that thaws

- when cephvol asks ("thaw" on its stdin),
- when cephvol dies: its stdin pipe reaches EOF (and prctl(PR_SET_PDEATHSIG)
  sends it SIGTERM, which it also answers with a thaw),
- at the latest BOUND seconds after the freeze took effect, whatever cephvol
  is doing (a librbd call stuck on an unreachable cluster),
- on SIGTERM / SIGINT / SIGHUP.

Only SIGKILL of the child itself (or of the whole cgroup) skips the thaw;
for that the caller journals the freeze and thaws leftovers later
(cephvol.data.snapshots.thaw_leftovers).

Protocol on the pipes, one line each: cephvol -> child "freeze", "thaw";
child -> cephvol "FROZEN", "ERROR <errno> <text>", "THAWED <why>" where why is
asked | eof | timeout | signal. The child starts before cephvol connects to
the cluster and freezes only when told, so the frozen window holds nothing
but the snapshot itself.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from cephvol import proc
from cephvol.errors import Busy, StepTimeout, SystemCommandError, Unsupported

FIFREEZE = 0xC0045877  # _IOWR('X', 119, int)
FITHAW = 0xC0045878  # _IOWR('X', 120, int)
PR_SET_PDEATHSIG = 1

# filesystems whose FIFREEZE cephvol relies on (the ones it mounts)
FREEZABLE = ("ext4", "xfs")


def _open_dir(mountpoint: str | os.PathLike[str]) -> int:
    return os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def thaw(mountpoint: str | os.PathLike[str], timeout: float | None = None) -> bool:
    """FITHAW the filesystem mounted at `mountpoint`: True if it was frozen
    and is now thawed, False if it was not frozen (the kernel's EINVAL,
    harmless: thawing is idempotent this way).

    In a child (util-linux `fsfreeze --unfreeze`), bounded: FITHAW waits for
    the superblock's lock, which a flush stuck on an unreachable cluster can
    hold for as long as the cluster is gone, and a process waiting there
    cannot even be killed. Past the bound: StepTimeout."""
    res = proc.run(["fsfreeze", "--unfreeze", str(mountpoint)],
                   timeout=timeout if timeout is not None else min(10.0, proc.step_timeout()),
                   check=False, env={"LC_ALL": "C"})  # EINVAL is told by its text
    if res.returncode == 0:
        return True
    err = res.stderr.strip()
    if "Invalid argument" in err:
        return False
    raise SystemCommandError(f"thawing {mountpoint} failed: {err or f'exit {res.returncode}'}")


class FreezeHolder:
    """The parent's side of one freeze child. Use as a context manager: on
    leaving, the child is told to thaw (or sees EOF) and is reaped."""

    def __init__(self, mountpoint: Path, bound: float) -> None:
        self.mountpoint, self.bound = mountpoint, bound
        self.child: subprocess.Popen[str] | None = None
        self.frozen_at: float | None = None
        self.thawed_why: str | None = None

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child else None

    def start(self) -> None:
        # a long-lived helper, not a command run to completion, hence not
        # proc.run; argv list, no shell, nothing secret in it
        self.child = subprocess.Popen(
            [sys.executable, "-m", "cephvol._os.freeze", str(self.mountpoint),
             f"{self.bound:g}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, bufsize=1, close_fds=True)

    def _line(self, timeout: float) -> str | None:
        assert self.child and self.child.stdout
        ready, _, _ = select.select([self.child.stdout], [], [], max(0.0, timeout))
        if not ready:
            return None
        return self.child.stdout.readline().strip()

    def _send(self, line: str) -> bool:
        assert self.child and self.child.stdin
        try:
            self.child.stdin.write(line + "\n")
            self.child.stdin.flush()
            return True
        except (BrokenPipeError, OSError):
            return False

    def freeze(self, timeout: float) -> None:
        """Freeze now; returns once the filesystem is frozen. FIFREEZE first
        writes back everything dirty, so it can take as long as the cluster
        takes to accept that: bounded by `timeout` (the child thaws at once
        if it freezes after we gave up, because we close its stdin)."""
        if self.child is None:
            self.start()
        start = time.monotonic()
        if not self._send("freeze"):
            raise SystemCommandError(f"the freeze helper for {self.mountpoint} died at start")
        line = self._line(timeout)
        if line == "FROZEN":
            self.frozen_at = time.monotonic()
            return
        self.close()
        if line is None:
            raise StepTimeout(f"freezing {self.mountpoint} did not finish within {timeout:g}s "
                              "(writing back its dirty data to the cluster); nothing was "
                              "snapshotted, the filesystem thaws as soon as the freeze ends")
        if line.startswith("ERROR "):
            _, code, text = [*line.split(" ", 2), ""][:3]
            if code == str(errno.EBUSY):
                raise Busy(f"{self.mountpoint} is already frozen, and no running cephvol "
                           "snapshot holds the freeze (one killed with its record lost, or "
                           f"`fsfreeze` by someone else): `fsfreeze --unfreeze "
                           f"{self.mountpoint}` thaws it (`cephvol detach` does so itself)")
            if code == str(errno.EOPNOTSUPP):
                raise Unsupported(f"the filesystem at {self.mountpoint} cannot be frozen "
                                  f"(FIFREEZE: {text})")
            raise SystemCommandError(f"FIFREEZE {self.mountpoint} failed: {text}")
        raise SystemCommandError(f"the freeze helper for {self.mountpoint} ended without "
                                 f"freezing ({line or 'no answer'}, "
                                 f"{time.monotonic() - start:.1f}s)")

    def thaw(self, timeout: float = 10.0) -> str:
        """Thaw; returns why the child thawed: "asked", or "timeout" when
        the bound ran out first (the snapshot may then hold writes made
        after the thaw: not consistent)."""
        self._send("thaw")
        why = "eof"
        end = time.monotonic() + timeout
        while True:
            line = self._line(end - time.monotonic())
            if line is None or line == "":
                break
            if line.startswith("THAWED"):
                why = line.partition(" ")[2] or "asked"
                break
        self.thawed_why = why
        self.close()
        return why

    def close(self) -> None:
        """Let go of the child: closing its stdin makes it thaw if it has
        not; it is reaped if it ends soon, else left to end on its own."""
        if self.child is None:
            return
        for f in (self.child.stdin, self.child.stdout):
            with contextlib.suppress(OSError):
                if f:
                    f.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.child.wait(timeout=5)
        self.child = None

    def kill_for_test(self) -> None:
        """Test hook only: SIGKILL the child with the freeze held (what a
        cgroup-wide SIGKILL does), so the journal is all that is left."""
        if self.child:
            os.kill(self.child.pid, signal.SIGKILL)
            self.child.wait()

    def __enter__(self) -> FreezeHolder:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.child is not None:
            self.thaw()


# -- the child ---------------------------------------------------------------


def _pdeathsig(sig: int) -> None:
    import ctypes  # here: the parent never needs it

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)


def _say(line: str) -> None:
    with contextlib.suppress(OSError):
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def _child(mountpoint: str, bound: float) -> int:
    """Signals never raise here: each only writes to a wakeup pipe that the
    waits select on, so nothing can jump past the thaw."""
    parent = os.getppid()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: None)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    _pdeathsig(signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before prctl took effect
        return 1
    try:
        fd = _open_dir(mountpoint)
    except OSError as exc:
        _say(f"ERROR {exc.errno} cannot open {mountpoint}: {exc.strerror}")
        return 1
    # unbuffered: a line read must never leave the next one in a buffer select cannot see
    stdin = os.fdopen(0, "rb", buffering=0)
    # wait (bounded) for "freeze": the parent connects to the cluster meanwhile
    ready, _, _ = select.select([stdin, wake_r], [], [], 300)
    if stdin not in ready or stdin.readline().strip() != b"freeze":
        return 0
    try:
        fcntl.ioctl(fd, FIFREEZE, 0)
    except OSError as exc:
        _say(f"ERROR {exc.errno} {exc.strerror}")
        return 1
    deadline = time.monotonic() + bound
    why = "eof"
    _say("FROZEN")
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            why = "timeout"
            break
        ready, _, _ = select.select([stdin, wake_r], [], [], left)
        if wake_r in ready:
            why = "signal"
            break
        if stdin in ready:
            line = stdin.readline()
            if line.strip() == b"thaw":
                why = "asked"
            break  # "thaw", or EOF: the parent died or let go
    with contextlib.suppress(OSError):
        fcntl.ioctl(fd, FITHAW, 0)
    os.close(fd)
    _say(f"THAWED {why}")
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1], float(sys.argv[2])))
