"""Filesystems on mapped devices: probe, mkfs, fsck, mount, unmount.

The one rule that matters: never format a device that holds anything.
`probe` uses blkid's low-level probing (-p, no cache) on the device itself,
right before mkfs; only a verdict of "nothing at all" allows mkfs, and a
partition table, a non-filesystem signature (LUKS, LVM, RAID, swap) or an
ambiguous result is refused, not formatted.
"""

from __future__ import annotations

import errno
import json
import os
import select
import stat
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cephvol import hostfs, mountpoint, proc
from cephvol._os import mountapi
from cephvol.errors import (
    Busy,
    CephvolError,
    StepTimeout,
    SystemCommandError,
    Unsafe,
    Unsupported,
    UsageError,
)

FSTYPES = ("ext4", "xfs")
FSCK_MODES = ("auto", "skip", "force")


@dataclass(frozen=True)
class Probe:
    kind: str  # "empty", "filesystem", "partition-table", "other", "ambiguous"
    fstype: str | None = None
    detail: str = ""


def parse_blkid(returncode: int, stdout: str) -> Probe:
    """Interpret `blkid -p -o export DEV` (exit 2 = no signature, 8 = ambiguous)."""
    if returncode == 2:
        return Probe("empty")
    if returncode == 8:
        return Probe("ambiguous", detail="several signatures found")
    if returncode != 0:
        raise SystemCommandError(f"blkid failed (exit {returncode})")
    vals = {}
    for line in stdout.splitlines():
        k, sep, v = line.partition("=")
        if sep:
            vals[k.strip()] = v.strip()
    if "PTTYPE" in vals and "TYPE" not in vals:
        return Probe("partition-table", detail=f"partition table {vals['PTTYPE']}")
    fstype = vals.get("TYPE")
    if not fstype:
        return Probe("other", detail="unknown signature")
    usage = vals.get("USAGE", "filesystem")
    if usage != "filesystem":
        return Probe("other", fstype, detail=f"{fstype} ({usage})")
    return Probe("filesystem", fstype, detail=fstype)


def probe(device: str) -> Probe:
    res = proc.run(["blkid", "-p", "-o", "export", device], check=False, timeout=60)
    return parse_blkid(res.returncode, res.stdout)


def validate_fstype(fstype: str) -> str:
    if fstype not in FSTYPES:
        raise UsageError(f"unsupported filesystem {fstype!r}; choose {' or '.join(FSTYPES)}")
    return fstype


MAX_ID = 2**32 - 2  # (uid_t)-1 means "no change" to chown(2): not an owner


def parse_owner(text: str, label: str = "--owner") -> tuple[int, int]:
    """UID[:GID] as numbers (a container's users are not this host's names);
    GID 0 when only UID is given, as chown(1) leaves a new root's group."""
    uid, sep, gid = str(text).partition(":")
    parts = (uid, gid) if sep else (uid,)
    if not all(p.isascii() and p.isdigit() and len(p) <= 10 and int(p) <= MAX_ID
               for p in parts):
        raise UsageError(f"{label} {str(text)[:40]!r}: expected UID or UID:GID, numbers "
                         f"0 to {MAX_ID}")
    return int(uid), int(gid) if sep else 0


def _ext4_extended(extra: list[str], owner: tuple[int, int] | None) -> tuple[str, list[str]]:
    """mke2fs keeps only the last -E: fold the caller's -E values into ours
    (after them, so theirs win), and root_owner last, so --owner is never
    dropped by a `--mkfs-option -E ...`."""
    ext = ["nodiscard", "lazy_itable_init=1", "lazy_journal_init=1"]
    rest: list[str] = []
    i = 0
    while i < len(extra):
        o = extra[i]
        if o == "-E" and i + 1 < len(extra):
            ext.append(extra[i + 1])
            i += 2
            continue
        if o.startswith("-E") and len(o) > 2:
            ext.append(o[2:])
        else:
            rest.append(o)
        i += 1
    if owner is not None:
        ext.append(f"root_owner={owner[0]}:{owner[1]}")
    return ",".join(ext), rest


