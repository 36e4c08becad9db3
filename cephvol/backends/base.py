"""The types every mapping backend is built from: the Backend contract,
Mapping, MapOptions, Support, HostPaths.

Their own module, imported by each backend and by cephvol.mapper (which
chooses and runs backends), so that no backend imports the module that
imports it.

Backend contract (modelled on os-brick's connect_volume/disconnect_volume):


- `map(spec, opts)` makes the image available as a local block device and
  returns a `Mapping` whose `device` is a verified block-device path. It is
  idempotent: if the spec is already mapped (found from the kernel, not
  from cephvol's journal) the existing mapping is returned, never a second
  one. On failure it undoes what it did and raises a CephvolError.
- `unmap(mapping, force)` removes the device. The caller (cleanup) has
  already checked that nothing mounts or holds it; `force` is passed on only
  when the operator asked. Unmapping something already gone is not an error.
  It starts with `flush_before_unmap` (below): unforced, a failed flush
  leaves the mapping in place and raises.
- `list_mappings()` reports what the kernel shows, including half-made
  mappings (`device` empty) left by a crash, so cleanup can finish them.
- `support()` says whether this host can use the backend, and if not, why.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from cephvol import proc, supervisor
from cephvol.cluster import ClusterConfig
from cephvol.errors import DataLost, StepTimeout, UsageError
from cephvol.spec import ImageSpec, parse_spec

BACKEND_NAMES = ("krbd", "nbd", "qsd", "fuse")


@dataclass(frozen=True)
class MapOptions:
    read_only: bool = False
    # None: the default (krbd: on for writable attaches of images with the
    # exclusive-lock feature; elsewhere off); True/False: as the operator said
    exclusive: bool | None = None
    lock_timeout: int | None = None  # seconds, krbd/nbd exclusive lock wait
    queue_depth: int | None = None
    notrim: bool = False
    io_timeout: int | None = None  # nbd
    reattach_timeout: int | None = None  # nbd

    def validate(self) -> None:
        for name in ("lock_timeout", "queue_depth", "io_timeout", "reattach_timeout"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v <= 0 or v > 86400 * 7):
                raise UsageError(f"{name.replace('_', '-')} must be a positive whole number")
        if self.lock_timeout is not None and not self.exclusive:
            raise UsageError("--lock-timeout only makes sense with --exclusive")


@dataclass
class Mapping:
    backend: str
    spec: str
    device: str  # "" for a half-made mapping found after a crash
    backend_id: str
    read_only: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def image_spec(self) -> ImageSpec:
        return parse_spec(self.spec)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["snapshot"] = self.image_spec.snap
        return d


@dataclass(frozen=True)
class Support:
    ok: bool
    reason: str


@dataclass(frozen=True)
class HostPaths:
    """Roots of everything a backend reads, so tests can point them elsewhere."""

    state_dir: Path
    sys_root: Path = Path("/sys")
    proc_root: Path = Path("/proc")
    dev_root: Path = Path("/dev")


class Backend(ABC):
    name: ClassVar[str]
    # True when every mapping the backend finds is cephvol's by construction
    # (its daemon and file live under cephvol's state dir): a mapping whose
    # journal was lost is then adopted, not refused as foreign
    mappings_are_ours: ClassVar[bool] = False

    def __init__(self, paths: HostPaths, cfg: ClusterConfig) -> None:
        self.paths = paths
        self.cfg = cfg

    @abstractmethod
    def support(self) -> Support: ...

    @abstractmethod
    def map(self, spec: ImageSpec, opts: MapOptions) -> Mapping: ...

    @abstractmethod
    def unmap(self, mapping: Mapping, *, force: bool = False) -> None: ...

    @abstractmethod
    def list_mappings(self) -> list[Mapping]: ...

    def decrypts(self) -> str | None:
        """None when map() opens an image librbd encrypted (LUKS,
        cephvol/data/encryption.py) and hands out the decrypted device; else
        why not. The mapping of an encrypted image then carries
        extra["encryption"] (its format, never the key)."""
        return f"the {self.name} backend cannot decrypt it"

    def scan(self) -> list[Mapping]:
        """What list_mappings shows, and also mappings whose image cannot be
        named (spec ""): their record is gone (state directory removed) and
        so is the daemon that knew it. `find(spec)` still finds one for the
        image it belongs to; status lists them so they are never invisible.
        One pass over the host for both."""
        return self.list_mappings()

    def refresh_size(self, mapping: Mapping) -> None:
        """Make the device see a grown image. krbd and rbd-nbd follow the
        image's header by themselves; the loop device of fuse needs a nudge."""
        return None

    def health(self, mapping: Mapping) -> str | None:
        """None while the mapping can still carry writes to the cluster, else
        why not (its userspace daemon died, its connection was aborted). A
        broken mapping is never reported as attached or detached cleanly:
        writes queued in it are lost. krbd mappings live in the kernel."""
        return None

    def stalled(self, mapping: Mapping) -> str | None:
        """Why the mapping's userspace daemon cannot serve I/O right now
        although it lives (stopped, traced), or None. Nothing is lost yet,
        but a flush through it would wait until it is continued: detach
        says so instead of blaming the cluster after its step bound."""
        return None

    def abort(self, mapping: Mapping) -> None:
        """Make I/O that waits on this mapping fail at once instead of waiting
        for the cluster: used only when nothing it holds can reach the
        cluster any more (this host was fenced). Kernel mappings fail fenced
        I/O by themselves; userspace daemons may wait forever."""
        return None

    def own_pids(self, mapping: Mapping) -> set[int]:
        """Processes of the backend itself that hold the device open (rbd-nbd
        does); they are not users when deciding whether it is safe to unmap."""
        return set()

    def find(self, spec: ImageSpec) -> Mapping | None:
        for m in self.list_mappings():
            if m.spec == str(spec):
                return m
        return None


