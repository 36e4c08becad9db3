"""Data-safety defects found by trying to break cephvol (issues 20 and 21), each
reproduced on the real cluster with the fuse backend and asserted fixed.

Host "B" is simulated on this machine: its own host identity and state dir.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cephvol.hostfs import find_processes, pid_alive, process_state, read_mounts
from cephvol.waiting import wait_for
from tests.conftest import CEPHVOL, CephCluster


def _json(cp: subprocess.CompletedProcess[str]) -> dict:
    assert cp.stdout.strip(), cp.stderr
    return json.loads(cp.stdout)


def _attach(cluster: CephCluster, image: str, mnt: Path, *extra: str, **env: str) -> dict:
    cp = cluster.cli("attach", image, "--mountpoint", str(mnt), "--json", "--backend", "fuse",
                     *extra, **env)
    assert cp.returncode == 0, cp.stderr
    return json.loads(cp.stdout)


def _fuse_pid(cluster: CephCluster, image: str, state: Path | None = None) -> int:
    key = image.replace("/", ",-,", 1) if image.count("/") == 1 else image
    fuse_dir = str((state or cluster.state_dir) / "fuse" / key)
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"rbd-fuse") and fuse_dir.encode() in argv:
            return int(pid)
    raise AssertionError(f"no rbd-fuse for {fuse_dir}")


def _nothing_left(cluster: CephCluster, image: str, mnt: Path) -> None:
    """After a refusal or an undone attach: status, showmapped, loops, mounts
    and ownership all show nothing of the volume."""
    st = _json(cluster.cli("status", "--json"))
    assert all(r["image"] != image for r in st), st
    sm = _json(cluster.cli("showmapped", "--json"))
    assert all(m["spec"] != image for m in sm), sm
    loops = subprocess.run(["losetup", "-l", "-n", "-O", "BACK-FILE"], capture_output=True,
                           text=True, check=True).stdout
    assert image.split("/")[-1] not in loops
    assert not os.path.ismount(mnt)
    assert _json(cluster.cli("owner", image, "--json"))["owner"] is None


def _ns_has(pid: int, mountpoint: str) -> bool:
    """Whether the mount namespace of `pid` has a mount at `mountpoint`."""
    try:
        return any(m.mountpoint == mountpoint
                   for m in read_mounts(Path(f"/proc/{pid}/mountinfo")))
    except OSError:
        return False


@contextlib.contextmanager
def _detach_stopped_at(cluster: CephCluster, image: str, step: str
                       ) -> Iterator[Callable[[], tuple[int, str, str]]]:
    """`cephvol detach IMAGE --json`, stopped at `step` (CEPHVOL_TEST_STOP_AT)
    while the body changes the host; the body continues it with the callable
    it gets, which returns (exit code, stdout, stderr). Continued and reaped
    in any case."""
    det = subprocess.Popen([CEPHVOL, "detach", image, "--json"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True,
                           env=cluster.env(CEPHVOL_TEST_STOP_AT=step))

    def go_on() -> tuple[int, str, str]:
        os.kill(det.pid, signal.SIGCONT)
        out, err = det.communicate(timeout=120)
        return det.returncode, out, err

    try:
        assert wait_for(lambda: process_state(det.pid) == "T", timeout=60), det.pid
        yield go_on
    finally:
        if det.poll() is None:
            go_on()


def _wait_dead(pid: int, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.05)
    raise AssertionError(f"pid {pid} still alive")


def test_dead_rbd_fuse_is_never_reported_as_attached_or_detached(
        cluster: CephCluster, image: str, mnt: Path) -> None:
    """Issue 20.1: writes queued behind a killed rbd-fuse are lost; attach,
    status and detach say so (exit 12, "not written"), never "detached"."""
    cluster.cli("create", image, "--size", "128M", check=True)
    _attach(cluster, image, mnt)
    (mnt / "synced").write_text("kept")
    subprocess.run(["sync", "-f", str(mnt)], check=True)
    (mnt / "unsynced").write_bytes(os.urandom(8 << 20))
    pid = _fuse_pid(cluster, image)
    os.kill(pid, signal.SIGKILL)
    _wait_dead(pid)
    again = cluster.cli("attach", image, "--mountpoint", str(mnt), "--json")
    assert again.returncode == 12 and "broken" in json.loads(again.stdout)["error"]
    row = next(r for r in _json(cluster.cli("status", "--json")) if r["image"] == image)
    assert row["phase"] == "broken" and "rbd-fuse is dead" in row["problem"]
    det = cluster.cli("detach", image)
    assert det.returncode == 12 and "not written" in det.stderr and "detached" not in det.stdout
    assert os.path.ismount(mnt), "a refused detach changes nothing"
    forced = cluster.cli("detach", image, "--force", "--json")
    assert forced.returncode == 12, forced.stderr
    assert "lost" in json.loads(forced.stdout)["error"]
    assert not os.path.ismount(mnt)
    # the dead client was fenced on the way out: the volume is usable at once
    res = _attach(cluster, image, mnt)
    assert (mnt / "synced").read_text() == "kept" and res["created_filesystem"] is False
    cluster.cli("detach", image, check=True)


def test_forced_detach_removes_copies_of_a_dead_rbd_fuse_in_other_namespaces(
        cluster: CephCluster, image: str, mnt: Path) -> None:
    """Issue 13.5: a process that made a mount namespace while the volume was
    mounted (as `ip netns exec` does for every command) holds copies of both
    the volume's mount and rbd-fuse's. With rbd-fuse killed, the copy of its
    mount answers ENOTCONN to stat; the forced detach still recognises it by
    that namespace's mount table and unmounts it there (it said "Operation
    not permitted" and left the volume behind)."""
    cluster.cli("create", image, "--size", "64M", check=True)
    _attach(cluster, image, mnt)
    holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private",
                               "sleep", "300"])
    try:
        key = image.replace("/", ",-,", 1)
        fuse_dir = str(cluster.state_dir / "fuse" / key)
        info = Path(f"/proc/{holder.pid}/mountinfo")
        end = time.monotonic() + 30
        while str(mnt) not in info.read_text() and time.monotonic() < end:
            time.sleep(0.05)  # unshare execs sleep once the namespace is made
        assert str(mnt) in info.read_text() and fuse_dir in info.read_text()
        pid = _fuse_pid(cluster, image)
        os.kill(pid, signal.SIGKILL)
        _wait_dead(pid)
        forced = cluster.cli("detach", image, "--force", "--json")
        assert forced.returncode == 12, forced.stdout + forced.stderr
        assert "lost" in json.loads(forced.stdout)["error"]
        left = info.read_text()
        assert str(mnt) not in left and fuse_dir not in left, left
        assert holder.poll() is None, "the namespace's process is not touched"
        _nothing_left(cluster, image, mnt)
    finally:
        holder.kill()
        holder.wait()


