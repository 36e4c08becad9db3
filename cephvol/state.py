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
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cephvol.errors import Busy, CephvolError, StepTimeout

DEFAULT_STATE_DIR = Path("/run/cephvol")


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VolumeState:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class StateStore:
    """Journal files (`volumes/KEY.json`) and per-volume locks (`locks/KEY.lock`)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def volumes_dir(self) -> Path:
        return self.root / "volumes"

    def _path(self, key: str) -> Path:
        return self.volumes_dir / f"{key}.json"

    def load(self, key: str) -> VolumeState | None:
        try:
            data = json.loads(self._path(key).read_text())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, TypeError) as exc:
            # rename() is atomic, so this is damage, not a half write
            raise CephvolError(f"state file {self._path(key)} is corrupt: {exc}") from exc
        return VolumeState.from_dict(data)

    def save(self, key: str, st: VolumeState) -> None:
        self.volumes_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        st.pid = os.getpid()
        st.updated = time.time()
        path = self._path(key)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, json.dumps(st.to_dict(), indent=1, sort_keys=True).encode())
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def remove(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    def keys(self) -> list[str]:
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
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(d / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            end = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    if time.monotonic() >= end:
                        if timeout == 0:
                            raise Busy(f"volume {key} is being changed by another cephvol") from exc
                        raise StepTimeout(
                            f"another cephvol held volume {key} for more than {timeout:g}s"
                        ) from exc
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)

