"""Finding a client's cephx secret without ever printing or logging it.

The secret is read from the keyring file(s) the ceph config names, kept as
bytes only as long as needed, and never put in an exception message.
"""

from __future__ import annotations

import base64
import binascii
import configparser
import os
import stat
from pathlib import Path

from cephvol.errors import ClusterError


def read_secret(keyring_paths: list[str], entity: str) -> bytes:
    """Return the decoded (binary) secret of `entity` (e.g. client.admin)."""
    tried = []
    for raw in keyring_paths:
        path = Path(raw.strip())
        if not raw.strip() or not path.exists():
            continue
        tried.append(str(path))
        cp = configparser.ConfigParser(interpolation=None, strict=False)
        try:
            cp.read_string(path.read_text())
        except (OSError, configparser.Error) as exc:
            raise ClusterError(f"keyring {path} is unreadable or malformed") from exc
        if cp.has_section(entity) and cp.has_option(entity, "key"):
            try:
                return base64.b64decode(cp.get(entity, "key").strip(), validate=True)
            except (binascii.Error, ValueError) as exc:
                raise ClusterError(
                    f"keyring {path}: the key of {entity} is not valid base64") from exc
    where = ", ".join(tried) or ("no existing keyring file (looked for "
                                 + ", ".join(k.strip() for k in keyring_paths if k.strip())
                                 + ")")
    raise ClusterError(f"no key for {entity} in {where}")


def keyring_mode_problem(path: Path) -> str | None:
    """A warning if a keyring is readable by anyone but its owner."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return None
    if mode & 0o077:
        return f"keyring {path} has mode {mode:04o}; it should be 0600"
    return None
