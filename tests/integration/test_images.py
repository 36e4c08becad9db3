"""Image operations through librbd against the real session cluster."""

from __future__ import annotations

import json

from tests.conftest import CephCluster


def test_create_is_idempotent_and_conflicts_on_other_size(cluster: CephCluster,
                                                           image: str) -> None:
    first = cluster.cli("create", image, "--size", "64M", "--json", check=True)
    assert json.loads(first.stdout)["created"] is True
    again = cluster.cli("create", image, "--size", "64M", "--json", check=True)
    assert json.loads(again.stdout) == {"image": image, "size": 64 << 20, "created": False}
    other = cluster.cli("create", image, "--size", "128M")
    assert other.returncode == 5
    assert "already exists with size 64M" in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1


def test_info_and_ls(cluster: CephCluster, image: str) -> None:
    cluster.cli("create", image, "--size", "32M", check=True)
    info = json.loads(cluster.cli("info", image, "--json", check=True).stdout)
    assert info["size"] == 32 << 20
    assert "exclusive-lock" in info["features"]
    assert info["watchers"] == []
    names = json.loads(cluster.cli("ls", "rbd", "--json", check=True).stdout)
    assert image.split("/")[1] in names


def test_bad_inputs_get_one_line_and_documented_codes(cluster: CephCluster) -> None:
    cases = [
        (("create", "nopool/x", "--size", "1G"), 3, "pool 'nopool' does not exist"),
        (("create", "rbd/nons/x", "--size", "1G"), 3, "namespace rbd/nons does not exist"),
        (("create", "rbd/a/b/c/d", "--size", "1G"), 2, "expected POOL"),
        (("create", "rbd/x@snap", "--size", "1G"), 2, "snapshot is not allowed"),
        (("create", "rbd/x", "--size", "-1"), 2, "invalid size"),
        (("create", "rbd/x", "--size", "10Q"), 2, "invalid size"),
        (("create", "rbd/x", "--size", "0"), 2, "greater than zero"),
        (("info", "rbd/does-not-exist"), 3, "not found"),
        (("attach", "rbd/does-not-exist"), 3, "not found"),
        (("attach", "nopool/x"), 3, "pool 'nopool' does not exist"),
        (("attach", "rbd/x", "--mountpoint", "relative/dir"), 2, "absolute path"),
        (("attach", "rbd/x", "--mountpoint", "/"), 2, "root"),
        (("attach", "rbd/x", "--mountpoint"), 2, "requires an argument"),
    ]
    for args, code, text in cases:
        cp = cluster.cli(*args)
        assert cp.returncode == code, (args, cp.returncode, cp.stderr)
        assert text in cp.stderr, (args, cp.stderr)
        assert len(cp.stderr.strip().splitlines()) == 1, cp.stderr
        assert "Traceback" not in cp.stderr + cp.stdout


def test_cluster_down_is_a_bounded_clear_error(cluster: CephCluster, tmp_path) -> None:
    import time

    bad = tmp_path / "ceph.conf"
    text = cluster.conf.read_text()
    lines = [("mon host = 127.0.0.1:9" if ln.startswith("mon host") else ln)
             for ln in text.splitlines()]
    bad.write_text("\n".join(lines) + "\n")
    t0 = time.monotonic()
    cp = cluster.cli("--conf", str(bad), "--connect-timeout", "2", "ls")
    took = time.monotonic() - t0
    assert cp.returncode == 7
    assert "cluster unreachable" in cp.stderr
    assert took < 30, f"a 2 s connect timeout took {took:.1f}s"
    missing = cluster.cli("--conf", str(tmp_path / "nope.conf"), "ls")
    assert missing.returncode == 3 and "does not exist" in missing.stderr  # not found


def test_json_errors_carry_code_and_message(cluster: CephCluster) -> None:
    cp = cluster.cli("info", "rbd/does-not-exist", "--json")
    assert cp.returncode == 3
    assert json.loads(cp.stdout) == {"error": "image rbd/does-not-exist: not found",
                                     "exit_code": 3}


def test_rm_refuses_while_attached(cluster: CephCluster, image: str, mnt) -> None:
    cluster.cli("create", image, "--size", "64M", check=True)
    cluster.cli("attach", image, "--mountpoint", str(mnt), check=True)
    cp = cluster.cli("rm", image)
    assert cp.returncode == 4 and "detach it first" in cp.stderr
    cluster.cli("detach", image, check=True)
    assert cluster.cli("rm", image).returncode == 0
    assert cluster.cli("info", image).returncode == 3


def test_size_beyond_the_pools_capacity_is_created_thin_with_a_warning(
        cluster: CephCluster, image: str) -> None:
    cp = cluster.cli("create", image, "--size", "20G", "--json")  # the pool has ~10G
    assert cp.returncode == 0, cp.stderr
    res = json.loads(cp.stdout)
    assert "more than pool rbd can still take" in res["warning"]
    assert "cephvol: warning: 20G is more than pool rbd" in cp.stderr
    info = json.loads(cluster.cli("info", image, "--json", check=True).stdout)
    assert info["size"] == 20 << 30
    small = cluster.cli("create", image + "s", "--size", "16M", "--json", check=True)
    assert "warning" not in json.loads(small.stdout) and small.stderr == ""
    cluster.cli("rm", image + "s", check=True)
