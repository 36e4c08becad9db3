"""Snapshots and clones on krbd (issue 17): cephvol runs inside the qemu guest
against the namespace's cluster; the same round trips as
tests/integration/test_snapshots.py on the fuse path."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable

from tests.vm.conftest import NsCluster
from tests.vm.harness import Guest
from tests.vm.test_krbd_backend import cv, ok


def _json(g: Guest, *args: str) -> dict:
    return json.loads(ok(cv(g, *args, "--json")))


def _refused(g: Guest, code: int, *args: str) -> str:
    r = cv(g, *args)
    assert r.rc == code, (r.rc, r.stderr)
    err = r.stderr.strip()
    assert err.startswith("cephvol: error: ") and len(err.splitlines()) == 1, err
    return err


def test_consistent_snapshot_rollback_and_clone_on_krbd(
        guest_ceph: Guest, vm_image: Callable[[str], str], vm_cluster: NsCluster) -> None:
    g, image = guest_ceph, vm_image("d")
    child = f"rbd/dc-{uuid.uuid4().hex[:8]}"
    try:
        # a writable krbd attach holds the exclusive lock, which the kernel never
        # hands over; librbd needs it to snapshot: refused before any freeze
        ok(cv(g, "attach", image, "--mountpoint", "/mnt/d"))
        err = _refused(g, 4, "snap", "create", f"{image}@s1")
        assert "--no-exclusive" in err
        ok(g.run(["sh", "-c", "echo not-frozen > /mnt/d/f && sync"]))  # not left frozen
        assert json.loads(ok(cv(g, "snap", "ls", image, "--json"))) == []
        ok(cv(g, "detach", image))
        a = _json(g, "attach", image, "--mountpoint", "/mnt/d", "--no-exclusive")
        assert a["backend"] == "krbd" and a["device"].startswith("/dev/rbd")
        ok(g.run(["sh", "-c", "echo v1 > /mnt/d/f && sync"]))
        # attached and mounted: frozen (FIFREEZE on the krbd device's ext4) for the snapshot
        s = _json(g, "snap", "create", f"{image}@s1")
        assert s["frozen"] is True and s["consistent"] == "filesystem"
        assert s["mountpoint"] == "/mnt/d"
        # thawed: writes go on
        ok(g.run(["sh", "-c", "echo v2 > /mnt/d/f && sync"]))
        assert [x["name"] for x in json.loads(ok(cv(g, "snap", "ls", image, "--json")))] == \
            ["s1"]
        assert "attached on this host" in _refused(g, 4, "snap", "rollback", f"{image}@s1")

        # a clone of the snapshot: its own krbd device, the parent's data as of s1
        c = _json(g, "create", child, "--from", f"{image}@s1")
        assert c["created"] is True and c["parent"] == f"{image}@s1"
        assert _json(g, "info", child)["parent"] == f"{image}@s1"
        ca = _json(g, "attach", child, "--mountpoint", "/mnt/dc")
        assert ca["backend"] == "krbd" and ca["created_filesystem"] is False
        assert ca["device"] != a["device"]
        assert ok(g.run(["cat", "/mnt/dc/f"])).strip() == "v1"
        ok(g.run(["sh", "-c", "echo clone > /mnt/dc/g && sync"]))
        assert child in _refused(g, 4, "snap", "rm", f"{image}@s1")  # it has a clone
        ok(cv(g, "detach", child))
        assert g.run(["test", "-e", "/mnt/d/g"]).rc != 0  # the parent never sees it

        # flattened, the clone no longer needs the snapshot
        f = _json(g, "create", child, "--from", f"{image}@s1", "--flatten")
        assert f["flattened"] is True and f["parent"] is None
        ok(cv(g, "snap", "ls", image))

        # rollback once detached: the parent is back at v1
        ok(cv(g, "detach", image))
        ok(cv(g, "snap", "rollback", f"{image}@s1"))
        ok(cv(g, "attach", image, "--mountpoint", "/mnt/d"))
        assert ok(g.run(["cat", "/mnt/d/f"])).strip() == "v1"
        ok(cv(g, "detach", image))
        ok(cv(g, "snap", "rm", f"{image}@s1"))
        assert json.loads(ok(cv(g, "snap", "ls", image, "--json"))) == []

        ok(cv(g, "attach", child, "--mountpoint", "/mnt/dc"))  # flat: its own data
        assert ok(g.run(["cat", "/mnt/dc/f", "/mnt/dc/g"])).split() == ["v1", "clone"]
        ok(cv(g, "detach", child))
        assert ok(g.run(["ls", "/sys/bus/rbd/devices"])).strip() == ""
        assert json.loads(ok(cv(g, "status", "--json"))) == []
    finally:
        g.run(["cephvol", "detach", "--force", child], timeout=120)
        vm_cluster.run(["cephvol", "rm", child])
        vm_cluster.run(["cephvol", "snap", "rm", f"{image}@s1"])


_RAW = """
import sys, rados, rbd
with rados.Rados(conffile=sys.argv[1]) as c, c.open_ioctx("rbd") as io, \\
        rbd.Image(io, sys.argv[2], read_only=True) as img:
    data = img.read(0, img.size())
