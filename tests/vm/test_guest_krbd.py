"""The test host end to end, before any krbd backend code: the guest's real
kernel maps an image through sysfs, and the host reads what it wrote."""

from __future__ import annotations

import hashlib
import os
import uuid

from tests.vm.conftest import NsCluster
from tests.vm.harness import Guest

# Runs in the guest. The secret goes into the process keyring (add_key) and
# the map string names it with key=, so it is never in the string or argv.
_MAP = """
import base64, sys, time
from cephvol._os.keyctl import add_key
mon, pool, image = sys.argv[1:4]
secret = base64.b64decode(open("/root/admin.secret").read().strip())
add_key("ceph", "client.admin", secret)
with open("/sys/bus/rbd/add_single_major", "w") as f:
    f.write(f"{mon} name=admin,key=client.admin {pool} {image} -")
"""

_READ_HOST = """
import hashlib, sys, rados, rbd
with rados.Rados(conffile=sys.argv[1]) as c, c.open_ioctx("rbd") as io, \\
        rbd.Image(io, sys.argv[2], read_only=True) as img:
    print(hashlib.sha256(img.read(0, int(sys.argv[3]))).hexdigest())
"""


def test_guest_kernel_maps_writes_and_host_reads_back(guest: Guest,
                                                      vm_cluster: NsCluster) -> None:
    name = f"vm-{uuid.uuid4().hex[:8]}"
    vm_cluster.cli("create", f"rbd/{name}", "--size", "64M")
    data = os.urandom(4 << 20)
    want = hashlib.sha256(data).hexdigest()
    guest.put("/root/admin.secret", vm_cluster.admin_key().encode() + b"\n", 0o600)
    guest.put("/root/data.bin", data, 0o600)
    try:
        r = guest.run(["python3", "-c", _MAP, vm_cluster.mon_v1(), "rbd", name], timeout=120)
        assert r.rc == 0, r.stderr
        guest.run(["udevadm", "settle", "--timeout=30"], timeout=60)
        assert guest.run(["cat", "/sys/bus/rbd/devices/0/name"]).stdout.strip() == name
        assert guest.run(["test", "-b", "/dev/rbd0"]).rc == 0
        w = guest.run(["dd", "if=/root/data.bin", "of=/dev/rbd0", "bs=1M", "oflag=direct",
                       "conv=fsync"], timeout=120)
        assert w.rc == 0, w.stderr
        back = guest.run(["sh", "-c", "head -c 4194304 /dev/rbd0 | sha256sum"], timeout=120)
        assert back.stdout.split()[0] == want
    finally:
        guest.run(["sh", "-c", "echo 0 > /sys/bus/rbd/remove_single_major"], timeout=60)
    assert guest.run(["test", "-e", "/sys/bus/rbd/devices/0"]).rc != 0
    assert vm_cluster.python(_READ_HOST, str(vm_cluster.conf), name,
                             str(len(data))).strip() == want
    vm_cluster.cli("rm", f"rbd/{name}")
