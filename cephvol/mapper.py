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


def select_backend(name: str, paths: HostPaths, cfg: ClusterConfig, *,
                   encrypted: Callable[[], bool] | None = None,
                   what: str = "the image") -> Backend:
    """`auto`: krbd if the kernel can, else nbd, else qsd, else fuse; a named one must work.

    `encrypted` says whether the image is encrypted; it is asked (one
    cluster read) only when the backend chosen cannot decrypt
    (Backend.decrypts: qsd through librbd, krbd through dm-crypt where
    cryptsetup and device-mapper are there): `auto` then picks one that
    can, a named one is refused (exit 9)."""
    env = os.environ.get("CEPHVOL_BACKEND")
    if name == "auto" and env:
        name = env
    if name != "auto":
        b = make_backend(name, paths, cfg)
        s = b.support()
        if not s.ok:
            raise Unsupported(f"backend {name} cannot run on this host: {s.reason}")
        why = b.decrypts()
        if why and encrypted is not None and encrypted():
            raise Unsupported(f"{what} is encrypted (librbd LUKS) and {why}; use "
                              "--backend qsd (or krbd with cryptsetup)")
        return b
    reasons = []
    usable = []
    for b in all_backends(paths, cfg):
        s = b.support()
        if s.ok:
            usable.append(b)
        else:
            reasons.append(f"{b.name}: {s.reason}")
    if usable and (usable[0].decrypts() is None or encrypted is None or not encrypted()):
        return usable[0]
    if usable:
        for b in usable:
            if b.decrypts() is None:
                return b
        raise Unsupported(f"{what} is encrypted (librbd LUKS); no backend here can decrypt "
                          "it (" + "; ".join(f"{b.name}: {b.decrypts()}" for b in usable)
                          + "; " + "; ".join(reasons) + ")")
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
