"""rbd-nbd: librbd in a userspace daemon behind the kernel's nbd driver.

Driven through `rbd-nbd map/unmap/list-mapped --format json`. Every rbd-nbd
failure exits 1, so errors are told apart by parsing stderr. The cephx key is
never passed on the command line: rbd-nbd reads the keyring the config names.
"""

from __future__ import annotations

import json
import shutil
from typing import Any

from cephvol import proc, supervisor
from cephvol.backends.base import Backend, MapOptions, Mapping, Support
from cephvol.errors import (
    Busy,
    ClusterError,
    NotFound,
    StepTimeout,
    SystemCommandError,
    Unsupported,
)
from cephvol.spec import ImageSpec


def parse_list_mapped(text: str) -> list[dict[str, Any]]:
    """`rbd-nbd list-mapped --format json` -> entries with pool/namespace/image/snap/device."""
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SystemCommandError("rbd-nbd list-mapped printed something that is not JSON") from exc
    return [e for e in data if isinstance(e, dict) and e.get("device")]


def entry_spec(e: dict[str, Any]) -> ImageSpec:
    snap = e.get("snap") or "-"
    return ImageSpec(e["pool"], e.get("namespace", "") or "", e["image"],
                     None if snap == "-" else snap)


def classify_error(stderr: str) -> Exception:
    s = stderr.lower()
    last = stderr.strip().splitlines()[-1] if stderr.strip() else "no output"
    if "failed to find unused device" in s or ("nbd" in s and "no such device" in s):
        return Unsupported("rbd-nbd found no free nbd device (is the nbd module loaded?)")
    if "no such file or directory" in s or "(2)" in s:
        return NotFound(f"rbd-nbd: pool, image or snapshot not found ({last})")
    if "permission denied" in s or "(13)" in s or "(1) operation not permitted" in s:
        return ClusterError(f"rbd-nbd: permission denied ({last})")
    if "timed out" in s or "(110)" in s:
        return StepTimeout(f"rbd-nbd: timed out ({last})")
    if "busy" in s or "(16)" in s:
        return Busy(f"rbd-nbd: device busy ({last})")
    if "read-only file system" in s or "(30)" in s:
        return Busy(f"rbd-nbd: exclusive lock held by another client ({last})")
    return SystemCommandError(f"rbd-nbd failed: {last}")


class NbdBackend(Backend):
    name = "nbd"

    def support(self) -> Support:
        if not shutil.which("rbd-nbd"):
            return Support(False, "rbd-nbd is not installed (apt install rbd-nbd)")
        if not ((self.paths.sys_root / "module" / "nbd").exists()
                or (self.paths.dev_root / "nbd0").exists()):
            return Support(False, "kernel has no nbd driver (no /sys/module/nbd, no /dev/nbd0)")
        return Support(True, "rbd-nbd and the nbd driver are available")

    def _base(self) -> list[str]:
        return ["rbd-nbd", "-c", str(self.cfg.conf), "--id", self.cfg.client_id]

    def list_mappings(self) -> list[Mapping]:
        if not self.support().ok:
            return []
        res = proc.run([*self._base(), "list-mapped", "--format", "json"], check=False,
                       timeout=30)
        if res.returncode != 0:
            raise classify_error(res.stderr)
        out = []
        for e in parse_list_mapped(res.stdout):
            spec = entry_spec(e)
            out.append(Mapping(backend=self.name, spec=str(spec), device=e["device"],
                               backend_id=str(e.get("id", "")), read_only=spec.read_only,
                               extra={"cookie": e.get("cookie")}))
        return out

    def map(self, spec: ImageSpec, opts: MapOptions) -> Mapping:
        s = self.support()
        if not s.ok:
            raise Unsupported(s.reason)
        existing = self.find(spec)
        if existing:
            return existing
        argv = [*self._base(), "map"]
        if opts.read_only or spec.read_only:
            argv.append("--read-only")
        if opts.exclusive:
            argv.append("--exclusive")
        if opts.io_timeout:
            argv += ["--io-timeout", str(opts.io_timeout)]
        if opts.reattach_timeout:
            argv += ["--reattach-timeout", str(opts.reattach_timeout)]
        argv += ["--cookie", f"cephvol-{spec.key}", str(spec)]
        res = proc.run([*supervisor.own_scope_argv("rbd-nbd"), *argv], check=False,
                       timeout=self.cfg.connect_timeout + 60)
        if res.returncode != 0:
            raise classify_error(res.stderr)
        m = self.find(spec)
        if m is None:
            raise SystemCommandError(f"rbd-nbd mapped {spec} at {res.stdout.strip()} but "
                                     "list-mapped does not show it")
        return m

    def own_pids(self, mapping: Mapping) -> set[int]:
        # list-mapped's "id" is the pid of the rbd-nbd serving the device
        return {int(mapping.backend_id)} if mapping.backend_id.isdigit() else set()

    def unmap(self, mapping: Mapping, *, force: bool = False) -> None:
        # rbd-nbd has no forced unmap: the caller already checked for users
        res = proc.run([*self._base(), "unmap", mapping.device], check=False, timeout=120)
        if res.returncode != 0 and "not mapped" not in res.stderr.lower():
            raise classify_error(res.stderr)