def flush_before_unmap(mapping: Mapping, *, force: bool) -> str | None:
    """Write out what the page cache holds for the mapping's device before
    it goes, the step every backend's unmap starts with: `sync DEV` (fsync,
    which reports a write-back error not yet seen, as from the filesystem's
    last writes at umount), then `blockdev --flushbufs DEV` (drops the cache;
    BLKFLSBUF ignores write errors, so it alone would call a failed flush
    good). A failed flush means writes did not reach the device: unforced,
    nothing is unmapped (DataLost, exit 12, with the tool's own reason, so
    detach never says "detached" over lost writes); forced, the unmap goes
    on and the failure is logged (journald) and returned, never passed over.
    Each step is a bounded child: a flush stuck on a lost cluster ends."""
    why = None
    for argv in (["sync", mapping.device], ["blockdev", "--flushbufs", mapping.device]):
        try:
            res = proc.run(argv, timeout=proc.step_timeout(), check=False)
        except StepTimeout as exc:
            if not force:
                raise StepTimeout(f"flushing {mapping.device} did not finish within "
                                  f"{proc.step_timeout():g}s, not unmapping (--force "
                                  "unmaps anyway)") from exc
            why = exc.message
            break
        if res.returncode != 0:
            err = res.stderr.strip()
            why = err.splitlines()[-1] if err else f"{argv[0]} exit {res.returncode}"
            break
    if why is None:
        return None
    if not force:
        raise DataLost(f"flushing {mapping.device} failed ({why}): writes were not written; "
                       "not unmapping (`cephvol detach --force` unmaps anyway, and what was "
                       "not written is lost)")
    supervisor.event("flush", mapping.spec, f"flushing {mapping.device} failed ({why}); "
                     "unmapping anyway (--force): what it held is lost",
                     device=mapping.device, backend=mapping.backend, level=logging.WARNING)
    return why
