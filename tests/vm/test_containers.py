"""Real containers: Docker and Podman under systemd as PID 1 (the guest image
booted by systemd-nspawn on this kernel, fuse backend), driven by units that
`cephvol units render` makes, and copies of a volume's mount that other
containers keep in their mount namespaces.

The nspawn host runs in a network namespace of its own with the test's dev
cluster (nothing of the host's network or firewall is touched); its mounts
are its own, so these tests do not disturb tests that assert on the host's
mounts. The first test works on this host directly with `unshare -m`
namespaces and ends them before it returns.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import CephCluster
from tests.vm.conftest import CEPHVOL
from tests.vm.harness import (
    Guest,
    NetNS,
    NspawnHost,
    busybox_image,
    ensure_image,
    nspawn_unavailable,
)


def _until(what: str, check: object, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _ns(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/mnt")


def _holds(pid: int, path: Path) -> bool:
    return any(ln.split()[4] == str(path)
               for ln in Path(f"/proc/{pid}/mountinfo").read_text().splitlines())


@pytest.fixture
def namespaces() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes in private mount namespaces the test makes; all ended after it."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        p.kill()
        p.wait(timeout=30)


def test_a_copy_in_a_cloned_namespace_is_unmounted_there_unless_in_use(
        cluster: CephCluster, image: str, mnt: Path,
        namespaces: list[subprocess.Popen[bytes]]) -> None:
    """Two namespaces made while the volume is mounted (as a container started
    then would be): each keeps a private copy of the mount at the same path.
    While a process has its cwd in one copy, detach refuses and names it and
    changes nothing; once it is gone, detach unmounts both copies inside their
    namespaces (the idle namespace lives on), and the data is intact."""
    cluster.cli("create", image, "--size", "64M", check=True)
    cluster.cli("attach", image, "--mountpoint", str(mnt), check=True)
    (mnt / "f").write_text("kept\n")
    me = _ns(os.getpid())
    idle = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sleep", "300"])
    user = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c",
                             f"cd {mnt} && exec sleep 300"])
    namespaces += [idle, user]
    for p in (idle, user):
        _until("the namespace", lambda p=p: _ns(p.pid) != me and  # type: ignore[misc]
               Path(f"/proc/{p.pid}/comm").read_text().strip() == "sleep")
        assert _holds(p.pid, mnt)

    cp = cluster.cli("detach", image)
    assert cp.returncode == 4, cp.stderr
    assert f"pid {user.pid} (sleep) has its cwd there" in cp.stderr, cp.stderr
    assert os.path.ismount(mnt) and _holds(idle.pid, mnt) and _holds(user.pid, mnt)

    user.kill()
    user.wait(timeout=30)
    cp = cluster.cli("detach", image, "--json")
    assert cp.returncode == 0, cp.stderr
    assert f"umount-copy {mnt}" in json.loads(cp.stdout)["steps"]
    assert idle.poll() is None and not _holds(idle.pid, mnt)
    assert not os.path.ismount(mnt)
    cluster.cli("attach", image, "--mountpoint", str(mnt), check=True)
    assert (mnt / "f").read_text() == "kept\n"
    cluster.cli("detach", image, check=True)


# -- Docker and Podman under systemd ------------------------------------------------------------

ENGINES = ("docker", "podman")
IMAGE = {"docker": "cvbox", "podman": "localhost/cvbox"}
# What the containers run (`--command`, after the image; systemd turns $$ into $).
# Each start appends "start N", N = the lines already there, and fsyncs only that
# file: a global sync would wait on every FUSE filesystem of this machine.
_APPEND = ("touch /data/log; n=$$(wc -l < /data/log); echo \"start $$n\" >> /data/log; "
           "sync /data/log")
_MOUNT = "mkdir -p /data && mount -t ext4 /dev/cephvol /data || exit 3; "
_RUN = "; while true; do sleep 1 & wait; done"


def _command(style: str, *, once: bool = False) -> str:
    if style == "bind":
        body = _APPEND if once else f"trap \"exit 0\" TERM; {_APPEND}{_RUN}"
    else:  # device: the container mounts the raw device itself (CAP_SYS_ADMIN)
        body = (f"{_MOUNT}{_APPEND}; umount /data" if once else
                f"{_MOUNT}trap \"cd /; umount /data; exit 0\" TERM; {_APPEND}{_RUN}")
    return f"sh -c '{body}'"


@dataclass(frozen=True)
class Site:
    """Where the container hosts live: a network namespace of their own with the
    dev cluster on its loopback, and the busybox image tarball."""

    netns: str
    cluster: Path
    images: Path
    work: Path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    why = nspawn_unavailable()
    if why:
        pytest.skip(why)
    ensure_image()
    work = Path(tmp_path_factory.mktemp("containers"))
    (work / "images").mkdir()
    busybox_image(work / "images")
    cdir = work / "cluster"
    with NetNS("cvc", tap=False) as ns:
        env = dict(os.environ, CEPHVOL_CONNECT_TIMEOUT="20")
        try:
            cp = subprocess.run([CEPHVOL, "dev-cluster", "up", "--dir", str(cdir), "--addr",
                                 "127.0.0.1", "--netns", ns.name], capture_output=True,
                                text=True, env=env, timeout=300, check=False)
            assert cp.returncode == 0, cp.stderr
            yield Site(ns.name, cdir, work / "images", work)
        finally:
            subprocess.run([CEPHVOL, "dev-cluster", "down", "--dir", str(cdir)],
                           capture_output=True, timeout=120, check=False)
    assert not [ln for ln in subprocess.run(["losetup", "-l", "-n"], capture_output=True,
                                            text=True).stdout.splitlines()
                if str(work) in ln or "/run/cephvol/fuse/rbd,-,c-" in ln]


@contextlib.contextmanager
def container_host(site: Site, label: str, state_dir: str | None = None
                   ) -> Iterator[NspawnHost]:
    """A container host (its own machine-id) of the site: Docker started, the busybox
    image imported into both engines; whatever is attached is detached at the end.

    Hosts on one kernel share its loop devices, and the fuse backend finds its
    mappings by the loop's backing-file path: a second host here needs its own
    `state_dir` (its rbd-fuse paths), or each would take the other's loop device
    for its own (real hosts have a kernel each)."""
    env = {"CEPHVOL_STATE_DIR": state_dir} if state_dir else {}
    with NspawnHost(ensure_image(), site.work / f"host-{label}", site.netns, env=env,
                    binds=(str(site.cluster), f"{site.images}:/opt/images")) as h:
        t0 = time.monotonic()
        h.ok("sh", "-c", f"mkdir -p /etc/ceph && cp {site.cluster}/ceph.conf /etc/ceph/")
        h.ok("systemctl", "start", "docker")
        h.ok("docker", "import", "/opt/images/busybox.tar", IMAGE["docker"])
        h.ok("podman", "import", "-q", "/opt/images/busybox.tar", IMAGE["podman"])
        print(f"\ncontainer host {label}: boot {h.boot_seconds} s, docker start + imports "
              f"{time.monotonic() - t0:.1f} s")
        try:
            yield h
        finally:
            h.run("cephvol", "cleanup", "--all", "--force", timeout=300)


@pytest.fixture(scope="module")
def chost(site: Site) -> Iterator[NspawnHost]:
    """The module's container host: the guest image under systemd-nspawn."""
    with container_host(site, "a") as h:
        yield h


