"""Run the benchmarks on a throw-away local cluster and write a results table.

    .venv/bin/python -m bench [--runs 10] [--scale 1,8,32,128] [--seq-max 32]
                              [--levels 0,32,128] [--backends qsd,fuse] [--no-fio]
                              [--profile] [--out bench/results]

Measures (issue 15's targets; every backend that runs on this host):
- start-up: `cephvol --version` and `cephvol --help` (click and every command
  module loaded) against `python3 -c pass` (the interpreter the venv is made of)
- attach (map + mount, --fsck skip) and detach (sync + umount + unmap) of a
  32 MiB image with a filesystem, wall time and CPU (cephvol and the commands
  it waits for; not the backend's daemon), against bench/bare.sh doing the
  same steps with the bare tools
- the same attach/detach cycle with 0, 32 and 128 volumes already attached on
  the host (the per-operation cost that grows with the number of volumes)
- N volumes attached (and detached) one after another vs all at once
- fio through a mounted volume (direct I/O, seq 4M / rand 4k, read / write,
  queue depth 1 and 16) side by side with `rbd bench` (librbd) doing the same
- first attach (create + mkfs + mount), refusals that need no cluster

Images are made by one librbd process and formatted by writing one mkfs'd
template into them, so the volume counts cost seconds, not minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

REPO = Path(__file__).resolve().parent.parent
CEPHVOL = str(Path(sys.executable).parent / "cephvol")
BARE = str(Path(__file__).resolve().parent / "bare.sh")
SMALL = 32 << 20  # the volumes of the attach/detach and scale measures


def run(argv: list[str], env: dict[str, str], check: bool = True, timeout: float = 600) -> str:
    cp = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)
    if check and cp.returncode != 0:
        raise SystemExit(f"bench: {' '.join(argv)} failed: {cp.stderr.strip()}")
    return cp.stdout


def _child_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def timed_cpu(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall, CPU of the children waited for meanwhile); only meaningful when
    nothing else runs children at the same time."""
    c0, t0 = _child_cpu(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, _child_cpu() - c0


def stats(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    p95 = xs[min(len(xs) - 1, round(0.95 * (len(xs) - 1)))]
    return {"median_ms": round(statistics.median(xs) * 1000, 1), "p95_ms": round(p95 * 1000, 1),
            "runs": len(xs)}


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--scale", default="1,8,32,128",
                    help="volume counts attached sequentially and concurrently")
    ap.add_argument("--seq-max", type=int, default=32,
                    help="largest count also attached one after another")
    ap.add_argument("--levels", default="0,32,128",
                    help="volumes already attached while the cycle is measured")
    ap.add_argument("--backends", default="",
                    help="comma list [every backend of qsd, fuse that runs here]")
    ap.add_argument("--no-fio", action="store_true")
    ap.add_argument("--only-encryption", action="store_true",
                    help="only the cost of encryption (qsd: plain against LUKS2)")
    ap.add_argument("--profile", action="store_true",
                    help="cProfile one attach and detach at the lowest and highest level")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    a = ap.parse_args()
    # an installed package is byte-compiled; a tree under PYTHONDONTWRITEBYTECODE
    # would compile every module on every start and measure that instead
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "cephvol")],
                   capture_output=True, check=False)
    work = Path(tempfile.mkdtemp(prefix="cephvol-bench-"))
    env = dict(os.environ, CEPHVOL_STATE_DIR=str(work / "state"))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.pop("CEPHVOL_BACKEND", None)
    t0 = time.monotonic()
    results: dict[str, Any] = {}
    try:
        out = run([CEPHVOL, "dev-cluster", "up", "--dir", str(work / "cluster"), "--json"], env)
        env["CEPH_CONF"] = json.loads(out)["conf"]
        backends = [b for b in a.backends.split(",") if b] or usable_backends(env)
        bench_all(work, env, a, backends, results)
    except (Exception, SystemExit) as exc:
        results["error"] = str(exc)
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "partial.json").write_text(json.dumps(results, indent=1) + "\n")
        raise
    finally:
        sweep(work, env)
        subprocess.run([CEPHVOL, "dev-cluster", "down", "--dir", str(work / "cluster")],
                       env=env, capture_output=True, check=False)
        shutil.rmtree(work, ignore_errors=True)
    results["bench_seconds"] = round(time.monotonic() - t0)
    write(results, Path(a.out))


