"""The host boundary through `cephvol attach` on the real cluster: mountpoints
that cannot escape, mount errors that say why, env files that touch nothing
that is not cephvol's (issue 13 items 1, 3, 7; issue 20 items 4, 5)."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from tests.conftest import CephCluster


def _root_mount() -> list[str]:
    return [ln for ln in Path("/proc/self/mountinfo").read_text().splitlines()
            if ln.split()[4] in ("/", "/etc")]


def _one_line_error(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("cephvol: error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def _nothing_attached(cluster: CephCluster, image: str) -> None:
    rows = json.loads(cluster.cli("status", "--json", check=True).stdout)
    assert [r for r in rows if r["image"] == image] == []
    owner = json.loads(cluster.cli("owner", image, "--json", check=True).stdout)["owner"]
    assert owner is None


@pytest.mark.parametrize("shape", ["link-to-root", "link-to-etc", "parent-link-to-etc"])
def test_symlinked_mountpoint_is_refused_before_anything(cluster: CephCluster, image: str,
                                                         tmp_path: Path, shape: str) -> None:
    cluster.cli("create", image, "--size", "64M", check=True)
    if shape == "link-to-root":
        os.symlink("/", tmp_path / "l")
        mp = tmp_path / "l"
    elif shape == "link-to-etc":
        os.symlink("/etc", tmp_path / "l")
        mp = tmp_path / "l"
    else:  # /tmp/l2/sub with l2 -> /etc
        os.symlink("/etc", tmp_path / "l2")
        mp = tmp_path / "l2" / "sub"
    before = _root_mount()
    etc = sorted(os.listdir("/etc"))
    cp = cluster.cli("attach", image, "--mountpoint", str(mp))
    assert cp.returncode == 2, cp.stderr
    line = _one_line_error(cp.stderr)
    assert "is a symlink" in line
    assert _root_mount() == before and sorted(os.listdir("/etc")) == etc
    assert not os.path.exists("/etc/sub") or "sub" in etc
    _nothing_attached(cluster, image)
    js = cluster.cli("attach", image, "--mountpoint", str(mp), "--json")
    assert js.returncode == 2 and json.loads(js.stdout)["exit_code"] == 2


def test_system_directory_and_state_dir_are_refused(cluster: CephCluster, image: str) -> None:
    cluster.cli("create", image, "--size", "64M", check=True)
    for mp in ("/etc", "/var", str(cluster.state_dir / "fuse" / "x")):
        cp = cluster.cli("attach", image, "--mountpoint", mp)
        assert cp.returncode == 2, (mp, cp.stderr)
        _one_line_error(cp.stderr)
    _nothing_attached(cluster, image)


def test_bad_mount_option_carries_the_kernels_reason(cluster: CephCluster, image: str,
                                                     mnt: Path) -> None:
    cluster.cli("create", image, "--size", "64M", check=True)
    cp = cluster.cli("attach", image, "--mountpoint", str(mnt), "-o", "nosuchopt")
    assert cp.returncode == 11, cp.stderr
    line = _one_line_error(cp.stderr)
    assert "ext4: Unknown parameter 'nosuchopt'" in line
    assert not os.path.ismount(mnt)
    cluster.cli("detach", image, check=True)
    _nothing_attached(cluster, image)


def test_env_file_rules_on_a_real_attach(cluster: CephCluster, image: str, mnt: Path,
                                         tmp_path: Path) -> None:
    """Issue 20 item 4: a foreign file is never overwritten or deleted, a
    changed env file replaces the old one, detach removes only its own.
    Item 5: a path that cannot be written is refused before anything is mapped."""
    cluster.cli("create", image, "--size", "64M", check=True)
    precious = tmp_path / "precious"
    precious.write_text("precious\n")
    cp = cluster.cli("attach", image, "-m", str(mnt), "--env-file", str(precious))
    assert cp.returncode == 5 and "not written by cephvol" in _one_line_error(cp.stderr)
    assert precious.read_text() == "precious\n"
    _nothing_attached(cluster, image)
    for bad in (tmp_path, precious / "x.env"):
        cp = cluster.cli("attach", image, "-m", str(mnt), "--env-file", str(bad))
        assert cp.returncode == 2, cp.stderr
        _one_line_error(cp.stderr)
        _nothing_attached(cluster, image)
    assert not mnt.exists()

    a, b = tmp_path / "env" / "a.env", tmp_path / "env" / "b.env"
    cluster.cli("attach", image, "-m", str(mnt), "--env-file", str(a), check=True)
    assert a.read_text().startswith(f"# Written by cephvol for {image}\n")
    cluster.cli("attach", image, "-m", str(mnt), "--env-file", str(b), check=True)
    assert b.exists() and not a.exists()
    assert f'CEPHVOL_MOUNTPOINT="{mnt}"' in b.read_text()
    assert sorted(os.listdir(tmp_path / "env")) == ["b.env"]  # no temp files
    cluster.cli("detach", image, check=True)
    assert not b.exists() and precious.read_text() == "precious\n"


def test_one_env_file_for_two_volumes_is_refused(cluster: CephCluster, image: str, mnt: Path,
                                                 tmp_path: Path) -> None:
    other = f"rbd/t-{uuid.uuid4().hex[:10]}"
    env = tmp_path / "shared.env"
    try:
        for img in (image, other):
            cluster.cli("create", img, "--size", "64M", check=True)
        cluster.cli("attach", image, "--env-file", str(env), check=True)
        first = env.read_text()
        cp = cluster.cli("attach", other, "--env-file", str(env))
        assert cp.returncode == 5, cp.stderr
        assert image in _one_line_error(cp.stderr)
        assert env.read_text() == first
        _nothing_attached(cluster, other)
        cluster.cli("detach", image, check=True)
        assert not env.exists()
    finally:
        cluster.cli("detach", "--force", other, timeout=180)
        cluster.cli("rm", other, timeout=60)