@pytest.fixture
def volume(chost: NspawnHost) -> Iterator[str]:
    """rbd/c-<random> (64 MiB), made in the container host; removed after the test
    with whatever units and containers the test left."""
    spec = f"rbd/c-{uuid.uuid4().hex[:8]}"
    chost.ok("cephvol", "create", spec, "--size", "64M")
    yield spec
    name = spec.split("/")[1]
    units = chost.run("sh", "-c", f"ls /etc/systemd/system | grep '^{name}'").stdout.split()
    for u in units:
        chost.run("systemctl", "stop", u, timeout=300)
    for engine in ENGINES:
        chost.run("sh", "-c", f"{engine} ps -aq --filter name={name} | xargs -r {engine} rm -f")
    chost.run("cephvol", "detach", "--force", spec, timeout=120)
    for u in units:
        chost.run("rm", "-f", f"/etc/systemd/system/{u}")
    chost.run("systemctl", "daemon-reload")
    chost.run("systemctl", "reset-failed")
    chost.run("cephvol", "rm", spec, timeout=60)


def _render(h: NspawnHost, spec: str, engine: str, style: str, unit: str, *,
            command: str, image: str | None = None) -> None:
    h.ok("cephvol", "units", "render", spec, "--for", engine, "--style", style, "--image",
         image or IMAGE[engine], "--name", unit, "--command", command,
         "--setenv", "CEPHVOL_STEP_TIMEOUT=60",
         *[a for k, v in h.env.items() for a in ("--setenv", f"{k}={v}")],
         "-o", "/etc/systemd/system")


