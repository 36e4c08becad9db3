"""The unit pattern under a real systemd on *this* machine's kernel: the
guest image booted by systemd-nspawn (systemd 252 as PID 1), cephvol installed
from the working tree's Debian package (harness.session_deb), the fuse backend
(rbd-fuse + a real loop device), the session's dev cluster on 127.0.0.1 (the
container shares the host's network).

What nspawn does not give and the test adds: /dev/fuse and /dev/loop-control
are bound in, and /dev/loop0..63 are made with mknod inside (on a host, udev
makes them; the container's /dev is a private tmpfs). The root is the cached
guest image mounted read-only under an overlay (--volatile=overlay), so the
image is never changed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import CephCluster
from tests.vm.harness import (
    INSTALL_ARGV,
    INSTALL_DIR,
    ensure_image,
    install_tree,
    nspawn_pid1,
    power_off_nspawn,
)

WRITER = ("/bin/sh -c 'i=0; while true; do echo $i >> \"$CEPHVOL_MOUNTPOINT/log\"; "
          "i=$((i+1)); sync \"$CEPHVOL_MOUNTPOINT/log\"; sleep 0.2; done'")


@dataclass
class Container:
    pid1: int
    conf: Path
    nspawn: subprocess.Popen[bytes]

    def run(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "CEPH_CONF": str(self.conf)}
        return subprocess.run(["nsenter", "-t", str(self.pid1), "-a", *argv],
                              capture_output=True, text=True, env=env, timeout=timeout,
                              check=False)

    def ok(self, *argv: str, timeout: float = 120) -> str:
        cp = self.run(*argv, timeout=timeout)
        assert cp.returncode == 0, f"{' '.join(argv)}: {cp.stderr}"
        return cp.stdout


@pytest.fixture(scope="module")
def container(cluster: CephCluster, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[Container]:
    if not shutil.which("systemd-nspawn"):
        pytest.skip("systemd-nspawn is not installed; run scripts/setup")
    image = ensure_image()
    work = Path(tmp_path_factory.mktemp("nspawn"))
    install = install_tree(work / "install")  # the package and vagrant/provision/
    root = work / "root"
    root.mkdir()
    subprocess.run(["mount", "-o", "loop,ro", str(image.rootfs), str(root)], check=True,
                   timeout=60)
    log = open(work / "console.log", "w")
    proc = subprocess.Popen(
        ["systemd-nspawn", "-D", str(root), "--volatile=overlay", "-b", "--register=no",
         "--keep-unit", f"--bind-ro={install}:{INSTALL_DIR}",
         # the qemu guest's command agent (it installs the package at boot) has
         # no port here: masked, the fixture installs it
         "--bind-ro=/dev/null:/etc/systemd/system/cephvol-guest-agent.service",
         f"--bind={cluster.conf.parent}", "--bind=/dev/fuse", "--bind=/dev/loop-control"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    c = None
    try:
        c = Container(nspawn_pid1(proc, time.monotonic() + 60), cluster.conf, proc)
        c.run("systemctl", "is-system-running", "--wait", timeout=120)  # degraded is fine
        c.ok(*INSTALL_ARGV)  # dpkg -i: /usr/bin/cephvol, the units in /lib/systemd/system
        c.ok("sh", "-c", "for i in $(seq 0 63); do [ -e /dev/loop$i ] || "
                         "mknod -m 660 /dev/loop$i b 7 $i; done")
        # as on a host: units find the cluster in /etc/ceph (paths inside are absolute)
        c.ok("sh", "-c", f"mkdir -p /etc/ceph && cp {cluster.conf} /etc/ceph/ceph.conf")
        yield c
    finally:
        if c is not None and proc.poll() is None:
            c.run("cephvol", "cleanup", "--all", "--force", timeout=300)
        power_off_nspawn(proc, root, "guest image")
        log.close()


@pytest.fixture
def app(container: Container, cluster: CephCluster) -> Iterator[tuple[str, str]]:
    name = f"n-{uuid.uuid4().hex[:8]}"
    spec = f"rbd/{name}"
    cluster.cli("create", spec, "--size", "64M", check=True)
    yield spec, name
    container.run("systemctl", "stop", f"cvn-{name}")
    container.run("cephvol", "detach", "--force", spec)
    cluster.cli("rm", spec)


def _install(c: Container, spec: str, name: str, command: str) -> str:
    unit = f"cvn-{name}"
    c.ok("cephvol", "units", "render", spec, "--for", "plain", "--name", unit, "--command",
         command, "--mountpoint", f"/srv/app/{name}", "--setenv", f"CEPH_CONF={c.conf}",
         "--setenv", "CEPHVOL_STEP_TIMEOUT=30", "-o", "/etc/systemd/system")
    c.ok("systemctl", "daemon-reload")
    return unit


def _detached(c: Container, unit: str, name: str, spec: str) -> None:
    deadline = time.monotonic() + 120
    while c.run("systemctl", "is-active", unit).stdout.strip() in ("active", "deactivating",
                                                                   "activating"):
        assert time.monotonic() < deadline, "unit did not stop"
        time.sleep(0.5)
    assert json.loads(c.ok("cephvol", "status", "--json")) == []
    assert c.run("mountpoint", "-q", f"/srv/app/{name}").returncode != 0, (
        c.run("findmnt", "-n", f"/srv/app/{name}").stdout,
        c.run("journalctl", "--no-pager", "-n", "40", "-u", unit).stdout)
    assert c.run("test", "-e", f"/run/cephvol/{unit}.env").returncode != 0
    assert spec.split("/")[1] not in subprocess.run(
        ["losetup", "-l", "-n"], capture_output=True, text=True).stdout
    entries = [json.loads(ln) for ln in c.ok(
        "journalctl", "-o", "json", "--no-pager", "SYSLOG_IDENTIFIER=cephvol",
        f"VOLUME={spec}", f"_SYSTEMD_UNIT={unit}.service").splitlines() if ln.strip()]
    assert {"map", "mount", "attached", "umount", "unmap", "detached"} <= \
        {e["STEP"] for e in entries}, entries
    assert {e["BACKEND"] for e in entries} == {"fuse"}


def _runs_in_log(c: Container, spec: str, name: str) -> list[int]:
    """Lines written per start of the writer (each start counts from 0); every
    run's lines must be there without a gap or a torn line."""
    c.ok("cephvol", "attach", spec, "--mountpoint", f"/srv/check/{name}")
    lines = [int(x) for x in c.ok("cat", f"/srv/check/{name}/log").split()]
    c.ok("cephvol", "detach", spec)
    runs: list[int] = []
    for n in lines:
        if n == 0:
            runs.append(0)
        assert runs and n == runs[-1], lines
        runs[-1] += 1
    return runs


