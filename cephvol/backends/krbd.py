"""krbd: the kernel's own RBD client, driven through /sys/bus/rbd.

No `rbd` CLI: monitor addresses come from the monmap (librados), the cephx
secret goes into this process's kernel keyring (add_key) and the map string
names it with `key=`, so the secret is in no argv, log or sysfs string. The
write to add_single_major returns no id; the new device is found by its
sysfs attributes, its block device awaited with a netlink uevent listener
(plus a sysfs re-check, so an event that fired before we listened is not
missed), and /dev/rbdN's major:minor checked against sysfs before use.

An image librbd encrypted (LUKS, cephvol/data/encryption.py) is opened on
top of /dev/rbdN with dm-crypt (cephvol/_os/dmcrypt.py): the mapping's
device is then /dev/mapper/cephvol-..., extra["raw_device"] the rbd device
under it. Its crash points: krbd-map (mapped, not opened: the next attach
opens it, detach unmaps it) and krbd-luks-close (closed, not unmapped).

Format reference: Documentation/ABI/testing/sysfs-bus-rbd in the kernel, and
Ceph's src/krbd.cc (which does the same steps for `rbd map`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import select
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cephvol import proc
from cephvol._os import dmcrypt
from cephvol.backends.base import Backend, MapOptions, Mapping, Support, flush_before_unmap
from cephvol.crashpoint import crash_point
from cephvol.errors import (
    Busy,
    CephvolError,
    ClusterError,
    NotFound,
    StepTimeout,
    SystemCommandError,
    Unsupported,
    UsageError,
)
from cephvol.spec import ImageSpec

# Options cephvol lets through to the kernel (rbd.c's rbd_opts_tokens and
# libceph's options); anything else is refused before it reaches the kernel.
KNOWN_OPTIONS = {
    "read_only", "ro", "read_write", "rw", "exclusive", "lock_timeout", "lock_on_read",
    "queue_depth", "alloc_size", "notrim", "trim", "mount_timeout", "osd_request_timeout",
    "noshare", "share", "crc", "nocrc", "cephx_require_signatures", "tcp_nodelay",
    "ms_mode", "osdkeepalive", "osd_idle_ttl", "noceph_x_sign_messages", "compression_hint",
    "read_from_replica", "rxbounce",
}


@dataclass(frozen=True)
class KrbdDevice:
    dev_id: int
    pool: str
    pool_ns: str
    name: str
    current_snap: str
    major: int
    minor: int
    client_id: str
    read_only: bool
    exclusive: bool = False  # mapped with `exclusive`: the kernel never hands the lock over

    @property
    def snap(self) -> str | None:
        return None if self.current_snap == "-" else self.current_snap

    def spec(self) -> ImageSpec:
        return ImageSpec(self.pool, self.pool_ns, self.name, self.snap)


def _attr(d: Path, name: str, default: str = "") -> str:
    try:
        return (d / name).read_text().rstrip("\n")
    except OSError:
        return default


def read_devices(sys_root: Path) -> list[KrbdDevice]:
    """Parse /sys/bus/rbd/devices/<id>/ (sysfs-bus-rbd ABI)."""
    base = sys_root / "bus" / "rbd" / "devices"
    out = []
    try:
        names = os.listdir(base)
    except OSError:
        return []
    for n in sorted(names, key=lambda x: int(x) if x.isdigit() else -1):
        if not n.isdigit():
            continue
        d = base / n
        try:
            major = int(_attr(d, "major"))
            minor_txt = _attr(d, "minor")  # only with single_major; else 0
            minor = int(minor_txt) if minor_txt else 0
        except ValueError:
            continue
        ro = False
        # the block device's ro flag lives under /sys/block/rbdN
        ro_txt = _attr(sys_root / "block" / f"rbd{n}", "ro", "0")
        ro = ro_txt.strip() == "1"
        # config_info is the map string: "<mons> <options> <pool> <image> <snap>"
        words = _attr(d, "config_info").split()
        options = words[1].split(",") if len(words) > 1 else []
        out.append(KrbdDevice(
            dev_id=int(n), pool=_attr(d, "pool"), pool_ns=_attr(d, "pool_ns"),
            name=_attr(d, "name"), current_snap=_attr(d, "current_snap", "-") or "-",
            major=major, minor=minor, client_id=_attr(d, "client_id"), read_only=ro,
            exclusive="exclusive" in options))
    return out


def build_add_string(mon_addrs: list[str], client_id: str, options: list[str],
                     spec: ImageSpec) -> str:
    """`<mons> name=<id>,key=client.<id>[,opts] <pool> <image> <snap|->` (krbd.cc)."""
    if not mon_addrs:
        raise ClusterError("no monitor addresses in the monmap")
    opts = [f"name={client_id}", f"key=client.{client_id}"]
    if spec.namespace:
        opts.append(f"_pool_ns={spec.namespace}")
    opts += options
    return f"{','.join(mon_addrs)} {','.join(opts)} {spec.pool} {spec.image} {spec.snap or '-'}"


def kernel_options(opts: MapOptions, read_only: bool, extra: list[str] | None = None
                   ) -> list[str]:
    out = []
    if read_only:
        out.append("read_only")
    if opts.exclusive:
        out.append("exclusive")
    if opts.lock_timeout is not None:
        out.append(f"lock_timeout={opts.lock_timeout}")
    if opts.queue_depth is not None:
        out.append(f"queue_depth={opts.queue_depth}")
    if opts.notrim:
        out.append("notrim")
    for o in extra or []:
        name = o.split("=", 1)[0]
        if name not in KNOWN_OPTIONS or not re.fullmatch(r"[a-z_]+(=[A-Za-z0-9_.:-]+)?", o):
            raise UsageError(f"unknown or malformed krbd option {o!r}")
        out.append(o)
    return out


def mon_v1_addrs(monmap: dict[str, Any]) -> list[str]:
    """Monitor addresses from `mon dump --format json`, v1 (legacy) first.

    The kernel speaks msgr1 by default; msgr2 needs ms_mode, which cephvol
    leaves to the operator.
    """
    addrs = []
    for mon in monmap.get("mons", []):
        vec = mon.get("public_addrs", {}).get("addrvec", [])
        v1 = [a["addr"] for a in vec if a.get("type") == "v1"]
        if v1:
            addrs.append(v1[0])
        elif mon.get("addr"):
            addrs.append(mon["addr"].split("/")[0])
    return addrs


class SysfsRbd:
    """The kernel's rbd bus control files; the only code that writes them."""

    def __init__(self, sys_root: Path) -> None:
        self.bus = sys_root / "bus" / "rbd"

    def available(self) -> bool:
        return (self.bus / "add_single_major").exists() or (self.bus / "add").exists()

    def add(self, text: str) -> None:
        for name in ("add_single_major", "add"):
            path = self.bus / name
            if not path.exists():
                continue
            try:
                _write(path, text)
                return
            except OSError as exc:
                raise _map_error(exc) from None
        raise Unsupported("kernel has no rbd driver (no /sys/bus/rbd/add)")

    def remove(self, dev_id: int, force: bool, *, attempts: int = 8) -> None:
        name = "remove_single_major" if (self.bus / "remove_single_major").exists() else "remove"
        text = f"{dev_id}{' force' if force else ''}"
        delay = 0.1
        for i in range(attempts):
            try:
                _write(self.bus / name, text)
                return
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    return  # already gone
                if exc.errno == errno.EBUSY and i < attempts - 1:
                    time.sleep(delay)  # udev's blkid often holds it right after close
                    delay = min(delay * 2, 2.0)
                    continue
                if exc.errno == errno.EBUSY:
                    raise Busy(f"rbd{dev_id} is busy (open or mounted); not unmapped") from None
                raise SystemCommandError(f"unmap rbd{dev_id}: {os.strerror(exc.errno or 0)}"
                                         ) from None