def _state(h: NspawnHost, unit: str) -> str:
    return h.run("systemctl", "is-active", unit).stdout.strip()


def _settled(h: NspawnHost, unit: str, timeout: float = 240) -> str:
    """Wait until the unit is neither starting, running nor stopping."""
    _until(f"{unit} to stop", lambda: _state(h, unit) not in (
        "active", "activating", "deactivating", "reloading"), timeout)
    return _state(h, unit)


def _journal(h: NspawnHost, unit: str) -> str:
    return h.run("journalctl", "--no-pager", "-o", "cat", "-n", "40", "-u", unit).stdout


def _start(h: NspawnHost, unit: str) -> None:
    cp = h.run("systemctl", "start", unit, timeout=300)
    assert cp.returncode == 0, _journal(h, unit)


def _lines(h: NspawnHost, engine: str, unit: str, n: int) -> None:
    """Wait until the running container `unit` has written its line (n lines)."""
    def written() -> bool:
        cp = h.run(engine, "exec", unit, "cat", "/data/log")
        return cp.returncode == 0 and len(cp.stdout.split("\n")) - 1 >= n
    _until(f"line {n} from {unit}", written, 60)


def _released(h: NspawnHost, spec: str, unit: str) -> None:
    """After a stop: nothing of the volume mounted or mapped in the container host,
    its ownership given back, the env file gone."""
    image = spec.split("/")[1]
    rows = [r for r in json.loads(h.ok("cephvol", "status", "--json")) if r["image"] == spec]
    assert rows == [], _journal(h, unit)
    mounts = h.ok("cat", "/proc/1/mountinfo")
    assert image not in mounts and f"/srv/cephvol/{unit} " not in mounts, mounts
    assert image not in subprocess.run(["losetup", "-l", "-n"], capture_output=True,
                                       text=True).stdout
    assert not subprocess.run(["pgrep", "-f", f"rbd-fuse .*-r {image} "],
                              capture_output=True).stdout
    assert json.loads(h.ok("cephvol", "owner", spec, "--json"))["owner"] is None
    assert h.run("test", "-e", f"/run/cephvol/{unit}.env").returncode != 0


def _failed(h: NspawnHost, unit: str) -> str:
    """The unit's recorded failure (systemctl is-failed / Result), then reset."""
    result = h.ok("systemctl", "show", "-p", "Result", "--value", unit).strip()
    assert h.run("systemctl", "is-failed", unit).stdout.strip() == "failed", result
    assert "failed" in h.run("systemctl", "status", "--no-pager", unit).stdout
    h.ok("systemctl", "reset-failed", unit)
    return result


def _log(h: NspawnHost, spec: str) -> list[str]:
    """The volume's log, read through a hand attach (and detached again)."""
    mp = f"/srv/check/{spec.split('/')[1]}"
    h.ok("cephvol", "attach", spec, "--mountpoint", mp)
    try:
        return h.ok("cat", f"{mp}/log").splitlines()
    finally:
        h.ok("cephvol", "detach", spec)


