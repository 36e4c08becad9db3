"""The krbd backend on a real kernel: cephvol runs inside the qemu guest."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.vm.conftest import CEPHVOL, NsCluster
from tests.vm.harness import Guest, GuestResult

_SNAP = """
import sys, rados, rbd
with rados.Rados(conffile=sys.argv[1]) as c, c.open_ioctx("rbd") as io, \\
        rbd.Image(io, sys.argv[2]) as img:
    img.create_snap(sys.argv[3])
"""


def cv(g: Guest, *args: str, timeout: float = 120) -> GuestResult:
    return g.run(["cephvol", *args], timeout=timeout)


def ok(r: GuestResult) -> str:
    assert r.rc == 0, r.stderr
    return r.stdout


@pytest.fixture
def image(vm_image: Callable[[str], str]) -> str:
    return vm_image("k")


def test_map_is_idempotent_reported_and_keeps_the_key_out_of_sysfs(
        guest_ceph: Guest, image: str, vm_cluster: NsCluster) -> None:
    m = json.loads(ok(cv(guest_ceph, "map", image, "--backend", "krbd", "--json")))
    assert m["backend"] == "krbd" and m["device"].startswith("/dev/rbd")
    again = json.loads(ok(cv(guest_ceph, "map", image, "--json")))  # auto picks krbd here
    assert again["device"] == m["device"] and again["already_attached"]
    rows = json.loads(ok(cv(guest_ceph, "showmapped", "--json")))
    (row,) = [r for r in rows if r["spec"] == image]
    assert row["backend"] == "krbd" and row["device"] == m["device"]
    dev_id = row["backend_id"]
    assert ok(guest_ceph.run(["cat", f"/sys/bus/rbd/devices/{dev_id}/name"])).strip() == \
        image.split("/")[1]
    key = vm_cluster.admin_key()
    config_info = ok(guest_ceph.run(["cat", f"/sys/bus/rbd/devices/{dev_id}/config_info"]))
    assert "key=client.admin" in config_info and key not in config_info
    ok(cv(guest_ceph, "unmap", image))
    assert ok(guest_ceph.run(["ls", "/sys/bus/rbd/devices"])).strip() == ""
    assert "not mapped" in ok(cv(guest_ceph, "unmap", image))


def test_attach_write_detach_attach_verify(guest_ceph: Guest, image: str) -> None:
    data = os.urandom(3 << 20)
    guest_ceph.put("/root/payload", data)
    ok(cv(guest_ceph, "attach", image, "--mountpoint", "/mnt/v"))
    ok(guest_ceph.run(["cp", "/root/payload", "/mnt/v/payload"]))
    ok(cv(guest_ceph, "detach", image))
    assert guest_ceph.run(["mountpoint", "-q", "/mnt/v"]).rc != 0
    dev = ok(cv(guest_ceph, "attach", image, "--mountpoint", "/mnt/v")).strip()
    assert dev.startswith("/dev/rbd")
    got = ok(guest_ceph.run(["sha256sum", "/mnt/v/payload"])).split()[0]
    assert got == hashlib.sha256(data).hexdigest()
    ok(cv(guest_ceph, "detach", image))


def test_read_only_and_snapshot_mappings(guest_ceph: Guest, image: str,
                                         vm_cluster: NsCluster) -> None:
    ok(cv(guest_ceph, "attach", image, "--mountpoint", "/mnt/s"))
    ok(guest_ceph.run(["sh", "-c", "echo before-snap > /mnt/s/f"]))
    ok(cv(guest_ceph, "detach", image))
    vm_cluster.python(_SNAP, str(vm_cluster.conf), image.split("/")[1], "s1")
    ok(guest_ceph.run(["sh", "-c", "true"]))
    snap = json.loads(ok(cv(guest_ceph, "attach", f"{image}@s1", "--mountpoint", "/mnt/snap",
                            "--json")))
    assert snap["read_only"] and snap["backend"] == "krbd"
    assert ok(guest_ceph.run(["cat", "/mnt/snap/f"])).strip() == "before-snap"
    w = guest_ceph.run(["sh", "-c", "echo x > /mnt/snap/g"])
    assert w.rc != 0 and "Read-only" in w.stderr
    ok(cv(guest_ceph, "detach", f"{image}@s1"))
    ro = json.loads(ok(cv(guest_ceph, "map", image, "--read-only", "--json")))
    assert ro["read_only"]
    blk = os.path.basename(ro["device"])
    assert ok(guest_ceph.run(["cat", f"/sys/block/{blk}/ro"])).strip() == "1"
    w = guest_ceph.run(["dd", "if=/dev/zero", f"of={ro['device']}", "bs=4k", "count=1",
                        "oflag=direct"])
    assert w.rc != 0
    ok(cv(guest_ceph, "unmap", image))


def test_open_device_refuses_unmap_until_forced(guest_ceph: Guest, image: str) -> None:
    dev = ok(cv(guest_ceph, "map", image)).strip()
    ok(guest_ceph.run(["systemd-run", "--unit=cvholder", "--collect", "sh", "-c",
                       f"exec 3<{dev}; exec sleep 300"]))
    try:
        guest_ceph.run(["sh", "-c", f"for i in $(seq 50); do fuser -s {dev} && exit 0; "
                                    "sleep 0.1; done; true"])
        r = cv(guest_ceph, "unmap", image)
        assert r.rc == 4 and "is open by pid" in r.stderr and "(sleep)" in r.stderr, r.stderr
        assert ok(guest_ceph.run(["test", "-b", dev])) == ""
        ok(cv(guest_ceph, "unmap", image, "--force"))
        assert ok(guest_ceph.run(["ls", "/sys/bus/rbd/devices"])).strip() == ""
    finally:
        guest_ceph.run(["systemctl", "stop", "cvholder"])


_SECOND_EXCLUSIVE = """
import errno, sys
from pathlib import Path
from cephvol.backends.krbd import SysfsRbd
mon, pool, image = sys.argv[1:4]
try:
    # a second kernel client (noshare) asking for the same image's exclusive lock
    SysfsRbd(Path("/sys")).add(f"{mon} name=admin,key=client.admin,noshare,exclusive,"
                               f"lock_timeout=5 {pool} {image} -")
