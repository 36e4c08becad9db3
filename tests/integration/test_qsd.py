"""The qemu-storage-daemon backend end to end: a real daemon per image, its
FUSE export, a real loop device, real mounts, the session's real cluster."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cephvol import fs
from cephvol.backends.qsd import QsdBackend
from cephvol.cluster import ClusterConfig
from cephvol.mapper import HostPaths
from cephvol.spec import parse_spec
from tests.conftest import CephCluster

pytestmark = pytest.mark.skipif(not QsdBackend(HostPaths(Path("/run/cephvol")),
                                               ClusterConfig()).support().ok,
                                reason="qemu-storage-daemon or its rbd driver is not installed")


def _backend(cluster: CephCluster, conf: Path | None = None, timeout: float = 10.0,
             state: Path | None = None) -> QsdBackend:
    return QsdBackend(HostPaths(state or cluster.state_dir),
                      ClusterConfig(conf or cluster.conf, "admin", timeout))


def _attach(cluster: CephCluster, image: str, mnt: Path | None, *extra: str) -> dict:
    where = ["--mountpoint", str(mnt)] if mnt else []
    cp = cluster.cli("attach", image, *where, "--backend", "qsd", "--json", *extra)
    assert cp.returncode == 0, cp.stderr
    res = json.loads(cp.stdout)
    assert res["backend"] == "qsd" and res["device"].startswith("/dev/loop")
    return res


def _daemon_pid(cluster: CephCluster, image: str) -> int:
    d = _backend(cluster).dir_of(parse_spec(image))
    pid = int((d / "pid").read_text())
    assert b"qemu-storage-daemon" in Path(f"/proc/{pid}/cmdline").read_bytes()
    return pid


def _daemons_of(cluster: CephCluster, image: str) -> list[int]:
    d = str(_backend(cluster).dir_of(parse_spec(image)))
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if argv.startswith(b"qemu-storage-daemon\0") and d.encode() in argv and state != "Z":
            out.append(int(pid))
    return out


def _gone(cluster: CephCluster, image: str) -> None:
    """Nothing of the image's mapping is left on the host."""
    d = _backend(cluster).dir_of(parse_spec(image))
    deadline = time.monotonic() + 10
    while _daemons_of(cluster, image) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _daemons_of(cluster, image) == []
    assert not d.exists(), list(d.iterdir())
    loops = subprocess.run(["losetup", "-l", "-n", "-O", "BACK-FILE"], capture_output=True,
                           text=True, check=True).stdout
    assert str(d) not in loops
    assert str(d) not in Path("/proc/self/mountinfo").read_text()


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _rbd(cluster: CephCluster, *args: str) -> None:
    subprocess.run(["rbd", "-c", str(cluster.conf), *args], check=True, capture_output=True,
                   timeout=60)


def test_qsd_round_trip_with_checksum(cluster: CephCluster, image: str, mnt: Path) -> None:
    cluster.cli("create", image, "--size", "256M", check=True)
    res = _attach(cluster, image, mnt)
    assert res["created_filesystem"] is True
    blk = os.path.basename(res["device"])
    assert Path(f"/sys/block/{blk}/loop/dio").read_text().strip() == "1"  # direct I/O
    data = os.urandom(8 << 20)
    (mnt / "data.bin").write_bytes(data)
    det = json.loads(cluster.cli("detach", image, "--json", check=True).stdout)
    assert det["detached"] is True and not os.path.ismount(mnt)
    _gone(cluster, image)
    again = _attach(cluster, image, mnt)
    assert again["created_filesystem"] is False
    assert _sha(mnt / "data.bin") == hashlib.sha256(data).hexdigest()
    cluster.cli("detach", image, check=True)
    _gone(cluster, image)


def test_qsd_map_is_idempotent(cluster: CephCluster, image: str) -> None:
    cluster.cli("create", image, "--size", "64M", check=True)
    first = cluster.cli("map", image, "--backend", "qsd", check=True).stdout.strip()
    pid = _daemon_pid(cluster, image)
    second = cluster.cli("map", image, check=True).stdout.strip()
    assert first == second and first.startswith("/dev/loop")
    b = _backend(cluster)
    from cephvol.mapper import MapOptions

    m = b.map(parse_spec(image), MapOptions())  # the backend itself: the same mapping
    assert m.device == first and m.extra["qsd_pid"] == pid
    assert _daemons_of(cluster, image) == [pid]  # one daemon per image
    assert b.health(m) is None
    assert cluster.cli("unmap", image).returncode == 0
    _gone(cluster, image)