def usable_backends(env: dict[str, str]) -> list[str]:
    """qsd and fuse where `cephvol doctor` says they work (krbd and nbd are
    measured by `make bench-guest`, where a kernel has them)."""
    out = run([CEPHVOL, "doctor", "--offline", "--json"], env, check=False)
    try:
        doc = json.loads(out)
    except ValueError:
        return ["fuse"]
    ok = {n for n, b in doc.get("backends", {}).items() if b.get("usable")}
    return [b for b in ("qsd", "fuse") if b in ok] or ["fuse"]


def sweep(work: Path, env: dict[str, str]) -> None:
    """Leave nothing behind, whatever failed: cephvol's volumes by cephvol,
    then what the bare script left (mounts, loop devices, daemons)."""
    state = work / "state" / "volumes"
    for rec in state.glob("*.json") if state.exists() else []:
        with contextlib.suppress(ValueError, KeyError, OSError):
            subprocess.run([CEPHVOL, "detach", "--force", "--lazy",
                            json.loads(rec.read_text())["spec"]], env=env,
                           capture_output=True, check=False, timeout=120)
    subprocess.run([CEPHVOL, "cleanup", "--all", "--force"], env=env, capture_output=True,
                   check=False, timeout=300)
    prefix = str(work) + "/"
    mounts = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            mp = line.split()[4]
            if mp.startswith(prefix) and "/cluster/" not in mp:
                mounts.append(mp)
    for mp in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], capture_output=True, check=False)
    with contextlib.suppress(OSError):
        for name in os.listdir("/sys/block"):
            bf = Path("/sys/block", name, "loop", "backing_file")
            with contextlib.suppress(OSError):
                if bf.read_text().startswith(prefix):
                    subprocess.run(["losetup", "-d", f"/dev/{name}"], capture_output=True,
                                   check=False)
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = Path("/proc", pid, "cmdline").read_bytes().split(b"\0")
            if argv[0].rsplit(b"/", 1)[-1] in (b"rbd-fuse", b"qemu-storage-daemon") and any(
                    a.startswith(prefix.encode()) for a in argv):
                os.kill(int(pid), 9)


# one librbd process creates the images and writes a mkfs'd template into them
_PREP = """
import json, sys, rados, rbd
conf, template, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
names = sys.argv[4:]
chunks = []
if template:
    with open(template, "rb") as f:
        off = 0
        while True:
            b = f.read(65536)
            if not b:
                break
            if b.count(0) != len(b):
                chunks.append((off, b))
            off += len(b)
with rados.Rados(conffile=conf) as c, c.open_ioctx("rbd") as io:
    for n in names:
        try:
            rbd.RBD().create(io, n, size, old_format=False, features=61)
        except rbd.ImageExists:
            continue
        with rbd.Image(io, n) as img:
            for off, b in chunks:
                img.write(b, off)
            img.flush()
"""


def make_images(work: Path, env: dict[str, str], names: list[str], size: int,
                fs: bool = True) -> None:
    template = ""
    if fs:
        t = work / f"template-{size}.img"
        if not t.exists():
            with open(t, "wb") as f:
                f.truncate(size)
            run(["mkfs.ext4", "-q", "-F", str(t)], env)
        template = str(t)
    for i in range(0, len(names), 200):
        run([sys.executable, "-c", _PREP, env["CEPH_CONF"], template, str(size),
             *names[i:i + 200]], env)


