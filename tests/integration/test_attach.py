"""attach/detach end to end on real devices: rbd-fuse, loop, ext4/xfs, mounts."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from cephvol import fs
from tests.conftest import CephCluster


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _attach(cluster: CephCluster, image: str, mnt: Path, *extra: str) -> dict:
    cp = cluster.cli("attach", image, "--mountpoint", str(mnt), "--json", *extra)
    assert cp.returncode == 0, cp.stderr
    return json.loads(cp.stdout)


def test_round_trip_with_checksum(cluster: CephCluster, image: str, mnt: Path) -> None:
    cluster.cli("create", image, "--size", "256M", check=True)
    res = _attach(cluster, image, mnt)
    assert res["backend"] in ("qsd", "fuse") and res["device"].startswith("/dev/loop")
    assert res["created_filesystem"] is True and res["fstype"] == "ext4"
    assert os.path.ismount(mnt)
    data = os.urandom(8 << 20)
    (mnt / "data.bin").write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    det = json.loads(cluster.cli("detach", image, "--json", check=True).stdout)
    assert det["detached"] is True
    assert not os.path.ismount(mnt)
    again = _attach(cluster, image, mnt)
    assert again["created_filesystem"] is False
    assert _sha(mnt / "data.bin") == want
    cluster.cli("detach", image, check=True)


def test_attach_twice_returns_same_device_and_detach_twice_is_noop(
        cluster: CephCluster, image: str, mnt: Path) -> None:
    cluster.cli("create", image, "--size", "64M", check=True)
    a = _attach(cluster, image, mnt)
    b = _attach(cluster, image, mnt)
    assert b["device"] == a["device"] and b["already_attached"] is True
    other = cluster.cli("attach", image, "--mountpoint", str(mnt) + "-other")
    assert other.returncode == 5 and "already attached at" in other.stderr
    st = json.loads(cluster.cli("status", "--json", check=True).stdout)
    row = next(r for r in st if r["image"] == image)
    assert row["device"] == a["device"] and row["mounted"] is True
    assert cluster.cli("detach", image).returncode == 0
    second = cluster.cli("detach", image, "--json")
    assert second.returncode == 0 and json.loads(second.stdout)["detached"] is False
    st = json.loads(cluster.cli("status", "--json", check=True).stdout)
    assert all(r["image"] != image for r in st)


def test_map_only_then_attach_with_mount(cluster: CephCluster, image: str, mnt: Path) -> None:
    cluster.cli("create", image, "--size", "64M", check=True)
    dev = cluster.cli("attach", image, "--no-mkfs", check=True).stdout.strip()
    assert dev.startswith("/dev/loop")
    probe = subprocess.run(["blkid", "-p", dev], capture_output=True, check=False)
    assert probe.returncode == 2, "map-only with --no-mkfs must not write a filesystem"
    cluster.cli("detach", image, check=True)


def test_existing_filesystem_of_another_type_is_never_formatted(
        cluster: CephCluster, image: str, mnt: Path) -> None:
    cluster.cli("create", image, "--size", "320M", check=True)
    _attach(cluster, image, mnt, "--fstype", "xfs")
    (mnt / "keep").write_text("precious")
    cluster.cli("detach", image, check=True)
    cp = cluster.cli("attach", image, "--mountpoint", str(mnt), "--fstype", "ext4")
    assert cp.returncode == 5 and "holds xfs, not ext4" in cp.stderr
    # without --fstype the existing filesystem is simply mounted
    res = _attach(cluster, image, mnt)
    assert res["fstype"] == "xfs" and (mnt / "keep").read_text() == "precious"
    cluster.cli("detach", image, check=True)


def test_partition_table_is_refused_not_formatted(
        cluster: CephCluster, image: str, mnt: Path) -> None:
    cluster.cli("create", image, "--size", "64M", check=True)
    dev = cluster.cli("attach", image, "--no-mkfs", check=True).stdout.strip()
    subprocess.run(["sfdisk", "-q", dev], input="label: gpt\n,\n", text=True, check=True,
                   capture_output=True)
    subprocess.run(["blockdev", "--flushbufs", dev], check=True)
    before = subprocess.run(["dd", f"if={dev}", "bs=1M", "count=1", "status=none"],
                            capture_output=True, check=True).stdout
    cp = cluster.cli("attach", image, "--mountpoint", str(mnt))
    assert cp.returncode == 10 and "partition table gpt" in cp.stderr
    after = subprocess.run(["dd", f"if={dev}", "bs=1M", "count=1", "status=none"],
                           capture_output=True, check=True).stdout
    assert after == before
    assert not os.path.ismount(mnt)
    cluster.cli("detach", image, check=True)


def test_busy_mount_names_the_holder_and_keeps_everything(
        cluster: CephCluster, image: str, mnt: Path) -> None:
    cluster.cli("create", image, "--size", "64M", check=True)
    res = _attach(cluster, image, mnt)
    (mnt / "f").write_text("x")
    holder = subprocess.Popen(["sleep", "300"], cwd=mnt)
    try:
        cp = cluster.cli("detach", image)
        assert cp.returncode == 4, cp.stderr
        assert f"pid {holder.pid} (sleep" in cp.stderr
        assert os.path.ismount(mnt)
        st = json.loads(cluster.cli("status", "--json", check=True).stdout)
        assert any(r["image"] == image and r["device"] == res["device"] for r in st)
    finally:
        holder.kill()
        holder.wait()
    cluster.cli("detach", image, check=True)
    assert not os.path.ismount(mnt)


def test_open_device_is_not_unmapped_without_force(
        cluster: CephCluster, image: str) -> None:
    cluster.cli("create", image, "--size", "64M", check=True)
    dev = cluster.cli("attach", image, "--no-mkfs", check=True).stdout.strip()
    holder = subprocess.Popen(["sh", "-c", f"exec 3<{dev}; exec sleep 300"])
    try:
        time.sleep(0.3)
        cp = cluster.cli("detach", image)
        assert cp.returncode == 4 and "is open by" in cp.stderr
        assert os.path.exists(f"/sys/block/{os.path.basename(dev)}/loop/backing_file")
    finally:
        holder.kill()
        holder.wait()
    cluster.cli("detach", image, check=True)
    assert not os.path.exists(f"/sys/block/{os.path.basename(dev)}/loop/backing_file")


def test_snapshot_on_fuse_is_a_clear_unsupported(cluster: CephCluster, image: str) -> None:
    cluster.cli("create", image, "--size", "64M", check=True)
    cp = cluster.cli("attach", image + "@nosnap", "--backend", "fuse")
    # the snapshot does not exist: caught before any host change
    assert cp.returncode == 3, cp.stderr


def _owner(cluster: CephCluster, image: str) -> object:
    return json.loads(cluster.cli("owner", image, "--json", check=True).stdout)["owner"]


@pytest.mark.parametrize("step", ["journal", "own", "map", "mkfs", "mkdir", "mount"])
def test_crash_during_attach_is_finished_by_detach(
        cluster: CephCluster, image: str, mnt: Path, step: str) -> None:
    cluster.cli("create", image, "--size", "64M", check=True)
    if step != "mkfs":
        # put data on it first, so the crash happens on a volume with content
        _attach(cluster, image, mnt)
        (mnt / "before").write_text("kept")
        cluster.cli("detach", image, check=True)
    cp = cluster.cli("attach", image, "--mountpoint", str(mnt), CEPHVOL_TEST_CRASH_AT=step)
    assert cp.returncode == -signal.SIGKILL, cp.stderr  # the crash point was reached
    det = cluster.cli("detach", image)
    assert det.returncode == 0, det.stderr
    assert not os.path.ismount(mnt)
    assert not (cluster.state_dir / "volumes" / f"rbd,-,{image.split('/')[1]}.json").exists()
    assert _owner(cluster, image) is None  # no ownership left behind for other hosts
    res = _attach(cluster, image, mnt)
    if step != "mkfs":
        assert (mnt / "before").read_text() == "kept"
    cluster.cli("detach", image, check=True)
    assert res["device"]


@pytest.mark.parametrize("step", ["detach-sync", "detach-umount", "detach-check-unused",
                                  "detach-unmap", "detach-release"])
def test_crash_during_detach_is_finished_by_detach(
        cluster: CephCluster, image: str, mnt: Path, step: str) -> None:
    cluster.cli("create", image, "--size", "64M", check=True)
    _attach(cluster, image, mnt)
    payload = os.urandom(1 << 20)
    (mnt / "p").write_bytes(payload)
    cp = cluster.cli("detach", image, CEPHVOL_TEST_CRASH_AT=step)
    assert cp.returncode == -signal.SIGKILL
    assert cluster.cli("detach", image).returncode == 0
    assert not os.path.ismount(mnt)
    assert _owner(cluster, image) is None
    _attach(cluster, image, mnt)
    assert (mnt / "p").read_bytes() == payload
    cluster.cli("detach", image, check=True)


def test_killed_rbd_fuse_is_cleaned_up(cluster: CephCluster, image: str) -> None:
    cluster.cli("create", image, "--size", "64M", check=True)
    cluster.cli("attach", image, "--no-mkfs", "--backend", "fuse", check=True)
    st = json.loads(cluster.cli("status", "--json", check=True).stdout)
    row = next(r for r in st if r["image"] == image)
    fuse_dir = cluster.state_dir / "fuse" / f"rbd,-,{image.split('/')[1]}"
    pids = subprocess.run(["pgrep", "-f", f"rbd-fuse .*{fuse_dir}"], capture_output=True,
                          text=True, check=False).stdout.split()
    assert pids
    for p in pids:
        os.kill(int(p), signal.SIGKILL)
    time.sleep(0.5)
    # what was queued behind the dead rbd-fuse never reached the cluster: said so
    det = cluster.cli("detach", image)
    assert det.returncode == 12 and "not written" in det.stderr, det.stderr
    forced = cluster.cli("detach", image, "--force")
    assert forced.returncode == 12 and "lost" in forced.stderr, forced.stderr
    assert not fuse_dir.exists()
    assert row["device"]


def test_fuse_unreachable_monitor_fails_fast(cluster: CephCluster, image: str,
                                             tmp_path: Path) -> None:
    from cephvol.backends.fuse import FuseBackend
    from cephvol.cluster import ClusterConfig
    from cephvol.errors import ClusterError
    from cephvol.mapper import HostPaths, MapOptions
    from cephvol.spec import parse_spec

    cluster.cli("create", image, "--size", "64M", check=True)
    bad = tmp_path / "ceph.conf"
    bad.write_text("\n".join(("mon host = 127.0.0.1:9" if ln.startswith("mon host") else ln)
                             for ln in cluster.conf.read_text().splitlines()) + "\n")
    b = FuseBackend(HostPaths(tmp_path / "state"), ClusterConfig(bad, "admin", 2.0))
    t0 = time.monotonic()
    with pytest.raises(ClusterError, match="rbd-fuse could not reach the cluster"):
        b.map(parse_spec(image), MapOptions())
    assert time.monotonic() - t0 < 20
    assert b.list_mappings() == []
    assert not any((tmp_path / "state" / "fuse").iterdir())


def test_read_only_attach_on_fuse(cluster: CephCluster, image: str, mnt: Path) -> None:
    cluster.cli("create", image, "--size", "64M", check=True)
    _attach(cluster, image, mnt)
    (mnt / "f").write_text("written rw")
    cluster.cli("detach", image, check=True)
    res = _attach(cluster, image, mnt, "--read-only", "--backend", "fuse")
    assert res["read_only"] and res["backend"] == "fuse"
    blk = os.path.basename(res["device"])
    assert Path(f"/sys/block/{blk}/ro").read_text().strip() == "1"
    assert (mnt / "f").read_text() == "written rw"
    with pytest.raises(OSError):
        (mnt / "g").write_text("no")
    cluster.cli("detach", image, check=True)


def test_forced_unmap_of_an_open_device_on_fuse(cluster: CephCluster, image: str) -> None:
    """The loop device cannot be torn from its opener: force detaches rbd-fuse
    lazily, and everything goes once the opener closes the device."""
    cluster.cli("create", image, "--size", "64M", check=True)
    dev = cluster.cli("map", image, "--backend", "fuse", check=True).stdout.strip()
    holder = subprocess.Popen(["sh", "-c", f"exec 3<{dev}; exec sleep 300"])
    try:
        time.sleep(0.3)
        assert cluster.cli("unmap", image).returncode == 4
        cp = cluster.cli("unmap", "--force", image)
        assert cp.returncode == 0, cp.stderr
        st = json.loads(cluster.cli("status", "--json", check=True).stdout)
        assert not any(r["image"] == image for r in st)
    finally:
        holder.kill()
        holder.wait()
    deadline = time.monotonic() + 20
    blk = os.path.basename(dev)
    while time.monotonic() < deadline and (
            os.path.exists(f"/sys/block/{blk}/loop/backing_file")
            or subprocess.run(["pgrep", "-f", f"rbd-fuse .*{image.split('/')[1]}"],
                              capture_output=True, check=False).returncode == 0):
        time.sleep(0.1)
    assert not os.path.exists(f"/sys/block/{blk}/loop/backing_file")
    assert subprocess.run(["pgrep", "-f", f"rbd-fuse .*{image.split('/')[1]}"],
                          capture_output=True, check=False).returncode != 0


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_resize_grows_image_and_mounted_filesystem_online(
        cluster: CephCluster, image: str, mnt: Path, fstype: str) -> None:
    cluster.cli("create", image, "--size", "320M", check=True)  # xfs needs 300M
    _attach(cluster, image, mnt, "--fstype", fstype)
    payload = os.urandom(1 << 20)
    (mnt / "p").write_bytes(payload)
    before = os.statvfs(mnt)
    assert cluster.cli("resize", image, "--size", "100M").returncode == 10  # shrink refused
    cp = cluster.cli("resize", image, "--size", "640M", "--json")
    if fstype == "ext4" and not fs.has_capability(fs.CAP_SYS_RESOURCE):
        # this machine: no CAP_SYS_RESOURCE, so no online ext4 grow; the
        # image and device are grown, the next attach grows it offline
        assert cp.returncode == 9 and "CAP_SYS_RESOURCE" in cp.stderr, cp.stderr
        cluster.cli("detach", image, check=True)
        _attach(cluster, image, mnt)
    else:
        assert cp.returncode == 0, cp.stderr
        res = json.loads(cp.stdout)
        assert res["changed"] and res["filesystem_grown"] and res["size"] == 640 << 20
    after = os.statvfs(mnt)
    assert after.f_blocks * after.f_frsize > 1.8 * before.f_blocks * before.f_frsize
    assert (mnt / "p").read_bytes() == payload
    again = json.loads(cluster.cli("resize", image, "--size", "640M", "--json",
                                   check=True).stdout)
    assert not again["changed"]  # idempotent
    cluster.cli("detach", image, check=True)
    assert json.loads(cluster.cli("info", image, "--json", check=True).stdout)["size"] == \
        640 << 20


def test_cleanup_releases_what_crashed_or_died(cluster: CephCluster, mnt: Path) -> None:
    names = [f"rbd/t-{uuid.uuid4().hex[:10]}" for _ in range(3)]
    crashed, killed, healthy = names
    try:
        for n in names:
            cluster.cli("create", n, "--size", "64M", check=True)
        # 1. cephvol killed mid-attach (after map, before mkfs)
        assert cluster.cli("attach", crashed, "--mountpoint", str(mnt / "c"),
                           CEPHVOL_TEST_CRASH_AT="map").returncode == -signal.SIGKILL
        # 2. attached, then its rbd-fuse killed
        _attach(cluster, killed, mnt / "k", "--backend", "fuse")
        key = f"rbd,-,{killed.split('/')[1]}"
        for p in subprocess.run(["pgrep", "-f", f"rbd-fuse .*{key}"], capture_output=True,
                                text=True, check=False).stdout.split():
            os.kill(int(p), signal.SIGKILL)
        # 3. a healthy volume, which --stale must leave alone
        _attach(cluster, healthy, mnt / "h")
        (mnt / "h" / "f").write_text("stay")
        time.sleep(0.5)
        cp = cluster.cli("cleanup", "--json")
        assert cp.returncode == 12, cp.stderr  # the dead rbd-fuse lost what it held
        rows = {r["image"]: r for r in json.loads(cp.stdout)}
        assert set(rows) == {crashed, killed} and rows[crashed]["ok"]
        assert not rows[killed]["ok"] and rows[killed]["exit_code"] == 12
        assert "gone" in rows[crashed]["reason"] and "rbd-fuse" in rows[killed]["reason"]
        forced = cluster.cli("cleanup", "--force", "--json")
        assert forced.returncode == 12, forced.stderr
        assert [r["image"] for r in json.loads(forced.stdout)] == [killed]
        st = {r["image"] for r in json.loads(cluster.cli("status", "--json", check=True).stdout)}
        assert st == {healthy} and (mnt / "h" / "f").read_text() == "stay"
        assert not os.path.ismount(mnt / "c") and not os.path.ismount(mnt / "k")
        assert json.loads(cluster.cli("cleanup", "--json", check=True).stdout) == []
        # --all: the shutdown path detaches everything
        rows2 = json.loads(cluster.cli("cleanup", "--all", "--json", check=True).stdout)
        assert [r["image"] for r in rows2] == [healthy] and rows2[0]["ok"]
        assert json.loads(cluster.cli("status", "--json", check=True).stdout) == []
    finally:
        for n in names:
            cluster.cli("detach", "--force", "--lazy", n)
            cluster.cli("rm", n)


def test_detach_with_the_cluster_down_is_bounded_and_loses_nothing(
        cluster: CephCluster, image: str, mnt: Path) -> None:
    """Stop the whole cluster under an attached volume: detach must come back
    within its step bound, say what it could not do, unmap nothing, and
    finish once the cluster returns, with the data intact."""
    from cephvol.devcluster import DevCluster

    cluster.cli("create", image, "--size", "64M", check=True)
    _attach(cluster, image, mnt)
    payload = os.urandom(2 << 20)
    (mnt / "p").write_bytes(payload)
    subprocess.run(["sync", "--file-system", str(mnt)], check=True, timeout=60)
    (mnt / "late").write_text("written after the last sync")  # still dirty at the crash
    dc = DevCluster(cluster.conf.parent)
    dc.down()
    try:
        t0 = time.monotonic()
        cp = cluster.cli("detach", image, CEPHVOL_STEP_TIMEOUT="5", timeout=120)
        took = time.monotonic() - t0
        assert cp.returncode == 8, cp.stderr
        assert "is the cluster reachable?" in cp.stderr and "run `cephvol detach` again" in \
            cp.stderr
        print(f"detach with the cluster down returned in {took:.1f}s")
        assert took < 30, took
        dev = next(r["device"] for r in json.loads(
            cluster.cli("status", "--json", check=True).stdout) if r["image"] == image)
        assert os.path.exists(f"/sys/block/{os.path.basename(dev)}/loop/backing_file")
    finally:
        dc.up()
    deadline = time.monotonic() + 120
    while True:
        cp = cluster.cli("detach", image, timeout=180)
        if cp.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(2)  # the abandoned umount finishes once the OSD is back
    assert cp.returncode == 0, cp.stderr
    _attach(cluster, image, mnt)
    assert (mnt / "p").read_bytes() == payload
    assert (mnt / "late").read_text() == "written after the last sync"
    cluster.cli("detach", image, check=True)


@pytest.mark.parametrize(("args", "env", "code"), [
    (["--mountpoint", "FILE"], {}, 5),                    # a file, not a directory
    (["--mountpoint", "FILE/sub"], {}, 5),                # below a file
    (["--mountpoint", "MOUNTED"], {}, 4),                 # something else is mounted there
    (["--mountpoint", "/etc/hostname"], {}, 2),           # a system directory (test_boundary)
    (["--mountpoint", "MNT"], {"CEPHVOL_HOST_ID": "a b"}, 2),  # no usable host identity
])
def test_attach_refusals_change_nothing(cluster: CephCluster, image: str, mnt: Path,
                                        args: list[str], env: dict[str, str],
                                        code: int) -> None:
    cluster.cli("create", image, "--size", "64M", check=True)
    loops = subprocess.run(["losetup", "-l", "-n"], capture_output=True, text=True).stdout
    afile, mounted = mnt.with_name(mnt.name + ".file"), mnt.with_name(mnt.name + ".mounted")
    afile.parent.mkdir(parents=True, exist_ok=True)
    afile.write_text("x")
    mounted.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "cvtest", str(mounted)], check=True)
    try:
        cp = cluster.cli("attach", image, *[a.replace("MNT", str(mnt)).replace(
            "FILE", str(afile)).replace("MOUNTED", str(mounted)) for a in args], **env)
    finally:
        subprocess.run(["umount", str(mounted)], check=True)
        mounted.rmdir()
        afile.unlink()
    assert cp.returncode == code, cp.stderr
    assert len(cp.stderr.strip().splitlines()) == 1 and "Traceback" not in cp.stderr
    assert json.loads(cluster.cli("status", "--json", check=True).stdout) == []
    assert subprocess.run(["losetup", "-l", "-n"], capture_output=True,
                          text=True).stdout == loops
    assert json.loads(cluster.cli("owner", image, "--json", check=True).stdout)["owner"] is None
    assert not mnt.exists()


def test_a_map_that_fails_after_taking_ownership_gives_it_back(
        cluster: CephCluster, image: str, mnt: Path) -> None:
    """The fuse backend refuses --exclusive only once ownership was taken:
    nothing may stay owned (other hosts would be refused) or journalled."""
    cluster.cli("create", image, "--size", "64M", check=True)
    cp = cluster.cli("attach", image, "--mountpoint", str(mnt), "--exclusive")
    assert cp.returncode == 9 and "no exclusive mapping" in cp.stderr, cp.stderr
    assert json.loads(cluster.cli("owner", image, "--json", check=True).stdout)["owner"] is None
    assert json.loads(cluster.cli("status", "--json", check=True).stdout) == []
    assert not mnt.exists()
