"""Snapshots (consistent for mounted volumes) and clones of RBD images.

A snapshot of a volume that is mounted here is taken with its filesystem
frozen (FIFREEZE): the freeze writes back everything dirty and marks the
journal clean, so the snapshot mounts without recovery and holds everything
written before the freeze. A snapshot of a volume that is not mounted here
is a plain RBD snapshot (crash-consistent, as after a power cut).

A frozen filesystem stalls every writer on it, so the freeze must end:
- the freeze is held by a child process (cephvol/_os/freeze.py) that thaws
  when asked, when cephvol dies (pipe EOF and PR_SET_PDEATHSIG) and at the
  latest `bound` seconds after the freeze, whatever cephvol is doing;
- the freeze is journalled (`STATE/freeze/KEY.json`, written before the
  freeze, removed after the thaw is confirmed), so that if the child is
  killed too (a cgroup-wide SIGKILL), `cephvol cleanup` and the next
  `snap`/`attach`/`detach` of the volume thaw it (thaw_leftovers).

Clones are RBD clone v2 of a snapshot; see Cluster.clone_image.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cephvol import hostfs, ownership, supervisor
from cephvol._os import freeze
from cephvol.cluster import Cluster, ClusterConfig
from cephvol.crashpoint import CRASH_ENV
from cephvol.errors import (
    Busy,
    CephvolError,
    Conflict,
    NotFound,
    Owned,
    StepTimeout,
    UsageError,
)
from cephvol.mapper import find_mapping
from cephvol.proc import step_timeout
from cephvol.spec import ImageSpec
from cephvol.state import VolumeState, file_stem, read_regular, write_json

DEFAULT_FREEZE_BOUND = 30.0  # seconds a filesystem may stay frozen, at most
ORIGIN_KEY = "cephvol.origin"  # image metadata of a clone: the snapshot it came from


def require_snap(spec: ImageSpec, what: str) -> ImageSpec:
    if not spec.snap:
        raise UsageError(f"{what} needs POOL/IMAGE@SNAPSHOT, got {spec}")
    return spec


def parse_bound(value: float | None) -> float:
    """The freeze bound: --freeze-timeout, else $CEPHVOL_FREEZE_TIMEOUT, else 30 s."""
    raw: Any = value if value is not None else os.environ.get("CEPHVOL_FREEZE_TIMEOUT")
    if raw is None or raw == "":
        return DEFAULT_FREEZE_BOUND
    try:
        bound = float(raw)
    except ValueError as exc:
        raise UsageError(f"freeze timeout {raw!r} is not a number") from exc
    if not 0 < bound <= 600:
        raise UsageError("the freeze timeout must be more than 0 and at most 600 seconds")
    return bound


# -- the freeze journal ------------------------------------------------------------


@dataclass
class FreezeRecord:
    """One filesystem cephvol may have left frozen. The pids come with their
    start times (/proc/PID/stat field 22) so a reused pid is not taken for
    the cephvol or the freeze child that is gone."""

    spec: str
    mountpoint: str
    devnum: str  # "major:minor" of the filesystem: thaw only that one
    pid: int
    pid_start: int
    holder: int = 0
    holder_start: int = 0
    started: float = 0.0
    bound: float = DEFAULT_FREEZE_BOUND

    @classmethod
    def from_dict(cls, d: Any) -> FreezeRecord:
        if not isinstance(d, dict):
            raise ValueError("not an object")
        rec = cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})
        if not (isinstance(rec.spec, str) and isinstance(rec.mountpoint, str)
                and isinstance(rec.devnum, str) and isinstance(rec.pid, int)):
            raise ValueError("wrong field types")
        return rec


def freeze_dir(state_dir: Path) -> Path:
    return state_dir / "freeze"


def _record_path(state_dir: Path, spec: ImageSpec) -> Path:
    return freeze_dir(state_dir) / f"{file_stem(spec.without_snap().key)}.json"


def _save(path: Path, rec: FreezeRecord) -> None:
    write_json(path, asdict(rec), "the freeze journal ")


def start_time(pid: int, proc_root: Path = Path("/proc")) -> int:
    """A process's start time in clock ticks since boot; 0 if it is gone."""
    try:
        fields = (proc_root / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return 0


def _alive(pid: int, started: int, proc_root: Path = Path("/proc")) -> bool:
    return bool(pid) and hostfs.pid_alive(pid, proc_root) and start_time(pid, proc_root) == started


def _devnum_text(dev: tuple[int, int]) -> str:
    return f"{dev[0]}:{dev[1]}"


def _same_fs(mountpoint: str, devnum: str) -> bool:
    """Is the filesystem mounted at `mountpoint` still the one we froze?"""
    try:
        st = os.stat(mountpoint)
    except OSError:
        return False
    return _devnum_text((os.major(st.st_dev), os.minor(st.st_dev))) == devnum


def thaw_leftovers(state_dir: Path, spec: ImageSpec | None = None,
                   proc_root: Path = Path("/proc")) -> list[dict[str, Any]]:
    """Thaw filesystems a killed `snap create` left frozen (all, or only
    `spec`'s volume). A freeze whose cephvol is still running is left to it.
    A record is removed once nothing can freeze again under it (its freeze
    child is gone too) and the thaw did not fail."""
    rows: list[dict[str, Any]] = []
    d = freeze_dir(state_dir)
    try:
        paths = sorted(d.glob("*.json"))
    except OSError:
        return rows
    for path in paths:
        try:
            rec = FreezeRecord.from_dict(json.loads(read_regular(path) or b"null"))
        except (OSError, ValueError, TypeError, RecursionError):
            with contextlib.suppress(OSError):
                path.unlink()  # damaged: nothing to act on, and it would block nothing
            continue
        if spec is not None and rec.spec != str(spec.without_snap()):
            continue
        if rec.pid != os.getpid() and _alive(rec.pid, rec.pid_start, proc_root):
            continue  # a snapshot in progress: its own child thaws within the bound
        row: dict[str, Any] = {"image": rec.spec, "mountpoint": rec.mountpoint,
                               "thawed": False, "ok": True}
        try:
            if _same_fs(rec.mountpoint, rec.devnum):
                row["thawed"] = freeze.thaw(rec.mountpoint)
        except (OSError, CephvolError) as exc:
            row.update(ok=False, error=getattr(exc, "message", None) or str(exc))
        if row["thawed"]:
            supervisor.event("thaw", rec.spec, f"thawed {rec.mountpoint}, left frozen by a "
                             f"killed snapshot (pid {rec.pid})", mountpoint=rec.mountpoint)
        if row["ok"] and not _alive(rec.holder, rec.holder_start, proc_root):
            with contextlib.suppress(OSError):
                path.unlink()
        rows.append(row)
    return rows


# -- snap create -------------------------------------------------------------------


def _crash_point(step: str, holder: freeze.FreezeHolder | None = None) -> None:
    """Test hook: CEPHVOL_TEST_CRASH_AT=STEP kills cephvol there; STEP+holder
    kills the freeze child first (as a cgroup-wide SIGKILL would)."""
    want = os.environ.get(CRASH_ENV)
    if want == f"{step}+holder" and holder is not None:
        holder.kill_for_test()
        want = step
    if want == step:
        os.kill(os.getpid(), signal.SIGKILL)


def _freeze_target(host: Any, st: VolumeState | None) -> tuple[str, str] | None:
    """(mountpoint, devnum) of a volume attached writable and mounted here,
    None if there is no filesystem of ours to freeze."""
    if st is None:
        return None
    if st.phase != "attached":
        raise Busy(f"{st.spec} is {st.phase} on this host and that did not finish (pid "
                   f"{st.pid}); run `cephvol attach` or `cephvol detach` for it first")
    if st.read_only or not st.mountpoint or not st.device or "mount" not in st.steps:
        return None
    try:
        dev = hostfs.device_number(st.device)
    except (OSError, ValueError):
        return None
    if not any(m.mountpoint == st.mountpoint and m.devnum == dev for m in host.mounts()):
        return None
    if st.fstype not in freeze.FREEZABLE:
        raise UsageError(f"{st.spec} holds {st.fstype}; cephvol freezes only "
                         f"{' and '.join(freeze.FREEZABLE)}")
    return st.mountpoint, _devnum_text(dev)


def _refuse_unhanded_lock(host: Any, spec: ImageSpec) -> None:
    """librbd must take the image's exclusive lock to snapshot it; a krbd
    mapping made with `exclusive` never hands it over: refused here, before
    anything is frozen, instead of failing with EROFS under the freeze."""
    found = find_mapping(spec, host.paths, host.cfg)
    if found is not None and found.extra.get("exclusive"):
        raise Busy(f"cannot snapshot {spec} while it is attached here with krbd's exclusive "
                   "lock (the kernel does not hand it over); attach it with --no-exclusive "
                   "to take consistent snapshots while attached")


def create(host: Any, spec: ImageSpec, *, bound: float = DEFAULT_FREEZE_BOUND
           ) -> dict[str, Any]:
    """Snapshot spec.snap of the image; consistent (frozen) if mounted here.

    `host` is a lifecycle.Host (paths, cfg, store, mounts())."""
    require_snap(spec, "snap create")
    head = spec.without_snap()
    thaw_leftovers(host.paths.state_dir, head)
    store = host.store
    with store.lock(head.key):
        st = store.load(head.key)
        target = _freeze_target(host, st)
        res: dict[str, Any] = {"snapshot": str(spec), "image": str(head), "frozen": False,
                               "consistent": "filesystem" if target else "crash",
                               "mountpoint": target[0] if target else None}
        if target is None:
            with Cluster(host.cfg) as c:
                rec = ownership.current(c, head)
                if rec is not None and rec.host_id != host.identity.id:
                    res["warning"] = (f"{head} is owned by {rec.describe()}: this snapshot is "
                                      "crash-consistent only; take it there for a frozen one")
                c.snapshot_create(spec)
            supervisor.event("snapshot", str(head), f"snapshot {spec} created (not mounted "
                             "here: crash-consistent)")
            return res
        _refuse_unhanded_lock(host, head)
        return _create_frozen(host, spec, target[0], target[1], bound, res)


def _create_frozen(host: Any, spec: ImageSpec, mountpoint: str, devnum: str, bound: float,
                   res: dict[str, Any]) -> dict[str, Any]:
    head = spec.without_snap()
    path = _record_path(host.paths.state_dir, head)
    me = os.getpid()
    rec = FreezeRecord(spec=str(head), mountpoint=mountpoint, devnum=devnum, pid=me,
                       pid_start=start_time(me), started=time.time(), bound=bound)
    holder = freeze.FreezeHolder(Path(mountpoint), bound)
    holder.start()  # starts while we connect; freezes only when told
    assert holder.pid is not None
    rec.holder, rec.holder_start = holder.pid, start_time(holder.pid)
    _save(path, rec)  # journalled before anything is frozen
    why, froze = "eof", False
    try:
        with Cluster(host.cfg) as c:
            if spec.snap in {s["name"] for s in c.snapshot_list(head)}:
                raise Conflict(f"snapshot {spec} already exists")
            t0 = time.monotonic()
            froze = True
            holder.freeze(step_timeout())
            t1 = time.monotonic()
            supervisor.event("freeze", str(head), f"froze {mountpoint} for snapshot {spec}",
                             mountpoint=mountpoint)
            _crash_point("snap-frozen", holder)
            try:
                c.snapshot_create(spec)
            except CephvolError:
                why = holder.thaw()
                raise
            _crash_point("snap-created", holder)
            t2 = time.monotonic()
            _crash_point("snap-thaw", holder)
            why = holder.thaw()
            frozen_s = time.monotonic() - t1
            if why != "asked":
                # thawed by the bound (or the child died) before we asked: the
                # snapshot may hold writes from after the thaw; not what was asked
                with contextlib.suppress(CephvolError):
                    c.snapshot_remove(spec)
                raise StepTimeout(f"snapshot {spec} took longer than the freeze bound "
                                  f"({bound:g}s, {why}); the filesystem was thawed and the "
                                  "snapshot removed; try again (or raise --freeze-timeout)")
    finally:
        holder.close()
        if froze and why != "asked":
            # unconfirmed: thaw ourselves (EINVAL if it was not frozen: harmless)
            with contextlib.suppress(OSError, CephvolError):
                if _same_fs(mountpoint, devnum):
                    freeze.thaw(mountpoint)
        if not _alive(rec.holder, rec.holder_start):
            # else a child stuck in FIFREEZE still owns it: it thaws when the
            # freeze returns (its stdin is closed); the journal stays for cleanup
            with contextlib.suppress(OSError):
                path.unlink()
    supervisor.event("thaw", str(head), f"snapshot {spec} created; {mountpoint} was frozen "
                     f"{frozen_s * 1000:.0f} ms", mountpoint=mountpoint)
    res.update(frozen=True, freeze_ms=round((t1 - t0) * 1000, 1),
               snapshot_ms=round((t2 - t1) * 1000, 1), frozen_ms=round(frozen_s * 1000, 1))
    return res


# -- ls, rm, rollback --------------------------------------------------------------


def list_snapshots(host: Any, spec: ImageSpec) -> list[dict[str, Any]]:
    head = spec.without_snap()
    with Cluster(host.cfg) as c:
        rows = c.snapshot_list(head)
        for r in rows:
            snap = ImageSpec(head.pool, head.namespace, head.image, r["name"])
            r["clones"] = c.snapshot_children(snap)
            m = find_mapping(snap, host.paths, host.cfg)
            r["mapped_here"] = m.device if m else None
    return rows


def remove(host: Any, spec: ImageSpec) -> dict[str, Any]:
    """Remove a snapshot nobody reads here and no clone depends on (clone
    v2 would otherwise move it to the trash, where it lingers unseen)."""
    require_snap(spec, "snap rm")
    m = find_mapping(spec, host.paths, host.cfg)
    if m is not None or host.store.load(spec.key) is not None:
        raise Busy(f"snapshot {spec} is mapped on this host"
                   + (f" at {m.device}" if m and m.device else "")
                   + f"; detach it first (`cephvol detach {spec}`)")
    with Cluster(host.cfg) as c:
        if spec.snap not in {s["name"] for s in c.snapshot_list(spec.without_snap())}:
            raise NotFound(f"snapshot {spec} does not exist")
        kids = c.snapshot_children(spec)
        if kids:
            raise Busy(f"snapshot {spec} has clones ({', '.join(kids)}); flatten or remove "
                       "them first")
        c.snapshot_remove(spec)
    supervisor.event("snapshot-removed", str(spec.without_snap()), f"removed snapshot {spec}")
    return {"snapshot": str(spec), "removed": True}


def rollback(host: Any, spec: ImageSpec) -> dict[str, Any]:
    """Roll the image back to a snapshot, only while nobody uses it anywhere:
    not attached or mapped here, not owned by a host, not watched by any
    client. This host owns the image for the duration, so no cephvol
    attaches it meanwhile; a leftover ownership of this host (a rollback
    killed half-way) is taken over and given back at the end."""
    require_snap(spec, "snap rollback")
    head = spec.without_snap()
    store = host.store
    with store.lock(head.key, timeout=0):
        if store.load(head.key) is not None or find_mapping(head, host.paths, host.cfg):
            raise Busy(f"{head} is attached on this host; detach it before rolling back")
        me = host.identity
        with Cluster(host.cfg) as c:
            if spec.snap not in {s["name"] for s in c.snapshot_list(head)}:
                raise NotFound(f"snapshot {spec} does not exist")
            rec = ownership.current(c, head)
            if rec is not None and rec.host_id != me.id:
                raise Owned(f"{head} is owned by {rec.describe()}; detach it there before "
                            "rolling back")
            _refuse_watchers(c, head)
            ownership.acquire(c, head, me)
            try:
                _refuse_watchers(c, head)
                _crash_point("rollback")
                c.snapshot_rollback(spec)
            finally:
                with contextlib.suppress(CephvolError):
                    ownership.release(c, head, me)
    supervisor.event("rollback", str(head), f"rolled {head} back to {spec}")
    return {"image": str(head), "snapshot": str(spec), "rolled_back": True}


def _refuse_watchers(c: Cluster, head: ImageSpec) -> None:
    watchers = c.watchers(head)
    if watchers:
        addrs = ", ".join(str(w.get("addr", "?")) for w in watchers)
        raise Busy(f"{head} is in use (mapped or open by {addrs}); not rolling it back")


# -- clones ------------------------------------------------------------------------


def clone(cfg: ClusterConfig, parent: ImageSpec, child: ImageSpec, *, flatten: bool = False,
          progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Create `child` as a clone of snapshot `parent`; idempotent: a child
    that already is this snapshot's clone (or was, before a flatten) is
    kept, anything else by that name is a Conflict. With `flatten`, the
    child gets its own copy of every block and no longer needs the parent."""
    require_snap(parent, "create --from")
    if child.snap:
        raise UsageError(f"cannot create a snapshot spec {child}; give POOL/IMAGE")
    with Cluster(cfg) as c:
        if parent.snap not in {s["name"] for s in c.snapshot_list(parent.without_snap())}:
            raise NotFound(f"snapshot {parent} does not exist")
        created = True
        try:
            c.clone_image(parent, child, ORIGIN_KEY)
        except Conflict:
            origin = c.image_parent(child) or c.image_meta(child, ORIGIN_KEY)
            if origin != str(parent):
                raise Conflict(f"image {child} already exists and is not a clone of "
                               f"{parent}") from None
            created = False
        flattened = False
        if flatten and c.image_parent(child):
            c.flatten_image(child, progress)
            flattened = True
        now_parent = c.image_parent(child)
        size = c.image_info(child).size
    supervisor.event("clone", str(child), f"{child} {'cloned' if created else 'exists'} from "
                     f"{parent}" + (", flattened" if flattened else ""))
    return {"image": str(child), "created": created, "origin": str(parent),
            "parent": now_parent, "flattened": flattened, "size": size}