def test_qsd_read_only_attach(cluster: CephCluster, image: str, mnt: Path) -> None:
    cluster.cli("create", image, "--size", "64M", check=True)
    _attach(cluster, image, mnt)
    (mnt / "f").write_text("written rw")
    cluster.cli("detach", image, check=True)
    res = _attach(cluster, image, mnt, "--read-only")
    assert res["read_only"]
    blk = os.path.basename(res["device"])
    assert Path(f"/sys/block/{blk}/ro").read_text().strip() == "1"
    argv = Path(f"/proc/{_daemon_pid(cluster, image)}/cmdline").read_bytes().split(b"\0")
    blockdev = json.loads(argv[argv.index(b"--blockdev") + 1])
    export = json.loads(argv[argv.index(b"--export") + 1])
    assert blockdev["read-only"] is True and export["writable"] is False  # not only the loop
    assert (mnt / "f").read_text() == "written rw"
    with pytest.raises(OSError):
        (mnt / "g").write_text("no")
    cluster.cli("detach", image, check=True)
    _gone(cluster, image)


def test_qsd_snapshot_map_in_a_namespace(cluster: CephCluster, mnt: Path) -> None:
    """rbd-fuse cannot open snapshots; QEMU's rbd driver can (read-only),
    also of an image in a namespace."""
    ns = f"ns{uuid.uuid4().hex[:6]}"
    image = f"rbd/{ns}/s-{uuid.uuid4().hex[:8]}"
    _rbd(cluster, "namespace", "create", f"rbd/{ns}")
    try:
        cluster.cli("create", image, "--size", "64M", check=True)
        _attach(cluster, image, mnt)
        (mnt / "f").write_text("in the snapshot")
        cluster.cli("detach", image, check=True)
        _rbd(cluster, "snap", "create", f"{image}@s1")
        _attach(cluster, image, mnt)
        (mnt / "f").write_text("after the snapshot")
        cluster.cli("detach", image, check=True)
        res = _attach(cluster, f"{image}@s1", mnt)
        assert res["read_only"] is True
        assert (mnt / "f").read_text() == "in the snapshot"
        argv = Path(f"/proc/{_daemon_pid(cluster, image + '@s1')}/cmdline").read_bytes()
        blockdev = json.loads(argv.split(b"\0")[argv.split(b"\0").index(b"--blockdev") + 1])
        assert blockdev["snapshot"] == "s1" and blockdev["namespace"] == ns
        cluster.cli("detach", f"{image}@s1", check=True)
        _gone(cluster, f"{image}@s1")
    finally:
        cluster.cli("detach", "--force", "--lazy", f"{image}@s1")
        cluster.cli("detach", "--force", "--lazy", image)
        subprocess.run(["rbd", "-c", str(cluster.conf), "snap", "purge", image],
                       capture_output=True, check=False, timeout=60)
        cluster.cli("rm", image)
        subprocess.run(["rbd", "-c", str(cluster.conf), "namespace", "remove", f"rbd/{ns}"],
                       capture_output=True, check=False, timeout=60)


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_qsd_resize_online(cluster: CephCluster, image: str, mnt: Path, fstype: str) -> None:
    """block_resize through QMP, then the loop device, then the filesystem."""
    cluster.cli("create", image, "--size", "320M", check=True)  # xfs needs 300M
    res = _attach(cluster, image, mnt, "--fstype", fstype)
    payload = os.urandom(1 << 20)
    (mnt / "p").write_bytes(payload)
    before = os.statvfs(mnt)
    cp = cluster.cli("resize", image, "--size", "640M", "--json")
    assert fs.device_size(res["device"]) == 640 << 20  # the device grew while mounted
    if fstype == "ext4" and not fs.has_capability(fs.CAP_SYS_RESOURCE):
        # this machine: no online ext4 grow; the next attach grows it offline
        assert cp.returncode == 9 and "CAP_SYS_RESOURCE" in cp.stderr, cp.stderr
        cluster.cli("detach", image, check=True)
        _attach(cluster, image, mnt)
    else:
        assert cp.returncode == 0, cp.stderr
        assert json.loads(cp.stdout)["filesystem_grown"] is True
    after = os.statvfs(mnt)
    assert after.f_blocks * after.f_frsize > 1.8 * before.f_blocks * before.f_frsize
    assert (mnt / "p").read_bytes() == payload
    cluster.cli("detach", image, check=True)
    _gone(cluster, image)


