"""The mapper: one interface, several ways to turn an RBD image into a block
device. It chooses a backend (`select_backend`: auto prefers krbd, then nbd,
qsd, fuse), finds mappings across all of them, and re-exports the backend
types, whose contract is written down in cephvol.backends.base."""

from __future__ import annotations

import os
import re
from collections.abc import Callable

from cephvol.backends.base import (
    BACKEND_NAMES,
    Backend,
    HostPaths,
    MapOptions,
    Mapping,
    Support,
)
from cephvol.cluster import ClusterConfig
from cephvol.errors import Unsupported, UsageError
from cephvol.spec import ImageSpec

__all__ = ["BACKEND_NAMES", "Backend", "HostPaths", "MapOptions", "Mapping", "Support",
           "all_backends", "backend_class", "check_device_path", "find_mapping", "list_all",
           "make_backend", "select_backend"]


def backend_class(name: str) -> type[Backend]:
    if name == "fuse":
        from cephvol.backends.fuse import FuseBackend

        return FuseBackend
    if name == "krbd":
        from cephvol.backends.krbd import KrbdBackend

        return KrbdBackend
    if name == "nbd":
        from cephvol.backends.nbd import NbdBackend

        return NbdBackend
    if name == "qsd":
        from cephvol.backends.qsd import QsdBackend

        return QsdBackend
    raise UsageError(f"unknown backend {name!r}; choose auto, {', '.join(BACKEND_NAMES)}")


def make_backend(name: str, paths: HostPaths, cfg: ClusterConfig) -> Backend:
    return backend_class(name)(paths, cfg)


def all_backends(paths: HostPaths, cfg: ClusterConfig) -> list[Backend]:
    return [make_backend(n, paths, cfg) for n in BACKEND_NAMES]


# backends that can open librbd's LUKS encryption (cephvol/data/encryption.py):
# only the one that goes through librbd; krbd and rbd-fuse show ciphertext
ENCRYPTION_BACKENDS = ("qsd",)


def select_backend(name: str, paths: HostPaths, cfg: ClusterConfig, *,
                   encrypted: Callable[[], bool] | None = None,
                   what: str = "the image") -> Backend:
    """`auto`: krbd if the kernel can, else nbd, else qsd, else fuse; a named one must work.

    `encrypted` says whether the image is encrypted; it is asked (one
    cluster read) only when the backend chosen cannot decrypt: `auto` then
    picks one that can, a named one is refused (exit 9)."""
    env = os.environ.get("CEPHVOL_BACKEND")
    if name == "auto" and env:
        name = env
    if name != "auto":
        b = make_backend(name, paths, cfg)
        s = b.support()
        if not s.ok:
            raise Unsupported(f"backend {name} cannot run on this host: {s.reason}")
        if b.name not in ENCRYPTION_BACKENDS and encrypted is not None and encrypted():
            raise Unsupported(f"{what} is encrypted (librbd LUKS) and the {name} backend "
                              "cannot decrypt it; use --backend qsd")
        return b
    reasons = []
    usable = []
    for b in all_backends(paths, cfg):
        s = b.support()
        if s.ok:
            usable.append(b)
        else:
            reasons.append(f"{b.name}: {s.reason}")
    if usable and (usable[0].name in ENCRYPTION_BACKENDS or encrypted is None
                   or not encrypted()):
        return usable[0]
    if usable:
        for b in usable:
            if b.name in ENCRYPTION_BACKENDS:
                return b
        raise Unsupported(f"{what} is encrypted (librbd LUKS); only the qsd backend can "
                          "decrypt it, and it cannot run on this host: "
                          + "; ".join(r for r in reasons if r.startswith("qsd")))
    raise Unsupported("no mapping backend works on this host; " + "; ".join(reasons))


def find_mapping(spec: ImageSpec, paths: HostPaths, cfg: ClusterConfig) -> Mapping | None:
    """The mapping of a spec by any backend, as the kernel shows it."""
    for b in all_backends(paths, cfg):
        if b.support().ok or b.name == "fuse":
            m = b.find(spec)
            if m is not None:
                return m
    return None


def list_all(paths: HostPaths, cfg: ClusterConfig) -> list[Mapping]:
    out: list[Mapping] = []
    for b in all_backends(paths, cfg):
        out.extend(b.list_mappings())
    return out


_DEV_NAME = re.compile(r"^/dev/[A-Za-z0-9]+$")


def check_device_path(device: str) -> str:
    if not _DEV_NAME.fullmatch(device):
        raise UsageError(f"not a device path: {device!r}")
    return device
