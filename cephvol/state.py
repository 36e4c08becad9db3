"""Crash-safe per-volume state under /run/cephvol.

Why a journal: attach is several host changes (map, mkfs, mount) and the
process may be killed between any two. Each completed step is recorded
(write to a temp file, rename) *after* it happened and *before* the next
starts, so `detach` always knows at least as much as was done; anything the
journal may have missed (the step that was running when killed) detach finds
by looking at the kernel. /run is a tmpfs: state lives as long as the
mappings it describes (until reboot), and `cleanup --all` reconciles after one.

No fsync, on purpose: the journal must survive cephvol being killed, which
the page cache does (and rename makes every version whole); a power loss or
kernel crash takes the mappings and mounts it describes with it. fsync cost
13 % of an attach where /run is on disk, and nothing on tmpfs.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cephvol.errors import Busy, CephvolError, StepTimeout, SystemCommandError
from cephvol.waiting import flock_exclusive

DEFAULT_STATE_DIR = Path("/run/cephvol")
# The journal's format. Written into every record; a record of a newer
# format is still read (unknown fields are ignored), so a package upgrade
# with volumes attached keeps them detachable.
STATE_VERSION = 1
# A file name must stay below NAME_MAX (255) with ".json", a "." prefix and
# a ".PID.tmp" suffix; keys of long pool/namespace/image@snap names do not.
_MAX_STEM = 200


def state_dir_from_env(value: str | os.PathLike[str] | None = None) -> Path:
    return Path(value or os.environ.get("CEPHVOL_STATE_DIR") or DEFAULT_STATE_DIR).absolute()


@dataclass
class VolumeState:
    """What cephvol did to the host for one volume, step by step."""

    spec: str
    conf: str
    client_id: str
    backend: str = ""
    phase: str = "attaching"  # attaching -> attached -> detaching
    mountpoint: str | None = None
    device: str | None = None
    backend_id: str | None = None
    fstype: str | None = None
    read_only: bool = False
    steps: list[str] = field(default_factory=list)  # done, in order
    extra: dict[str, Any] = field(default_factory=dict)
    pid: int = 0
    updated: float = 0.0
    version: int = STATE_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> VolumeState:
        """Build from a parsed record, checking every field's type: a damaged
        record must be recognised as damage here, not crash a caller later."""
        if not isinstance(d, dict):
            raise ValueError(f"expected an object, found {type(d).__name__}")
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for name in ("spec", "conf", "client_id"):
            if not isinstance(known.get(name), str) or not known[name]:
                raise ValueError(f"field {name!r} is missing or not a string")
        types: dict[str, tuple[type, ...]] = {
            "backend": (str,), "phase": (str,), "mountpoint": (str, type(None)),
            "device": (str, type(None)), "backend_id": (str, type(None)),
            "fstype": (str, type(None)), "read_only": (bool,), "steps": (list,),
            "extra": (dict,), "pid": (int,), "updated": (int, float), "version": (int,)}
        for name, allowed in types.items():
            if name in known and not isinstance(known[name], allowed):
                raise ValueError(f"field {name!r} has the wrong type")
        if not all(isinstance(x, str) for x in known.get("steps", [])):
            raise ValueError("field 'steps' holds something that is not a step name")
        from cephvol.spec import parse_spec

        parse_spec(known["spec"])  # raises UsageError (a CephvolError) if garbled
        return cls(**known)


def file_stem(key: str) -> str:
    """The file name (without suffix) for a volume key: the key itself when it
    fits, else a readable prefix and a hash of the whole key. Idempotent on
    its own results, so stems listed from the directory map to themselves."""
    if len(key) <= _MAX_STEM:
        return key
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    return f"{key[:_MAX_STEM - 26]}~{digest}"


class NotRegularFile(OSError):
    """A FIFO, device, directory or symlink where a record file should be."""


def read_regular(path: Path, limit: int = 1 << 20) -> bytes | None:
    """The first `limit` bytes of the regular file `path`, or None if it is
    missing. Opened O_NONBLOCK and checked with fstat before reading, never
    following a symlink: a FIFO planted in its place would otherwise block
    the reader (open waits for a writer), a device could be read forever."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise NotRegularFile(exc.errno, "not a regular file", str(path)) from exc
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFile(errno.EINVAL, "not a regular file", str(path))
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(limit)
    finally:
        os.close(fd)