def test_qsd_killed_daemon_is_reported_and_never_detached_cleanly(
        cluster: CephCluster, image: str, mnt: Path) -> None:
    cluster.cli("create", image, "--size", "64M", check=True)
    _attach(cluster, image, mnt)
    (mnt / "f").write_text("queued")
    pid = _daemon_pid(cluster, image)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _daemons_of(cluster, image) and time.monotonic() < deadline:
        time.sleep(0.05)
    b = _backend(cluster)
    m = b.find(parse_spec(image))
    assert m is not None and m.device  # the loop stays: a filesystem is still on it
    assert "not running" in (b.health(m) or "")
    st = json.loads(cluster.cli("status", "--json", check=True).stdout)
    row = next(r for r in st if r["image"] == image)
    assert row["phase"] == "broken"
    det = cluster.cli("detach", image, "--json")
    assert det.returncode != 0 and '"detached": true' not in det.stdout, det.stdout
    assert det.returncode == 12, det.stderr  # DataLost
    forced = cluster.cli("detach", "--force", image)
    assert forced.returncode == 12, forced.stderr  # torn down, but still not "success"
    assert not os.path.ismount(mnt)
    _gone(cluster, image)


def test_qsd_mapping_outlives_its_state_dir_and_daemon_and_is_still_found(
        cluster: CephCluster, image: str, mnt: Path) -> None:
    """Found by a try-to-break session: the state directory removed, then the
    daemon dead, left a mapping nobody could see (status empty, detach "not
    attached", exit 0). The loop device and the export stay; their directory
    is named by a hash of the image: status lists the mapping as broken with
    its device and mountpoint, and `detach IMAGE` finds it and says writes
    may be lost (exit 12), never "detached"."""
    cluster.cli("create", image, "--size", "64M", check=True)
    res = _attach(cluster, image, mnt)
    (mnt / "f").write_text("queued")
    pid = _daemon_pid(cluster, image)
    # rm -rf: everything but the export's mountpoint (EBUSY) goes
    subprocess.run(["rm", "-rf", str(cluster.state_dir)], capture_output=True, check=False)
    assert not (cluster.state_dir / "volumes").exists()
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _daemons_of(cluster, image) and time.monotonic() < deadline:
        time.sleep(0.05)
    st = cluster.cli("status", "--json")
    assert st.returncode == 0, st.stderr
    rows = [r for r in json.loads(st.stdout) if r["backend"] == "qsd"]
    assert len(rows) == 1, rows
    assert rows[0]["image"] is None and rows[0]["phase"] == "broken", rows
    assert rows[0]["device"] == res["device"] and rows[0]["mountpoint"] == str(mnt), rows
    assert "recorded nowhere" in rows[0]["problem"]
    det = cluster.cli("detach", image, "--json")
    assert det.returncode == 12 and '"detached": true' not in det.stdout, det.stderr
    forced = cluster.cli("detach", "--force", image)
    assert forced.returncode == 12, forced.stderr
    assert not os.path.ismount(mnt)
    _gone(cluster, image)
    assert [r for r in json.loads(cluster.cli("status", "--json", check=True).stdout)
            if r["backend"] == "qsd"] == []


@pytest.mark.parametrize("finisher", ["detach", "cleanup"])
@pytest.mark.parametrize("step", ["qsd-dir", "qsd-daemon", "qsd-loop"])
def test_qsd_crash_mid_map_is_finished(cluster: CephCluster, image: str, mnt: Path,
                                       step: str, finisher: str) -> None:
    cluster.cli("create", image, "--size", "64M", check=True)
    _attach(cluster, image, mnt)
    (mnt / "before").write_text("kept")
    cluster.cli("detach", image, check=True)
    cp = cluster.cli("attach", image, "--mountpoint", str(mnt), "--backend", "qsd",
                     CEPHVOL_TEST_CRASH_AT=step)
    assert cp.returncode == -signal.SIGKILL, cp.stderr  # the crash point was reached
    m = _backend(cluster).find(parse_spec(image))
    assert m is not None  # the leftover is found from the host alone
    assert bool(m.device) == (step == "qsd-loop")
    assert bool(m.extra["qsd_pid"]) == (step != "qsd-dir")
    if finisher == "detach":
        fin = cluster.cli("detach", image)
        assert fin.returncode == 0, fin.stderr
    else:
        fin = cluster.cli("cleanup", "--json")
        assert fin.returncode == 0, fin.stderr
        rows = {r["image"]: r for r in json.loads(fin.stdout)}
        assert rows[image]["ok"], rows
    _gone(cluster, image)
    assert not os.path.ismount(mnt)
    _attach(cluster, image, mnt)
    assert (mnt / "before").read_text() == "kept"
    cluster.cli("detach", image, check=True)


