"""Host readers on recorded trees, and on the live /proc where it is real."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cephvol.hostfs import (
    find_processes,
    mount_id_of,
    parse_mountinfo,
    pid_alive,
    processes_using,
    read_loop_devices,
    read_mounts,
    read_self,
)

DATA = Path(__file__).resolve().parent.parent / "data"


def test_mountinfo_recorded_with_escaped_space_and_bind_mount() -> None:
    """Recorded while /dev/loop0 (ext4) was mounted at '/tmp/rec/mnt dir'
    and bind-mounted at /tmp/rec/bind."""
    mounts = parse_mountinfo((DATA / "mountinfo" / "loop-ext4-space.txt").read_text())
    loop = [m for m in mounts if m.devnum == (7, 0)]
    assert [m.mountpoint for m in loop] == ["/tmp/rec/mnt dir", "/tmp/rec/bind"]
    assert {(m.fstype, m.source, m.read_only) for m in loop} == {("ext4", "/dev/loop0", False)}
    assert all(m.mount_id > 0 and m.parent_id > 0 for m in mounts)
    assert any(m.mountpoint == "/" for m in mounts)


def test_mountinfo_optional_fields_and_garbage_lines() -> None:
    text = ("36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 shared:7 - ext3 /dev/root "
            "rw,errors=continue\nnot a mountinfo line\n")
    (m,) = parse_mountinfo(text)  # the example line of proc(5), plus junk
    assert (m.mount_id, m.parent_id, m.devnum, m.root) == (36, 35, (98, 0), "/mnt1")
    assert (m.mountpoint, m.fstype, m.source) == ("/mnt/parent", "ext3", "/dev/root")


def test_loop_devices_from_recorded_sysfs() -> None:
    """tests/data/sys-loop comes from tests/data/record-loop-sysfs.sh."""
    (lo,) = read_loop_devices(DATA / "sys-loop")  # the unbound one has no loop/ dir
    assert lo.name == "loop0" and lo.path == "/dev/loop0"
    assert (lo.major, lo.minor, lo.read_only) == (7, 0, True)
    assert lo.backing_file.endswith("/backing file")


def test_missing_sys_root_reads_as_no_loop_devices(tmp_path: Path) -> None:
    assert read_loop_devices(tmp_path / "nope") == []


def test_find_processes_and_holders_on_the_live_proc(tmp_path: Path) -> None:
    marker = str(tmp_path / "marker-arg")
    comm = Path(sys.executable).name[:15]  # the kernel's comm is the exe name, cut at 15
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)", marker],
        cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "up\n"  # exec'd
        assert find_processes(comm, marker) == [child.pid]
        assert find_processes("sleep", marker) == []
        holders = processes_using(under=str(tmp_path))
        assert [(h.pid, h.what) for h in holders] == [(child.pid, "cwd")]
    finally:
        child.kill()
        child.wait()
    assert find_processes(comm, marker) == []
    assert processes_using(under=str(tmp_path)) == []


def test_a_zombie_is_not_alive() -> None:
    child = subprocess.Popen(["true"])
    deadline = time.monotonic() + 5
    while pid_alive(child.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not pid_alive(child.pid), "an exited, unreaped child must read as dead"
    assert os.path.exists(f"/proc/{child.pid}")  # still a zombie: we have not reaped it
    child.wait()
    assert pid_alive(os.getpid())


def test_mount_id_of_names_the_mount_a_path_resolves_to(tmp_path: Path) -> None:
    """Checked against the live mount table: /proc is its own mount, a path
    inside one is on it, a link followed is its target's mount and a link not
    followed is its directory's; through a descriptor of /proc/self too."""
    by_id = {m.mount_id: m for m in read_mounts()}
    assert by_id[mount_id_of("/proc")].mountpoint == "/proc"
    assert by_id[mount_id_of("/proc/self/status")].mountpoint == "/proc"
    link = tmp_path / "to-proc"
    link.symlink_to("/proc")
    assert by_id[mount_id_of(link)].mountpoint == "/proc"
    assert mount_id_of(link, follow=False) == mount_id_of(tmp_path)
    fd = os.open("/proc/self", os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert mount_id_of("/proc", proc_self=fd) == mount_id_of("/proc")
        assert read_self("mountinfo", fd) == Path("/proc/self/mountinfo").read_text()
    finally:
        os.close(fd)
    # a process's cwd, through its /proc magic link
    assert mount_id_of(f"/proc/{os.getpid()}/cwd") == mount_id_of(os.getcwd())
    with pytest.raises(FileNotFoundError):
        mount_id_of(tmp_path / "missing")
