"""cephvol as a Python library: create, attach, detach, status, a dev cluster.

The same lifecycle the `cephvol` command runs (cephvol.lifecycle), for code
that is not a shell: a service's test suite, an orchestrator, a notebook.
Every call takes the cluster and state location as keyword arguments, each
defaulting to the environment exactly like the CLI's global options:

    conf             ceph.conf             [$CEPH_CONF, /etc/ceph/ceph.conf]
    client_id        cephx user            [$CEPHVOL_ID, admin]
    connect_timeout  seconds              [$CEPHVOL_CONNECT_TIMEOUT, 15]
    state_dir        cephvol's journals   [$CEPHVOL_STATE_DIR, /run/cephvol]

    from cephvol import api

    api.create("rbd/notes", "1G")
    with api.attach("rbd/notes", "/srv/notes") as vol:  # detached on leaving
        (vol.mountpoint / "hello.txt").write_text("hi")

Failures raise cephvol.errors.CephvolError subclasses, the ones the CLI turns
into its documented exit codes (`err.exit_code`; e.g. Busy = 4, Owned = 6,
DataLost = 12). Nothing is printed. Anything else escaping is a bug.

What is stable: the names in `__all__`, their positional and keyword
arguments, the fields of the result classes, and the error classes with
their exit codes. New keyword arguments and new result fields may be added;
nothing is removed or changes meaning without a note in the README. Every
other module of cephvol (lifecycle, mapper, backends, ...) is internal and
changes without notice; the CLI calls cephvol.lifecycle directly and is the
other stable face (commands, exit codes, --json shapes).
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from cephvol.errors import CephvolError, UsageError

if TYPE_CHECKING:
    from cephvol.lifecycle import Host
    from cephvol.spec import ImageSpec

__all__ = [
    "Attachment",
    "CephvolError",
    "Created",
    "Detached",
    "DevCluster",
    "VolumeStatus",
    "attach",
    "create",
    "detach",
    "remove",
    "status",
]

PathArg = str | os.PathLike[str]


@dataclass(frozen=True)
class _Where:
    """The cluster and state directory one call works on (the CLI's globals)."""

    conf: PathArg | None = None
    client_id: str | None = None
    connect_timeout: float | None = None
    state_dir: PathArg | None = None

    def host(self) -> Host:
        from cephvol.cluster import ClusterConfig
        from cephvol.lifecycle import Host
        from cephvol.mapper import HostPaths
        from cephvol.state import state_dir_from_env

        cfg = ClusterConfig.from_env(self.conf, self.client_id, self.connect_timeout)
        return Host(cfg, HostPaths(state_dir_from_env(self.state_dir)))

    def kwargs(self) -> dict[str, Any]:
        return {"conf": self.conf, "client_id": self.client_id,
                "connect_timeout": self.connect_timeout, "state_dir": self.state_dir}


def _spec(image: str | ImageSpec, *, allow_snap: bool = True) -> ImageSpec:
    from cephvol.spec import ImageSpec, parse_spec

    if isinstance(image, ImageSpec):
        return parse_spec(str(image), allow_snap=allow_snap)  # validated like text
    if not isinstance(image, str):
        raise UsageError(f"image must be 'pool[/namespace]/image', not {type(image).__name__}")
    return parse_spec(image, allow_snap=allow_snap)


def _size(size: int | str) -> int:
    from cephvol.spec import SECTOR, parse_size

    if isinstance(size, bool) or not isinstance(size, int | str):
        raise UsageError(f"size must be bytes (int) or text like '10G', not {size!r}")
    if isinstance(size, int):
        if size <= 0 or size % SECTOR:
            raise UsageError(f"invalid size {size}: a positive multiple of {SECTOR} bytes")
        return size
    return parse_size(size)


# -- results ---------------------------------------------------------------------


@dataclass(frozen=True)
class Created:
    image: str
    size: int
    created: bool  # False: it existed already with this size (create is idempotent)
    warning: str | None = None  # e.g. larger than the pool can still take


@dataclass(frozen=True)
class Detached:
    image: str
    detached: bool  # False: it was not attached (a no-op, like `cephvol detach`)
    steps: tuple[str, ...] = ()
    device: str | None = None


@dataclass(frozen=True)
class VolumeStatus:
    image: str
    device: str | None
    mountpoint: Path | None
    backend: str | None
    phase: str  # attaching, attached, detaching; foreign (not cephvol's), broken
    fstype: str | None
    read_only: bool
    mapped: bool
    mounted: bool
    owner: dict[str, Any] | None = None  # host_id, since, addrs


@dataclass(frozen=True)
class Attachment:
    """An attached volume; as a context manager it detaches on leaving.

    Leaving the `with` block detaches without force: a flush that fails, or a
    process still using the mount, raises (DataLost, Busy) rather than losing
    writes quietly, and the volume stays attached for a person to look at.
    """

    image: str
    device: str
    mountpoint: Path | None
    backend: str
    fstype: str | None
    read_only: bool
    created_filesystem: bool
    already_attached: bool
    _where: _Where = field(default_factory=_Where, repr=False, compare=False)

    def detach(self, *, force: bool = False, lazy: bool = False) -> Detached:
        return detach(self.image, force=force, lazy=lazy, **self._where.kwargs())

    def __enter__(self) -> Attachment:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.detach()


# -- operations -------------------------------------------------------------------


def create(image: str | ImageSpec, size: int | str, *, conf: PathArg | None = None,
           client_id: str | None = None, connect_timeout: float | None = None) -> Created:
    """Create an RBD image with Ceph's default features; idempotent (an image
    that exists with this size is fine, another size is a Conflict)."""
    from cephvol import lifecycle

    spec = _spec(image, allow_snap=False)
    nbytes = _size(size)
    res = lifecycle.create(_Where(conf, client_id, connect_timeout).host().cfg, spec, nbytes)
    return Created(res["image"], res["size"], res["created"], res.get("warning"))


def remove(image: str | ImageSpec, *, conf: PathArg | None = None,
           client_id: str | None = None, connect_timeout: float | None = None,
           state_dir: PathArg | None = None) -> None:
    """Remove an image nobody uses (not mapped here, not watched, not owned)."""
    from cephvol import lifecycle

    where = _Where(conf, client_id, connect_timeout, state_dir)
    lifecycle.remove(where.host(), _spec(image, allow_snap=False))


def attach(image: str | ImageSpec, mountpoint: PathArg | None = None, *,
           backend: str = "auto", fstype: str | None = None, read_only: bool = False,
           mkfs: bool = True, mkfs_options: tuple[str, ...] = (), fsck: str = "auto",
           mount_options: tuple[str, ...] = (), env_file: PathArg | None = None,
           takeover: bool = False, force: bool = False,
           owner: str | tuple[int, int] | None = None,
           conf: PathArg | None = None, client_id: str | None = None,
           connect_timeout: float | None = None,
           state_dir: PathArg | None = None) -> Attachment:
    """Map, make a filesystem only if the device holds nothing, mount.

    Idempotent like `cephvol attach`: attaching what is already attached here
    returns it (`already_attached`); an interrupted attach is finished.
    Without `mountpoint` the device is only mapped (and given a filesystem
    if empty and `mkfs`). `fstype` is ext4 or xfs for a new filesystem and is
    checked against an existing one. `takeover` takes the volume from a dead
    owner host (fencing it); `force` with it, even from one that looks alive.
    `owner` ("UID[:GID]" or (uid, gid)) owns the root directory of a
    filesystem this call makes; an existing filesystem is never chowned.
    """
    from cephvol import lifecycle
    from cephvol.mapper import MapOptions
    from cephvol.spec import parse_mountpoint

    spec = _spec(image)
    if force and not takeover:
        raise UsageError("force only goes with takeover (it fences a live owner)")
    mp = Path(str(parse_mountpoint(os.fspath(mountpoint)))) if mountpoint is not None else None
    opts = [o for opt in mount_options for o in opt.split(",") if o]
    for o in opts:  # the same rule as the CLI's -o
        if not o.replace("_", "").replace("=", "").replace("-", "").isalnum():
            raise UsageError(f"invalid mount option {o!r}")
    root_owner = None
    if owner is not None:
        from cephvol.fs import parse_owner

        if isinstance(owner, tuple) and all(type(i) is int for i in owner):
            owner = ":".join(str(i) for i in owner)
        if not isinstance(owner, str):
            raise UsageError(f"owner must be 'UID[:GID]' or (uid, gid), not {owner!r}")
        root_owner = parse_owner(owner, "owner")
    where = _Where(conf, client_id, connect_timeout, state_dir)
    req = lifecycle.AttachRequest(
        spec=spec, mountpoint=mp, backend=backend, options=MapOptions(read_only=read_only),
        fstype=fstype, mkfs=mkfs, mkfs_options=list(mkfs_options), fsck=fsck,
        mount_options=opts, env_file=Path(os.fspath(env_file)).absolute() if env_file else None,
        takeover=takeover, force=force, owner=root_owner)
    res = lifecycle.attach(where.host(), req)
    return Attachment(
        image=res["image"], device=res["device"],
        mountpoint=Path(res["mountpoint"]) if res["mountpoint"] else None,
        backend=res["backend"], fstype=res["fstype"], read_only=bool(res["read_only"]),
        created_filesystem=bool(res["created_filesystem"]),
        already_attached=bool(res["already_attached"]), _where=where)


def detach(image: str | ImageSpec, *, force: bool = False, lazy: bool = False,
           conf: PathArg | None = None, client_id: str | None = None,
           connect_timeout: float | None = None,
           state_dir: PathArg | None = None) -> Detached:
    """Flush, unmount, unmap, give ownership back; a no-op when not attached.

    Without `force`, a mount or device still in use is refused (Busy) and a
    flush that fails raises DataLost; `lazy` unmounts a busy mount lazily.
    """
    from cephvol import lifecycle

    where = _Where(conf, client_id, connect_timeout, state_dir)
    res = lifecycle.detach(where.host(), _spec(image), force=force, lazy=lazy)
    return Detached(res["image"], bool(res["detached"]), tuple(res["steps"]),
                    res.get("device"))


def status(*, conf: PathArg | None = None, client_id: str | None = None,
           connect_timeout: float | None = None,
           state_dir: PathArg | None = None) -> list[VolumeStatus]:
    """Every volume cephvol journalled on this host, and every mapping the
    backends show (phase "foreign" when cephvol did not make it)."""
    from cephvol import lifecycle

    rows = lifecycle.status(_Where(conf, client_id, connect_timeout, state_dir).host())
    return [VolumeStatus(image=r["image"], device=r["device"],
                         mountpoint=Path(r["mountpoint"]) if r["mountpoint"] else None,
                         backend=r["backend"], phase=r["phase"], fstype=r["fstype"],
                         read_only=bool(r["read_only"]), mapped=bool(r.get("mapped")),
                         mounted=bool(r["mounted"]), owner=r.get("owner"))
            for r in rows]


# -- a throw-away cluster ------------------------------------------------------------


class DevCluster:
    """A one-node cluster (mon, mgr, one OSD, pool `rbd`) on 127.0.0.1.

    `with DevCluster() as dc:` makes it in a new temporary directory and
    removes it all on leaving. With `directory`, the cluster lives there and
    `up` is idempotent: an existing cluster is restarted or, if running,
    just checked; with `keep=True` leaving the block neither stops nor
    removes it (for fast iteration: the next `up` takes about a second).
    Needs root and Ceph's daemons (ceph-mon, ceph-mgr, ceph-osd).
    """

    def __init__(self, directory: PathArg | None = None, *, keep: bool = False,
                 addr: str = "127.0.0.1", timeout: float = 180.0) -> None:
        try:
            loopback = ipaddress.IPv4Address(addr).is_loopback
        except ValueError as exc:
            raise UsageError(f"addr {addr!r} is not an IPv4 address") from exc
        if not loopback:
            raise UsageError(f"addr {addr} is not a loopback address; a dev cluster from "
                             "the API binds loopback only")
        if timeout <= 0:
            raise UsageError("timeout must be greater than zero")
        self._given = Path(os.fspath(directory)).absolute() if directory is not None else None
        self._dir: Path | None = self._given
        self.keep = keep
        self.addr = addr
        self.timeout = timeout
        self.seconds: float | None = None  # how long the last `up` took
        self.created: bool | None = None  # whether the last `up` made a new cluster

    @property
    def directory(self) -> Path:
        if self._dir is None:
            raise UsageError("this DevCluster has no directory yet; call up() first")
        return self._dir

    @property
    def conf(self) -> Path:
        return self.directory / "ceph.conf"

    def env(self) -> dict[str, str]:
        """Environment for clients of this cluster (ceph, rbd, cephvol)."""
        return {"CEPH_CONF": str(self.conf)}

    def up(self) -> DevCluster:
        """Create or restart the cluster; return when pool `rbd` takes writes.
        On failure the cluster is stopped again (and a temporary directory
        removed), so nothing is left running."""
        from cephvol.devcluster import DevCluster as _Impl

        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="cephvol-dev-"))
        impl = _Impl(self._dir, self.addr)
        try:
            res = impl.up(timeout=self.timeout)
        except BaseException:
            self.down()
            raise
        self.seconds, self.created = float(res["seconds"]), bool(res["created"])
        return self

    def down(self) -> list[str]:
        """Stop the daemons (the data stays, unless the directory was temporary)."""
        if self._dir is None:
            return []
        from cephvol.devcluster import DevCluster as _Impl

        stopped = _Impl(self._dir, self.addr).down()
        if self._given is None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        return stopped

    def __enter__(self) -> DevCluster:
        return self.up()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self.keep:
            self.down()
