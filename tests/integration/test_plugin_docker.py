"""The volume plugin driven by a real dockerd (Debian's docker.io), one the
test starts and owns: its own data root, exec root and API socket, no
firewall changes (--iptables=false --ip6tables=false --bridge=none),
containers with --network=none, an image imported from busybox-static (no
registry). dockerd finds the plugin by its socket in /run/docker/plugins;
the socket has a name of its own (the driver name), removed at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cephvol.waiting import wait_for
from tests.conftest import CephCluster
from tests.integration.test_plugin import PluginProc

DOCKERD = "/usr/sbin/dockerd"
DOCKER = "/usr/bin/docker"
PLUGIN_DIR = Path("/run/docker/plugins")
BUSYBOX = "/bin/busybox"
APPLETS = ("sh", "cat", "echo", "sleep", "ls", "true")

pytestmark = pytest.mark.skipif(
    not (os.path.exists(DOCKERD) and os.path.exists(DOCKER) and os.path.exists(BUSYBOX)),
    reason="docker.io / busybox-static not installed (scripts/setup)")


@dataclass
class Docker:
    base: Path
    driver: str
    plugin: PluginProc

    def __call__(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([DOCKER, "-H", f"unix://{self.base}/docker.sock", *args],
                              capture_output=True, text=True, timeout=timeout, check=False)

    def ok(self, *args: str, timeout: float = 120) -> str:
        cp = self(*args, timeout=timeout)
        assert cp.returncode == 0, f"docker {' '.join(args)}: {cp.stderr}"
        return cp.stdout

    def run(self, vol: str, *cmd: str, detach: bool = False, name: str | None = None) -> str:
        return self.ok("run", "--network=none", *(["-d"] if detach else ["--rm"]),
                       *(["--name", name] if name else []), "-v", f"{vol}:/data",
                       "cvt:1", *cmd)


@pytest.fixture
def docker(cluster: CephCluster) -> Iterator[Docker]:
    tag = uuid.uuid4().hex[:8]
    base = cluster.base / f"dk-{tag}"
    root = base / "rootfs"
    (root / "bin").mkdir(parents=True)
    shutil.copy(BUSYBOX, root / "bin" / "busybox")
    for a in APPLETS:
        (root / "bin" / a).symlink_to("busybox")
    (base / "daemon.json").write_text("{}")
    log = open(base / "dockerd.log", "wb")
    dockerd = subprocess.Popen(
        [DOCKERD, "--config-file", str(base / "daemon.json"), "--data-root", str(base / "data"),
         "--exec-root", str(base / "exec"), "--pidfile", str(base / "docker.pid"),
         "-H", f"unix://{base}/docker.sock", "--iptables=false", "--ip6tables=false",
         "--bridge=none", "--ip-forward=false", "--ip-masq=false"],
        stdout=log, stderr=log)
    # the plugin's socket in dockerd's discovery directory, named after the driver
    made = [d for d in (PLUGIN_DIR.parent, PLUGIN_DIR) if not d.exists()]
    plugin = PluginProc(cluster)
    driver = f"cephvol-t{tag}"
    plugin.sock = PLUGIN_DIR / f"{driver}.sock"
    d = Docker(base, driver, plugin)
    try:
        assert wait_for(lambda: d("version").returncode == 0, timeout=30), \
            (base / "dockerd.log").read_text()[-2000:]
        tar = subprocess.run(["tar", "-C", str(root), "-c", "."], capture_output=True,
                             check=True, timeout=30).stdout
        subprocess.run([DOCKER, "-H", f"unix://{base}/docker.sock", "import", "-", "cvt:1"],
                       input=tar, capture_output=True, check=True, timeout=60)
        plugin.start()
        yield d
    finally:
        ids = d("ps", "-aq").stdout.split()
        if ids:
            d("rm", "-f", *ids, timeout=120)
        for v in d("volume", "ls", "-q").stdout.split():
            d("volume", "rm", "-f", v)
        if plugin.proc and plugin.proc.poll() is None:
            plugin.stop()
        plugin.sock.unlink(missing_ok=True)
        for made_dir in reversed(made):  # /run/docker/plugins, if this test made it
            with contextlib.suppress(OSError):
                made_dir.rmdir()
        dockerd.send_signal(signal.SIGTERM)
        try:
            dockerd.wait(timeout=60)
        except subprocess.TimeoutExpired:
            dockerd.kill()
            dockerd.wait(timeout=30)
        log.close()
        # what dockerd itself mounted under its roots (overlay layers, shm)
        for line in reversed(Path("/proc/self/mountinfo").read_text().splitlines()):
            mp = line.split()[4]
            if mp.startswith(str(base)):
                subprocess.run(["umount", "-l", mp], check=False, timeout=30)
        if os.environ.get("CVT_KEEP_LOGS"):
            for f in (base / "dockerd.log", plugin.log):
                shutil.copy(f, Path(os.environ["CVT_KEEP_LOGS"]) / f.name)
        shutil.rmtree(base, ignore_errors=True)


def _attached(cluster: CephCluster, image: str) -> list[dict[str, object]]:
    rows = json.loads(cluster.cli("status", "--json", check=True).stdout)
    return [r for r in rows if r["image"] == image]


def test_docker_volume_create_run_share_inspect_rm(cluster: CephCluster, image: str,
                                                   docker: Docker) -> None:
    name = image.split("/")[1]
    docker.ok("volume", "create", "-d", docker.driver, "-o", "size=64M", name)
    assert name in docker.ok("volume", "ls", "-q").split()
    [info] = json.loads(docker.ok("volume", "inspect", name))
    assert info["Driver"] == docker.driver and info["Scope"] == "global"
    assert info["Status"]["image"] == image and info["Status"]["size"] == "64M"
    docker.run(name, "sh", "-c", "echo one > /data/f")
    assert _attached(cluster, image) == []  # the container is gone: detached
    # two containers share one mapping; both gone -> detached
    docker.run(name, "sleep", "300", detach=True, name="cv-a")
    docker.run(name, "sleep", "300", detach=True, name="cv-b")
    [row] = _attached(cluster, image)
    assert row["mountpoint"] == str(docker.plugin.data / "mnt" / name)
    assert docker.run(name, "cat", "/data/f").strip() == "one"
    # the plugin killed and restarted while both use the volume
    assert docker.plugin.stop(signal.SIGKILL) == -signal.SIGKILL
    docker.plugin.start()
    docker.ok("rm", "-f", "cv-a")
    assert len(_attached(cluster, image)) == 1  # b still has it
    docker.ok("rm", "-f", "cv-b")
    assert _attached(cluster, image) == []
    # remove forgets the volume; the image (and its data) stays
    bad = docker("volume", "rm", name + "-nope")
    assert bad.returncode != 0
    docker.ok("volume", "rm", name)
    assert name not in docker.ok("volume", "ls", "-q").split()
    assert cluster.cli("info", image).returncode == 0
    # the data is there for whoever creates the volume again
    docker.ok("volume", "create", "-d", docker.driver, name)
    assert docker.run(name, "cat", "/data/f").strip() == "one"
    docker.ok("volume", "rm", name)


def test_docker_gets_the_plugins_errors(cluster: CephCluster, image: str,
                                        docker: Docker) -> None:
    name = image.split("/")[1]
    bad = docker("volume", "create", "-d", docker.driver, "-o", "sise=1G", name)
    assert bad.returncode != 0 and "cephvol exit 2: unknown option 'sise'" in bad.stderr
    missing = docker("volume", "create", "-d", docker.driver, name)
    assert missing.returncode != 0 and "cephvol exit 3" in missing.stderr
    docker.ok("volume", "create", "-d", docker.driver, "-o", "size=32M", name)
    other = {"CEPHVOL_HOST_ID": "other-host", "CEPHVOL_HOST_NAME": "node2",
             "CEPHVOL_STATE_DIR": str(docker.base / "other-state")}
    cluster.cli("map", image, check=True, **other)
    try:
        run = docker("run", "--rm", "--network=none", "-v", f"{name}:/data", "cvt:1", "true")
        assert run.returncode != 0
        assert "cephvol exit 6" in run.stderr and "node2" in run.stderr, run.stderr
    finally:
        cluster.cli("unmap", image, check=True, **other)
    docker.run(name, "true")
    docker.ok("volume", "rm", name)


# -- podman: the same plugin through containers.conf [engine.volume_plugins] -------------

PODMAN = "/usr/bin/podman"


@dataclass
class Podman:
    base: Path
    env: dict[str, str]
    plugin: PluginProc

    def __call__(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([PODMAN, *args], capture_output=True, text=True,
                              env=self.env, timeout=timeout, check=False)

    def ok(self, *args: str, timeout: float = 120) -> str:
        cp = self(*args, timeout=timeout)
        assert cp.returncode == 0, f"podman {' '.join(args)}: {cp.stderr}"
        return cp.stdout


@pytest.fixture
def podman(cluster: CephCluster) -> Iterator[Podman]:
    if not os.path.exists(PODMAN):
        pytest.skip("podman not installed (scripts/setup)")
    base = cluster.base / f"pm-{uuid.uuid4().hex[:8]}"
    root = base / "rootfs"
    (root / "bin").mkdir(parents=True)
    shutil.copy(BUSYBOX, root / "bin" / "busybox")
    for a in APPLETS:
        (root / "bin" / a).symlink_to("busybox")
    plugin = PluginProc(cluster)
    (base / "containers.conf").write_text(
        '[containers]\ndefault_ulimits = []\n'
        '[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\nevents_logger = "none"\n'
        f'tmp_dir = "{base}/tmp"\nvolume_path = "{base}/volumes"\n'
        f'[engine.volume_plugins]\ncephvol = "{plugin.sock}"\n')
    (base / "storage.conf").write_text(
        f'[storage]\ndriver = "overlay"\nrunroot = "{base}/run"\ngraphroot = "{base}/root"\n')
    env = dict(os.environ, CONTAINERS_CONF=str(base / "containers.conf"),
               CONTAINERS_STORAGE_CONF=str(base / "storage.conf"))
    p = Podman(base, env, plugin)
    # podman import writes a blob cache here whatever the config says
    cache = Path("/var/lib/containers/cache")
    made_cache = not cache.exists()
    try:
        plugin.start()
        tar = subprocess.run(["tar", "-C", str(root), "-c", "."], capture_output=True,
                             check=True, timeout=30).stdout
        subprocess.run([PODMAN, "import", "-", "cvt:1"], input=tar, env=env,
                       capture_output=True, check=True, timeout=60)
        yield p
    finally:
        p("rm", "-af", "-t", "0")
        for v in p("volume", "ls", "-q").stdout.split():
            p("volume", "rm", "-f", v)
        if plugin.proc and plugin.proc.poll() is None:
            plugin.stop()
        p("rmi", "-af")
        if made_cache:
            shutil.rmtree(cache, ignore_errors=True)
        if os.environ.get("CVT_KEEP_LOGS"):
            shutil.copy(plugin.log, Path(os.environ["CVT_KEEP_LOGS"]) / "podman-plugin.log")
        for line in reversed(Path("/proc/self/mountinfo").read_text().splitlines()):
            mp = line.split()[4]
            if mp.startswith(str(base)):
                subprocess.run(["umount", "-l", mp], check=False, timeout=30)
        shutil.rmtree(base, ignore_errors=True)


def test_podman_volume_plugin(cluster: CephCluster, image: str, podman: Podman) -> None:
    name = image.split("/")[1]
    podman.ok("volume", "create", "--driver", "cephvol", "-o", "size=64M", name)
    [info] = json.loads(podman.ok("volume", "inspect", name))
    assert info["Driver"] == "cephvol"
    run = ["run", "--rm", "--network=none", "-v", f"{name}:/data", "cvt:1"]
    podman.ok(*run, "sh", "-c", "echo from-podman > /data/f")
    assert _attached(cluster, image) == []
    podman.ok("run", "-d", "--name", "cv-a", "--network=none", "-v", f"{name}:/data",
              "cvt:1", "sleep", "300")
    assert podman.ok(*run, "cat", "/data/f").strip() == "from-podman"
    assert len(_attached(cluster, image)) == 1
    podman.ok("rm", "-f", "-t", "0", "cv-a")
    assert _attached(cluster, image) == []
    bad = podman("volume", "create", "--driver", "cephvol", "-o", "sise=1G", name + "x")
    assert bad.returncode != 0 and "cephvol exit 2: unknown option 'sise'" in bad.stderr
    podman.ok("volume", "rm", name)
    assert cluster.cli("info", image).returncode == 0  # forgotten, not deleted
