"""A real kernel test host: a qemu guest with Debian's kernel (krbd, nbd),
systemd as PID 1 and cephvol installed from the working tree's Debian package.

Pieces, each owned and cleaned up here:
- the guest image, built by build-guest-image.sh from Debian's packages and
  cached under $CEPHVOL_VM_CACHE (default /var/tmp/cephvol-vm) by a content
  hash of its inputs, so it is rebuilt only when they change;
- a network namespace with a tap device (10.99.0.1/24; the guest is
  10.99.0.2), where the test cluster runs too, because krbd talks to the
  monitor and every OSD directly: nothing listens outside the namespace;
- the qemu process (TCG, or KVM where the host has a real one), always under
  a deadline, its root disk in snapshot mode so the cached image stays clean;
- a command channel: a virtio-serial port served by guest-agent.py;
- cephvol itself: `make deb` once per process (session_deb), handed to every
  test host (qemu guest, nspawn host) with the provisioning scripts
  (install_tree) and installed by vagrant/provision/install-cephvol.sh with
  dpkg, as on an operator's host: /usr/bin/cephvol, the units in
  /lib/systemd/system, cephvol-cleanup.service enabled and started.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

VM_DIR = Path(__file__).resolve().parent
REPO = VM_DIR.parent.parent
PROVISION = REPO / "vagrant" / "provision"
BUILD_SCRIPT = VM_DIR / "build-guest-image.sh"
BUILD_INPUTS = (BUILD_SCRIPT, VM_DIR / "guest-agent.py", PROVISION / "guest-packages.txt",
                VM_DIR / "container-packages.txt")
HOST_ADDR = "10.99.0.1"
GUEST_ADDR = "10.99.0.2"
BOOT_TIMEOUT = float(os.environ.get("CEPHVOL_VM_BOOT_TIMEOUT", "300"))
# where a test host finds install_tree(): the qemu guest mounts its second disk
# there (build-guest-image.sh: fstab, and the unit that installs at boot), an
# nspawn host gets it bound read-only
INSTALL_DIR = "/opt/cephvol-src"
INSTALL_ARGV = ("sh", f"{INSTALL_DIR}/vagrant/provision/install-cephvol.sh", "--offline",
                f"{INSTALL_DIR}/cephvol.deb")


class HarnessError(Exception):
    """The test host could not be built, booted or reached."""


def cache_root() -> Path:
    return Path(os.environ.get("CEPHVOL_VM_CACHE", "/var/tmp/cephvol-vm"))


def unavailable() -> str | None:
    """Why no guest can run here at all, or None."""
    if os.geteuid() != 0:
        return "the qemu test host needs root (network namespaces, tap devices)"
    for tool in ("qemu-system-x86_64", "debootstrap", "busybox", "mke2fs", "ip", "cpio"):
        if not shutil.which(tool):
            return f"{tool} is not installed; run scripts/setup"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing: no tap networking for the guest"
    return None


def accel_args() -> list[str]:
    """KVM only where it is a real one; kvm_pvm cannot run a stock kernel."""
    if os.access("/dev/kvm", os.R_OK | os.W_OK) and not os.path.exists("/sys/module/kvm_pvm"):
        return ["-accel", "kvm", "-cpu", "host"]
    return ["-accel", "tcg"]


def _kernel_package() -> str:
    out = subprocess.run(["apt-cache", "depends", "linux-image-amd64"], capture_output=True,
                         text=True, check=True, timeout=60).stdout
    for line in out.splitlines():
        word = line.strip().removeprefix("Depends:").strip()
        if word.startswith("linux-image-") and word != "linux-image-amd64":
            return word
    raise HarnessError("apt-cache names no kernel package for linux-image-amd64")


def image_key() -> str:
    h = hashlib.sha256()
    for p in BUILD_INPUTS:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    h.update(_kernel_package().encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class GuestImage:
    directory: Path

    @property
    def rootfs(self) -> Path:
        return self.directory / "rootfs.img"

    @property
    def kernel(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd.img"


def ensure_image(timeout: float = 1200) -> GuestImage:
    """The cached image for the current inputs, built once (under a lock)."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    out = root / image_key()
    img = GuestImage(out)
    lock = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not img.rootfs.exists():
            cp = subprocess.run(["bash", str(BUILD_SCRIPT), str(out)], capture_output=True,
                                text=True, timeout=timeout, check=False)
            if cp.returncode != 0:
                raise HarnessError(f"guest image build failed: {cp.stderr.strip()[-2000:]}")
            for old in root.iterdir():  # keep the cache to the current image
                if old.is_dir() and old != out and not old.name.endswith(".build"):
                    shutil.rmtree(old, ignore_errors=True)
    finally:
        os.close(lock)
    return img