def test_stop_and_crash_detach_under_systemd_on_this_kernel(
        container: Container, app: tuple[str, str]) -> None:
    spec, name = app
    unit = _install(container, spec, name, WRITER)
    container.ok("systemctl", "start", unit, timeout=180)
    env = container.ok("cat", f"/run/cephvol/{unit}.env")
    assert 'CEPHVOL_DEVICE="/dev/loop' in env and 'CEPHVOL_BACKEND="fuse"' in env
    time.sleep(2)
    container.ok("systemctl", "stop", unit, timeout=180)
    _detached(container, unit, name, spec)
    assert len(runs := _runs_in_log(container, spec, name)) == 1 and runs[0] >= 5

    container.ok("systemctl", "start", unit, timeout=180)
    time.sleep(2)
    container.ok("systemctl", "kill", "-s", "KILL", unit)
    _detached(container, unit, name, spec)
    runs = _runs_in_log(container, spec, name)
    assert len(runs) == 2 and runs[1] >= 5, runs


def test_failed_start_detaches_under_systemd_on_this_kernel(
        container: Container, app: tuple[str, str]) -> None:
    spec, name = app
    unit = _install(container, spec, name, "/nonexistent/container-runtime run db")
    assert container.run("systemctl", "start", unit, timeout=180).returncode != 0
    _detached(container, unit, name, spec)


def test_shutdown_detaches_everything_before_the_daemons_go(
        container: Container, cluster: CephCluster, tmp_path: Path) -> None:
    """Power the container off with a unit's volume and a volume attached by
    hand (released only by cephvol-cleanup.service's ExecStop=): both must be
    detached -- rbd-fuse still running until then -- ownership given back,
    no loop device left, the data intact. Runs last: it ends the container."""
    c = container
    specs = [f"rbd/sd-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    for spec in specs:
        cluster.cli("create", spec, "--size", "64M", check=True)
    c.ok("cephvol", "units", "install")
    c.ok("systemctl", "start", "cephvol-cleanup.service", timeout=120)
    name = specs[0].split("/")[1]
    unit = _install(c, specs[0], name, WRITER)
    c.ok("systemctl", "start", unit, timeout=180)
    c.ok("cephvol", "attach", specs[1], "--mountpoint", "/srv/manual")
    c.ok("sh", "-c", "echo kept > /srv/manual/f && sync /srv/manual/f")
    time.sleep(2)
    c.run("systemctl", "poweroff")
    assert c.nspawn.wait(timeout=180) == 0
    loops = subprocess.run(["losetup", "-l", "-n"], capture_output=True, text=True).stdout
    assert not any(s.split("/")[1] in loops for s in specs), loops
    try:
        for spec in specs:
            own = json.loads(cluster.cli("owner", spec, "--json", check=True).stdout)
            assert own["owner"] is None, own  # released at shutdown
        cluster.cli("attach", specs[0], "--mountpoint", str(tmp_path / "a"), check=True)
        lines = (tmp_path / "a" / "log").read_text().split()
        assert len(lines) >= 5 and lines == [str(i) for i in range(len(lines))]
        cluster.cli("attach", specs[1], "--mountpoint", str(tmp_path / "b"), check=True)
        assert (tmp_path / "b" / "f").read_text() == "kept\n"
    finally:
        for spec in specs:
            cluster.cli("detach", spec)
            cluster.cli("rm", spec)
