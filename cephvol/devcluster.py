"""A one-node Ceph cluster (mon, mgr, one bluestore OSD) in a directory.

For trying cephvol and for its integration tests. Everything lives under the
directory given (config, keys, data, logs, sockets, pid files); nothing is
written to /etc/ceph or /var/log/ceph, and daemons bind the address given
(127.0.0.1 unless told otherwise). `down` stops exactly the daemons whose pid
files are in the directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cephvol import proc
from cephvol.errors import Busy, ClusterError, StepTimeout, SystemCommandError, UsageError
from cephvol.hostfs import pid_alive
from cephvol.waiting import flock_exclusive

DAEMONS = ("mon.a", "mgr.x", "osd.0")
DEFAULT_POOL_NAME = "rbd"
# Characters ceph.conf cannot hold in a path: '#' and ';' start a comment
# (cutting the path: the mon then writes outside the directory), '$' starts
# a metavariable ($name, $cluster, ...), quotes and '\' are parsed.
_CONF_SPECIAL = "#;$\\\"'"


def check_directory(directory: Path) -> None:
    """Refuse, before anything is made, a directory ceph.conf cannot name."""
    text = str(directory)
    bad = sorted({c for c in text if c in _CONF_SPECIAL or not c.isprintable()})
    if bad:
        raise UsageError(f"--dir {text!r}: ceph.conf cannot hold {' '.join(map(repr, bad))} "
                         "in a path; choose another directory")


def _conf_text(d: Path, fsid: str, addr: str, v2: int, v1: int) -> str:
    return f"""# written by cephvol dev-cluster: a throw-away one-node cluster
[global]
fsid = {fsid}
mon host = [v2:{addr}:{v2},v1:{addr}:{v1}]
public addr = {addr}
cluster addr = {addr}
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon allow pool delete = true
osd crush chooseleaf type = 0
osd pool default pg autoscale mode = off
mon warn on pool no redundancy = false
mon data avail warn = 2
mon data avail crit = 1
mon cluster log file = {d}/log/cluster.log
log file = {d}/log/$name.log
pid file = {d}/run/$name.pid
admin socket = {d}/run/$name.asok
keyring = {d}/keyring
ms bind ipv4 = true
ms bind ipv6 = false

[mon]
mon data = {d}/mon/$cluster-$id
mon initial members = a

[mgr]
mgr data = {d}/mgr/$cluster-$id
keyring = {d}/mgr/keyring

[osd]
osd data = {d}/osd/$cluster-$id
keyring = {d}/osd/$cluster-$id/keyring
osd objectstore = bluestore
bluestore block path = {d}/osd/$cluster-$id.block
bluestore block create = true
bluestore block size = 10737418240
osd memory target = 939524096
osd fast shutdown = false

