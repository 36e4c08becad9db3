"""The other verbs on volumes: status, cleanup (stale or everything), resize,
owner, create and remove. Each goes through the same observations and the
same detach as attach/detach do."""

from __future__ import annotations

import contextlib
from typing import Any

from cephvol import fs, hostfs, ownership
from cephvol.cluster import Cluster, ClusterConfig
from cephvol.errors import (
    Busy,
    CephvolError,
    Owned,
    StepTimeout,
)
from cephvol.lifecycle.detach import detach
from cephvol.lifecycle.host import Host, find_mapping, mounted_at
from cephvol.mapper import (
    Backend,
    Mapping,
    all_backends,
    backend_class,
    list_all,
    make_backend,
)
from cephvol.spec import ImageSpec, format_size, parse_spec
from cephvol.state import VolumeState
from cephvol.waiting import wait_for


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
        if m.spec not in journalled and backend_class(m.backend).mappings_are_ours:
            specs[m.spec] = (f"{m.backend} mapping without a journal (an interrupted attach, "
                             "or a lost state dir)")
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
        found = find_mapping(host, spec)
        if found is None or not found[1].device:
            return res
        backend, mapping = found
        res["device"] = mapping.device
        def grown() -> bool:
            # rbd-fuse (and the other daemons) learn the new size a moment
            # after librbd's resize returns: nudge again until the device shows it
            backend.refresh_size(mapping)
            return fs.device_size(mapping.device, host.paths.sys_root) >= size

        if not wait_for(grown, timeout=timeout, interval=0.05, backoff=2.0):
            raise StepTimeout(f"{mapping.device} still shows the old size {timeout:g}s "
                              "after the image grew")
        st = host.store.load(spec.key)
        if (st and st.mountpoint and st.fstype and not st.read_only
                and mounted_at(host, st.device, st.mountpoint)):
            fs.grow(mapping.device, st.fstype, st.mountpoint)
            res["filesystem_grown"] = True
        return res


def status(host: Host) -> list[dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for key in host.store.keys():
        st = host.store.load(key)
        if st is None:
            continue
        rows[st.spec] = {"image": st.spec, "device": st.device, "mountpoint": st.mountpoint,
                         "backend": st.backend, "phase": st.phase, "fstype": st.fstype,
                         "read_only": st.read_only, "mapped": False, "mounted": False,
                         "encryption": st.extra.get("encryption"), "owner": _owner_row(st)}
    for b in all_backends(host.paths, host.cfg):
        if not b.mappings_are_ours and not b.support().ok:
            continue
        for m in b.scan():
            if not m.spec:
                rows[f"{m.backend}:{m.extra.get('qsd_dir') or m.backend_id}"] = _orphan_row(
                    host, m)
                continue
            row = rows.setdefault(m.spec, {"image": m.spec, "device": m.device,
                                           "mountpoint": None, "backend": m.backend,
                                           "phase": "foreign", "fstype": None,
                                           "read_only": m.read_only, "mounted": False,
                                           "encryption": None})
            row["mapped"] = bool(m.device)
            if m.extra.get("encryption"):
                row["encryption"] = m.extra["encryption"]
            row["device"] = m.device or row["device"]
            broken = b.health(m)
            if row["phase"] == "foreign" and b.mappings_are_ours:
                row["phase"] = "unjournalled"  # cephvol's, journal lost: attach adopts it
            if not m.device or broken:
                row["phase"] = "broken"
                row["problem"] = broken or "half-made mapping (an interrupted attach)"
            elif stalled := b.stalled(m):
                row["phase"] = "stalled"
                row["problem"] = stalled
    for path in host.store.corrupt_files():
        rows.setdefault(f"journal:{path.name}", {
            "image": None, "device": None, "mountpoint": None, "backend": None,
            "phase": "journal-corrupt", "fstype": None, "read_only": False, "encryption": None,
            "mapped": False, "mounted": False, "journal": str(path),
            "problem": "damaged journal moved aside; the volume is handled from what the "
                       "host shows (remove the file once its volume is detached)"})
    for row in rows.values():
        row["mounted"] = mounted_at(host, row["device"], row["mountpoint"])
    return [rows[k] for k in sorted(rows)]


def _orphan_row(host: Host, m: Mapping) -> dict[str, Any]:
    """A mapping whose image is recorded nowhere (Backend.scan)."""
    where = m.extra.get("qsd_dir") or m.backend_id
    on = None
    with contextlib.suppress(OSError, ValueError):
        dev = hostfs.device_number(m.device) if m.device else None
        on = next((x.mountpoint for x in host.mounts() if x.devnum == dev), None)
    return {"image": None, "device": m.device or None, "mountpoint": on,
            "backend": m.backend, "phase": "broken", "fstype": None,
            "read_only": m.read_only, "mapped": bool(m.device), "mounted": False,
            "encryption": m.extra.get("encryption"),
            "problem": f"a {m.backend} mapping ({where}) whose image is recorded nowhere "
                       "any more (state directory removed?) and whose daemon is gone: "
                       "writes not yet flushed are lost; `cephvol detach IMAGE` with "
                       "its image removes it"}


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
    found = find_mapping(host, spec)
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
            if find_mapping(host, spec):
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
            if find_mapping(host, spec) or host.store.load(spec.key):
                raise Busy(f"{spec} is attached or mapped here; use `cephvol detach`")
            res["released"] = ownership.release(cluster, spec, me) == "released"
        return res


def backend_for(host: Host, name: str) -> Backend:
    return make_backend(name, host.paths, host.cfg)


def spec_arg(text: str, allow_snap: bool = True) -> ImageSpec:
    return parse_spec(text, allow_snap=allow_snap)
