"""qemu-storage-daemon + loop device: the fast block path on kernels without rbd or nbd.

One qemu-storage-daemon per image opens it with QEMU's rbd block driver
(librbd) and exports it as a FUSE file; a loop device with direct I/O turns
the file into a block device. Measured on the same host and cluster, it
reads 4x faster than rbd-fuse, which serves one request at a time, and its
rbd driver can open snapshots and grow the image through QMP, which rbd-fuse
cannot. rbd-fuse stays as the fallback where QEMU is not installed.

Everything of one mapping lives in one directory under the state dir,
named by a digest of the image key (a UNIX socket path must stay below 108
bytes; image keys can be far longer): `spec` (which image, written first),
`image` (the FUSE export's mountpoint and the loop's backing file),
`qmp.sock` (the daemon's QMP monitor) and `pid` (written by the daemon once
the image is open and exported). So a mapping is found again from the host
alone after any crash: the directory, the daemon named by its pid file, the
export's mount and the loop bound to the file.

Guards, each found by trying:
- librbd waits 300 s for unreachable monitors and QEMU has no rbd option
  for it: CEPH_ARGS passes client_mount_timeout in the environment, which
  librados reads at creation (measured: 3.3 s with 3, else 300 s).
- The cephx key never reaches argv: only `conf` and `user` are passed and
  librbd reads the keyring the ceph config names.
- --blockdev and --export are given as JSON, so no path or name needs
  QEMU's comma escaping; the QMP socket path (QemuOpts only) doubles commas.
- The daemon writes its pid file only after the image is open: a daemon
  still connecting is found by its argv instead.
- An encrypted image (librbd LUKS, cephvol/data/encryption.py) is opened
  over QMP after the daemon started without it, so its passphrase is never
  on argv or in a file (see _open_encrypted); its pid file then comes first.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import socket
from pathlib import Path
from typing import Any

from cephvol import proc, supervisor
from cephvol._os import fusectl, loopdev
from cephvol.backends.base import Backend, MapOptions, Mapping, Support, flush_before_unmap
from cephvol.crashpoint import crash_point as _crash_point
from cephvol.data import encryption
from cephvol.errors import (
    Busy,
    CephvolError,
    ClusterError,
    Conflict,
    NotFound,
    StepTimeout,
    SystemCommandError,
    Unsupported,
)
from cephvol.hostfs import (
    pid_alive,
    processes_named,
    read_loop_devices,
    read_mounts,
    stopped,
)
from cephvol.spec import ImageSpec, parse_spec
from cephvol.waiting import wait_for

DAEMON = "qemu-storage-daemon"
COMM = DAEMON[:15]  # the kernel keeps 15 characters of a command name
RBD_DRIVER = "block-rbd.so"
NODE = "rbd0"  # block node name inside each daemon (one image per daemon)
EXPORT = "fuse0"
SECRET = "luks0"  # QMP secret object, only while an encrypted image is opened
SPEC_FILE, IMAGE_FILE, QMP_FILE, PID_FILE = "spec", "image", "qmp.sock", "pid"
# the encryption format of an encrypted image's mapping ("luks2"; never the
# key), so status and the journal say the device is decrypted data
ENC_FILE = "encryption"
SOCKET_PATH_MAX = 107  # sun_path is 108 bytes with the terminating NUL

# Chosen by measurement (fio on the loop device, direct, qd 1 and 16; the
# README has the table): cache.direct=on turns librbd's cache off, so a write
# the loop device completed is in the cluster, not in a daemon that may be
# killed. Writeback (cache.direct=off, once a flush ends librbd's
# writethrough start) was within run-to-run noise (rand write 4k qd16: 6.6
# and 4.2 MB/s vs 5.4 and 5.1): QEMU 7.2's FUSE export, not librbd, is the
# limit. Before any flush it is writethrough and slower (seq write 80 vs 139).
# aio= is no option of the rbd driver (QEMU rejects it; librbd is async).
# The loop device keeps direct I/O: buffered, seq read 4M qd16 fell from 193
# to 73 MB/s and every block was cached twice.
CACHE = {"direct": True, "no-flush": False}

# test hook (as lifecycle's): SIGKILL ourselves between the steps of a map

# qemu-storage-daemon's stderr when the monitors are unreachable or refuse us
_CONNECT_FAILURES = ("error connecting", "timed out", "authenticat", "Permission denied")
_MISSING = ("No such file or directory", "error opening pool", "error reading header")


def _qemu_opt(value: str) -> str:
    """A value inside QEMU's key=value,... syntax: commas are doubled."""
    return value.replace(",", ",,")


