"""The env file handed to an application unit (EnvironmentFile=): what
attach did, never a secret; and the rules that keep it from touching files
that are not cephvol's.

Rules, because cephvol runs as root and the path comes from an operator:
- cephvol writes and deletes only files it wrote: the first line is
  `# Written by cephvol for <spec>` (systemd skips comment lines). A foreign
  file at the path is refused (exit 5), never overwritten, never deleted.
- A path another attached volume uses (its journal names it) is refused
  (exit 5): detaching one must not delete the other's file.
- The path follows the mountpoint rules (cephvol/mountpoint.py) for files:
  no symlink anywhere, no system tree, not inside the state directory; a
  directory, a FIFO or a path below a regular file is refused before
  anything is mapped (exit 2), so a bad path cannot leave a volume half attached.
- Writes are atomic (an O_EXCL|O_NOFOLLOW temp file, then link or rename
  within the checked directory): a unit never reads half a file, and no temp
  file is left behind on failure.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cephvol import hostfs, mountpoint
from cephvol.errors import CephvolError, Conflict, UsageError
from cephvol.hostfs import Mount
from cephvol.state import StateStore

MARKER = "# Written by cephvol for "


def marker(spec: object) -> str:
    return f"{MARKER}{spec}"


def env_lines(result: dict[str, Any]) -> str:
    """The variables, one NAME="value" per line; a value that cannot be put
    there unambiguously (newline, quote, backslash, $, `) is refused."""
    vals = {
        "CEPHVOL_IMAGE": result["image"],
        "CEPHVOL_DEVICE": result.get("device") or "",
        "CEPHVOL_MOUNTPOINT": result.get("mountpoint") or "",
        "CEPHVOL_BACKEND": result.get("backend") or "",
        "CEPHVOL_FSTYPE": result.get("fstype") or "",
        "CEPHVOL_READ_ONLY": "1" if result.get("read_only") else "0",
    }
    for k, v in vals.items():
        if any(c in v for c in "\n\r\"\\$`") or any(ord(c) < 0x20 for c in v):
            raise UsageError(f"cannot put {k}={v!r} into an env file")
    return "".join(f'{k}="{v}"\n' for k, v in vals.items())


def _used_by(path: Path, spec: object, store: StateStore | None) -> str | None:
    """The spec of another journalled volume whose env file is `path`."""
    if store is None:
        return None
    for key in store.keys():
        try:
            st = store.load(key)
        except (CephvolError, OSError, ValueError, TypeError, AttributeError):
            continue  # a damaged journal is reported where it is used, not here
        if st is None or st.spec == str(spec):
            continue
        extra = st.extra if isinstance(st.extra, dict) else {}
        if extra.get("env_file") == str(path):
            return str(st.spec)
    return None


def _first_line(parent_fd: int, name: str) -> str:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=parent_fd)
    except OSError:
        return ""
    try:
        return os.read(fd, 512).decode(errors="replace").split("\n", 1)[0]
    except OSError:
        return ""
    finally:
        os.close(fd)


def _existing(path: Path, parent_fd: int, name: str, spec: object,
              store: StateStore | None) -> bool:
    """Whether a file of ours is at the path (False: nothing there);
    raises for anything else there."""
    try:
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(st.st_mode):
        raise UsageError(f"--env-file {path} is a symlink; cephvol writes no file through "
                         "a link")
    if stat.S_ISDIR(st.st_mode):
        raise UsageError(f"--env-file {path} is a directory")
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"--env-file {path} exists and is not a regular file")
    first = _first_line(parent_fd, name)
    if not first.startswith(MARKER):
        raise Conflict(f"--env-file {path} exists and was not written by cephvol; not "
                       "overwriting it (remove it, or choose another path)")
    owner = first[len(MARKER):].strip()
    if owner != str(spec) and _used_by(path, spec, store) is not None:
        raise Conflict(f"--env-file {path} belongs to attached volume {owner}")
    return True


