"""The fault matrix on krbd: cephvol killed (SIGKILL) at every step boundary
of attach and of detach, inside the guest; `detach` must finish the job, and
the data written before the crash must be intact."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable, Iterator

import pytest

from tests.vm.conftest import NsCluster
from tests.vm.harness import Guest
from tests.vm.test_krbd_backend import cv, ok

ATTACH_STEPS = ["journal", "own", "map", "mkfs", "mkdir", "mount"]
DETACH_STEPS = ["detach-sync", "detach-umount", "detach-check-unused", "detach-unmap"]


@pytest.fixture
def fimage(vm_image: Callable[[str], str]) -> str:
    return vm_image("f")


@pytest.fixture(scope="module")
def with_data(guest_ceph: Guest, vm_cluster: NsCluster) -> Iterator[tuple[str, str]]:
    """One volume holding 1 MiB of data and its digest, shared by the attach
    matrix's steps after mkfs (each ends with the volume detached and
    checked whole): one guest attach/write/detach for all of them."""
    spec = f"rbd/fd-{uuid.uuid4().hex[:8]}"
    vm_cluster.cli("create", spec, "--size", "64M")
    try:
        ok(cv(guest_ceph, "attach", spec, "--mountpoint", "/mnt/f"))
        ok(guest_ceph.run(["sh", "-c", "head -c 1048576 /dev/urandom > /mnt/f/data"]))
        digest = ok(guest_ceph.run(["sha256sum", "/mnt/f/data"])).split()[0]
        ok(cv(guest_ceph, "detach", spec))
        yield spec, digest
    finally:
        guest_ceph.run(["cephvol", "detach", "--force", spec], timeout=120)
        vm_cluster.run(["cephvol", "rm", spec])


def _clean(g: Guest) -> None:
    assert ok(g.run(["ls", "/sys/bus/rbd/devices"])).strip() == ""
    assert g.run(["mountpoint", "-q", "/mnt/f"]).rc != 0
    assert json.loads(ok(cv(g, "status", "--json"))) == []


def _crash(g: Guest, *args: str, at: str) -> int:
    return g.run(["env", f"CEPHVOL_TEST_CRASH_AT={at}", "cephvol", *args], timeout=120).rc


@pytest.mark.parametrize("step", ATTACH_STEPS)
def test_attach_killed_at(step: str, guest_ceph: Guest, request: pytest.FixtureRequest) -> None:
    if step == "mkfs":  # mkfs is only reached on an empty volume
        fimage, digest = request.getfixturevalue("fimage"), ""
    else:  # a volume with content
        fimage, digest = request.getfixturevalue("with_data")
    assert _crash(guest_ceph, "attach", fimage, "--mountpoint", "/mnt/f", at=step) == -9
    ok(cv(guest_ceph, "detach", fimage))
    _clean(guest_ceph)
    ok(cv(guest_ceph, "attach", fimage, "--mountpoint", "/mnt/f"))
    if digest:
        assert ok(guest_ceph.run(["sha256sum", "/mnt/f/data"])).split()[0] == digest
    ok(cv(guest_ceph, "detach", fimage))
    _clean(guest_ceph)


@pytest.mark.parametrize("step", DETACH_STEPS)
def test_detach_killed_at(step: str, guest_ceph: Guest, fimage: str) -> None:
    payload = os.urandom(1 << 20)
    guest_ceph.put("/root/fpayload", payload)
    ok(cv(guest_ceph, "attach", fimage, "--mountpoint", "/mnt/f"))
    ok(guest_ceph.run(["cp", "/root/fpayload", "/mnt/f/p"]))
    assert _crash(guest_ceph, "detach", fimage, at=step) == -9
    ok(cv(guest_ceph, "detach", fimage))
    _clean(guest_ceph)
    ok(cv(guest_ceph, "attach", fimage, "--mountpoint", "/mnt/f"))
    got = ok(guest_ceph.run(["sha256sum", "/mnt/f/p"])).split()[0]
    assert got == hashlib.sha256(payload).hexdigest()
    ok(cv(guest_ceph, "detach", fimage))
    _clean(guest_ceph)
