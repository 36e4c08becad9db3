"""Running under systemd: where log records go, and telling systemd how far
attach got.

Under a unit, cephvol's steps go to the journal as structured entries
(VOLUME, DEVICE, BACKEND, MOUNTPOINT, STEP), so `journalctl VOLUME=rbd/pg`
shows one volume's whole history across units, hosts' restarts and the
attach/detach pair; run by hand, cephvol stays quiet on stderr unless
--debug. Nothing here ever sees a secret: callers pass names, devices and
paths only.

systemd-python is imported only on these paths (it costs start-up time and
is absent on some hosts: then the journal is simply not used).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("cephvol")
FIELDS = ("VOLUME", "DEVICE", "BACKEND", "MOUNTPOINT", "STEP")
JOURNAL_SOCKET = Path("/run/systemd/journal/socket")
_STDERR_FORMAT = "cephvol: %(message)s"


def stderr_is_journal(env: Mapping[str, str], fd: int = 2) -> bool:
    """systemd.exec(5): JOURNAL_STREAM=DEV:INODE names the stream our stderr
    was connected to; it is only ours if stderr is still that stream."""
    raw = env.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in raw.split(":"))
        st = os.fstat(fd)
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def use_journal(env: Mapping[str, str], socket: Path = JOURNAL_SOCKET) -> bool:
    """Log to the journal when run by systemd (our stderr is its stream, or
    INVOCATION_ID says we are in a unit) and the journal is there.
    CEPHVOL_LOG=stderr|journal overrides."""
    choice = env.get("CEPHVOL_LOG", "auto")
    if choice == "stderr":
        return False
    if choice != "journal" and not (stderr_is_journal(env) or env.get("INVOCATION_ID")):
        return False
    if not socket.exists():
        return False
    try:
        import systemd.journal  # noqa: F401
    except ImportError:
        return False
    return True


def configure(debug: bool, env: Mapping[str, str] | None = None) -> str:
    """Set up cephvol's logger; returns "journal" or "stderr"."""
    env = os.environ if env is None else env
    log.handlers.clear()
    log.propagate = False
    handler: logging.Handler
    if use_journal(env):
        from systemd.journal import JournalHandler

        handler = JournalHandler(SYSLOG_IDENTIFIER="cephvol")
        log.setLevel(logging.DEBUG if debug else logging.INFO)
        where = "journal"
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_STDERR_FORMAT))
        log.setLevel(logging.DEBUG if debug else logging.WARNING)
        where = "stderr"
    log.addHandler(handler)
    return where


def event(step: str, volume: str, message: str, *, device: str | None = None,
          backend: str | None = None, mountpoint: str | None = None,
          level: int = logging.INFO, **more: Any) -> None:
    """One step of one volume, as a journal entry with fields (or a line
    with --debug on stderr)."""
    fields = {"STEP": step, "VOLUME": volume, "DEVICE": device, "BACKEND": backend,
              "MOUNTPOINT": mountpoint, **{k.upper(): v for k, v in more.items()}}
    log.log(level, message, extra={k: str(v) for k, v in fields.items() if v is not None})


def notify(status: str, *, ready: bool = False, env: Mapping[str, str] | None = None) -> bool:
    """sd_notify(3) STATUS= (and READY=1), only when systemd asked for it
    (NOTIFY_SOCKET is set for Type=notify units): a no-op otherwise."""
    env = os.environ if env is None else env
    if not env.get("NOTIFY_SOCKET"):
        return False
    try:
        from systemd import daemon
    except ImportError:
        return False
    text = f"STATUS={' '.join(status.split())}"
    if ready:
        text = "READY=1\n" + text
    return bool(daemon.notify(text))


def own_scope_argv(what: str, run_root: Path = Path("/run/systemd/system")) -> list[str]:
    """Prefix for starting a daemon a mapping lives on (rbd-fuse, rbd-nbd).

    Under systemd such a daemon must not stay in the cgroup of the unit that
    ran `cephvol attach`: when that unit stops, systemd kills every process
    in its cgroup *before* ExecStopPost= runs `cephvol detach` -- the device
    would vanish under a mounted filesystem with writes still queued (found
    by the systemd-nspawn test). In a scope of its own it lives, like a krbd
    mapping, until detach unmaps it. DefaultDependencies=no keeps the scope
    out of the shutdown transaction (a scope normally conflicts with
    shutdown.target and would be stopped alongside, not after, the units
    whose ExecStopPost= and cephvol-cleanup.service's ExecStop= detach; the
    nspawn shutdown test left both loop devices behind without it): the
    daemon stays until everything was detached, like a kernel mapping.
    Without systemd as PID 1: no prefix.
    """
    if not run_root.is_dir() or not shutil.which("systemd-run"):
        return []
    return ["systemd-run", "--scope", "--quiet", "--collect",
            "--property=DefaultDependencies=no",
            f"--unit=cephvol-{what}-{uuid.uuid4().hex[:8]}",
            f"--description=cephvol mapping daemon ({what})"]
