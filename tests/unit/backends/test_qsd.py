"""The qsd backend's discovery and argv, on made-up /proc and /sys trees
(the real daemon, export and loop device are in tests/integration/test_qsd.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cephvol.backends.qsd import QsdBackend
from cephvol.cluster import ClusterConfig
from cephvol.mapper import HostPaths
from cephvol.spec import parse_spec


@pytest.fixture
def b(tmp_path: Path) -> QsdBackend:
    for d in ("proc/self", "sys/block", "state"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "proc/self/mountinfo").write_text("")
    return QsdBackend(HostPaths(tmp_path / "state", sys_root=tmp_path / "sys",
                                proc_root=tmp_path / "proc", dev_root=tmp_path / "dev"),
                      ClusterConfig(Path("/etc/ceph/ceph,x.conf"), "admin", 5.0))


def _daemon(b: QsdBackend, pid: int, spec: str, *, pidfile: bool = True) -> Path:
    d = b.dir_of(parse_spec(spec))
    d.mkdir(parents=True, exist_ok=True)
    (d / "spec").write_text(spec + "\n")
    if pidfile:
        (d / "pid").write_text(f"{pid}\n")
    p = b.paths.proc_root / str(pid)
    p.mkdir()
    (p / "comm").write_text("qemu-storage-da\n")
    (p / "stat").write_text(f"{pid} (qemu-storage-da) S 1 1")
    argv = b.daemon_argv(d, parse_spec(spec), False)
    (p / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    return d


def _loop(b: QsdBackend, n: int, backing: Path, *, autoclear: bool = False) -> None:
    d = b.paths.sys_root / "block" / f"loop{n}"
    (d / "loop").mkdir(parents=True)
    (d / "loop" / "backing_file").write_text(f"{backing}\n")
    (d / "loop" / "autoclear").write_text("1\n" if autoclear else "0\n")
    (d / "dev").write_text(f"7:{n}\n")
    (d / "ro").write_text("0\n")


def _mount(b: QsdBackend, d: Path) -> None:
    mi = b.paths.proc_root / "self" / "mountinfo"
    mi.write_text(mi.read_text() + f"42 27 0:76 / {d}/image rw,nosuid,nodev - fuse /dev/fuse "
                  "rw,user_id=0,group_id=0\n")


def test_a_whole_mapping_is_found_with_its_daemon_export_and_loop(b: QsdBackend) -> None:
    d = _daemon(b, 100, "rbd/ns/img")
    _mount(b, d)
    _loop(b, 3, d / "image")
    (m,) = b.list_mappings()
    assert (m.spec, m.device, m.backend_id) == ("rbd/ns/img", "/dev/loop3", "loop3")
    assert m.extra["qsd_pid"] == 100 and m.extra["export_mounted"]
    assert b.health(m) is None


def test_half_made_mappings_are_reported_so_cleanup_can_finish_them(b: QsdBackend) -> None:
    # a daemon still opening the image: no pid file yet, found by its argv
    starting = _daemon(b, 200, "rbd/a", pidfile=False)
    # a daemon killed under a mounted filesystem: its loop device stays
    killed = _daemon(b, 300, "rbd/b")
    (b.paths.proc_root / "300" / "stat").write_text("300 (qemu-storage-da) Z 1 1")
    _mount(b, killed)
    _loop(b, 5, killed / "image")
    # a bare directory left by a crash before the daemon started
    bare = b.dir_of(parse_spec("rbd/c@s1"))
    bare.mkdir(parents=True)
    (bare / "spec").write_text("rbd/c@s1\n")
    # not ours: a directory without a spec file nor daemon
    (b.root / "garbage").mkdir()
    got = {m.spec: m for m in b.list_mappings()}
    assert set(got) == {"rbd/a", "rbd/b", "rbd/c@s1"}
    assert got["rbd/a"].device == "" and got["rbd/a"].extra["qsd_pid"] == 200
    assert str(starting) == got["rbd/a"].extra["qsd_dir"]
    assert got["rbd/b"].device == "/dev/loop5" and got["rbd/b"].extra["qsd_pid"] is None
    assert "not running" in (b.health(got["rbd/b"]) or "")
    assert got["rbd/c@s1"].device == "" and got["rbd/c@s1"].read_only


def test_a_loop_released_by_a_forced_unmap_is_not_handed_out(b: QsdBackend) -> None:
    d = _daemon(b, 400, "rbd/f")
    _mount(b, d)
    _loop(b, 7, d / "image", autoclear=True)
    (m,) = b.list_mappings()
    assert m.device == "" and m.extra["releasing_loop"] == "loop7"
    from cephvol.errors import Busy

    with pytest.raises(Busy, match="unmapped by force"):
        b.unmap(m)


def test_argv_is_json_without_a_key_and_survives_commas(b: QsdBackend) -> None:
    d = b.root / "with,comma"
    argv = b.daemon_argv(d, parse_spec("rbd/ns/img@snap"), True)
    bd = json.loads(argv[argv.index("--blockdev") + 1])
    ex = json.loads(argv[argv.index("--export") + 1])
    assert bd["conf"] == "/etc/ceph/ceph,x.conf" and bd["user"] == "admin"
    assert (bd["namespace"], bd["image"], bd["snapshot"]) == ("ns", "img", "snap")
    assert bd["read-only"] is True and ex["writable"] is False
    assert ex["mountpoint"] == str(d / "image")
    chardev = argv[argv.index("--chardev") + 1]
    assert f"path={str(d / 'qmp.sock').replace(',', ',,')}," in chardev
    assert not any("key" in a.lower() and "secret" in a.lower() for a in argv)
    assert "--daemonize" in argv and argv[argv.index("--pidfile") + 1] == str(d / "pid")


def test_nothing_under_the_state_dir_means_no_proc_scan(b: QsdBackend) -> None:
    # a daemon of another state dir is not ours
    other = QsdBackend(HostPaths(b.paths.state_dir.parent / "other",
                                 sys_root=b.paths.sys_root, proc_root=b.paths.proc_root),
                       b.cfg)
    _daemon(other, 500, "rbd/x")
    assert b.list_mappings() == []
