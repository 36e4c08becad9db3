"""The nbd backend (rbd-nbd) on the guest's real kernel, which has nbd.ko."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable

import pytest

from tests.vm.conftest import NsCluster
from tests.vm.harness import Guest
from tests.vm.test_krbd_backend import _SNAP, cv, ok


@pytest.fixture
def nbd_image(vm_image: Callable[[str], str]) -> str:
    return vm_image("n")


def test_nbd_map_idempotent_attach_round_trip_and_snapshot(
        guest_ceph: Guest, nbd_image: str, vm_cluster: NsCluster) -> None:
    m = json.loads(ok(cv(guest_ceph, "map", nbd_image, "--backend", "nbd", "--json")))
    assert m["backend"] == "nbd" and m["device"].startswith("/dev/nbd")
    again = json.loads(ok(cv(guest_ceph, "map", nbd_image, "--backend", "nbd", "--json")))
    assert again["device"] == m["device"]
    rows = json.loads(ok(cv(guest_ceph, "showmapped", "--json")))
    assert [r["device"] for r in rows if r["spec"] == nbd_image] == [m["device"]]
    # the key is in no process's argv (rbd-nbd reads the keyring itself)
    key = vm_cluster.admin_key()
    argvs = ok(guest_ceph.run(["sh", "-c", "cat /proc/[0-9]*/cmdline | tr '\\0' ' '"]))
    assert "rbd-nbd" in argvs and key not in argvs
    data = os.urandom(2 << 20)
    guest_ceph.put("/root/nbd-payload", data)
    ok(cv(guest_ceph, "attach", nbd_image, "--backend", "nbd", "--mountpoint", "/mnt/n"))
    ok(guest_ceph.run(["cp", "/root/nbd-payload", "/mnt/n/payload"]))
    ok(cv(guest_ceph, "detach", nbd_image))
    assert ok(guest_ceph.run(["sh", "-c", "pgrep -c rbd-nbd || true"])).strip() == "0"
    vm_cluster.python(_SNAP, str(vm_cluster.conf), nbd_image.split("/")[1], "s1")
    snap = json.loads(ok(cv(guest_ceph, "attach", f"{nbd_image}@s1", "--backend", "nbd",
                            "--mountpoint", "/mnt/ns", "--json")))
    assert snap["read_only"] and snap["backend"] == "nbd"
    got = ok(guest_ceph.run(["sha256sum", "/mnt/ns/payload"])).split()[0]
    assert got == hashlib.sha256(data).hexdigest()
    ok(cv(guest_ceph, "detach", f"{nbd_image}@s1"))


def test_nbd_open_device_refuses_unmap(guest_ceph: Guest, nbd_image: str) -> None:
    dev = ok(cv(guest_ceph, "map", nbd_image, "--backend", "nbd")).strip()
    ok(guest_ceph.run(["systemd-run", "--unit=cvnbdholder", "--collect", "sh", "-c",
                       f"exec 3<{dev}; exec sleep 300"]))
    try:
        guest_ceph.run(["sh", "-c", f"for i in $(seq 50); do fuser -s {dev} && exit 0; "
                                    "sleep 0.1; done; true"])
        r = cv(guest_ceph, "unmap", nbd_image)
        assert r.rc == 4 and "is open by pid" in r.stderr, r.stderr
    finally:
        guest_ceph.run(["systemctl", "stop", "cvnbdholder"])
    ok(cv(guest_ceph, "unmap", nbd_image))
    assert ok(guest_ceph.run(["sh", "-c", "pgrep -c rbd-nbd || true"])).strip() == "0"


def test_nbd_read_only_and_forced_unmap_of_an_open_device(guest_ceph: Guest,
                                                          nbd_image: str) -> None:
    ro = json.loads(ok(cv(guest_ceph, "map", nbd_image, "--backend", "nbd", "--read-only",
                          "--json")))
    assert ro["read_only"]
    w = guest_ceph.run(["dd", "if=/dev/zero", f"of={ro['device']}", "bs=4k", "count=1",
                        "oflag=direct"])
    assert w.rc != 0
    ok(guest_ceph.run(["systemd-run", "--unit=cvnbdholder2", "--collect", "sh", "-c",
                       f"exec 3<{ro['device']}; exec sleep 300"]))
    try:
        guest_ceph.run(["sh", "-c", f"for i in $(seq 50); do fuser -s {ro['device']} && "
                                    "exit 0; sleep 0.1; done; true"])
        assert cv(guest_ceph, "unmap", nbd_image).rc == 4
        ok(cv(guest_ceph, "unmap", "--force", nbd_image))
        assert json.loads(ok(cv(guest_ceph, "showmapped", "--json"))) == []
    finally:
        guest_ceph.run(["systemctl", "stop", "cvnbdholder2"])
    assert ok(guest_ceph.run(["sh", "-c", "pgrep -c rbd-nbd || true"])).strip() == "0"
