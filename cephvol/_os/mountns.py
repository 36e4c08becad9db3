"""Other mount namespaces: who uses a volume there, who lives there, and
unmounting a leftover copy of a volume's mount from inside one.

A container started while a volume is mounted, binding a parent of the
mountpoint (`-v /srv:/host-srv`, `-v /:/rootfs:ro`) with the engines' default
private propagation, keeps its own copy of the mount; our umount does not
reach it, and the device stays in use (Docker's "device or resource busy").
Such a copy can be removed from inside that namespace only: a short-lived
child enters it (setns(CLONE_NEWNS), which a multi-threaded process may not
do, hence the fork) and calls umount2 without MNT_DETACH. That fails with
EBUSY while anything there still has a file, a cwd or a root on the copy, so
a copy in use is never taken away; nothing is lost, the caller refuses.

Python 3.11 has no os.setns, hence ctypes (as in netns.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cephvol.errors import Busy, NotFound, StepTimeout, SystemCommandError
from cephvol.hostfs import fdinfo_mount_id, mount_id_of, parse_mountinfo, read_self
from cephvol.waiting import wait_for

CLONE_NEWNS = 0x00020000
UMOUNT_NOFOLLOW = 0x8
PROC = Path("/proc")
# exit codes of the child, beside an errno from umount2 (errnos are below 100)
_NOT_THAT_MOUNT = 100  # after setns, the path is not a mount of the device
_SETNS_FAILED = 101
_CHILD_FAILED = 102  # anything else; the child writes why to a pipe
_COVERED = 103  # the copy is there, under another mount stacked on it


class Covered(Busy):
    """The copy is still there, under another mount stacked on it in that
    namespace: not ours to take away, and the copy under it stays."""


@dataclass(frozen=True)
class User:
    """A process in a namespace using a volume there."""

    pid: int
    command: str
    what: str  # "open file", "cwd", "root", "mapped file"


def namespace_of(pid: int, proc_root: Path = PROC) -> str | None:
    try:
        return os.readlink(proc_root / str(pid) / "ns" / "mnt")
    except OSError:
        return None


def users_in_namespace(ns: str, devnum: tuple[int, int], proc_root: Path = PROC
                       ) -> list[User]:
    """Processes whose mount namespace is `ns` and that have a file of the
    filesystem on `devnum` open, mapped, or as cwd or root.

    Everything is matched by mount (mnt_id against that namespace's mounts
    of the device), never by a stat: a stat of a file, a cwd or a root on a
    hung FUSE filesystem (a fenced rbd-fuse, whose mount has copies in every
    namespace made while it was mounted) waits for good. Open files by
    fdinfo's mnt_id, the cwd and root by hostfs.mount_id_of, independent of
    how paths of another namespace (or a chroot in it) read from here.
    """
    found: list[User] = []
    ids: set[int] | None = None
    try:
        names = os.listdir(proc_root)
    except OSError:
        return []
    for name in names:
        if not name.isdigit():
            continue
        d = proc_root / name
        try:
            if os.readlink(d / "ns" / "mnt") != ns:
                continue
            if ids is None:
                ids = {m.mount_id for m in parse_mountinfo((d / "mountinfo").read_text())
                       if m.devnum == devnum}
        except OSError:
            continue
        what = _use(d, devnum, ids)
        if what:
            found.append(User(int(name), _comm(d), what))
    return found


def _mnt_id(fdinfo: Path) -> int | None:
    try:
        return fdinfo_mount_id(fdinfo.read_text())
    except OSError:
        return None


def _use(pid_dir: Path, devnum: tuple[int, int], mount_ids: set[int]) -> str | None:
    for link in ("cwd", "root"):
        try:
            if mount_id_of(pid_dir / link) in mount_ids:
                return link
        except OSError:
            pass  # gone, or a kernel thread without one
    try:
        fds = os.listdir(pid_dir / "fdinfo")
    except OSError:
        fds = []
    for fd in fds:
        if _mnt_id(pid_dir / "fdinfo" / fd) in mount_ids:
            return "open file"
    want = f"{devnum[0]:02x}:{devnum[1]:02x}"
    try:
        maps = (pid_dir / "maps").read_text()
    except OSError:
        maps = ""
    for line in maps.splitlines():
        f = line.split()
        if len(f) >= 5 and f[3] == want and f[4] != "0":
            return "mapped file"
    return None


def _comm(pid_dir: Path) -> str:
    try:
        return (pid_dir / "comm").read_text().strip()
    except OSError:
        return "?"


# -- who lives in a namespace ---------------------------------------------------------------

_DOCKER = re.compile(r"docker[-/]([0-9a-f]{64})")
_PODMAN = re.compile(r"libpod-([0-9a-f]{64})")


def container_of(pid: int, proc_root: Path = PROC) -> str | None:
    """'docker container NAME' / 'podman container NAME' for a process in a
    container, from its cgroup (docker-ID.scope, libpod-ID.scope) and the
    engine's own records: Docker's config.v2.json under dockerd's data root,
    Podman's conmon (`-c ID ... -n NAME`). None when it is not one of theirs."""
    try:
        cgroup = (proc_root / str(pid) / "cgroup").read_text()
    except OSError:
        return None
    if m := _DOCKER.search(cgroup):
        cid = m.group(1)
        return f"docker container {_docker_name(cid, proc_root) or cid[:12]}"
    if m := _PODMAN.search(cgroup):
        cid = m.group(1)
        return f"podman container {_conmon_name(cid, proc_root) or cid[:12]}"
    return None


