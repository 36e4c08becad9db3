"""Talking to the Ceph cluster through Ceph's own Python bindings.

`rados` and `rbd` are imported lazily inside functions: they pull in librados
(tens of ms) and `cephvol --version`/`status` must stay fast. Every librados
and librbd exception is translated here, so nothing above this module sees
a binding exception (or a traceback) for a cluster problem.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cephvol.errors import (
    Busy,
    CephvolError,
    ClusterError,
    Conflict,
    NotFound,
    StepTimeout,
    Unsafe,
    UsageError,
)
from cephvol.spec import ImageSpec, format_size

DEFAULT_CONF = Path("/etc/ceph/ceph.conf")
DEFAULT_CONNECT_TIMEOUT = 15.0
# Ceph's rbd_default_features (61); krbd maps them all since Linux 5.3
IMAGE_FEATURES = ("LAYERING", "EXCLUSIVE_LOCK", "OBJECT_MAP", "FAST_DIFF", "DEEP_FLATTEN")


@dataclass(frozen=True)
class ClusterConfig:
    """Where the cluster is and who we are. Never holds a secret itself."""

    conf: Path = DEFAULT_CONF
    client_id: str = "admin"
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT

    @classmethod
    def from_env(
        cls,
        conf: str | os.PathLike[str] | None = None,
        client_id: str | None = None,
        connect_timeout: float | None = None,
    ) -> ClusterConfig:
        conf_path = Path(conf or os.environ.get("CEPH_CONF") or DEFAULT_CONF)
        cid = client_id or os.environ.get("CEPHVOL_ID") or "admin"
        if cid.startswith("client."):
            cid = cid[len("client.") :]
        timeout = connect_timeout
        if timeout is None:
            env = os.environ.get("CEPHVOL_CONNECT_TIMEOUT")
            try:
                timeout = float(env) if env else DEFAULT_CONNECT_TIMEOUT
            except ValueError as exc:
                raise UsageError(f"CEPHVOL_CONNECT_TIMEOUT={env!r} is not a number") from exc
        if timeout <= 0:
            raise UsageError("connect timeout must be greater than zero")
        return cls(conf_path.absolute(), cid, timeout)

    def check_readable(self) -> None:
        """A missing config file is "not found" (3), like a missing pool; one
        that exists but cannot be read or used is a cluster problem (7)."""
        if not self.conf.exists():
            raise NotFound(
                f"ceph config {self.conf} does not exist", hint="pass --conf or set CEPH_CONF"
            )
        if not os.access(self.conf, os.R_OK):
            raise ClusterError(f"ceph config {self.conf} is not readable")


@dataclass
class ImageInfo:
    spec: str
    size: int
    size_human: str
    features: list[str]
    snapshots: list[str]
    watchers: list[dict[str, Any]] = field(default_factory=list)
    lockers: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _translate(exc: BaseException, what: str) -> CephvolError:
    """Map a binding exception to one of ours, keeping librados' words."""
    import rados
    import rbd

    name = type(exc).__name__
    detail = str(exc).strip() or name
    if isinstance(exc, rbd.ImageNotFound | rados.ObjectNotFound):
        return NotFound(f"{what}: not found")
    if isinstance(exc, rbd.ImageExists | rados.ObjectExists):
        return Conflict(f"{what}: already exists")
    if isinstance(exc, rbd.ImageBusy | rados.ObjectBusy):
        return Busy(f"{what}: image is busy (watched or locked)")
    if isinstance(exc, rados.TimedOut | rbd.Timeout):
        return StepTimeout(f"{what}: cluster did not answer in time (OSDs or monitors down?)")
    if isinstance(exc, rados.PermissionDeniedError | rbd.PermissionError):
        return ClusterError(f"{what}: permission denied (check the client's cephx caps)")
    if isinstance(exc, rbd.InvalidArgument | rados.InvalidArgumentError):
        return UsageError(f"{what}: invalid argument ({detail})")
    if isinstance(exc, rbd.ImageHasSnapshots):
        return Busy(f"{what}: image has snapshots; remove them first")
    return ClusterError(f"{what}: {name}: {detail}")


