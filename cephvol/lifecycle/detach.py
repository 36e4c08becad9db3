"""detach: plan from what the host shows (journal, mapping, mounts in every
mount namespace), then run the plan; a flush that fails, a dead or fenced
mapping are reported as data not written (exit 12), never as "detached"."""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cephvol import envfile, fs, hostfs, ownership, proc, supervisor
from cephvol._os import freeze, mountns
from cephvol.cleanup import (
    Observed,
    Step,
    describe_foreign,
    places_of,
    plan_detach,
    split_copies,
    split_propagated,
)
from cephvol.cluster import Cluster
from cephvol.errors import (
    Busy,
    CephvolError,
    Conflict,
    DataLost,
    NotFound,
    StepTimeout,
    SystemCommandError,
)
from cephvol.lifecycle.host import Host, crash_point, find_mapping
from cephvol.mapper import (
    Backend,
    Mapping,
)
from cephvol.spec import ImageSpec


def observe(host: Host, spec: ImageSpec) -> tuple[Observed, Backend | None, Mapping | None]:
    st = host.store.load(spec.key)
    found = find_mapping(host, spec)
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
    proc_root = host.paths.proc_root
    busy: dict[str, list[hostfs.Mount]] = {}
    copies: dict[str, list[hostfs.Mount]] = {}
    pids: dict[str, int] = {}
    names: dict[str, str] = {}
    places = None
    for ns, (pid, ms) in _mounts_by_ns(devnum, proc_root).items():
        real, _propagated = split_propagated(own, ms)
        if ns == own_ns or not real:
            continue
        pids[ns] = pid
        if places is None:
            places = places_of(own, host.mounts(), mountpoint)
        try:
            ns_mounts = hostfs.read_mounts(proc_root / str(pid) / "mountinfo")
        except OSError:
            ns_mounts = []
        placed, copy = split_copies(places, ns_mounts, real)
        users = mountns.users_in_namespace(ns, devnum, proc_root) if copy and not placed else []
        if placed or users:
            busy[ns] = real
            names[ns] = _who_is_there(pid, users, proc_root)
        else:
            copies[ns] = copy
    return busy, copies, pids, names


def _who_is_there(pid: int, users: list[mountns.User], proc_root: Path) -> str:
    """'docker container X; pid N (cmd) has its cwd there; ...' for a
    namespace entered through `pid` whose `users` use the volume."""
    who = mountns.container_of(pid, proc_root)
    return "; ".join(([who] if who else []) + [
        f"pid {u.pid} ({u.command}) has its {u.what} there" for u in users])


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
        return detach_locked(host, spec, force=force, lazy=lazy, unmount=unmount)


@dataclass
class _Outcome:
    """What a detach learned on its way that makes it end in an error even
    though every step ran (forced past a lost flush, a corrupt record)."""

    not_written: str | None = None
    corrupt_record: str | None = None
    # client addresses of a mapping whose daemon died: fenced before the
    # release, so the dead client's watch and lock go now, not in 30 s
    dead_addrs: list[str] = field(default_factory=list)


