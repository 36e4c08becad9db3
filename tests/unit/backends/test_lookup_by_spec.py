"""A lookup by spec (`find`) reads only that spec's directory, mounts and loop
device (issue 15: its cost grew with every volume attached on the host), and
finds exactly what the full scan (`list_mappings`) reports for that spec:
whole, half-made and orphaned mappings, on made-up /proc and /sys trees."""

from __future__ import annotations

from pathlib import Path

import pytest

from cephvol.backends.fuse import FuseBackend
from cephvol.backends.qsd import QsdBackend
from cephvol.cluster import ClusterConfig
from cephvol.hostfs import read_loop_devices
from cephvol.mapper import HostPaths
from cephvol.spec import parse_spec


def _paths(tmp_path: Path) -> HostPaths:
    for d in ("proc/self", "sys/block", "state"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "proc/self/mountinfo").write_text("")
    return HostPaths(tmp_path / "state", sys_root=tmp_path / "sys",
                     proc_root=tmp_path / "proc", dev_root=tmp_path / "dev")


CFG = ClusterConfig(Path("/etc/ceph/ceph.conf"), "admin", 5.0)


def _loop(paths: HostPaths, n: int, backing: Path) -> None:
    d = paths.sys_root / "block" / f"loop{n}"
    (d / "loop").mkdir(parents=True)
    (d / "loop" / "backing_file").write_text(f"{backing}\n")
    (d / "loop" / "autoclear").write_text("0\n")
    (d / "dev").write_text(f"7:{n}\n")
    (d / "ro").write_text("0\n")


def _mount(paths: HostPaths, mountpoint: Path, fstype: str) -> None:
    mi = paths.proc_root / "self" / "mountinfo"
    mi.write_text(mi.read_text() + f"42 27 0:76 / {mountpoint} rw,nosuid,nodev - {fstype} "
                  f"{fstype} rw,user_id=0,group_id=0\n")


def _proc(paths: HostPaths, pid: int, comm: str, argv: list[str], state: str = "S") -> None:
    p = paths.proc_root / str(pid)
    p.mkdir()
    (p / "comm").write_text(comm + "\n")
    (p / "stat").write_text(f"{pid} ({comm}) {state} 1 1")
    (p / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")


def test_loop_devices_by_backing_prefix(tmp_path: Path) -> None:
    paths = _paths(tmp_path)
    _loop(paths, 1, Path("/run/cephvol/qsd/aaaa/image"))
    _loop(paths, 2, Path("/run/cephvol/qsd/bbbb/image (deleted)"))
    _loop(paths, 3, Path("/srv/other/file"))
    every = read_loop_devices(paths.sys_root)
    assert [lo.name for lo in every] == ["loop1", "loop2", "loop3"]
    assert [lo.name for lo in read_loop_devices(paths.sys_root, "/run/cephvol/qsd/")] == [
        "loop1", "loop2"]
    (lo,) = read_loop_devices(paths.sys_root, "/run/cephvol/qsd/bbbb/")
    assert lo == every[1]  # the same record as the full read, "(deleted)" and all
    assert read_loop_devices(paths.sys_root, "/nowhere/") == []


@pytest.fixture
def qsd(tmp_path: Path) -> QsdBackend:
    return QsdBackend(_paths(tmp_path), CFG)


def test_qsd_find_is_the_full_scan_s_answer_for_every_kind_of_mapping(qsd: QsdBackend) -> None:
    paths = qsd.paths
    specs = [f"rbd/v{i}" for i in range(12)]
    for i, spec in enumerate(specs):
        d = qsd.dir_of(parse_spec(spec))
        d.mkdir(parents=True)
        (d / "spec").write_text(spec + "\n")
        if i % 4 != 3:  # every fourth: a daemon still opening (no pid file yet)
            (d / "pid").write_text(f"{1000 + i}\n")
        _proc(paths, 1000 + i, "qemu-storage-da", qsd.daemon_argv(d, parse_spec(spec), False),
              state="Z" if i == 5 else "S")  # 5: killed under its loop
        if i % 4 != 3:
            _mount(paths, d / "image", "fuse")
            _loop(paths, i, d / "image")
    # an orphan: directory of rbd/lost, spec file and daemon gone, loop left
    lost = qsd.dir_of(parse_spec("rbd/lost"))
    lost.mkdir(parents=True)
    _loop(paths, 40, lost / "image")
    listed = {m.spec: m for m in qsd.list_mappings()}
    assert set(listed) == set(specs)
    for spec in specs:
        assert qsd.find(parse_spec(spec)) == listed[spec], spec
    (orphan,) = [m for m in qsd.scan() if not m.spec]
    assert {m.spec for m in qsd.scan() if m.spec} == set(specs)  # one pass shows both
    found = qsd.find(parse_spec("rbd/lost"))
    assert found is not None and found.spec == "rbd/lost" and found.device == "/dev/loop40"
    assert found.extra == orphan.extra
    assert qsd.find(parse_spec("rbd/never")) is None


def test_fuse_find_is_the_full_scan_s_answer(tmp_path: Path) -> None:
    paths = _paths(tmp_path)
    fb = FuseBackend(paths, CFG)
    specs = [f"rbd/v{i}" for i in range(10)]
    for i, spec in enumerate(specs):
        d = fb.fuse_root / parse_spec(spec).key
        d.mkdir(parents=True)
        if i != 4:  # 4: rbd-fuse killed, its loop left
            _proc(paths, 2000 + i, "rbd-fuse", ["rbd-fuse", "-p", "rbd", "-r", f"v{i}",
                                                str(d)])
            _mount(paths, d, "fuse.rbd-fuse")
        if i % 3 == 0:
            _mount(paths, d, "fuse.rbd-fuse")  # protected: the read-only bind on top
        if i != 7:  # 7: half-made, no loop yet
            _loop(paths, i, d / f"v{i}")
    listed = {m.spec: m for m in fb.list_mappings()}
    assert set(listed) == set(specs)
    for spec in specs:
        assert fb.find(parse_spec(spec)) == listed[spec], spec
    assert fb.find(parse_spec("rbd/never")) is None