def test_a_namespace_made_during_detach_does_not_stop_it(
        cluster: CephCluster, image: str, mnt: Path) -> None:
    """Issue 13.5, found under a saturating cluster load (its `ip netns exec`
    makes a mount namespace per command): a namespace made after detach had
    looked, before its umount, keeps a copy that does not go with ours.
    Detach refused at its last check ("still mounted ... in the mount
    namespace of pid N; not unmapping"), the volume unmounted but mapped.
    Such a late copy, unused, is unmounted as a planned one is; the
    namespace's process lives on."""
    cluster.cli("create", image, "--size", "64M", check=True)
    _attach(cluster, image, mnt)
    (mnt / "kept").write_text("kept")
    other = None
    # stopped after its look and the flush, before its umount
    with _detach_stopped_at(cluster, image, "detach-sync") as go_on:
        try:
            other = subprocess.Popen(["unshare", "--mount", "--propagation", "private",
                                      "sleep", "300"])
            assert wait_for(lambda: _ns_has(other.pid, str(mnt)), timeout=30)
            rc, out, err = go_on()
            assert rc == 0, out + err
            assert json.loads(out)["detached"] is True
            assert not _ns_has(other.pid, str(mnt)) and other.poll() is None
            _nothing_left(cluster, image, mnt)
        finally:
            if other is not None:
                other.kill()
                other.wait()
    _attach(cluster, image, mnt)
    assert (mnt / "kept").read_text() == "kept"
    cluster.cli("detach", image, check=True)


def test_rbd_fuses_copy_taken_into_use_during_detach_stops_it_before_the_unmap(
        cluster: CephCluster, image: str, mnt: Path) -> None:
    """Found by this round's attack: a namespace made while detach ran, with
    a process whose cwd is in rbd-fuse's directory there. The late copy of
    rbd-fuse's mount could not go; detach unmapped anyway, waited on rbd-fuse
    and blamed the cluster (exit 8), and the next detach said "detached"
    while rbd-fuse still held the image. Now: exit 4 naming the process,
    before the unmap; once it is gone, detach finishes."""
    cluster.cli("create", image, "--size", "64M", check=True)
    _attach(cluster, image, mnt)
    fuse_dir = cluster.state_dir / "fuse" / image.replace("/", ",-,", 1)
    other = None
    with _detach_stopped_at(cluster, image, "detach-check-unused") as go_on:
        try:
            # the volume's mount is gone here, rbd-fuse's is not: the namespace
            # copies rbd-fuse's, and its process works in it
            other = subprocess.Popen(["unshare", "--mount", "--propagation", "private",
                                      "sh", "-c", f"cd '{fuse_dir}' && exec sleep 300"])
            assert wait_for(lambda: _ns_has(other.pid, str(fuse_dir)), timeout=30)
            rc, out, err = go_on()
            assert rc == 4, out + err
            assert f"pid {other.pid} (sleep) has its cwd there" in json.loads(out)["error"], out
            row = next(r for r in _json(cluster.cli("status", "--json")) if r["image"] == image)
            assert row["device"], row  # still mapped: nothing was unmapped
        finally:
            if other is not None:
                other.kill()
                other.wait()
    fin = cluster.cli("detach", image, "--json")
    assert fin.returncode == 0, fin.stdout + fin.stderr
    _nothing_left(cluster, image, mnt)
    assert not find_processes("rbd-fuse", str(fuse_dir))


def test_a_copy_covered_by_another_mount_is_named_and_that_mount_left_alone(
        cluster: CephCluster, image: str, mnt: Path) -> None:
    """Found by this round's attack: a tmpfs mounted over a copy of the volume
    in another namespace made detach say "not a mount of the volume any
    more" (exit 3). The copy is still there, under it: exit 4, and the
    tmpfs and what it holds stay."""
    cluster.cli("create", image, "--size", "64M", check=True)
    _attach(cluster, image, mnt)
    other = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         f"mount -t tmpfs cvcover '{mnt}' && echo theirs > '{mnt}/mark' && exec sleep 300"])
    try:
        assert wait_for(lambda: sum(m.mountpoint == str(mnt) for m in read_mounts(
            Path(f"/proc/{other.pid}/mountinfo"))) == 2
            and Path(f"/proc/{other.pid}/comm").read_text().strip() == "sleep", timeout=30)
        det = cluster.cli("detach", image, "--json")
        assert det.returncode == 4, det.stdout + det.stderr
        assert "covered by another mount" in json.loads(det.stdout)["error"]
        mounts = [m for m in read_mounts(Path(f"/proc/{other.pid}/mountinfo"))
                  if m.mountpoint == str(mnt)]
        assert [m.fstype for m in mounts] == ["ext4", "tmpfs"], mounts
        assert Path(f"/proc/{other.pid}/root{mnt}/mark").read_text() == "theirs\n"
    finally:
        other.kill()
        other.wait()
    cluster.cli("detach", image, check=True)
    _nothing_left(cluster, image, mnt)


