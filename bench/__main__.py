"""Run the benchmarks on a throw-away local cluster and write a results table.

    .venv/bin/python -m bench [--runs 20] [--scale 1,8,32] [--out bench/results]

Measures (fuse backend on this machine; see README for the targets):
- CLI start-up: `cephvol --version`, `cephvol status`
- attach (map + fsck skip + mount) and detach (sync + umount + unmap) of an
  existing image with a filesystem, against bench/bare.sh doing the same steps
- first attach (create + mkfs + mount) of 1 GiB and 100 GiB images
- N volumes attached concurrently vs one after another
- sequential 4 MiB I/O through the mounted volume (dd, direct I/O) against
  librbd writing and reading the same amount (the backend's own ceiling)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CEPHVOL = str(Path(sys.executable).parent / "cephvol")
BARE = str(Path(__file__).resolve().parent / "bare.sh")


def run(argv: list[str], env: dict[str, str], check: bool = True) -> str:
    cp = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    if check and cp.returncode != 0:
        raise SystemExit(f"bench: {' '.join(argv)} failed: {cp.stderr.strip()}")
    return cp.stdout


def timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def stats(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    p95 = xs[min(len(xs) - 1, round(0.95 * (len(xs) - 1)))]
    return {"median_ms": round(statistics.median(xs) * 1000, 1), "p95_ms": round(p95 * 1000, 1),
            "runs": len(xs)}


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--scale", default="1,8,32")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cephvol-bench-"))
    env = dict(os.environ, CEPHVOL_STATE_DIR=str(work / "state"))
    try:
        out = run([CEPHVOL, "dev-cluster", "up", "--dir", str(work / "cluster"), "--json"], env)
        env["CEPH_CONF"] = json.loads(out)["conf"]
        results = bench_all(work, env, a.runs, [int(x) for x in a.scale.split(",")])
    finally:
        for d in (work / "state" / "volumes").glob("*.json") if (work / "state").exists() \
                else []:
            subprocess.run([CEPHVOL, "detach", "--force", "--lazy",
                            json.loads(d.read_text())["spec"]], env=env, capture_output=True)
        subprocess.run([CEPHVOL, "dev-cluster", "down", "--dir", str(work / "cluster")],
                       env=env, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    write(results, Path(a.out))


def bench_all(work: Path, env: dict[str, str], runs: int, scale: list[int]) -> dict[str, Any]:
    r: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "machine": machine()}
    cv = [CEPHVOL]
    r["cli_version"] = stats([timed(lambda: run([*cv, "--version"], env)) for _ in range(runs)])
    r["cli_status"] = stats([timed(lambda: run([*cv, "status"], env)) for _ in range(runs)])

    r["refusals"] = refusal_bench(work, env, runs)

    img, mnt = "rbd/bench-ad", work / "mnt-ad"
    run([*cv, "create", img, "--size", "1G"], env)
    run([*cv, "attach", img, "--mountpoint", str(mnt)], env)  # mkfs once
    run([*cv, "detach", img], env)
    att, det = [], []
    for _ in range(runs):
        att.append(timed(lambda: run([*cv, "attach", img, "--mountpoint", str(mnt),
                                      "--fsck", "skip"], env)))
        det.append(timed(lambda: run([*cv, "detach", img], env)))
    r["attach"], r["detach"] = stats(att), stats(det)
    fdir = work / "bare-fuse"
    batt, bdet = [], []
    for _ in range(runs):
        dev = ""

        def bare_attach() -> None:
            nonlocal dev
            dev = run([BARE, "attach", env["CEPH_CONF"], "rbd", "bench-ad", str(fdir),
                       str(mnt)], env).strip()

        batt.append(timed(bare_attach))
        bdet.append(timed(lambda d=dev: run([BARE, "detach", str(fdir), str(mnt), d], env)))
    r["bare_attach"], r["bare_detach"] = stats(batt), stats(bdet)
    r["attach_ratio"] = round(r["attach"]["median_ms"] / r["bare_attach"]["median_ms"], 2)
    r["detach_ratio"] = round(r["detach"]["median_ms"] / r["bare_detach"]["median_ms"], 2)

    for size in ("1G", "100G"):
        name = f"rbd/bench-first-{size.lower()}"
        t = timed(lambda name=name, size=size: (
            run([*cv, "create", name, "--size", size], env),
            run([*cv, "attach", name, "--mountpoint", str(work / f"mnt-{size}")], env)))
        r[f"first_attach_{size}"] = {"ms": round(t * 1000, 1)}
        run([*cv, "detach", name], env)

    r["scale"] = []
    for n in scale:
        names = [f"rbd/bench-s{n}-{i}" for i in range(n)]
        for nm in names:
            run([*cv, "create", nm, "--size", "256M"], env)
        mp = {nm: str(work / "s" / nm.split("/")[1]) for nm in names}
        for nm in names:  # mkfs outside the measurement
            run([*cv, "attach", nm, "--mountpoint", mp[nm]], env)
            run([*cv, "detach", nm], env)
        def attach_one(nm: str, mp: dict[str, str] = mp) -> str:
            return run([*cv, "attach", nm, "--mountpoint", mp[nm], "--fsck", "skip"], env)

        def detach_one(nm: str) -> str:
            return run([*cv, "detach", nm], env)

        seq_a = timed(lambda names=names: [attach_one(nm) for nm in names])
        seq_d = timed(lambda names=names: [detach_one(nm) for nm in names])
        with ThreadPoolExecutor(max_workers=n) as ex:
            par_a = timed(lambda names=names, ex=ex: list(ex.map(attach_one, names)))
            par_d = timed(lambda names=names, ex=ex: list(ex.map(detach_one, names)))
        r["scale"].append({"n": n, "sequential_attach_s": round(seq_a, 2),
                           "concurrent_attach_s": round(par_a, 2),
                           "sequential_detach_s": round(seq_d, 2),
                           "concurrent_detach_s": round(par_d, 2),
                           "attach_speedup": round(seq_a / par_a, 2),
                           "detach_speedup": round(seq_d / par_d, 2)})
    r["io"] = io_bench(work, env)
    r["fio"] = fio_bench(work, env)
    return r


def refusal_bench(work: Path, env: dict[str, str], runs: int) -> dict[str, Any]:
    """How long a refusal that needs no answer from the cluster takes (issue
    13: "well under a second"): bad paths and bad input, refused before any
    connection, map or mount."""
    link = work / "link-to-root"
    if not link.is_symlink():
        link.symlink_to("/")
    afile = work / "a-file"
    afile.write_text("x")
    cases = {
        "symlink to /": ["attach", "rbd/bench-refuse", "--mountpoint", str(link)],
        "mountpoint is a file": ["attach", "rbd/bench-refuse", "--mountpoint", str(afile)],
        "system directory": ["attach", "rbd/bench-refuse", "--mountpoint", "/etc/x"],
        "bad spec": ["attach", "rbd/bad spec"],
        "bad size": ["create", "rbd/bench-refuse", "--size", "12Q"],
    }
    out: dict[str, Any] = {}
    for name, args in cases.items():
        times = []
        for _ in range(max(3, runs // 2)):
            t0 = time.perf_counter()
            cp = subprocess.run([CEPHVOL, *args], env=env, capture_output=True, text=True,
                                check=False)
            times.append(time.perf_counter() - t0)
            if cp.returncode == 0:
                raise SystemExit(f"bench: {name} was not refused: {cp.stdout}")
        out[name] = {**stats(times), "exit_code": cp.returncode}
    return out


_LIBRBD = """
import sys, time, rados, rbd
conf, name, total = sys.argv[1], sys.argv[2], int(sys.argv[3])
buf = b"\\x5a" * (4 << 20)
with rados.Rados(conffile=conf) as c, c.open_ioctx("rbd") as io, rbd.Image(io, name) as img:
    t0 = time.perf_counter()
    for off in range(0, total, len(buf)):
        img.write(buf, off)
    img.flush()
    w = time.perf_counter() - t0
    t0 = time.perf_counter()
    for off in range(0, total, len(buf)):
        img.read(off, len(buf))
    r = time.perf_counter() - t0
