"""One writer per volume across hosts, with two simulated hosts.

Hosts A and B are two network namespaces made here (10.97.0.2 and .3),
each with its own host id and state directory, bridged to a third namespace
in which a dev cluster listens on 10.97.0.1; every cephvol command (and the
rbd-fuse it starts) runs inside its host's namespace via nsenter, so the
cluster sees two clients at two addresses, as it would see two machines.
They share this machine's kernel, so loop devices and mounts are the real
thing on both sides.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import CEPHVOL, _root_ok

SUBNET = "10.97.0"


def _ip(*args: str) -> None:
    cp = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    assert cp.returncode == 0, f"ip {' '.join(args)}: {cp.stderr}"


@dataclass
class Host:
    name: str
    netns: str
    addr: str
    base: Path
    conf: Path

    @property
    def state(self) -> Path:
        return self.base / "state"

    def mnt(self, image: str) -> Path:
        return self.base / "mnt" / image

    def env(self) -> dict[str, str]:
        # rbd-fuse: these tests kill a host's mapping daemon by its name
        return dict(os.environ, CEPH_CONF=str(self.conf), CEPHVOL_STATE_DIR=str(self.state),
                    CEPHVOL_HOST_ID=f"host-{self.name}", CEPHVOL_HOST_NAME=self.name,
                    CEPHVOL_CONNECT_TIMEOUT="15", CEPHVOL_BACKEND="fuse")

    def argv(self, *args: str) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.netns}", "--", CEPHVOL, *args]

    def cv(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*args), capture_output=True, text=True,
                              env=self.env(), timeout=timeout, check=False)

    def ok(self, *args: str, timeout: float = 180) -> str:
        cp = self.cv(*args, timeout=timeout)
        assert cp.returncode == 0, f"{self.name}: cephvol {' '.join(args)}: {cp.stderr}"
        return cp.stdout

    def start(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(self.argv(*args), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=self.env())

    def fuse_pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-f", f"rbd-fuse .*{self.state}"], capture_output=True,
                             text=True, check=False).stdout
        return [int(p) for p in out.split()]


@dataclass
class TwoHosts:
    a: Host
    b: Host
    cluster_dir: Path

    def admin(self, *args: str) -> str:
        return self.a.ok(*args)

    def ceph(self, *args: str) -> str:
        cp = subprocess.run(["nsenter", f"--net=/run/netns/{self.a.netns}", "--", "ceph",
                             "-c", str(self.a.conf), *args], capture_output=True, text=True,
                            timeout=60, check=False)
        assert cp.returncode == 0, cp.stderr
        return cp.stdout


@pytest.fixture(scope="module")
def hosts(session_base: Path) -> Iterator[TwoHosts]:
    why = _root_ok()
    if why:
        pytest.skip(why)
    tag = uuid.uuid4().hex[:6]
    names = {"c": f"cvo-c-{tag}", "a": f"cvo-a-{tag}", "b": f"cvo-b-{tag}"}
    base = session_base / f"own-{tag}"
    cdir = base / "cluster"
    made: list[str] = []
    hs: list[Host] = []
    try:
        for ns in names.values():
            _ip("netns", "add", ns)
            made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        c = names["c"]
        _ip("-n", c, "link", "add", "br0", "type", "bridge")
        _ip("-n", c, "addr", "add", f"{SUBNET}.1/24", "dev", "br0")
        _ip("-n", c, "link", "set", "br0", "up")
        for i, h in enumerate(("a", "b"), start=2):
            ns = names[h]
            _ip("-n", c, "link", "add", f"v{h}", "type", "veth", "peer", "name", "eth0",
                "netns", ns)
            _ip("-n", c, "link", "set", f"v{h}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{SUBNET}.{i}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            hs.append(Host(h, ns, f"{SUBNET}.{i}", base / f"host-{h}", cdir / "ceph.conf"))
        up = subprocess.run([CEPHVOL, "dev-cluster", "up", "--dir", str(cdir), "--addr",
                             f"{SUBNET}.1", "--netns", c], capture_output=True, text=True,
                            timeout=300, check=False)
        assert up.returncode == 0, up.stderr
        yield TwoHosts(hs[0], hs[1], cdir)
    finally:
        for h in hs:  # whatever a failed test left: the hosts' own cleanup first
            if h.state.exists():
                h.cv("cleanup", "--all", "--force", timeout=300)
            for pid in h.fuse_pids():
                os.kill(pid, signal.SIGKILL)
        subprocess.run([CEPHVOL, "dev-cluster", "down", "--dir", str(cdir)],
                       capture_output=True, timeout=120, check=False)
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        for ns in made:
            assert not Path("/run/netns", ns).exists(), f"netns {ns} left behind"


@pytest.fixture
def volume(hosts: TwoHosts) -> Iterator[str]:
    name = f"own-{uuid.uuid4().hex[:8]}"
    hosts.admin("create", f"rbd/{name}", "--size", "64M")
    yield name
    for h in (hosts.a, hosts.b):
        h.cv("detach", "--force", f"rbd/{name}")
    hosts.a.cv("owner", f"rbd/{name}", "--release")
    hosts.b.cv("owner", f"rbd/{name}", "--release")
    hosts.admin("rm", f"rbd/{name}")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write(path: Path, size: int = 1 << 20) -> str:
    data = os.urandom(size)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def _owner(h: Host, spec: str) -> dict[str, object]:
    return json.loads(h.ok("owner", spec, "--json"))["owner"]


def test_second_host_is_refused_until_the_first_detaches(hosts: TwoHosts, volume: str) -> None:
    a, b = hosts.a, hosts.b
    spec = f"rbd/{volume}"
    a.ok("attach", spec, "-m", str(a.mnt(volume)))
    digest = _write(a.mnt(volume) / "db")
    own = _owner(b, spec)
    assert own["host_id"] == "host-a" and own["host"] == "a"
    assert [x.split(":")[0] for x in own["addrs"]] == [a.addr]  # A's rbd-fuse, as seen by Ceph
    status = json.loads(a.ok("status", "--json"))
    assert status[0]["owner"]["host_id"] == "host-a"

    refused = b.cv("attach", spec, "-m", str(b.mnt(volume)))
    assert refused.returncode == 6, refused.stderr
    assert "owned by host a (id host-a) since" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert not b.mnt(volume).is_mount() and b.fuse_pids() == []
    assert json.loads(b.ok("status", "--json")) == []  # nothing half-done on B
    rm = b.cv("rm", spec)  # nor can B remove A's volume
    assert rm.returncode == 6 and "owned by host a" in rm.stderr, rm.stderr

    a.ok("detach", spec)
    assert _owner(b, spec) is None  # released after the unmap
    b.ok("attach", spec, "-m", str(b.mnt(volume)))
    assert _sha(b.mnt(volume) / "db") == digest
    assert _owner(a, spec)["host_id"] == "host-b"
    b.ok("detach", spec)
    assert _owner(a, spec) is None


def test_crashed_owner_is_fenced_and_taken_over(hosts: TwoHosts, volume: str) -> None:
    """A dies with the volume mapped (cephvol is not running; its rbd-fuse is
    killed): B needs --takeover, which waits for A's watch to expire, fences
    A's address and attaches; A's data is there, and A can no longer write."""
    a, b = hosts.a, hosts.b
    spec = f"rbd/{volume}"
    a.ok("attach", spec, "-m", str(a.mnt(volume)))
    digest = _write(a.mnt(volume) / "db")
    a_addrs = _owner(b, spec)["addrs"]
    for pid in a.fuse_pids():
        os.kill(pid, signal.SIGKILL)

    assert b.cv("attach", spec, "-m", str(b.mnt(volume))).returncode == 6
    t0 = time.monotonic()
    took = b.cv("attach", spec, "-m", str(b.mnt(volume)), "--takeover", "--json")
    takeover_s = time.monotonic() - t0
    assert took.returncode == 0, took.stderr
    print(f"takeover of a killed owner: {takeover_s:.1f} s")
    own = _owner(a, spec)
    assert own["host_id"] == "host-b"
    prev = own["taken_over_from"]
    assert prev["host_id"] == "host-a" and prev["fenced"] == a_addrs and not prev["forced"]
    assert any(x in hosts.ceph("osd", "blocklist", "ls") for x in a_addrs)
    assert _sha(b.mnt(volume) / "db") == digest

    # A, back: its mapping is dead and fenced, its writes fail
    with pytest.raises(OSError):
        _write(a.mnt(volume) / "late")
    # A cleans up its side (saying its late writes were lost: exit 12); that
    # does not touch B's ownership
    gone = a.cv("detach", spec, "--force", timeout=300)
    assert gone.returncode == 12 and "lost" in gone.stderr, gone.stderr
    assert _owner(a, spec)["host_id"] == "host-b"
    assert _sha(b.mnt(volume) / "db") == digest and not (b.mnt(volume) / "late").exists()
    b.ok("detach", spec)


def test_live_owner_is_not_taken_over_without_force(hosts: TwoHosts, volume: str) -> None:
    """A is alive: --takeover is refused. With --force B fences A at once;
    A, still running, cannot get a single write to the cluster any more."""
    a, b = hosts.a, hosts.b
    spec = f"rbd/{volume}"
    a.ok("attach", spec, "-m", str(a.mnt(volume)))
    digest = _write(a.mnt(volume) / "db")

    t0 = time.monotonic()
    refused = b.cv("attach", spec, "-m", str(b.mnt(volume)), "--takeover",
                   "--takeover-wait", "3")
    assert refused.returncode == 6 and "looks alive" in refused.stderr, refused.stderr
    assert time.monotonic() - t0 < 30
    assert _owner(b, spec)["host_id"] == "host-a" and b.fuse_pids() == []
    # --force alone overrides only foreign watchers, never another host's ownership
    assert b.cv("attach", spec, "--force").returncode == 6

    b.ok("attach", spec, "-m", str(b.mnt(volume)), "--takeover", "--force")
    assert _owner(b, spec)["taken_over_from"]["forced"] is True
    # A's unit restarting now hears that, not "already attached"
    again = a.cv("attach", spec, "-m", str(a.mnt(volume)))
    assert again.returncode == 6 and "was taken over by host b" in again.stderr, again.stderr
    b_digest = _write(b.mnt(volume) / "b-data")

    # A's application writes on: it must not reach the image. rbd-fuse
    # does not fail a fenced write, it waits (the request stays in the
    # kernel); so give it time, then take A's rbd-fuse down and look.
    writer = subprocess.Popen(
        ["dd", "if=/dev/urandom", f"of={a.mnt(volume) / 'late'}", "bs=64k", "count=16",
         "oflag=direct", "conv=fsync"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        rc = writer.wait(timeout=15)
    except subprocess.TimeoutExpired:
        rc = None  # still waiting on the fenced mapping
    for pid in a.fuse_pids():
        os.kill(pid, signal.SIGKILL)
    rc = writer.wait(timeout=120) if rc is None else rc
    assert rc != 0, "a fenced host's write succeeded"
    gone = a.cv("detach", spec, "--force", timeout=300)
    assert gone.returncode == 12 and "not written" in gone.stderr, gone.stderr

    b.ok("detach", spec)
    b.ok("attach", spec, "-m", str(b.mnt(volume)))
    assert _sha(b.mnt(volume) / "db") == digest
    assert _sha(b.mnt(volume) / "b-data") == b_digest
    assert not (b.mnt(volume) / "late").exists()
    b.ok("detach", spec)


def test_simultaneous_attaches_have_exactly_one_winner(hosts: TwoHosts, volume: str) -> None:
    a, b = hosts.a, hosts.b
    spec = f"rbd/{volume}"
    rounds, wins, double = 50, {"a": 0, "b": 0}, 0
    for i in range(rounds):
        procs = {h.name: h.start("attach", spec, "-m", str(h.mnt(volume))) for h in (a, b)}
        rcs = {n: p.wait(timeout=180) for n, p in procs.items()}
        errs = {n: p.stderr.read() if p.stderr else "" for n, p in procs.items()}
        for p in procs.values():
            for stream in (p.stdout, p.stderr):
                if stream:
                    stream.close()
        mounted = [h.name for h in (a, b) if h.mnt(volume).is_mount()]
        double += len(mounted) > 1
        assert sorted(rcs.values()) == [0, 6], (i, rcs, errs)
        winner = next(n for n, rc in rcs.items() if rc == 0)
        loser = hosts.b if winner == "a" else hosts.a
        assert mounted == [winner], (i, mounted)
        assert "owned by host" in errs[loser.name]
        assert loser.fuse_pids() == [] and json.loads(loser.ok("status", "--json")) == []
        wins[winner] += 1
        (hosts.a if winner == "a" else hosts.b).ok("detach", spec)
    print(f"race: {rounds} rounds, wins {wins}, double mounts {double}")
    assert double == 0 and sum(wins.values()) == rounds


def test_takeover_without_blocklist_caps_is_named_and_changes_nothing(
        hosts: TwoHosts, volume: str, tmp_path: Path) -> None:
    """`profile rbd` on the mon includes the blocklist a takeover needs; a
    client with mon 'allow r' cannot fence, so it must not take over."""
    a, b = hosts.a, hosts.b
    spec = f"rbd/{volume}"
    name = f"nobl{uuid.uuid4().hex[:6]}"
    keyring = hosts.ceph("auth", "get-or-create", f"client.{name}", "mon", "allow r",
                         "osd", "profile rbd")
    kr = tmp_path / f"{name}.keyring"
    kr.write_text(keyring)
    kr.chmod(0o600)
    conf_text = b.conf.read_text()
    cdir = hosts.cluster_dir
    assert f"keyring = {cdir}/keyring\n" in conf_text
    conf = tmp_path / "ceph.conf"
    conf.write_text(conf_text.replace(f"keyring = {cdir}/keyring\n", f"keyring = {kr}\n"))
    weak_b = Host(b.name, b.netns, b.addr, b.base, conf)

    a.ok("attach", spec, "-m", str(a.mnt(volume)))
    digest = _write(a.mnt(volume) / "db")
    cp = weak_b.cv("--id", name, "attach", spec, "-m", str(b.mnt(volume)), "--takeover",
                   "--force")
    assert cp.returncode == 7, cp.stderr
    assert "not allowed to blocklist" in cp.stderr and "profile rbd" in cp.stderr
    assert _owner(a, spec)["host_id"] == "host-a" and b.fuse_pids() == []
    assert not b.mnt(volume).exists() or not b.mnt(volume).is_mount()
    assert _sha(a.mnt(volume) / "db") == digest
    a.ok("detach", spec)