def mkfs(device: str, fstype: str, extra_options: list[str] | None = None,
         owner: tuple[int, int] | None = None) -> None:
    """Make a filesystem, only after a fresh probe says the device is empty.

    No discard and lazy init: on a thin RBD image the device is already
    zeroes, and writing or discarding 100 GiB at mkfs would take minutes.
    `owner` (uid, gid) owns the new root directory (mode 0755), set by mkfs
    itself (ext4 root_owner, an xfs protofile), so no crash between mkfs and
    a chown can leave a root-owned root, and a volume never mounted on the
    host (a container mounts the device) gets it too.
    """
    validate_fstype(fstype)
    p = probe(device)
    if p.kind != "empty":
        raise Unsafe(f"refusing to format {device}: it holds {p.detail or p.kind}")
    extra = list(extra_options or [])
    if fstype == "ext4":
        # 4 KiB blocks even on small images: mke2fs picks 1 KiB below 512 MiB,
        # and the kernel refuses to grow such a filesystem online (resize2fs:
        # "Permission denied"), which `cephvol resize` needs
        block = [] if any(o.startswith("-b") for o in extra) else ["-b", "4096"]
        ext, rest = _ext4_extended(extra, owner)
        proc.run(["mkfs.ext4", "-q", *block, "-E", ext, *rest, device], timeout=600)
        return
    if owner is None:
        proc.run(["mkfs.xfs", "-q", "-K", *extra, device], timeout=600)
        return
    if any(o.startswith("-p") for o in extra):
        raise UsageError("--owner and an xfs protofile (-p) do not go together")
    # mkfs.xfs has no root_owner: its protofile (boot image, two counts,
    # then the root directory's mode, uid, gid; "$" ends it) sets the root
    with tempfile.NamedTemporaryFile("w", prefix="cephvol-xfs-proto-") as proto:
        proto.write(f"/dev/null\n0 0\nd--755 {owner[0]} {owner[1]}\n$\n")
        proto.flush()
        proc.run(["mkfs.xfs", "-q", "-K", "-p", proto.name, *extra, device], timeout=600)


def fsck(device: str, fstype: str, mode: str) -> None:
    """Check before mount. ext4: e2fsck -p (preen) fixes only what is safe."""
    if mode not in FSCK_MODES:
        raise UsageError(f"--fsck must be one of {', '.join(FSCK_MODES)}")
    if mode == "skip":
        return
    if fstype == "ext4":
        argv = ["e2fsck", "-p"] + (["-f"] if mode == "force" else []) + [device]
        res = proc.run(argv, check=False, timeout=3600)
        if res.returncode >= 4:
            # e2fsck's own last words say what it found (proc.failure quotes them)
            raise Unsafe(f"e2fsck found errors on {device} it cannot fix safely "
                         f"({proc.failure(res).message}); run e2fsck by hand, not mounting")
    elif fstype == "xfs" and mode == "force":
        res = proc.run(["xfs_repair", "-n", device], check=False, timeout=3600)
        if res.returncode != 0:
            raise Unsafe(f"xfs_repair -n found problems on {device} "
                         f"({proc.failure(res).message}); not mounting")


def check_mountpoint(path: Path, mounts: Sequence[hostfs.Mount],
                     state_dir: Path | None = None) -> None:
    """Refuse a mountpoint outside policy (cephvol/mountpoint.py: no symlink
    in the path, no system directory, not the state directory, not already a
    mountpoint, no non-directory on the way); attach asks before it maps, so
    such a mistake changes nothing."""
    mountpoint.check(path, mounts, state_dir)


def ensure_mountpoint(path: Path, mounts: Sequence[hostfs.Mount],
                      state_dir: Path | None = None) -> None:
    """Create the missing directories (0755) without following links; the
    policy is checked again, since time has passed since check_mountpoint."""
    os.close(mountpoint.open_dir(path, mounts, state_dir, create=True))


# options mount(8) reads itself (fstab) and never hands to the kernel
_USERSPACE_OPTIONS = frozenset({"defaults", "auto", "noauto", "nofail", "_netdev", "nouser",
                                "rw", "suid", "dev", "exec", "atime", "diratime"})


