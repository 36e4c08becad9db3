"""Where cephvol may mount, and how it opens the place without following links.

Policy: no symlink anywhere in a mountpoint path. The journal, the units and
the containers all refer to the path as a string; a link would let attach
and detach (or the container) see different places, and a link swapped in
between the check and the mount could send a volume over /etc. So every
existing component is checked with lstat and opened with O_NOFOLLOW from its
parent's descriptor, missing directories are made the same way (mkdirat,
0755), and the mount itself goes through the final descriptor
(cephvol/_os/mountapi.py). systemd's mount units make the same choice
(a Where= containing a symlink is refused).

Refused places, however they are reached (a bind mount of /etc is /etc):
`/`, the system trees (SYSTEM_TREES) and everything below them, the top-level
directories themselves (SYSTEM_DIRS) but not what is below them, cephvol's
state directory (its rbd-fuse mounts live there) with everything below it and
every directory above it (a mount there would hide it), a path that is
already a mountpoint, and a path through a non-directory.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import stat
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from cephvol.errors import Busy, Conflict, UsageError
from cephvol.hostfs import Mount

SYSTEM_TREES = ("/proc", "/sys", "/dev", "/boot", "/etc", "/usr", "/bin", "/sbin", "/lib",
                "/lib32", "/lib64", "/libx32")
SYSTEM_DIRS = ("/", "/var", "/run", "/home", "/root", "/tmp", "/srv", "/mnt", "/media", "/opt",
               "/var/lib", "/var/tmp", "/var/log")
PATH_MAX = 4096  # bytes including the terminating NUL
NAME_MAX = 255

_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def check_name(path: PurePosixPath | str, what: str = "mountpoint") -> str:
    """Lexical rules: absolute, normalised, within PATH_MAX and NAME_MAX."""
    p = PurePosixPath(path)
    if not p.is_absolute() or ".." in p.parts:
        raise UsageError(f"invalid {what} {str(path)!r}: must be an absolute path without '..'")
    text = "/" + "/".join(p.parts[1:])  # also folds a leading "//"
    if len(os.fsencode(text)) >= PATH_MAX:
        raise UsageError(f"invalid {what}: longer than {PATH_MAX - 1} bytes")
    if any(len(os.fsencode(part)) > NAME_MAX for part in p.parts[1:]):
        raise UsageError(f"invalid {what}: a path component is longer than {NAME_MAX} bytes")
    if any(ord(c) < 0x20 or c == "\x7f" for c in text):
        raise UsageError(f"invalid {what}: control characters in the path")
    return text


def check_policy(path: PurePosixPath | str, state_dir: Path | None, what: str = "mountpoint",
                 *, directory: bool = True) -> None:
    """The refused places, by name. `directory=False` is for a file (an env
    file): only the system trees and the state directory apply."""
    text = check_name(path, what)
    for top in SYSTEM_TREES:
        if _under(text, top):
            raise UsageError(f"refusing {what} {text}: {top} is a system directory")
    if directory and text in SYSTEM_DIRS:
        raise UsageError(f"refusing {what} {text}: a system directory itself")
    if state_dir is not None:
        for sd in {str(state_dir), os.path.realpath(state_dir)}:
            if _under(text, sd):
                raise UsageError(f"refusing {what} {text}: inside cephvol's state "
                                 f"directory {sd}")
            if directory and _under(sd, text):
                raise UsageError(f"refusing {what} {text}: it would hide cephvol's state "
                                 f"directory {sd}")


def _place(path: str, mounts: Sequence[Mount]) -> tuple[tuple[int, int], str] | None:
    """(device, path inside that filesystem) of a link-free absolute path:
    how a bind mount is told apart from the place it shows."""
    best: Mount | None = None
    for m in mounts:  # later lines are mounted on top of earlier ones
        if _under(path, m.mountpoint) and (best is None
                                           or len(m.mountpoint) >= len(best.mountpoint)):
            best = m
    if best is None:
        return None
    rest = path[len(best.mountpoint):].lstrip("/")
    return best.devnum, posixpath.normpath(posixpath.join(best.root, rest))


def check_places(path: str, mounts: Sequence[Mount], state_dir: Path | None,
                 what: str = "mountpoint", *, directory: bool = True) -> None:
    """The refused places by identity: the same filesystem and the same path
    inside it as a system directory (a bind mount of /etc, or of /), or the
    state directory."""
    target = _place(path, mounts)
    if target is None:
        return
    refused: list[tuple[str, bool]] = [(t, True) for t in SYSTEM_TREES]
    if directory:
        refused += [(d, False) for d in SYSTEM_DIRS]
    if state_dir is not None:
        refused.append((str(state_dir), True))
    for name, tree in refused:
        if not os.path.lexists(name):
            continue
        real = os.path.realpath(name)
        place = _place(real, mounts)
        if place is None or place[0] != target[0]:
            continue
        if (target[1] == place[1]) or (tree and _under(target[1], place[1])):
            shown = f"{name} (through a bind mount)" if not _under(path, real) else name
            raise UsageError(f"refusing {what} {path}: it is {shown}"
                             if target[1] == place[1] else
                             f"refusing {what} {path}: it is inside {shown}")


def _walk(path: str, what: str, *, create: bool, stop_at_missing: bool,
          named: str | None = None) -> tuple[int, list[str]]:
    """Open `path` component by component, never following a link.

    Returns (descriptor of the deepest directory opened, names still
    missing below it). With `create`, missing directories are made (0755)
    and the whole path is opened; what was made is removed again when a
    later step fails, so a refusal leaves the host as it was. Refusals name
    `named` (the file whose parent is walked), else `path`."""
    whole = named or path
    parts = PurePosixPath(path).parts[1:]
    fd = os.open("/", _DIR_FLAGS)
    made: list[tuple[int, str]] = []  # (parent fd, kept open; name) of dirs made here
    kept: set[int] = set()
    result: int | None = None
    try:
        for i, name in enumerate(parts):
            shown = "/" + "/".join(parts[: i + 1])
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                if not create:
                    if stop_at_missing:
                        result = fd
                        return fd, list(parts[i:])
                    raise
                try:
                    os.mkdir(name, 0o755, dir_fd=fd)
                    made.append((fd, name))
                    kept.add(fd)
                except FileExistsError:
                    pass  # made meanwhile: the open below checks what it is
                except OSError as exc:
                    raise _refusal(whole, shown, what, exc) from exc
            except OSError as exc:
                raise _refusal(whole, shown, what, exc) from exc
            else:
                _check_kind(whole, shown, what, st.st_mode)
            try:
                nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    _check_kind(whole, shown, what,
                                os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode)
                raise _refusal(whole, shown, what, exc) from exc
            if fd not in kept:
                os.close(fd)
            fd = nfd
        result = fd
        return fd, []
    except BaseException:
        for parent, name in reversed(made):
            with contextlib.suppress(OSError):
                os.rmdir(name, dir_fd=parent)
        raise
    finally:
        for k in kept | {fd}:
            if k != result:
                os.close(k)


def _check_kind(path: str, shown: str, what: str, mode: int) -> None:
    if stat.S_ISLNK(mode):
        raise UsageError(f"refusing {what} {path}: {shown} is a symlink (cephvol follows no "
                         "links in this path; give the real path)")
    if not stat.S_ISDIR(mode):
        raise Conflict(f"{what} {path}: {shown} exists and is not a directory")


def _refusal(path: str, shown: str, what: str, exc: OSError) -> Exception:
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        return UsageError(f"refusing {what} {path}: {shown} changed into a link or a file "
                          "while it was checked")
    if exc.errno in (errno.ENAMETOOLONG,):
        return UsageError(f"invalid {what}: the path is too long")
    return Conflict(f"{what} {path}: cannot use {shown}: {exc.strerror or exc}")


def _is_mountpoint(path: str, fd: int, mounts: Sequence[Mount]) -> bool:
    if any(m.mountpoint == path for m in mounts):
        return True
    try:
        parent = os.stat("..", dir_fd=fd, follow_symlinks=False)
        return os.fstat(fd).st_dev != parent.st_dev
    except OSError:
        return False


def check(path: PurePosixPath | str, mounts: Sequence[Mount], state_dir: Path | None) -> None:
    """Everything that can be known before creating anything: attach asks
    this before it maps, so a refused mountpoint changes nothing."""
    text = check_name(path)
    check_policy(text, state_dir)
    check_places(text, mounts, state_dir)
    fd, missing = _walk(text, "mountpoint", create=False, stop_at_missing=True)
    try:
        if not missing and _is_mountpoint(text, fd, mounts):
            raise Busy(f"{text} is already a mountpoint of something else")
    finally:
        os.close(fd)


def open_dir(path: PurePosixPath | str, mounts: Sequence[Mount], state_dir: Path | None,
             *, create: bool) -> int:
    """The checked mountpoint as an O_PATH descriptor to mount through;
    with `create`, missing directories are made without following links.
    The caller closes it."""
    text = check_name(path)
    check_policy(text, state_dir)
    check_places(text, mounts, state_dir)
    try:
        fd, _ = _walk(text, "mountpoint", create=create, stop_at_missing=False)
    except FileNotFoundError as exc:
        raise Conflict(f"mountpoint {text} does not exist (any more)") from exc
    if _is_mountpoint(text, fd, mounts):
        os.close(fd)
        raise Busy(f"{text} is already a mountpoint of something else")
    return fd


def open_parent(path: PurePosixPath | str, what: str = "path", *, create: bool = False
                ) -> tuple[int, str] | None:
    """The parent directory of `path` as a descriptor (no link followed) and
    the last name; None when the parent does not exist (and not `create`)."""
    p = PurePosixPath(check_name(path, what))
    try:
        fd, missing = _walk(str(p.parent), what, create=create, stop_at_missing=not create,
                            named=str(p))
    except FileNotFoundError:
        return None
    if missing:
        os.close(fd)
        return None
    return fd, p.name