def _argvs(comm: str, proc_root: Path) -> list[list[str]]:
    out = []
    for name in os.listdir(proc_root):
        if name.isdigit() and _comm(proc_root / name) == comm:
            try:
                raw = (proc_root / name / "cmdline").read_bytes()
            except OSError:
                continue
            out.append([a.decode(errors="replace") for a in raw.split(b"\0") if a])
    return out


def _option(argv: list[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def _docker_name(cid: str, proc_root: Path) -> str | None:
    roots = [_option(a, "--data-root") for a in _argvs("dockerd", proc_root)]
    for root in [r for r in roots if r] + ["/var/lib/docker"]:
        try:
            cfg = json.loads((Path(root) / "containers" / cid / "config.v2.json").read_text())
        except (OSError, ValueError):
            continue
        name = cfg.get("Name") if isinstance(cfg, dict) else None
        if isinstance(name, str) and name.strip("/"):
            return name.strip("/")
    return None


def _conmon_name(cid: str, proc_root: Path) -> str | None:
    for argv in _argvs("conmon", proc_root):
        if _option(argv, "-c") == cid or _option(argv, "--cid") == cid:
            return _option(argv, "-n") or _option(argv, "--name")
    return None


# -- unmounting a copy inside another namespace ---------------------------------------------


def umount_copy(pid: int, ns: str, mountpoint: str, devnum: tuple[int, int], *,
                timeout: float = 30.0, proc_root: Path = PROC) -> None:
    """Unmount `mountpoint` (a path as seen inside the namespace) of the
    device `devnum` inside the mount namespace `ns`, entered through `pid`.

    Non-lazy: raises Busy when anything in that namespace has it open. Checks,
    before and after entering, that it is still that namespace (a pid can be
    reused) and that the path is a mount of that device (a path inside a
    container can be a symlink the container made)."""
    try:
        fd = os.open(proc_root / str(pid) / "ns" / "mnt", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return  # the namespace's last process is gone, and the copy with it
    except OSError as exc:
        raise SystemCommandError(f"cannot open the mount namespace of pid {pid}: "
                                 f"{exc.strerror}") from exc
    try:
        if namespace_of(pid, proc_root) != ns:
            return  # pid reused: the namespace we saw is gone
        libc = ctypes.CDLL(None, use_errno=True)  # loaded before the fork
        setns, umount2 = libc.setns, libc.umount2
        rd, wr = os.pipe()
        child = os.fork()
        if child == 0:  # pragma: no cover - runs in the child, reported by exit code
            os.close(rd)
            code = _child(fd, mountpoint, devnum, setns, umount2, wr)
            os._exit(code)
        os.close(wr)
    finally:
        os.close(fd)
    try:
        code = _wait(child, timeout)
        why = os.read(rd, 512).decode(errors="replace").strip()
    finally:
        os.close(rd)
    if code == 0 or code == errno.EINVAL:  # EINVAL: no longer a mount point
        return
    if code == errno.EBUSY:
        raise Busy(f"{mountpoint} is in use inside the mount namespace of pid {pid}")
    if code == errno.ENOENT:
        return
    if code == _COVERED:
        raise Covered(f"{mountpoint} in the mount namespace of pid {pid} is covered by another "
                   "mount there; the copy of the volume under it stays")
    if code == _NOT_THAT_MOUNT:
        raise NotFound(f"{mountpoint} in the mount namespace of pid {pid} is not a mount "
                       "of the volume any more; not unmounting it")
    what = {_SETNS_FAILED: "setns failed", _CHILD_FAILED: why or "the helper failed"}.get(
        code, os.strerror(code))
    raise SystemCommandError(f"cannot unmount {mountpoint} in the mount namespace of "
                             f"pid {pid}: {what}")


def _child(fd: int, mountpoint: str, devnum: tuple[int, int],
           setns: Callable[..., int], umount2: Callable[..., int],
           report: int) -> int:  # pragma: no cover - runs in a forked child
    """Exit code: 0, an errno of umount2, or one of ours (above 64); on
    _CHILD_FAILED the reason goes to `report` (exit codes are too narrow to
    carry it, and errno 1 would read as EPERM).

    Known gap: the check and the umount2 are two steps by path, so root inside
    that namespace stacking a mount on the path in between would see that one
    unmounted (if unused). Unmounting through the checked descriptor would
    close it, but a descriptor pins its mount (EBUSY)."""
    try:
        # /proc/self before setns: a container's namespace may have its own
        # /proc, in which this process has no pid
        proc_self = os.open(PROC / "self", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        if setns(fd, CLONE_NEWNS) != 0:
            return _SETNS_FAILED
        found = _copy_at(mountpoint, devnum, proc_self)
        if found:
            return found
        if umount2(mountpoint.encode(), UMOUNT_NOFOLLOW) != 0:
            return ctypes.get_errno() or _CHILD_FAILED
        return 0
    except FileNotFoundError:
        return errno.ENOENT
    except BaseException as exc:  # reported, never raised out of a fork
        with contextlib.suppress(OSError):
            os.write(report, f"{type(exc).__name__}: {exc}"[:500].encode())
        return _CHILD_FAILED


def _copy_at(path: str, devnum: tuple[int, int], proc_self: Path | int) -> int:
    """0 when `path` is, in the calling process's mount namespace, the root
    of a mount of `devnum`; _COVERED when such a mount is at `path` under
    another one; else _NOT_THAT_MOUNT. Decided by mount, never by a stat of
    the mount: the path (a final link not followed) resolves to a mount whose
    mountpoint in this namespace's table is exactly `path` and whose device
    is `devnum`. A stat would ask the filesystem: a FUSE mount whose daemon
    died answers ENOTCONN, and one whose daemon hangs (a fenced rbd-fuse)
    never answers, leaving the caller unkillable."""
    path = path.rstrip("/") or "/"
    mount_id = mount_id_of(path, follow=False, proc_self=proc_self)
    table = parse_mountinfo(read_self("mountinfo", proc_self))
    top = next((m for m in table if m.mount_id == mount_id), None)
    if top is not None and top.mountpoint == path and top.devnum == devnum:
        return 0
    if any(m.mountpoint == path and m.devnum == devnum for m in table):
        return _COVERED
    return _NOT_THAT_MOUNT


def is_mount_of(path: str, devnum: tuple[int, int],
                proc_self: Path | int = PROC / "self") -> bool:
    """Whether `path` is, in the calling process's mount namespace, the root
    of a mount of the filesystem `devnum` (not a symlink to one, nor reached
    through one, nor covered by another mount): see _copy_at. `proc_self` as
    in hostfs.mount_id_of."""
    return _copy_at(path, devnum, proc_self) == 0


def _wait(child: int, timeout: float) -> int:
    """The child's exit code; a child stuck past the timeout is killed."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status = os.waitpid(child, os.WNOHANG)
        if pid:
            return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 1
        if time.monotonic() > deadline:
            os.kill(child, signal.SIGKILL)
            # reaped if it dies now; a child stuck in the kernel (a request to
            # a hung FUSE daemon) ignores SIGKILL, and waiting for it would
            # hang this command too: it is left to be reaped when it returns
            wait_for(lambda: os.waitpid(child, os.WNOHANG)[0], timeout=1.0,
                     interval=0.01, max_interval=0.1)
            raise StepTimeout(f"unmounting a copy in another mount namespace took over "
                              f"{timeout:.0f} s")
        time.sleep(0.01)