def split_mount_options(options: Sequence[str], read_only: bool, fstype: str
                        ) -> tuple[list[str], int]:
    """(filesystem options for fsconfig, MOUNT_ATTR_* bits for fsmount).
    "ro" is both: the superblock read-only (no journal replay, no write to
    the device) and the mount read-only."""
    opts = list(options)
    if read_only and "ro" not in opts:
        opts.append("ro")
    if read_only and fstype == "ext4" and "noload" not in opts:
        opts.append("noload")  # no journal replay: a read-only mapping cannot take writes
    if read_only and fstype == "xfs" and "norecovery" not in opts:
        opts.append("norecovery")
    fs_opts: list[str] = []
    attrs = 0
    for o in opts:
        if o in _USERSPACE_OPTIONS or o.startswith("x-"):
            continue
        if o in mountapi.MOUNT_ATTRS:
            if o in ("noatime", "strictatime", "relatime"):
                attrs &= ~0x70
            attrs |= mountapi.MOUNT_ATTRS[o]
            if o == "ro":
                fs_opts.append("ro")
            continue
        fs_opts.append(o)
    return fs_opts, attrs


def mount(device: str, mountpoint_: Path, fstype: str, options: list[str],
          read_only: bool, *, state_dir: Path | None = None,
          use_mount_api: bool | None = None) -> None:
    """Mount through a descriptor of the checked directory (see
    cephvol/_os/mountapi.py), so nothing swapped into the path meanwhile can
    redirect it; a refusal carries the kernel's own reason. mount(8) is only
    the fallback for kernels without fsopen (use_mount_api=False forces it)."""
    fd = mountpoint.open_dir(mountpoint_, hostfs.read_mounts(), state_dir, create=False)
    try:
        fs_opts, attrs = split_mount_options(options, read_only, fstype)
        if use_mount_api is None or use_mount_api:
            klog = mountapi.KernelLog()
            try:
                _bounded_in_child(lambda: mountapi.mount_at(fd, fstype, device, fs_opts, attrs),
                                  f"mount {device} at {mountpoint_}")
                return
            except mountapi.MountAPIError as exc:
                reason = exc.reason
                if not any(m.startswith("e ") for m in exc.messages):
                    reason = _kernel_reason(klog.read_new(), device, fstype) or reason
                raise SystemCommandError(
                    f"mount {device} ({fstype}) at {mountpoint_} failed: {reason}") from exc
            except OSError as exc:
                if exc.errno != errno.ENOSYS or use_mount_api:
                    raise SystemCommandError(
                        f"mount {device} at {mountpoint_} failed: {exc.strerror}") from exc
            finally:
                klog.close()
        _mount_legacy(device, fd, mountpoint_, fstype, options, read_only)
    finally:
        os.close(fd)


