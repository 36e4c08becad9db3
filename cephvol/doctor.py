"""What this host can do, and what stands in the way: `cephvol doctor`.

Operators run it first on a new host, so every check says in one line what
was found and, when something is wrong, what to do about it.
"""

from __future__ import annotations

import os
import platform
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cephvol.cluster import ClusterConfig
from cephvol.mapper import BACKEND_NAMES, HostPaths, all_backends
from cephvol.secrets import keyring_mode_problem

TOOLS = {
    "krbd": (),
    "nbd": ("rbd-nbd",),
    "qsd": ("qemu-storage-daemon", "losetup", "blockdev"),
    "fuse": ("rbd-fuse", "losetup", "fusermount3", "blockdev"),
}
COMMON_TOOLS = ("blkid", "mount", "umount", "mkfs.ext4")


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    warning: bool = False  # ok, but worth fixing


def _keyrings(cfg: ClusterConfig) -> list[Path]:
    """Keyring paths named in the config (without connecting), else Ceph's defaults."""
    found: list[Path] = []
    try:
        text = cfg.conf.read_text()
    except OSError:
        text = ""
    section = "global"
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
            continue
        k, sep, v = line.partition("=")
        if (sep and k.strip().replace("_", " ") == "keyring"
                and section in ("global", "client", f"client.{cfg.client_id}")):
            found += [Path(p.strip()) for p in v.split(",")
                      if p.strip() and Path(p.strip()) not in found]
    if not found:
        found = [Path(f"/etc/ceph/ceph.client.{cfg.client_id}.keyring"),
                 Path("/etc/ceph/ceph.keyring"), Path("/etc/ceph/keyring")]
    return found


def run_checks(paths: HostPaths, cfg: ClusterConfig, *, connect: bool = True) -> dict[str, Any]:
    checks: list[Check] = []
    backends = {}
    for b in all_backends(paths, cfg):
        s = b.support()
        missing = [t for t in TOOLS[b.name] if not shutil.which(t)]
        ok = s.ok and not missing
        reason = s.reason + (f"; missing tools: {', '.join(missing)}" if missing else "")
        backends[b.name] = {"usable": ok, "reason": reason}
        checks.append(Check(f"backend {b.name}", ok, reason))
    for tool in COMMON_TOOLS:
        if not shutil.which(tool):
            checks.append(Check(f"tool {tool}", False, f"{tool} not found; install it"))
    conf_ok = cfg.conf.exists() and os.access(cfg.conf, os.R_OK)
    checks.append(Check("config", conf_ok, f"{cfg.conf} readable" if conf_ok
                        else f"{cfg.conf} missing or unreadable; "
                        "pass -c or set CEPH_CONF"))
    for kr in _keyrings(cfg):
        if kr.exists():
            problem = keyring_mode_problem(kr)
            checks.append(Check(f"keyring {kr}", True, problem or "mode 0600 or stricter",
                                warning=problem is not None))
    if connect and conf_ok:
        from cephvol.cluster import Cluster
        from cephvol.errors import CephvolError

        try:
            with Cluster(cfg) as c:
                fsid = c.rados.get_fsid()
            checks.append(Check("cluster", True, f"reachable as client.{cfg.client_id} "
                                f"(fsid {fsid})"))
        except CephvolError as exc:
            checks.append(Check("cluster", False, exc.message))
    order = [n for n in BACKEND_NAMES if backends[n]["usable"]]
    return {
        "kernel": platform.release(),
        "auto_backend": order[0] if order else None,
        "backends": backends,
        "checks": [asdict(c) for c in checks],
    }