except Exception as exc:
    print(type(exc).__name__, exc)
    sys.exit(3)
print("mapped")
"""


def test_exclusive_mapping_refuses_a_second_writer(guest_ceph: Guest, image: str,
                                                   vm_cluster: NsCluster) -> None:
    m = json.loads(ok(cv(guest_ceph, "map", image, "--exclusive", "--json")))
    assert "exclusive" in ok(guest_ceph.run(
        ["cat", f"/sys/bus/rbd/devices/{m['backend_id']}/config_info"]))
    r = guest_ceph.run(["python3", "-c", _SECOND_EXCLUSIVE, vm_cluster.mon_v1(), "rbd",
                        image.split("/")[1]], timeout=60)
    assert r.rc == 3, r.stdout + r.stderr
    ok(cv(guest_ceph, "unmap", image))


def test_online_resize_of_mounted_ext4_on_krbd(guest_ceph: Guest, image: str) -> None:
    # the default exclusive mapping keeps the lock librbd needs to resize
    ok(cv(guest_ceph, "attach", image, "--mountpoint", "/mnt/r"))
    refused = cv(guest_ceph, "resize", image, "--size", "192M")
    assert refused.rc == 4 and "--no-exclusive" in refused.stderr, refused.stderr
    ok(cv(guest_ceph, "detach", image))
    ok(cv(guest_ceph, "attach", image, "--mountpoint", "/mnt/r", "--no-exclusive"))
    before = int(ok(guest_ceph.run(["stat", "-f", "-c", "%b", "/mnt/r"])))
    res = json.loads(ok(cv(guest_ceph, "resize", image, "--size", "192M", "--json")))
    assert res["changed"] and res["filesystem_grown"]
    after = int(ok(guest_ceph.run(["stat", "-f", "-c", "%b", "/mnt/r"])))
    assert after > 2.5 * before
    blk = os.path.basename(res["device"])
    assert int(ok(guest_ceph.run(["cat", f"/sys/block/{blk}/size"]))) * 512 == 192 << 20
    ok(cv(guest_ceph, "detach", image))


def test_writable_attach_owns_the_volume_and_maps_exclusive(
        guest_ceph: Guest, image: str, vm_cluster: NsCluster, tmp_path: Path) -> None:
    """krbd: ownership in the cluster plus the kernel's own guard (exclusive,
    added by cephvol when the image has the exclusive-lock feature)."""
    m = json.loads(ok(cv(guest_ceph, "attach", image, "--mountpoint", "/mnt/o", "--json")))
    config_info = ok(guest_ceph.run(
        ["cat", f"/sys/bus/rbd/devices/{m['backend_id']}/config_info"]))
    assert "exclusive" in config_info.split()[1].split(","), config_info
    machine_id = ok(guest_ceph.run(["cat", "/etc/machine-id"])).strip()
    own = json.loads(vm_cluster.cli("owner", image, "--json"))["owner"]
    assert own["host_id"] == machine_id and own["addrs"]
    # another host -- this machine, in the cluster's network namespace, with
    # its own machine-id and state -- is refused before it changes anything
    state = tmp_path / "state"
    other = vm_cluster.run([CEPHVOL, "--state-dir", str(state), "attach", image,
                            "--mountpoint", str(tmp_path / "m")])
    try:
        assert other.returncode == 6 and f"(id {machine_id})" in other.stderr, other.stderr
        assert not (tmp_path / "m").exists()
    finally:
        if other.returncode == 0:
            vm_cluster.run([CEPHVOL, "--state-dir", str(state), "detach", image])
    ok(cv(guest_ceph, "detach", image))
    assert json.loads(vm_cluster.cli("owner", image, "--json"))["owner"] is None


_HOLD_OPEN = """
import sys, rados, rbd
with rados.Rados(conffile=sys.argv[1]) as c, c.open_ioctx("rbd") as io, \\
        rbd.Image(io, sys.argv[2]) as img:
    img.write(b"x" * 4096, 1 << 20)
    img.flush()
    print("open", flush=True)
    sys.stdin.read()  # holds the image open (and its watch) until stdin closes