print(data.startswith(b"LUKS\\xba\\xbe"), sys.argv[3].encode() in data)
"""

# the stored passphrase swapped for a wrong one and back, inside one process
# each way (kept under a side key meanwhile): never on a command line
_KEY = """
import json, sys, rados
conf, key, op = sys.argv[1:]
side = "cephvol-test-saved/" + key
def call(prefix, k, value=b""):
    ret, out, err = c.mon_command(json.dumps({"prefix": prefix, "key": k}), value)
    assert ret == 0, err
    return out
with rados.Rados(conffile=conf) as c:
    if op == "replace":
        call("config-key set", side, call("config-key get", key))
        call("config-key set", key, b"d3Jvbmcga2V5")
    else:
        call("config-key set", key, call("config-key get", side))
        call("config-key rm", side)
"""


def _nothing_mapped(g: Guest) -> None:
    assert ok(g.run(["ls", "/sys/bus/rbd/devices"])).strip() == ""
    assert "dm-" not in ok(g.run(["ls", "/sys/block"]))
    assert json.loads(ok(cv(g, "status", "--json"))) == []


def _crash(g: Guest, *args: str, at: str) -> int:
    return g.run(["env", f"CEPHVOL_TEST_CRASH_AT={at}", "cephvol", *args], timeout=300).rc


def test_encrypted_volume_on_krbd_is_opened_with_dm_crypt(
        guest_ceph: Guest, vm_cluster: NsCluster) -> None:
    """An image librbd encrypted (`create --encrypt`, made in the guest so its
    key derivation is sized for the guest) is opened with cryptsetup on
    /dev/rbdN: the device handed out is /dev/mapper/cephvol-..., the cluster
    holds ciphertext, and every new step's crash is finished by detach."""
    g = guest_ceph
    image = f"rbd/enc-{uuid.uuid4().hex[:8]}"
    marker = f"cephvol-plaintext-{uuid.uuid4().hex}"
    try:
        c = _json(g, "create", image, "--size", "64M", "--encrypt")
        assert c["encrypted"] is True and c["encryption"] == "luks2"
        a = json.loads(ok(cv(g, "attach", image, "--mountpoint", "/mnt/e", "--json",
                             timeout=300)))
        assert a["backend"] == "krbd" and a["encryption"] == "luks2"
        assert a["device"].startswith("/dev/mapper/cephvol-") and a["created_filesystem"]
        ok(g.run(["sh", "-c", f"for i in $(seq 2000); do echo {marker}; done > /mnt/e/m; sync"]))
        (row,) = json.loads(ok(cv(g, "status", "--json")))
        assert row["encryption"] == "luks2" and row["device"] == a["device"]
        assert row["phase"] == "attached" and row["mounted"] is True
        ok(cv(g, "detach", image))
        _nothing_mapped(g)
        luks, plain = vm_cluster.python(_RAW, str(vm_cluster.conf), image.split("/")[1],
                                        marker).split()
        assert (luks, plain) == ("True", "False")  # the OSDs hold ciphertext only

        # killed after the map, before cryptsetup open: the next attach opens it
        assert _crash(g, "attach", image, "--mountpoint", "/mnt/e", at="krbd-map") == -9
        again = json.loads(ok(cv(g, "attach", image, "--mountpoint", "/mnt/e", "--json",
                                 timeout=300)))
        assert again["device"].startswith("/dev/mapper/") and not again["created_filesystem"]
        assert ok(g.run(["head", "-n1", "/mnt/e/m"])).strip() == marker
        # killed between cryptsetup close and the unmap: detach finishes
        assert _crash(g, "detach", image, at="krbd-luks-close") == -9
        assert "dm-" not in ok(g.run(["ls", "/sys/block"]))
        ok(cv(g, "detach", image))
        _nothing_mapped(g)
        # killed after the map again: this time detach finishes it
        assert _crash(g, "attach", image, "--mountpoint", "/mnt/e", at="krbd-map") == -9
        ok(cv(g, "detach", image))
        _nothing_mapped(g)

        # the key in the cluster replaced: a clear error, nothing left mapped
        key = f"cephvol/luks/rbd//{image.split('/')[1]}"
        vm_cluster.python(_KEY, str(vm_cluster.conf), key, "replace")
        try:
            r = cv(g, "attach", image, "--mountpoint", "/mnt/e", timeout=300)
            assert r.rc == 5 and "does not open" in r.stderr, (r.rc, r.stderr)
            assert len(r.stderr.strip().splitlines()) == 1
            _nothing_mapped(g)
        finally:
            vm_cluster.python(_KEY, str(vm_cluster.conf), key, "restore")
        ok(cv(g, "attach", image, "--mountpoint", "/mnt/e", timeout=300))
        assert ok(g.run(["head", "-n1", "/mnt/e/m"])).strip() == marker
        ok(cv(g, "detach", image))
        _nothing_mapped(g)
    finally:
        g.run(["cephvol", "detach", "--force", image], timeout=120)
        vm_cluster.run(["cephvol", "rm", image])