class Volumes:
    """cephvol attach/detach of images on one backend, mountpoints under work."""

    def __init__(self, work: Path, env: dict[str, str], backend: str) -> None:
        self.work, self.env, self.backend = work, env, backend

    def mountpoint(self, name: str) -> str:
        return str(self.work / "m" / self.backend / name)

    def attach(self, name: str) -> str:
        return run([CEPHVOL, "attach", f"rbd/{name}", "--backend", self.backend,
                    "--mountpoint", self.mountpoint(name), "--fsck", "skip"], self.env)

    retries: ClassVar[list[str]] = []  # detaches that failed once and were run again

    def detach(self, name: str) -> str:
        cp = subprocess.run([CEPHVOL, "detach", f"rbd/{name}"], capture_output=True,
                            text=True, env=self.env, timeout=600)
        if cp.returncode == 0:
            return cp.stdout
        # refused before anything was lost (e.g. a loop device another process
        # on this shared machine held open a moment): counted, run once more
        self.retries.append(f"{self.backend} {name}: {cp.stderr.strip()[:300]}")
        time.sleep(1)
        cp = subprocess.run([CEPHVOL, "detach", f"rbd/{name}"], capture_output=True,
                            text=True, env=self.env, timeout=600)
        if cp.returncode == 0:
            return cp.stdout
        # still held (the loop device is released when its opener closes it):
        # the bench's own scratch volume, torn down by force and counted
        self.retries.append(f"{self.backend} {name} (forced): {cp.stderr.strip()[:300]}")
        return run([CEPHVOL, "detach", "--force", f"rbd/{name}"], self.env)

    def cycles(self, name: str, runs: int) -> dict[str, Any]:
        att, det, cpu = [], [], []
        for _ in range(runs):
            wa, ca = timed_cpu(lambda: self.attach(name))
            wd, cd = timed_cpu(lambda: self.detach(name))
            att.append(wa)
            det.append(wd)
            cpu.append(ca + cd)
        return {"attach": stats(att), "detach": stats(det),
                "cycle_ms": round(statistics.median(a + d for a, d in zip(att, det,
                                                                          strict=True)) * 1000,
                                  1),
                "cpu_ms": round(statistics.median(cpu) * 1000)}

    def all_at_once(self, names: list[str], fn: Callable[[str], str]) -> float:
        with ThreadPoolExecutor(max_workers=len(names)) as ex:
            return timed(lambda: list(ex.map(fn, names)))


def bare_cycles(work: Path, env: dict[str, str], backend: str, image: str,
                runs: int) -> dict[str, Any]:
    mnt, d = str(work / "m" / f"bare-{backend}"), str(work / f"bare-{backend}")
    verb = {"fuse": ("attach", "detach"), "qsd": ("attach-qsd", "detach-qsd")}[backend]
    att, det, cpu = [], [], []
    for _ in range(runs):
        dev = ""

        def attach() -> None:
            nonlocal dev
            dev = run([BARE, verb[0], env["CEPH_CONF"], "rbd", image, d, mnt], env).strip()

        wa, ca = timed_cpu(attach)
        wd, cd = timed_cpu(lambda dev=dev: run([BARE, verb[1], d, mnt, dev], env))
        att.append(wa)
        det.append(wd)
        cpu.append(ca + cd)
    return {"attach": stats(att), "detach": stats(det),
            "cycle_ms": round(statistics.median(a + d for a, d in zip(att, det,
                                                                      strict=True)) * 1000, 1),
            "cpu_ms": round(statistics.median(cpu) * 1000)}