def detach_locked(host: Host, spec: ImageSpec, *, force: bool, lazy: bool,
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
    stalled = (backend.stalled(mapping) if backend and mapping and mapping.device
               and not broken else None)
    if stalled and plan[0].kind != "refuse":
        if not force:
            raise SystemCommandError(
                f"not detaching {spec}: {stalled}, and a flush through it would wait until "
                "then. Nothing was changed; detach again once it runs (--force tears it "
                "down now, and the writes it holds are lost)")
        outcome.not_written = (f"{stalled.split(';')[0]} when it was torn down by force: "
                               "writes it held were not written to the cluster")
        backend.abort(mapping)
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
    phase_before = st.phase if st is not None else None
    if st is not None and st.phase != "detaching":
        st.phase = "detaching"
        store.save(spec.key, st)
    done: list[str] = []
    for step in plan:
        try:
            _run_step(host, spec, step, backend, mapping, force, outcome)
        except (Busy, DataLost):
            # refused before anything changed (a holder, a failed flush): the
            # volume stays as it was, attached; a "detaching" phase would make
            # `cleanup --stale` finish a detach the operator was refused
            if st is not None and phase_before and all(d.startswith("sync") for d in done):
                st.phase = phase_before
                store.save(spec.key, st)
            raise
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
        crash_point(f"detach-{step.kind}")
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
    cfg = replace(host.cfg, connect_timeout=min(host.cfg.connect_timeout, 5.0))
    try:
        with Cluster(cfg, op_timeout=5.0) as cluster:
            rec = ownership.current(cluster, spec)
    except CephvolError:
        return None
    if rec is not None and rec.host_id != host.identity.id:
        return rec.describe()
    return None


def _thaw_unheld_freeze(spec: ImageSpec, mountpoint: str) -> None:
    """A frozen filesystem blocks the flush (and the unmount) until someone
    thaws it, and the kernel never does: a snapshot killed together with its
    freeze helper, its record lost with the state directory, leaves it so.
    The volume lock is held here, so no snapshot of ours is running: thaw
    it. FITHAW of a filesystem that is not frozen fails with EINVAL and
    changes nothing; on the normal path this costs one short bounded child
    (`fsfreeze --unfreeze`, a few ms), which is where FITHAW must run."""
    try:
        was_frozen = freeze.thaw(mountpoint)
    except (OSError, CephvolError):
        return  # not ours to judge here: the flush reports what is wrong
    if was_frozen:
        supervisor.event("thaw", str(spec), f"thawed {mountpoint} before detaching: it was "
                         "frozen by no running snapshot (a killed snapshot whose record was "
                         "lost, or fsfreeze)", level=logging.WARNING, mountpoint=mountpoint)


def _run_step(host: Host, spec: ImageSpec, step: Step, backend: Backend | None,
              mapping: Mapping | None, force: bool, outcome: _Outcome) -> None:
    if step.kind == "refuse":
        raise Busy(step.detail)
    if step.kind == "sync":
        _thaw_unheld_freeze(spec, step.target)
        failed = fs.sync_fs(step.target)
        if failed:
            lost = f"flushing {step.target} failed ({failed}): writes were not written"
            if not force:
                raise DataLost(f"{spec}: {lost} to the cluster (a dead mapping daemon, or "
                               "this host was fenced). It stays mounted here; `cephvol detach "
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
            _unmount_late_copies(host, spec, step.target)
            _check_unused(host, step.target, ignore)
    elif step.kind == "unmap":
        assert backend is not None and mapping is not None
        _unmount_late_backend_copies(host, mapping, force)
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
                            timeout=proc.step_timeout(30.0), proc_root=host.paths.proc_root)
    except Busy as exc:
        if force:
            return  # the forced unmap follows; the copy keeps what it has
        who = mountns.container_of(int(pid), host.paths.proc_root)
        why = ("is covered by another mount there" if isinstance(exc, mountns.Covered)
               else "came into use")
        raise Busy(f"a copy of the volume at {step.target} in the mount namespace of pid "
                   f"{pid}{f' ({who})' if who else ''} {why}; stop that container "
                   "first, or pass --force") from exc


def _unmount_late_copies(host: Host, spec: ImageSpec, device: str) -> None:
    """Copies of our mount made after the plan was drawn: a namespace made
    between the look and our umount (`ip netns exec` makes one per command)
    keeps a copy that did not go with ours. Unused ones are unmounted as the
    planned copies are; one in use stops the detach here, naming its users
    (nothing is unmapped)."""
    try:
        devnum = hostfs.device_number(device)
        st = host.store.load(spec.key)
    except (CephvolError, OSError, ValueError):
        return
    if st is None or not st.mountpoint:
        return
    own_ns = os.readlink(host.paths.proc_root / "self" / "ns" / "mnt")
    _busy, copies, pids, _names = _foreign_mounts(host, devnum, [], own_ns, st.mountpoint)
    _unmount_copies(host, copies, pids, force=False)


def _unmount_late_backend_copies(host: Host, mapping: Mapping, force: bool) -> None:
    """The same for copies of the mapping daemon's own mount (rbd-fuse's),
    made after the plan: one keeps rbd-fuse serving that namespace after
    our unmount, and the unmap would wait on it in vain. In use: refused
    before the unmap, unless forced (the forced unmap then lets rbd-fuse go
    lazily)."""
    own_ns = os.readlink(host.paths.proc_root / "self" / "ns" / "mnt")
    busy: dict[str, list[hostfs.Mount]] = {}
    copies: dict[str, list[hostfs.Mount]] = {}
    pids: dict[str, int] = {}
    names: dict[str, str] = {}
    _backend_copies(host, mapping, own_ns, busy, copies, pids, names)
    if busy and not force:
        raise Busy(f"a copy of the mapping's own mount came into use while detaching: "
                   f"{describe_foreign(busy, pids, names)}; not unmapping: stop those "
                   "processes and detach again, or pass --force")
    _unmount_copies(host, copies, pids, force=force)


def _unmount_copies(host: Host, copies: dict[str, list[hostfs.Mount]],
                    pids: dict[str, int], *, force: bool) -> None:
    for ns, ms in sorted(copies.items()):
        for m in sorted(ms, key=lambda m: (-m.mountpoint.count("/"), m.mountpoint)):
            try:
                mountns.umount_copy(pids[ns], ns, m.mountpoint, m.devnum,
                                    timeout=proc.step_timeout(30.0),
                                    proc_root=host.paths.proc_root)
            except NotFound:
                continue  # not a mount of ours any more: nothing of ours to take away
            except Busy as exc:
                if force:
                    continue
                users = mountns.users_in_namespace(ns, m.devnum, host.paths.proc_root)
                named = _who_is_there(pids[ns], users, host.paths.proc_root)
                raise Busy(f"a copy of {m.mountpoint} in the mount namespace of pid "
                           f"{pids[ns]} came into use while detaching ({named or exc.message}); "
                           "not unmapping: stop those processes and detach again, or pass "
                           "--force") from exc


def _check_unused(host: Host, device: str, ignore_pids: set[int] | None = None) -> None:
    devnum = hostfs.device_number(device)
    name = os.path.basename(os.path.realpath(device))  # /dev/mapper/X -> dm-N
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
