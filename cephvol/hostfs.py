"""Reading the host's kernel state: mountinfo, loop devices, processes.

Every function takes its root (`/proc`, `/sys`, a mountinfo path) as a
parameter, so the parsing is tested on real recorded trees and outputs. The
functions only read; changing the host is done elsewhere (proc, fs, backends).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
SYS = Path("/sys")


def _unescape(field: str) -> str:
    r"""mountinfo escapes space, tab, newline and backslash as \ooo octal."""
    if "\\" not in field:
        return field  # nearly every field: parsing mountinfo is most of a lookup
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


@dataclass(frozen=True)
class Mount:
    mount_id: int
    parent_id: int
    major: int
    minor: int
    root: str
    mountpoint: str
    options: str
    fstype: str
    source: str
    tags: tuple[str, ...] = ()  # optional fields: shared:N, master:N, propagate_from:N

    @property
    def peer_groups(self) -> set[str]:
        """Peer groups this mount shares events with (as peer or as receiving slave)."""
        return {t.split(":", 1)[1] for t in self.tags if t.split(":", 1)[0] in ("shared", "master")}

    @property
    def shared_group(self) -> str | None:
        for t in self.tags:
            if t.startswith("shared:"):
                return t.split(":", 1)[1]
        return None

    @property
    def devnum(self) -> tuple[int, int]:
        return (self.major, self.minor)

    @property
    def read_only(self) -> bool:
        return "ro" in self.options.split(",")


def parse_mountinfo(text: str) -> list[Mount]:
    """Parse /proc/<pid>/mountinfo (proc(5)); malformed lines are skipped."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        f = left.split()
        r = right.split()
        if len(f) < 6 or len(r) < 2:
            continue
        major, _, minor = f[2].partition(":")
        mounts.append(
            Mount(
                mount_id=int(f[0]),
                parent_id=int(f[1]),
                major=int(major),
                minor=int(minor),
                root=_unescape(f[3]),
                mountpoint=_unescape(f[4]),
                options=f[5],
                fstype=r[0],
                source=_unescape(r[1]),
                tags=tuple(f[6:]),
            )
        )
    return mounts


def read_mounts(mountinfo: Path = PROC / "self" / "mountinfo") -> list[Mount]:
    return parse_mountinfo(mountinfo.read_text())


def read_self(name: str, proc_self: Path | int = PROC / "self") -> str:
    """A file of /proc/self (`name` relative to it), read through `proc_self`:
    that path, or a descriptor of it opened before a setns (see mount_id_of).
    Files such as mountinfo describe the reader's namespace at open time."""
    if isinstance(proc_self, Path):
        return (proc_self / name).read_text()
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc_self)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks).decode(errors="surrogateescape")
    finally:
        os.close(fd)


def mount_id_of(path: str | Path, *, follow: bool = True,
                proc_self: Path | int = PROC / "self") -> int:
    """The id of the mount `path` resolves to (mountinfo's first field),
    learned without asking that filesystem anything.

    A stat asks the filesystem for attributes: on a FUSE mount whose daemon
    hangs (a fenced rbd-fuse waiting on the cluster) the caller then waits
    uninterruptibly, for good, and a SIGKILL does not free it. An O_PATH open
    only walks dentries (crossing a mount or a /proc magic link such as
    /proc/PID/cwd calls no filesystem code, and O_PATH opens nothing), and the
    kernel reports the file's mount in fdinfo. `follow=False` does not follow
    a final symlink: a link then answers its own directory's mount.

    `proc_self` is /proc/self, or a descriptor of it opened earlier: after
    setns into a container's namespace, /proc there may be the container's,
    where this process has no pid. Raises OSError as open(2) does.
    """
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW))
    try:
        return fd_mount_id(fd, proc_self)
    finally:
        os.close(fd)


def fd_mount_id(fd: int, proc_self: Path | int = PROC / "self") -> int:
    """The id of the mount an open descriptor of ours is on (fdinfo's mnt_id)."""
    mount_id = fdinfo_mount_id(read_self(f"fdinfo/{fd}", proc_self))
    if mount_id is None:
        raise OSError(0, f"no mnt_id in the fdinfo of descriptor {fd}")
    return mount_id