class Qmp:
    """The few QMP commands the backend needs, over the daemon's monitor
    socket: one connection per call, each read bounded by `timeout`."""

    def __init__(self, path: Path, timeout: float) -> None:
        self.path, self.timeout = path, timeout

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.path))
            f = sock.makefile("rw", encoding="utf-8", newline="\n")
            self._reply(f, greeting=True)
            for cmd, args in (("qmp_capabilities", None), (command, arguments)):
                msg: dict[str, Any] = {"execute": cmd}
                if args:
                    msg["arguments"] = args
                f.write(json.dumps(msg) + "\n")
                f.flush()
                ret = self._reply(f)
            return ret
        except (OSError, ValueError) as exc:
            raise SystemCommandError(f"QMP {command} on {self.path} failed: {exc}") from exc
        finally:
            sock.close()

    def _reply(self, f: Any, *, greeting: bool = False) -> Any:
        while True:
            line = f.readline()
            if not line:
                raise SystemCommandError(f"qemu-storage-daemon closed its monitor {self.path}")
            msg = json.loads(line)
            if greeting and "QMP" in msg:
                return msg
            if "event" in msg:
                continue
            if "error" in msg:
                raise SystemCommandError(f"QMP: {msg['error'].get('desc', msg['error'])}")
            return msg.get("return")