def test_the_holder_scan_never_waits_on_a_hung_fuse_file(
        cluster: CephCluster, image: str, mnt: Path) -> None:
    """Found under a saturating cluster load: detach's scan for processes
    holding the device stat'ed every open fd of every process; one fd on a
    file of a hung FUSE mount (there a fenced rbd-fuse) put detach into an
    uninterruptible wait for good. Here rbd-fuse is stopped and a process
    holds its image file open: the scan returns at once."""
    cluster.cli("create", image, "--size", "64M", check=True)
    res = _attach(cluster, image, mnt)
    key = image.replace("/", ",-,", 1)
    image_file = cluster.state_dir / "fuse" / key / image.split("/")[-1]
    with open(image_file, "rb") as f:
        holder = subprocess.Popen(["sleep", "300"], stdin=f)
    # a process whose cwd is on the FUSE mount: the scan of another namespace's
    # users, and the check before unmounting a copy there, looked at it by stat
    in_dir = subprocess.Popen(["sleep", "300"], cwd=image_file.parent)
    fuse = next(m for m in read_mounts() if m.mountpoint == str(image_file.parent))
    pid = _fuse_pid(cluster, image)
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(2)  # past FUSE's 1 s attribute cache
        st = os.stat(res["device"])
        scan = subprocess.run(
            [sys.executable, "-c", "import sys; from cephvol.hostfs import processes_using; "
             "print([h.pid for h in processes_using(devnum=(int(sys.argv[1]), "
             "int(sys.argv[2])))])", str(os.major(st.st_rdev)), str(os.minor(st.st_rdev))],
            capture_output=True, text=True, timeout=60)
        assert scan.returncode == 0, scan.stderr
        assert str(holder.pid) not in scan.stdout  # it holds the file, not the device
        ns = subprocess.run(
            [sys.executable, "-c", "import os, sys; from cephvol._os import mountns as m; "
             "d = (int(sys.argv[2]), int(sys.argv[3])); "
             "print([(u.pid, u.what) for u in m.users_in_namespace("
             "os.readlink('/proc/self/ns/mnt'), d)], m.is_mount_of(sys.argv[1], d))",
             str(image_file.parent), str(fuse.major), str(fuse.minor)],
            capture_output=True, text=True, timeout=60)
        assert ns.returncode == 0, ns.stderr
        assert f"({in_dir.pid}, 'cwd')" in ns.stdout and ns.stdout.strip().endswith("True"), \
            ns.stdout
    finally:
        os.kill(pid, signal.SIGCONT)
        for p in (holder, in_dir):
            p.kill()
            p.wait()
    cluster.cli("detach", image, check=True)


def test_cleanup_reports_a_dead_rbd_fuse_as_a_failure(
        cluster: CephCluster, image: str, mnt: Path) -> None:
    cluster.cli("create", image, "--size", "64M", check=True)
    _attach(cluster, image, mnt)
    pid = _fuse_pid(cluster, image)
    os.kill(pid, signal.SIGKILL)
    _wait_dead(pid)
    cp = cluster.cli("cleanup", "--stale", "--json")
    assert cp.returncode == 12, cp.stdout + cp.stderr
    row = next(r for r in json.loads(cp.stdout) if r["image"] == image)
    assert row["ok"] is False and row["exit_code"] == 12
    assert cluster.cli("cleanup", "--stale", "--force").returncode == 12
    assert not os.path.ismount(mnt)


def test_removing_the_state_dir_renames_no_image_and_the_volume_is_adopted(
        cluster: CephCluster, image: str, mnt: Path) -> None:
    """Issues 20.2 and 20.11: `rm -rf` of the state dir passes no unlink to
    rbd-fuse (a read-only bind covers its mount); attach adopts the mapping
    cephvol made, and detach gives the ownership back."""
    # inside the session's directory: the session's leak check and teardown see it
    state = cluster.base / f"state-{uuid.uuid4().hex[:8]}"
    env = {"CEPHVOL_STATE_DIR": str(state)}
    try:
        _state_dir_removal(cluster, image, mnt, state, env)
    finally:
        cluster.cli("detach", "--force", "--lazy", image, **env)
        subprocess.run(["rm", "-rf", str(state)], check=False)


def _state_dir_removal(cluster: CephCluster, image: str, mnt: Path, state: Path,
                       env: dict[str, str]) -> None:
    cluster.cli("create", image, "--size", "64M", check=True)
    dev = _attach(cluster, image, mnt, **env)["device"]
    (mnt / "f").write_text("data")
    rm = subprocess.run(["rm", "-rf", str(state)], capture_output=True, text=True, check=False)
    assert rm.returncode != 0 and "Read-only file system" in rm.stderr
    name = image.split("/")[1]
    ls = _json(cluster.cli("ls", "--json"))
    assert name in ls and not any(n.startswith(".fuse_hidden") for n in ls)
    st = next(r for r in _json(cluster.cli("status", "--json", **env)) if r["image"] == image)
    assert st["phase"] == "unjournalled"
    again = _attach(cluster, image, mnt, **env)
    assert again["device"] == dev and (mnt / "f").read_text() == "data"
    cluster.cli("detach", image, check=True, **env)
    assert _json(cluster.cli("owner", image, "--json"))["owner"] is None
    # journals and locks gone, mapping kept: detach alone also releases
    _attach(cluster, image, mnt, **env)
    subprocess.run(["rm", "-rf", str(state / "volumes"), str(state / "locks")], check=True)
    cluster.cli("detach", image, check=True, **env)
    _nothing_left(cluster, image, mnt)