print(total / w / 1e6, total / r / 1e6)
"""


def io_bench(work: Path, env: dict[str, str]) -> dict[str, float]:
    total = 256 << 20
    run([CEPHVOL, "create", "rbd/bench-io-raw", "--size", "512M"], env)
    w_rbd, r_rbd = (float(x) for x in run([sys.executable, "-c", _LIBRBD, env["CEPH_CONF"],
                                           "bench-io-raw", str(total)], env).split())
    run([CEPHVOL, "create", "rbd/bench-io", "--size", "512M"], env)
    mnt = work / "mnt-io"
    run([CEPHVOL, "attach", "rbd/bench-io", "--mountpoint", str(mnt)], env)
    f = mnt / "io.bin"
    t = timed(lambda: run(["dd", "if=/dev/zero", f"of={f}", "bs=4M", f"count={total >> 22}",
                           "oflag=direct", "conv=fsync"], env))
    w_dev = total / t / 1e6
    run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], env, check=False)
    t = timed(lambda: run(["dd", f"if={f}", "of=/dev/null", "bs=4M", "iflag=direct"], env))
    r_dev = total / t / 1e6
    run([CEPHVOL, "detach", "rbd/bench-io"], env)
    return {"librbd_write_MBps": round(w_rbd, 1), "librbd_read_MBps": round(r_rbd, 1),
            "volume_write_MBps": round(w_dev, 1), "volume_read_MBps": round(r_dev, 1),
            "write_ratio": round(w_dev / w_rbd, 2), "read_ratio": round(r_dev / r_rbd, 2)}


# (name, fio rw, block size, total bytes, rbd bench --io-type, --io-pattern)
FIO_JOBS = [
    ("seq write 4M", "write", "4M", 256 << 20, "write", "seq"),
    ("seq read 4M", "read", "4M", 256 << 20, "read", "seq"),
    ("rand write 4k", "randwrite", "4k", 32 << 20, "write", "rand"),
    ("rand read 4k", "randread", "4k", 32 << 20, "read", "rand"),
]


def _rbd_bench(env: dict[str, str], image: str, io_type: str, size: str, pattern: str,
               total: int) -> tuple[float, float]:
    """(MB/s, IOPS) of `rbd bench` (librbd, 16 in flight) on the same cluster."""
    out = run(["rbd", "-c", env["CEPH_CONF"], "bench", "--io-type", io_type, "--io-size", size,
               "--io-pattern", pattern, "--io-total", str(total), "--io-threads", "16", image],
              env)
    last = [ln for ln in out.splitlines() if ln.startswith("elapsed:")][-1].split()
    ops_s = float(last[last.index("ops/sec:") + 1])
    bsize = int(size[:-1]) << (20 if size.endswith("M") else 10)
    return ops_s * bsize / 1e6, ops_s


def _fio(env: dict[str, str], path: Path, rw: str, bs: str, total: int) -> tuple[float, float]:
    """(MB/s, IOPS) of fio through the mounted volume: direct I/O, libaio, 16 in flight."""
    out = run(["fio", "--name=cv", f"--filename={path}", f"--rw={rw}", f"--bs={bs}",
               f"--size={total}", "--direct=1", "--ioengine=libaio", "--iodepth=16",
               "--end_fsync=1", "--output-format=json"], env)
    job = json.loads(out[out.index("{"):])["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    return side["bw_bytes"] / 1e6, side["iops"]


def fio_bench(work: Path, env: dict[str, str]) -> list[dict[str, Any]]:
    """fio through the volume (fuse backend here) against `rbd bench` on an
    image of the same size: the same I/O sizes, patterns and queue depth."""
    run([CEPHVOL, "create", "rbd/bench-fio-raw", "--size", "1G"], env)
    run([CEPHVOL, "create", "rbd/bench-fio", "--size", "1G"], env)
    mnt = work / "mnt-fio"
    run([CEPHVOL, "attach", "rbd/bench-fio", "--mountpoint", str(mnt)], env)
    rows = []
    try:
        for name, rw, bs, total, io_type, pattern in FIO_JOBS:
            f = mnt / f"fio-{bs}.bin"
            if "read" in rw and not f.exists():
                _fio(env, f, "write", bs, total)  # lay the file down first
            run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], env, check=False)
            v_mb, v_iops = _fio(env, f, rw, bs, total)
            r_mb, r_iops = _rbd_bench(env, "rbd/bench-fio-raw", io_type, bs.upper(), pattern,
                                      total)
            rows.append({"workload": name, "volume_MBps": round(v_mb, 1),
                         "volume_iops": round(v_iops), "rbd_bench_MBps": round(r_mb, 1),
                         "rbd_bench_iops": round(r_iops), "ratio": round(v_mb / r_mb, 2)})
    finally:
        run([CEPHVOL, "detach", "rbd/bench-fio"], env, check=False)
    return rows


def machine() -> str:
    return (f"{platform.node() or 'host'}: {os.cpu_count()} cores, kernel "
            f"{platform.release()}, Python {platform.python_version()}")


def write(r: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(r, indent=1) + "\n")
    lines = [f"Benchmarks {r['date']} on {r['machine']} (fuse backend, local dev cluster)", "",
             "| measure | cephvol | bare tools | ratio | target |", "|---|---|---|---|---|",
             f"| `cephvol --version` median / p95 | {r['cli_version']['median_ms']} / "
             f"{r['cli_version']['p95_ms']} ms | | | < 150 ms |",
             f"| `cephvol status` median / p95 | {r['cli_status']['median_ms']} / "
             f"{r['cli_status']['p95_ms']} ms | | | |",
             f"| attach median / p95 | {r['attach']['median_ms']} / {r['attach']['p95_ms']} ms "
             f"| {r['bare_attach']['median_ms']} / {r['bare_attach']['p95_ms']} ms "
             f"| {r['attach_ratio']} | ≤ 1.3 |",
             f"| detach median / p95 | {r['detach']['median_ms']} / {r['detach']['p95_ms']} ms "
             f"| {r['bare_detach']['median_ms']} / {r['bare_detach']['p95_ms']} ms "
             f"| {r['detach_ratio']} | ≤ 1.3 |",
             f"| first attach 1 GiB (create + mkfs + mount) | {r['first_attach_1G']['ms']} ms "
             "| | | |",
             f"| first attach 100 GiB | {r['first_attach_100G']['ms']} ms | | | |"]
    for s in r["scale"]:
        lines.append(f"| {s['n']} volumes: attach sequential / concurrent | "
                     f"{s['sequential_attach_s']} / {s['concurrent_attach_s']} s | | "
                     f"{s['attach_speedup']}x | ≥ 4x at 32 |")
        lines.append(f"| {s['n']} volumes: detach sequential / concurrent | "
                     f"{s['sequential_detach_s']} / {s['concurrent_detach_s']} s | | "
                     f"{s['detach_speedup']}x | |")
    for name, v in r.get("refusals", {}).items():
        lines.append(f"| refusal: {name} (exit {v['exit_code']}) median / p95 | "
                     f"{v['median_ms']} / {v['p95_ms']} ms | | | well under 1 s |")
    io = r["io"]
    lines += [f"| sequential write 4 MiB (dd direct) vs librbd | {io['volume_write_MBps']} MB/s "
              f"| {io['librbd_write_MBps']} MB/s | {io['write_ratio']} | ≥ 0.8 |",
              f"| sequential read 4 MiB (dd direct) vs librbd | {io['volume_read_MBps']} MB/s "
              f"| {io['librbd_read_MBps']} MB/s | {io['read_ratio']} | ≥ 0.8 |"]
    lines += ["", "fio through the mounted volume vs `rbd bench` (librbd) on the same cluster, "
              "direct I/O, queue depth 16 each:", "",
              "| workload | volume MB/s (IOPS) | rbd bench MB/s (IOPS) | ratio | target |",
              "|---|---|---|---|---|"]
    for row in r.get("fio", []):
        target = "≥ 0.8" if row["workload"].startswith("seq") else ""
        lines.append(f"| {row['workload']} | {row['volume_MBps']} ({row['volume_iops']}) | "
                     f"{row['rbd_bench_MBps']} ({row['rbd_bench_iops']}) | {row['ratio']} | "
                     f"{target} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
