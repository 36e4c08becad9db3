"""Issue 16.1: attach/map with --size create the image when it is missing."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import CephCluster


def test_attach_creates_a_missing_image_and_reuses_it(cluster: CephCluster, image: str,
                                                      mnt: Path) -> None:
    cp = cluster.cli("attach", image, "--mountpoint", str(mnt), "--size", "64M", "--json")
    assert cp.returncode == 0, cp.stderr
    assert json.loads(cp.stdout)["created_filesystem"] is True
    info = json.loads(cluster.cli("info", image, "--json", check=True).stdout)
    assert info["size"] == 64 << 20 and "exclusive-lock" in info["features"]
    (mnt / "f").write_text("kept")
    cluster.cli("detach", image, check=True)
    again = cluster.cli("attach", image, "--mountpoint", str(mnt), "--size", "64M", "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["created_filesystem"] is False
    assert (mnt / "f").read_text() == "kept"
    cluster.cli("detach", image, check=True)
    other = cluster.cli("attach", image, "--mountpoint", str(mnt), "--size", "128M")
    assert other.returncode == 5 and "64M" in other.stderr, other.stderr
    assert all(r["image"] != image for r in
               json.loads(cluster.cli("status", "--json", check=True).stdout))


def test_map_with_size_creates_too(cluster: CephCluster, image: str) -> None:
    dev = cluster.cli("map", image, "--size", "32M", check=True).stdout.strip()
    assert dev.startswith("/dev/")
    cluster.cli("unmap", image, check=True)
    missing = cluster.cli("attach", image + "-nope")
    assert missing.returncode == 3, missing.stderr