def _key(cluster: CephCluster) -> str:
    for line in (cluster.conf.parent / "keyring").read_text().splitlines():
        k, _, v = line.partition("=")
        if k.strip() == "key":
            return v.strip()
    raise AssertionError("no key in the dev cluster's keyring")


def test_qsd_key_never_in_argv_or_environment(cluster: CephCluster, image: str) -> None:
    cluster.cli("create", image, "--size", "64M", check=True)
    cluster.cli("map", image, "--backend", "qsd", check=True)
    secret = _key(cluster).encode()
    pid = _daemon_pid(cluster, image)
    argv = Path(f"/proc/{pid}/cmdline").read_bytes()
    assert b'"conf":' in argv and b'"user":"admin"' in argv
    assert secret not in Path(f"/proc/{pid}/environ").read_bytes()
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                assert secret not in Path(f"/proc/{p}/cmdline").read_bytes(), p
            except OSError:
                continue
    cluster.cli("unmap", image, check=True)
    _gone(cluster, image)


def test_qsd_unreachable_monitor_fails_fast(cluster: CephCluster, image: str,
                                            tmp_path: Path) -> None:
    from cephvol.errors import ClusterError
    from cephvol.mapper import MapOptions

    cluster.cli("create", image, "--size", "64M", check=True)
    bad = tmp_path / "ceph.conf"
    bad.write_text("\n".join(("mon host = 127.0.0.1:9" if ln.startswith("mon host") else ln)
                             for ln in cluster.conf.read_text().splitlines()) + "\n")
    b = _backend(cluster, conf=bad, timeout=2.0, state=tmp_path / "state")
    t0 = time.monotonic()
    with pytest.raises(ClusterError, match="could not reach the cluster"):
        b.map(parse_spec(image), MapOptions())
    assert time.monotonic() - t0 < 10  # librbd alone would wait 300 s
    assert b.list_mappings() == []
    assert not any((tmp_path / "state" / "qsd").iterdir())


@pytest.fixture
def holder() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        p.kill()
        p.wait()


def test_qsd_forced_unmap_of_an_open_device(cluster: CephCluster, image: str,
                                            holder: list[subprocess.Popen[bytes]]) -> None:
    """The loop device cannot be torn from its opener: force leaves the
    daemon serving it; the device goes when the opener closes it, and the
    next detach stops the daemon. Until then the image is not mapped again."""
    cluster.cli("create", image, "--size", "64M", check=True)
    dev = cluster.cli("map", image, "--backend", "qsd", check=True).stdout.strip()
    holder.append(subprocess.Popen(["sh", "-c", f"exec 3<{dev}; exec sleep 300"]))
    time.sleep(0.3)
    assert cluster.cli("unmap", image).returncode == 4
    cp = cluster.cli("unmap", "--force", image)
    assert cp.returncode == 0, cp.stderr
    again = cluster.cli("map", image)
    assert again.returncode == 4 and "unmapped by force" in again.stderr, again.stderr
    holder[0].kill()
    holder[0].wait()
    blk = os.path.basename(dev)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and os.path.exists(f"/sys/block/{blk}/loop/backing_file"):
        time.sleep(0.05)
    assert not os.path.exists(f"/sys/block/{blk}/loop/backing_file")
    assert cluster.cli("detach", image).returncode == 0
    _gone(cluster, image)


def test_qsd_abort_cuts_a_daemon_that_does_not_answer_loose(cluster: CephCluster,
                                                           image: str) -> None:
    """Fenced (detach --force after a takeover): abort fails what waits on the
    export, and unmap ends a daemon that would wait forever (SIGSTOPped here)
    within its bound instead of hanging."""
    cluster.cli("create", image, "--size", "64M", check=True)
    dev = cluster.cli("map", image, "--backend", "qsd", check=True).stdout.strip()
    pid = _daemon_pid(cluster, image)
    os.kill(pid, signal.SIGSTOP)
    try:
        b = _backend(cluster)
        m = b.find(parse_spec(image))
        assert m is not None and m.device == dev
        t0 = time.monotonic()
        b.abort(m)
        reader = subprocess.run(["dd", f"if={dev}", "of=/dev/null", "bs=4k", "count=1",
                                 "iflag=direct"], capture_output=True, timeout=30, check=False)
        assert reader.returncode != 0  # failed at once instead of sleeping
        b.unmap(m, force=True)
        assert time.monotonic() - t0 < 20
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    _gone(cluster, image)