@pytest.mark.parametrize("style", ["bind", "device"])
@pytest.mark.parametrize("engine", ENGINES)
def test_unit_stop_kill_failed_start_restart_and_exit(
        chost: NspawnHost, volume: str, engine: str, style: str) -> None:
    """The seed's flow with a real container under systemd, through the units
    `cephvol units render` makes. After every way a container can end, the
    volume is released; every line written before is still there."""
    h, spec = chost, volume
    name = spec.split("/")[1]
    main, once, bad = name, f"{name}-once", f"{name}-bad"
    _render(h, spec, engine, style, main, command=_command(style))
    _render(h, spec, engine, style, once, command=_command(style, once=True))
    _render(h, spec, engine, style, bad, command=_command(style), image="cephvol-missing")
    h.ok("systemctl", "daemon-reload")
    took: dict[str, float] = {}

    def case(label: str, fn: Callable[[], None]) -> None:
        t0 = time.monotonic()
        fn()
        took[label] = round(time.monotonic() - t0, 1)

    def stop() -> None:
        _start(h, main)
        _lines(h, engine, main, 1)
        h.ok("systemctl", "stop", main, timeout=300)
        assert _settled(h, main) == "inactive", _journal(h, main)
        _released(h, spec, main)

    def kill() -> None:
        _start(h, main)
        _lines(h, engine, main, 2)
        h.ok("systemctl", "kill", "-s", "KILL", main)
        _settled(h, main)
        _released(h, spec, main)
        assert _failed(h, main) in ("signal", "exit-code")

    def failed_start() -> None:
        h.run("systemctl", "start", bad, timeout=300)  # Type=exec (docker) returns 0
        _settled(h, bad)
        _released(h, spec, bad)
        assert _failed(h, bad) == "exit-code"

    def restart() -> None:
        _start(h, main)
        _lines(h, engine, main, 3)
        h.ok("systemctl", "restart", main, timeout=300)
        assert _state(h, main) == "active"
        _lines(h, engine, main, 4)
        h.ok("systemctl", "stop", main, timeout=300)
        assert _settled(h, main) == "inactive", _journal(h, main)
        _released(h, spec, main)

    def exits() -> None:
        _start(h, once)
        assert _settled(h, once) == "inactive", _journal(h, once)
        _released(h, spec, once)

    for label, fn in (("stop", stop), ("kill", kill), ("failed start", failed_start),
                      ("restart", restart), ("exits by itself", exits)):
        case(label, fn)
    assert _log(h, spec) == [f"start {i}" for i in range(5)]
    print(f"\n{engine} --style {style}: seconds per case {took}")


@pytest.mark.parametrize("engine", ENGINES)
def test_a_copy_held_by_an_unrelated_container(
        chost: NspawnHost, volume: str, engine: str) -> None:
    """A container started while the volume is mounted, binding a parent of the
    mountpoint (`-v /srv:/host-srv`, the engines' default private propagation),
    keeps a copy of the mount. Stopping the volume's unit unmounts that copy
    inside the container's namespace (the container keeps running, and sees the
    empty directory); while a process there works in the copy, detach refuses,
    naming the container, and nothing is lost."""
    h, spec = chost, volume
    name = spec.split("/")[1]
    net = ["--network=none"] if engine == "docker" else []
    _render(h, spec, engine, "bind", name, command=_command("bind"))
    h.ok("systemctl", "daemon-reload")
    copy = f"/host-srv/cephvol/{name}/log"

    _start(h, name)
    _lines(h, engine, name, 1)
    agent = f"{name}-agent"
    h.ok(engine, "run", "-d", *net, "--name", agent, "-v", "/srv:/host-srv", IMAGE[engine],
         "sleep", "3600")
    assert h.ok(engine, "exec", agent, "cat", copy) == "start 0\n"  # the copy
    h.ok("systemctl", "stop", name, timeout=300)
    assert _settled(h, name) == "inactive"
    _released(h, spec, name)
    assert h.ok(engine, "inspect", "-f", "{{.State.Running}}", agent).strip() == "true"
    assert h.run(engine, "exec", agent, "test", "-e", copy).returncode == 1
    journal = h.ok("journalctl", "--no-pager", "-o", "cat", "-u", name)
    assert f"umount-copy /host-srv/cephvol/{name}" in journal, journal

    _start(h, name)
    _lines(h, engine, name, 2)
    user = f"{name}-user"
    h.ok(engine, "run", "-d", *net, "--name", user, "-v", "/srv:/host-srv", "-w",
         f"/host-srv/cephvol/{name}", IMAGE[engine], "sleep", "3600")
    h.run("systemctl", "stop", name, timeout=300)
    _settled(h, name)
    assert _failed(h, name) == "exit-code"  # ExecStopPost's detach refused
    journal = h.ok("journalctl", "--no-pager", "-o", "cat", "-u", name)
    assert f"({engine} container {user}; pid " in journal and "has its cwd there" in journal, \
        journal
    assert json.loads(h.ok("cephvol", "status", "--json"))[0]["mounted"]  # nothing undone
    h.ok(engine, "rm", "-f", user)
    h.ok("cephvol", "detach", spec)
    _released(h, spec, name)
    assert _log(h, spec) == ["start 0", "start 1"]