def bench_all(work: Path, env: dict[str, str], a: argparse.Namespace,
              backends: list[str], r: dict[str, Any]) -> dict[str, Any]:
    r.update({"date": time.strftime("%Y-%m-%d"), "machine": machine(),
              "backends": backends, "load_before": os.getloadavg()[0]})
    if "qsd" in backends:
        r["encryption"] = encryption_bench(work, env, max(3, a.runs // 3))
    if a.only_encryption:
        r["load_after"] = os.getloadavg()[0]
        return r
    r["startup"] = startup_bench(env, a.runs * 2)
    r["refusals"] = refusal_bench(work, env, a.runs)
    scale = [int(x) for x in a.scale.split(",") if x]
    levels = [int(x) for x in a.levels.split(",") if x]
    most = max([*scale, *levels, 1])
    names = [f"bench-v{i}" for i in range(most)]
    make_images(work, env, [*names, "bench-cycle"], SMALL)
    r["per_backend"] = {}
    for b in backends:
        r["per_backend"][b] = {}
        backend_bench(work, env, a, b, names, scale, levels, r["per_backend"][b])
    r["first_attach"] = first_attach(work, env, backends[0])
    if not a.no_fio:
        r["fio"] = fio_bench(work, env, backends)
    r["load_after"] = os.getloadavg()[0]
    r["detach_retries"] = Volumes.retries
    return r


def backend_bench(work: Path, env: dict[str, str], a: argparse.Namespace, backend: str,
                  names: list[str], scale: list[int], levels: list[int],
                  out: dict[str, Any]) -> dict[str, Any]:
    v = Volumes(work, env, backend)
    v.attach("bench-cycle")  # the first attach of an image costs more: not measured
    v.detach("bench-cycle")
    out["bare"] = bare_cycles(work, env, backend, "bench-cycle", a.runs)
    out["levels"] = {}
    out["scale"] = []
    profiles: dict[str, Any] = {}
    attached: list[str] = []

    def measure_level(n: int) -> None:
        assert len(attached) == n
        out["levels"][str(n)] = v.cycles("bench-cycle", a.runs)
        if a.profile and n in (min(levels), max(levels)):
            profiles[str(n)] = profile_cycle(work, env, v, "bench-cycle")

    if 0 in levels:
        measure_level(0)
    for n in scale:
        sub = names[:n]
        row: dict[str, Any] = {"n": n}
        if n <= a.seq_max:
            row["sequential_attach_s"] = round(timed(lambda s=sub: [v.attach(x) for x in s]), 2)
            row["sequential_detach_s"] = round(timed(lambda s=sub: [v.detach(x) for x in s]), 2)
        row["concurrent_attach_s"] = round(v.all_at_once(sub, v.attach), 2)
        attached[:] = sub
        if n in levels and n:
            measure_level(n)
        row["concurrent_detach_s"] = round(v.all_at_once(sub, v.detach), 2)
        attached.clear()
        if "sequential_attach_s" in row:
            row["attach_speedup"] = round(row["sequential_attach_s"]
                                          / row["concurrent_attach_s"], 2)
            row["detach_speedup"] = round(row["sequential_detach_s"]
                                          / row["concurrent_detach_s"], 2)
        out["scale"].append(row)
    for n in levels:
        if str(n) not in out["levels"]:  # a level the scale did not reach
            sub = names[:n]
            v.all_at_once(sub, v.attach)
            attached[:] = sub
            measure_level(n)
            v.all_at_once(sub, v.detach)
            attached.clear()
    if profiles:
        out["profiles"] = profiles
    return out


def profile_cycle(work: Path, env: dict[str, str], v: Volumes, name: str) -> dict[str, str]:
    """cProfile of one attach and one detach: the functions that took longest
    (cumulative), written next to the results."""
    out = {}
    for verb in ("attach", "detach"):
        prof = work / f"{v.backend}-{verb}.prof"
        argv = [sys.executable, "-m", "cProfile", "-o", str(prof), CEPHVOL, verb, f"rbd/{name}"]
        if verb == "attach":
            argv += ["--backend", v.backend, "--mountpoint", v.mountpoint(name),
                     "--fsck", "skip"]
        run(argv, env)
        out[verb] = run([sys.executable, "-c", "import pstats, sys; "
                         "pstats.Stats(sys.argv[1]).sort_stats('cumulative').print_stats(28)",
                         str(prof)], env)
    return out


def startup_bench(env: dict[str, str], runs: int) -> dict[str, Any]:
    base = getattr(sys, "_base_executable", sys.executable)
    cases = {
        "python3 -c pass": [base, "-c", "pass"],
        "venv python -c pass": [sys.executable, "-c", "pass"],
        "cephvol --version": [CEPHVOL, "--version"],
        "cephvol --help": [CEPHVOL, "--help"],
        "cephvol status": [CEPHVOL, "status"],
    }
    out: dict[str, Any] = {}
    for name, argv in cases.items():
        run(argv, env)  # warm
        walls, cpus = [], []
        for _ in range(runs):
            w, c = timed_cpu(lambda argv=argv: run(argv, env))
            walls.append(w)
            cpus.append(c)
        out[name] = {**stats(walls), "min_ms": round(min(walls) * 1000, 1),
                     "cpu_ms": round(statistics.median(cpus) * 1000, 1)}
    out["version_ratio"] = round(out["cephvol --version"]["median_ms"]
                                 / out["python3 -c pass"]["median_ms"], 2)
    return out


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


def first_attach(work: Path, env: dict[str, str], backend: str) -> dict[str, Any]:
    out = {}
    for size in ("1G", "100G"):
        name = f"rbd/bench-first-{size.lower()}"
        mnt = work / "m" / f"first-{size}"
        t = timed(lambda name=name, size=size, mnt=mnt: (
            run([CEPHVOL, "create", name, "--size", size], env),
            run([CEPHVOL, "attach", name, "--backend", backend, "--mountpoint", str(mnt)],
                env)))
        out[size] = {"ms": round(t * 1000, 1), "backend": backend}
        run([CEPHVOL, "detach", name], env)
    return out


# (name, fio rw, block size, rbd bench --io-type, --io-pattern, rbd bench total at qd 1, 16)
FIO_JOBS = [
    ("seq write 4M", "write", "4M", "write", "seq", 128 << 20, 256 << 20),
    ("seq read 4M", "read", "4M", "read", "seq", 128 << 20, 256 << 20),
    ("rand write 4k", "randwrite", "4k", "write", "rand", 2 << 20, 16 << 20),
    ("rand read 4k", "randread", "4k", "read", "rand", 2 << 20, 16 << 20),
]
FIO_FILE = 256 << 20  # the file fio works on, and the size of rbd bench's image
FIO_RUNTIME = 3  # seconds each fio job may take at most


def _rbd_bench(env: dict[str, str], image: str, io_type: str, size: str, pattern: str,
               total: int, qd: int) -> tuple[float, float]:
    """(MB/s, IOPS) of `rbd bench` (librbd, `qd` in flight) on the same cluster."""
    out = run(["rbd", "-c", env["CEPH_CONF"], "bench", "--io-type", io_type, "--io-size", size,
               "--io-pattern", pattern, "--io-total", str(total), "--io-threads", str(qd),
               image], env)
    last = [ln for ln in out.splitlines() if ln.startswith("elapsed:")][-1].split()
    ops_s = float(last[last.index("ops/sec:") + 1])
    bsize = int(size[:-1]) << (20 if size.endswith("M") else 10)
    return ops_s * bsize / 1e6, ops_s


def _fio(env: dict[str, str], path: Path, rw: str, bs: str, qd: int,
         runtime: int | None) -> tuple[float, float]:
    """(MB/s, IOPS) of fio on a file of the mounted volume: direct I/O,
    libaio, `qd` in flight."""
    argv = ["fio", "--name=cv", f"--filename={path}", f"--rw={rw}", f"--bs={bs}",
            f"--size={FIO_FILE}", "--direct=1", "--ioengine=libaio", f"--iodepth={qd}",
            "--output-format=json"]
    if runtime:
        argv.append(f"--runtime={runtime}")
    if "write" in rw:
        argv.append("--end_fsync=1")
    out = run(argv, env)
    job = json.loads(out[out.index("{"):])["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    return side["bw_bytes"] / 1e6, side["iops"]


def fio_bench(work: Path, env: dict[str, str], backends: list[str]) -> dict[str, Any]:
    """fio through a volume of each backend against `rbd bench` on an image
    of the file's size: the same I/O sizes, patterns and queue depths, run
    alternately so both see the same machine."""
    make_images(work, env, ["bench-fio-raw"], FIO_FILE, fs=False)
    run(["rbd", "-c", env["CEPH_CONF"], "bench", "--io-type", "write",
         "--io-size", "4M", "--io-pattern", "seq", "--io-total", str(FIO_FILE),
         "--io-threads", "16", "rbd/bench-fio-raw"], env)  # every object exists before reads
    run([CEPHVOL, "create", "rbd/bench-fio", "--size", "512M"], env)
    rows: dict[str, list[dict[str, Any]]] = {}
    rbd_rows: list[dict[str, Any]] = []
    for i, b in enumerate(backends):
        mnt = work / "m" / f"fio-{b}"
        run([CEPHVOL, "attach", "rbd/bench-fio", "--backend", b, "--mountpoint", str(mnt)], env)
        f = mnt / "fio.bin"
        rows[b] = []
        try:
            if not f.exists():
                _fio(env, f, "write", "4M", 16, None)  # lay the file down
            for qd in (1, 16):
                for name, rw, bs, io_type, pattern, tot1, tot16 in FIO_JOBS:
                    v_mb, v_iops = _fio(env, f, rw, bs, qd, FIO_RUNTIME)
                    rows[b].append({"workload": name, "qd": qd, "MBps": round(v_mb, 1),
                                    "iops": round(v_iops)})
                    if i == 0:  # rbd bench once, beside the first backend's runs
                        r_mb, r_iops = _rbd_bench(env, "rbd/bench-fio-raw", io_type,
                                                  bs.upper(), pattern,
                                                  tot1 if qd == 1 else tot16, qd)
                        rbd_rows.append({"workload": name, "qd": qd, "MBps": round(r_mb, 1),
                                         "iops": round(r_iops)})
        finally:
            run([CEPHVOL, "detach", "rbd/bench-fio"], env, check=False)
    return {"rbd_bench": rbd_rows, "volumes": rows}


def encryption_bench(work: Path, env: dict[str, str], rounds: int) -> dict[str, Any]:
    """What encryption costs on the qsd backend (librbd LUKS2, the only one
    that decrypts on this host): `cephvol map` (the encrypted open pays the
    LUKS2 key derivation), and dd of 256 MiB (bs 4M, direct I/O) written and
    read back through the device, median of `rounds` map/dd/unmap rounds of
    a plain and an encrypted image of the same size, run alternately."""
    size = 256 << 20
    run([CEPHVOL, "create", "rbd/bench-plain", "--size", "320M"], env)
    run([CEPHVOL, "create", "rbd/bench-luks", "--size", "320M", "--encrypt"], env)
    out: dict[str, dict[str, list[float]]] = {
        k: {"map_s": [], "write_MBps": [], "read_MBps": []} for k in ("plain", "luks2")}
    for _ in range(rounds):
        for kind, image in (("plain", "rbd/bench-plain"), ("luks2", "rbd/bench-luks")):
            t0 = time.monotonic()
            m = json.loads(run([CEPHVOL, "map", image, "--backend", "qsd", "--json"], env))
            out[kind]["map_s"].append(time.monotonic() - t0)
            try:
                dev = m["device"]
                for verb, argv in (
                        ("write_MBps", ["dd", "if=/dev/zero", f"of={dev}", "bs=4M",
                                        f"count={size >> 22}", "oflag=direct", "conv=fsync"]),
                        ("read_MBps", ["dd", f"if={dev}", "of=/dev/null", "bs=4M",
                                       f"count={size >> 22}", "iflag=direct"])):
                    t0 = time.monotonic()
                    run(argv, env)
                    out[kind][verb].append(size / 1e6 / (time.monotonic() - t0))
            finally:
                run([CEPHVOL, "unmap", image], env, check=False)
    res: dict[str, Any] = {"rounds": rounds, "MiB": size >> 20}
    for kind, cols in out.items():
        res[kind] = {k: round(statistics.median(v), 2) for k, v in cols.items()}
    return res


def machine() -> str:
    return (f"{platform.node() or 'host'}: {os.cpu_count()} cores, kernel "
            f"{platform.release()}, Python {platform.python_version()}")


def _target(ok: bool) -> str:
    return "met" if ok else "missed"


def write(r: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(r, indent=1) + "\n")
    for b, pb in r.get("per_backend", {}).items():
        for n, prof in pb.get("profiles", {}).items():
            for verb, text in prof.items():
                (out / f"profile-{b}-{verb}-{n}.txt").write_text(text)
    lines = render(r)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _encryption_lines(r: dict[str, Any]) -> list[str]:
    if "encryption" not in r:
        return []
    e = r["encryption"]
    p, k = e["plain"], e["luks2"]
    return ["", f"Encryption on qsd (median of {e['rounds']} map/dd/unmap rounds, dd of "
            f"{e['MiB']} MiB, bs 4M, direct I/O):", "",
            "| qsd | map s | write MB/s | read MB/s |", "|---|---|---|---|",
            f"| plain | {p['map_s']} | {p['write_MBps']:.0f} | {p['read_MBps']:.0f} |",
            f"| LUKS2 | {k['map_s']} | {k['write_MBps']:.0f} "
            f"({k['write_MBps'] / p['write_MBps'] - 1:+.0%}) | {k['read_MBps']:.0f} "
            f"({k['read_MBps'] / p['read_MBps'] - 1:+.0%}) |"]


def render(r: dict[str, Any]) -> list[str]:
    if "startup" not in r:  # --only-encryption
        return [f"Benchmarks {r['date']} on {r['machine']} (load average "
                f"{r['load_before']:.1f} before, {r['load_after']:.1f} after; "
                f"{r['bench_seconds']} s)", *_encryption_lines(r)]
    s = r["startup"]
    lines = [f"Benchmarks {r['date']} on {r['machine']} (local dev cluster, bluestore; "
             f"load average {r['load_before']:.1f} before, {r['load_after']:.1f} after; "
             f"{r['bench_seconds']} s)", "",
             "Start-up (median / p95 ms, CPU ms):", "",
             "| command | wall | CPU | target |", "|---|---|---|---|"]
    for name in ("python3 -c pass", "venv python -c pass", "cephvol --version",
                 "cephvol --help", "cephvol status"):
        v = s[name]
        target = ""
        if name == "cephvol --version":
            target = (f"≤ 2x python3 -c pass: {s['version_ratio']}x, "
                      f"{_target(s['version_ratio'] <= 2)}")
        lines.append(f"| `{name}` | {v['median_ms']} / {v['p95_ms']} | {v['cpu_ms']} | "
                     f"{target} |")
    lines += ["", "attach + detach of a 32 MiB ext4 volume (`--fsck skip`) vs `bench/bare.sh` "
              "(median ms; CPU = cephvol and the commands it waits for, not the daemon):", "",
              "| backend | attach | detach | cycle | CPU / cycle | bare attach | bare detach "
              "| bare cycle | bare CPU | ratio (target ≤ 2.5x) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for b, pb in r["per_backend"].items():
        c0, bare = pb["levels"].get("0"), pb["bare"]
        if not c0:
            continue
        ratio = round(c0["cycle_ms"] / bare["cycle_ms"], 2)
        lines.append(f"| {b} | {c0['attach']['median_ms']} | {c0['detach']['median_ms']} | "
                     f"{c0['cycle_ms']} | {c0['cpu_ms']} | {bare['attach']['median_ms']} | "
                     f"{bare['detach']['median_ms']} | {bare['cycle_ms']} | {bare['cpu_ms']} | "
                     f"{ratio}x, {_target(ratio <= 2.5)} |")
    lines += ["", "The same cycle with volumes of the same backend already attached (median ms):",
              "", "| backend | already attached | attach | detach | cycle | CPU / cycle | "
              "attach vs none (target ≤ 1.2x) |", "|---|---|---|---|---|---|---|"]
    for b, pb in r["per_backend"].items():
        base = pb["levels"].get("0")
        for n, c in sorted(pb["levels"].items(), key=lambda kv: int(kv[0])):
            rel = ""
            if base and n != "0":
                x = round(c["attach"]["median_ms"] / base["attach"]["median_ms"], 2)
                rel = f"{x}x" + (f", {_target(x <= 1.2)}" if n == "128" else "")
            lines.append(f"| {b} | {n} | {c['attach']['median_ms']} | "
                         f"{c['detach']['median_ms']} | {c['cycle_ms']} | {c['cpu_ms']} | "
                         f"{rel} |")
    if r.get("detach_retries"):
        lines += ["", f"Detaches refused once and run again ({len(r['detach_retries'])}): "
                  + "; ".join(r["detach_retries"][:5])]
    lines += ["", "N volumes attached / detached one after another vs all at once (s):", "",
              "| backend | N | attach seq | attach concurrent | speed-up | detach seq | "
              "detach concurrent | speed-up |", "|---|---|---|---|---|---|---|---|"]
    for b, pb in r["per_backend"].items():
        for row in pb["scale"]:
            sp = row.get("attach_speedup")
            mark = f", {_target(sp >= 3)} (≥ 3x at 32)" if sp and row["n"] == 32 else ""
            lines.append(f"| {b} | {row['n']} | {row.get('sequential_attach_s', '-')} | "
                         f"{row['concurrent_attach_s']} | {sp or '-'}"
                         f"{'x' if sp else ''}{mark} | "
                         f"{row.get('sequential_detach_s', '-')} | {row['concurrent_detach_s']} "
                         f"| {row.get('detach_speedup', '-')}{'x' if sp else ''} |")
    lines += _encryption_lines(r)
    fa = r["first_attach"]
    lines += ["", f"First attach (create + mkfs + mount, {fa['1G']['backend']}): 1 GiB "
              f"{fa['1G']['ms']} ms, 100 GiB {fa['100G']['ms']} ms.", "",
              "Refusals that need no cluster (median / p95 ms): " + "; ".join(
                  f"{k} (exit {v['exit_code']}) {v['median_ms']} / {v['p95_ms']}"
                  for k, v in r["refusals"].items()) + "."]
    if "fio" in r:
        fio = r["fio"]
        bks = list(fio["volumes"])
        lines += ["", "fio on a file of the mounted volume (direct I/O, libaio, at most "
                  f"{FIO_RUNTIME} s each) vs `rbd bench` (librbd) on a {FIO_FILE >> 20} MiB "
                  "image, MB/s (IOPS) and the ratio to rbd bench:", "",
                  "| workload | qd | rbd bench | " + " | ".join(bks) + " | target |",
                  "|---|---|---|" + "---|" * len(bks) + "---|"]
        for i, rb in enumerate(fio["rbd_bench"]):
            cells = []
            for b in bks:
                v = fio["volumes"][b][i]
                cells.append(f"{v['MBps']} ({v['iops']}) {v['MBps'] / rb['MBps']:.2f}x")
            target = ""
            if rb["qd"] == 16:
                want = {"seq read 4M": 0.6, "rand read 4k": 0.5}.get(rb["workload"], 0.8)
                best = max(fio["volumes"][b][i]["MBps"] / rb["MBps"] for b in bks)
                target = f"≥ {want}x: {_target(best >= want)}"
            lines.append(f"| {rb['workload']} | {rb['qd']} | {rb['MBps']} ({rb['iops']}) | "
                         + " | ".join(cells) + f" | {target} |")
    return lines


if __name__ == "__main__":
    main()
