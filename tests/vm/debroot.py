"""The clean Debian 12 root the package test installs into (debootstrap
minbase + systemd as init), cached under $CEPHVOL_DEB_CACHE (default
/var/tmp/cephvol-deb) by a hash of its recipe, built once under a lock.

Its own module so tests/vm/prebuild.py can make it ahead of the tests.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

SUITE = "bookworm"
MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
SECURITY = os.environ.get("DEBIAN_SECURITY_MIRROR", "http://deb.debian.org/debian-security")
# what a freshly installed Debian 12 host has that minbase lacks: systemd as init
INCLUDE = ("systemd-sysv",)
SOURCES = (f"deb {MIRROR} {SUITE} main\n"
           f"deb {MIRROR} {SUITE}-updates main\n"
           f"deb {SECURITY} {SUITE}-security main\n")


def cache_root() -> Path:
    return Path(os.environ.get("CEPHVOL_DEB_CACHE", "/var/tmp/cephvol-deb"))


def root_key() -> str:
    """Everything the cached root is made from; a change makes a new root."""
    h = hashlib.sha256()
    for part in (SUITE, MIRROR, SOURCES, "minbase", *INCLUDE, "recipe 1"):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


def ensure_root(timeout: float = 900) -> Path:
    """The cached clean root for the current recipe, built once under a lock."""
    base = cache_root()
    base.mkdir(parents=True, exist_ok=True)
    out = base / root_key()
    lock = os.open(base / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "root" / "sbin" / "init").exists():
            build = base / f"{out.name}.build"
            shutil.rmtree(build, ignore_errors=True)
            build.mkdir()
            try:
                cp = subprocess.run(
                    ["debootstrap", "--variant=minbase", f"--include={','.join(INCLUDE)}",
                     SUITE, str(build / "root"), MIRROR],
                    capture_output=True, text=True, timeout=timeout, check=False)
                if cp.returncode != 0:
                    raise AssertionError(f"debootstrap failed: {cp.stdout[-1500:]}"
                                         f"{cp.stderr[-1500:]}")
                (build / "root" / "etc" / "apt" / "sources.list").write_text(SOURCES)
                (build / "root" / "etc" / "hostname").write_text("cephvol-deb\n")
                # debootstrap's lists are the installer's: apt-get update runs per test
                subprocess.run(["rm", "-rf", str(build / "root" / "var/cache/apt/archives")],
                               check=True)
                shutil.rmtree(out, ignore_errors=True)
                build.rename(out)
            finally:
                # a debootstrap that failed or timed out may leave its mounts inside
                for sub in ("proc", "sys", "dev/pts", "dev"):
                    if os.path.ismount(build / "root" / sub):
                        subprocess.run(["umount", "-l", str(build / "root" / sub)], check=False)
                shutil.rmtree(build, ignore_errors=True)
            for old in base.iterdir():  # keep the cache to the current root
                if old.is_dir() and old not in (out, base / "archives"):
                    shutil.rmtree(old, ignore_errors=True)
    finally:
        os.close(lock)
    return out / "root"