def write_json(path: Path, data: dict[str, Any], label: str = "") -> None:
    """Whole or not at all: a temp file beside `path` (O_NOFOLLOW, 0600, unique
    per process and call), then rename. A failure leaves no temp file and is
    a SystemCommandError naming the path. The journal and the plugin's
    records are written this way."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{id(data)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            raw = json.dumps(data, indent=1, sort_keys=True).encode()
            if os.write(fd, raw) != len(raw):
                raise OSError(errno.ENOSPC, "short write")
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise SystemCommandError(f"cannot write {label}{path}: {exc.strerror or exc}") from exc


class StateStore:
    """Journal files (`volumes/KEY.json`) and per-volume locks (`locks/KEY.lock`)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        # journals found damaged by this process and moved aside: path -> why
        self.quarantined: dict[str, str] = {}

    @property
    def volumes_dir(self) -> Path:
        return self.root / "volumes"

    def _path(self, key: str) -> Path:
        return self.volumes_dir / f"{file_stem(key)}.json"

    def load(self, key: str) -> VolumeState | None:
        """The journal of `key`, or None. A damaged journal (truncated,
        garbled, wrong types) is moved aside to `KEY.json.corrupt` and treated
        as missing: one bad file must not stop every other volume, and the
        volume itself is still detached from what the host shows."""
        path = self._path(key)
        try:
            raw = read_regular(path)
        except NotRegularFile:
            self._quarantine(path, "not a regular file")
            return None
        except OSError as exc:
            raise SystemCommandError(f"cannot read state file {path}: {exc.strerror}") from exc
        if raw is None:
            return None
        try:
            return VolumeState.from_dict(json.loads(raw))
        except (ValueError, TypeError, RecursionError, CephvolError) as exc:
            # rename() is atomic, so this is damage, not a half write
            why = getattr(exc, "message", None) or str(exc)
            self._quarantine(path, why)
            return None

    def _quarantine(self, path: Path, why: str) -> None:
        aside = path.with_name(path.name + ".corrupt")
        with contextlib.suppress(OSError):
            if aside.is_dir() and not aside.is_symlink():
                os.rmdir(aside)  # an earlier quarantined directory: keep the newer one
            os.replace(path, aside)
        self.quarantined[str(aside)] = why
        from cephvol import supervisor

        supervisor.event("journal", path.name[: -len(".json")],
                         f"state file {path} is corrupt ({why}); moved to {aside}; "
                         "the volume is handled from what the host shows")

    def corrupt_files(self) -> list[Path]:
        """Journals moved aside as damaged (by any process)."""
        try:
            return sorted(self.volumes_dir.glob("*.json.corrupt"))
        except OSError:
            return []

    def save(self, key: str, st: VolumeState) -> None:
        st.pid = os.getpid()
        st.updated = time.time()
        st.version = STATE_VERSION
        write_json(self._path(key), st.to_dict(), "state file ")

    def remove(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    def keys(self) -> list[str]:
        """Stems of the journal files (a stem loads the same file as its key)."""
        try:
            return sorted(p.name[: -len(".json")] for p in self.volumes_dir.glob("*.json"))
        except OSError:
            return []

    @contextlib.contextmanager
    def lock(self, key: str, timeout: float = 120.0) -> Iterator[None]:
        """Serialise cephvol processes working on one volume.

        An ExecStopPost racing an operator's manual detach must not run a step
        twice; flock is released by the kernel if the holder dies, so a killed
        cephvol never leaves a stale lock behind.
        """
        d = self.root / "locks"
        try:
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(d / f"{file_stem(key)}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW,
                         0o600)
        except OSError as exc:
            raise SystemCommandError(f"cannot open the lock of volume {key} in {d}: "
                                     f"{exc.strerror or exc}") from exc
        try:
            if not flock_exclusive(fd, timeout=timeout):
                if timeout == 0:
                    raise Busy(f"volume {key} is being changed by another cephvol")
                raise StepTimeout(f"another cephvol held volume {key} for more than "
                                  f"{timeout:g}s")
            yield
        finally:
            os.close(fd)