def _owner(h: NspawnHost, spec: str) -> tuple[str | None, bool]:
    row = json.loads(h.ok("cephvol", "owner", spec, "--json"))
    return (row["owner"] or {}).get("host_id"), bool(row["this_host"])


def test_the_volume_moves_between_two_container_hosts(
        site: Site, chost: NspawnHost, volume: str) -> None:
    """Two container hosts (two machine-ids, one cluster): the unit runs on A and
    writes, stops; starts on B and sees A's line; ownership follows it. While B
    has it, A's unit fails to start (owned by B) and changes nothing."""
    a, spec = chost, volume
    name = spec.split("/")[1]
    with container_host(site, "b", state_dir="/run/cephvol-b") as b:
        ids = {h: h.ok("cat", "/etc/machine-id").strip() for h in (a, b)}
        assert ids[a] != ids[b]
        for h in (a, b):
            _render(h, spec, "docker", "bind", name, command=_command("bind"))
            h.ok("systemctl", "daemon-reload")
        moves = [a, b, a]
        for n, h in enumerate(moves, start=1):
            t0 = time.monotonic()
            _start(h, name)
            _lines(h, "docker", name, n)  # every earlier host's lines are there
            assert _owner(h, spec) == (ids[h], True)
            other = b if h is a else a
            assert _owner(other, spec) == (ids[h], False)
            if n == 2:  # the volume is B's: A's unit must not take it
                other.run("systemctl", "start", name, timeout=300)
                _settled(other, name)
                assert "owned by" in _journal(other, name)
                assert spec not in other.ok("cephvol", "status"), _journal(other, name)
                _failed(other, name)
                assert _owner(h, spec) == (ids[h], True)
            h.ok("systemctl", "stop", name, timeout=300)
            assert _settled(h, name) == "inactive", _journal(h, name)
            _released(h, spec, name)
            print(f"\nmove {n}: {time.monotonic() - t0:.1f} s")
        assert _log(a, spec) == ["start 0", "start 1", "start 2"]
        b.run("rm", "-f", f"/etc/systemd/system/{name}.service")