class Cluster:
    """A connected librados handle; use as a context manager."""

    def __init__(self, cfg: ClusterConfig, *, op_timeout: float | None = None) -> None:
        self.cfg = cfg
        # a quick question asked while the cluster may be half gone (detach's
        # "was this host fenced?") must not wait the usual 30 s on an OSD
        self._op_timeout = op_timeout
        self._rados: Any = None
        # read-only image handles kept for the connection's life: ownership
        # asks one image for its id and watchers several times per attach, and
        # an open costs several round trips (a read-only open adds no watch)
        self._held: dict[str, tuple[Any, Any]] = {}

    def __enter__(self) -> Cluster:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> None:
        import rados

        self.cfg.check_readable()
        t = self.cfg.connect_timeout
        try:
            # The op timeouts make a dead monitor or OSD an error, not a hang.
            handle = rados.Rados(
                conffile=str(self.cfg.conf),
                rados_id=self.cfg.client_id,
                conf={
                    "client_mount_timeout": f"{t:g}",
                    "rados_mon_op_timeout": f"{t:g}",
                    "rados_osd_op_timeout": f"{self._op_timeout or max(t, 30.0):g}",
                },
            )
        except rados.Error as exc:
            raise ClusterError(f"cannot read ceph config {self.cfg.conf}: {exc}") from exc
        # without a usable key librados waits out the whole timeout and then
        # blames the monitors; say what is wrong with the keyring at once
        problem = self._keyring_problem(handle, quiet_if_ok=True)
        if problem:
            handle.shutdown()
            raise ClusterError(problem)
        try:
            handle.connect(timeout=int(max(1, t)))
        except rados.IOError as exc:
            # librados says only "IOError" for a keyring it cannot use: name it
            problem = self._keyring_problem(handle) or self._io_problem()
            handle.shutdown()
            raise ClusterError(problem) from exc
        except rados.Error as exc:
            handle.shutdown()
            if isinstance(exc, rados.TimedOut):
                raise ClusterError(
                    f"cluster unreachable: no monitor answered within {t:g}s "
                    f"(conf {self.cfg.conf})"
                ) from exc
            if isinstance(exc, rados.PermissionDeniedError):
                raise ClusterError(
                    f"authentication as client.{self.cfg.client_id} failed "
                    "(wrong key or keyring not found)"
                ) from exc
            if isinstance(exc, rados.ObjectNotFound):
                raise ClusterError(
                    f"cannot connect as client.{self.cfg.client_id}: keyring or monitors "
                    f"not found (conf {self.cfg.conf})"
                ) from exc
            raise ClusterError(f"cannot connect to the cluster: {type(exc).__name__}") from exc
        self._rados = handle

    def _keyring_problem(self, handle: Any, *, quiet_if_ok: bool = False) -> str | None:
        """What is wrong with our cephx key, if anything (never the key itself)."""
        from cephvol.secrets import read_secret

        def get(name: str) -> str:
            try:
                return str(handle.conf_get(name) or "")
            except Exception:
                return ""

        if "cephx" not in get("auth_client_required") or get("key") or get("keyfile"):
            return None if quiet_if_ok else self._io_problem()
        try:
            read_secret(get("keyring").split(","), f"client.{self.cfg.client_id}")
        except ClusterError as exc:
            return f"cannot connect as client.{self.cfg.client_id}: {exc.message}"
        return None if quiet_if_ok else self._io_problem()

    def _io_problem(self) -> str:
        return (f"cannot connect as client.{self.cfg.client_id}: I/O error talking to the "
                f"monitors (conf {self.cfg.conf})")

    def close(self) -> None:
        for ctx, img in self._held.values():
            img.close()
            ctx.close()
        self._held.clear()
        if self._rados is not None:
            self._rados.shutdown()
            self._rados = None

    @property
    def rados(self) -> Any:
        if self._rados is None:
            raise ClusterError("not connected")
        return self._rados

    @contextlib.contextmanager
    def ioctx(self, spec: ImageSpec) -> Iterator[Any]:
        ctx = self._open_ioctx(spec)
        try:
            yield ctx
        finally:
            ctx.close()

    def _open_ioctx(self, spec: ImageSpec) -> Any:
        """The pool (and namespace) of `spec`, each named if missing."""
        import rados

        try:
            if not self.rados.pool_exists(spec.pool):
                raise NotFound(f"pool {spec.pool!r} does not exist")
            ctx = self.rados.open_ioctx(spec.pool)
        except rados.Error as exc:
            raise _translate(exc, f"pool {spec.pool}") from exc
        try:
            if spec.namespace:
                import rbd

                if not rbd.RBD().namespace_exists(ctx, spec.namespace):
                    raise NotFound(f"namespace {spec.pool}/{spec.namespace} does not exist")
                ctx.set_namespace(spec.namespace)
        except BaseException:
            ctx.close()
            raise
        return ctx

    @contextlib.contextmanager
    def image(self, spec: ImageSpec, *, read_only: bool = True) -> Iterator[Any]:
        import rados
        import rbd

        with self.ioctx(spec) as ctx:
            try:
                img = rbd.Image(ctx, spec.image, snapshot=spec.snap, read_only=read_only)
            except (rbd.Error, rados.Error) as exc:
                raise _translate(exc, f"image {spec}") from exc
            try:
                yield img
            finally:
                img.close()

    def mon_command(self, cmd: dict[str, Any], inbuf: bytes = b"") -> tuple[int, bytes, str]:
        ret, out, err = self.rados.mon_command(
            json.dumps(cmd), inbuf, timeout=int(max(1, self.cfg.connect_timeout))
        )
        return ret, out, err

    def _mon_checked(self, cmd: dict[str, Any], inbuf: bytes = b"", *, what: str,
                     denied: str | None = None, ok: tuple[int, ...] = (0,)) -> tuple[int, bytes]:
        """A monitor command whose failure is a ClusterError: `denied` (which
        cap is missing) for EACCES when given, else "`what` failed: reason".
        Return codes in `ok` are answers, returned with the output."""
        ret, out, err = self.mon_command(cmd, inbuf)
        if ret == -13 and denied is not None:
            raise ClusterError(denied)
        if ret not in ok:
            raise ClusterError(f"{what} failed: {err.strip() or ret}")
        return ret, out

    # -- image operations -------------------------------------------------

    def create_image(self, spec: ImageSpec, size: int) -> bool:
        """Create the image; True if created, False if it already existed as asked.

        Idempotent on purpose: ExecStartPre may run `create` on every start.
        Existing with another size is a Conflict, never a silent resize.
        """
        import rados
        import rbd

        if spec.snap:
            raise UsageError(f"cannot create a snapshot spec {spec}; give POOL/IMAGE")
        with self.ioctx(spec) as ctx:
            try:
                # Ceph's default feature set, spelled out so that exclusive-lock
                # (krbd's `exclusive` map option needs it) is there even where a
                # cluster changed rbd_default_features
                features = 0
                for name in IMAGE_FEATURES:
                    features |= getattr(rbd, f"RBD_FEATURE_{name}")
                rbd.RBD().create(ctx, spec.image, size, old_format=False, features=features)
                return True
            except rbd.ImageExists:
                pass
            except (rbd.Error, rados.Error) as exc:
                raise _translate(exc, f"create {spec}") from exc
        existing = self.image_info(spec).size
        if existing != size:
            raise Conflict(
                f"image {spec} already exists with size {format_size(existing)} "
                f"({existing} bytes), not {format_size(size)}"
            )
        return False

    def pool_free(self, pool: str) -> int | None:
        """Bytes the pool can still take (`ceph df` max_avail), None if unknown."""
        try:
            ret, out, _ = self.mon_command({"prefix": "df", "format": "json"})
            if ret != 0:
                return None
            for p in json.loads(out).get("pools", []):
                if p.get("name") == pool:
                    return int(p["stats"]["max_avail"])
        except (ValueError, KeyError, TypeError):
            return None
        return None

    def grow_image(self, spec: ImageSpec, size: int) -> tuple[int, bool]:
        """Grow to `size`; returns (old size, changed). Shrinking is refused:
        it would cut off whatever the filesystem keeps at the end."""
        import rados
        import rbd

        if spec.snap:
            raise UsageError(f"cannot resize a snapshot ({spec}); give POOL/IMAGE")
        with self.image(spec, read_only=False) as img:
            old = int(img.size())
            if size < old:
                raise Unsafe(f"refusing to shrink {spec} from {format_size(old)} to "
                             f"{format_size(size)}: that would destroy data at its end")
            if size == old:
                return old, False
            try:
                img.resize(size, allow_shrink=False)
            except rbd.ReadOnlyImage as exc:
                # librbd resizes only with the image's exclusive lock, and a
                # client that maps with `exclusive` never hands it over
                raise Busy(f"cannot resize {spec}: a client holds its exclusive lock and "
                           "does not give it up (a krbd/nbd `exclusive` mapping, cephvol's "
                           "default for writable krbd attaches). Detach, resize, attach; or "
                           "attach with --no-exclusive to allow online resize") from exc
            except (rbd.Error, rados.Error) as exc:
                raise _translate(exc, f"resize {spec}") from exc
            return old, True

    def image_info(self, spec: ImageSpec) -> ImageInfo:
        import rados
        import rbd

        with self.image(spec) as img:
            try:
                size = img.size()
                feats = rbd.RBD().features_to_string(img.features()).split(",")
                snaps = [s["name"] for s in img.list_snaps()]
                watchers = [dict(w) for w in img.watchers_list()]
                lockers_raw = img.list_lockers()
            except (rbd.Error, rados.Error) as exc:
                raise _translate(exc, f"image {spec}") from exc
        lockers: list[dict[str, Any]] = []
        if lockers_raw:
            for client, cookie, addr in lockers_raw.get("lockers", []):
                lockers.append(
                    {"client": client, "cookie": cookie, "address": addr,
                     "exclusive": bool(lockers_raw.get("exclusive"))}
                )
        return ImageInfo(
            spec=str(spec),
            size=size,
            size_human=format_size(size),
            features=[f for f in feats if f],
            snapshots=snaps,
            watchers=watchers,
            lockers=lockers,
        )

    # -- primitives for ownership records (the logic is in ownership.py) ----

    def _held_image(self, spec: ImageSpec) -> Any:
        import rados
        import rbd

        key = str(spec.without_snap())
        if key not in self._held:
            ctx = self._open_ioctx(spec)
            try:
                img = rbd.Image(ctx, spec.image, read_only=True)
            except (rbd.Error, rados.Error) as exc:
                ctx.close()
                raise _translate(exc, f"image {spec.without_snap()}") from exc
            self._held[key] = (ctx, img)
        return self._held[key][1]

    def image_id(self, spec: ImageSpec) -> str:
        """The image's id: stable across renames, names its RADOS objects."""
        import rados
        import rbd

        try:
            return str(self._held_image(spec).id())
        except (rbd.Error, rados.Error) as exc:
            raise _translate(exc, f"image {spec}") from exc

    def image_features(self, spec: ImageSpec) -> list[str]:
        import rados
        import rbd

        try:
            feats = rbd.RBD().features_to_string(self._held_image(spec).features())
        except (rbd.Error, rados.Error) as exc:
            raise _translate(exc, f"image {spec}") from exc
        return [f for f in feats.split(",") if f]

    def watchers(self, spec: ImageSpec) -> list[dict[str, Any]]:
        """Clients watching the image header now (one OSD op): every live
        mapping (krbd, rbd-nbd, rbd-fuse) and every writable open. A
        read-only open, like ours, does not watch."""
        import rados
        import rbd

        try:
            return [dict(w) for w in self._held_image(spec).watchers_list()]
        except (rbd.Error, rados.Error) as exc:
            raise _translate(exc, f"image {spec}") from exc

    def lockers(self, spec: ImageSpec) -> list[dict[str, Any]]:
        """Advisory and exclusive-lock holders of the image (who, from where)."""
        import rados
        import rbd

        try:
            raw = self._held_image(spec).list_lockers()
        except (rbd.Error, rados.Error) as exc:
            raise _translate(exc, f"image {spec}") from exc
        if not raw:
            return []
        return [{"client": c, "cookie": k, "address": a, "exclusive": bool(raw.get("exclusive"))}
                for c, k, a in raw.get("lockers", [])]

    def allocated_bytes(self, spec: ImageSpec, start: int = 0) -> int:
        """Bytes of the image that hold data as librbd sees it (its parent's
        included), whole objects: what decides whether a device blkid calls
        empty is really empty. With the object-map feature (cephvol creates
        images with it) this reads one object map; without, librbd checks
        every object, which takes longer on big images but is still right."""
        import rados
        import rbd

        total = 0

        def extent(_offset: int, length: int, exists: bool) -> int:
            nonlocal total
            if exists:
                total += length
            return 0

        try:
            with self.image(spec) as img:
                # `start`: skip a LUKS header (data/encryption.py), which
                # holds no data of the volume's
                size = img.size()
                if start < size:
                    img.diff_iterate(start, size - start, None, extent, include_parent=True,
                                     whole_object=True)
        except (rbd.Error, rados.Error) as exc:
            raise _translate(exc, f"image {spec}") from exc
        return total

    def read_object(self, spec: ImageSpec, oid: str) -> bytes | None:
        import rados

        with self.ioctx(spec) as ctx:
            try:
                size, _ = ctx.stat(oid)
                return bytes(ctx.read(oid, max(size, 1)))
            except rados.ObjectNotFound:
                return None
            except rados.Error as exc:
                raise _translate(exc, f"ownership record of {spec} ({oid})") from exc

    def create_object(self, spec: ImageSpec, oid: str, data: bytes) -> bool:
        """Create `oid` holding `data` if it does not exist, atomically: of
        many concurrent callers exactly one gets True."""
        import rados

        with self.ioctx(spec) as ctx:
            try:
                with rados.WriteOpCtx() as op:
                    op.new(rados.LIBRADOS_CREATE_EXCLUSIVE)
                    op.write_full(data)
                    ctx.operate_write_op(op, oid)
                return True
            except rados.ObjectExists:
                return False
            except rados.Error as exc:
                raise _translate(exc, f"ownership record of {spec} ({oid})") from exc

    def swap_object(self, spec: ImageSpec, oid: str, expect: bytes, data: bytes | None
                    ) -> bool:
        """Replace (or with data=None remove) `oid` only if it still starts
        with `expect`, atomically on the OSD; False if it changed or is gone."""
        import rados

        with self.ioctx(spec) as ctx:
            try:
                with rados.WriteOpCtx() as op:
                    op.cmpext(expect, 0)
                    if data is None:
                        op.remove()
                    else:
                        op.write_full(data)
                    ctx.operate_write_op(op, oid)
                return True
            except rados.ObjectNotFound:
                return False
            except rados.PermissionDeniedError as exc:
                raise _translate(exc, f"ownership record of {spec} ({oid})") from exc
            except (rados.Error, OSError) as exc:
                # a failed compare comes back as -(MAX_ERRNO + offset), which
                # the binding reports as a generic error: look again
                now = self.read_object(spec, oid)
                if now is not None and now.startswith(expect):
                    raise _translate(exc, f"ownership record of {spec} ({oid})") from exc
                return False

    def blocklist(self, addr: str, expire_s: int = 3600) -> None:
        """Fence a client instance: the OSDs refuse its I/O from now on (and
        drop its watches). Needs mon caps `profile rbd` (or `allow command
        "osd blocklist"`)."""
        self._mon_checked({"prefix": "osd blocklist", "blocklistop": "add", "addr": addr,
                           "expire": float(expire_s)}, what=f"osd blocklist add {addr}",
                          denied=f"not allowed to blocklist {addr}: client.{self.cfg.client_id} "
                                 "needs mon caps 'profile rbd' (or allow command "
                                 "\"osd blocklist\") to fence a dead owner")

    def list_images(self, spec_pool: ImageSpec) -> list[str]:
        import rados
        import rbd

        with self.ioctx(spec_pool) as ctx:
            try:
                return sorted(rbd.RBD().list(ctx))
            except (rbd.Error, rados.Error) as exc:
                raise _translate(exc, f"pool {spec_pool.pool}") from exc

    def remove_image(self, spec: ImageSpec) -> None:
        """Remove an image; refuses while any client watches or locks it."""
        import rados
        import rbd

        if spec.snap:
            raise UsageError("refusing to remove a snapshot spec; give POOL/IMAGE")
        info = self.image_info(spec)
        if info.watchers:
            addrs = ", ".join(w.get("addr", "?") for w in info.watchers)
            raise Busy(f"image {spec} is in use (mapped or open by {addrs}); detach it first")
        if info.lockers:
            owners = ", ".join(f"{lk['client']} ({lk['address']})" for lk in info.lockers)
            raise Busy(f"image {spec} is locked by {owners}; detach it on that host first")
        with self.ioctx(spec) as ctx:
            try:
                rbd.RBD().remove(ctx, spec.image)
            except (rbd.Error, rados.Error) as exc:
                raise _translate(exc, f"remove {spec}") from exc

    # -- snapshots and clones (the logic is in data/snapshots.py) -------------

    def _image_call(self, spec: ImageSpec, what: str, fn: Any, *, read_only: bool = True
                    ) -> Any:
        """Run fn(image) on `spec` (a snapshot spec opens the snapshot),
        translating binding errors like every other method here."""
        import rados
        import rbd

        with self.image(spec, read_only=read_only) as img:
            try:
                return fn(img)
            except (rbd.Error, rados.Error) as exc:
                raise _translate(exc, what) from exc

    def snapshot_create(self, spec: ImageSpec) -> None:
        """Create snapshot spec.snap (exists already: Conflict, exit 5). Busy
        (4) when a client holds the image's exclusive lock and does not hand
        it over (krbd mapped with `exclusive`): librbd needs the lock to
        snapshot an image with the exclusive-lock feature."""
        import rbd

        assert spec.snap
        try:
            self._image_call(spec.without_snap(), f"snapshot {spec}",
                             lambda img: img.create_snap(spec.snap), read_only=False)
        except CephvolError as exc:
            if not isinstance(exc.__cause__, rbd.ReadOnlyImage):
                raise
            raise Busy(f"cannot snapshot {spec.without_snap()}: a client holds its exclusive "
                       "lock and does not hand it over (a krbd mapping made with "
                       "--exclusive); detach it, or attach it with --no-exclusive") from None

    def snapshot_list(self, spec: ImageSpec) -> list[dict[str, Any]]:
        """The image's user snapshots (not the trash of clone v2), oldest first."""
        def rows(img: Any) -> list[dict[str, Any]]:
            out = []
            for s in img.list_snaps():
                if s.get("namespace", 0) != 0:  # trash / group / mirror snapshots
                    continue
                ts = img.get_snap_timestamp(s["id"])
                out.append({"name": s["name"], "id": s["id"], "size": s["size"],
                            "created": ts.strftime("%Y-%m-%dT%H:%M:%SZ") if ts else None,
                            "protected": bool(img.is_protected_snap(s["name"]))})
            return out

        return list(self._image_call(spec.without_snap(), f"image {spec.without_snap()}", rows))

    def snapshot_children(self, spec: ImageSpec) -> list[str]:
        """Clones of snapshot `spec` (pool/[ns/]image), trashed ones included:
        a clone in the trash still reads from its parent."""
        def names(img: Any) -> list[str]:
            return sorted(f"{c['pool']}/{c['pool_namespace'] + '/' if c['pool_namespace'] else ''}"
                          f"{c['image']}" + (" (in trash)" if c.get("trash") else "")
                          for c in img.list_children2())

        return list(self._image_call(spec, f"snapshot {spec}", names))

    def snapshot_remove(self, spec: ImageSpec) -> None:
        assert spec.snap
        self._image_call(spec.without_snap(), f"remove snapshot {spec}",
                         lambda img: img.remove_snap(spec.snap), read_only=False)

    def snapshot_rollback(self, spec: ImageSpec) -> None:
        assert spec.snap
        self._image_call(spec.without_snap(), f"roll back {spec.without_snap()} to {spec}",
                         lambda img: img.rollback_to_snap(spec.snap), read_only=False)

    def image_parent(self, spec: ImageSpec) -> str | None:
        """pool/[ns/]image@snap a clone reads from, None for an image of its own."""
        import rbd

        def parent(img: Any) -> str | None:
            try:
                p = img.get_parent_image_spec()
            except rbd.ImageNotFound:
                return None
            ns = f"{p['pool_namespace']}/" if p.get("pool_namespace") else ""
            return f"{p['pool_name']}/{ns}{p['image_name']}@{p['snap_name']}"

        return self._image_call(spec, f"image {spec}", parent)  # type: ignore[no-any-return]

    def image_meta(self, spec: ImageSpec, key: str) -> str | None:
        import rbd

        def get(img: Any) -> str | None:
            try:
                return str(img.metadata_get(key))
            except KeyError:
                return None
            except rbd.ImageNotFound:
                return None

        return self._image_call(spec, f"image {spec}", get)  # type: ignore[no-any-return]

    def clone_image(self, parent: ImageSpec, child: ImageSpec, origin_key: str) -> None:
        """Clone snapshot `parent` into `child` (clone v2: the parent snapshot
        need not be protected; a snapshot with clones goes to the trash
        instead of failing, which is why cephvol refuses to remove one).
        The child's metadata `origin_key` names the parent, so a re-run of
        the same create is recognised after a flatten dropped the link."""
        import rados
        import rbd

        assert parent.snap and not child.snap
        # per connection, not cluster wide: "auto" picks v1 unless the cluster
        # requires mimic clients, and v1 needs a protected parent snapshot
        self.rados.conf_set("rbd_default_clone_format", "2")
        features = 0
        for name in IMAGE_FEATURES:
            features |= getattr(rbd, f"RBD_FEATURE_{name}")
        with self.ioctx(parent) as pctx, self.ioctx(child) as cctx:
            try:
                rbd.RBD().clone(pctx, parent.image, parent.snap, cctx, child.image,
                                features=features)
            except (rbd.Error, rados.Error) as exc:
                raise _translate(exc, f"clone {parent} to {child}") from exc
        self._image_call(child, f"image {child}",
                         lambda img: img.metadata_set(origin_key, str(parent)),
                         read_only=False)

    def flatten_image(self, spec: ImageSpec, progress: Any = None) -> None:
        """Copy every block the clone still reads from its parent into it;
        progress(done, total) is called as librbd goes."""
        def cb(done: int, total: int) -> int:
            if progress is not None:
                progress(done, total)
            return 0

        self._image_call(spec, f"flatten {spec}", lambda img: img.flatten(on_progress=cb),
                         read_only=False)

    # -- encryption primitives (the logic is in data/encryption.py) ----------

    def read_raw(self, spec: ImageSpec, offset: int, length: int) -> bytes:
        """Bytes of the image as stored (no encryption loaded): at most to its end."""
        def read(img: Any) -> bytes:
            size = int(img.size())
            n = max(0, min(length, size - offset))
            return bytes(img.read(offset, n)) if n else b""

        return self._image_call(spec, f"image {spec}", read)  # type: ignore[no-any-return]

    def encryption_format(self, spec: ImageSpec, luks_version: int, passphrase: bytes) -> None:
        """Write a LUKS header (AES-256, xts-plain64) protected by `passphrase`
        at the start of the image (librbd's own encryption). The passphrase
        goes to librbd only, never into a message."""
        import rbd

        fmt = rbd.RBD_ENCRYPTION_FORMAT_LUKS2 if luks_version == 2 else \
            rbd.RBD_ENCRYPTION_FORMAT_LUKS1
        self._image_call(spec, f"encryption format of {spec}",
                         lambda img: img.encryption_format(
                             fmt, passphrase, rbd.RBD_ENCRYPTION_ALGORITHM_AES256),
                         read_only=False)

    def config_key_get(self, key: str) -> bytes | None:
        """A value of the monitors' config-key store; None if it is not there."""
        ret, out = self._mon_checked(
            {"prefix": "config-key get", "key": key}, what=f"config-key get {key}",
            denied=f"client.{self.cfg.client_id} may not read config-key {key} (needs mon "
                   "caps: allow command \"config-key get\" with key prefix cephvol/luks/)",
            ok=(0, -2))
        return None if ret == -2 else bytes(out)

    def config_key_set(self, key: str, value: bytes) -> None:
        """Store `value` under `key`; the value travels as the command's input
        buffer, so it is not part of the command the monitors' audit log records."""
        self._mon_checked(
            {"prefix": "config-key set", "key": key}, value, what=f"config-key set {key}",
            denied=f"client.{self.cfg.client_id} may not write config-key {key} (needs mon "
                   "caps: allow command \"config-key set\" with key prefix cephvol/luks/)")

    def config_key_rm(self, key: str) -> None:
        self._mon_checked({"prefix": "config-key rm", "key": key},
                          what=f"config-key rm {key}", ok=(0, -2))