class QsdBackend(Backend):
    name = "qsd"
    mappings_are_ours = True  # daemon, export and loop file live under the state dir

    @property
    def root(self) -> Path:
        return self.paths.state_dir / "qsd"

    def dir_of(self, spec: ImageSpec) -> Path:
        return self.root / hashlib.sha256(spec.key.encode()).hexdigest()[:16]

    def support(self) -> Support:
        missing = [t for t in (DAEMON, "losetup", "blockdev") if not shutil.which(t)]
        if missing:
            return Support(False, f"missing {', '.join(missing)} "
                           "(apt install qemu-system-common qemu-block-extra)")
        if not _rbd_driver_installed():
            return Support(False, f"QEMU's rbd block driver ({RBD_DRIVER}) is not installed "
                           "(apt install qemu-block-extra)")
        if not (self.paths.dev_root / "fuse").exists():
            return Support(False, "/dev/fuse is missing (no FUSE in this kernel or container)")
        if not (self.paths.dev_root / "loop-control").exists():
            return Support(False, "/dev/loop-control is missing (no loop devices)")
        sock = self.root / ("0" * 16) / QMP_FILE
        if len(str(sock).encode()) > SOCKET_PATH_MAX:
            return Support(False, f"state dir {self.paths.state_dir} is too long for the "
                           "QMP socket path (108 bytes)")
        return Support(True, "qemu-storage-daemon with the rbd driver and loop devices "
                       "are available")

    # -- discovery -----------------------------------------------------------

    def list_mappings(self) -> list[Mapping]:
        """Every mapping with a directory under the state dir, a daemon, an
        export mount or a loop device of ours, whole or half-made."""
        return [m for m in self._scan() if m.spec]

    def scan(self) -> list[Mapping]:
        return self._scan()

    def find(self, spec: ImageSpec) -> Mapping | None:
        """Also a mapping whose spec file and daemon are gone: its directory
        is named by a hash of the image, so the image still finds it."""
        found = None
        d = str(self.dir_of(spec))
        # a spec's mapping lives only in its own directory (_read_spec checks
        # that the directory is the spec's): the other volumes' are not read
        for m in self._scan(only=d):
            if m.spec == str(spec):
                return m
            if not m.spec and m.extra.get("qsd_dir") == d:
                found = dataclasses.replace(m, spec=str(spec),
                                            read_only=m.read_only or spec.read_only)
        return found

    def _scan(self, only: str | None = None) -> list[Mapping]:
        """Every directory of ours, or `only` that one (a lookup by spec)."""
        root = str(self.root)
        if only is not None:
            dirs = {only} if os.path.lexists(only) else set()
        else:
            try:
                dirs = {str(self.root / n) for n in os.listdir(self.root)}
            except OSError:
                dirs = set()
        mounts = {os.path.dirname(m.mountpoint) for m in
                  read_mounts(self.paths.proc_root / "self" / "mountinfo")
                  if m.fstype == "fuse" and os.path.dirname(os.path.dirname(m.mountpoint)) == root
                  and os.path.basename(m.mountpoint) == IMAGE_FILE
                  and (only is None or os.path.dirname(m.mountpoint) == only)}
        loops = {}
        for lo in read_loop_devices(self.paths.sys_root, (only or root) + "/"):
            # the kernel shows a backing file removed since as "PATH (deleted)"
            backing = lo.backing_file.removesuffix(" (deleted)")
            d = os.path.dirname(backing)
            if (os.path.dirname(d) == root and os.path.basename(backing) == IMAGE_FILE
                    and (only is None or d == only)):
                loops[d] = lo
        if not (dirs or mounts or loops):
            return []
        scanned: dict[str, int] | None = None
        out = []
        for d in sorted(dirs | mounts | loops.keys()):
            pid = self._pid_from_file(Path(d))
            if pid is None:
                if scanned is None:  # one /proc pass, only when a pid file is missing
                    scanned = self._daemons_by_dir()
                pid = scanned.get(d)
            spec = self._read_spec(Path(d), pid)
            lo = loops.get(d)
            if spec is None and pid is None and not lo and d not in mounts:
                continue  # an empty directory: nothing on the host to show
            extra: dict[str, Any] = {"qsd_dir": d, "qsd_pid": pid,
                                     "export_mounted": d in mounts}
            with contextlib.suppress(OSError, UnicodeError):
                extra["encryption"] = (Path(d) / ENC_FILE).read_text().strip()
            if lo and _autoclear(self.paths.sys_root, lo.name):
                # a forced unmap is waiting for the loop's last opener: the
                # device is no longer ours to hand out
                extra["releasing_loop"] = lo.name
                lo = None
            out.append(Mapping(
                backend=self.name,
                spec=str(spec) if spec else "",  # "": an orphan, see scan()
                # a loop without its daemon keeps its device: a filesystem
                # may still be mounted on it, and detach must unmount it
                device=lo.path if lo else "",
                backend_id=lo.name if lo else "",
                read_only=lo.read_only if lo else bool(spec and spec.read_only),
                extra=extra,
            ))
        return out

    def _pid_from_file(self, d: Path) -> int | None:
        try:
            pid = int((d / PID_FILE).read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if self._is_our_daemon(pid, d) else None

    def _is_our_daemon(self, pid: int, d: Path) -> bool:
        """The pid names a live qemu-storage-daemon of this directory (a pid
        file outlives its daemon; the number may belong to another process)."""
        if not pid_alive(pid, self.paths.proc_root):
            return False
        try:
            argv = (self.paths.proc_root / str(pid) / "cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return str(d / PID_FILE).encode() in argv

    def _daemons_by_dir(self) -> dict[str, int]:
        """Live daemons of ours by directory, from their argv (a daemon still
        opening the image has no pid file yet)."""
        found: dict[str, int] = {}
        for pid, argv in sorted(processes_named(COMM, self.paths.proc_root).items()):
            for i, a in enumerate(argv[:-1]):
                if a == "--pidfile" and os.path.dirname(os.path.dirname(argv[i + 1])) == str(
                        self.root):
                    found.setdefault(os.path.dirname(argv[i + 1]), pid)
        return found

    def _read_spec(self, d: Path, pid: int | None) -> ImageSpec | None:
        """The image of a directory: its spec file, else its daemon's argv."""
        with contextlib.suppress(OSError, CephvolError):
            spec = parse_spec((d / SPEC_FILE).read_text().strip())
            if self.dir_of(spec) == d:
                return spec
        if pid is None:
            return None
        try:
            argv = (self.paths.proc_root / str(pid) / "cmdline").read_bytes().split(b"\0")
            i = argv.index(b"--blockdev")
            bd = json.loads(argv[i + 1])
            spec = ImageSpec(bd["pool"], bd.get("namespace", ""), bd["image"],
                             bd.get("snapshot"))
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            return None
        return spec if self.dir_of(spec) == d else None

    # -- map -----------------------------------------------------------------

    def map(self, spec: ImageSpec, opts: MapOptions) -> Mapping:
        if opts.exclusive:
            raise Unsupported("the qsd backend has no exclusive mapping; use krbd or nbd")
        read_only = opts.read_only or spec.read_only
        existing = self.find(spec)
        if existing and existing.device and existing.extra.get("qsd_pid"):
            return existing
        if existing and existing.device:
            raise SystemCommandError(
                f"{spec} is mapped at {existing.device}, but its qemu-storage-daemon is "
                "dead (writes it held are lost); run `cephvol detach` first")
        if existing:
            # half-made by a crash (a daemon without a loop, a bare directory):
            # finish the teardown, then map afresh
            self.unmap(existing)
        d = self.dir_of(spec)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        # an encrypted image (data/encryption.py): its key, asked for before
        # anything of the mapping is made, so a missing key leaves nothing
        try:
            unlock = encryption.unlock_for(self.cfg, spec)
        except ClusterError as exc:
            if "unreachable" not in exc.message:
                raise  # a cap or keyring problem says so itself
            raise ClusterError(f"could not reach the cluster to learn whether {spec} is "
                               f"encrypted: {exc.message}") from exc
        d.mkdir(exist_ok=True, mode=0o700)
        try:
            self._write_spec(d, spec)
            if unlock is not None:
                (d / ENC_FILE).write_text(unlock.format + "\n")
            _crash_point("qsd-dir")
            image_file = d / IMAGE_FILE
            image_file.touch(mode=0o600)
            for stale in (PID_FILE, QMP_FILE):
                (d / stale).unlink(missing_ok=True)
            self._start_daemon(d, spec, read_only, unlock)
            _crash_point("qsd-daemon")
            ro = ["--read-only"] if read_only else []
            res = proc.run(["losetup", "--find", "--show", "--direct-io=on", *ro,
                            str(image_file)], timeout=30)
            _crash_point("qsd-loop")
        except BaseException:
            with contextlib.suppress(CephvolError):
                self._teardown(d, opening=True)
            raise
        device = res.stdout.strip()
        m = self.find(spec)
        if m is None or m.device != device:
            raise SystemCommandError(f"losetup reported {device} but sysfs does not show it "
                                     f"bound to {image_file}")
        return m

    @staticmethod
    def _write_spec(d: Path, spec: ImageSpec) -> None:
        tmp = d / f".{SPEC_FILE}.{os.getpid()}"
        tmp.write_text(str(spec) + "\n")
        tmp.rename(d / SPEC_FILE)

    def daemon_argv(self, d: Path, spec: ImageSpec, read_only: bool) -> list[str]:
        blockdev: dict[str, Any] = {
            "driver": "rbd", "node-name": NODE, "pool": spec.pool, "image": spec.image,
            "conf": str(self.cfg.conf), "user": self.cfg.client_id,
            "cache": CACHE, "read-only": read_only, "discard": "unmap",
        }
        if spec.namespace:
            blockdev["namespace"] = spec.namespace
        if spec.snap:
            blockdev["snapshot"] = spec.snap
        export = {"type": "fuse", "id": EXPORT, "node-name": NODE,
                  "mountpoint": str(d / IMAGE_FILE), "writable": not read_only,
                  "allow-other": "off"}
        return [DAEMON,
                "--blockdev", json.dumps(blockdev, separators=(",", ":")),
                "--export", json.dumps(export, separators=(",", ":")),
                "--chardev", f"socket,id=qmp0,path={_qemu_opt(str(d / QMP_FILE))},"
                             "server=on,wait=off",
                "--monitor", "chardev=qmp0,mode=control",
                "--pidfile", str(d / PID_FILE),
                "--daemonize"]

    def _start_daemon(self, d: Path, spec: ImageSpec, read_only: bool,
                      unlock: encryption.Unlock | None = None) -> None:
        t = self.cfg.connect_timeout
        # librados reads CEPH_ARGS when it is created: the only way to bound
        # the monitor connection of QEMU's rbd driver (no blockdev option)
        ceph_args = " ".join(filter(None, [os.environ.get("CEPH_ARGS", ""),
                                           f"--client_mount_timeout={t:g}"]))
        argv = [*supervisor.own_scope_argv("qsd"), *self.daemon_argv(d, spec, read_only)]
        if unlock is not None:
            # the image is opened over QMP instead, once the secret is there
            argv, blockdev, export = _without_image(argv)
        try:
            proc.run(argv, timeout=t + 15, env={"CEPH_ARGS": ceph_args})
        except StepTimeout:
            raise ClusterError(f"qemu-storage-daemon did not open {spec} within {t + 15:g}s "
                               f"(config {self.cfg.conf})") from None
        except SystemCommandError as exc:
            raise self._open_failure(spec, exc, t) or exc from exc
        if self._pid_from_file(d) is None:
            raise SystemCommandError(f"qemu-storage-daemon for {spec} exited right after "
                                     "starting; see the client log named in the ceph config")
        if unlock is not None:
            self._open_encrypted(d, spec, unlock, blockdev, export, timeout=t + 15)
        if self._file_size(d) <= 0:
            raise SystemCommandError(f"the FUSE export of {spec} shows no image (size 0)")

    def _open_failure(self, spec: ImageSpec, exc: SystemCommandError, seconds: float
                      ) -> CephvolError | None:
        """What the daemon's failure to open `spec` means, from its message:
        the cluster not reached, or the image not there; None if neither."""
        text = str(exc)
        if any(s in text for s in _CONNECT_FAILURES):
            return ClusterError(f"qemu-storage-daemon could not reach the cluster in "
                                f"{seconds:g}s (config {self.cfg.conf}): {text}")
        if any(s in text for s in _MISSING):
            return NotFound(f"qemu-storage-daemon cannot open {spec} (pool, namespace, "
                            f"image or snapshot missing, or no permission): {text}")
        return None

    def _open_encrypted(self, d: Path, spec: ImageSpec, unlock: encryption.Unlock,
                        blockdev: dict[str, Any], export: dict[str, Any], *,
                        timeout: float) -> None:
        """Open an encrypted image in a daemon started without it: the
        passphrase goes over the QMP socket (in a 0700 directory) as a secret
        object, the rbd driver loads librbd's LUKS encryption with it, the
        secret object is deleted again, then the export is added. So the key
        is never on the daemon's argv, in its environment or in a file (a
        secret file would outlive a crash between writing and removing it)."""
        qmp = Qmp(d / QMP_FILE, timeout=timeout)
        qmp.execute("object-add", {"qom-type": "secret", "id": SECRET, "format": "base64",
                                   "data": base64.b64encode(unlock.passphrase).decode()})
        try:
            qmp.execute("blockdev-add", {**blockdev, "encrypt": {
                "format": "luks" if unlock.format == "luks1" else unlock.format,
                "key-secret": SECRET}})
        except SystemCommandError as exc:
            text = str(exc)
            if "encryption" in text and ("not permitted" in text or "denied" in text):
                raise Conflict(f"the key stored for {spec.without_snap()} "
                               f"({encryption.key_name(spec)}) does not open its LUKS header "
                               "(replaced or wrong key)") from None
            raise self._open_failure(spec, exc, timeout) or SystemCommandError(
                f"qemu-storage-daemon cannot open encrypted {spec}: {text}") from exc
        finally:
            with contextlib.suppress(CephvolError):
                qmp.execute("object-del", {"id": SECRET})
        _crash_point("qsd-unlock")
        qmp.execute("block-export-add", export)

    def _file_size(self, d: Path) -> int:
        """The export's size, from a child: a stat of a FUSE file whose daemon
        waits on an OSD sleeps unkillably, and that must never be cephvol."""
        res = proc.run(["stat", "-L", "-c", "%s", str(d / IMAGE_FILE)],
                       timeout=proc.step_timeout(30.0), check=False)
        try:
            return int(res.stdout.strip()) if res.returncode == 0 else 0
        except ValueError:
            return 0

    _aborted = False  # set by abort(): this mapping's daemon is cut loose

    def abort(self, mapping: Mapping) -> None:
        """Fail every request waiting on the export at once (fusectl abort),
        and stop the daemon without waiting for a flush that cannot come."""
        self._aborted = True
        target = str(Path(mapping.extra.get("qsd_dir") or self.dir_of(mapping.image_spec))
                     / IMAGE_FILE)
        fusectl.abort(target, "fuse", self.paths.proc_root, self.paths.sys_root)

    # -- health and resize ----------------------------------------------------

    def health(self, mapping: Mapping) -> str | None:
        if mapping.backend != self.name:
            return None
        d = Path(mapping.extra.get("qsd_dir") or self.dir_of(mapping.image_spec))
        pid = mapping.extra.get("qsd_pid")
        if not pid or not self._is_our_daemon(int(pid), d):
            return "its qemu-storage-daemon is not running (killed or crashed)"
        if not mapping.extra.get("export_mounted"):
            return "the FUSE export of its qemu-storage-daemon was unmounted"
        return None

    def decrypts(self) -> str | None:
        return None  # QEMU's rbd driver loads librbd's encryption (_open_encrypted)

    def stalled(self, mapping: Mapping) -> str | None:
        return stopped(mapping.extra.get("qsd_pid"), "qemu-storage-daemon",
                       self.paths.proc_root)

    def refresh_size(self, mapping: Mapping) -> None:
        """Tell the daemon the image grew (QMP block_resize to the image's
        size in the cluster, never smaller than the daemon's view), then the
        loop device (`losetup --set-capacity`, again until it shows the
        size: the FUSE file's size is cached by the kernel for up to 1 s)."""
        if not mapping.device or mapping.image_spec.snap:
            return
        if mapping.read_only:
            # QEMU resizes only through a writable node; a read-only one
            # keeps the size it opened with
            raise Unsupported(f"{mapping.spec} grew, but its read-only qsd mapping at "
                              f"{mapping.device} keeps the old size until it is mapped again")
        d = Path(mapping.extra.get("qsd_dir") or self.dir_of(mapping.image_spec))
        from cephvol.cluster import Cluster

        with Cluster(self.cfg) as c, c.image(mapping.image_spec) as img:
            size = int(img.size())
            if encryption.read_header(c, mapping.image_spec) is not None:
                # QEMU would resize through librbd's encryption layer, whose
                # sizes exclude the LUKS header: not tried, so not done online
                raise Unsupported(f"{mapping.spec} grew, but its encrypted qsd mapping at "
                                  f"{mapping.device} keeps the old size until it is "
                                  "attached again")
        qmp = Qmp(d / QMP_FILE, timeout=proc.step_timeout())
        nodes = qmp.execute("query-named-block-nodes", {"flat": True}) or []
        now = max((n["image"]["virtual-size"] for n in nodes if n.get("node-name") == NODE),
                  default=0)
        if size > now:
            # the rbd driver resizes the image to this size: it already is
            qmp.execute("block_resize", {"node-name": NODE, "size": size})
        sys_size = self.paths.sys_root / "class" / "block" / mapping.backend_id / "size"

        def grown() -> bool:
            self._file_size(d)  # revalidates the kernel's cached FUSE attributes
            proc.run(["losetup", "--set-capacity", mapping.device], timeout=30)
            try:
                return int(sys_size.read_text()) * 512 >= size
            except (OSError, ValueError):
                return False

        if not wait_for(grown, timeout=5.0, interval=0.2):
            raise StepTimeout(f"{mapping.device} does not show the new size {size} 5s after "
                              "qemu-storage-daemon grew")

    # -- unmap ---------------------------------------------------------------

    def unmap(self, mapping: Mapping, *, force: bool = False) -> None:
        """Flush, free the loop device, stop the daemon (it flushes librbd and
        closes the image as it exits), remove the directory.

        The caller checked that nothing mounts or opens the device. Forced
        while something still holds the loop device open: the kernel lets the
        loop go when its last opener closes it (autoclear), and the daemon
        keeps serving that opener until then; the next detach or cleanup of
        the image stops it. (Its export is not detached lazily: QEMU 7.2's
        FUSE export spins on a connection that went away under it.)
        """
        d = Path(mapping.extra.get("qsd_dir") or self.dir_of(mapping.image_spec))
        releasing = mapping.extra.get("releasing_loop")
        if releasing and not force:
            raise Busy(f"{mapping.spec} was unmapped by force while /dev/{releasing} was "
                       "open; its qemu-storage-daemon serves that opener until it closes "
                       "the device (--force stops it now, failing the opener's I/O)")
        pid = self._pid_from_file(d) or self._daemons_by_dir().get(str(d))
        if mapping.device:
            if pid and not self._aborted:
                flush_before_unmap(mapping, force=force)
            name = mapping.backend_id or os.path.basename(mapping.device)
            if not loopdev.detach(mapping.device, lambda: self._loop_bound(name, d),
                                  force=force, timeout=3.0 if force else 10.0):
                return
        self._teardown(d, pid)

    def _loop_bound(self, name: str, d: Path) -> bool:
        return any(lo.name == name and os.path.dirname(lo.backing_file) == str(d)
                   for lo in read_loop_devices(self.paths.sys_root, str(d) + "/"))

    def _teardown(self, d: Path, pid: int | None = None, *, opening: bool = False) -> None:
        """Stop the daemon and wait for it to exit (librbd flushed and closed
        the image), unmount a dead daemon's export, remove the directory.
        `opening`: a failed map; a daemon without a pid file is still opening
        the image (nothing was written through it) and is killed outright."""
        from_file = pid or self._pid_from_file(d)
        pid = from_file or self._daemons_by_dir().get(str(d))
        if pid:
            with contextlib.suppress(ProcessLookupError):
                # qemu-storage-daemon quits on SIGTERM as on QMP quit: it
                # drains, flushes and closes every block node, then exits
                os.kill(pid, signal.SIGKILL if opening and not from_file else signal.SIGTERM)
            bound = min(5.0, proc.step_timeout()) if self._aborted else proc.step_timeout()
            gone = wait_for(lambda: not pid_alive(pid, self.paths.proc_root), timeout=bound,
                            interval=0.02)
            if not gone and self._aborted:
                # fenced: nothing it holds can reach the cluster; it would
                # wait on the fenced connection forever
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                gone = wait_for(lambda: not pid_alive(pid, self.paths.proc_root), timeout=5.0)
            if not gone:
                raise StepTimeout(f"qemu-storage-daemon (pid {pid}) did not exit within "
                                  f"{bound:g}s (it flushes to the cluster first)")
        self._umount_export(d)
        with contextlib.suppress(OSError):
            for name in (PID_FILE, QMP_FILE, IMAGE_FILE, SPEC_FILE, ENC_FILE):
                (d / name).unlink(missing_ok=True)
            d.rmdir()

    def _umount_export(self, d: Path) -> None:
        """Unmount the export if it is still there (its daemon was killed)."""
        target = str(d / IMAGE_FILE)
        mounted = any(m.mountpoint == target and m.fstype == "fuse"
                      for m in read_mounts(self.paths.proc_root / "self" / "mountinfo"))
        if not mounted:
            return
        res = proc.run(["umount", target], timeout=proc.step_timeout(), check=False)
        if res.returncode != 0:
            raise Busy(f"cannot unmount the FUSE export {target}: {res.stderr.strip()}")



def _without_image(argv: list[str]) -> tuple[list[str], dict[str, Any], dict[str, Any]]:
    """argv without --blockdev and --export, and their options (the QMP
    blockdev-add and block-export-add take the same JSON)."""
    out: list[str] = []
    opts: dict[str, dict[str, Any]] = {}
    it = iter(argv)
    for a in it:
        if a in ("--blockdev", "--export"):
            opts[a] = json.loads(next(it))
        else:
            out.append(a)
    return out, opts["--blockdev"], opts["--export"]


def _autoclear(sys_root: Path, loop: str) -> bool:
    """The kernel frees this loop device when its last opener closes it
    (`losetup -d` of a busy device sets it; cephvol never binds one so)."""
    try:
        return (sys_root / "block" / loop / "loop" / "autoclear").read_text().strip() == "1"
    except OSError:
        return False


def _rbd_driver_installed() -> bool:
    """QEMU loads block drivers as modules; Debian ships rbd's separately
    (qemu-block-extra), in /usr/lib/<triplet>/qemu."""
    return any(Path("/usr/lib").glob(f"*/qemu/{RBD_DRIVER}")) or any(
        (Path(p) / RBD_DRIVER).exists() for p in ("/usr/lib/qemu", "/usr/lib64/qemu"))
