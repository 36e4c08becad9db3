"""The Debian package on a clean Debian 12 root, as an operator installs it.

A minbase bookworm root (debootstrap, cached under $CEPHVOL_DEB_CACHE, default
/var/tmp/cephvol-deb, keyed by a hash of the recipe below) is booted with
systemd as PID 1 by systemd-nspawn (the recipe of test_nspawn_units.py: host
network, /dev/fuse and /dev/loop-control bound in, loop nodes made inside).
The cached root is never changed: the container runs on an overlayfs whose
upper layer is the test's temporary directory. Downloaded .debs are kept in
the cache (apt's archive directory is bound from there), so a warm run does
not download Ceph again. The .deb is the one every test host of the session
installs (harness.session_deb: `make deb` once; $CEPHVOL_DEB: one built earlier).

In the booted container: apt resolves the package with all its Depends and
Recommends from the Debian archive; the Vagrant hosts' install-cephvol.sh
installs it (Depends only, plus rbd-fuse: the one backend of this kernel),
which enables and starts cephvol-cleanup.service; `cephvol --version` and
`cephvol doctor --offline` work; the packaged cephvol@.service attaches a
volume of the session's dev cluster (127.0.0.1, shared network) and detaches
it; an upgrade with a volume attached keeps it attached and detachable;
`apt-get remove cephvol` is refused while a volume is attached (prerm) and,
once it is detached, removes the package and leaves no cephvol unit known to
systemd; purge leaves no enablement symlink.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import cephvol
from tests.conftest import REPO, CephCluster
from tests.vm.debroot import cache_root, ensure_root
from tests.vm.harness import nspawn_pid1, power_off_nspawn, session_deb

UPGRADE_VERSION = f"{cephvol.__version__}.1"  # Debian and PEP 440 order it after
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass
class Host:
    """The booted container: a Debian 12 host with systemd as PID 1."""

    pid1: int
    nspawn: subprocess.Popen[bytes]
    root: Path  # the container's / as the build machine sees it

    def run(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = {"PATH": PATH, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C.UTF-8"}
        return subprocess.run(["nsenter", "-t", str(self.pid1), "-a", *argv],
                              capture_output=True, text=True, env=env, timeout=timeout,
                              check=False)

    def ok(self, *argv: str, timeout: float = 120) -> str:
        cp = self.run(*argv, timeout=timeout)
        assert cp.returncode == 0, f"{' '.join(argv)} -> {cp.returncode}: {cp.stdout[-2000:]}" \
                                   f"{cp.stderr[-2000:]}"
        return cp.stdout

    def installed(self, pkg: str) -> bool:
        cp = self.run("dpkg-query", "-W", "-f=${Status}", pkg)
        return cp.stdout == "install ok installed"


@pytest.fixture(scope="module")
def deb() -> Path:
    """The package of the working tree, the one every test host of the session
    installs (harness.session_deb: `make deb` once, Debian's tools and lintian;
    or the one $CEPHVOL_DEB names)."""
    if not shutil.which("systemd-nspawn") or not shutil.which("debootstrap"):
        pytest.skip("systemd-nspawn and debootstrap are needed; run scripts/setup")
    t0 = time.monotonic()
    deb = session_deb()
    print(f"package {deb}: {deb.stat().st_size} bytes ({time.monotonic() - t0:.1f} s)")
    return deb


@pytest.fixture(scope="module")
def host(deb: Path, cluster: CephCluster, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[Host]:
    t0 = time.monotonic()
    lower = ensure_root()
    print(f"clean root: {time.monotonic() - t0:.1f} s")
    archives = cache_root() / "archives"
    (archives / "partial").mkdir(parents=True, exist_ok=True)
    work = Path(tmp_path_factory.mktemp("debhost"))
    root = work / "root"
    for d in ("upper", "ovl", "root"):
        (work / d).mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={lower},upperdir={work / 'upper'},workdir={work / 'ovl'}",
                    str(root)], check=True, timeout=60)
    log = open(work / "console.log", "w")
    proc = subprocess.Popen(
        ["systemd-nspawn", "-D", str(root), "-b", "--register=no", "--keep-unit",
         "--resolv-conf=copy-host", f"--bind-ro={deb.parent}:/opt/cephvol-deb",
         f"--bind-ro={REPO / 'vagrant' / 'provision'}:/opt/provision",
         f"--bind={archives}:/var/cache/apt/archives", f"--bind={cluster.conf.parent}",
         "--bind=/dev/fuse", "--bind=/dev/loop-control"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    h = None
    try:
        h = Host(nspawn_pid1(proc, time.monotonic() + 60), proc, root)
        h.run("systemctl", "is-system-running", "--wait", timeout=120)  # degraded is fine
        print(f"boot: {time.monotonic() - t0:.1f} s")
        # on a host udev makes the loop nodes; the container's /dev is a private tmpfs
        h.ok("sh", "-c", "for i in $(seq 0 63); do [ -e /dev/loop$i ] || "
                         "mknod -m 660 /dev/loop$i b 7 $i; done")
        # an existing cluster's client config, as an operator has it in /etc/ceph
        h.ok("sh", "-c", f"mkdir -p /etc/ceph && cp {cluster.conf} /etc/ceph/ceph.conf")
        yield h
    finally:
        if h is not None and proc.poll() is None and h.installed("cephvol"):
            # A test failed before the package was purged. Its own volumes are
            # detached by the `volume` fixture; at shutdown cephvol-cleanup.service
            # would run `cleanup --all`, which here sees every loop device of the
            # shared kernel (other sessions' mappings too): not with this drop-in.
            h.run("sh", "-c", "mkdir -p /run/systemd/system/cephvol-cleanup.service.d && "
                              "printf '[Service]\\nExecStop=\\n' > "
                              "/run/systemd/system/cephvol-cleanup.service.d/test.conf && "
                              "systemctl daemon-reload")
        power_off_nspawn(proc, root, "overlay root")
        log.close()
        shutil.rmtree(work, ignore_errors=True)


# This kernel has no rbd/nbd: the backend the units use here is rbd-fuse + loop.
FUSE_BACKEND = ("rbd-fuse", "fuse3")


def _field(deb: Path, name: str) -> list[str]:
    """Package names in one relation field of the .deb (alternatives and versions dropped)."""
    text = subprocess.run(["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True,
                          check=True).stdout
    return [re.split(r"[ :(|]", p.strip())[0] for p in text.split(",") if p.strip()]


def _show(h: Host, unit: str, prop: str) -> str:
    return h.ok("systemctl", "show", "-P", prop, unit).strip()


@pytest.fixture(scope="module")
def installed(host: Host, deb: Path) -> Host:
    """cephvol installed from the .deb by the Vagrant hosts' provisioning script.

    What apt would install by default (Depends and, recursively, Recommends:
    ~390 packages, most of them the qemu-system-x86 that qemu-block-extra's
    dependency resolves to, and its GUI recommendations) is only resolved
    (`apt-get -s`); what is installed is the package with its Depends and the
    one backend this kernel can use: 86 packages, a third of the time."""
    assert not host.installed("python3"), "the clean root is not clean"
    t0 = time.monotonic()
    host.ok("apt-get", "update", "-q", timeout=300)
    sim = host.ok("apt-get", "install", "-s", f"/opt/cephvol-deb/{deb.name}", timeout=300)
    would = set(re.findall(r"^Inst (\S+)", sim, re.M))
    for field in ("Depends", "Recommends"):
        lacking = [p for p in _field(deb, field) if p not in would and not host.installed(p)]
        assert lacking in ([], ["python3"]), f"{field}: apt would not install {lacking}"
    out = host.ok("sh", "/opt/provision/install-cephvol.sh", "--no-install-recommends",
                  f"/opt/cephvol-deb/{deb.name}", timeout=900)
    n = re.search(r"(\d+) newly installed", out)
    host.ok("apt-get", "install", "-y", "-q", "--no-install-recommends", *FUSE_BACKEND,
            timeout=600)
    print(f"apt-get install ./{deb.name} (Depends) + {' '.join(FUSE_BACKEND)}: "
          f"{time.monotonic() - t0:.1f} s, {n.group(1) if n else '?'} packages "
          f"(with Recommends: {len(would)})")
    return host


def test_install_pulls_in_everything_and_enables_the_cleanup_unit(
        installed: Host, deb: Path) -> None:
    h = installed
    depends = _field(deb, "Depends")
    assert {"python3-rados", "python3-rbd", "python3-systemd", "ceph-common"} <= set(depends)
    missing = [p for p in depends if p != "python3" and not h.installed(p)]
    assert not missing, missing
    assert h.ok("cephvol", "--version").strip() == f"cephvol, version {cephvol.__version__}"
    assert h.ok("sh", "-c", "command -v cephvol").strip() == "/usr/bin/cephvol"
    doctor = h.run("cephvol", "doctor", "--offline")
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    for unit in ("cephvol@.service", "cephvol-cleanup.service"):
        text = h.ok("cat", f"/lib/systemd/system/{unit}")
        assert "ExecStart=/usr/bin/cephvol " in text and "/usr/local" not in text, text
    assert h.run("systemctl", "is-enabled", "cephvol-cleanup.service").stdout.strip() == "enabled"
    # started by the postinst (whether `cleanup --stale` finds anything to
    # complain about depends on the loop devices of the shared kernel)
    assert _show(h, "cephvol-cleanup.service", "ExecMainStartTimestampMonotonic") != "0"
    # a template, and the opt-in volume plugin: nothing of them is enabled or started
    assert not h.ok("find", "/etc/systemd/system", "-name", "cephvol@*", "-o",
                    "-name", "cephvol-plugin*").strip()
    for unit in ("cephvol-plugin.socket", "cephvol-plugin.service"):
        if h.run("test", "-e", f"/lib/systemd/system/{unit}").returncode == 0:
            assert h.run("systemctl", "is-active", unit).stdout.strip() == "inactive", unit
    assert h.run("test", "-s", "/usr/share/man/man8/cephvol.8.gz").returncode == 0


@pytest.fixture
def volume(installed: Host, cluster: CephCluster) -> Iterator[tuple[str, str]]:
    """An image and its cephvol@ instance unit name (a name that needs no escaping)."""
    name = f"deb{uuid.uuid4().hex[:8]}"
    spec = f"rbd/{name}"
    cluster.cli("create", spec, "--size", "64M", check=True)
    yield spec, f"cephvol@rbd-{name}.service"
    if installed.installed("cephvol"):
        installed.run("systemctl", "stop", f"cephvol@rbd-{name}.service", timeout=180)
        installed.run("cephvol", "detach", "--force", spec, timeout=180)
    cluster.cli("rm", spec)


def _start(h: Host, unit: str) -> None:
    cp = h.run("systemctl", "start", unit, timeout=300)
    assert cp.returncode == 0, h.run("journalctl", "--no-pager", "-n", "60", "-u", unit).stdout


def _status(h: Host, spec: str) -> dict[str, Any] | None:
    """This volume in `cephvol status` (the shared kernel's loop devices may
    show other sessions' mappings too)."""
    rows = json.loads(h.ok("cephvol", "status", "--json"))
    return next((r for r in rows if r.get("image") == spec), None)


def _attached(h: Host, spec: str) -> bool:
    return h.run("mountpoint", "-q", f"/srv/cephvol/{spec}").returncode == 0


def test_packaged_template_unit_attaches_and_detaches(
        installed: Host, volume: tuple[str, str], cluster: CephCluster, tmp_path: Path) -> None:
    h, (spec, unit) = installed, volume
    assert h.ok("systemd-escape", spec).strip() == unit.removeprefix("cephvol@").split(".")[0]
    t0 = time.monotonic()
    _start(h, unit)
    assert h.run("systemctl", "is-active", unit).stdout.strip() == "active"
    assert _attached(h, spec)
    mine = _status(h, spec)
    assert mine["backend"] == "fuse" and mine["device"].startswith("/dev/loop"), mine
    # `sync FILE`, never a bare sync: that waits on every filesystem of the shared kernel
    h.ok("sh", "-c", f"echo from-the-package > /srv/cephvol/{spec}/f && sync /srv/cephvol/{spec}/f")
    h.ok("systemctl", "stop", unit, timeout=300)
    print(f"cephvol@ start+stop: {time.monotonic() - t0:.1f} s")
    assert not _attached(h, spec) and _status(h, spec) is None
    # the data reached the cluster: attach it on the build machine itself
    cluster.cli("attach", spec, "--mountpoint", str(tmp_path / "m"), check=True)
    try:
        assert (tmp_path / "m" / "f").read_text() == "from-the-package\n"
    finally:
        cluster.cli("detach", spec, check=True)


@pytest.fixture(scope="module")
def next_deb(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same package one version later (UPGRADE_VERSION): the .deb unpacked,
    its version changed (control, __version__, md5sums) and packed again,
    which takes a second where a second build takes a minute."""
    work = Path(tmp_path_factory.mktemp("nextdeb"))
    tree = work / "tree"
    subprocess.run(["dpkg-deb", "-R", str(deb), str(tree)], check=True, timeout=60)
    control = tree / "DEBIAN" / "control"
    control.write_text(re.sub(r"^Version: .*$", f"Version: {UPGRADE_VERSION}",
                              control.read_text(), flags=re.M))
    rel = "usr/lib/python3/dist-packages/cephvol/__init__.py"
    init = tree / rel
    init.write_text(init.read_text().replace(f'"{cephvol.__version__}"', f'"{UPGRADE_VERSION}"'))
    sums = tree / "DEBIAN" / "md5sums"
    digest = hashlib.md5(init.read_bytes()).hexdigest()
    sums.write_text(re.sub(rf"^\w+(  {re.escape(rel)})$", rf"{digest}\1", sums.read_text(),
                           flags=re.M))
    out = work / f"cephvol_{UPGRADE_VERSION}_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(tree), str(out)], check=True,
                   capture_output=True, timeout=120)
    return out


def test_upgrade_keeps_attached_volumes_working(
        installed: Host, volume: tuple[str, str], next_deb: Path) -> None:
    """Upgrading with a volume attached: nothing is stopped, detached or restarted
    (stopping cephvol-cleanup.service would detach everything), and the new
    cephvol detaches what the old one attached (its journal is versioned)."""
    h, (spec, unit) = installed, volume
    _start(h, unit)
    h.ok("sh", "-c", f"echo before-upgrade > /srv/cephvol/{spec}/f && sync /srv/cephvol/{spec}/f")
    cleanup_run = _show(h, "cephvol-cleanup.service", "InvocationID")
    shutil.copy(next_deb, h.root / "root" / next_deb.name)
    t0 = time.monotonic()
    h.ok("sh", "/opt/provision/install-cephvol.sh", f"/root/{next_deb.name}", timeout=600)
    print(f"upgrade: {time.monotonic() - t0:.1f} s")
    assert h.ok("cephvol", "--version").strip() == f"cephvol, version {UPGRADE_VERSION}"
    assert _show(h, "cephvol-cleanup.service", "InvocationID") == cleanup_run, "restarted"
    assert h.run("systemctl", "is-active", unit).stdout.strip() == "active"
    assert _attached(h, spec)
    assert h.ok("cat", f"/srv/cephvol/{spec}/f") == "before-upgrade\n"
    assert _status(h, spec)["phase"] == "attached"
    h.ok("systemctl", "stop", unit, timeout=300)
    assert not _attached(h, spec) and _status(h, spec) is None


def test_remove_is_refused_while_attached_and_leaves_no_unit(
        installed: Host, volume: tuple[str, str]) -> None:
    """Runs last in this module: it removes the package."""
    h, (spec, unit) = installed, volume
    _start(h, unit)
    refused = h.run("apt-get", "remove", "-y", "cephvol", timeout=300)
    assert refused.returncode != 0
    said = refused.stdout + refused.stderr
    assert "refusing to remove cephvol: volumes are attached" in said, said
    assert f"  {spec}\n" in said
    assert h.installed("cephvol") and _attached(h, spec)
    assert h.run("systemctl", "is-active", unit).stdout.strip() == "active"

    h.ok("systemctl", "stop", unit, timeout=300)
    h.ok("apt-get", "remove", "-y", "cephvol", timeout=300)
    assert not h.installed("cephvol") and not _attached(h, spec)
    assert h.run("test", "-e", "/usr/bin/cephvol").returncode != 0
    known = h.run("systemctl", "list-unit-files", "--no-legend", "cephvol*").stdout
    assert not known.strip(), known
    assert h.run("systemctl", "is-enabled", "cephvol-cleanup.service").stdout.strip() \
        != "enabled"
    h.ok("apt-get", "purge", "-y", "cephvol", timeout=300)
    left = h.ok("find", "/etc/systemd/system", "-name", "cephvol*")
    assert not left.strip(), left
