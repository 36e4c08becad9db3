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
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cephvol.hostfs import Mount


@dataclass(frozen=True)
class Step:
    kind: str  # "sync", "umount", "check-unused", "unmap", "release", "forget", "refuse"
    target: str = ""
    detail: str = ""


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


def plan_detach(obs: Observed, *, force: bool = False, lazy: bool = False) -> list[Step]:
    steps: list[Step] = []
    if obs.foreign_mounts and not force:
        where = "; ".join(
            f"{m.mountpoint} in the mount namespace of pid {obs.foreign_pids.get(ns, '?')}"
            for ns, ms in sorted(obs.foreign_mounts.items()) for m in ms)
        return [Step("refuse", obs.device, f"{obs.device} is still mounted at {where}; "
                     "stop that container first, or pass --force")]
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
