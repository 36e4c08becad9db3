"""Encryption at rest: librbd's own LUKS2 encryption, the passphrase kept in
the cluster's config-key store.

Why librbd's LUKS and not dm-crypt: this host's kernel has no device-mapper,
and the backend that goes through librbd (qsd: qemu-storage-daemon with
QEMU's rbd driver) can load librbd's encryption itself, so the loop device
it exports already shows plaintext. librbd writes a standard LUKS header
(Ceph docs: "fully compliant with the LUKS specification"), so dm-crypt can
open the same image where a kernel maps it (krbd + cryptsetup).

Where the passphrase lives, and why: a volume moves between hosts, so the
key must be found wherever the volume is attached. It is stored in the
monitors' config-key store under `cephvol/luks/<pool>/<namespace>/<image>`:
any host whose cephx user may `config-key get` that key can open the
volume. Threat model: OSDs, their disks (stolen or discarded) and anyone
who can read RADOS objects but not config-key see only ciphertext;
client.admin and any user with config-key read caps on that prefix can
decrypt. The passphrase (32 random bytes, base64) travels from the
monitors to librbd or to the daemon's QMP socket only: never on a command
line, in the environment, a file, a unit, a log line or an error message.

Detection needs no key: an encrypted image starts with the LUKS magic.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from typing import Any

from cephvol.cluster import Cluster, ClusterConfig
from cephvol.crashpoint import crash_point as _crash_point
from cephvol.errors import (
    Busy,
    CephvolError,
    NotFound,
    Unsafe,
    UsageError,
)
from cephvol.spec import ImageSpec, format_size

LUKS_MAGIC = b"LUKS\xba\xbe"
KEY_PREFIX = "cephvol/luks"
FORMAT = "luks2"  # what `create --encrypt` writes
PASSPHRASE_BYTES = 32
_LUKS1_HEADER = 592  # bytes of the LUKS1 binary header
_LUKS2_BINARY = 4096  # LUKS2 binary header; its JSON area follows, up to hdr_size
_LUKS2_MAX_HDR = 4 << 20  # a sane bound for hdr_size (cryptsetup's largest is 4 MiB)


@dataclass(frozen=True)
class Header:
    """What the LUKS header at the start of an image says (no key needed)."""

    format: str  # "luks1" or "luks2"
    data_offset: int  # bytes: where the encrypted volume's data starts


@dataclass(frozen=True)
class Unlock:
    """What a backend needs to open an encrypted image: keep it short-lived,
    and never put it in a message (repr hides the passphrase)."""

    format: str
    passphrase: bytes

    def __repr__(self) -> str:
        return f"Unlock(format={self.format!r}, passphrase=<hidden>)"


def key_name(spec: ImageSpec) -> str:
    """The config-key holding the passphrase of spec's image (its snapshots
    share the image's key)."""
    return f"{KEY_PREFIX}/{spec.pool}/{spec.namespace}/{spec.image}"


def new_passphrase() -> bytes:
    """32 random bytes, base64: printable, so it also works with `rbd
    encryption load` and cryptsetup key files (no newline to strip)."""
    return base64.b64encode(os.urandom(PASSPHRASE_BYTES))


def parse_header(raw: bytes) -> Header | None:
    """The LUKS header at the start of `raw`, None if it is not LUKS.

    LUKS1: payload offset in 512-byte sectors at byte 104 (big endian).
    LUKS2: hdr_size at byte 8; the JSON area after the 4 KiB binary header
    names the data segments and their offsets (the smallest is the data start).
    """
    if not raw.startswith(LUKS_MAGIC) or len(raw) < 8:
        return None
    version = int.from_bytes(raw[6:8], "big")
    if version == 1:
        if len(raw) < 108:
            return None
        return Header("luks1", int.from_bytes(raw[104:108], "big") * 512)
    if version != 2 or len(raw) < 16:
        return None
    hdr_size = int.from_bytes(raw[8:16], "big")
    area = raw[_LUKS2_BINARY:hdr_size].split(b"\0", 1)[0]
    try:
        meta = json.loads(area)
        offsets = [int(seg["offset"]) for seg in meta["segments"].values()]
    except (ValueError, KeyError, TypeError, AttributeError):
        offsets = []
    # a header we cannot read fully is still LUKS: treat all of it as header
    return Header("luks2", min(offsets) if offsets else hdr_size)


def read_header(cluster: Cluster, spec: ImageSpec) -> Header | None:
    """The image's LUKS header as stored (librbd, no encryption loaded)."""
    raw = cluster.read_raw(spec, 0, _LUKS2_BINARY)
    if not raw.startswith(LUKS_MAGIC):
        return None
    if raw[6:8] == b"\0\2":
        hdr_size = int.from_bytes(raw[8:16], "big")
        if _LUKS2_BINARY < hdr_size <= _LUKS2_MAX_HDR:
            raw = cluster.read_raw(spec, 0, hdr_size)
    return parse_header(raw)