def _bounded_in_child(fn: Callable[[], None], what: str) -> None:
    """Run `fn` (a mount through the new API) in a forked child and wait at
    most the step timeout. Mounting reads the superblock: on a mapping whose
    daemon waits on an OSD that does not answer, that read sleeps unkillably,
    and that must be a child we can abandon, never cephvol itself (a unit
    could not be stopped). The child reports OSError/MountAPIError back."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only syscalls, then _exit
        os.close(r)
        code = 0
        try:
            fn()
            out = b"ok"
        except mountapi.MountAPIError as exc:
            out = json.dumps({"errno": exc.errno, "call": exc.call,
                              "messages": exc.messages}).encode()
        except OSError as exc:
            out = json.dumps({"errno": exc.errno or 5, "call": None, "messages": []}).encode()
        except BaseException:
            out, code = b"", 70
        try:
            os.write(w, out)
        finally:
            os._exit(code)
    os.close(w)
    bound = proc.step_timeout()
    try:
        ready, _, _ = select.select([r], [], [], bound)
        if not ready:
            _abandoned_children.append(pid)
            raise StepTimeout(f"{what} did not finish within {bound:g}s (the device does not "
                              "answer: is the cluster reachable?)")
        chunks = []
        while True:
            b = os.read(r, 65536)
            if not b:
                break
            chunks.append(b)
        os.waitpid(pid, 0)
    finally:
        os.close(r)
    data = b"".join(chunks)
    if data == b"ok":
        return
    if not data:
        raise SystemCommandError(f"{what} failed: the mount helper died")
    d = json.loads(data)
    if d["call"] is None:
        raise OSError(d["errno"], os.strerror(d["errno"]))
    raise mountapi.MountAPIError(d["errno"], d["call"], d["messages"])


# forked mount helpers abandoned after a timeout (in the kernel, unkillable)
_abandoned_children: list[int] = []


def _kernel_reason(lines: list[str], device: str, fstype: str) -> str | None:
    """The kernel log line about this mount: "EXT4-fs (loop3): ...", "XFS (loop3): ..."
    (the kernel's name: dm-0 for /dev/mapper/NAME)."""
    name = os.path.basename(os.path.realpath(device))
    tags = (f"({name})", f"{fstype}:", f"{fstype.upper()}-fs", f"{fstype.upper()}:")
    hits = [ln for ln in lines if any(t in ln for t in tags)]
    return hits[-1] if hits else None


def _mount_legacy(device: str, fd: int, shown: Path, fstype: str, options: list[str],
                  read_only: bool) -> None:
    """mount(8) onto /proc/PID/fd/N: the kernel resolves that magic link to
    the directory the descriptor holds, not to whatever the path is now."""
    opts = list(options)
    if read_only:
        opts += [o for o in ("ro", {"ext4": "noload", "xfs": "norecovery"}.get(fstype, ""))
                 if o and o not in opts]
    argv = ["mount", "--no-canonicalize", "-t", fstype]
    if opts:
        argv += ["-o", ",".join(opts)]
    klog = mountapi.KernelLog()
    try:
        res = proc.run([*argv, device, f"/proc/{os.getpid()}/fd/{fd}"], timeout=300,
                       check=False)
        if res.returncode != 0:
            why = _kernel_reason(klog.read_new(), device, fstype)
            raise SystemCommandError(f"mount {device} ({fstype}) at {shown} failed: "
                                     f"{why or proc.failure(res).message}")
    finally:
        klog.close()


def umount(mountpoint_: str, *, lazy: bool = False, timeout: float | None = None,
           device: str | None = None) -> None:
    """Unmount exactly the volume's mount: the parent is opened without
    following links, the mount on it is checked to be `device`'s (when
    given), and umount2(UMOUNT_NOFOLLOW) is pointed at that through
    /proc/PID/fd, in a child so a flush stuck on a lost cluster stays
    bounded by the step timeout."""
    try:
        opened = mountpoint.open_parent(mountpoint_, "mountpoint")
    except CephvolError as exc:
        raise Unsafe(f"not unmounting {mountpoint_}: {exc.message}") from exc
    if opened is None:
        return  # nothing there any more
    pfd, name = opened
    try:
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(st.st_mode):
            raise Unsafe(f"not unmounting {mountpoint_}: it is a symlink now")
        if device is not None:
            want = hostfs.device_number(device)
            if (os.major(st.st_dev), os.minor(st.st_dev)) != want:
                if not any(m.mountpoint == mountpoint_ and m.devnum == want
                           for m in hostfs.read_mounts()):
                    return  # the volume is not mounted there (any more)
                raise Busy(f"something else is mounted over {device} at {mountpoint_}; "
                           "not unmounting it")
        # the parent as this process's descriptor: a path that cannot be
        # redirected, and UMOUNT_NOFOLLOW for the last name
        target = f"/proc/{os.getpid()}/fd/{pfd}/{name}"
        res = proc.run(mountapi.umount_argv(target, lazy=lazy), check=False,
                       timeout=timeout or proc.step_timeout())
    finally:
        os.close(pfd)
    if res.returncode == errno.EBUSY:
        raise Busy(f"{mountpoint_} is busy")
    if res.returncode in (errno.EINVAL, errno.ENOENT):
        return  # not a mountpoint (any more)
    if res.returncode != 0:
        why = os.strerror(res.returncode) if res.returncode < 256 else "unknown error"
        raise SystemCommandError(f"umount {mountpoint_} failed: {why}"
                                 + (f" ({res.stderr.strip()[-200:]})" if res.stderr.strip()
                                    else ""))


def sync_fs(mountpoint: str) -> str | None:
    """Flush one filesystem (syncfs via `sync -f`), not a host-wide sync that
    may hang on others. A child process, so that with the cluster gone the
    flush is bounded by the step timeout instead of hanging cephvol itself.

    Returns None when everything reached the device, else the reason. syncfs
    reports writeback errors (errseq) that happened since the file was opened
    or that nobody has seen yet: a dead rbd-fuse, a fenced client. Such a
    failure must never become "detached": the caller decides."""
    if not os.path.isdir(mountpoint):
        return None
    res = proc.run(["sync", "--file-system", mountpoint], timeout=proc.step_timeout(),
                   check=False)
    if res.returncode == 0:
        return None
    err = res.stderr.strip().splitlines()
    why = err[-1].rsplit(": ", 1)[-1] if err else f"sync exit {res.returncode}"
    return why


CAP_SYS_RESOURCE = 24


def has_capability(cap: int, status: Path = Path("/proc/self/status")) -> bool:
    for line in status.read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> cap & 1)
    return False


