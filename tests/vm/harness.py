"""A real kernel test host: a qemu guest with Debian's kernel (krbd, nbd),
systemd as PID 1 and cephvol from the working tree.

Pieces, each owned and cleaned up here:
- the guest image, built by build-guest-image.sh from Debian's packages and
  cached under $CEPHVOL_VM_CACHE (default /var/tmp/cephvol-vm) by a content
  hash of its inputs, so it is rebuilt only when they change;
- a network namespace with a tap device (10.99.0.1/24; the guest is
  10.99.0.2), where the test cluster runs too, because krbd talks to the
  monitor and every OSD directly: nothing listens outside the namespace;
- the qemu process (TCG, or KVM where the host has a real one), always under
  a deadline, its root disk in snapshot mode so the cached image stays clean;
- a command channel: a virtio-serial port served by guest-agent.py.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

VM_DIR = Path(__file__).resolve().parent
REPO = VM_DIR.parent.parent
PROVISION = REPO / "vagrant" / "provision"
BUILD_SCRIPT = VM_DIR / "build-guest-image.sh"
BUILD_INPUTS = (BUILD_SCRIPT, VM_DIR / "guest-agent.py", PROVISION / "guest-packages.txt")
HOST_ADDR = "10.99.0.1"
GUEST_ADDR = "10.99.0.2"
BOOT_TIMEOUT = float(os.environ.get("CEPHVOL_VM_BOOT_TIMEOUT", "300"))


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


class NetNS:
    """A network namespace with a tap device for the guest; removed on exit."""

    def __init__(self, prefix: str = "cvt") -> None:
        self.name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.tap = "tap0"

    def __enter__(self) -> NetNS:
        self._ip("netns", "add", self.name)
        try:
            self._ip("-n", self.name, "link", "set", "lo", "up")
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
        """The working tree's cephvol and provisioning scripts on a small ext4 disk."""
        stage = self.workdir / "src"
        shutil.rmtree(stage, ignore_errors=True)
        shutil.copytree(REPO / "cephvol", stage / "cephvol",
                        ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(PROVISION, stage / "vagrant" / "provision")
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