@pytest.mark.parametrize("engine", ENGINES)
def test_what_the_container_sees(chost: NspawnHost, volume: str, engine: str) -> None:
    """Issue 14 item 5. A unit rendered with `--owner 1000:1000`: its first
    attach makes the filesystem with the root owned by 1000:1000, and a
    process of uid 1000 in the container writes there (uid 1001 cannot); the
    container's environment has CEPHVOL_* with its own view (CEPHVOL_MOUNTPOINT
    is the path inside). A `--read-only` unit of the same volume: the
    container sees the data and cannot write ("Read-only file system")."""
    h, spec = chost, volume
    name = spec.split("/")[1]
    rw, ro = f"{name}-rw", f"{name}-ro"
    keep = "sh -c 'trap \"exit 0\" TERM; while true; do sleep 1 & wait; done'"
    for unit, extra in ((rw, ["--owner", "1000:1000"]), (ro, ["--read-only"])):
        h.ok("cephvol", "units", "render", spec, "--for", engine, "--image", IMAGE[engine],
             "--name", unit, "--command", keep, "--container-path", "/srv/app", *extra,
             *[a for k, v in h.env.items() for a in ("--setenv", f"{k}={v}")],
             "-o", "/etc/systemd/system")
    h.ok("systemctl", "daemon-reload")

    def running(unit: str) -> None:  # docker's Type=exec: started is not yet running
        _until(f"{unit}'s container to run", lambda: h.run(
            engine, "exec", unit, "true").returncode == 0 or _state(h, unit) != "active", 60)
        assert _state(h, unit) == "active", _journal(h, unit)

    _start(h, rw)
    running(rw)
    env = dict(ln.split("=", 1) for ln in h.ok(engine, "exec", rw, "env").splitlines()
               if ln.startswith("CEPHVOL_"))
    assert env == {"CEPHVOL_IMAGE": spec, "CEPHVOL_FSTYPE": "ext4", "CEPHVOL_READ_ONLY": "0",
                   "CEPHVOL_MOUNTPOINT": "/srv/app"}, _journal(h, rw)
    wrote = h.run(engine, "exec", "-u", "1000:1000", rw, "sh", "-c",
                  "id -u > /srv/app/by-1000 && stat -c %u:%g:%a /srv/app")
    assert wrote.returncode == 0 and wrote.stdout.strip() == "1000:1000:755", wrote.stderr
    other = h.run(engine, "exec", "-u", "1001:1001", rw, "sh", "-c", "echo x > /srv/app/x")
    assert other.returncode != 0 and "Permission denied" in other.stderr, other
    h.ok("systemctl", "stop", rw, timeout=300)
    assert _settled(h, rw) == "inactive", _journal(h, rw)
    _released(h, spec, rw)

    _start(h, ro)
    running(ro)
    env = dict(ln.split("=", 1) for ln in h.ok(engine, "exec", ro, "env").splitlines()
               if ln.startswith("CEPHVOL_"))
    assert env["CEPHVOL_READ_ONLY"] == "1" and env["CEPHVOL_MOUNTPOINT"] == "/srv/app"
    assert h.ok(engine, "exec", ro, "cat", "/srv/app/by-1000").strip() == "1000"
    for user in ("0:0", "1000:1000"):
        cp = h.run(engine, "exec", "-u", user, ro, "sh", "-c", "echo x > /srv/app/ro")
        assert cp.returncode != 0 and "Read-only file system" in cp.stderr, (user, cp)
    h.ok("systemctl", "stop", ro, timeout=300)
    assert _settled(h, ro) == "inactive", _journal(h, ro)
    _released(h, spec, ro)
    mp = f"/srv/check/{name}"
    h.ok("cephvol", "attach", spec, "--mountpoint", mp)
    try:
        files = h.ok("ls", mp).split()
    finally:
        h.ok("cephvol", "detach", spec)
    assert "by-1000" in files and "ro" not in files and "x" not in files, files


def _freeze(h: NspawnHost, frozen: bool) -> None:
    """Freeze (or thaw) the whole container host: systemd, dockerd, the
    container, rbd-fuse. To the cluster a frozen host is a dead one (its
    watch expires); thawed, it is the host that wakes and must not write."""
    (h.cgroup / "cgroup.freeze").write_text("1" if frozen else "0")
    want = f"frozen {int(frozen)}"
    _until(f"cgroup.events {want}", lambda: want in (h.cgroup / "cgroup.events")
           .read_text().splitlines(), 30)