def _check_path(path: Path | str, state_dir: Path | None,
                mounts: Sequence[Mount] | None = None) -> Path:
    text = mountpoint.check_name(path, "--env-file")
    if text == "/":
        raise UsageError("--env-file '/' is a directory")
    if state_dir is not None and _top_level_env(text, state_dir):
        # the shipped units keep env files at /run/cephvol/NAME.env: a plain
        # NAME.env directly in the state dir is allowed, nothing deeper (the
        # journals, locks and the mapping daemons' mounts live below it)
        state_dir = None
    mountpoint.check_policy(text, state_dir, "--env-file", directory=False)
    # by identity too: below a bind mount of /etc or of the state directory
    # the file would land there, whatever its name says
    mountpoint.check_places(text, hostfs.read_mounts() if mounts is None else mounts,
                            state_dir, "--env-file", directory=False)
    return Path(text)


def _top_level_env(text: str, state_dir: Path) -> bool:
    parent, _, name = text.rpartition("/")
    return (name.endswith(".env") and not name.startswith(".")
            and parent in {str(state_dir), os.path.realpath(state_dir)})


def check(path: Path, spec: object, store: StateStore | None,
          state_dir: Path | None = None) -> None:
    """Before attach maps anything: can the env file be written here, and
    is it ours to write? Missing parent directories are fine (made later)."""
    p = _check_path(path, state_dir)
    other = _used_by(p, spec, store)
    if other:
        raise Conflict(f"--env-file {p} is the env file of attached volume {other}")
    opened = _open_parent(p, create=False)
    if opened is None:
        return  # the missing directories are made when it is written
    pfd, name = opened
    try:
        _existing(p, pfd, name, spec, store)
    finally:
        os.close(pfd)


def _open_parent(p: Path, *, create: bool) -> tuple[int, str] | None:
    try:
        return mountpoint.open_parent(p, "--env-file", create=create)
    except Conflict as exc:
        # a regular file on the way: a usage error like a directory at the path
        raise UsageError(exc.message) from exc


def write(path: Path, spec: object, result: dict[str, Any], store: StateStore | None = None,
          state_dir: Path | None = None) -> None:
    """Write (or replace our own) env file atomically."""
    p = _check_path(path, state_dir)
    body = f"{marker(spec)}\n{env_lines(result)}".encode()
    opened = _open_parent(p, create=True)
    assert opened is not None
    pfd, name = opened
    tmp = f".{name}.{os.getpid()}.tmp"[:mountpoint.NAME_MAX]
    try:
        ours = _existing(p, pfd, name, spec, store)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(tmp, flags, 0o644, dir_fd=pfd)
        except FileExistsError:  # left by a killed cephvol with our pid
            os.unlink(tmp, dir_fd=pfd)
            fd = os.open(tmp, flags, 0o644, dir_fd=pfd)
        try:
            try:
                os.write(fd, body)
                os.fchmod(fd, 0o644)
            finally:
                os.close(fd)
            if ours:
                os.rename(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)
            else:
                # link() never replaces: a file that appeared since the
                # check is not overwritten
                try:
                    os.link(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)
                except FileExistsError as exc:
                    raise Conflict(f"--env-file {p} appeared while cephvol wrote it; "
                                   "not overwriting it") from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=pfd)
    except OSError as exc:
        raise UsageError(f"cannot write --env-file {p}: {exc.strerror or exc}") from exc
    finally:
        os.close(pfd)


def remove(path: str | os.PathLike[str] | None, spec: object) -> str:
    """Delete the env file if it is ours and for this volume; never raises,
    because detach must finish even when someone has replaced the file.
    Returns what happened: "removed", "absent", "kept: <why>"."""
    if not path:
        return "absent"
    try:
        opened = mountpoint.open_parent(Path(path), "--env-file")
    except CephvolError as exc:
        return f"kept: {exc.message}"
    except OSError as exc:
        return f"kept: {exc.strerror}"
    if opened is None:
        return "absent"
    pfd, name = opened
    try:
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return "absent"
        if not stat.S_ISREG(st.st_mode):
            return "kept: not a regular file"
        if _first_line(pfd, name) != marker(spec):
            return "kept: not written by cephvol for this volume"
        os.unlink(name, dir_fd=pfd)
        return "removed"
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return "absent"
        return f"kept: {exc.strerror}"
    finally:
        os.close(pfd)
