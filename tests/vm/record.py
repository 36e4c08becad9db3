"""Re-record the real kernel outputs the unit tests parse, from the guest.

    .venv/bin/python -m tests.vm.record      (root; boots a guest, ~1 min)

Writes tests/data/sys-rbd/ (the sysfs files cephvol reads for three krbd
mappings: plain rw + exclusive, a snapshot, an image in a pool namespace),
tests/data/nbd/list-mapped.json (rbd-nbd list-mapped --format json with one
mapping) and tests/data/ceph/mon-dump.json (the dev cluster's monmap).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.vm.conftest import CEPHVOL, NsCluster, configure_ceph_client
from tests.vm.harness import HOST_ADDR, Guest, NetNS, ensure_image

DATA = Path(__file__).resolve().parent.parent / "data"
DEV_ATTRS = ("pool", "pool_id", "pool_ns", "name", "image_id", "current_snap", "snap_id",
             "major", "minor", "client_id", "cluster_fsid", "features", "size", "config_info")
BLOCK_ATTRS = ("dev", "ro", "size")

_PREP = """
import sys, rados, rbd
with rados.Rados(conffile=sys.argv[1]) as c, c.open_ioctx("rbd") as io:
    rbd.RBD().namespace_create(io, "tenant")
    io.set_namespace("tenant")
    rbd.RBD().create(io, "ns-img", 32 << 20)
    io.set_namespace("")
    with rbd.Image(io, "rec-img") as img:
        img.create_snap("s1")
"""


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="cephvol-record-"))
    try:
        with NetNS() as ns:
            c = NsCluster(ns, tmp / "cluster")
            try:
                cp = c.run([CEPHVOL, "dev-cluster", "up", "--dir", str(c.directory), "--addr",
                            HOST_ADDR, "--netns", ns.name], timeout=300, in_netns=False)
                assert cp.returncode == 0, cp.stderr
                c.cli("create", "rbd/rec-img", "--size", "64M")
                c.python(_PREP, str(c.conf))
                with Guest(ensure_image(), ns, tmp / "guest") as g:
                    _record(g, c)
            finally:
                subprocess.run([CEPHVOL, "dev-cluster", "down", "--dir", str(c.directory)],
                               capture_output=True, check=False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _record(g: Guest, c: NsCluster) -> None:
    configure_ceph_client(g, c)
    for args in (["map", "rbd/rec-img", "--exclusive"], ["map", "rbd/rec-img@s1"],
                 ["map", "rbd/tenant/ns-img", "--read-only"]):
        r = g.run(["cephvol", *args, "--backend", "krbd"], timeout=120)
        assert r.rc == 0, r.stderr
    out = DATA / "sys-rbd"
    shutil.rmtree(out, ignore_errors=True)
    for n in g.run(["ls", "/sys/bus/rbd/devices"]).stdout.split():
        for a in DEV_ATTRS:
            r = g.run(["cat", f"/sys/bus/rbd/devices/{n}/{a}"])
            if r.rc == 0:
                p = out / "bus" / "rbd" / "devices" / n / a
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_text(r.stdout)
        for a in BLOCK_ATTRS:
            r = g.run(["cat", f"/sys/block/rbd{n}/{a}"])
            p = out / "block" / f"rbd{n}" / a
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(r.stdout)
    for f in ("add", "add_single_major", "remove", "remove_single_major"):
        (out / "bus" / "rbd" / f).write_text("")  # write-only control files (empty when read)
    for args in (["unmap", "rbd/rec-img"], ["unmap", "rbd/rec-img@s1"],
                 ["unmap", "rbd/tenant/ns-img"]):
        assert g.run(["cephvol", *args], timeout=120).rc == 0
    r = g.run(["cephvol", "map", "rbd/tenant/ns-img", "--backend", "nbd"], timeout=120)
    assert r.rc == 0, r.stderr
    lm = g.run(["rbd-nbd", "list-mapped", "--format", "json"]).stdout
    (DATA / "nbd").mkdir(parents=True, exist_ok=True)
    (DATA / "nbd" / "list-mapped.json").write_text(lm)
    assert g.run(["cephvol", "unmap", "rbd/tenant/ns-img"], timeout=120).rc == 0
    dump = c.run(["ceph", "-c", str(c.conf), "mon", "dump", "--format", "json"]).stdout
    (DATA / "ceph").mkdir(parents=True, exist_ok=True)
    (DATA / "ceph" / "mon-dump.json").write_text(json.dumps(json.loads(dump), indent=1) + "\n")
    print(f"recorded into {DATA}", file=sys.stderr)


if __name__ == "__main__":
    main()
