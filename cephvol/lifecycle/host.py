"""Where attach and detach run: the host's paths, identity, mounts, and the
small helpers both share (finding a mapping, journal events, a crash hook
for the fault tests)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from cephvol import hostfs, ownership, supervisor
from cephvol.cluster import ClusterConfig
from cephvol.crashpoint import CRASH_ENV, crash_point  # noqa: F401 (re-exported)
from cephvol.mapper import (
    Backend,
    HostPaths,
    Mapping,
    all_backends,
)
from cephvol.spec import ImageSpec
from cephvol.state import StateStore, VolumeState


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


def find_mapping(host: Host, spec: ImageSpec) -> tuple[Backend, Mapping] | None:
    for b in all_backends(host.paths, host.cfg):
        if not b.mappings_are_ours and not b.support().ok:
            continue
        m = b.find(spec)
        if m is not None:
            return b, m
    return None


def event(step: str, spec: ImageSpec, st: VolumeState, message: str) -> None:
    supervisor.event(step, str(spec), message, device=st.device, backend=st.backend,
                     mountpoint=st.mountpoint, encryption=st.extra.get("encryption"))


def mounted_at(host: Host, device: str | None, mountpoint: str | None) -> bool:
    if not device or not mountpoint:
        return False
    try:
        dev = hostfs.device_number(device)
    except (OSError, ValueError):
        return False
    return any(m.mountpoint == mountpoint and m.devnum == dev for m in host.mounts())
