"""attach/detach latency on krbd, in the qemu test host, against `rbd map` +
mount done by hand.

    .venv/bin/python -m bench.guest [--runs 20] [--out bench/results]

The guest is the one the vm tests use (tests/vm/harness.py: Debian's kernel
under TCG here, systemd as PID 1); the cluster runs in the guest's network
namespace. Timing happens inside the guest, so the agent's round trips do not
count. TCG makes every step slower than on hardware; the ratio is the point.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from bench.__main__ import CEPHVOL, REPO, machine

# runs inside the guest: cephvol's attach/detach and the bare krbd steps
_GUEST = r"""
import json, statistics, subprocess, sys, time
spec, runs = sys.argv[1], int(sys.argv[2])
pool, name = spec.split("/")
def sh(*a):
    return subprocess.run(a, check=True, capture_output=True, text=True).stdout.strip()
def timed(f):
    t = time.perf_counter(); out = f(); return time.perf_counter() - t, out
def st(xs):
    xs = sorted(x * 1000 for x in xs)
    return {"median_ms": round(statistics.median(xs), 1),
            "p95_ms": round(xs[min(len(xs) - 1, int(0.95 * len(xs)))], 1)}
sh("cephvol", "attach", spec, "--mountpoint", "/mnt/b")   # mkfs once
sh("cephvol", "detach", spec)
res = {}
for label, extra in (("cephvol", []), ("cephvol_no_exclusive", ["--no-exclusive"])):
    a, d = [], []
    for _ in range(runs):
        a.append(timed(lambda: sh("cephvol", "attach", spec, "--mountpoint", "/mnt/b",
                                  "--fsck", "skip", *extra))[0])
        d.append(timed(lambda: sh("cephvol", "detach", spec))[0])
    res[label] = {"attach": st(a), "detach": st(d)}
a, d = [], []
for _ in range(runs):
    def bare_attach():
        dev = sh("rbd", "map", spec)
        sh("mount", "-t", "ext4", dev, "/mnt/b")
        return dev
    t, dev = timed(bare_attach)
    a.append(t)
    d.append(timed(lambda: (sh("sync", "-f", "/mnt/b"), sh("umount", "/mnt/b"),
                            sh("rbd", "unmap", dev)))[0])
res["bare"] = {"attach": st(a), "detach": st(d)}
print(json.dumps(res))
"""


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.guest")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    a = ap.parse_args()
    from tests.vm.conftest import NsCluster, configure_ceph_client
    from tests.vm.harness import HOST_ADDR, Guest, NetNS, ensure_image, unavailable

    why = unavailable()
    if why:
        raise SystemExit(f"bench.guest: {why}")
    image = ensure_image()
    work = Path(tempfile.mkdtemp(prefix="cephvol-bench-guest-"))
    with NetNS("cvb") as ns:
        cluster = NsCluster(ns, work / "cluster")
        try:
            up = cluster.run([CEPHVOL, "dev-cluster", "up", "--dir", str(cluster.directory),
                              "--addr", HOST_ADDR, "--netns", ns.name], timeout=300,
                             in_netns=False)
            if up.returncode != 0:
                raise SystemExit(f"bench.guest: cluster: {up.stderr}")
            with Guest(image, ns, work / "guest") as g:
                configure_ceph_client(g, cluster)
                cluster.cli("create", "rbd/bench-krbd", "--size", "1G")
                g.put("/root/bench.py", _GUEST.encode(), 0o644)
                r = g.run(["python3", "/root/bench.py", "rbd/bench-krbd", str(a.runs)],
                          timeout=3600)
                if r.rc != 0:
                    raise SystemExit(f"bench.guest: {r.stderr}")
                kernel = g.run(["uname", "-r"]).stdout.strip()
        finally:
            subprocess.run([CEPHVOL, "dev-cluster", "down", "--dir", str(cluster.directory)],
                           capture_output=True, timeout=120, check=False)
            shutil.rmtree(work, ignore_errors=True)
    res: dict[str, Any] = json.loads(r.stdout)
    res["machine"] = f"{machine()}; guest kernel {kernel} under qemu (TCG), 1 vCPU"
    for label in ("cephvol", "cephvol_no_exclusive"):
        for step in ("attach", "detach"):
            res[label][f"{step}_ratio"] = round(
                res[label][step]["median_ms"] / res["bare"][step]["median_ms"], 2)
    write(res, Path(a.out))


def write(r: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "guest.json").write_text(json.dumps(r, indent=1) + "\n")
    b = r["bare"]
    lines = [f"krbd in the qemu guest: {r['machine']}", "",
             "| measure | cephvol | bare `rbd map` + mount | ratio | target |",
             "|---|---|---|---|---|"]
    for label, what in (("cephvol", "default (exclusive)"),
                        ("cephvol_no_exclusive", "--no-exclusive")):
        c = r[label]
        for step in ("attach", "detach"):
            lines.append(f"| {step} {what} median / p95 | {c[step]['median_ms']} / "
                         f"{c[step]['p95_ms']} ms | {b[step]['median_ms']} / "
                         f"{b[step]['p95_ms']} ms | {c[f'{step}_ratio']} | ≤ 1.3 |")
    (out / "guest.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