def test_raw_data_blkid_cannot_name_is_never_formatted(
        cluster: CephCluster, image: str, mnt: Path) -> None:
    """Issue 20.3: data written through the raw device (the --style device /
    `map` use) is no filesystem blkid knows, and must still not be formatted."""
    cluster.cli("create", image, "--size", "64M", check=True)
    dev = cluster.cli("map", image, check=True).stdout.strip()
    payload = os.urandom(1 << 20)
    with open(dev, "r+b", buffering=0) as f:
        f.seek(8 << 20)
        f.write(payload)
        os.fsync(f.fileno())
    cluster.cli("unmap", image, check=True)
    cp = cluster.cli("attach", image, "--mountpoint", str(mnt), "--json")
    err = json.loads(cp.stdout)["error"]
    assert cp.returncode == 10 and "hold data" in err and "nothing left attached" in err, err
    _nothing_left(cluster, image, mnt)
    dev = cluster.cli("map", image, check=True).stdout.strip()
    with open(dev, "rb") as f:
        f.seek(8 << 20)
        assert f.read(len(payload)) == payload
    cluster.cli("unmap", image, check=True)
    res = _attach(cluster, image, mnt, "--force-mkfs")
    assert res["created_filesystem"] is True
    cluster.cli("detach", image, check=True)


def test_mode_mismatch_is_a_conflict(cluster: CephCluster, image: str, mnt: Path) -> None:
    """Issue 20.8."""
    cluster.cli("create", image, "--size", "64M", check=True)
    _attach(cluster, image, mnt)  # makes the filesystem
    cluster.cli("detach", image, check=True)
    _attach(cluster, image, mnt, "--read-only")
    rw = cluster.cli("attach", image, "--mountpoint", str(mnt))
    assert rw.returncode == 5 and "attached read-only here" in rw.stderr
    cluster.cli("detach", image, check=True)
    _attach(cluster, image, mnt)
    ro = cluster.cli("attach", image, "--mountpoint", str(mnt), "--read-only")
    assert ro.returncode == 5 and "attached writable here" in ro.stderr
    assert os.path.ismount(mnt)
    cluster.cli("detach", image, check=True)


def test_names_at_cephs_length_limits(cluster: CephCluster, mnt: Path) -> None:
    """Issue 20.9: 63/63/96/96 characters give real answers, never exit 70."""
    pool, ns, img, snap = "p" * 63, "n" * 63, "i" * 96, "s" * 96
    conf = ["-c", str(cluster.conf)]
    subprocess.run(["ceph", *conf, "osd", "pool", "create", pool, "8", "8"], check=True,
                   capture_output=True, timeout=120)
    try:
        subprocess.run(["rbd", *conf, "pool", "init", pool], check=True, timeout=120)
        subprocess.run(["rbd", *conf, "namespace", "create", f"{pool}/{ns}"], check=True,
                       timeout=60)
        spec = f"{pool}/{ns}/{img}"
        cluster.cli("create", spec, "--size", "64M", check=True)
        _attach(cluster, spec, mnt)
        st = _json(cluster.cli("status", "--json"))
        assert any(r["image"] == spec and r["mounted"] for r in st)
        cluster.cli("detach", spec, check=True)
        subprocess.run(["rbd", *conf, "snap", "create", f"{spec}@{snap}"], check=True,
                       capture_output=True, timeout=60)
        cp = cluster.cli("attach", f"{spec}@{snap}", "--backend", "fuse")
        assert cp.returncode == 9, cp.stderr  # rbd-fuse cannot map snapshots: said so
        assert cluster.cli("detach", f"{spec}@{snap}").returncode == 0
    finally:
        subprocess.run(["ceph", *conf, "osd", "pool", "rm", pool, pool,
                        "--yes-i-really-really-mean-it"], capture_output=True, timeout=120,
                       check=False)


def test_one_corrupt_journal_blocks_no_other_volume(
        cluster: CephCluster, mnt: Path) -> None:
    """Issue 20.10."""
    a, b = (f"rbd/t-{uuid.uuid4().hex[:10]}" for _ in range(2))
    ma, mb = mnt.with_name(mnt.name + "-a"), mnt.with_name(mnt.name + "-b")
    try:
        for spec, m in ((a, ma), (b, mb)):
            cluster.cli("create", spec, "--size", "64M", check=True)
            _attach(cluster, spec, m)
        key = a.replace("/", ",-,", 1)
        journal = cluster.state_dir / "volumes" / f"{key}.json"
        journal.write_bytes(journal.read_bytes()[:50])
        st = cluster.cli("status", "--json")
        assert st.returncode == 0, st.stderr
        rows = json.loads(st.stdout)
        assert any(r["phase"] == "journal-corrupt" for r in rows)
        assert cluster.cli("detach", b).returncode == 0
        assert cluster.cli("attach", b, "--mountpoint", str(mb)).returncode == 0
        # the broken one is still detached from what the host shows, and released
        assert cluster.cli("detach", a).returncode == 0
        assert not os.path.ismount(ma)
        assert _json(cluster.cli("owner", a, "--json"))["owner"] is None
        cl = cluster.cli("cleanup", "--all", "--json")
        assert cl.returncode == 0, cl.stdout
        assert not os.path.ismount(mb)
    finally:
        for spec in (a, b):
            cluster.cli("detach", "--force", spec)
            cluster.cli("rm", spec)
        for p in (cluster.state_dir / "volumes").glob("*.corrupt"):
            p.unlink()


def _owner_oid(cluster: CephCluster, image: str) -> str:
    import rados
    import rbd

    with rados.Rados(conffile=str(cluster.conf)) as r, r.open_ioctx("rbd") as io, \
            rbd.Image(io, image.split("/")[1], read_only=True) as img:
        return f"cephvol_owner.{img.id()}"