def is_encrypted(cfg: ClusterConfig, spec: ImageSpec) -> bool:
    """Whether spec's image starts with a LUKS header. A missing image is
    "not encrypted": the map that follows names what is missing."""
    try:
        with Cluster(cfg) as cluster:
            return read_header(cluster, spec) is not None
    except NotFound:
        return False


def passphrase(cluster: Cluster, spec: ImageSpec) -> bytes:
    """The stored passphrase of an encrypted image; NotFound (3) if it is gone."""
    value = cluster.config_key_get(key_name(spec))
    if not value:
        raise NotFound(f"{spec.without_snap()} is encrypted, but its key is missing from the "
                       f"cluster's config-key store ({key_name(spec)}); it cannot be opened "
                       "without it")
    return value


def unlock_for(cfg: ClusterConfig, spec: ImageSpec) -> Unlock | None:
    """None for a plain image; else its format and passphrase (one connection)."""
    with Cluster(cfg) as cluster:
        return unlock_in(cluster, spec)


def unlock_in(cluster: Cluster, spec: ImageSpec) -> Unlock | None:
    """unlock_for on a connection the caller already holds."""
    try:
        hdr = read_header(cluster, spec)
    except NotFound:
        return None  # no image: the map that follows says what is missing
    if hdr is None:
        return None
    return Unlock(hdr.format, passphrase(cluster, spec))


def data_bytes(cluster: Cluster, spec: ImageSpec) -> int:
    """Allocated bytes that hold a volume's data: for an encrypted image
    the LUKS header does not count (what decides "empty, may mkfs")."""
    hdr = read_header(cluster, spec)
    return cluster.allocated_bytes(spec, start=hdr.data_offset if hdr else 0)


def create_encrypted(cfg: ClusterConfig, spec: ImageSpec, size: int) -> dict[str, Any]:
    """Create the image (idempotent, as `create`) and format it with LUKS2.

    Order, so that a crash anywhere is finished by running it again: the
    key is stored before the header is written (a header without its key
    would be a volume nobody can open), and an existing key is reused (a
    create interrupted after storing it). An image that already holds data
    is never formatted (Unsafe, 10); one already encrypted is left as it is
    (its key must be there). An image this call created is removed again
    if formatting fails, so a failed create changes nothing."""
    if spec.snap:
        raise UsageError(f"cannot create a snapshot spec {spec}; give POOL/IMAGE")
    with Cluster(cfg) as cluster:
        created = cluster.create_image(spec, size)
        stored = False
        try:
            hdr = read_header(cluster, spec)
            if hdr is not None:
                passphrase(cluster, spec)  # NotFound (3) if the key is gone
                return _result(spec, size, created=False, fmt=hdr.format)
            if not created:
                watchers = cluster.watchers(spec)
                if watchers:
                    raise Busy(f"{spec} is in use (watched by "
                               f"{', '.join(w.get('addr', '?') for w in watchers)}); "
                               "not encrypting it")
                used = cluster.allocated_bytes(spec)
                if used:
                    raise Unsafe(f"{spec} already holds {format_size(used)} of data; "
                                 "refusing to encrypt it (formatting destroys that data)")
            key = cluster.config_key_get(key_name(spec))
            if not key:
                key = new_passphrase()
                cluster.config_key_set(key_name(spec), key)
                stored = True
            _crash_point("encrypt-key")
            cluster.encryption_format(spec, 2, key)
            _crash_point("encrypt-format")
        except CephvolError:
            if created:
                _undo_create(cluster, spec, stored)
            raise
    return _result(spec, size, created=created, fmt=FORMAT)


def _undo_create(cluster: Cluster, spec: ImageSpec, stored: bool) -> None:
    """Best effort: the caller's error is what the operator must see."""
    try:
        cluster.remove_image(spec)
        if stored:
            cluster.config_key_rm(key_name(spec))
    except CephvolError:
        pass


def _result(spec: ImageSpec, size: int, *, created: bool, fmt: str) -> dict[str, Any]:
    return {"image": str(spec), "size": size, "created": created, "encrypted": True,
            "encryption": fmt, "key": key_name(spec)}


def forget_key(cfg: ClusterConfig, spec: ImageSpec) -> bool:
    """Remove the stored passphrase of a removed image (True if there was
    one): the key of an image that is gone protects nothing."""
    with Cluster(cfg) as cluster:
        if cluster.config_key_get(key_name(spec)) is None:
            return False
        cluster.config_key_rm(key_name(spec))
    return True