def grow(device: str, fstype: str, mountpoint: str) -> None:
    """Grow a mounted filesystem to fill its (already grown) device, online."""
    if fstype == "ext4":
        res = proc.run(["resize2fs", device], timeout=3600, check=False)
        if res.returncode != 0:
            if not has_capability(CAP_SYS_RESOURCE):
                raise Unsupported(
                    f"the kernel refused to grow ext4 on {device} online: this process "
                    "lacks CAP_SYS_RESOURCE (a restricted container?); the image and "
                    "device are grown, and the next `cephvol attach` after a detach "
                    "grows the filesystem offline")
            raise proc.failure(res)
    elif fstype == "xfs":
        proc.run(["xfs_growfs", mountpoint], timeout=3600)
    else:
        raise Unsupported(f"cannot grow a {fstype} filesystem")


def device_size(device: str, sys_root: Path = Path("/sys")) -> int:
    """Bytes the kernel currently sees for a block device (sysfs counts 512 B
    sectors), found by its device number: /dev/mapper/NAME has no sysfs name."""
    try:
        major, minor = hostfs.device_number(device)
        return int((sys_root / "dev" / "block" / f"{major}:{minor}" / "size").read_text()) * 512
    except (OSError, ValueError) as exc:
        raise SystemCommandError(f"cannot read the size of {device} from sysfs") from exc


def ext4_bytes(device: str) -> int:
    """The size an (unmounted or mounted) ext4 filesystem believes it has."""
    res = proc.run(["dumpe2fs", "-h", device], timeout=60)
    vals = {}
    for line in res.stdout.splitlines():
        k, sep, v = line.partition(":")
        if sep:
            vals[k.strip()] = v.strip()
    try:
        return int(vals["Block count"]) * int(vals["Block size"])
    except (KeyError, ValueError) as exc:
        raise SystemCommandError(f"dumpe2fs {device}: no block count in its output") from exc


def grow_offline_if_needed(device: str, fstype: str, sys_root: Path = Path("/sys")) -> bool:
    """Before mount: grow an ext4 filesystem that is smaller than its device
    (an earlier `cephvol resize` could not grow it online). xfs grows only
    mounted, so `resize` always does it online."""
    if fstype != "ext4":
        return False
    if device_size(device, sys_root) - ext4_bytes(device) < (1 << 20):
        return False
    # resize2fs wants a full check first; -p only repairs what is safe
    res = proc.run(["e2fsck", "-f", "-p", device], check=False, timeout=3600)
    if res.returncode >= 4:
        raise Unsafe(f"e2fsck found errors on {device} it cannot fix safely "
                     f"(exit {res.returncode}); not growing or mounting it")
    proc.run(["resize2fs", device], timeout=3600)
    return True