@pytest.fixture
def host_b(cluster: CephCluster, tmp_path: Path) -> Iterator[dict[str, str]]:
    env = {"CEPHVOL_HOST_ID": "host-b-test", "CEPHVOL_HOST_NAME": "b",
           "CEPHVOL_STATE_DIR": str(tmp_path / "state-b")}
    yield env
    if (tmp_path / "state-b").exists():
        # whatever B still has attached (fuse or qsd) after a failed test
        from cephvol.spec import spec_from_key

        left = cluster.cli("status", "--json", **env)
        images = {row["image"] for row in (json.loads(left.stdout or "[]")
                                           if left.returncode == 0 else [])}
        images |= {str(spec_from_key(d.name)) for d in (tmp_path / "state-b" / "fuse").glob("*")}
        for name in sorted(images):
            cluster.cli("detach", "--force", "--lazy", name, **env)


def test_another_client_writing_blocks_a_writable_attach(
        cluster: CephCluster, image: str, mnt: Path) -> None:
    """Issue 13.6: a plain librbd client (not cephvol, not the owner) that has
    the image open for writing is named, and the attach changes nothing."""
    import rados
    import rbd

    cluster.cli("create", image, "--size", "64M", check=True)
    pool, name = image.split("/")
    with rados.Rados(conffile=str(cluster.conf)) as r:
        with r.open_ioctx(pool) as ioctx:
            with rbd.Image(ioctx, name) as img:
                img.write(b"x" * 4096, 1 << 20)
                cp = cluster.cli("attach", image, "--mountpoint", str(mnt), "--json")
                assert cp.returncode == 4, cp.stdout + cp.stderr
                err = json.loads(cp.stdout)["error"]
                assert "in use by another client: watched from" in err, err
                _nothing_left(cluster, image, mnt)
                ro = cluster.cli("map", image, "--read-only", check=True)  # readers may
                assert ro.stdout.startswith("/dev/loop")
                cluster.cli("unmap", image, check=True)
    # the writer is gone: the image holds data blkid cannot name, so: exit 10
    cp = cluster.cli("attach", image, "--mountpoint", str(mnt))
    assert cp.returncode == 10, cp.stderr


def test_deleted_owner_record_does_not_allow_a_second_writer(
        cluster: CephCluster, image: str, mnt: Path, host_b: dict[str, str],
        tmp_path: Path) -> None:
    """Issue 21.7: with the ownership record deleted out of band, host B is
    still refused while A's mapping watches the image."""
    cluster.cli("create", image, "--size", "64M", check=True)
    _attach(cluster, image, mnt)
    subprocess.run(["rados", "-c", str(cluster.conf), "-p", "rbd", "rm",
                    _owner_oid(cluster, image)], check=True)
    mb = tmp_path / "mnt-b"
    cp = cluster.cli("attach", image, "--mountpoint", str(mb), **host_b)
    assert cp.returncode == 4 and "in use by another client" in cp.stderr, cp.stderr
    assert not os.path.ismount(mb)
    cluster.cli("detach", image, check=True)


def test_corrupt_owner_record_is_named_and_repairable(
        cluster: CephCluster, image: str, mnt: Path) -> None:
    """Issue 21.8."""
    import rados

    cluster.cli("create", image, "--size", "64M", check=True)
    _attach(cluster, image, mnt)
    oid = _owner_oid(cluster, image)
    with rados.Rados(conffile=str(cluster.conf)) as r, r.open_ioctx("rbd") as io:
        io.write_full(oid, b"garbage written by hand")
    det = cluster.cli("detach", image)
    assert det.returncode == 5 and "--repair" in det.stderr, det.stderr
    assert not os.path.ismount(mnt)
    assert all(r["image"] != image for r in _json(cluster.cli("status", "--json")))
    att = cluster.cli("attach", image, "--mountpoint", str(mnt))
    assert att.returncode == 5 and "corrupt" in att.stderr
    rep = _json(cluster.cli("owner", image, "--repair", "--json"))
    assert rep["repaired"] is True
    assert _json(cluster.cli("owner", image, "--repair", "--json"))["repaired"] is False
    _attach(cluster, image, mnt)
    cluster.cli("detach", image, check=True)


@pytest.mark.parametrize("copy", [False, True], ids=["alone", "copied-in-a-namespace"])
def test_fenced_owners_detach_reports_lost_writes(
        cluster: CephCluster, image: str, mnt: Path, host_b: dict[str, str],
        tmp_path: Path, copy: bool) -> None:
    """Issue 21.9: after B's forced takeover fenced A, A's later writes cannot
    reach the cluster (librbd behind rbd-fuse waits on the fenced connection
    forever); A's detach says so instead of "detached", bounded, and a forced
    detach cuts the dead connection and tears everything down.

    `copied-in-a-namespace` (issue 13, found under a saturating cluster load
    whose `ip netns exec` makes namespaces): another mount namespace holds
    copies of the volume's and rbd-fuse's mounts. Removing the copy checked
    it with a stat, which waited for good on the fenced rbd-fuse, and so did
    detach (it hung past 120 s; now it answers in a fraction of a second)."""
    cluster.cli("create", image, "--size", "64M", check=True)
    _attach(cluster, image, mnt)
    (mnt / "before").write_text("kept")
    subprocess.run(["sync", "-f", str(mnt)], check=True)
    if copy:
        other = subprocess.Popen(["unshare", "--mount", "--propagation", "private",
                                  "sleep", "600"])
        # unshare execs sleep once the namespace is made
        assert wait_for(lambda: _ns_has(other.pid, str(mnt)), timeout=30)
    mb = tmp_path / "mnt-b"
    tk = cluster.cli("attach", image, "--mountpoint", str(mb), "--takeover", "--force",
                     "--takeover-wait", "1", **host_b)
    assert tk.returncode == 0, tk.stderr
    # A's writer runs in a child: I/O through a fenced rbd-fuse sleeps unkillably
    writer = subprocess.Popen(["dd", "if=/dev/zero", f"of={mnt}/after-fence", "bs=1M",
                               "count=4", "status=none"])
    try:
        det = cluster.cli("detach", image, "--json", CEPHVOL_STEP_TIMEOUT="5")
        assert det.returncode == 12, det.stdout + det.stderr
        assert "fenced" in json.loads(det.stdout)["error"]
        forced = cluster.cli("detach", image, "--force", CEPHVOL_STEP_TIMEOUT="10",
                             timeout=180)
        assert forced.returncode == 12 and "not written" in forced.stderr, forced.stderr
        assert not os.path.ismount(mnt)
        assert all(r["image"] != image for r in _json(cluster.cli("status", "--json")))
        if copy:
            assert not _ns_has(other.pid, str(mnt))  # the copies went, the process lives
            assert other.poll() is None
    finally:
        writer.wait(timeout=120)
        if copy:
            other.kill()
            other.wait()
    assert (mb / "before").read_text() == "kept"
    cluster.cli("detach", image, check=True, **host_b)


