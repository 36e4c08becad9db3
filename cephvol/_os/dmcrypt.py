"""dm-crypt through cryptsetup: open and close the LUKS layer of a block
device whose image librbd encrypted (cephvol/data/encryption.py).

librbd writes a standard LUKS header, so a kernel mapping of the image
(krbd's /dev/rbdN) is opened with `cryptsetup open --type luks`, and the
opened device (/dev/mapper/NAME, the dm-N block device) is what mkfs, mount
and containers get. The passphrase goes to cryptsetup on stdin
(`--key-file=-`: the whole input is the key, no newline handling), never on
its argv. Which dm device opens which rbd device is read back from sysfs
(/sys/block/rbdN/holders/dm-M, /sys/block/dm-M/dm/{name,uuid}), so a
crashed attach or detach is found again without a record of its own.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from cephvol import proc
from cephvol.errors import Busy, Conflict, SystemCommandError

PREFIX = "cephvol-"  # cephvol's dm names: cephvol-<pool>.<image>, see name_for
CRYPTSETUP = "cryptsetup"
# cryptsetup(8) exit codes
_WRONG_KEY = 2  # no key available with this passphrase
_BUSY = 5  # device already exists or device is busy


@dataclass(frozen=True)
class Opened:
    """A dm-crypt device that opens `holder_of`'s block device."""

    name: str  # dm name (/dev/mapper/NAME)
    block: str  # its block device name, dm-M
    format: str  # "luks1" / "luks2" (from the dm uuid, CRYPT-LUKS2-...)


def available(sys_root: Path) -> str | None:
    """None when dm-crypt can be used here, else why not."""
    if not shutil.which(CRYPTSETUP):
        return "cryptsetup is not installed (Debian: cryptsetup-bin)"
    if not (sys_root / "module" / "dm_mod").exists() and not Path(
            "/dev/mapper/control").exists():
        return "the kernel has no device-mapper (dm_mod)"
    return None


def name_for(key: str) -> str:
    """The dm name of a volume: cephvol-<pool.ns.image[.snap]>-<digest>.

    Readable in `dmsetup ls`, only characters libdevmapper keeps as they are
    (it mangles others, e.g. ',' becomes the four characters "\\x2c" in the
    kernel's name and /dev/mapper), at most 127 bytes; the digest of the
    state key (pool,ns,image[,snap]) keeps two images apart whose readable
    parts are alike."""
    readable = "".join(c if c.isascii() and (c.isalnum() or c in "-_.+") else "_"
                       for c in key.replace(",", "."))[:80]
    return f"{PREFIX}{readable}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def holder_of(block: str, sys_root: Path) -> Opened | None:
    """The cephvol dm-crypt device that holds block device `block` (rbdN)."""
    try:
        holders = sorted(os.listdir(sys_root / "block" / block / "holders"))
    except OSError:
        return None
    for h in holders:
        dm = sys_root / "block" / h / "dm"
        try:
            name = (dm / "name").read_text().strip()
            uuid = (dm / "uuid").read_text().strip()
        except OSError:
            continue
        if name.startswith(PREFIX) and uuid.startswith("CRYPT-LUKS"):
            return Opened(name, h, "luks2" if uuid.startswith("CRYPT-LUKS2") else "luks1")
    return None


def open_luks(device: str, name: str, passphrase: bytes, *, read_only: bool,
              timeout: float) -> None:
    """Open the LUKS layer of `device` as /dev/mapper/`name`. Conflict (5)
    when the passphrase does not open it."""
    argv = [CRYPTSETUP, "open", "--type", "luks", "--key-file=-",
            *(["--readonly"] if read_only else []), device, name]
    res = proc.run(argv, timeout=timeout, check=False, input_text=passphrase.decode())
    if res.returncode == _WRONG_KEY:
        raise Conflict(f"the stored key does not open the LUKS header of {device} "
                       "(replaced or wrong key)")
    if res.returncode != 0:
        raise proc.failure(res)


def close(name: str, *, timeout: float, deferred: bool = False) -> None:
    """Close /dev/mapper/`name` (flushes dm-crypt's queue). Busy while it is
    open or mounted; `deferred` marks it to go at its last close instead.
    Closing a device that is not there is done."""
    res = proc.run([CRYPTSETUP, "close", *(["--deferred"] if deferred else []), name],
                   timeout=timeout, check=False)
    if res.returncode == 0:
        return
    text = (res.stderr or res.stdout).strip()
    if res.returncode == _BUSY or "in use" in text:
        raise Busy(f"/dev/mapper/{name} is still in use; not closing it")
    if "doesn't exist" in text or "not active" in text:
        return
    raise SystemCommandError(f"cryptsetup close {name} failed (exit {res.returncode}): "
                             f"{text.splitlines()[-1] if text else 'no output'}")
