"""systemd glue: unit-name escaping and the env file handed to the container unit.

The escaping is systemd-escape's (systemd.unit(5), "String Escaping for
Inclusion in Unit Names"), so `cephvol@rbd-pg\\x2ddata.service` names the
volume rbd/pg-data and `%I` in a template gives the spec back.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from cephvol.errors import UsageError

_PLAIN = re.compile(r"[A-Za-z0-9:_.]")


def escape(text: str) -> str:
    """systemd-escape TEXT: '/' -> '-', anything outside [A-Za-z0-9:_.] (and a
    leading '.') -> \\xNN per UTF-8 byte."""
    if not text:
        return ""
    out = []
    for i, ch in enumerate(text):
        if ch == "/":
            out.append("-")
        elif _PLAIN.fullmatch(ch) and not (ch == "." and i == 0):
            out.append(ch)
        else:
            out.extend(f"\\x{b:02x}" for b in ch.encode())
    return "".join(out)


def unescape(text: str) -> str:
    """systemd-escape --unescape."""
    raw = bytearray()
    i = 0
    while i < len(text):
        if text.startswith("\\x", i) and re.fullmatch(r"[0-9a-fA-F]{2}", text[i + 2:i + 4]):
            raw.append(int(text[i + 2:i + 4], 16))
            i += 4
        elif text[i] == "-":
            raw.append(ord("/"))
            i += 1
        else:
            raw.extend(text[i].encode())
            i += 1
    try:
        return raw.decode()
    except UnicodeDecodeError as exc:
        raise UsageError(f"{text!r} is not a valid systemd-escaped name") from exc


def env_lines(result: dict[str, Any]) -> str:
    """The env file an application unit reads with EnvironmentFile=: what
    attach did, never a secret."""
    vals = {
        "CEPHVOL_IMAGE": result["image"],
        "CEPHVOL_DEVICE": result.get("device") or "",
        "CEPHVOL_MOUNTPOINT": result.get("mountpoint") or "",
        "CEPHVOL_BACKEND": result.get("backend") or "",
        "CEPHVOL_FSTYPE": result.get("fstype") or "",
        "CEPHVOL_READ_ONLY": "1" if result.get("read_only") else "0",
    }
    for k, v in vals.items():
        if any(c in v for c in "\n\"\\$`"):
            raise UsageError(f"cannot put {k}={v!r} into an env file")
    return "".join(f'{k}="{v}"\n' for k, v in vals.items())


def write_env_file(path: Path, result: dict[str, Any]) -> None:
    """Atomically: a unit never reads half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(env_lines(result))
    tmp.chmod(0o644)
    os.replace(tmp, path)


def remove_env_file(path: str | None) -> None:
    if path:
        Path(path).unlink(missing_ok=True)
