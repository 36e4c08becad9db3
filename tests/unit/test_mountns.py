"""Who uses a volume in another mount namespace, and which container that is,
read from /proc-shaped trees (the real ones are exercised in tests/vm)."""

from __future__ import annotations

import json
from pathlib import Path

from cephvol._os.mountns import User, container_of, users_in_namespace
from cephvol.hostfs import mount_id_of, read_mounts

CID = "a" * 64
PID_ = "b" * 64
MOUNTINFO = ("400 399 0:50 / / rw - overlay overlay rw\n"
             "402 401 7:0 / /host-srv/app rw - ext4 /dev/loop0 rw\n")


def _proc(root: Path, pid: int, *, ns: str = "mnt:[9]", comm: str = "sh",
          cgroup: str = "0::/\n", argv: list[str] | None = None,
          fd_mnt_ids: tuple[int, ...] = (), maps: str = "", cwd: Path | None = None,
          mountinfo: str = MOUNTINFO) -> None:
    d = root / str(pid)
    (d / "ns").mkdir(parents=True)
    (d / "ns" / "mnt").symlink_to(ns)
    (d / "comm").write_text(comm + "\n")
    (d / "cgroup").write_text(cgroup)
    (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in (argv or [comm])) + b"\0")
    (d / "mountinfo").write_text(mountinfo)
    (d / "maps").write_text(maps)
    (d / "fdinfo").mkdir()
    for i, mid in enumerate(fd_mnt_ids):
        (d / "fdinfo" / str(i)).write_text(f"pos:\t0\nflags:\t02\nmnt_id:\t{mid}\n")
    (d / "cwd").symlink_to(cwd or "/nonexistent")


def test_open_files_count_by_the_mount_they_were_opened_through(tmp_path: Path) -> None:
    _proc(tmp_path, 10, fd_mnt_ids=(400,))  # a file on the container's root: not a user
    _proc(tmp_path, 11, comm="tail", fd_mnt_ids=(400, 402))  # one through the copy
    _proc(tmp_path, 12, ns="mnt:[1]", fd_mnt_ids=(402,))  # another namespace: not asked
    _proc(tmp_path, 13, comm="app",
          maps="7f00-7f01 r--p 00000000 07:00 12 /host-srv/app/lib.so\n")
    assert sorted(users_in_namespace("mnt:[9]", (7, 0), tmp_path), key=lambda u: u.pid) == [
        User(11, "tail", "open file"), User(13, "app", "mapped file")]


def test_a_cwd_on_the_filesystem_is_a_user(tmp_path: Path) -> None:
    """The cwd counts by the mount it resolves to (the real mount tmp_path is
    on, written into the namespace's table), not by a stat of it."""
    here = tmp_path / "somewhere"
    here.mkdir()
    real = next(m for m in read_mounts() if m.mount_id == mount_id_of(here))
    table = MOUNTINFO + f"{real.mount_id} 1 {real.major}:{real.minor} / /x rw - ext4 /dev/x rw\n"
    _proc(tmp_path / "proc", 20, cwd=here, mountinfo=table)
    _proc(tmp_path / "proc", 21, cwd=Path("/proc"), mountinfo=table)  # another mount
    _proc(tmp_path / "proc", 22, ns="mnt:[8]", cwd=here, mountinfo=table)  # not asked
    assert users_in_namespace("mnt:[9]", (real.major, real.minor), tmp_path / "proc") == [
        User(20, "sh", "cwd")]


def test_docker_and_podman_containers_are_named(tmp_path: Path) -> None:
    proc, data = tmp_path / "proc", tmp_path / "docker"
    (data / "containers" / CID).mkdir(parents=True)
    (data / "containers" / CID / "config.v2.json").write_text(json.dumps({"Name": "/agent"}))
    _proc(proc, 1, comm="dockerd", argv=["/usr/sbin/dockerd", "--data-root", str(data)])
    _proc(proc, 2, comm="conmon", argv=["/usr/bin/conmon", "--api-version", "1", "-c", PID_,
                                        "-u", PID_, "-n", "monitor"])
    _proc(proc, 30, cgroup=f"0::/system.slice/docker-{CID}.scope\n")
    _proc(proc, 31, cgroup=f"0::/machine.slice/libpod-{PID_}.scope/container\n")
    _proc(proc, 32, cgroup=f"0::/docker/{'c' * 64}\n")  # cgroupfs driver, no record
    _proc(proc, 33)
    assert container_of(30, proc) == "docker container agent"
    assert container_of(31, proc) == "podman container monitor"
    assert container_of(32, proc) == f"docker container {'c' * 12}"
    assert container_of(33, proc) is None
    assert container_of(99, proc) is None