def test_a_dead_hosts_volume_moves_with_takeover_and_the_host_is_fenced(
        site: Site, chost: NspawnHost, volume: str) -> None:
    """Issue 14 item 3: A's container runs and has written when A dies (frozen:
    nothing of it runs, its client's watch expires). B's unit, rendered with
    `--takeover`, starts: it waits for A's client to go, fences it, and its
    container sees A's line. A wakes: its container's write never reaches the
    image, and A's unit stops with the failure named."""
    a, spec = chost, volume
    name = spec.split("/")[1]
    with container_host(site, "b", state_dir="/run/cephvol-b") as b:
        ids = {h: h.ok("cat", "/etc/machine-id").strip() for h in (a, b)}
        _render(a, spec, "docker", "bind", name, command=_command("bind"))
        b.ok("cephvol", "units", "render", spec, "--for", "docker", "--style", "bind",
             "--image", IMAGE["docker"], "--name", name, "--command", _command("bind"),
             "--takeover", "--setenv", "CEPHVOL_STEP_TIMEOUT=60",
             *[x for k, v in b.env.items() for x in ("--setenv", f"{k}={v}")],
             "-o", "/etc/systemd/system")
        for h in (a, b):
            h.ok("systemctl", "daemon-reload")
        _start(a, name)
        _lines(a, "docker", name, 1)
        a_addrs = json.loads(a.ok("cephvol", "owner", spec, "--json"))["owner"]["addrs"]
        assert a_addrs

        t0 = time.monotonic()
        _freeze(a, True)
        try:
            _start(b, name)  # attach --takeover: waits out A's watch, fences A
            took = time.monotonic() - t0
            _lines(b, "docker", name, 2)  # B's container sees A's line and adds its own
            row = json.loads(b.ok("cephvol", "owner", spec, "--json"))
            assert row["owner"]["host_id"] == ids[b] and row["this_host"]
            prev = row["owner"]["taken_over_from"]
            assert prev["host_id"] == ids[a] and sorted(prev["fenced"]) == sorted(a_addrs)
            assert not prev["forced"]
        finally:
            _freeze(a, False)
        print(f"\ntakeover of a frozen container host by B's unit: {took:.1f} s")

        # A wakes: its container writes on; the write must not reach the image
        # (rbd-fuse waits on a fenced write rather than failing it: give it
        # time, then take A's rbd-fuse down, by pid, in A)
        with contextlib.suppress(subprocess.TimeoutExpired):
            a.run("docker", "exec", name, "sh", "-c", "echo late-from-a >> /data/log; "
                  "sync /data/log", timeout=20)
        for pid in a.run("pgrep", "-x", "rbd-fuse").stdout.split():
            a.run("kill", "-KILL", pid)
        a.run("systemctl", "stop", name, timeout=300)
        _settled(a, name)
        assert "not written" in _journal(a, name) or "lost" in _journal(a, name), \
            _journal(a, name)
        assert _failed(a, name) == "exit-code"
        gone = a.run("cephvol", "detach", "--force", spec, timeout=300)
        assert gone.returncode in (0, 12), gone.stderr
        assert [r for r in json.loads(a.ok("cephvol", "status", "--json"))
                if r["image"] == spec] == []
        assert json.loads(a.ok("cephvol", "owner", spec, "--json"))["owner"][
            "host_id"] == ids[b]  # A's cleanup took nothing from B

        b.ok("systemctl", "stop", name, timeout=300)
        assert _settled(b, name) == "inactive", _journal(b, name)
        _released(b, spec, name)
        assert _log(b, spec) == ["start 0", "start 1"]  # no late-from-a
        b.run("rm", "-f", f"/etc/systemd/system/{name}.service")


def test_podman_unit_in_the_krbd_guest(guest_ceph: Guest, vm_image: Callable[[str], str],
                                       tmp_path: Path) -> None:
    """The qemu guest (Debian's kernel, krbd, systemd) runs an engine too: a Podman
    unit attaches through krbd, its container writes, the stop releases it."""
    g = guest_ceph
    spec = vm_image("ctr")
    name = spec.split("/")[1]
    t0 = time.monotonic()
    g.put("/root/busybox.tar", busybox_image(tmp_path).read_bytes())
    g.run(["podman", "import", "-q", "/root/busybox.tar", IMAGE["podman"]], check=True,
          timeout=300)
    imported = time.monotonic() - t0
    g.run(["cephvol", "units", "render", spec, "--for", "podman", "--image", IMAGE["podman"],
           "--name", name, "--command", _command("bind"), "-o", "/etc/systemd/system"],
          check=True)
    g.run(["systemctl", "daemon-reload"], check=True)
    t0 = time.monotonic()
    g.run(["systemctl", "start", name], check=True, timeout=300)
    _until("the container's line", lambda: g.run(
        ["podman", "exec", name, "cat", "/data/log"]).stdout == "start 0\n", 120)
    started = time.monotonic() - t0
    assert 'CEPHVOL_BACKEND="krbd"' in g.run(["cat", f"/run/cephvol/{name}.env"]).stdout
    t0 = time.monotonic()
    g.run(["systemctl", "stop", name], check=True, timeout=300)
    stopped = time.monotonic() - t0
    assert g.run(["systemctl", "is-active", name]).stdout.strip() == "inactive"
    assert json.loads(g.run(["cephvol", "status", "--json"], check=True).stdout) == []
    assert g.run(["ls", "/sys/bus/rbd/devices"]).stdout.split() == []
    assert json.loads(g.run(["cephvol", "owner", spec, "--json"], check=True).stdout)[
        "owner"] is None
    assert g.run(["test", "-e", f"/run/cephvol/{name}.env"]).rc != 0
    print(f"\nqemu guest, podman: import {imported:.1f} s, start to first line "
          f"{started:.1f} s, stop {stopped:.1f} s")