def test_a_fenced_rbd_fuse_kept_by_a_copy_in_use_is_not_left_running(
        cluster: CephCluster, image: str, mnt: Path, host_b: dict[str, str],
        tmp_path: Path) -> None:
    """Found by this round's attack: after B fenced A, a process in another
    namespace working in A's copy of the volume kept the loop open, so A's
    forced detach let rbd-fuse go lazily, to exit when its last user goes.
    A fenced rbd-fuse never does (its librbd cannot flush): it ran on for
    good, and A's next attach or detach waited on it. It is killed now."""
    cluster.cli("create", image, "--size", "64M", check=True)
    _attach(cluster, image, mnt)
    pid = _fuse_pid(cluster, image)
    other = subprocess.Popen(["unshare", "--mount", "--propagation", "private",
                              "sh", "-c", f"cd '{mnt}' && exec sleep 300"])
    try:
        assert wait_for(lambda: _ns_has(other.pid, str(mnt))
                        and Path(f"/proc/{other.pid}/comm").read_text().strip() == "sleep",
                        timeout=30)
        tk = cluster.cli("attach", image, "--mountpoint", str(tmp_path / "mnt-b"),
                         "--takeover", "--force", "--takeover-wait", "1", **host_b)
        assert tk.returncode == 0, tk.stderr
        forced = cluster.cli("detach", image, "--force", CEPHVOL_STEP_TIMEOUT="10",
                             timeout=180)
        assert forced.returncode == 12 and "fenced" in forced.stderr, forced.stderr
        assert all(r["image"] != image for r in _json(cluster.cli("status", "--json")))
    finally:
        other.kill()
        other.wait()
    assert wait_for(lambda: not pid_alive(pid), timeout=30), f"rbd-fuse {pid} still runs"
    cluster.cli("detach", image, check=True, **host_b)


def test_owner_release_is_idempotent_and_resize_needs_ownership(
        cluster: CephCluster, image: str, mnt: Path, host_b: dict[str, str]) -> None:
    """Issue 21.10."""
    cluster.cli("create", image, "--size", "64M", check=True)
    rel = cluster.cli("owner", image, "--release", "--json")
    assert rel.returncode == 0 and json.loads(rel.stdout)["released"] is False
    _attach(cluster, image, mnt)
    rs = cluster.cli("resize", image, "--size", "128M", **host_b)
    assert rs.returncode == 6, rs.stderr
    assert _json(cluster.cli("info", image, "--json"))["size"] == 64 << 20
    cluster.cli("detach", image, check=True)


def test_repeated_small_online_grows_on_fuse(
        cluster: CephCluster, image: str, mnt: Path) -> None:
    """Issue 21.11: each +4 MiB grow waits for rbd-fuse's new size instead of
    racing it."""
    cluster.cli("create", image, "--size", "64M", check=True)
    _attach(cluster, image, mnt, "--no-exclusive")
    size = 64
    for _ in range(6):
        size += 4
        cp = cluster.cli("resize", image, "--size", f"{size}M", "--json")
        # 9: the device grew but this sandbox lacks CAP_SYS_RESOURCE for an online
        # ext4 grow (said so); never 8, the old "still shows the old size"
        assert cp.returncode == 0 or (cp.returncode == 9 and "CAP_SYS_RESOURCE" in cp.stderr), \
            cp.stderr
        dev = next(r["device"] for r in _json(cluster.cli("status", "--json"))
                   if r["image"] == image)
        blocks = Path(f"/sys/class/block/{Path(dev).name}/size").read_text()
        assert int(blocks) * 512 == size << 20
    cluster.cli("detach", image, check=True)


def test_failed_mount_undoes_the_attach(cluster: CephCluster, image: str, mnt: Path) -> None:
    """Issue 13.2/13.3: a bad mount option is refused with the kernel's reason,
    and the attach leaves nothing behind."""
    cluster.cli("create", image, "--size", "64M", check=True)
    cp = cluster.cli("attach", image, "--mountpoint", str(mnt), "-o", "nosuchopt", "--json")
    err = json.loads(cp.stdout)["error"]
    assert cp.returncode == 11 and "nosuchopt" in err and "nothing left attached" in err, err
    _nothing_left(cluster, image, mnt)


