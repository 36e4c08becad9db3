"""Safe teardown: a pure planner and an executor.

The planner looks only at data (journal, the mapping the kernel shows, the
mounts of the device in every mount namespace) and says which steps remain,
so every crash state can be unit-tested without a cluster. The executor runs
the steps; each is idempotent, so `detach` can simply be run again after any
failure or crash, and it finishes what is left.

Data rules enforced here: flush before unmount and before unmap; never
unmap a device that is mounted or open unless the operator forced it; give
up ownership (another host may then write) only after the unmap; a
mount in another live mount namespace is a user (a running container), so it
makes the device busy rather than being unmounted behind the container's back.
The one exception is a *copy*: a mount that sits in the other namespace exactly
where ours sits (same parent filesystem, same path in it), carried there by a
recursive bind of a parent directory (`-v /srv:/host-srv`) or by cloning the
namespace. It is unmounted inside that namespace when no process there uses
the volume (and the non-lazy unmount fails if one starts to); a copy in use is
refused, naming who holds it.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field

from cephvol.hostfs import Mount


@dataclass(frozen=True)
class Step:
    # "umount-copy", "sync", "umount", "check-unused", "unmap", "release", "forget", "refuse"
    kind: str
    target: str = ""
    detail: str = ""  # umount-copy: "PID NAMESPACE MAJOR:MINOR" (enter by, device)


@dataclass
class Observed:
    """What is true on the host for one volume, gathered at the edges."""

    key: str
    journal_present: bool
    device: str  # "" when no block device exists (or never did)
    mapped: bool  # any backend part exists (even a half-made mapping)
    own_mounts: list[Mount] = field(default_factory=list)
    foreign_mounts: dict[str, list[Mount]] = field(default_factory=dict)  # ns -> mounts
    foreign_pids: dict[str, int] = field(default_factory=dict)  # ns -> a pid inside
    owned: bool = False  # the journal says this host took ownership in the cluster
    # ns -> copies of our mount nobody there uses: unmounted inside that namespace
    foreign_copies: dict[str, list[Mount]] = field(default_factory=dict)
    foreign_names: dict[str, str] = field(default_factory=dict)  # ns -> who is in it


def split_propagated(own: list[Mount], foreign: list[Mount]) -> tuple[list[Mount], list[Mount]]:
    """Split another namespace's mounts of our device into (real users, copies).

    Under systemd the root mount is shared, so every mount cephvol makes is
    copied into the mount namespaces of sandboxed services (udevd, logind,
    ...), which receive it as slaves (`master:N` of our mount's `shared:N`).
    Those copies go away when ours is unmounted; they are not users. A
    container's bind mount of the volume lives in a private namespace with no
    such tie: that is a user, and the device is busy.
    """
    ours = {m.shared_group for m in own if m.shared_group}
    real, copies = [], []
    for m in foreign:
        (copies if ours & m.peer_groups else real).append(m)
    return real, copies


Place = tuple[int, int, str, str]  # parent's device, path in the parent's filesystem, root


def _place(m: Mount, by_id: dict[int, Mount]) -> Place | None:
    parent = by_id.get(m.parent_id)
    if parent is None or parent.mount_id == m.mount_id:
        return None
    rel = posixpath.relpath(m.mountpoint, parent.mountpoint)
    if rel.startswith(".."):
        return None
    return (parent.major, parent.minor, posixpath.normpath(posixpath.join(parent.root, rel)),
            m.root)


def places_of(own: list[Mount], mounts: list[Mount], mountpoint: str | None = None
              ) -> set[Place]:
    """Where our mounts of the volume sit, as (parent filesystem, path in it,
    root); with none left (a rerun after our umount), where the journalled
    mountpoint would sit: under the deepest mount that contains it."""
    by_id = {m.mount_id: m for m in mounts}
    places = {p for m in own if (p := _place(m, by_id))}
    if not places and mountpoint:
        mp = posixpath.normpath(mountpoint)
        under = [m for m in mounts
                 if mp != m.mountpoint and (m.mountpoint == "/" or
                                             mp.startswith(m.mountpoint.rstrip("/") + "/"))]
        if under:
            parent = max(under, key=lambda m: (len(m.mountpoint), m.mount_id))
            rel = posixpath.relpath(mp, parent.mountpoint)
            places.add((parent.major, parent.minor,
                        posixpath.normpath(posixpath.join(parent.root, rel)), "/"))
    return places


def split_copies(places: set[Place], ns_mounts: list[Mount], candidates: list[Mount]
                 ) -> tuple[list[Mount], list[Mount]]:
    """Split another namespace's (non-propagated) mounts of our device into
    (placed there on purpose, copies of ours).

    A copy sits where ours sits: its parent mount shows the same filesystem
    and, followed down its own root and path, the same directory (a bind of
    /srv at /host-srv carries our /srv/x to /host-srv/x). A container's bind
    of the volume itself (`-v /srv/x:/data`) sits in the container's root
    filesystem instead: that one is the container's, and never unmounted.
    """
    by_id = {m.mount_id: m for m in ns_mounts}
    placed, copies = [], []
    for m in candidates:
        (copies if _place(m, by_id) in places else placed).append(m)
    return placed, copies


def describe_foreign(mounts: dict[str, list[Mount]], pids: dict[str, int],
                     names: dict[str, str]) -> str:
    """'PATH in the mount namespace of pid N (who is there); ...' for mounts
    in other namespaces, as refusals name them."""
    return "; ".join(
        f"{m.mountpoint} in the mount namespace of pid {pids.get(ns, '?')}"
        + (f" ({names[ns]})" if names.get(ns) else "")
        for ns, ms in sorted(mounts.items()) for m in ms)


def plan_detach(obs: Observed, *, force: bool = False, lazy: bool = False) -> list[Step]:
    steps: list[Step] = []
    if obs.foreign_mounts and not force:
        where = describe_foreign(obs.foreign_mounts, obs.foreign_pids, obs.foreign_names)
        return [Step("refuse", obs.device, f"{obs.device} is still mounted at {where}; "
                     "stop that container first, or pass --force")]
    # copies first: if one cannot go, nothing of ours has changed yet
    for ns, ms in sorted(obs.foreign_copies.items()):
        for m in sorted(ms, key=lambda m: (-m.mountpoint.count("/"), m.mountpoint)):
            steps.append(Step("umount-copy", m.mountpoint,
                              f"{obs.foreign_pids.get(ns, 0)} {ns} {m.major}:{m.minor}"))
    # deepest first, so nested mounts come off before their parents
    for m in sorted(obs.own_mounts, key=lambda m: (-m.mountpoint.count("/"), m.mountpoint)):
        steps.append(Step("sync", m.mountpoint))
        steps.append(Step("umount", m.mountpoint, "lazy" if lazy else ""))
    if obs.mapped:
        if obs.device:
            steps.append(Step("check-unused", obs.device, "skip" if force else ""))
        steps.append(Step("unmap", obs.device, "force" if force else ""))
    if obs.owned:
        # only once nothing is mapped: another host may write as soon as it goes
        steps.append(Step("release", obs.key))
    if obs.journal_present or steps:
        steps.append(Step("forget", obs.key))
    return steps
