"""Fixtures for tests on the qemu test host (marker `vm`).

One guest, one network namespace and one dev cluster inside that namespace
per session; all three are torn down at the end, also after failures.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cephvol.secrets import read_secret
from tests.vm.harness import HOST_ADDR, Guest, NetNS, ensure_image, unavailable

CEPHVOL = str(Path(sys.executable).parent / "cephvol")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.vm)


@dataclass
class NsCluster:
    """The dev cluster inside the guest's network namespace, seen from the host."""

    netns: NetNS
    directory: Path

    @property
    def conf(self) -> Path:
        return self.directory / "ceph.conf"

    def run(self, argv: list[str], timeout: float = 120,
            in_netns: bool = True) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, CEPH_CONF=str(self.conf), CEPHVOL_CONNECT_TIMEOUT="20")
        return subprocess.run(self.netns.exec_argv(argv) if in_netns else argv,
                              capture_output=True, text=True, env=env, timeout=timeout,
                              check=False)

    def cli(self, *args: str) -> str:
        cp = self.run([CEPHVOL, *args])
        assert cp.returncode == 0, f"cephvol {' '.join(args)}: {cp.stderr}"
        return cp.stdout

    def python(self, code: str, *args: str) -> str:
        cp = self.run([sys.executable, "-c", code, *args])
        assert cp.returncode == 0, cp.stderr
        return cp.stdout

    def admin_key(self) -> str:
        secret = read_secret([str(self.directory / "keyring")], "client.admin")
        return base64.b64encode(secret).decode()

    def mon_v1(self) -> str:
        for line in self.conf.read_text().splitlines():
            if line.startswith("mon host"):
                return line.split("v1:", 1)[1].rstrip("]").strip()
        raise AssertionError("no mon host line")


@pytest.fixture(scope="session")
def vm_netns() -> Iterator[NetNS]:
    why = unavailable()
    if why:
        pytest.skip(why)
    with NetNS() as ns:
        yield ns
    assert not Path("/run/netns", ns.name).exists(), f"network namespace {ns.name} left behind"


@pytest.fixture(scope="session")
def vm_cluster(vm_netns: NetNS, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NsCluster]:
    d = Path(tmp_path_factory.mktemp("vmcluster")) / "cluster"
    c = NsCluster(vm_netns, d)
    try:
        cp = c.run([CEPHVOL, "dev-cluster", "up", "--dir", str(d), "--addr", HOST_ADDR,
                    "--netns", vm_netns.name], timeout=300, in_netns=False)
        assert cp.returncode == 0, cp.stderr
        yield c
    finally:
        subprocess.run([CEPHVOL, "dev-cluster", "down", "--dir", str(d)], capture_output=True,
                       timeout=120, check=False)


@pytest.fixture(scope="session")
def guest(vm_netns: NetNS, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    image = ensure_image()
    work = Path(tmp_path_factory.mktemp("guest"))
    with Guest(image, vm_netns, work) as g:
        yield g
    left = subprocess.run(["pgrep", "-f", f"qemu-system.*{work}"], capture_output=True,
                          text=True, check=False).stdout.split()
    assert not left, f"qemu left running: {left}"


@pytest.fixture(scope="session")
def guest_ceph(guest: Guest, vm_cluster: NsCluster) -> Guest:
    return configure_ceph_client(guest, vm_cluster)


def configure_ceph_client(guest: Guest, vm_cluster: NsCluster) -> Guest:
    """The guest as a Ceph client of the namespace's cluster: /etc/ceph holds a
    client-only config and client.admin's keyring (0600), as on a real host."""
    fsid = next(ln.split("=", 1)[1].strip() for ln in vm_cluster.conf.read_text().splitlines()
                if ln.startswith("fsid"))
    mon = next(ln.split("=", 1)[1].strip() for ln in vm_cluster.conf.read_text().splitlines()
               if ln.startswith("mon host"))
    guest.put("/etc/ceph/ceph.conf", (f"[global]\nfsid = {fsid}\nmon host = {mon}\n"
                                      "[client]\nkeyring = /etc/ceph/keyring\n").encode(), 0o644)
    guest.put("/etc/ceph/keyring",
              f"[client.admin]\n\tkey = {vm_cluster.admin_key()}\n".encode(), 0o600)
    return guest


@pytest.fixture
def vm_image(guest_ceph: Guest, vm_cluster: NsCluster) -> Iterator[Callable[[str], str]]:
    """Make a 64 MiB image named PREFIX-<random>; at the end it is force-detached in
    the guest (whatever the test left) and removed."""
    made: list[str] = []

    def make(prefix: str) -> str:
        spec = f"rbd/{prefix}-{uuid.uuid4().hex[:8]}"
        vm_cluster.cli("create", spec, "--size", "64M")
        made.append(spec)
        return spec

    yield make
    for spec in made:
        guest_ceph.run(["cephvol", "detach", "--force", spec], timeout=120)
        for dev in guest_ceph.run(["ls", "/sys/bus/rbd/devices"]).stdout.split():
            guest_ceph.run(["sh", "-c", f"echo '{dev} force' > /sys/bus/rbd/remove_single_major"])
        vm_cluster.run(["cephvol", "rm", spec])