def test_fstype_refusal_is_fast_and_undone(cluster: CephCluster, image: str, mnt: Path) -> None:
    cluster.cli("create", image, "--size", "64M", check=True)
    _attach(cluster, image, mnt)
    cluster.cli("detach", image, check=True)
    start = time.monotonic()
    cp = cluster.cli("attach", image, "--mountpoint", str(mnt), "--fstype", "xfs")
    took = time.monotonic() - start
    assert cp.returncode == 5 and "holds ext4, not xfs" in cp.stderr
    _nothing_left(cluster, image, mnt)
    assert took < 30  # bounded; the speed itself is measured in bench/


def test_cleanup_and_doctor_exit_codes(cluster: CephCluster, image: str, mnt: Path) -> None:
    """Issue 20.6: cleanup's failures and doctor's "no backend" reach the exit code."""
    cp = cluster.cli("doctor", "--offline", "--json", PATH="/nonexistent")
    assert cp.returncode == 9 and json.loads(cp.stdout)["auto_backend"] is None
    cluster.cli("create", image, "--size", "64M", check=True)
    _attach(cluster, image, mnt)
    holder = subprocess.Popen(["sleep", "120"], cwd=mnt)
    try:
        cl = cluster.cli("cleanup", "--all", "--json")
        assert cl.returncode == 4, cl.stdout
        assert any(r["image"] == image and r["exit_code"] == 4 for r in json.loads(cl.stdout))
    finally:
        holder.kill()
        holder.wait()
    cluster.cli("detach", image, check=True)


def _mangle(rng: random.Random, state: Path) -> str:
    """One random act of damage to the state dir; returns what was done."""
    journals = sorted((state / "volumes").glob("*.json")) if (state / "volumes").exists() else []
    acts = ["truncate", "garbage", "wrong-types", "delete", "rm-volumes", "rm-locks",
            "dir-instead"]
    act = rng.choice(acts)
    if act in ("truncate", "garbage", "wrong-types", "delete", "dir-instead") and journals:
        j = rng.choice(journals)
        if act == "truncate":
            j.write_bytes(j.read_bytes()[: rng.randrange(0, 60)])
        elif act == "garbage":
            j.write_bytes(os.urandom(rng.randrange(1, 200)))
        elif act == "wrong-types":
            j.write_text(rng.choice(['[]', '{"spec": 5}', 'null', '{"spec": "rbd/x"}',
                                     '{"spec": "rbd/x", "conf": "/c", "client_id": "a", '
                                     '"extra": "no"}']))
        elif act == "delete":
            j.unlink()
        else:
            j.unlink()
            j.mkdir()
        return f"{act} {j.name}"
    target = state / ("volumes" if act == "rm-volumes" else "locks")
    subprocess.run(["rm", "-rf", str(target)], check=False)
    return act


def test_damaged_state_dir_never_gives_exit_70_or_touches_images(
        cluster: CephCluster, mnt: Path) -> None:
    """Issue 20: random damage to the journal files while volumes are attached:
    no command exits 70, every volume can still be attached and detached, no
    image is renamed or deleted."""
    rng = random.Random(2026_11_28)
    state = cluster.base / f"state-fz-{uuid.uuid4().hex[:6]}"
    env = {"CEPHVOL_STATE_DIR": str(state)}
    specs = [f"rbd/t-{uuid.uuid4().hex[:10]}" for _ in range(3)]
    mps = {s: mnt.with_name(f"{mnt.name}-{i}") for i, s in enumerate(specs)}
    try:
        for s in specs:
            cluster.cli("create", s, "--size", "64M", check=True)
        for _round in range(4):
            for s in specs:
                cp = cluster.cli("attach", s, "--mountpoint", str(mps[s]), **env)
                assert cp.returncode == 0, cp.stderr
            done = [_mangle(rng, state) for _ in range(rng.randrange(1, 4))]
            for cmd in (["status", "--json"], ["cleanup", "--stale", "--json"]):
                cp = cluster.cli(*cmd, **env)
                assert cp.returncode != 70, (done, cp.stdout, cp.stderr)
            for s in specs:
                cp = cluster.cli("attach", s, "--mountpoint", str(mps[s]), **env)
                assert cp.returncode in (0, 2, 5, 11), (done, cp.stderr)
                cp = cluster.cli("detach", s, **env)
                if cp.returncode != 0:  # e.g. a journal path made a directory
                    assert cp.returncode != 70, (done, cp.stderr)
                    for p in (state / "volumes").glob("*"):
                        if p.is_dir():
                            p.rmdir()
                    cp = cluster.cli("detach", s, **env)
                assert cp.returncode == 0, (done, cp.stderr)
                assert not os.path.ismount(mps[s])
            names = _json(cluster.cli("ls", "--json"))
            assert all(s.split("/")[1] in names for s in specs), (done, names)
            assert not any(n.startswith(".fuse_hidden") for n in names)
            for s in specs:
                assert _json(cluster.cli("owner", s, "--json"))["owner"] is None, done
    finally:
        for s in specs:
            cluster.cli("detach", "--force", "--lazy", s, **env)
            cluster.cli("rm", s)
        subprocess.run(["rm", "-rf", str(state)], check=False)


@pytest.mark.parametrize("args", [
    ["attach", "bad spec!"], ["attach", "rbd/no-such-image-x", "--mountpoint", "/x/y"],
    ["attach", "rbd/x", "--mountpoint", "relative"], ["info", "rbd/no-such-image-x"],
    ["create", "rbd/x", "--size", "0"], ["ls", "no-such-pool"], ["owner", "rbd/no-such-x"],
    ["resize", "rbd/no-such-x", "--size", "1G"], ["detach", "a/b/c/d"],
    ["map", "rbd/x", "--lock-timeout", "5"], ["--conf", "/nonexistent.conf", "ls"],
    ["cleanup", "--stale"], ["doctor", "--offline"], ["showmapped"], ["status"],
])
def test_json_errors_and_exit_codes_agree(cluster: CephCluster, args: list[str]) -> None:
    """For every command: the process exit code is the one `--json` reports,
    and an error is one line on stderr, never a traceback."""
    cp = cluster.cli(*args, "--json")
    assert cp.returncode != 70, cp.stderr
    assert "Traceback" not in cp.stderr
    if cp.returncode == 0:
        json.loads(cp.stdout)
        return
    body = json.loads(cp.stdout)
    assert body["exit_code"] == cp.returncode and "\n" not in body["error"]
    assert len(cp.stderr.strip().splitlines()) == 1, cp.stderr


