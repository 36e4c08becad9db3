"""rbd-fuse + loop device: a block device on kernels without rbd or nbd.

rbd-fuse exposes the image as a file (one rbd-fuse per image, `-r`); a loop
device with direct I/O turns the file into a block device. Guards for
rbd-fuse's silent failures: it exits 0 on a missing pool or image and leaves
a dead or empty mount, so the image is checked first and the file is
verified after; it waits 300 s for an unreachable monitor, so
client_mount_timeout is always passed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from pathlib import Path

from cephvol import proc, supervisor
from cephvol._os import fusectl, loopdev
from cephvol.backends.base import Backend, MapOptions, Mapping, Support, flush_before_unmap
from cephvol.errors import (
    ClusterError,
    NotFound,
    StepTimeout,
    SystemCommandError,
    Unsupported,
)
from cephvol.hostfs import (
    find_processes,
    pid_alive,
    processes_named,
    read_loop_devices,
    read_mounts,
    stopped,
)
from cephvol.spec import ImageSpec, spec_from_key
from cephvol.waiting import wait_for

FSTYPE = "fuse.rbd-fuse"


# rbd-fuse's stderr when the monitors are unreachable or refuse us
_CONNECT_FAILURES = ("failed to fetch mon config", "error connecting to the cluster",
                     "timed out", "authenticate")


class FuseBackend(Backend):
    name = "fuse"
    mappings_are_ours = True

    @property
    def fuse_root(self) -> Path:
        return self.paths.state_dir / "fuse"

    def support(self) -> Support:
        missing = [t for t in ("rbd-fuse", "losetup", "fusermount3") if not shutil.which(t)
                   and not (t == "fusermount3" and shutil.which("fusermount"))]
        if missing:
            return Support(False, f"missing {', '.join(missing)} (apt install rbd-fuse fuse3)")
        if not (self.paths.dev_root / "fuse").exists():
            return Support(False, "/dev/fuse is missing (no FUSE in this kernel or container)")
        if not (self.paths.dev_root / "loop-control").exists():
            return Support(False, "/dev/loop-control is missing (no loop devices)")
        return Support(True, "rbd-fuse and loop devices are available")

    # -- discovery -----------------------------------------------------------

    def list_mappings(self) -> list[Mapping]:
        return self._scan()

    def find(self, spec: ImageSpec) -> Mapping | None:
        # a spec's mapping lives only in its own directory (named by its key):
        # the other volumes' mounts, loops and daemons are not looked at
        for m in self._scan(only=str(self.fuse_root / spec.key)):
            if m.spec == str(spec):
                return m
        return None

    def _scan(self, only: str | None = None) -> list[Mapping]:
        """Every mapping under the fuse root, or the one in directory `only`."""
        root = str(self.fuse_root)
        mounts: dict[str, int] = {}
        for m in read_mounts(self.paths.proc_root / "self" / "mountinfo"):
            if (m.fstype == FSTYPE and os.path.dirname(m.mountpoint) == root
                    and (only is None or m.mountpoint == only)):
                mounts[m.mountpoint] = mounts.get(m.mountpoint, 0) + 1
        loops = {}
        for lo in read_loop_devices(self.paths.sys_root, (only or root) + "/"):
            d = os.path.dirname(lo.backing_file)
            if os.path.dirname(d) == root and (only is None or d == only):
                loops[d] = lo
        fuse_pids: dict[str, int] = {}
        if mounts or loops:  # nothing of ours on the host: no /proc scan
            for pid, argv in sorted(processes_named("rbd-fuse", self.paths.proc_root).items()):
                for a in argv:
                    fuse_pids.setdefault(a, pid)
        out = []
        for fuse_dir in sorted(set(mounts) | set(loops)):
            try:
                spec = spec_from_key(os.path.basename(fuse_dir))
            except Exception:
                continue
            lo = loops.get(fuse_dir)
            pid = fuse_pids.get(fuse_dir)
            out.append(Mapping(
                backend=self.name,
                spec=str(spec),
                device=lo.path if lo else "",
                backend_id=lo.name if lo else "",
                read_only=lo.read_only if lo else spec.read_only,
                extra={"fuse_dir": fuse_dir, "fuse_mounted": fuse_dir in mounts,
                       "fuse_pid": pid,
                       # rbd-fuse's mount, covered by a read-only bind of itself
                       "fuse_protected": mounts.get(fuse_dir, 0) >= 2},
            ))
        return out

    def health(self, mapping: Mapping) -> str | None:
        if not mapping.device:
            return None  # half-made: nothing was ever written through it
        if not mapping.extra.get("fuse_pid"):
            return "its rbd-fuse is dead"
        if not mapping.extra.get("fuse_mounted"):
            return "its rbd-fuse mount is gone"
        return None

    def stalled(self, mapping: Mapping) -> str | None:
        return stopped(mapping.extra.get("fuse_pid"), "rbd-fuse", self.paths.proc_root)

    _aborted = False  # set by abort(): this mapping's daemon is cut loose

    def abort(self, mapping: Mapping) -> None:
        self._aborted = True
        fuse_dir = mapping.extra.get("fuse_dir")
        if fuse_dir:
            self._abort_connection(Path(fuse_dir))

    # -- map -----------------------------------------------------------------

    def map(self, spec: ImageSpec, opts: MapOptions) -> Mapping:
        if spec.snap:
            raise Unsupported("the fuse backend cannot map snapshots (rbd-fuse has no "
                              "snapshot option); use krbd or nbd")
        if opts.exclusive:
            raise Unsupported("the fuse backend has no exclusive mapping; use krbd or nbd")
        existing = self.find(spec)
        if existing and existing.device and existing.extra.get("fuse_pid"):
            if not existing.extra.get("fuse_protected"):
                self._protect(Path(existing.extra["fuse_dir"]))  # a crash came between
                existing = self.find(spec) or existing
            return existing
        if existing:
            # half-made by a crash: finish the teardown, then map afresh
            self.unmap(existing, force=True)
        fuse_dir = self.fuse_root / spec.key
        fuse_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        t = self.cfg.connect_timeout
        argv = ["rbd-fuse", "-c", str(self.cfg.conf), "--id", self.cfg.client_id,
                "-p", spec.pool]
        if spec.namespace:
            argv += ["-s", spec.namespace]
        argv += ["-r", spec.image, f"--client_mount_timeout={t:g}", str(fuse_dir)]
        try:
            try:
                proc.run([*supervisor.own_scope_argv("rbd-fuse"), *argv], timeout=t + 15)
            except SystemCommandError as exc:
                if any(s in str(exc) for s in _CONNECT_FAILURES):
                    raise ClusterError(f"rbd-fuse could not reach the cluster in {t:g}s "
                                       f"(config {self.cfg.conf}): {exc}") from exc
                raise
            image_file = self._verify_file(fuse_dir, spec)
            ro = ["--read-only"] if opts.read_only else []
            res = proc.run(["losetup", "--find", "--show", "--direct-io=on", *ro,
                            str(image_file)], timeout=proc.step_timeout(30.0))
            device = res.stdout.strip()
            self._protect(fuse_dir)
        except StepTimeout:
            # rbd-fuse does not answer (an OSD that does not): cut its FUSE
            # connection so nothing waits on it unkillably, then tear down
            self._abort_connection(fuse_dir)
            self._loop_off(image_file_of(fuse_dir, spec))
            self._teardown_fuse(fuse_dir, lazy=True)
            raise
        except BaseException:
            self._loop_off(image_file_of(fuse_dir, spec))
            self._teardown_fuse(fuse_dir)
            raise
        m = self.find(spec)
        if m is None or m.device != device:
            raise SystemCommandError(f"losetup reported {device} but sysfs does not show it "
                                     f"bound to {image_file}")
        return m

    def _verify_file(self, fuse_dir: Path, spec: ImageSpec) -> Path:
        """The image file rbd-fuse shows, with a size. Looked at from a child
        (`stat`): a stat of a FUSE file whose daemon waits on an OSD that
        does not answer sleeps unkillably, and that must never be cephvol."""
        f = image_file_of(fuse_dir, spec)
        bound = proc.step_timeout(30.0)
        end = time.monotonic() + 5
        while True:
            try:
                res = proc.run(["stat", "--format=%s", str(f)], check=False,
                               timeout=max(1.0, min(bound, end + bound - time.monotonic())))
            except StepTimeout as exc:
                raise StepTimeout(f"rbd-fuse did not answer for image {spec} within "
                                  f"{bound:g}s (an OSD or the network does not answer); "
                                  "nothing is left mapped") from exc
            if res.returncode == 0 and res.stdout.strip() not in ("", "0"):
                return f
            if "not connected" in res.stderr:
                raise SystemCommandError(
                    f"rbd-fuse for {spec} died after starting (dead FUSE mount); "
                    "see the client log named in the ceph config")
            if time.monotonic() > end:
                raise NotFound(f"rbd-fuse does not show image {spec} (pool, namespace "
                               "or image missing, or no permission)")
            time.sleep(0.05)

    def _protect(self, fuse_dir: Path) -> None:
        """Cover rbd-fuse's mount with a read-only bind of itself. The loop
        device keeps the file open through the writable mount below; through
        the path, nothing can unlink or rename the file any more, and rbd-fuse
        turns those into `rbd rm`/`rbd rename` of the image: an `rm -rf` of
        the state dir renamed images in the cluster before this."""
        proc.run(["mount", "--bind", "-o", "ro", str(fuse_dir), str(fuse_dir)],
                 timeout=proc.step_timeout(30.0))

    def _loop_off(self, image_file: Path) -> None:
        """Free a loop device bound to `image_file` by a map that failed after
        losetup (no device name was learnt)."""
        for lo in read_loop_devices(self.paths.sys_root, str(image_file)):
            if lo.backing_file == str(image_file):
                proc.run(["losetup", "-d", lo.path], timeout=proc.step_timeout(30.0),
                         check=False)

    def _abort_connection(self, fuse_dir: Path) -> None:
        """Abort rbd-fuse's FUSE connection (fusectl): every request waiting
        on it fails at once instead of sleeping until an OSD answers."""
        fusectl.abort(str(fuse_dir), FSTYPE, self.paths.proc_root, self.paths.sys_root)

    def refresh_size(self, mapping: Mapping) -> None:
        # rbd-fuse reports the new size on stat; the loop device re-reads it
        if mapping.device:
            proc.run(["losetup", "--set-capacity", mapping.device], timeout=30)

    # -- unmap ---------------------------------------------------------------

    def unmap(self, mapping: Mapping, *, force: bool = False) -> None:
        fuse_dir = Path(mapping.extra.get("fuse_dir") or self.fuse_root / mapping.image_spec.key)
        if mapping.device:
            # the caller checked the device is unused; flush what the page
            # cache holds for the block device before it goes away
            if mapping.extra.get("fuse_pid"):
                flush_before_unmap(mapping, force=force)
            backing = str(image_file_of(fuse_dir, mapping.image_spec))
            if not loopdev.detach(mapping.device,
                                  lambda: self._loop_serves(mapping.backend_id, backing),
                                  force=force, timeout=3.0 if force else 10.0):
                # Forced while a process still holds the loop device open: the
                # kernel set autoclear, so the loop goes when the last opener
                # closes it. Detach rbd-fuse lazily; it keeps serving that
                # opener and exits (flushing librbd's cache) once released.
                self._teardown_fuse(fuse_dir, lazy=True)
                return
        self._teardown_fuse(fuse_dir)

    def _loop_serves(self, name: str, backing: str) -> bool:
        """Loop `name` still serves `backing`. The name alone is not
        enough: another attach may take the freed loop at once."""
        return any(lo.name == name and lo.backing_file == backing
                   for lo in read_loop_devices(self.paths.sys_root, backing))

    def _unprotect(self, fuse_dir: Path, *, lazy: bool) -> None:
        """Unmount the read-only binds on top of rbd-fuse's own mount."""
        while True:
            n = sum(1 for m in read_mounts(self.paths.proc_root / "self" / "mountinfo")
                    if m.mountpoint == str(fuse_dir) and m.fstype == FSTYPE)
            if n < 2:
                return
            res = proc.run(["umount", *(["-l"] if lazy else []), str(fuse_dir)],
                           timeout=proc.step_timeout(), check=False)
            if res.returncode != 0:
                raise proc.failure(res)

    def _teardown_fuse(self, fuse_dir: Path, *, lazy: bool = False) -> None:
        """Unmount rbd-fuse and wait for it to exit, so librbd has flushed.

        `lazy` detaches the mount while something still uses it and does not
        wait for rbd-fuse to exit (it exits when the last user goes).
        """
        pids = find_processes("rbd-fuse", str(fuse_dir), self.paths.proc_root)
        mounted = any(m.mountpoint == str(fuse_dir) and m.fstype == FSTYPE
                      for m in read_mounts(self.paths.proc_root / "self" / "mountinfo"))
        if mounted:
            self._unprotect(fuse_dir, lazy=lazy)
            fusermount = shutil.which("fusermount3") or "fusermount"
            delay = 0.05
            argv = [fusermount, "-u", *(["-z"] if lazy else []), str(fuse_dir)]
            for attempt in range(8):
                res = proc.run(argv, timeout=proc.step_timeout(), check=False)
                if res.returncode == 0:
                    break
                if attempt == 7:
                    raise SystemCommandError(
                        f"cannot unmount rbd-fuse at {fuse_dir}: {res.stderr.strip()}")
                time.sleep(delay)  # the loop device may release the file a moment late
                delay *= 2
        if lazy:
            if self._aborted:
                # fenced and cut loose: its librbd can never flush, so it would
                # never exit when its last user goes; it serves nothing any more
                for pid in pids:
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
            return
        bound = min(5.0, proc.step_timeout()) if self._aborted else proc.step_timeout()
        end = time.monotonic() + bound
        for pid in pids:
            wait_for(lambda pid=pid: not pid_alive(pid, self.paths.proc_root),
                     timeout=max(0.0, end - time.monotonic()), interval=0.02,
                     max_interval=0.2)
            if pid_alive(pid, self.paths.proc_root) and self._aborted:
                # fenced: its librbd can never flush; waiting would be forever
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
                continue
            if pid_alive(pid, self.paths.proc_root):
                raise StepTimeout(f"rbd-fuse (pid {pid}) did not exit within {bound:g}s after "
                                  "unmount (it flushes to the cluster first)")
        with contextlib.suppress(OSError):
            fuse_dir.rmdir()


def image_file_of(fuse_dir: Path, spec: ImageSpec) -> Path:
    return fuse_dir / spec.image
