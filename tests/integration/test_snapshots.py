"""Snapshots and clones end to end: the session's real cluster, real
rbd-fuse / qemu-storage-daemon mappings, real ext4 mounts, real FIFREEZE.

Every test that freezes runs writers into the volume; a frozen filesystem
blocks them (uninterruptibly), so each test's teardown thaws the mountpoint
before anything else, whatever happened."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cephvol._os import freeze
from cephvol.backends.qsd import QsdBackend
from cephvol.cluster import ClusterConfig
from cephvol.mapper import HostPaths
from tests.conftest import CephCluster

QSD = QsdBackend(HostPaths(Path("/run/cephvol")), ClusterConfig()).support()
needs_qsd = pytest.mark.skipif(not QSD.ok, reason="snapshots map only through the qsd "
                               f"backend (rbd-fuse cannot open one): {QSD.reason}")


@dataclass
class Vol:
    cluster: CephCluster
    image: str
    mnt: Path
    clones: list[str] = field(default_factory=list)

    def cli(self, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return self.cluster.cli(*args, **kw)  # type: ignore[arg-type]

    def ok(self, *args: str, **env: str) -> dict:
        cp = self.cluster.cli(*args, "--json", **env)
        assert cp.returncode == 0, f"{args} -> {cp.returncode}: {cp.stderr}"
        return json.loads(cp.stdout) if cp.stdout.strip() else {}

    def snaps(self) -> list[str]:
        return [r["name"] for r in self.ok("snap", "ls", self.image)]

    def freeze_records(self) -> list[Path]:
        d = self.cluster.state_dir / "freeze"
        return sorted(d.glob("*.json")) if d.exists() else []


@pytest.fixture
def vol(cluster: CephCluster, image: str, mnt: Path) -> Iterator[Vol]:
    """`image` created (256M), attached with the fuse backend at `mnt`;
    teardown thaws, then removes clones and snapshots (before the image
    fixture removes the image, which refuses while snapshots exist)."""
    v = Vol(cluster, image, mnt)
    cluster.cli("create", image, "--size", "256M", check=True)
    v.ok("attach", image, "--mountpoint", str(mnt), "--backend", "fuse")
    yield v
    if os.path.ismount(mnt):
        with contextlib.suppress(Exception):
            freeze.thaw(mnt)
    for c in v.clones:
        cluster.cli("detach", "--force", "--lazy", c, timeout=180)
        cluster.cli("rm", c, timeout=60)
    cp = cluster.cli("snap", "ls", image, "--json")
    for row in json.loads(cp.stdout) if cp.returncode == 0 else []:
        cluster.cli("detach", "--force", f"{image}@{row['name']}", timeout=120)
        cluster.cli("snap", "rm", f"{image}@{row['name']}", timeout=60)


def _writer(directory: Path, name: str) -> subprocess.Popen[str]:
    """Writes 64 KiB files with fsync, one after another, counting them."""
    script = (f'i=0; while true; do i=$((i+1)); '
              f'dd if=/dev/urandom of="{directory}/{name}$i" bs=64k count=1 conv=fsync '
              f'status=none || exit 1; echo $i > "{directory}/{name}.count"; done')
    return subprocess.Popen(["sh", "-c", script], stdout=subprocess.DEVNULL)


def _count(mnt: Path, name: str) -> int:
    try:
        return int((mnt / f"{name}.count").read_text() or 0)
    except (OSError, ValueError):
        return 0


def _one_write(path: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(["sh", "-c", f'echo x > "{path}" && sync "{path}"'])


# -- consistent snapshot ----------------------------------------------------------


@needs_qsd
def test_consistent_snapshot_with_a_writer_running(vol: Vol, mnt: Path) -> None:
    marker = os.urandom(16).hex()
    (mnt / "marker").write_text(marker)
    os.sync()
    w = _writer(mnt, "w")
    try:
        deadline = time.monotonic() + 20
        while _count(mnt, "w") < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        before = _count(mnt, "w")
        assert before >= 5, "the writer did not get going"
        res = vol.ok("snap", "create", f"{vol.image}@s1")
        assert res["frozen"] is True and res["consistent"] == "filesystem"
        assert res["mountpoint"] == str(mnt)
        assert 0 < res["frozen_ms"] < 30_000
        # the writer goes on after the thaw
        deadline = time.monotonic() + 20
        while _count(mnt, "w") < before + 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _count(mnt, "w") >= before + 5, "writes did not resume after the snapshot"
    finally:
        w.kill()
        w.wait()
    assert vol.freeze_records() == []
    assert vol.snaps() == ["s1"]
    # map the snapshot read-only: the filesystem is clean (no journal to replay)
    m = vol.ok("map", f"{vol.image}@s1", "--backend", "qsd")
    assert m["read_only"] is True
    fsck = subprocess.run(["e2fsck", "-n", "-f", m["device"]], capture_output=True, text=True,
                          timeout=120)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    vol.ok("unmap", f"{vol.image}@s1")
    snap_mnt = mnt.parent / f"{mnt.name}-snap"
    vol.ok("attach", f"{vol.image}@s1", "--backend", "qsd", "--mountpoint", str(snap_mnt))
    try:
        assert (snap_mnt / "marker").read_text() == marker
        synced = _count(snap_mnt, "w")
        assert synced >= before - 1  # every file fsynced before the freeze is there
        for i in range(1, synced + 1):  # ... whole
            assert (snap_mnt / f"w{i}").stat().st_size == 65536
    finally:
        vol.ok("detach", f"{vol.image}@s1")
    snap_mnt.rmdir()


def test_snapshot_of_an_unattached_image_is_plain(cluster: CephCluster, image: str) -> None:
    cluster.cli("create", image, "--size", "64M", check=True)
    cp = cluster.cli("snap", "create", f"{image}@plain", "--json")
    assert cp.returncode == 0, cp.stderr
    res = json.loads(cp.stdout)
    assert res["frozen"] is False and res["consistent"] == "crash"
    assert cluster.cli("snap", "rm", f"{image}@plain").returncode == 0


# -- SIGKILL at each step -----------------------------------------------------------


@pytest.mark.parametrize("step", ["snap-frozen", "snap-created", "snap-thaw"])
def test_killed_cephvol_its_freeze_child_thaws(vol: Vol, mnt: Path, step: str) -> None:
    """cephvol SIGKILLed with the filesystem frozen: its freeze child sees
    the pipe close (and PDEATHSIG) and thaws at once; `cleanup` then only
    drops the journal."""
    cp = vol.cli("snap", "create", f"{vol.image}@k", CEPHVOL_TEST_CRASH_AT=step)
    assert cp.returncode == -9, cp.stderr
    start = time.monotonic()
    w = _one_write(mnt / "after-crash")
    assert w.wait(timeout=10) == 0
    assert time.monotonic() - start < 5
    assert len(vol.freeze_records()) == 1
    assert vol.snaps() == ([] if step == "snap-frozen" else ["k"])
    cp = vol.cli("cleanup", "--json")
    assert cp.returncode == 0, cp.stderr
    assert vol.freeze_records() == []


@pytest.mark.parametrize("step", ["snap-frozen", "snap-created", "snap-thaw"])
def test_killed_with_its_freeze_child_cleanup_thaws(vol: Vol, mnt: Path, step: str) -> None:
    """cephvol and its freeze child both SIGKILLed (a cgroup-wide kill): the
    filesystem stays frozen, writes block, until `cephvol cleanup` thaws it
    from the journal."""
    cp = vol.cli("snap", "create", f"{vol.image}@k", CEPHVOL_TEST_CRASH_AT=f"{step}+holder")
    assert cp.returncode == -9, cp.stderr
    w = _one_write(mnt / "blocked")
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            w.wait(timeout=1.5)  # frozen: the write waits
        cp = vol.cli("cleanup", "--json")
        assert cp.returncode == 0, cp.stderr
        rows = json.loads(cp.stdout)
        assert any(r["image"] == vol.image and r["steps"] == ["thaw"] for r in rows), rows
        assert w.wait(timeout=10) == 0  # thawed: the write completes
    finally:
        with contextlib.suppress(Exception):
            freeze.thaw(mnt)
        w.wait(timeout=30)
    assert vol.freeze_records() == []


@pytest.mark.parametrize("next_command", ["detach", "snap"])
def test_next_command_thaws_a_leftover_freeze(vol: Vol, mnt: Path, next_command: str) -> None:
    cp = vol.cli("snap", "create", f"{vol.image}@k", CEPHVOL_TEST_CRASH_AT="snap-frozen+holder")
    assert cp.returncode == -9
    w = _one_write(mnt / "blocked")
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            w.wait(timeout=1)
        if next_command == "detach":
            # a detach would otherwise hang in syncfs on the frozen filesystem;
            # the blocked writer holds a file open there: detach waits for it
            start = time.monotonic()
            cp = vol.cli("detach", vol.image, timeout=60)
            assert w.wait(timeout=10) == 0
            assert cp.returncode == 0, cp.stderr
            assert time.monotonic() - start < 30
        else:
            res = vol.ok("snap", "create", f"{vol.image}@k2")
            assert res["frozen"] is True
            assert w.wait(timeout=10) == 0
    finally:
        with contextlib.suppress(Exception):
            freeze.thaw(mnt)
        w.wait(timeout=30)
    assert vol.freeze_records() == []


def test_a_freeze_whose_record_was_lost_is_named_by_snap_and_thawed_by_detach(
        vol: Vol, mnt: Path) -> None:
    """Found by a try-to-break session: the snapshot and its freeze helper
    killed together and the freeze record lost (state directory removed)
    left the filesystem frozen for good; the next snapshot failed with a bare
    EBUSY and detach hung in syncfs until its bound, blaming the cluster."""
    cp = vol.cli("snap", "create", f"{vol.image}@k", CEPHVOL_TEST_CRASH_AT="snap-frozen+holder")
    assert cp.returncode == -9
    for rec in vol.freeze_records():
        Path(rec).unlink()
    w = _one_write(mnt / "blocked")
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            w.wait(timeout=1)
        snap = vol.cli("snap", "create", f"{vol.image}@k2")
        assert snap.returncode == 4, snap.stderr
        assert "already frozen" in snap.stderr and "fsfreeze --unfreeze" in snap.stderr
        assert len(snap.stderr.strip().splitlines()) == 1
        start = time.monotonic()
        det = vol.cli("detach", vol.image, timeout=60)
        assert w.wait(timeout=10) == 0
        assert det.returncode == 0, det.stderr
        assert time.monotonic() - start < 30
    finally:
        with contextlib.suppress(Exception):
            freeze.thaw(mnt)
        w.wait(timeout=30)
    assert vol.freeze_records() == []


def test_freeze_never_outlives_its_bound(vol: Vol, mnt: Path) -> None:
    """The freeze child thaws `bound` seconds after the freeze even though
    its parent is alive and never asks (a librbd call stuck on a dead
    cluster looks like this)."""
    h = freeze.FreezeHolder(mnt, 1.0)
    h.freeze(30)
    start = time.monotonic()
    w = _one_write(mnt / "waits")
    try:
        assert w.wait(timeout=10) == 0
        waited = time.monotonic() - start
        assert 0.5 < waited < 3, waited
        assert h.thaw() == "timeout"
    finally:
        h.close()
        freeze.thaw(mnt)


# -- rm, rollback --------------------------------------------------------------------


@needs_qsd
def test_snap_rm_refused_while_mapped(vol: Vol) -> None:
    vol.ok("snap", "create", f"{vol.image}@m")
    dev = vol.ok("map", f"{vol.image}@m", "--backend", "qsd")["device"]
    cp = vol.cli("snap", "rm", f"{vol.image}@m")
    assert cp.returncode == 4
    assert cp.stderr.strip().startswith("cephvol: error: ") and dev in cp.stderr
    assert len(cp.stderr.strip().splitlines()) == 1
    assert vol.snaps() == ["m"]
    vol.ok("unmap", f"{vol.image}@m")
    vol.ok("snap", "rm", f"{vol.image}@m")
    assert vol.snaps() == []


def test_rollback_refused_while_attached_anywhere(vol: Vol, mnt: Path,
                                                  cluster: CephCluster) -> None:
    (mnt / "old").write_text("before")
    vol.ok("snap", "create", f"{vol.image}@r")
    (mnt / "new").write_text("after")
    # attached on this host (journal)
    cp = vol.cli("snap", "rollback", f"{vol.image}@r")
    assert cp.returncode == 4 and "attached on this host" in cp.stderr
    vol.ok("detach", vol.image)
    # attached on another host (its ownership record; another state dir)
    other = cluster.base / f"other-{uuid.uuid4().hex[:6]}"
    other_env = {"CEPHVOL_STATE_DIR": str(other), "CEPHVOL_HOST_ID": "0" * 31 + "1",
                 "CEPHVOL_HOST_NAME": "other"}
    cp = cluster.cli("map", vol.image, "--backend", "fuse", "--json", **other_env)
    assert cp.returncode == 0, cp.stderr
    try:
        cp = vol.cli("snap", "rollback", f"{vol.image}@r")
        assert cp.returncode == 6 and "owned by" in cp.stderr, cp.stderr
    finally:
        assert cluster.cli("unmap", vol.image, **other_env).returncode == 0
    # watched by a client that is not cephvol (a writable librbd open)
    import rados
    import rbd

    with rados.Rados(conffile=str(cluster.conf)) as r, r.open_ioctx("rbd") as io, \
            rbd.Image(io, vol.image.split("/", 1)[1]):
        cp = vol.cli("snap", "rollback", f"{vol.image}@r")
        assert cp.returncode == 4 and "in use" in cp.stderr, cp.stderr
    # nobody: rolled back; the file written after the snapshot is gone
    vol.ok("snap", "rollback", f"{vol.image}@r")
    vol.ok("attach", vol.image, "--mountpoint", str(mnt), "--backend", "fuse")
    assert (mnt / "old").read_text() == "before"
    assert not (mnt / "new").exists()
    owner = vol.ok("owner", vol.image)
    assert owner["this_host"] is True  # owned by the attach, not left by the rollback


# -- clones ----------------------------------------------------------------------------


def test_clone_round_trip(vol: Vol, mnt: Path, cluster: CephCluster) -> None:
    (mnt / "from-parent").write_text("parent data")
    vol.ok("snap", "create", f"{vol.image}@c")
    child = f"rbd/c-{uuid.uuid4().hex[:8]}"
    vol.clones.append(child)
    res = vol.ok("create", child, "--from", f"{vol.image}@c")
    assert res["created"] is True and res["parent"] == f"{vol.image}@c"
    assert vol.ok("create", child, "--from", f"{vol.image}@c")["created"] is False
    assert vol.ok("info", child)["parent"] == f"{vol.image}@c"
    cp = vol.cli("snap", "rm", f"{vol.image}@c")
    assert cp.returncode == 4 and child in cp.stderr
    cmnt = mnt.parent / f"{mnt.name}-clone"
    backends = ["fuse"] + (["qsd"] if QSD.ok else [])
    for i, backend in enumerate(backends):
        a = vol.ok("attach", child, "--mountpoint", str(cmnt), "--backend", backend)
        assert a["backend"] == backend and a["created_filesystem"] is False
        assert (cmnt / "from-parent").read_text() == "parent data"
        if i:
            assert (cmnt / "in-clone").read_text() == "clone data"
        (cmnt / "in-clone").write_text("clone data")
        vol.ok("detach", child)
    assert not (mnt / "in-clone").exists()  # the parent does not see the clone's writes
    res = vol.ok("create", child, "--from", f"{vol.image}@c", "--flatten")
    assert res["flattened"] is True and res["parent"] is None
    assert vol.ok("info", child)["parent"] is None
    vol.ok("snap", "rm", f"{vol.image}@c")  # no clone depends on it any more
    vol.ok("attach", child, "--mountpoint", str(cmnt), "--backend", "fuse")
    assert (cmnt / "in-clone").read_text() == "clone data"
    vol.ok("detach", child)
    cmnt.rmdir()


# -- bad input ---------------------------------------------------------------------------


BAD_INPUT = [
    (["snap", "create", "{img}"], 2),
    (["snap", "create", "{img}@-bad"], 2),
    (["snap", "create", "{img}@a@b"], 2),
    (["snap", "create", "{img}@" + "s" * 97], 2),
    (["snap", "create", "rbd/no-such-image-x@s"], 3),
    (["snap", "rm", "{img}@nope"], 3),
    (["snap", "rm", "{img}"], 2),
    (["snap", "rollback", "{img}@nope"], 3),
    (["snap", "ls", "{img}@s"], 2),
    (["create", "rbd/child-x", "--from", "{img}@nope"], 3),
    (["create", "rbd/child-x", "--from", "rbd/no-such-parent@s"], 3),
    (["create", "rbd/child-x", "--from", "{img}"], 2),
    (["create", "rbd/child-x", "--from", "{img}@s", "--size", "1G"], 2),
    (["create", "rbd/child-x", "--flatten"], 2),
    (["create", "{img}", "--from", "{img}@s"], 5),
    (["snap", "create", "{img}@s"], 5),
    (["snap", "create", "{img}@s2", "--freeze-timeout", "0"], 2),
]


def test_bad_input_one_line_error_changes_nothing(cluster: CephCluster, image: str) -> None:
    """Each case (one image for all, to keep the suite short): the
    documented exit code, one line on stderr, the --json error, and the
    image's snapshots and the would-be clone unchanged."""
    cluster.cli("create", image, "--size", "64M", check=True)
    assert cluster.cli("snap", "create", f"{image}@s").returncode == 0
    try:
        for args, code in BAD_INPUT:
            argv = [a.replace("{img}", image) for a in args]
            cp = cluster.cli(*argv)
            assert cp.returncode == code, (argv, cp.stderr)
            lines = cp.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("cephvol: error: "), (argv, cp.stderr)
            js = cluster.cli(*argv, "--json")
            assert js.returncode == code and json.loads(js.stdout)["exit_code"] == code, argv
            snaps = json.loads(cluster.cli("snap", "ls", image, "--json").stdout)
            assert [s["name"] for s in snaps] == ["s"], argv
            assert cluster.cli("info", "rbd/child-x").returncode == 3, argv
    finally:
        cluster.cli("snap", "rm", f"{image}@s")