@pytest.mark.parametrize("backend", ["fuse", "qsd"])
def test_read_only_attach_with_a_stopped_osd_is_bounded(
        cluster: CephCluster, image: str, mnt: Path, backend: str) -> None:
    """Issue 20.7: an OSD that does not answer (SIGSTOP) must not leave a
    read-only attach asleep unkillably on the FUSE file: every step that
    touches it runs in a child under the step bound, and the attach comes
    back with exit 8, leaving nothing mapped."""
    from cephvol.devcluster import DevCluster

    cluster.cli("create", image, "--size", "64M", check=True)
    _attach(cluster, image, mnt)  # a filesystem to mount read-only later
    cluster.cli("detach", image, check=True)
    osd = DevCluster(cluster.conf.parent).pid_of("osd.0")
    assert osd
    # the OSD is let go after 100 s whatever happens (the attach must have
    # ended by 90 s): a stopped OSD must never outlive this test
    wake = threading.Timer(100, os.kill, (osd, signal.SIGCONT))
    os.kill(osd, signal.SIGSTOP)
    wake.start()
    try:
        t0 = time.monotonic()
        cp = cluster.cli("attach", image, "--mountpoint", str(mnt), "--read-only",
                         "--backend", backend, timeout=170, CEPHVOL_STEP_TIMEOUT="5",
                         CEPHVOL_CONNECT_TIMEOUT="4")
        took = time.monotonic() - t0
    finally:
        wake.cancel()
        os.kill(osd, signal.SIGCONT)
        # the continued OSD catches up before anything else asks it (under a
        # saturating load that took minutes, and later tests timed out on it)
        DevCluster(cluster.conf.parent).wait_writable(timeout=300)
    assert cp.returncode in (7, 8), cp.stderr
    assert len(cp.stderr.strip().splitlines()) == 1 and "Traceback" not in cp.stderr
    assert took < 90, took
    assert not os.path.ismount(mnt)
    assert all(r["image"] != image for r in _json(cluster.cli("status", "--json")))
    # with the OSD back, the same attach works
    ok = cluster.cli("attach", image, "--mountpoint", str(mnt), "--read-only",
                     "--backend", backend, timeout=170)
    assert ok.returncode == 0, ok.stderr
    cluster.cli("detach", image, check=True)


def test_a_refused_detach_changes_nothing(cluster: CephCluster, image: str, mnt: Path) -> None:
    """A detach refused because a process uses the volume leaves it attached
    (not "detaching"), so `cleanup --stale` (boot/shutdown) leaves it alone."""
    cluster.cli("create", image, "--size", "64M", check=True)
    _attach(cluster, image, mnt)
    holder = subprocess.Popen(["sleep", "60"], cwd=mnt)
    try:
        assert cluster.cli("detach", image).returncode == 4
    finally:
        holder.kill()
        holder.wait()
    row = next(r for r in _json(cluster.cli("status", "--json")) if r["image"] == image)
    assert row["phase"] == "attached", row
    stale = cluster.cli("cleanup", "--stale", "--json")
    assert stale.returncode == 0 and json.loads(stale.stdout) == [], stale.stdout
    assert os.path.ismount(mnt)
    cluster.cli("detach", image, check=True)


@pytest.mark.parametrize("backend", ["fuse", "qsd"])
def test_a_stopped_mapping_daemon_is_named_not_blamed_on_the_cluster(
        cluster: CephCluster, image: str, mnt: Path, backend: str) -> None:
    """Found by a try-to-break session: with its daemon SIGSTOPped the volume
    showed "attached", and detach waited its step bound, then blamed the
    cluster. Now status says "stalled" and why, detach refuses at once
    naming the pid and changes nothing; once continued, it detaches and
    nothing is lost."""
    cluster.cli("create", image, "--size", "64M", check=True)
    cp = cluster.cli("attach", image, "--mountpoint", str(mnt), "--json", "--backend", backend)
    assert cp.returncode == 0, cp.stderr
    (mnt / "kept").write_text("written before the stop")
    m = next(r for r in _json(cluster.cli("showmapped", "--json")) if r["spec"] == image)
    pid = int(m["extra"]["fuse_pid" if backend == "fuse" else "qsd_pid"])
    os.kill(pid, signal.SIGSTOP)
    try:
        row = next(r for r in _json(cluster.cli("status", "--json")) if r["image"] == image)
        assert row["phase"] == "stalled" and f"kill -CONT {pid}" in row["problem"], row
        t0 = time.monotonic()
        det = cluster.cli("detach", image, CEPHVOL_STEP_TIMEOUT="30")
        assert time.monotonic() - t0 < 15
        assert det.returncode == 11 and f"pid {pid}) is stopped" in det.stderr, det.stderr
        assert len(det.stderr.strip().splitlines()) == 1
        assert os.path.ismount(mnt)
        row = next(r for r in _json(cluster.cli("status", "--json")) if r["image"] == image)
        assert row["phase"] == "stalled", row
    finally:
        os.kill(pid, signal.SIGCONT)
    cluster.cli("detach", image, check=True)
    cluster.cli("attach", image, "--mountpoint", str(mnt), "--backend", backend, check=True)
    assert (mnt / "kept").read_text() == "written before the stop"
    cluster.cli("detach", image, check=True)