_deb_lock = threading.Lock()
_deb: Path | HarnessError | None = None


def session_deb(timeout: float = 900) -> Path:
    """cephvol's Debian package, the one every test host installs: $CEPHVOL_DEB
    when set (built by an earlier CI step), else `make deb` of the working tree
    (Debian's tools, lintian), run once per process and under a file lock, so
    that two processes never build in the tree's build/ at once. A failed build
    is not retried: every host of the process would wait for it again."""
    global _deb
    with _deb_lock:
        if _deb is None:
            _deb = _build_deb(timeout)
        if isinstance(_deb, HarnessError):
            raise _deb
        return _deb


def _build_deb(timeout: float) -> Path | HarnessError:
    given = os.environ.get("CEPHVOL_DEB")
    if given:
        deb = Path(given).absolute()
        return deb if deb.is_file() else HarnessError(f"$CEPHVOL_DEB: no such file: {deb}")
    (REPO / "build").mkdir(exist_ok=True)
    lock = os.open(REPO / "build" / ".deb.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cp = subprocess.run(["make", "-s", "deb"], cwd=REPO, capture_output=True, text=True,
                            timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return HarnessError(f"make deb did not finish in {timeout:.0f} s")
    finally:
        os.close(lock)
    # the tree's version, as the Makefile reads it (not that of whichever cephvol
    # this process imported)
    version = re.search(r'^__version__ = "(.*)"$', (REPO / "cephvol" / "__init__.py").read_text(),
                        re.M)
    deb = REPO / "dist" / f"cephvol_{version[1] if version else '?'}_all.deb"
    if cp.returncode != 0 or not deb.is_file():
        return HarnessError(f"make deb failed ({cp.returncode}): "
                            f"{(cp.stdout + cp.stderr).strip()[-3000:]}")
    return deb


def install_tree(dest: Path) -> Path:
    """What a test host installs cephvol from, at INSTALL_DIR inside it: the
    session's package (as cephvol.deb) and vagrant/provision/ (INSTALL_ARGV).
    Nothing of the source tree: the host runs what an operator's host runs."""
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(PROVISION, dest / "vagrant" / "provision")
    shutil.copyfile(session_deb(), dest / "cephvol.deb")
    return dest


class NetNS:
    """A network namespace with a tap device for the guest (or only its
    loopback, `tap=False`, for nspawn hosts); removed on exit."""

    def __init__(self, prefix: str = "cvt", *, tap: bool = True) -> None:
        self.name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.tap = "tap0" if tap else ""

    def __enter__(self) -> NetNS:
        self._ip("netns", "add", self.name)
        try:
            self._ip("-n", self.name, "link", "set", "lo", "up")
            if self.tap:
                self._ip("-n", self.name, "tuntap", "add", "dev", self.tap, "mode", "tap")
                self._ip("-n", self.name, "addr", "add", f"{HOST_ADDR}/24", "dev", self.tap)
                self._ip("-n", self.name, "link", "set", self.tap, "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)

    def exec_argv(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    @staticmethod
    def _ip(*args: str) -> None:
        cp = subprocess.run(["ip", *args], capture_output=True, text=True, check=False,
                            timeout=30)
        if cp.returncode != 0:
            raise HarnessError(f"ip {' '.join(args)}: {cp.stderr.strip()}")


@dataclass(frozen=True)
class GuestResult:
    rc: int
    stdout: str
    stderr: str


class Guest:
    """One booted guest. Use as a context manager; every exit path kills qemu."""

    def __init__(self, image: GuestImage, netns: NetNS, workdir: Path, *,
                 memory_mb: int = 1024) -> None:
        self.image, self.netns, self.workdir = image, netns, workdir
        self.memory_mb = memory_mb
        self.console = workdir / "console.log"
        self.sock_path = workdir / "agent.sock"
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._buf = b""
        self._n = 0
        self.boot_seconds = 0.0

    # -- lifecycle -------------------------------------------------------------

    def __enter__(self) -> Guest:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _source_disk(self) -> Path:
        """install_tree() on a small ext4 disk; the guest mounts it at INSTALL_DIR
        and installs the package from it at every boot (build-guest-image.sh)."""
        stage = install_tree(self.workdir / "src")
        disk = self.workdir / "src.img"
        subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(stage), str(disk), "64M"],
                       check=True, capture_output=True, timeout=60)
        shutil.rmtree(stage)
        return disk

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.sock_path.unlink(missing_ok=True)
        src = self._source_disk()
        argv = [
            "qemu-system-x86_64", *accel_args(), "-m", str(self.memory_mb), "-smp", "1",
            "-nodefaults", "-no-reboot", "-display", "none", "-monitor", "none",
            "-kernel", str(self.image.kernel), "-initrd", str(self.image.initrd),
            "-append", "console=ttyS0 root=/dev/vda panic=-1 quiet",
            "-drive", f"file={self.image.rootfs},format=raw,if=virtio,snapshot=on",
            "-drive", f"file={src},format=raw,if=virtio,readonly=on",
            "-netdev", f"tap,id=n0,ifname={self.netns.tap},script=no,downscript=no",
            "-device", "virtio-net-pci,netdev=n0",
            "-device", "virtio-serial",
            "-chardev", f"socket,id=ag,path={self.sock_path},server=on,wait=off",
            "-device", "virtserialport,chardev=ag,name=cephvol.agent",
            "-serial", f"file:{self.console}",
        ]
        t0 = time.monotonic()
        log = open(self.workdir / "qemu.log", "wb")
        self._proc = subprocess.Popen(self.netns.exec_argv(argv), stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = t0 + BOOT_TIMEOUT
        while not self.sock_path.exists():
            self._check_alive()
            if time.monotonic() > deadline:
                raise HarnessError("qemu did not create its agent socket")
            time.sleep(0.05)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(str(self.sock_path))
        self._wait_ready(deadline)
        self.boot_seconds = round(time.monotonic() - t0, 1)

    def _check_alive(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            raise HarnessError(f"qemu exited ({self._proc.returncode}): "
                               f"{self._tail(self.workdir / 'qemu.log')} | "
                               f"console: {self._tail(self.console)}")

    @staticmethod
    def _tail(p: Path, n: int = 600) -> str:
        try:
            return p.read_text(errors="replace")[-n:].replace("\n", " / ")
        except OSError:
            return "(none)"

    def _wait_ready(self, deadline: float) -> None:
        while True:
            line = self._readline(deadline, what="the guest agent to come up")
            if json.loads(line).get("ready"):
                return

    def stop(self) -> None:
        if self._sock is not None and self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(Exception):
                self._send({"op": "run", "argv": ["systemctl", "poweroff", "--no-block"],
                            "timeout": 10, "id": "poweroff"})
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait(timeout=30)
            self._proc = None

    # -- the command channel ---------------------------------------------------

    def _send(self, req: dict[str, object]) -> None:
        assert self._sock is not None
        self._sock.settimeout(120)  # _readline shortens it; a big put needs longer
        self._sock.sendall(json.dumps(req).encode() + b"\n")

    def _readline(self, deadline: float, what: str) -> bytes:
        assert self._sock is not None
        while b"\n" not in self._buf:
            self._check_alive()
            left = deadline - time.monotonic()
            if left <= 0:
                raise HarnessError(f"timed out waiting for {what}; console: "
                                   f"{self._tail(self.console)}")
            self._sock.settimeout(min(left, 1.0))
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                raise HarnessError(f"the agent channel closed while waiting for {what}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def _call(self, req: dict[str, object], timeout: float) -> GuestResult:
        self._n += 1
        req["id"] = self._n
        self._send(req)
        deadline = time.monotonic() + timeout + 10
        while True:
            resp = json.loads(self._readline(deadline, what=f"guest request {req.get('argv')}"))
            if resp.get("id") == self._n:
                return GuestResult(resp["rc"], resp["stdout"], resp["stderr"])

    def run(self, argv: list[str], *, timeout: float = 60, input: str | None = None,
            check: bool = False) -> GuestResult:
        """Run argv in the guest as root; returns exit code and output."""
        r = self._call({"op": "run", "argv": argv, "timeout": timeout, "input": input}, timeout)
        if check and r.rc != 0:
            raise HarnessError(f"guest: {' '.join(argv)} -> {r.rc}: {r.stderr.strip()}")
        return r

    def put(self, path: str, data: bytes, mode: int = 0o600) -> None:
        r = self._call({"op": "put", "path": path, "mode": mode,
                        "data": base64.b64encode(data).decode()}, 30)
        if r.rc != 0:
            raise HarnessError(f"guest: cannot write {path}: {r.stderr}")


# -- the guest image as a container host under systemd-nspawn ------------------------------

UNIFIED_CGROUP = Path("/sys/fs/cgroup/unified")


def nspawn_unavailable() -> str | None:
    """Why no systemd-nspawn container host can run here, or None."""
    if os.geteuid() != 0:
        return "systemd-nspawn needs root"
    for tool in ("systemd-nspawn", "nsenter", "debootstrap", "mke2fs", "ip", "busybox"):
        if not shutil.which(tool):
            return f"{tool} is not installed; run scripts/setup"
    return None


def _cgroup2_root() -> Path:
    """Where this host's cgroup2 hierarchy is: hybrid hosts (no systemd) mount
    it at /sys/fs/cgroup/unified, unified hosts at /sys/fs/cgroup."""
    return UNIFIED_CGROUP if UNIFIED_CGROUP.is_dir() else Path("/sys/fs/cgroup")


def nspawn_pid1(proc: subprocess.Popen[Any], deadline: float, log: Path | None = None) -> int:
    """The pid (on this host) of the systemd that `systemd-nspawn -b` started."""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = Guest._tail(log, 1500) if log else ""
            raise HarnessError(f"systemd-nspawn exited ({proc.returncode}): {tail}")
        kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        with contextlib.suppress(OSError):
            for child in kids.read_text().split():
                if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                    return int(child)
        time.sleep(0.05)
    raise HarnessError("systemd did not start in the nspawn container")


def power_off_nspawn(proc: subprocess.Popen[Any], root: Path, what: str) -> None:
    """Stop a container booted by `systemd-nspawn -b`: SIGTERM makes nspawn shut
    its systemd down cleanly; SIGKILL after 90 s. Then unmount its root,
    retrying while nspawn lets go of it, and fail if it stays mounted."""
    proc.terminate()
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)
    for _ in range(20):
        if subprocess.run(["umount", str(root)], capture_output=True).returncode == 0:
            break
        time.sleep(0.5)
    assert not os.path.ismount(root), f"{what} left mounted"


class NspawnHost:
    """The cached guest image booted by systemd-nspawn (systemd 252 as PID 1,
    this kernel, fuse backend) as a Docker/Podman host. Use as a context
    manager; every exit path powers it off and removes what it made.

    - root: the image mounted read-only under --volatile=overlay (never changed);
    - network: the namespace `netns` (made by the caller, with the dev cluster
      inside): the engines get CAP_NET_ADMIN there and nowhere else;
    - cgroups: nspawn needs a cgroup of its own on a host without systemd, and
      a pure cgroup2 tree inside (SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1) for the
      engines; the bpf syscall for their device filters (@keyring for runc);
    - its own machine-id (`machine_id`), so two hosts are two cephvol owners;
    - /dev/fuse, /dev/loop-control bound in; /dev/loop0..63 made inside.
    """

    def __init__(self, image: GuestImage, workdir: Path, netns: str, *,
                 binds: tuple[str, ...] = (), machine_id: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.image, self.workdir, self.netns = image, workdir, netns
        self.binds = binds
        self.env = dict(env or {})  # for every command run() starts in it
        self.machine_id = machine_id or uuid.uuid4().hex
        self.root = workdir / "root"
        self.cgroup = _cgroup2_root() / f"cephvol-nspawn-{self.machine_id[:12]}"
        self.pid1 = 0
        self.boot_seconds = 0.0
        self._proc: subprocess.Popen[bytes] | None = None
        self._mounted = False
        self._loop = ""

    def __enter__(self) -> NspawnHost:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(exist_ok=True)
        install = install_tree(self.workdir / "install")  # the package, vagrant/provision/
        # losetup, then mount: `mount -o loop` first stats the backing file of
        # every bound loop device, and hangs on one whose FUSE daemon is stopped
        self._loop = subprocess.run(
            ["losetup", "--find", "--show", "--read-only", str(self.image.rootfs)],
            check=True, timeout=60, capture_output=True, text=True).stdout.strip()
        subprocess.run(["mount", "-o", "ro", self._loop, str(self.root)],
                       check=True, timeout=60, capture_output=True)
        self._mounted = True
        self.cgroup.mkdir(exist_ok=True)
        argv = ["systemd-nspawn", "-D", str(self.root), "--volatile=overlay", "-b",
                "--register=no", "--keep-unit", f"--uuid={self.machine_id}",
                f"--machine=cvh-{self.machine_id[:8]}",
                f"--network-namespace-path=/run/netns/{self.netns}",
                # Docker's runc sets up each container's loopback: NET_ADMIN, which
                # nspawn grants with --private-network only; here it is our namespace
                "--capability=CAP_NET_ADMIN",
                "--system-call-filter=bpf @keyring",
                f"--bind-ro={install}:{INSTALL_DIR}", "--bind=/dev/fuse",
                "--bind=/dev/loop-control", "--tmpfs=/var/lib/docker",
                # the qemu guest's command agent has no port here (and would
                # install cephvol concurrently with start()): masked
                "--bind-ro=/dev/null:/etc/systemd/system/cephvol-guest-agent.service",
                "--tmpfs=/var/lib/containers", *(f"--bind={b}" for b in self.binds)]
        env = dict(os.environ, SYSTEMD_NSPAWN_UNIFIED_HIERARCHY="1")
        t0 = time.monotonic()
        log = open(self.workdir / "console.log", "wb")
        # into its own cgroup before exec: nspawn takes the one it runs in
        self._proc = subprocess.Popen(
            ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(self.cgroup), *argv],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        self.pid1 = self._find_pid1(t0 + BOOT_TIMEOUT)
        deadline = t0 + BOOT_TIMEOUT
        # "offline": its bus is not up yet; "degraded" is fine
        while self.run("systemctl", "is-system-running").stdout.strip() not in (
                "running", "degraded"):
            if time.monotonic() > deadline:
                raise HarnessError("systemd in the nspawn container did not finish booting")
            time.sleep(0.1)
        self.boot_seconds = round(time.monotonic() - t0, 1)
        self.ok(*INSTALL_ARGV)  # dpkg -i: the image has the package's Depends
        self.ok("sh", "-c", "for i in $(seq 0 63); do [ -e /dev/loop$i ] || "
                            "mknod -m 660 /dev/loop$i b 7 $i; done")

    def _find_pid1(self, deadline: float) -> int:
        assert self._proc is not None
        return nspawn_pid1(self._proc, deadline, self.workdir / "console.log")

    def run(self, *argv: str, timeout: float = 120, input: str | None = None
            ) -> subprocess.CompletedProcess[str]:
        """argv in the container host (all its namespaces), as root."""
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               **self.env}
        return subprocess.run(["nsenter", "-t", str(self.pid1), "-a", *argv],
                              capture_output=True, text=True, env=env, timeout=timeout,
                              check=False, input=input)

    def ok(self, *argv: str, timeout: float = 120) -> str:
        cp = self.run(*argv, timeout=timeout)
        if cp.returncode != 0:
            raise HarnessError(f"container host: {' '.join(argv)} -> {cp.returncode}: "
                               f"{cp.stderr.strip()[-1500:]}")
        return cp.stdout

    def poweroff(self, timeout: float = 180) -> int:
        """Shut systemd down (units stop, ExecStopPost= runs); nspawn's exit code."""
        if self._proc is None:
            return 0
        if self._proc.poll() is None:
            self._proc.terminate()  # nspawn: SIGTERM -> orderly poweroff of the container
        try:
            return self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=30)
            raise HarnessError("the nspawn container did not power off in time") from None

    def stop(self) -> None:
        try:
            if self._proc is not None:
                with contextlib.suppress(HarnessError):
                    self.poweroff()
                self._proc = None
        finally:
            if self._mounted:
                for _ in range(40):
                    if subprocess.run(["umount", str(self.root)],
                                      capture_output=True).returncode == 0:
                        break
                    time.sleep(0.25)
                self._mounted = os.path.ismount(self.root)
            if self._loop and not self._mounted:
                subprocess.run(["losetup", "-d", self._loop], capture_output=True, timeout=60)
                self._loop = ""
            if self.cgroup.exists():
                for _ in range(40):
                    with contextlib.suppress(OSError):
                        self._rmdir_tree(self.cgroup)
                    if not self.cgroup.exists():
                        break
                    time.sleep(0.25)

    @staticmethod
    def _rmdir_tree(cg: Path) -> None:
        for child in sorted((p for p in cg.rglob("*") if p.is_dir()),
                            key=lambda p: -len(p.parts)):
            child.rmdir()
        cg.rmdir()


def busybox_image(dest: Path) -> Path:
    """A container image as a tarball, offline: busybox-static, a link per
    applet, minimal /etc/passwd and /etc/group (for `docker/podman import`)."""
    root = dest / "busybox-root"
    shutil.rmtree(root, ignore_errors=True)
    for d in ("bin", "etc", "data", "tmp", "proc", "sys", "dev"):
        (root / d).mkdir(parents=True)
    bb = shutil.which("busybox") or "/bin/busybox"
    shutil.copy2(bb, root / "bin" / "busybox")
    applets = subprocess.run([str(root / "bin" / "busybox"), "--list"], capture_output=True,
                             text=True, check=True, timeout=30).stdout.split()
    for a in applets:
        if a != "busybox":
            (root / "bin" / a).symlink_to("busybox")
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/:/bin/sh\n"
                                         "nobody:x:65534:65534:nobody:/:/bin/false\n")
    (root / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    tar = dest / "busybox.tar"
    subprocess.run(["tar", "-C", str(root), "-cf", str(tar), "."], check=True, timeout=60)
    shutil.rmtree(root)
    return tar