"""


def test_a_writer_on_another_host_blocks_a_writable_krbd_attach(
        guest_ceph: Guest, image: str, vm_cluster: NsCluster) -> None:
    """Issue 13.6 on a real kernel: another host (this machine, in the
    cluster's network namespace) has the image open with librbd and wrote to
    it. krbd in the guest would take the exclusive lock from that live writer
    (its writes then fail); cephvol refuses instead, naming the client, and
    maps nothing. A read-only map is still allowed; without the writer the
    image holds data blkid cannot name, so a writable attach refuses to
    format it (exit 10)."""
    holder = subprocess.Popen(
        vm_cluster.netns.exec_argv([sys.executable, "-c", _HOLD_OPEN, str(vm_cluster.conf),
                                    image.split("/")[1]]),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open", \
            holder.stderr.read() if holder.stderr else ""
        r = cv(guest_ceph, "attach", image, "--mountpoint", "/mnt/w", "--json")
        assert r.rc == 4, r.stdout + r.stderr
        err = json.loads(r.stdout)["error"]
        assert "in use by another client: watched from" in err, err
        assert ok(guest_ceph.run(["ls", "/sys/bus/rbd/devices"])).strip() == ""
        assert json.loads(vm_cluster.cli("owner", image, "--json"))["owner"] is None
        ro = json.loads(ok(cv(guest_ceph, "map", image, "--read-only", "--json")))
        assert ro["device"].startswith("/dev/rbd") and ro["read_only"]
        ok(cv(guest_ceph, "unmap", image))
    finally:
        if holder.stdin:
            holder.stdin.close()
        holder.wait(timeout=60)
    r = cv(guest_ceph, "attach", image, "--mountpoint", "/mnt/w")
    assert r.rc == 10, r.stderr
    assert ok(guest_ceph.run(["ls", "/sys/bus/rbd/devices"])).strip() == ""
