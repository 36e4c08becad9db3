"""attach / detach / status: the volume lifecycle on one host.

attach = map -> (mkfs only if empty) -> (fsck) -> mount, each step journalled
after it is done; detach = plan from what the host shows, then run the plan.
The library never prints; it returns results and raises CephvolErrors.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cephvol import envfile, fs, hostfs, ownership, supervisor
from cephvol._os import mountns
from cephvol.cleanup import (
    Observed,
    Step,
    places_of,
    plan_detach,
    split_copies,
    split_propagated,
)
from cephvol.cluster import Cluster, ClusterConfig
from cephvol.errors import (
    Busy,
    CephvolError,
    Conflict,
    DataLost,
    Owned,
    StepTimeout,
    Unsafe,
    UsageError,
)
from cephvol.mapper import (
    Backend,
    HostPaths,
    MapOptions,
    Mapping,
    all_backends,
    list_all,
    make_backend,
    select_backend,
)
from cephvol.proc import step_timeout
from cephvol.spec import ImageSpec, format_size, parse_spec
from cephvol.state import StateStore, VolumeState

CRASH_ENV = "CEPHVOL_TEST_CRASH_AT"  # test hook: SIGKILL ourselves at a named step


@dataclass
class Host:
    """Everything attach/detach need to know about where they run."""

    cfg: ClusterConfig
    paths: HostPaths
    mountinfo: Path = Path("/proc/self/mountinfo")

    @functools.cached_property
    def identity(self) -> ownership.HostIdentity:
        """Read once per process: attach checks it before changing anything,
        then owns, records and releases with it (cleanup for every volume)."""
        return ownership.HostIdentity.local()

    @property
    def store(self) -> StateStore:
        return StateStore(self.paths.state_dir)

    def mounts(self) -> list[hostfs.Mount]:
        return hostfs.read_mounts(self.mountinfo)


@dataclass
class AttachRequest:
    spec: ImageSpec
    mountpoint: Path | None = None
    backend: str = "auto"
    options: MapOptions = field(default_factory=MapOptions)
    fstype: str | None = None  # None: keep what is there, ext4 for a new filesystem
    mkfs: bool = True
    mkfs_options: list[str] = field(default_factory=list)
    fsck: str = "auto"
    mount_options: list[str] = field(default_factory=list)
    env_file: Path | None = None  # written after a successful attach, removed by detach
    takeover: bool = False  # take a dead host's ownership (fencing it)
    # with takeover: even from an owner that looks alive; without: even while
    # clients that are not this volume's owner watch or lock the image
    force: bool = False
    takeover_wait: float = ownership.DEFAULT_TAKEOVER_WAIT
    force_mkfs: bool = False  # format even an image that holds data blkid cannot name
    size: int | None = None  # create the image with this size when it is missing


def _crash_point(step: str) -> None:
    if os.environ.get(CRASH_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def _find_mapping(host: Host, spec: ImageSpec) -> tuple[Backend, Mapping] | None:
    for b in all_backends(host.paths, host.cfg):
        if not b.mappings_are_ours and not b.support().ok:
            continue
        m = b.find(spec)
        if m is not None:
            return b, m
    return None


def attach(host: Host, req: AttachRequest) -> dict[str, Any]:
    spec = req.spec
    req.options.validate()
    read_only = req.options.read_only or spec.read_only
    opts = MapOptions(**{**req.options.__dict__, "read_only": read_only})
    if req.fstype:
        fs.validate_fstype(req.fstype)
    if req.fsck not in fs.FSCK_MODES:
        raise UsageError(f"--fsck must be one of {', '.join(fs.FSCK_MODES)}")
    if req.env_file:  # a path it cannot write is refused before anything is mapped
        envfile.check(req.env_file, spec, host.store, host.paths.state_dir)
    if not read_only:
        _ = host.identity  # a host without an identity fails here, having changed nothing
    store = host.store
    with store.lock(spec.key):
        before = store.load(spec.key)
        try:
            return _attach_locked(host, req, opts, read_only)
        except CephvolError as exc:
            if before is not None and before.phase == "attached":
                raise  # a refusal about a volume that stays attached as it was
            _undo_attach(host, spec, exc)
            raise


def _attach_locked(host: Host, req: AttachRequest, opts: MapOptions,
                   read_only: bool) -> dict[str, Any]:
    spec, store = req.spec, host.store
    st = store.load(spec.key)
    found = _find_mapping(host, spec)
    mp = str(req.mountpoint) if req.mountpoint else None
    if found and found[1].device and st is None:
        if not found[0].mappings_are_ours:
            raise Busy(f"{spec} is already mapped at {found[1].device} ({found[0].name}) "
                       "but not by cephvol; unmap it first or use that device")
        st = _adopt(host, spec, found[0], found[1])
    if st and st.mountpoint and mp and st.mountpoint != mp:
        raise Conflict(f"{spec} is already attached at {st.mountpoint}; detach it first")
    if st and st.phase == "attached" and st.read_only != read_only:
        have, want = (("read-only", "writable") if st.read_only
                      else ("writable", "read-only"))
        raise Conflict(f"{spec} is attached {have} here; a {want} attach needs "
                       f"`cephvol detach {spec}` first")
    if found and found[1].device:
        broken = found[0].health(found[1])
        if broken:
            raise DataLost(f"{spec} is mapped at {found[1].device} but its mapping is "
                           f"broken ({broken}): writes since its last flush were not "
                           f"written to the cluster; run `cephvol detach --force {spec}`, "
                           "then attach again")
    if found and st and st.phase == "attached" and found[1].device == st.device:
        if mp is None or (st.mountpoint == mp and _mounted_at(host, st.device, mp)):
            if st.extra.get("owner"):
                _still_owned(host, spec)
            return _finish(store, spec, st, req.env_file, already=True)
    # fresh attach, or finishing one that was interrupted
    if mp and not (found and st and st.mountpoint == mp and _mounted_at(host, st.device, mp)):
        assert req.mountpoint is not None
        fs.check_mountpoint(req.mountpoint, host.mounts(), host.paths.state_dir)
    if found:
        backend = found[0]
    else:
        backend = select_backend(req.backend, host.paths, host.cfg)
        if req.size is not None:
            created = create(host.cfg, spec.without_snap(), req.size)
            if created["created"]:
                supervisor.event("create", str(spec), f"created {spec} "
                                 f"({format_size(req.size)}): it did not exist")
    if st is None:
        st = VolumeState(spec=str(spec), conf=str(host.cfg.conf),
                         client_id=host.cfg.client_id, backend=backend.name,
                         mountpoint=mp, read_only=read_only)
        store.save(spec.key, st)
    elif mp and st.mountpoint is None:
        st.mountpoint = mp  # mapped earlier without a mount; mount it now
        store.save(spec.key, st)
    _crash_point("journal")
    try:
        if read_only:
            mapping = _map(host, backend, spec, opts)
        else:
            with Cluster(host.cfg) as cluster:
                mapping = _map_owned(host, cluster, backend, spec, opts, st, req,
                                     premapped=found[1] if found else None)
    except CephvolError:
        # connecting, owning or mapping failed with no step done yet: the
        # journal of an attach that changed nothing goes too
        if not st.steps:
            store.remove(spec.key)
        raise
    st.backend, st.device, st.backend_id = backend.name, mapping.device, mapping.backend_id
    st.extra = {**{k: v for k, v in st.extra.items() if k in ("owner", "takeover")},
                **mapping.extra}
    _done(store, spec, st, "map")
    _event("map", spec, st, f"mapped {spec} at {st.device} ({backend.name})")
    _crash_point("map")
    if mp or (req.mkfs and not read_only and "mkfs" not in st.steps):
        _ensure_filesystem(host, backend, spec, st, req, read_only)
    if mp:
        assert req.mountpoint is not None
        if not _mounted_at(host, st.device, mp):
            fs.ensure_mountpoint(req.mountpoint, host.mounts(), host.paths.state_dir)
            _crash_point("mkdir")
            assert st.fstype
            fs.fsck(st.device or "", st.fstype, "skip" if read_only else req.fsck)
            if not read_only:
                fs.grow_offline_if_needed(st.device or "", st.fstype, host.paths.sys_root)
            fs.mount(st.device or "", req.mountpoint, st.fstype, req.mount_options,
                     read_only, state_dir=host.paths.state_dir)
        _done(store, spec, st, "mount")
        _event("mount", spec, st, f"mounted {st.device} ({st.fstype}) at {mp}")
        _crash_point("mount")
    return _finish(store, spec, st, req.env_file, already=False)


def _adopt(host: Host, spec: ImageSpec, backend: Backend, mapping: Mapping) -> VolumeState:
    """A journal for a mapping that is cephvol's by where it lives (under the
    state dir) but whose journal was lost (`rm -rf` of the state dir, a
    quarantined record): rebuilt from what the host shows, so the volume is
    attached and detached as usual instead of being refused as foreign. A
    writable mapping is taken to be owned by this host: detach then gives
    the ownership back (release only ever removes this host's record)."""
    st = VolumeState(spec=str(spec), conf=str(host.cfg.conf), client_id=host.cfg.client_id,
                     backend=backend.name, device=mapping.device,
                     backend_id=mapping.backend_id, read_only=mapping.read_only,
                     steps=["map"], extra={**mapping.extra, "adopted": True})
    try:
        devnum = hostfs.device_number(mapping.device)
        mounted = [m for m in host.mounts() if m.devnum == devnum]
    except (OSError, ValueError):
        mounted = []
    if mounted:
        st.mountpoint, st.fstype = mounted[0].mountpoint, mounted[0].fstype
        st.steps.append("mount")
    if not mapping.read_only:
        st.extra["owner"] = {"host_id": host.identity.id, "cookie": None}
    host.store.save(spec.key, st)
    supervisor.event("adopt", str(spec), f"{spec}: adopted the mapping at {mapping.device} "
                     "(its journal was lost)", device=mapping.device, backend=backend.name)
    return st


def _undo_attach(host: Host, spec: ImageSpec, exc: CephvolError) -> None:
    """A failed attach leaves the host as it found it: unmount what it
    mounted, unmap, give ownership back, drop the journal (the same steps
    as detach, which plans them from what is there). When undoing fails too
    (the cluster gone), the error says exactly what is left and how to
    finish. Re-raises `exc` with that added; never returns."""
    st = host.store.load(spec.key)
    found = _find_mapping(host, spec)
    if st is None and found is None:
        raise exc
    left = _describe_left(st, found)
    try:
        res = _detach_locked(host, spec, force=False, lazy=False, unmount=True)
    except CephvolError as undo:
        raise type(exc)(f"{exc.message}; undoing the attach failed too ({undo.message}): "
                        f"left {left}; run `cephvol detach {spec}` to finish") from exc
    if not res.get("detached"):
        raise exc
    kinds = [x.split()[0] for x in res["steps"] if x.split()[0] not in ("check-unused",
                                                                       "forget")]
    raise type(exc)(f"{exc.message}; undone ({', '.join(kinds) or 'journal dropped'}), "
                    "nothing left attached") from exc


def _describe_left(st: VolumeState | None, found: tuple[Backend, Mapping] | None) -> str:
    parts = []
    if found and found[1].device:
        parts.append(f"mapped at {found[1].device}")
    elif found:
        parts.append("a half-made mapping")
    if st and st.mountpoint and "mount" in st.steps:
        parts.append(f"mounted at {st.mountpoint}")
    if st and st.extra.get("owner"):
        parts.append("owned by this host")
    return ", ".join(parts) or "a journal"


def _still_owned(host: Host, spec: ImageSpec) -> None:
    """An attached volume may have been taken over (and this host fenced)
    since: a unit restarting on this host must hear so, not "attached"."""
    me = host.identity
    with Cluster(host.cfg) as cluster:
        rec = ownership.current(cluster, spec)
    if rec is None or rec.host_id != me.id:
        who = f"by {rec.describe()}" if rec else "and released"
        raise Owned(f"{spec} is attached here but was taken over {who}; this host may be "
                    "fenced: `cephvol detach --force` here, then attach where it belongs")


def _map(host: Host, backend: Backend, spec: ImageSpec, opts: MapOptions) -> Mapping:
    try:
        return backend.map(spec, opts)
    except StepTimeout:
        raise  # the cluster does not answer: asking it what is missing would wait again
    except CephvolError:
        # Only now ask the cluster what is missing (pool, namespace, image,
        # snapshot): the backends' own errors are vaguer, and asking up
        # front would cost every read-only attach a cluster round trip.
        with Cluster(host.cfg) as cluster:
            cluster.image_info(spec)
        raise


def _map_owned(host: Host, cluster: Cluster, backend: Backend, spec: ImageSpec,
               opts: MapOptions, st: VolumeState, req: AttachRequest,
               premapped: Mapping | None) -> Mapping:
    """Own the volume, then map it, then note the mapping's client addresses
    in the ownership record (what a takeover by another host fences).

    The journal says "owner" before ownership is asked for, so a crash at any
    point leaves something detach can release (release only removes a record
    of this host's)."""
    me = host.identity
    if "owner" not in st.extra:
        st.extra["owner"] = {"host_id": me.id, "cookie": None}
        host.store.save(spec.key, st)
    rec, took = ownership.acquire(cluster, spec, me, takeover=req.takeover,
                                  force=req.force, wait_s=req.takeover_wait)
    st.extra["owner"] = {"host_id": rec.host_id, "cookie": rec.cookie, "since": rec.since}
    if took:
        st.extra["takeover"] = {"from": took.previous.describe(), "fenced": took.fenced,
                                "waited_s": took.waited_s, "forced": took.forced}
        supervisor.event("takeover", str(spec), f"took {spec} over from "
                         f"{took.previous.describe()}; fenced {', '.join(took.fenced) or '-'}",
                         level=logging.WARNING)
    host.store.save(spec.key, st)
    _crash_point("own")
    before = {w["addr"] for w in cluster.watchers(spec)}
    if premapped is not None and not rec.addrs:
        before = set()  # resuming: the watchers there now are ours
    elif premapped is None and not req.force:
        _refuse_other_users(cluster, spec, me, before,
                            known=set(rec.addrs) | set(took.fenced if took else ()))
    if (backend.name == "krbd" and opts.exclusive is None
            and "exclusive-lock" in cluster.image_features(spec)):
        # the kernel's own guard: no second writer even outside cephvol
        opts = MapOptions(**{**opts.__dict__, "exclusive": True,
                             "lock_timeout": opts.lock_timeout or int(step_timeout())})
    try:
        mapping = backend.map(spec, opts)
    except CephvolError:
        if not st.steps:
            # owned a moment ago for a map that never happened: give it back,
            # or every other host would be refused for nothing (attach then
            # drops the journal)
            with contextlib.suppress(CephvolError):
                ownership.release(cluster, spec, me)
        raise
    addrs: list[str] = []
    deadline = time.monotonic() + 5
    while True:  # rbd-fuse opens the image when the loop device opens its file
        addrs = sorted({w["addr"] for w in cluster.watchers(spec)} - before)
        if addrs or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    try:
        ownership.record_addrs(cluster, spec, rec, addrs)
    except Owned:
        backend.unmap(mapping, force=False)  # taken over meanwhile: not ours to use
        raise
    st.extra["owner"]["addrs"] = addrs
    return mapping


def _refuse_other_users(cluster: Cluster, spec: ImageSpec, me: ownership.HostIdentity,
                        watchers: set[str], known: set[str]) -> None:
    """Refuse to map writable while a client that is not this volume's owner
    uses the image: a plain `rbd map` elsewhere, a VM's librbd, a mapping made
    after the ownership record was deleted. Mounting it here too would make
    two writers of one filesystem (fuse and nbd hold no exclusive lock; krbd's
    would take the image from the live writer). The ownership just taken is
    given back first, so the refusal changes nothing."""
    foreign = sorted(watchers - known)
    if not foreign:
        return
    lockers = [lk["address"] for lk in cluster.lockers(spec)]
    with contextlib.suppress(CephvolError):
        ownership.release(cluster, spec, me)
    held = [a for a in foreign if a in lockers]
    raise Busy(f"{spec} is in use by another client: watched from {', '.join(foreign)}"
               + (f" (holding its lock: {', '.join(held)})" if held else
                  (f"; locked by {', '.join(lockers)}" if lockers else ""))
               + "; not mapping it writable (--force to map anyway, --takeover for a dead "
               "owner)")


def _finish(store: StateStore, spec: ImageSpec, st: VolumeState, env_file: Path | None, *,
            already: bool) -> dict[str, Any]:
    """Record the volume as attached, then hand it over (env file), in that
    order: detach learns of the env file from the journal and removes it."""
    old_env = st.extra.get("env_file")
    if env_file:
        st.extra["env_file"] = str(env_file)
    if env_file or not already:
        st.phase = "attached"
        store.save(spec.key, st)
    res = _result(st, already=already)
    if env_file:
        envfile.write(env_file, spec, res, store)
        if old_env and old_env != str(env_file):
            envfile.remove(old_env, spec)  # re-attached with another: only if ours
    where = f" at {st.mountpoint}" if st.mountpoint else ""
    msg = f"{spec} {'was already' if already else 'is'} attached: {st.device}{where}"
    _event("attached", spec, st, msg)
    supervisor.notify(msg, ready=True)
    return res


def _event(step: str, spec: ImageSpec, st: VolumeState, message: str) -> None:
    supervisor.event(step, str(spec), message, device=st.device, backend=st.backend,
                     mountpoint=st.mountpoint)


def _ensure_filesystem(host: Host, backend: Backend, spec: ImageSpec, st: VolumeState,
                       req: AttachRequest, read_only: bool) -> None:
    # re-find the mapping right before probing: the device we format must be
    # the one the kernel says is this image, now, not a name we saw earlier
    current = backend.find(spec)
    if current is None or current.device != st.device or not st.device:
        raise Conflict(f"mapping of {spec} changed under us (expected {st.device}); "
                       "not formatting; run detach and attach again")
    p = fs.probe(st.device)
    if p.kind == "empty":
        if read_only or not req.mkfs:
            raise UsageError(f"{spec} holds no filesystem and is mapped read-only or "
                             "--no-mkfs was given; nothing to mount")
        fstype = req.fstype or "ext4"
        if not req.force_mkfs:
            with Cluster(host.cfg) as cluster:
                used = cluster.allocated_bytes(spec)
            if used:
                raise Unsafe(f"{spec} ({st.device}) has no signature blkid knows, but "
                             f"{format_size(used)} of it hold data (raw data written "
                             "through the device?); refusing to format it (--force-mkfs "
                             "formats it, destroying that data)")
        st.steps.append("mkfs-started")
        host.store.save(spec.key, st)
        fs.mkfs(st.device, fstype, req.mkfs_options)
        st.fstype = fstype
        st.extra["created_filesystem"] = True
        _done(host.store, spec, st, "mkfs")
        _event("mkfs", spec, st, f"made {fstype} on {st.device}, which was empty")
        _crash_point("mkfs")
    elif p.kind == "filesystem":
        if req.fstype and p.fstype != req.fstype:
            raise Conflict(f"{st.device} ({spec}) holds {p.fstype}, not {req.fstype}; "
                           "not formatting it")
        if p.fstype not in fs.FSTYPES:
            raise Conflict(f"{spec} holds {p.fstype}; cephvol mounts only "
                           f"{' and '.join(fs.FSTYPES)}")
        st.fstype = p.fstype
    else:
        raise Unsafe(f"{spec} ({st.device}) holds {p.detail or p.kind}, not a filesystem; "
                     "refusing to format or mount it")


def _done(store: StateStore, spec: ImageSpec, st: VolumeState, step: str) -> None:
    if step not in st.steps:
        st.steps.append(step)
    store.save(spec.key, st)


def _mounted_at(host: Host, device: str | None, mountpoint: str | None) -> bool:
    if not device or not mountpoint:
        return False
    try:
        dev = hostfs.device_number(device)
    except (OSError, ValueError):
        return False
    return any(m.mountpoint == mountpoint and m.devnum == dev for m in host.mounts())


def _result(st: VolumeState, *, already: bool) -> dict[str, Any]:
    return {
        "image": st.spec,
        "device": st.device,
        "mountpoint": st.mountpoint,
        "backend": st.backend,
        "backend_id": st.backend_id,
        "fstype": st.fstype,
        "read_only": st.read_only,
        "created_filesystem": bool(st.extra.get("created_filesystem")) and not already,
        "already_attached": already,
    }


# -- detach ---------------------------------------------------------------------


def observe(host: Host, spec: ImageSpec) -> tuple[Observed, Backend | None, Mapping | None]:
    st = host.store.load(spec.key)
    found = _find_mapping(host, spec)
    backend, mapping = found if found else (None, None)
    device = mapping.device if mapping else ""
    own: list[hostfs.Mount] = []
    foreign: dict[str, list[hostfs.Mount]] = {}
    copies: dict[str, list[hostfs.Mount]] = {}
    pids: dict[str, int] = {}
    names: dict[str, str] = {}
    if device:
        try:
            devnum = hostfs.device_number(device)
        except (OSError, ValueError):
            devnum = None
        if devnum:
            own = [m for m in host.mounts() if m.devnum == devnum]
            own_ns = os.readlink(host.paths.proc_root / "self" / "ns" / "mnt")
            foreign, copies, pids, names = _foreign_mounts(
                host, devnum, own, own_ns, st.mountpoint if st else None)
            _backend_copies(host, mapping, own_ns, foreign, copies, pids, names)
    obs = Observed(key=spec.key, journal_present=st is not None, device=device,
                   mapped=mapping is not None, own_mounts=own, foreign_mounts=foreign,
                   foreign_pids=pids, foreign_copies=copies, foreign_names=names,
                   # without a journal (lost, or corrupt and moved aside), a writable
                   # mapping this host unmaps may be this host's to give back:
                   # release only ever removes this host's own record
                   owned=(bool(st.extra.get("owner")) if st is not None
                          else bool(mapping and mapping.device and not mapping.read_only)))
    return obs, backend, mapping


def _mounts_by_ns(devnum: tuple[int, int], proc_root: Path
                  ) -> dict[str, tuple[int, list[hostfs.Mount]]]:
    out: dict[str, tuple[int, list[hostfs.Mount]]] = {}
    for name in os.listdir(proc_root):
        if not name.isdigit():
            continue
        try:
            ns = os.readlink(proc_root / name / "ns" / "mnt")
        except OSError:
            continue
        if ns in out:
            continue
        try:
            ms = [m for m in hostfs.parse_mountinfo((proc_root / name / "mountinfo").read_text())
                  if m.devnum == devnum]
        except OSError:
            continue
        out[ns] = (int(name), ms)
    return {ns: v for ns, v in out.items() if v[1]}


def _foreign_mounts(host: Host, devnum: tuple[int, int], own: list[hostfs.Mount], own_ns: str,
                    mountpoint: str | None
                    ) -> tuple[dict[str, list[hostfs.Mount]], dict[str, list[hostfs.Mount]],
                               dict[str, int], dict[str, str]]:
    """Other mount namespaces' mounts of the device, per namespace: (mounts
    that make it busy, copies of ours nobody there uses, a pid inside, who is
    there). Copies that go with our umount (propagated) are neither."""
    proc = host.paths.proc_root
    busy: dict[str, list[hostfs.Mount]] = {}
    copies: dict[str, list[hostfs.Mount]] = {}
    pids: dict[str, int] = {}
    names: dict[str, str] = {}
    places = None
    for ns, (pid, ms) in _mounts_by_ns(devnum, proc).items():
        real, _propagated = split_propagated(own, ms)
        if ns == own_ns or not real:
            continue
        pids[ns] = pid
        if places is None:
            places = places_of(own, host.mounts(), mountpoint)
        try:
            ns_mounts = hostfs.read_mounts(proc / str(pid) / "mountinfo")
        except OSError:
            ns_mounts = []
        placed, copy = split_copies(places, ns_mounts, real)
        users = mountns.users_in_namespace(ns, devnum, proc) if copy and not placed else []
        if placed or users:
            busy[ns] = real
            who = mountns.container_of(pid, proc)
            names[ns] = "; ".join(([who] if who else []) + [
                f"pid {u.pid} ({u.command}) has its {u.what} there" for u in users])
        else:
            copies[ns] = copy
    return busy, copies, pids, names


def _backend_copies(host: Host, mapping: Mapping | None, own_ns: str,
                    busy: dict[str, list[hostfs.Mount]], copies: dict[str, list[hostfs.Mount]],
                    pids: dict[str, int], names: dict[str, str]) -> None:
    """A namespace cloned while the volume was mapped also holds a copy of
    rbd-fuse's own mount, which keeps rbd-fuse (and librbd's cache) alive after
    ours is gone: such copies are added to the ones to unmount."""
    where = mapping.extra.get("fuse_dir") if mapping else None
    if not where:
        return
    ours = [m for m in host.mounts() if m.mountpoint == str(where)]
    for dev in {m.devnum for m in ours}:
        b, c, p, n = _foreign_mounts(host, dev, [m for m in ours if m.devnum == dev],
                                     own_ns, None)
        for ns, ms in b.items():
            busy.setdefault(ns, []).extend(ms)
            names[ns] = names.get(ns) or n.get(ns, "")
        for ns, ms in c.items():
            copies.setdefault(ns, []).extend(ms)
        for ns, pid in p.items():
            pids.setdefault(ns, pid)


def detach(host: Host, spec: ImageSpec, *, force: bool = False,
           lazy: bool = False, unmount: bool = True) -> dict[str, Any]:
    """Undo attach. With `unmount=False` (`cephvol unmap`) a mounted device is
    refused instead of unmounted, unless forced."""
    with host.store.lock(spec.key):
        return _detach_locked(host, spec, force=force, lazy=lazy, unmount=unmount)


@dataclass
class _Outcome:
    """What a detach learned on its way that makes it end in an error even
    though every step ran (forced past a lost flush, a corrupt record)."""

    not_written: str | None = None
    corrupt_record: str | None = None
    # client addresses of a mapping whose daemon died: fenced before the
    # release, so the dead client's watch and lock go now, not in 30 s
    dead_addrs: list[str] = field(default_factory=list)


def _detach_locked(host: Host, spec: ImageSpec, *, force: bool, lazy: bool,
                   unmount: bool) -> dict[str, Any]:
    store = host.store
    obs, backend, mapping = observe(host, spec)
    if not unmount and obs.own_mounts and not force:
        where = ", ".join(m.mountpoint for m in obs.own_mounts)
        raise Busy(f"{obs.device} is mounted at {where}; use `cephvol detach` to "
                   "unmount and unmap, or --force")
    plan = plan_detach(obs, force=force, lazy=lazy)
    if not plan:
        return {"image": str(spec), "detached": False, "steps": [],
                "message": "not attached"}
    outcome = _Outcome()
    broken = backend.health(mapping) if backend and mapping and mapping.device else None
    if broken and plan[0].kind != "refuse":
        lost = (f"its mapping at {mapping.device if mapping else '?'} is broken ({broken}): "
                "writes since its last flush were not written to the cluster")
        if not force:
            raise DataLost(f"{spec}: {lost}. Nothing was changed; `cephvol detach --force "
                           f"{spec}` tears it down, and what was not written is lost")
        outcome.not_written = lost
    st = store.load(spec.key)
    if broken and st is not None and isinstance(st.extra.get("owner"), dict):
        outcome.dead_addrs = list(st.extra["owner"].get("addrs") or [])
    if (force and not broken and backend and mapping and mapping.device and st is not None
            and st.extra.get("owner") and plan[0].kind != "refuse"):
        taker = _taken_over_by(host, spec)
        if taker:
            # fenced: nothing this mapping holds can reach the cluster any more, and
            # its daemon waits forever on the fenced connection: cut it loose first
            outcome.not_written = (f"this host was fenced when {taker} took the volume "
                                   "over: writes since then were not written to the cluster")
            backend.abort(mapping)
    if st is not None and st.phase != "detaching":
        st.phase = "detaching"
        store.save(spec.key, st)
    done: list[str] = []
    for step in plan:
        try:
            _run_step(host, spec, step, backend, mapping, force, outcome)
        except StepTimeout as exc:
            taker = (_taken_over_by(host, spec)
                     if st is not None and st.extra.get("owner") else None)
            if taker:
                raise DataLost(
                    f"{exc.message}: this host was fenced when {taker} took {spec} over, "
                    "so writes since then were not written to the cluster and never will "
                    f"be; `cephvol detach --force {spec}` tears the mapping down (that "
                    "data is lost)") from exc
            raise StepTimeout(
                f"{exc.message}; is the cluster reachable? Done so far: "
                f"{', '.join(done) or 'nothing'}. Nothing further was changed, the "
                "pending writes stay queued and reach the cluster when it is back; "
                "then run `cephvol detach` again to finish") from exc
        done.append(f"{step.kind} {step.target}".strip())
        supervisor.event(step.kind, str(spec), f"detach {spec}: {done[-1]}",
                         device=obs.device, backend=backend.name if backend else None)
        _crash_point(f"detach-{step.kind}")
    if outcome.not_written:
        supervisor.event("error", str(spec), f"{spec} was detached by force; "
                         f"{outcome.not_written}", level=logging.ERROR,
                         device=obs.device, backend=backend.name if backend else None)
        raise DataLost(f"{spec} is detached (forced), but {outcome.not_written}: that data "
                       "is lost")
    if outcome.corrupt_record:
        raise Conflict(f"{spec} is detached here, but {outcome.corrupt_record}; `cephvol "
                       f"owner {spec} --repair` removes it once no client uses the image")
    supervisor.event("detached", str(spec), f"{spec} is detached ({', '.join(done)})",
                     device=obs.device, backend=backend.name if backend else None)
    return {"image": str(spec), "detached": True, "steps": done,
            "device": obs.device or (st.device if st else None)}


def _taken_over_by(host: Host, spec: ImageSpec) -> str | None:
    """Who took `spec` over from this host, if anyone did (best effort: None
    when the cluster cannot tell us)."""
    try:
        with Cluster(host.cfg) as cluster:
            rec = ownership.current(cluster, spec)
    except CephvolError:
        return None
    if rec is not None and rec.host_id != host.identity.id:
        return rec.describe()
    return None


def _run_step(host: Host, spec: ImageSpec, step: Step, backend: Backend | None,
              mapping: Mapping | None, force: bool, outcome: _Outcome) -> None:
    if step.kind == "refuse":
        raise Busy(step.detail)
    if step.kind == "sync":
        failed = fs.sync_fs(step.target)
        if failed:
            lost = f"flushing {step.target} failed ({failed}): writes were not written"
            if not force:
                raise DataLost(f"{spec}: {lost} to the cluster (a dead mapping daemon, or "
                               "this host was fenced). Nothing was unmounted; `cephvol detach "
                               "--force` tears it down, and what was not written is lost")
            outcome.not_written = outcome.not_written or lost
    elif step.kind == "umount-copy":
        _umount_copy(host, step, force)
    elif step.kind == "umount":
        try:
            fs.umount(step.target, lazy=step.detail == "lazy",
                      device=mapping.device if mapping else None)
        except Busy as exc:
            holders = hostfs.processes_using(under=step.target, proc_root=host.paths.proc_root)
            who = ", ".join(f"pid {h.pid} ({h.command}, {h.what})" for h in holders)
            raise Busy(f"{step.target} is busy: held by {who or 'an unknown user'}; "
                       "stop those processes, or pass --lazy") from exc
    elif step.kind == "check-unused":
        if step.detail != "skip":
            ignore = backend.own_pids(mapping) if backend and mapping else set()
            _check_unused(host, step.target, ignore)
    elif step.kind == "unmap":
        assert backend is not None and mapping is not None
        backend.unmap(mapping, force=force)
    elif step.kind == "release":
        try:
            with Cluster(host.cfg) as cluster:
                for addr in outcome.dead_addrs:
                    # our own dead client (its daemon is gone): fencing it ends
                    # its watch and lock at once; without the caps they expire
                    with contextlib.suppress(CephvolError):
                        cluster.blocklist(addr)
                released = ownership.release(cluster, spec, host.identity)
        except ownership.CorruptRecord as exc:
            outcome.corrupt_record = exc.message
            return
        except CephvolError as exc:
            raise type(exc)(f"{spec} is unmapped here, but its ownership could not be "
                            f"given back ({exc.message}); run detach again when the "
                            "cluster answers") from exc
        if released == "owned-by-other":
            supervisor.event("release", str(spec), f"{spec} had been taken over by another "
                             "host; nothing to give back", level=logging.WARNING)
    elif step.kind == "forget":
        st = host.store.load(spec.key)
        envfile.remove(st.extra.get("env_file") if st else None, spec)  # only if ours
        host.store.remove(spec.key)


def _umount_copy(host: Host, step: Step, force: bool) -> None:
    """Unmount a copy of our mount inside the namespace that holds it (the
    plan saw nobody there using it; the non-lazy unmount re-checks that)."""
    pid, ns, dev = step.detail.split(" ")
    major, minor = dev.split(":")
    try:
        mountns.umount_copy(int(pid), ns, step.target, (int(major), int(minor)),
                            proc_root=host.paths.proc_root)
    except Busy as exc:
        if force:
            return  # the forced unmap follows; the copy keeps what it has
        who = mountns.container_of(int(pid), host.paths.proc_root)
        raise Busy(f"a copy of the volume at {step.target} in the mount namespace of pid "
                   f"{pid}{f' ({who})' if who else ''} came into use; stop that container "
                   "first, or pass --force") from exc


def _check_unused(host: Host, device: str, ignore_pids: set[int] | None = None) -> None:
    devnum = hostfs.device_number(device)
    name = os.path.basename(device)
    by_ns = _mounts_by_ns(devnum, host.paths.proc_root)
    _, mine = by_ns.pop(os.readlink(host.paths.proc_root / "self" / "ns" / "mnt"), (0, []))
    if mine:
        raise Busy(f"{device} is still mounted at {', '.join(m.mountpoint for m in mine)}; "
                   "not unmapping")
    # a propagated copy that did not go with our umount (something in that
    # namespace holds it) still uses the device
    elsewhere = [f"{m.mountpoint} in the mount namespace of pid {pid}"
                 for pid, ms in by_ns.values() for m in ms]
    if elsewhere:
        raise Busy(f"{device} is still mounted at {'; '.join(elsewhere)}; not unmapping "
                   "(or --force)")
    kernel = hostfs.block_holders(name, host.paths.sys_root)
    if kernel:
        raise Busy(f"{device} is held by {', '.join(kernel)}; not unmapping (or --force)")
    users = [h for h in hostfs.processes_using(devnum=devnum, proc_root=host.paths.proc_root)
             if h.pid not in (ignore_pids or set())]
    if users:
        who = ", ".join(f"pid {h.pid} ({h.command})" for h in users)
        raise Busy(f"{device} is open by {who}; not unmapping (or --force)")


# -- cleanup --------------------------------------------------------------------


def _stale_reason(host: Host, st: VolumeState, mapping: Mapping | None) -> str | None:
    """Why a journalled volume has no live owner, or None if it is fine."""
    if st.phase != "attached":
        if st.pid and hostfs.pid_alive(st.pid, host.paths.proc_root):
            return None  # a cephvol is working on it right now
        return f"{st.phase} by pid {st.pid}, which is gone"
    if mapping is None or not mapping.device:
        return "attached, but its mapping is gone (reboot, or a killed rbd-fuse/rbd-nbd)"
    broken = make_backend(mapping.backend, host.paths, host.cfg).health(mapping)
    if broken:
        return f"attached, but {broken}"
    return None


def cleanup(host: Host, *, everything: bool = False, force: bool = False
            ) -> list[dict[str, Any]]:
    """Release what has no owner any more; with `everything`, detach it all.

    Stale: a journal whose cephvol died mid-attach/-detach, a volume whose
    mapping vanished (reboot, killed userspace daemon), a fuse mapping no
    journal knows. `everything` is the shutdown path: every volume cephvol
    attached. Each goes through the same detach, so a volume that is still
    mounted by a container is reported busy, not torn away (unless `force`).
    """
    mappings = {m.spec: m for m in list_all(host.paths, host.cfg)}  # one listing for all
    specs: dict[str, str] = {}
    journalled = set()
    for key in host.store.keys():
        st = host.store.load(key)
        if st is None:
            continue
        journalled.add(st.spec)
        reason = "detach all" if everything else _stale_reason(host, st, mappings.get(st.spec))
        if reason:
            specs[st.spec] = reason
    for m in mappings.values():
        if m.backend == "fuse" and m.spec not in journalled:
            specs[m.spec] = "fuse mapping without a journal (an interrupted attach)"
    out = []
    for text, reason in sorted(specs.items()):
        row: dict[str, Any] = {"image": text, "reason": reason}
        try:
            res = detach(host, parse_spec(text), force=force)
            row.update(ok=True, steps=res["steps"])
        except CephvolError as exc:
            row.update(ok=False, error=exc.message, exit_code=int(exc.exit_code))
        except Exception as exc:  # a bug on one volume must not strand the others
            row.update(ok=False, error=f"internal error: {type(exc).__name__}: {exc}",
                       exit_code=70)
        out.append(row)
    return out


# -- resize ---------------------------------------------------------------------


def resize(host: Host, spec: ImageSpec, size: int, *, timeout: float = 60.0) -> dict[str, Any]:
    """Grow the image, then the device's view of it, then the mounted filesystem.

    Each step is idempotent, so a resize interrupted half-way is finished by
    running it again (the image is already big, the filesystem still grows).
    """
    with host.store.lock(spec.key):
        with Cluster(host.cfg) as c:
            rec = ownership.current(c, spec)
            if rec is not None and rec.host_id != host.identity.id:
                raise Owned(f"{spec} is owned by {rec.describe()}; resize it there")
            old, changed = c.grow_image(spec, size)
        res: dict[str, Any] = {"image": str(spec), "old_size": old, "size": size,
                               "changed": changed, "device": None, "filesystem_grown": False}
        found = _find_mapping(host, spec)
        if found is None or not found[1].device:
            return res
        backend, mapping = found
        res["device"] = mapping.device
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            # rbd-fuse (and the other daemons) learn the new size a moment
            # after librbd's resize returns: nudge again until the device shows it
            backend.refresh_size(mapping)
            if fs.device_size(mapping.device, host.paths.sys_root) >= size:
                break
            if time.monotonic() > deadline:
                raise StepTimeout(f"{mapping.device} still shows the old size {timeout:g}s "
                                  "after the image grew")
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
        st = host.store.load(spec.key)
        if (st and st.mountpoint and st.fstype and not st.read_only
                and _mounted_at(host, st.device, st.mountpoint)):
            fs.grow(mapping.device, st.fstype, st.mountpoint)
            res["filesystem_grown"] = True
        return res


# -- status ---------------------------------------------------------------------


def status(host: Host) -> list[dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for key in host.store.keys():
        st = host.store.load(key)
        if st is None:
            continue
        rows[st.spec] = {"image": st.spec, "device": st.device, "mountpoint": st.mountpoint,
                         "backend": st.backend, "phase": st.phase, "fstype": st.fstype,
                         "read_only": st.read_only, "mapped": False, "mounted": False,
                         "owner": _owner_row(st)}
    for b in all_backends(host.paths, host.cfg):
        if not b.mappings_are_ours and not b.support().ok:
            continue
        for m in b.list_mappings():
            row = rows.setdefault(m.spec, {"image": m.spec, "device": m.device,
                                           "mountpoint": None, "backend": m.backend,
                                           "phase": "foreign", "fstype": None,
                                           "read_only": m.read_only, "mounted": False})
            row["mapped"] = bool(m.device)
            row["device"] = m.device or row["device"]
            broken = b.health(m)
            if row["phase"] == "foreign" and b.mappings_are_ours:
                row["phase"] = "unjournalled"  # cephvol's, journal lost: attach adopts it
            if not m.device or broken:
                row["phase"] = "broken"
                row["problem"] = broken or "half-made mapping (an interrupted attach)"
    for path in host.store.corrupt_files():
        rows.setdefault(f"journal:{path.name}", {
            "image": None, "device": None, "mountpoint": None, "backend": None,
            "phase": "journal-corrupt", "fstype": None, "read_only": False,
            "mapped": False, "mounted": False, "journal": str(path),
            "problem": "damaged journal moved aside; the volume is handled from what the "
                       "host shows (remove the file once its volume is detached)"})
    for row in rows.values():
        row["mounted"] = _mounted_at(host, row["device"], row["mountpoint"])
    return [rows[k] for k in sorted(rows)]


def _owner_row(st: VolumeState) -> dict[str, Any] | None:
    rec = st.extra.get("owner")
    return {k: rec.get(k) for k in ("host_id", "since", "addrs")} if rec else None


def create(cfg: ClusterConfig, spec: ImageSpec, size: int) -> dict[str, Any]:
    """Create the image (idempotent, see Cluster.create_image) and say so when
    it is larger than its pool can still take: thin provisioning makes that
    legal, and sometimes meant, but writes fail once the pool is full."""
    with Cluster(cfg) as cluster:
        created = cluster.create_image(spec, size)
        free = cluster.pool_free(spec.pool)
    res: dict[str, Any] = {"image": str(spec), "size": size, "created": created}
    if free is not None and size > free:
        res["warning"] = (f"{format_size(size)} is more than pool {spec.pool} can still take "
                          f"({format_size(free)} free): writes will fail once it is full")
    return res


def remove(host: Host, spec: ImageSpec) -> None:
    """Remove an image nobody uses: not mapped here, not watched or locked by
    anyone, not owned by any host (whose volume it still is)."""
    found = _find_mapping(host, spec)
    if found:
        raise Busy(f"{spec} is mapped on this host at {found[1].device or '(half-mapped)'}; "
                   "detach it first")
    with Cluster(host.cfg) as cluster:
        rec = ownership.current(cluster, spec)
        if rec is not None:
            raise Owned(f"{spec} is owned by {rec.describe()}; detach it there first")
        cluster.remove_image(spec)


def owner(host: Host, spec: ImageSpec, *, release: bool = False,
          repair: bool = False) -> dict[str, Any]:
    """Who owns `spec`; with release, give back this host's ownership, which
    only makes sense when nothing of it is mapped here any more; with
    repair, remove a corrupt ownership record while no client uses the image."""
    me = host.identity
    with Cluster(host.cfg) as cluster:
        if repair:
            if _find_mapping(host, spec):
                raise Busy(f"{spec} is mapped here; detach it first, then repair")
            done = ownership.repair(cluster, spec)
            return {"image": str(spec), "repaired": done == "removed",
                    "message": "corrupt ownership record removed" if done == "removed"
                    else "the ownership record is fine; nothing to repair"}
        rec = ownership.current(cluster, spec)
        res: dict[str, Any] = {"image": str(spec), "owner": rec.to_dict() if rec else None,
                               "this_host": bool(rec and rec.host_id == me.id),
                               "host": {"id": me.id, "name": me.name}}
        if release:
            if rec is None:
                res["released"] = False  # nothing to give back: a no-op, like detach
                return res
            if rec.host_id != me.id:
                raise Owned(f"{spec} is not owned by this host but by {rec.describe()}; "
                            "nothing to release")
            if _find_mapping(host, spec) or host.store.load(spec.key):
                raise Busy(f"{spec} is attached or mapped here; use `cephvol detach`")
            res["released"] = ownership.release(cluster, spec, me) == "released"
        return res


def backend_for(host: Host, name: str) -> Backend:
    return make_backend(name, host.paths, host.cfg)


def spec_arg(text: str, allow_snap: bool = True) -> ImageSpec:
    return parse_spec(text, allow_snap=allow_snap)
