"""attach: own -> map -> (mkfs only if provably empty) -> (fsck) -> mount,
each step journalled after it is done; a failure after the map is undone
(the same steps detach runs), so a failed attach leaves the host as it was."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cephvol import envfile, fs, hostfs, ownership, supervisor
from cephvol.cluster import Cluster
from cephvol.data import encryption
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
from cephvol.lifecycle.detach import detach_locked
from cephvol.lifecycle.host import Host, crash_point, event, find_mapping, mounted_at
from cephvol.lifecycle.manage import create
from cephvol.mapper import (
    Backend,
    MapOptions,
    Mapping,
    select_backend,
)
from cephvol.proc import step_timeout
from cephvol.spec import ImageSpec, format_size
from cephvol.state import StateStore, VolumeState
from cephvol.waiting import wait_for


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
    # (uid, gid) owning the root of a filesystem this attach makes; an
    # existing filesystem is never chowned (its owner is the data's business)
    owner: tuple[int, int] | None = None


def attach(host: Host, req: AttachRequest) -> dict[str, Any]:
    spec = req.spec
    req.options.validate()
    read_only = req.options.read_only or spec.read_only
    opts = MapOptions(**{**req.options.__dict__, "read_only": read_only})
    if req.fstype:
        fs.validate_fstype(req.fstype)
    if req.fsck not in fs.FSCK_MODES:
        raise UsageError(f"--fsck must be one of {', '.join(fs.FSCK_MODES)}")
    if req.owner is not None:
        # checked (and normalised) here too: the API and the plugin build requests
        req.owner = fs.parse_owner(":".join(str(i) for i in req.owner))
        if read_only or not req.mkfs:
            raise UsageError("--owner sets the owner of the root of a filesystem attach "
                             "makes: not with --read-only, a snapshot or --no-mkfs")
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
    found = find_mapping(host, spec)
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
        if mp is None or (st.mountpoint == mp and mounted_at(host, st.device, mp)):
            if st.extra.get("owner"):
                _still_owned(host, spec)
            return _finish(store, spec, st, req.env_file, already=True)
    # fresh attach, or finishing one that was interrupted
    if mp and not (found and st and st.mountpoint == mp and mounted_at(host, st.device, mp)):
        assert req.mountpoint is not None
        fs.check_mountpoint(req.mountpoint, host.mounts(), host.paths.state_dir)
    if found:
        backend = found[0]
    else:
        # an encrypted image needs a backend that can decrypt it: asked only
        # when the one chosen cannot (krbd, nbd, fuse)
        backend = select_backend(req.backend, host.paths, host.cfg, what=str(spec),
                                 encrypted=lambda: encryption.is_encrypted(host.cfg, spec))
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
    crash_point("journal")
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
    event("map", spec, st, f"mapped {spec} at {st.device} ({backend.name})")
    crash_point("map")
    if mp or (req.mkfs and not read_only and "mkfs" not in st.steps):
        _ensure_filesystem(host, backend, spec, st, req, read_only)
    if mp:
        assert req.mountpoint is not None
        if not mounted_at(host, st.device, mp):
            fs.ensure_mountpoint(req.mountpoint, host.mounts(), host.paths.state_dir)
            crash_point("mkdir")
            assert st.fstype
            fs.fsck(st.device or "", st.fstype, "skip" if read_only else req.fsck)
            if not read_only:
                fs.grow_offline_if_needed(st.device or "", st.fstype, host.paths.sys_root)
            fs.mount(st.device or "", req.mountpoint, st.fstype, req.mount_options,
                     read_only, state_dir=host.paths.state_dir)
        _done(store, spec, st, "mount")
        event("mount", spec, st, f"mounted {st.device} ({st.fstype}) at {mp}")
        crash_point("mount")
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
    found = find_mapping(host, spec)
    if st is None and found is None:
        raise exc
    left = _describe_left(st, found)
    try:
        res = detach_locked(host, spec, force=False, lazy=False, unmount=True)
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
    crash_point("own")
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
    # rbd-fuse opens the image when the loop device opens its file: a moment later
    addrs: list[str] = wait_for(
        lambda: sorted({w["addr"] for w in cluster.watchers(spec)} - before), timeout=5,
        interval=0.05)
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
    event("attached", spec, st, msg)
    supervisor.notify(msg, ready=True)
    return res


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
                used = encryption.data_bytes(cluster, spec)  # a LUKS header is no data
            if used:
                raise Unsafe(f"{spec} ({st.device}) has no signature blkid knows, but "
                             f"{format_size(used)} of it hold data (raw data written "
                             "through the device?); refusing to format it (--force-mkfs "
                             "formats it, destroying that data)")
        st.steps.append("mkfs-started")
        host.store.save(spec.key, st)
        fs.mkfs(st.device, fstype, req.mkfs_options, owner=req.owner)
        st.fstype = fstype
        st.extra["created_filesystem"] = True
        owned = ""
        if req.owner is not None:
            st.extra["root_owner"] = f"{req.owner[0]}:{req.owner[1]}"
            owned = f" (its root owned by {st.extra['root_owner']})"
        _done(host.store, spec, st, "mkfs")
        event("mkfs", spec, st, f"made {fstype} on {st.device}, which was empty{owned}")
        crash_point("mkfs")
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


def _result(st: VolumeState, *, already: bool) -> dict[str, Any]:
    return {
        "image": st.spec,
        "device": st.device,
        "mountpoint": st.mountpoint,
        "backend": st.backend,
        "backend_id": st.backend_id,
        "fstype": st.fstype,
        "read_only": st.read_only,
        "encryption": st.extra.get("encryption"),
        "created_filesystem": bool(st.extra.get("created_filesystem")) and not already,
        "already_attached": already,
    }
