"""One test session's Ceph cluster, its volumes, and the leak check at its end.

Kept apart from the pytest hooks (plugin.py) so the logic reads without
pytest's fixture machinery. Everything the session makes lives under one
directory, `base`: the dev cluster (unless kept elsewhere), cephvol's state
directory (and in it the rbd-fuse mounts) and the volumes' mountpoints. The
leak check looks there, in pytest's temporary directory (a test's own
`tmp_path`), and at loop devices bound since the session began.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cephvol import api
from cephvol.errors import CephvolError, UsageError
from cephvol.testing import leaks

DEFAULT_IMAGE_SIZE = "1G"
# `features=` of rbd_image: Ceph's names, as `rbd create --image-feature` takes them
FEATURES = ("layering", "striping", "exclusive-lock", "object-map", "fast-diff",
            "deep-flatten", "journaling")


def missing_requirements(*, dev_cluster: bool) -> str | None:
    """Why volumes (and a dev cluster) cannot be made here, or None."""
    if os.geteuid() != 0:
        return "cephvol's fixtures need root (loop devices, mounts, FUSE)"
    tools = ["rbd-fuse", "losetup"] + (["ceph-mon", "ceph-mgr", "ceph-osd"] if dev_cluster
                                       else [])
    missing = [t for t in tools if not shutil.which(t)]
    if missing:
        return f"{', '.join(missing)} not installed (Debian: ceph-mon ceph-mgr ceph-osd rbd-fuse)"
    return None


@dataclass
class CephTestCluster:
    """What `ceph_cluster` yields: where the cluster is, where cephvol keeps state.

    `api_kwargs()` is what cephvol.api calls take (`api.attach(img, mp,
    **ceph_cluster.api_kwargs())`); `env()` is the same for a subprocess
    (a service under test, the `cephvol` CLI, `rbd`).
    """

    conf: Path
    state_dir: Path
    base: Path  # this session's directory; removed at the end
    kind: str  # "dev" (made for this session), "kept" (--cephvol-keep-cluster), "existing"
    seconds: float = 0.0  # how long bringing it up took (0 for an existing cluster)
    created: bool = False  # a new dev cluster was made (a cold start)
    # names of the images this session's fixtures made or attached (the leak
    # check knows a lazily detached loop device by its image's name)
    images: set[str] = field(default_factory=set, repr=False)

    def api_kwargs(self) -> dict[str, Any]:
        return {"conf": self.conf, "state_dir": self.state_dir}

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update({"CEPH_CONF": str(self.conf), "CEPHVOL_STATE_DIR": str(self.state_dir)})
        env.update(extra)
        return env

    def new_mountpoint(self) -> Path:
        """A fresh path under the session directory (not created; attach makes it)."""
        return self.base / "mnt" / uuid.uuid4().hex[:10]


class ClusterSession:
    """Bring a cluster up for a session, and at the end prove nothing is left."""

    def __init__(self, base: Path, tmp_root: Path, *, conf: Path | None,
                 keep_dir: Path | None, xdist: bool) -> None:
        if conf is not None and keep_dir is not None:
            raise UsageError("--ceph-conf (or CEPH_CONF) and --cephvol-keep-cluster "
                             "exclude each other")
        self.base = base
        self.tmp_root = tmp_root
        self._conf = conf
        self._keep_dir = keep_dir
        # other xdist workers bind and lazily detach loop devices of their own
        self._loops_at_start = None if xdist else leaks.bound_loops()
        self._dev: api.DevCluster | None = None
        self.cluster: CephTestCluster | None = None

    def start(self) -> CephTestCluster:
        state = self.base / "state"
        if self._conf is not None:
            if not self._conf.exists():
                raise UsageError(f"ceph config {self._conf} does not exist")
            self.cluster = CephTestCluster(self._conf.absolute(), state, self.base, "existing")
            return self.cluster
        kept = self._keep_dir is not None
        self._dev = api.DevCluster(self._keep_dir or self.base / "cluster", keep=kept)
        t0 = time.monotonic()
        self._dev.up()
        self.cluster = CephTestCluster(
            self._dev.conf, state, self.base, "kept" if kept else "dev",
            seconds=round(time.monotonic() - t0, 2), created=bool(self._dev.created))
        return self.cluster

    def _not_leaks(self) -> set[int]:
        """Processes that name the session's directories but are no leak: the
        dev cluster's own daemons (found by their command line, so one
        restarted meanwhile counts too) and this process's ancestors (a
        wrapper such as `time pytest --basetemp ...`)."""
        pids = set()
        pid = os.getpid()
        while pid > 1:
            pids.add(pid)
            try:
                pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                break
        if self._dev is None:
            return pids
        mine = f"\0-c\0{self._dev.conf}\0".encode()
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    cmd = Path(f"/proc/{name}/cmdline").read_bytes()
                except OSError:
                    continue
                if cmd.startswith(b"ceph-") and mine in cmd:
                    pids.add(int(name))
        return pids

    def finish(self) -> list[str]:
        """Detach by force whatever is still attached, tear the session down,
        remove its directory; return what was left (empty: no leak)."""
        left: list[str] = []
        if self.cluster is not None:  # None: start failed (and stopped what it started)
            left += self._attached_volumes()
            left += self._force_detach_all()
        pids = self._not_leaks()
        roots = [self.base, self.tmp_root] + ([self._keep_dir] if self._keep_dir else [])
        # what cephvol's own detach could not remove is a finding; it is still
        # torn down by brute force, so a failed session can never hang on a
        # FUSE mount whose cluster has gone
        images = self.cluster.images if self.cluster is not None else set()
        found = (leaks.detached_loops(self._loops_at_start, images)
                 if self._loops_at_start is not None else [])
        for root in roots:
            found += leaks.leftovers(root, ignore_pids=pids)
        left += list(dict.fromkeys(found))  # base is under tmp_root: seen twice
        for x in found:
            if x.startswith("loop ") and x.split()[2].count("/") == 1:  # detached: "/IMAGE"
                leaks.free_loop(x.split()[1])
        for root in roots:  # mapping daemons (rbd-fuse, qemu-storage-daemon), a server a
            # test started and left, ...; the cluster's own daemons are in `pids`
            leaks.brute_force_cleanup(root, kill_all=True, ignore_pids=pids)
        if self._dev is not None and self._keep_dir is None:
            self._dev.down()
            left += [f"after cluster down: {x}" for x in leaks.leftovers(self.base)]
        leaks.brute_force_cleanup(self.base, kill_all=True, ignore_pids=pids)
        shutil.rmtree(self.base, ignore_errors=True)
        if self.base.exists():
            left.append(f"directory {self.base} could not be removed")
        return left

    def _attached_volumes(self) -> list[str]:
        assert self.cluster is not None
        try:
            rows = api.status(**self.cluster.api_kwargs())
        except CephvolError as exc:
            return [f"status failed: {exc}"]
        self.cluster.images.update(r.image.rsplit("/", 1)[1].split("@")[0] for r in rows)
        return [f"volume {r.image} ({r.phase}, {r.device or 'no device'}"
                + (f", mounted at {r.mountpoint}" if r.mounted else "") + ")" for r in rows]

    def _force_detach_all(self) -> list[str]:
        """Last-resort teardown so a failed test cannot leak into the next run;
        returns what could not be detached (e.g. ownership not given back)."""
        assert self.cluster is not None
        from cephvol.spec import spec_from_key

        state = self.cluster.state_dir
        keys = {p.name[:-5] for p in (state / "volumes").glob("*.json")}
        if (state / "fuse").exists():
            keys |= {d.name for d in (state / "fuse").iterdir()}
        failed = []
        for key in sorted(keys):
            try:
                api.detach(spec_from_key(key), force=True, lazy=True,
                           **self.cluster.api_kwargs())
            except CephvolError as exc:
                failed.append(f"forced detach of {key} failed: {exc}")
        return failed


def _image_features(names: tuple[str, ...] | list[str]) -> int:
    import rbd

    mask = 0
    for n in names:
        if n not in FEATURES:
            raise UsageError(f"unknown image feature {n!r}; one of {', '.join(FEATURES)}")
        mask |= getattr(rbd, f"RBD_FEATURE_{n.upper().replace('-', '_')}")
    return mask


@dataclass(frozen=True)
class RbdImage:
    """What `rbd_image` yields: a fresh, empty image; `str()` is its spec."""

    spec: str
    size: int
    features: tuple[str, ...] | None  # None: Ceph's defaults, as `cephvol create` makes

    def __str__(self) -> str:
        return self.spec


@contextmanager
def fresh_image(cluster: CephTestCluster, *, size: int | str = DEFAULT_IMAGE_SIZE,
                features: tuple[str, ...] | list[str] | None = None, pool: str = "rbd",
                leaks_found: list[str]) -> Iterator[RbdImage]:
    """Create a uniquely named image; afterwards detach it by force if a test
    left it attached (noting that in `leaks_found`) and remove it."""
    from cephvol.spec import parse_size

    spec = f"{pool}/t-{uuid.uuid4().hex[:12]}"
    cluster.images.add(spec.rsplit("/", 1)[1])
    nbytes = parse_size(size) if isinstance(size, str) else size
    if features is None:
        api.create(spec, nbytes, conf=cluster.conf)
    else:
        _create_with_features(cluster, spec, nbytes, tuple(features))
    try:
        yield RbdImage(spec, nbytes, tuple(features) if features is not None else None)
    finally:
        rows = [r for r in api.status(**cluster.api_kwargs()) if r.image == spec]
        if rows:
            r = rows[0]
            what = (f"{spec} was left attached ({r.device or 'no device'}"
                    + (f", mounted at {r.mountpoint}" if r.mounted else "") + ")")
            try:
                api.detach(spec, force=True, lazy=True, **cluster.api_kwargs())
                leaks_found.append(f"{what}; detached by force")
            except CephvolError as exc:
                leaks_found.append(f"{what}; a forced detach failed too: {exc}")
        try:
            api.remove(spec, **cluster.api_kwargs())
        except CephvolError as exc:  # e.g. still open by a process the test left
            leaks_found.append(f"{spec} could not be removed: {exc}")


def _create_with_features(cluster: CephTestCluster, spec: str, size: int,
                          features: tuple[str, ...]) -> None:
    import rados
    import rbd

    from cephvol.cluster import Cluster, ClusterConfig
    from cephvol.spec import parse_spec

    s = parse_spec(spec, allow_snap=False)
    mask = _image_features(features)
    with Cluster(ClusterConfig.from_env(cluster.conf)) as c, c.ioctx(s) as ctx:
        try:
            rbd.RBD().create(ctx, s.image, size, old_format=False, features=mask)
        except (rbd.Error, rados.Error) as exc:
            raise UsageError(f"cannot create {spec} with features {', '.join(features)}: "
                             f"{exc}") from exc
