"""Filesystems on mapped devices: probe, mkfs, fsck, mount, unmount.

The one rule that matters: never format a device that holds anything.
`probe` uses blkid's low-level probing (-p, no cache) on the device itself,
right before mkfs; only a verdict of "nothing at all" allows mkfs, and a
partition table, a non-filesystem signature (LUKS, LVM, RAID, swap) or an
ambiguous result is refused, not formatted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cephvol import proc
from cephvol.errors import Busy, Conflict, SystemCommandError, Unsafe, Unsupported, UsageError

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


def mkfs(device: str, fstype: str, extra_options: list[str] | None = None) -> None:
    """Make a filesystem, only after a fresh probe says the device is empty.

    No discard and lazy init: on a thin RBD image the device is already
    zeroes, and writing or discarding 100 GiB at mkfs would take minutes.
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
        argv = ["mkfs.ext4", "-q", *block, "-E",
                "nodiscard,lazy_itable_init=1,lazy_journal_init=1", *extra, device]
    else:
        argv = ["mkfs.xfs", "-q", "-K", *extra, device]
    proc.run(argv, timeout=600)


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
            raise Unsafe(f"e2fsck found errors on {device} it cannot fix safely "
                         f"(exit {res.returncode}); run e2fsck by hand, not mounting")
    elif fstype == "xfs" and mode == "force":
        res = proc.run(["xfs_repair", "-n", device], check=False, timeout=3600)
        if res.returncode != 0:
            raise Unsafe(f"xfs_repair -n found problems on {device}; not mounting")


def check_mountpoint(path: Path, mounts_at: list[str]) -> None:
    """Refuse a mountpoint that is a file or has something mounted on it;
    attach asks before it maps, so such a mistake changes nothing."""
    if str(path) in mounts_at:
        raise Busy(f"{path} is already a mountpoint of something else")
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise Conflict(f"mountpoint {path}: {p} exists and is not a directory")
            break


def ensure_mountpoint(path: Path, mounts_at: list[str]) -> None:
    """Create the directory (0755), refuse one that already has something mounted."""
    check_mountpoint(path, mounts_at)
    path.mkdir(parents=True, exist_ok=True, mode=0o755)


def mount(device: str, mountpoint: Path, fstype: str, options: list[str],
          read_only: bool) -> None:
    opts = list(options)
    if read_only and "ro" not in opts:
        opts.append("ro")
    if read_only and fstype == "ext4" and "noload" not in opts:
        opts.append("noload")  # no journal replay: a read-only mapping cannot take writes
    if read_only and fstype == "xfs" and "norecovery" not in opts:
        opts.append("norecovery")
    argv = ["mount", "-t", fstype]
    if opts:
        argv += ["-o", ",".join(opts)]
    proc.run([*argv, device, str(mountpoint)], timeout=300)


def umount(mountpoint: str, *, lazy: bool = False, timeout: float | None = None) -> None:
    argv = ["umount"] + (["-l"] if lazy else []) + [mountpoint]
    res = proc.run(argv, check=False, timeout=timeout or proc.step_timeout())
    if res.returncode != 0:
        msg = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "unknown error"
        if "busy" in msg.lower():
            raise Busy(f"{mountpoint} is busy")
        if "not mounted" in msg.lower() or "no mount point" in msg.lower():
            return
        raise SystemCommandError(f"umount {mountpoint} failed: {msg}")


def sync_fs(mountpoint: str) -> None:
    """Flush one filesystem (syncfs via `sync -f`), not a host-wide sync that
    may hang on others. A child process, so that with the cluster gone the
    flush is bounded by the step timeout instead of hanging cephvol itself."""
    if not os.path.isdir(mountpoint):
        return
    # an I/O error here (a dead rbd-fuse) is not fatal: umount flushes again
    # and reports what it cannot write; only a hang (timeout) stops detach
    proc.run(["sync", "--file-system", mountpoint], timeout=proc.step_timeout(), check=False)


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
    """Bytes the kernel currently sees for a block device (sysfs counts 512 B sectors)."""
    name = os.path.basename(device)
    try:
        return int((sys_root / "class" / "block" / name / "size").read_text()) * 512
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
