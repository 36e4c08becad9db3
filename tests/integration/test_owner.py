"""attach --owner UID[:GID] on the fuse backend (issue 14 item 5): the root of
the filesystem the first attach makes belongs to UID:GID, so a container
running as that user can write; a later attach with another owner changes
nothing (the data's owner is the data's business). Also through the API and
the volume plugin's `-o owner=`."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.conftest import CephCluster


def _as_user(uid: int, gid: int, cwd: Path, script: str) -> subprocess.CompletedProcess[str]:
    """A non-root process (no supplementary groups) whose cwd is the volume's
    root: subprocess changes directory as root, then drops to uid:gid, so the
    test's 0700 temp directories above the mountpoint do not matter; only the
    volume root's owner and mode do."""
    return subprocess.run(["/bin/sh", "-c", script], cwd=cwd, user=uid, group=gid,
                          extra_groups=[], capture_output=True, text=True, timeout=30)


def _owner(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_uid, st.st_gid, st.st_mode & 0o7777


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_first_attach_owns_the_root_later_ones_never_chown(cluster: CephCluster, image: str,
                                                            mnt: Path, fstype: str) -> None:
    first = cluster.cli("attach", image, "--mountpoint", str(mnt), "--size", "512M",
                        "--fstype", fstype, "--owner", "1000:1001", "--json")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["created_filesystem"] is True
    assert _owner(mnt) == (1000, 1001, 0o755)

    w = _as_user(1000, 1001, mnt, "echo from-1000 > data && id -u")
    assert w.returncode == 0 and w.stdout.strip() == "1000", w.stderr
    other = _as_user(1002, 1002, mnt, "echo from-1002 > other")
    assert other.returncode != 0 and "Permission denied" in other.stderr
    assert not (mnt / "other").exists()

    # attached again while attached, with another owner: nothing changes
    again = cluster.cli("attach", image, "--mountpoint", str(mnt), "--owner", "2000:2000",
                        "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["already_attached"] is True
    assert _owner(mnt) == (1000, 1001, 0o755)

    cluster.cli("detach", image, check=True)
    assert not os.path.ismount(mnt)
    later = cluster.cli("attach", image, "--mountpoint", str(mnt), "--owner", "2000:2000",
                        "--json")
    assert later.returncode == 0, later.stderr
    assert json.loads(later.stdout)["created_filesystem"] is False
    assert _owner(mnt) == (1000, 1001, 0o755)  # never chowned again
    assert (mnt / "data").read_text() == "from-1000\n"
    assert (os.stat(mnt / "data").st_uid, os.stat(mnt / "data").st_gid) == (1000, 1001)
    assert _as_user(1000, 1001, mnt, "echo more >> data").returncode == 0
    assert _as_user(2000, 2000, mnt, "echo x > new").returncode != 0
    cluster.cli("detach", image, check=True)


def test_owner_uid_alone_and_a_volume_without_one(cluster: CephCluster, image: str,
                                                  mnt: Path) -> None:
    res = cluster.cli("attach", image, "--mountpoint", str(mnt), "--size", "64M",
                      "--owner", "65534")
    assert res.returncode == 0, res.stderr
    assert _owner(mnt) == (65534, 0, 0o755)
    cluster.cli("detach", image, check=True)
    plain = f"{image}-p"
    try:
        cluster.cli("attach", plain, "--mountpoint", str(mnt), "--size", "64M", check=True)
        assert _owner(mnt) == (0, 0, 0o755)
        assert _as_user(1000, 1000, mnt, "echo x > f").returncode != 0
    finally:
        cluster.cli("detach", "--force", plain, timeout=180)
        cluster.cli("rm", plain, timeout=60)


def test_a_refused_owner_changes_nothing(cluster: CephCluster, image: str, mnt: Path) -> None:
    cluster.cli("create", image, "--size", "64M", check=True)
    for args, code in ((["--owner", "x"], 2), (["--owner", "5", "--read-only"], 2)):
        res = cluster.cli("attach", image, "--mountpoint", str(mnt), *args)
        assert res.returncode == code and res.stderr.count("\n") == 1, res.stderr
    assert not mnt.exists()
    rows = json.loads(cluster.cli("status", "--json", check=True).stdout)
    assert all(r["image"] != image for r in rows)


def test_api_owner(cluster: CephCluster, image: str, mnt: Path) -> None:
    from cephvol import api

    kw = {"conf": cluster.conf, "state_dir": cluster.state_dir}
    api.create(image, "64M", conf=cluster.conf)
    with api.attach(image, mnt, owner=(1234, 5678), **kw) as vol:
        assert vol.created_filesystem
        assert _owner(mnt) == (1234, 5678, 0o755)
        assert _as_user(1234, 5678, mnt, "echo ok > f").returncode == 0
    with api.attach(image, mnt, owner="1:1", **kw) as vol:
        assert not vol.created_filesystem and _owner(mnt) == (1234, 5678, 0o755)


def test_plugin_option_owner(cluster: CephCluster, image: str) -> None:
    """Create with -o owner=, Mount: the container's directory belongs to it
    (the plugin's own code with a real host, cluster and mount; its socket
    is tested in test_plugin.py)."""
    from cephvol.cluster import ClusterConfig
    from cephvol.lifecycle import Host
    from cephvol.mapper import HostPaths
    from cephvol.plugin.protocol import Plugin, PluginPaths

    base = cluster.base / f"plugin-owner-{uuid.uuid4().hex[:8]}"
    host = Host(ClusterConfig.from_env(cluster.conf, None, 10), HostPaths(cluster.state_dir))
    plugin = Plugin(host, PluginPaths(base / "data", base / "mnt", base / "run"))
    name = image.split("/", 1)[1]
    assert plugin.handle("VolumeDriver.Create", {
        "Name": name, "Opts": {"size": "64M", "owner": "33:33"}}) == {"Err": ""}
    bad = plugin.handle("VolumeDriver.Create", {"Name": name + "-b", "Opts": {"owner": "-1"}})
    assert bad["Err"].startswith("cephvol exit 2: option owner '-1'")
    res = plugin.handle("VolumeDriver.Mount", {"Name": name, "ID": "c1"})
    assert res["Err"] == "", res
    mp = Path(res["Mountpoint"])
    try:
        assert _owner(mp) == (33, 33, 0o755)
        assert _as_user(33, 33, mp, "echo www > index").returncode == 0
    finally:
        assert plugin.handle("VolumeDriver.Unmount", {"Name": name, "ID": "c1"}) == {"Err": ""}
    assert not os.path.ismount(mp)
    assert plugin.handle("VolumeDriver.Remove", {"Name": name}) == {"Err": ""}
