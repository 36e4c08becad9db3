"""The volume plugin against its real socket: a `cephvol plugin serve` the
test starts (a subprocess, so it can be SIGTERMed, restarted and SIGKILLed),
the session's dev cluster, real rbd-fuse + loop mappings and mounts.

What Docker does is played by hand here (POST /VolumeDriver.* with Docker's
JSON); a real dockerd: tests/integration/test_plugin_docker.py."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cephvol.state import StateStore
from cephvol.waiting import wait_for
from tests.conftest import CEPHVOL, CephCluster


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = str(path)

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


def post(sock: Path, endpoint: str, body: Any = None, *, raw: bytes | None = None,
         timeout: float = 180) -> tuple[int, dict[str, Any], str]:
    """One request as dockerd sends it: (HTTP status, JSON answer, Content-Type)."""
    conn = _UnixConnection(sock, timeout)
    try:
        data = raw if raw is not None else json.dumps(body).encode()
        conn.request("POST", f"/{endpoint}", body=data,
                     headers={"Content-Type": "application/json",
                              "Accept": "application/vnd.docker.plugins.v1.2+json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read()), resp.getheader("Content-Type") or ""
    finally:
        conn.close()


class PluginProc:
    """A `cephvol plugin serve` with its own socket, data dir and mount root."""

    def __init__(self, cluster: CephCluster) -> None:
        self.cluster = cluster
        self.base = cluster.base / f"plugin-{uuid.uuid4().hex[:8]}"
        self.sock = self.base / "p.sock"
        self.data = self.base / "data"
        self.log = self.base / "plugin.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def run_dir(self) -> Path:
        return self.cluster.state_dir / "plugin"

    def start(self, **env: str) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [CEPHVOL, "--debug", "plugin", "serve", "--socket", str(self.sock),
                 "--data-dir", str(self.data)], stdout=log, stderr=log,
                env=self.cluster.env(CEPHVOL_LOG="stderr", **env))
        assert wait_for(self._answers, timeout=20), self.log.read_text()

    def _answers(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
        try:
            return post(self.sock, "Plugin.Activate", {}, timeout=5)[1] == {
                "Implements": ["VolumeDriver"]}
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)

    def call(self, endpoint: str, **body: Any) -> dict[str, Any]:
        status, res, ctype = post(self.sock, f"VolumeDriver.{endpoint}", body)
        # an error is HTTP 500 too (podman reads only the status)
        assert status == (500 if res.get("Err") else 200), (status, res)
        assert ctype == "application/vnd.docker.plugins.v1.2+json"
        return res


@pytest.fixture
def plugin(cluster: CephCluster) -> Iterator[PluginProc]:
    p = PluginProc(cluster)
    p.start()
    try:
        yield p
    finally:
        if p.proc and p.proc.poll() is None:
            p.stop()


def _status(cluster: CephCluster, image: str) -> list[dict[str, Any]]:
    rows = json.loads(cluster.cli("status", "--json", check=True).stdout)
    return [r for r in rows if r["image"] == image]


def _err(res: dict[str, Any], code: int, needle: str) -> None:
    assert re.fullmatch(rf"cephvol exit {code}: .+", res.get("Err", "")), res
    assert needle in res["Err"], res


def test_two_containers_share_one_mapping_across_a_restart(cluster: CephCluster, image: str,
                                                          plugin: PluginProc) -> None:
    name = image.split("/")[1]
    assert plugin.call("Create", Name=name, Opts={"size": "64M"}) == {"Err": ""}
    assert json.loads(cluster.cli("info", image, "--json", check=True).stdout)["size"] == 64 << 20
    assert plugin.call("Get", Name=name)["Volume"]["Mountpoint"] == ""
    a = plugin.call("Mount", Name=name, ID="c-a")
    mp = plugin.data / "mnt" / name
    assert a == {"Mountpoint": str(mp), "Err": ""} and os.path.ismount(mp)
    (mp / "f").write_text("from a")
    # a restart with the volume mounted keeps serving it, and its Mount IDs
    plugin.stop()
    assert os.path.ismount(mp)
    plugin.start()
    assert plugin.call("Get", Name=name)["Volume"]["Status"]["mounts"] == 1
    assert plugin.call("Mount", Name=name, ID="c-b") == a  # the same mapping, the same path
    assert plugin.call("Mount", Name=name, ID="c-b") == a  # the same ID twice: one mount
    assert plugin.call("Path", Name=name) == a
    assert plugin.call("List") == {"Volumes": [{"Name": name, "Mountpoint": str(mp)}],
                                   "Err": ""}
    [row] = _status(cluster, image)
    assert row["mountpoint"] == str(mp) and row["phase"] == "attached"
    assert plugin.call("Unmount", Name=name, ID="c-a") == {"Err": ""}
    assert os.path.ismount(mp) and (mp / "f").read_text() == "from a"  # c-b still has it
    assert plugin.call("Unmount", Name=name, ID="c-b") == {"Err": ""}
    assert not os.path.ismount(mp) and _status(cluster, image) == []  # detached
    _err(plugin.call("Unmount", Name=name, ID="c-b"), 3, "no mount with ID")
    assert plugin.call("Path", Name=name) == {"Mountpoint": "", "Err": ""}
    # the data reached the cluster: a new mount sees it
    assert plugin.call("Mount", Name=name, ID="c-c") == a
    assert (mp / "f").read_text() == "from a"
    assert plugin.call("Unmount", Name=name, ID="c-c") == {"Err": ""}
    # and on a second host (its own identity and state), once this one let it go
    other = {"CEPHVOL_HOST_ID": "other-host", "CEPHVOL_HOST_NAME": "node2",
             "CEPHVOL_STATE_DIR": str(plugin.base / "other-state")}
    omnt = plugin.base / "other-mnt"
    cluster.cli("attach", image, "--mountpoint", str(omnt), check=True, **other)
    assert (omnt / "f").read_text() == "from a"
    cluster.cli("detach", image, check=True, **other)
    # Remove without delete-on-remove forgets the volume; the image stays
    assert plugin.call("Remove", Name=name) == {"Err": ""}
    assert plugin.call("List") == {"Volumes": [], "Err": ""}
    cluster.cli("info", image, check=True)
    assert not mp.exists()
    # the key never shows: not in the plugin's (debug) log, not in an answer
    key = re.search(r"key = (\S+)", (cluster.base / "cluster" / "keyring").read_text())
    assert key and key.group(1) not in plugin.log.read_text()


def test_remove_is_refused_while_in_use_and_deletes_only_when_asked(
        cluster: CephCluster, image: str, plugin: PluginProc) -> None:
    name = image.split("/")[1]
    opts = {"size": "32M", "delete-on-remove": "true", "fstype": "ext4"}
    assert plugin.call("Create", Name=name, Opts=opts) == {"Err": ""}
    assert plugin.call("Create", Name=name, Opts=opts) == {"Err": ""}  # idempotent
    _err(plugin.call("Create", Name=name, Opts={"size": "64M"}), 5, "other options")
    assert plugin.call("Mount", Name=name, ID="c1")["Err"] == ""
    _err(plugin.call("Remove", Name=name), 4, "mounted by 1 container(s) (c1)")
    assert plugin.call("Unmount", Name=name, ID="c1") == {"Err": ""}
    # attached outside the plugin (a unit, an operator): refused too
    cluster.cli("map", image, check=True)
    _err(plugin.call("Remove", Name=name), 4, "on this host")
    cluster.cli("unmap", image, check=True)
    assert plugin.call("Remove", Name=name) == {"Err": ""}
    assert cluster.cli("info", image).returncode == 3  # deleted, as the volume asked
    _err(plugin.call("Get", Name=name), 3, "no volume named")


def test_create_needs_the_image_or_a_size(cluster: CephCluster, image: str,
                                          plugin: PluginProc) -> None:
    name = image.split("/")[1]
    _err(plugin.call("Create", Name=name), 3, "give -o size=SIZE")
    _err(plugin.call("Create", Name=name, Opts={"pool": "no-such-pool", "size": "1G"}), 3,
         "no-such-pool")
    cluster.cli("create", image, "--size", "32M", check=True)
    _err(plugin.call("Create", Name=name, Opts={"size": "64M"}), 5, "32M")
    assert plugin.call("Create", Name=name) == {"Err": ""}  # an existing image, as it is
    assert plugin.call("Remove", Name=name) == {"Err": ""}
    cluster.cli("info", image, check=True)


def test_another_hosts_volume_is_a_clear_error(cluster: CephCluster, image: str,
                                               plugin: PluginProc) -> None:
    name = image.split("/")[1]
    assert plugin.call("Create", Name=name, Opts={"size": "32M"}) == {"Err": ""}
    other = {"CEPHVOL_HOST_ID": "other-host", "CEPHVOL_HOST_NAME": "node2",
             "CEPHVOL_STATE_DIR": str(plugin.base / "other-state")}
    cluster.cli("map", image, check=True, **other)
    try:
        res = plugin.call("Mount", Name=name, ID="c1")
        _err(res, 6, "node2")
        assert plugin.call("Get", Name=name)["Volume"]["Status"]["mounts"] == 0
        _err(plugin.call("Remove", Name=name), 6, "owned by host node2")
    finally:
        cluster.cli("unmap", image, check=True, **other)
    assert _status(cluster, image) == []
    assert plugin.call("Remove", Name=name) == {"Err": ""}


@pytest.mark.parametrize("finish", ["cleanup", "next-mount"])
def test_sigkill_in_the_middle_of_a_mount(cluster: CephCluster, image: str, finish: str) -> None:
    name = image.split("/")[1]
    p = PluginProc(cluster)
    p.start(CEPHVOL_TEST_CRASH_AT="map")
    try:
        assert p.call("Create", Name=name, Opts={"size": "32M"}) == {"Err": ""}
        with pytest.raises((http.client.HTTPException, OSError)):
            p.call("Mount", Name=name, ID="c1")
        assert p.stop() == -signal.SIGKILL
        [row] = _status(cluster, image)
        assert row["phase"] == "attaching" and row["mapped"]  # killed after the map
        p.start()  # a socket file left by a killed plugin is taken over
        if finish == "cleanup":
            cp = cluster.cli("cleanup", "--json", check=True)
            assert [r["image"] for r in json.loads(cp.stdout)] == [image]
            assert _status(cluster, image) == []
            res = p.call("Mount", Name=name, ID="c2")
        else:
            res = p.call("Mount", Name=name, ID="c1")  # Docker tries again
        assert res["Err"] == "" and os.path.ismount(res["Mountpoint"])
        assert p.call("Get", Name=name)["Volume"]["Status"]["mounts"] == 1
        assert p.call("Unmount", Name=name, ID="c2" if finish == "cleanup" else "c1") == {
            "Err": ""}
        assert _status(cluster, image) == []
        assert p.call("Remove", Name=name) == {"Err": ""}
    finally:
        if p.proc and p.proc.poll() is None:
            p.stop()


def test_mounts_of_different_volumes_do_not_wait_for_each_other(
        cluster: CephCluster, image: str, plugin: PluginProc) -> None:
    slow, fast = image.split("/")[1], image.split("/")[1] + "-b"
    try:
        for n in (slow, fast):
            assert plugin.call("Create", Name=n, Opts={"size": "32M"}) == {"Err": ""}
        results: dict[str, dict[str, Any]] = {}
        # volume `slow` is held (as by a long mkfs) with the plugin's own lock
        with StateStore(plugin.run_dir).lock(f"plugin-{slow}"):
            t = threading.Thread(target=lambda: results.update(
                slow=plugin.call("Mount", Name=slow, ID="c1")))
            t.start()
            assert plugin.call("Mount", Name=fast, ID="c1")["Err"] == ""
            assert t.is_alive() and "slow" not in results
        t.join(120)
        assert results["slow"]["Err"] == ""
        for n in (slow, fast):
            assert plugin.call("Unmount", Name=n, ID="c1") == {"Err": ""}
            assert plugin.call("Remove", Name=n) == {"Err": ""}
    finally:
        cluster.cli("detach", "--force", f"rbd/{fast}")
        cluster.cli("rm", f"rbd/{fast}")


def test_socket_edge(cluster: CephCluster, plugin: PluginProc) -> None:
    status, res, _ = post(plugin.sock, "VolumeDriver.Create", raw=b"{not json")
    assert status == 500 and res["Err"].startswith("cephvol exit 2: ")
    status, res, _ = post(plugin.sock, "VolumeDriver.Nope", {})
    assert status == 404 and res["Err"].startswith("cephvol exit 3: unknown endpoint")
    status, res, _ = post(plugin.sock, "VolumeDriver.Capabilities", raw=b"")
    assert (status, res) == (200, {"Capabilities": {"Scope": "global"}})
    assert plugin.sock.stat().st_mode & 0o777 == 0o600
    # a second plugin on a live socket is refused, and changes nothing
    cp = cluster.cli("plugin", "serve", "--socket", str(plugin.sock), "--data-dir",
                     str(plugin.data), timeout=30)
    assert cp.returncode == 4 and "another plugin answers" in cp.stderr
    assert post(plugin.sock, "Plugin.Activate", {})[1] == {"Implements": ["VolumeDriver"]}
    # SIGTERM: the socket file goes with the server
    assert plugin.stop() == 0 and not plugin.sock.exists()
    plugin.sock.write_text("not a socket")
    cp = cluster.cli("plugin", "serve", "--socket", str(plugin.sock), timeout=30)
    assert cp.returncode == 2 and "is not a socket" in cp.stderr


def test_systemd_socket_activation(cluster: CephCluster, tmp_path: Path) -> None:
    """cephvol-plugin.socket + Type=notify: the socket systemd passes is the
    one answered on, and READY=1 reaches NOTIFY_SOCKET."""
    tag = uuid.uuid4().hex[:6]
    sock = cluster.base / f"act-{tag}.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(cluster.base / f"notify-{tag}.sock"))
    notify.settimeout(30)
    proc = subprocess.Popen(
        # it passes on only the environment it is told to (-E), as systemd does
        ["systemd-socket-activate", "-l", str(sock), "-E", "NOTIFY_SOCKET", "-E",
         "CEPHVOL_STATE_DIR", CEPHVOL, "plugin", "serve",
         "--socket", str(tmp_path / "unused.sock"), "--data-dir", str(tmp_path / "data")],
        env=cluster.env(NOTIFY_SOCKET=notify.getsockname()), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE)
    try:
        assert wait_for(sock.exists, timeout=10)
        # the first connection starts the plugin, which answers on the passed socket
        assert post(sock, "Plugin.Activate", {}, timeout=30)[1] == {
            "Implements": ["VolumeDriver"]}
        assert post(sock, "VolumeDriver.List", None)[1] == {"Volumes": [], "Err": ""}
        assert not (tmp_path / "unused.sock").exists()
        msg = notify.recv(4096).decode()
        assert "READY=1" in msg.splitlines() and "serving the volume plugin" in msg
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        sock.unlink(missing_ok=True)
        notify.close()
        os.unlink(cluster.base / f"notify-{tag}.sock")
