"""Parsing and validation of everything an operator types: specs, sizes, paths.

All input checks live here so the rules are the same for the CLI, the unit
templates and the library, and so a bad value is refused before anything on
the host or in the cluster is touched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from cephvol.errors import UsageError

DEFAULT_POOL = "rbd"
# Ceph itself accepts nearly any byte in these names; cephvol accepts a safe
# subset because the names end up in paths, unit names and kernel strings.
# fullmatch, ASCII only: `$` would also match before a final "\n" and `\w`/`\d`
# would take any Unicode letter or digit.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*", re.ASCII)
MAX_POOL_LEN = 63
MAX_NAMESPACE_LEN = 63
MAX_IMAGE_LEN = 96
MAX_SNAP_LEN = 96


@dataclass(frozen=True, order=True)
class ImageSpec:
    """pool[/namespace]/image[@snap]; `namespace` is "" for the default one."""

    pool: str
    namespace: str
    image: str
    snap: str | None = None

    def __str__(self) -> str:
        ns = f"{self.namespace}/" if self.namespace else ""
        snap = f"@{self.snap}" if self.snap else ""
        return f"{self.pool}/{ns}{self.image}{snap}"

    @property
    def read_only(self) -> bool:
        """A snapshot is immutable, so a snapshot mapping is always read-only."""
        return self.snap is not None

    @property
    def key(self) -> str:
        """A file-name-safe, reversible identity used for state and mount dirs."""
        parts = [self.pool, self.namespace or "-", self.image]
        if self.snap:
            parts.append(self.snap)
        return ",".join(parts)

    def without_snap(self) -> ImageSpec:
        return ImageSpec(self.pool, self.namespace, self.image, None)


def _check_name(kind: str, value: str, limit: int, spec: str) -> str:
    if not value:
        raise UsageError(f"invalid image spec {spec!r}: empty {kind} name")
    if len(value) > limit:
        raise UsageError(f"invalid image spec {spec!r}: {kind} name longer than {limit} characters")
    if not _NAME.fullmatch(value):
        raise UsageError(
            f"invalid image spec {spec!r}: {kind} name {value!r} may only contain "
            "letters, digits, '_', '.', '+', '-' and must not start with '.', '+' or '-'"
        )
    return value


def parse_spec(text: str, *, allow_snap: bool = True) -> ImageSpec:
    """Parse `[pool/][namespace/]image[@snap]` like the rbd tool (pool defaults to rbd)."""
    if not isinstance(text, str) or not text.strip():
        raise UsageError("empty image spec; expected POOL/IMAGE")
    spec = text.strip()
    snap: str | None = None
    if "@" in spec:
        spec, _, snap = spec.partition("@")
        if "@" in snap:
            raise UsageError(f"invalid image spec {text!r}: more than one '@'")
        if not allow_snap:
            raise UsageError(f"invalid image spec {text!r}: a snapshot is not allowed here")
        _check_name("snapshot", snap, MAX_SNAP_LEN, text)
    parts = spec.split("/")
    if len(parts) == 1:
        pool, ns, image = DEFAULT_POOL, "", parts[0]
    elif len(parts) == 2:
        pool, ns, image = parts[0], "", parts[1]
    elif len(parts) == 3:
        pool, ns, image = parts
        _check_name("namespace", ns, MAX_NAMESPACE_LEN, text)
    else:
        raise UsageError(f"invalid image spec {text!r}: expected POOL[/NAMESPACE]/IMAGE[@SNAP]")
    _check_name("pool", pool, MAX_POOL_LEN, text)
    _check_name("image", image, MAX_IMAGE_LEN, text)
    return ImageSpec(pool, ns, image, snap)


def spec_from_key(key: str) -> ImageSpec:
    """Inverse of ImageSpec.key (state files are named by it)."""
    parts = key.split(",")
    if len(parts) not in (3, 4):
        raise UsageError(f"not a cephvol volume key: {key!r}")
    pool, ns, image = parts[:3]
    snap = parts[3] if len(parts) == 4 else None
    text = f"{pool}/{'' if ns == '-' else ns + '/'}{image}" + (f"@{snap}" if snap else "")
    return parse_spec(text)


# blanks around the number are forgiven, a newline or any other control
# character is not; digits are ASCII (int() would read other scripts' digits)
_SIZE = re.compile(r"[ \t]*([0-9]+)[ \t]*([KMGTPE]?)(i?B?)[ \t]*", re.IGNORECASE | re.ASCII)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50, "E": 1 << 60}
MAX_SIZE = 1 << 60  # 1 EiB; librbd's limit is higher, no real pool is
SECTOR = 512


def parse_size(text: str) -> int:
    """Parse an image size in bytes. Units are binary (G = GiB), as with rbd.

    A bare number is bytes, unlike `rbd --size` (MiB): cephvol prefers the
    explicit unit to the surprising default, and requires sector alignment.
    """
    m = _SIZE.fullmatch(str(text))
    if not m or (m.group(3) and not m.group(2) and m.group(3).lower() != "b"):
        raise UsageError(f"invalid size {text!r}: expected a whole number with K/M/G/T/P, e.g. 10G")
    value = int(m.group(1)) * _UNITS[m.group(2).upper()]
    if value <= 0:
        raise UsageError(f"invalid size {text!r}: must be greater than zero")
    if value > MAX_SIZE:
        raise UsageError(f"invalid size {text!r}: larger than 1E")
    if value % SECTOR:
        raise UsageError(f"invalid size {text!r}: must be a multiple of {SECTOR} bytes")
    return value


def format_size(value: int) -> str:
    for unit in ("E", "P", "T", "G", "M", "K"):
        mult = _UNITS[unit]
        if value >= mult and value % mult == 0:
            return f"{value // mult}{unit}"
    return f"{value}B"


def parse_mountpoint(text: str) -> PurePosixPath:
    """A mountpoint must be absolute, normalised and not the root itself."""
    if not text:
        raise UsageError("empty mountpoint")
    if any(ord(c) < 0x20 or c == "\x7f" for c in text):
        raise UsageError("invalid mountpoint: control characters")
    p = PurePosixPath(text)
    if not p.is_absolute():
        raise UsageError(f"invalid mountpoint {text!r}: must be an absolute path")
    if ".." in p.parts:
        raise UsageError(f"invalid mountpoint {text!r}: must not contain '..'")
    p = PurePosixPath("/" + "/".join(p.parts[1:]))  # "//x" is "/x" to the kernel
    if str(p) == "/":
        raise UsageError("invalid mountpoint '/': refusing to mount over the root")
    if len(str(p).encode()) >= 4096:
        raise UsageError("invalid mountpoint: longer than PATH_MAX (4095 bytes)")
    if any(len(part.encode()) > 255 for part in p.parts):
        raise UsageError("invalid mountpoint: a path component is longer than 255 bytes")
    return p