def _write(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _map_error(exc: OSError) -> Exception:
    """Kernel errnos from a map write, in words (the string itself is not repeated)."""
    e = exc.errno
    if e == errno.ENOENT:
        return NotFound("the kernel could not find the pool, image or snapshot")
    if e in (errno.EACCES, errno.EPERM):
        return ClusterError("the kernel was refused by the cluster (key or caps)")
    if e == errno.EINVAL:
        return UsageError("the kernel rejected the map request (an option or feature it does "
                          "not support; see dmesg)")
    if e == errno.ETIMEDOUT:
        return StepTimeout("the kernel timed out talking to the cluster")
    if e == errno.EROFS:
        return Busy("the image's exclusive lock is held by another client")
    if e == errno.ENXIO:
        return Unsupported("the image uses features this kernel does not support; "
                           "disable them (rbd feature disable) or use the nbd backend")
    return SystemCommandError(f"krbd map failed: {os.strerror(e or 0)}")


class KrbdBackend(Backend):
    name = "krbd"

    @property
    def kernel(self) -> SysfsRbd:
        return SysfsRbd(self.paths.sys_root)

    def support(self) -> Support:
        if self.kernel.available():
            return Support(True, "kernel rbd driver present")
        return Support(False, f"kernel has no rbd driver ({self.paths.sys_root}/bus/rbd is "
                       "missing; `modprobe rbd` needs the module and permission)")

    def list_mappings(self) -> list[Mapping]:
        return [self._mapping(d) for d in read_devices(self.paths.sys_root)]

    def decrypts(self) -> str | None:
        why = dmcrypt.available(self.paths.sys_root)
        return f"the krbd backend cannot decrypt it here ({why})" if why else None

    def _mapping(self, d: KrbdDevice) -> Mapping:
        raw = str(self.paths.dev_root / f"rbd{d.dev_id}")
        extra: dict[str, Any] = {"major": d.major, "minor": d.minor, "client_id": d.client_id,
                                 "exclusive": d.exclusive}
        device = raw
        opened = dmcrypt.holder_of(f"rbd{d.dev_id}", self.paths.sys_root)
        if opened is not None:
            device = str(self.paths.dev_root / "mapper" / opened.name)
            extra.update(raw_device=raw, crypt_name=opened.name, encryption=opened.format)
        return Mapping(backend=self.name, spec=str(d.spec()), device=device,
                       backend_id=str(d.dev_id), read_only=d.read_only or d.snap is not None,
                       extra=extra)

    def map(self, spec: ImageSpec, opts: MapOptions) -> Mapping:
        """Map (idempotent); an encrypted image is also opened with dm-crypt,
        also when a crash left it mapped but not opened. A failed open
        unmaps what this call mapped."""
        s = self.support()
        if not s.ok:
            raise Unsupported(s.reason)
        existing = self.find(spec)
        if existing and existing.extra.get("crypt_name"):
            return existing
        from cephvol.data import encryption

        read_only = opts.read_only or spec.read_only
        if existing:
            unlock = encryption.unlock_for(self.cfg, spec)
            return self._open(spec, existing, unlock, read_only, made=False)
        mons, secret, unlock = self._cluster_facts(spec)
        if unlock is not None and (why := self.decrypts()):
            raise Unsupported(f"{spec} is encrypted (librbd LUKS) and {why}")
        from cephvol._os.keyctl import add_key

        try:
            add_key("ceph", f"client.{self.cfg.client_id}", secret)
        except OSError as exc:
            raise Unsupported(f"cannot put the key into the kernel keyring: "
                              f"{os.strerror(exc.errno or 0)}") from None
        finally:
            del secret
        before = {d.dev_id for d in read_devices(self.paths.sys_root)}
        self.kernel.add(build_add_string(mons, self.cfg.client_id,
                                         kernel_options(opts, read_only), spec))
        dev = self._wait_new_device(spec, before)
        crash_point("krbd-map")
        return self._open(spec, self._mapping(dev), unlock, read_only, made=True)

    def _open(self, spec: ImageSpec, m: Mapping, unlock: Any, read_only: bool, *,
              made: bool) -> Mapping:
        """Open the LUKS layer of mapped `m` when `unlock` (its format and
        passphrase) says the image is encrypted; `made`: this call mapped it,
        so a failure unmaps it again."""
        if unlock is None:
            return m
        try:
            if why := self.decrypts():
                raise Unsupported(f"{spec} is encrypted (librbd LUKS) and {why}")
            dmcrypt.open_luks(m.device, dmcrypt.name_for(spec.key), unlock.passphrase,
                              read_only=read_only or m.read_only,
                              timeout=proc.step_timeout(120.0))
        except CephvolError:
            if made:
                with contextlib.suppress(CephvolError):
                    self.kernel.remove(int(m.backend_id), False)
            raise
        opened = self.find(spec)
        if opened is None or not opened.extra.get("crypt_name"):
            raise SystemCommandError(f"cryptsetup opened {spec} but sysfs shows no dm-crypt "
                                     f"device on {m.device}")
        return opened

    def _cluster_facts(self, spec: ImageSpec) -> tuple[list[str], bytes, Any]:
        """Monitor addresses, the cephx secret and, for an encrypted image,
        its Unlock (format and passphrase): one connection for all three."""
        from cephvol.cluster import Cluster
        from cephvol.data import encryption
        from cephvol.secrets import read_secret

        with Cluster(self.cfg) as c:
            ret, out, err = c.mon_command({"prefix": "mon dump", "format": "json"})
            if ret != 0:
                raise ClusterError(f"cannot read the monmap: {err.strip()}")
            keyrings = c.rados.conf_get("keyring").split(",")
            unlock = encryption.unlock_in(c, spec)
        return (mon_v1_addrs(json.loads(out)),
                read_secret(keyrings, f"client.{self.cfg.client_id}"), unlock)

    def _wait_new_device(self, spec: ImageSpec, before: set[int],
                         timeout: float = 30.0) -> KrbdDevice:
        sock = _uevent_socket()
        try:
            end = time.monotonic() + timeout
            while True:
                for d in read_devices(self.paths.sys_root):
                    if d.dev_id not in before and d.spec() == spec and self._node_ok(d):
                        return d
                left = end - time.monotonic()
                if left <= 0:
                    raise StepTimeout(f"mapped {spec} but its block device did not appear "
                                      f"within {timeout:g}s")
                if sock is not None:
                    r, _, _ = select.select([sock], [], [], min(left, 0.5))
                    if r:
                        sock.get()  # drain; the re-check above decides
                else:
                    time.sleep(min(left, 0.05))
        finally:
            if sock is not None:
                sock.close()

    def _node_ok(self, d: KrbdDevice) -> bool:
        """The /dev node must exist and be the device sysfs describes."""
        node = self.paths.dev_root / f"rbd{d.dev_id}"
        try:
            st = os.stat(node)
        except OSError:
            return False
        if not stat.S_ISBLK(st.st_mode):
            return False
        want_major, want_minor = _block_devnum(self.paths.sys_root, d)
        return (os.major(st.st_rdev), os.minor(st.st_rdev)) == (want_major, want_minor)

    def unmap(self, mapping: Mapping, *, force: bool = False) -> None:
        """Close the dm-crypt layer (flushing it) if there is one, then
        unmap. Forced while the opened device is in use: its removal is
        deferred to its last close and the rbd device goes at once (I/O
        still queued fails, as with any forced krbd unmap)."""
        name = mapping.extra.get("crypt_name")
        if name:
            flush_before_unmap(mapping, force=force)
            try:
                dmcrypt.close(name, timeout=proc.step_timeout())
            except Busy:
                if not force:
                    raise
                dmcrypt.close(name, timeout=proc.step_timeout(), deferred=True)
            crash_point("krbd-luks-close")
        self.kernel.remove(int(mapping.backend_id), force)

    def refresh_size(self, mapping: Mapping) -> None:
        if mapping.extra.get("crypt_name"):
            # dm-crypt keeps its size until `cryptsetup resize`, which a
            # LUKS2 volume key kept in the kernel keyring may need the
            # passphrase for: not tried, so not done online
            raise Unsupported(f"{mapping.spec} grew, but its encrypted krbd mapping at "
                              f"{mapping.device} keeps the old size until it is attached "
                              "again")


def _block_devnum(sys_root: Path, d: KrbdDevice) -> tuple[int, int]:
    txt = _attr(sys_root / "block" / f"rbd{d.dev_id}", "dev")
    if ":" in txt:
        a, b = txt.split(":")
        return int(a), int(b)
    return d.major, d.minor


def _uevent_socket() -> Any:
    try:
        from pyroute2 import UeventSocket

        s = UeventSocket()
        s.bind()
        return s
    except Exception:
        return None