def fdinfo_mount_id(text: str) -> int | None:
    """The mnt_id line of a /proc/PID/fdinfo/N file, None without one."""
    for line in text.splitlines():
        if line.startswith("mnt_id:"):
            try:
                return int(line.split()[1])
            except (ValueError, IndexError):
                return None
    return None


def mounts_of_device(
    devnum: tuple[int, int], proc_root: Path = PROC
) -> dict[str, list[Mount]]:
    """Every mount of a device in every mount namespace we can see.

    Returns {namespace id: [mounts]}; a device mounted only inside a
    container's namespace still keeps the device busy, and detach has to say
    so instead of unmapping under it.
    """
    seen: dict[str, list[Mount]] = {}
    own_ns = _ns_id(proc_root / "self")
    for pid_dir in _pid_dirs(proc_root):
        ns = _ns_id(pid_dir)
        if ns is None or ns in seen:
            continue
        try:
            text = (pid_dir / "mountinfo").read_text()
        except OSError:
            continue
        seen[ns] = [m for m in parse_mountinfo(text) if m.devnum == devnum]
    if own_ns is not None and own_ns not in seen:
        seen[own_ns] = [m for m in read_mounts(proc_root / "self" / "mountinfo")
                        if m.devnum == devnum]
    return {ns: ms for ns, ms in seen.items() if ms}


def _ns_id(pid_dir: Path) -> str | None:
    try:
        return os.readlink(pid_dir / "ns" / "mnt")
    except OSError:
        return None


def _pid_dirs(proc_root: Path) -> Iterable[Path]:
    try:
        names = os.listdir(proc_root)
    except OSError:
        return []
    return [proc_root / n for n in names if n.isdigit()]


@dataclass(frozen=True)
class LoopDevice:
    name: str  # loop3
    major: int
    minor: int
    backing_file: str
    read_only: bool

    @property
    def path(self) -> str:
        return f"/dev/{self.name}"


def read_loop_devices(sys_root: Path = SYS, backing_prefix: str | None = None
                      ) -> list[LoopDevice]:
    """Bound loop devices from /sys/block/loop*/loop/backing_file.

    `backing_prefix`: only loops whose backing file starts with it. A backend
    looking for its own loop reads one file per other loop instead of three
    (the cost of a lookup grew with every volume attached on the host)."""
    out = []
    block = sys_root / "block"
    try:
        names = sorted(os.listdir(block))
    except OSError:
        return []
    for name in names:
        if not name.startswith("loop"):
            continue
        d = block / name
        try:
            backing = (d / "loop" / "backing_file").read_text().rstrip("\n")
            if backing_prefix is not None and not backing.startswith(backing_prefix):
                continue
            major, minor = (d / "dev").read_text().strip().split(":")
            ro = (d / "ro").read_text().strip() == "1"
        except (OSError, ValueError):
            continue  # unbound loop devices have no loop/ directory
        out.append(LoopDevice(name, int(major), int(minor), backing, ro))
    return out


def block_holders(name: str, sys_root: Path = SYS) -> list[str]:
    """Kernel-level users of a block device (device-mapper, md, ...)."""
    try:
        return sorted(os.listdir(sys_root / "block" / name / "holders"))
    except OSError:
        return []


@dataclass(frozen=True)
class Holder:
    pid: int
    command: str
    what: str  # "open fd", "cwd", "root"