[client]
keyring = {d}/keyring
log file = {d}/log/$name.$pid.log
admin socket = {d}/run/$name.$pid.asok
"""


@dataclass(frozen=True)
class DevCluster:
    directory: Path
    addr: str = "127.0.0.1"

    @property
    def conf(self) -> Path:
        return self.directory / "ceph.conf"

    @property
    def run_dir(self) -> Path:
        return self.directory / "run"

    def pid_of(self, name: str) -> int | None:
        try:
            return int((self.run_dir / f"{name}.pid").read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def daemon_state(self) -> dict[str, int | None]:
        """Live pid of each daemon, or None. A zombie counts as dead."""
        return {name: (pid if pid and pid_alive(pid) else None) for name in DAEMONS
                for pid in [self.pid_of(name)]}

    # -- lifecycle -----------------------------------------------------------

    def up(self, *, v2_port: int | None = None, v1_port: int | None = None,
           timeout: float = 180.0) -> dict[str, Any]:
        """Create (first time) or restart the cluster; return when `rbd` is writable."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        check_directory(self.directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SystemCommandError(f"dev-cluster: cannot make {self.directory}: "
                                     f"{exc.strerror or exc}") from exc
        with self._locked(deadline):
            fresh = not self.conf.exists()
            if fresh:
                self._create(v2_port, v1_port)
            for name in DAEMONS:
                if self.daemon_state()[name] is None:
                    self._start(name)
            if fresh:
                self._create_osd_and_pool(deadline)
            self._wait_writable(deadline)
        return {**self.describe(), "seconds": round(time.monotonic() - t0, 2), "created": fresh}

    @contextlib.contextmanager
    def _locked(self, deadline: float) -> Iterator[None]:
        """Serialise `up`s on one directory: a second one waits for the first
        and then finds the cluster made and running, instead of racing it
        through the creation. flock: a killed `up` leaves no stale lock."""
        try:
            fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise SystemCommandError(f"dev-cluster: cannot lock {self.directory}: "
                                     f"{exc.strerror or exc}") from exc
        try:
            if not flock_exclusive(fd, timeout=max(0.0, deadline - time.monotonic()),
                                   interval=0.1):
                raise Busy(f"dev-cluster in {self.directory}: another 'up' is still running")
            yield
        finally:
            os.close(fd)  # releases the lock

    def down(self, *, timeout: float = 60.0) -> list[str]:
        """Stop our daemons (OSD first, mon last), SIGKILL after `timeout`."""
        stopped = []
        for name in reversed(DAEMONS):
            pid = self.pid_of(name)
            if pid and pid_alive(pid) and _is_ceph(pid):
                os.kill(pid, signal.SIGTERM)
                end = time.monotonic() + timeout
                while pid_alive(pid) and time.monotonic() < end:
                    time.sleep(0.1)
                if pid_alive(pid):
                    os.kill(pid, signal.SIGKILL)
                    while pid_alive(pid):
                        time.sleep(0.05)
                stopped.append(name)
            (self.run_dir / f"{name}.pid").unlink(missing_ok=True)
        return stopped

    def describe(self) -> dict[str, Any]:
        return {
            "directory": str(self.directory),
            "conf": str(self.conf),
            "daemons": self.daemon_state(),
            # for `eval`: quoted, so a directory with blanks or ';' is one word
            "env": f"export CEPH_CONF={shlex.quote(str(self.conf))}",
        }

    # -- internals -----------------------------------------------------------

    def _create(self, v2_port: int | None, v1_port: int | None) -> None:
        d = self.directory
        for sub in ("log", "run", "mon", "mgr/ceph-x", "osd"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        v2 = v2_port or _free_port(self.addr)
        v1 = v1_port or _free_port(self.addr)
        if v1 == v2:
            raise UsageError("the v1 and v2 monitor ports must differ")
        fsid = str(uuid.uuid4())
        conf_tmp = d / "ceph.conf.tmp"
        conf_tmp.write_text(_conf_text(d, fsid, self.addr, v2, v1))
        keyring = d / "keyring"
        keyring.unlink(missing_ok=True)
        proc.run(["ceph-authtool", "--create-keyring", str(keyring), "--gen-key", "-n", "mon.",
                  "--cap", "mon", "allow *"])
        proc.run(["ceph-authtool", str(keyring), "--gen-key", "-n", "client.admin",
                  "--cap", "mon", "allow *", "--cap", "osd", "allow *",
                  "--cap", "mgr", "allow *", "--cap", "mds", "allow *"])
        keyring.chmod(0o600)
        monmap = d / "monmap"
        proc.run(["monmaptool", "--create", "--clobber", "--fsid", fsid, "--addv", "a",
                  f"[v2:{self.addr}:{v2},v1:{self.addr}:{v1}]", str(monmap)])
        proc.run(["ceph-mon", "-c", str(conf_tmp), "--mkfs", "-i", "a", "--monmap", str(monmap),
                  "--keyring", str(keyring)], timeout=60)
        # The config appears last: its presence means "created", so a crash
        # half-way through is redone from scratch rather than half-trusted.
        conf_tmp.rename(self.conf)

    def _start(self, name: str) -> None:
        kind, _, ident = name.partition(".")
        if kind == "mgr" and not (self.directory / "mgr" / "keyring").exists():
            self._mgr_key()
        if kind == "osd" and not (self.directory / "osd" / f"ceph-{ident}" / "keyring").exists():
            return  # created (and started) by _create_osd_and_pool
        proc.run([f"ceph-{kind}", "-c", str(self.conf), "-i", ident], timeout=60)
        self._wait_pid(name)

    def _wait_pid(self, name: str, timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            pid = self.pid_of(name)
            if pid and pid_alive(pid):
                return
            time.sleep(0.05)
        raise StepTimeout(f"dev-cluster: {name} did not start; see {self.directory}/log/{name}.log")

    def _admin(self) -> Any:
        from cephvol.cluster import Cluster, ClusterConfig

        return Cluster(ClusterConfig(self.conf, "admin", 20.0))

    def _mon(self, c: Any, cmd: dict[str, Any], inbuf: bytes = b"") -> bytes:
        ret, out, err = c.mon_command(cmd, inbuf)
        if ret != 0:
            raise ClusterError(f"dev-cluster: '{cmd['prefix']}' failed ({ret}): {err.strip()}")
        return out

    def _mgr_key(self) -> None:
        path = self.directory / "mgr" / "keyring"
        with self._admin() as c:
            out = self._mon(c, {"prefix": "auth get-or-create", "entity": "mgr.x",
                                "caps": ["mon", "allow profile mgr", "osd", "allow *",
                                         "mds", "allow *"], "format": "plain"})
        _write_private(path, out)

    def _create_osd_and_pool(self, deadline: float) -> None:
        osd_uuid = str(uuid.uuid4())
        osd_dir = self.directory / "osd" / "ceph-0"
        osd_dir.mkdir(parents=True, exist_ok=True)
        keyring = osd_dir / "keyring"
        proc.run(["ceph-authtool", "--create-keyring", str(keyring), "--gen-key", "-n", "osd.0"])
        keyring.chmod(0o600)
        with self._admin() as c:
            osd_id = json.loads(self._mon(c, {"prefix": "osd new", "uuid": osd_uuid,
                                              "format": "json"}))["osdid"]
            if osd_id != 0:
                raise ClusterError(f"dev-cluster: expected osd.0, the monitor made osd.{osd_id}")
            # The key must be known to the monitors before --mkfs, which
            # fetches its config from them.
            self._mon(c, {"prefix": "auth add", "entity": "osd.0",
                          "caps": ["osd", "allow *", "mon", "allow profile osd",
                                   "mgr", "allow profile osd"]}, keyring.read_bytes())
        proc.run(["ceph-osd", "-c", str(self.conf), "-i", "0", "--mkfs",
                  "--osd-uuid", osd_uuid], timeout=120)
        proc.run(["ceph-osd", "-c", str(self.conf), "-i", "0"], timeout=60)
        self._wait_pid("osd.0")
        with self._admin() as c:
            self._mon(c, {"prefix": "osd pool create", "pool": DEFAULT_POOL_NAME,
                          "pg_num": 8, "pgp_num": 8})
            self._mon(c, {"prefix": "osd pool application enable", "pool": DEFAULT_POOL_NAME,
                          "app": "rbd"})
        self._wait_writable(deadline)
        with self._admin() as c, c.rados.open_ioctx(DEFAULT_POOL_NAME) as ctx:
            import rbd

            rbd.RBD().pool_init(ctx, True)

    def wait_writable(self, timeout: float = 120.0) -> None:
        """Wait until the pool takes a small write again, as after an OSD was
        stopped and continued (it may need a while to catch up under load);
        StepTimeout after `timeout` seconds."""
        self._wait_writable(time.monotonic() + timeout)

    def _wait_writable(self, deadline: float) -> None:
        """Poll with a small object write until the pool takes data."""
        import rados

        last = "no attempt"
        while time.monotonic() < deadline:
            try:
                with self._admin() as c:
                    ctx = c.rados.open_ioctx(DEFAULT_POOL_NAME)
                    try:
                        ctx.write_full("cephvol-dev-cluster-probe", b"ok")
                        return
                    finally:
                        ctx.close()
            except (rados.Error, ClusterError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.5)
        raise StepTimeout(f"dev-cluster: pool {DEFAULT_POOL_NAME} not writable in time ({last})")


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _is_ceph(pid: int) -> bool:
    """Guard against a recycled pid: only signal a ceph-* daemon."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except FileNotFoundError:
        return False
    return comm.startswith("ceph-")


def _free_port(addr: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((addr, 0))
        return int(s.getsockname()[1])


def require_stopped(cluster: DevCluster) -> None:
    running = [n for n, p in cluster.daemon_state().items() if p]
    if running:
        raise Busy(f"dev-cluster in {cluster.directory} is running ({', '.join(running)})")