def processes_using(
    devnum: tuple[int, int] | None = None,
    under: str | None = None,
    proc_root: Path = PROC,
) -> list[Holder]:
    """Processes holding the block device open, or a file / cwd below a path.

    This is what `fuser -m` does, done here so the message can name the
    holders without depending on psmisc's output format. Only fds whose
    target is under /dev/ are stat'ed for `devnum` (see below): a device
    node opened from elsewhere is not seen, a hang on a dead FUSE file is
    worse.
    """
    me = os.getpid()
    found: list[Holder] = []
    prefix = under.rstrip("/") + "/" if under else None
    for pid_dir in _pid_dirs(proc_root):
        pid = int(pid_dir.name)
        if pid == me:
            continue
        hit = None
        for link_name in ("cwd", "root"):
            if prefix and _link_under(pid_dir / link_name, prefix):
                hit = link_name
        if hit is None:
            # plain strings, not Paths: every fd of every process on the host
            # is looked at (thousands with a daemon per volume)
            fd_dir = f"{pid_dir}/fd"
            try:
                fds = os.listdir(fd_dir)
            except OSError:
                fds = []
            for fd in fds:
                p = f"{fd_dir}/{fd}"
                if prefix and _link_under(p, prefix):
                    hit = "open file"
                    break
                if devnum is not None:
                    # stat only what names a device node: stat follows the
                    # link into the file's filesystem, and a file on a FUSE
                    # mount whose daemon hangs (a fenced rbd-fuse) blocks
                    # the caller there uninterruptibly, for good
                    try:
                        if not os.readlink(p).startswith("/dev/"):
                            continue
                        st = os.stat(p)
                    except OSError:
                        continue
                    if stat.S_ISBLK(st.st_mode) and (
                        os.major(st.st_rdev), os.minor(st.st_rdev)) == devnum:
                        hit = "open device"
                        break
        if hit:
            found.append(Holder(pid, _comm(pid_dir), hit))
    return found


def _link_under(link: Path | str, prefix: str) -> bool:
    try:
        target = os.readlink(link)
    except OSError:
        return False
    return (target + "/").startswith(prefix)


def _comm(pid_dir: Path) -> str:
    try:
        return (pid_dir / "comm").read_text().strip()
    except OSError:
        return "?"


def processes_named(comm: str, proc_root: Path = PROC) -> dict[int, list[str]]:
    """Live processes named `comm` and their argv, in one pass over /proc
    (callers that look for many arguments must not rescan /proc for each)."""
    found: dict[int, list[str]] = {}
    want = comm.encode()
    # plain strings and bytes, not Paths: one comm read per process on the
    # host, on every lookup of a daemon-backed mapping
    for pid_dir in _pid_dirs(proc_root):
        d = str(pid_dir)
        try:
            with open(f"{d}/comm", "rb") as f:
                if f.read().strip() != want:
                    continue
            with open(f"{d}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"{d}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in (b"Z", b"X"):
            found[int(pid_dir.name)] = [a.decode(errors="replace") for a in argv if a]
    return found


def find_processes(comm: str, arg: str, proc_root: Path = PROC) -> list[int]:
    """Pids of live processes named `comm` whose argv contains `arg` exactly."""
    return sorted(pid for pid, argv in processes_named(comm, proc_root).items() if arg in argv)


def device_number(path: str) -> tuple[int, int]:
    st = os.stat(path)
    if not stat.S_ISBLK(st.st_mode):
        raise ValueError(f"{path} is not a block device")
    return (os.major(st.st_rdev), os.minor(st.st_rdev))


def process_state(pid: int, proc_root: Path = PROC) -> str | None:
    """The state letter of /proc/PID/stat (R, S, D, T stopped, t traced, Z...),
    None when there is no such process."""
    try:
        stat_line = (proc_root / str(pid) / "stat").read_text()
    except OSError:
        return None
    try:
        return stat_line.rsplit(")", 1)[1].split()[0]
    except IndexError:
        return None


def pid_alive(pid: int, proc_root: Path = PROC) -> bool:
    """True for a live process; a zombie is dead (this host's PID 1 reaps late)."""
    return process_state(pid, proc_root) not in (None, "Z", "X")


def stopped(pid: int | None, what: str, proc_root: Path = PROC) -> str | None:
    """Why the daemon `pid` cannot serve I/O although it is alive (stopped by
    SIGSTOP or held by a debugger), or None. Its writes are not lost: they
    wait until it is continued."""
    state = process_state(pid, proc_root) if pid else None
    if state in ("T", "t"):
        how = "stopped (SIGSTOP)" if state == "T" else "held by a debugger"
        return f"its {what} (pid {pid}) is {how}; `kill -CONT {pid}` lets it go on"
    return None
