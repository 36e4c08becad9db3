"""The Docker Volume Plugin protocol as plain functions: request JSON in,
response JSON out, over the same library calls the CLI makes.

Why no HTTP here: the protocol's rules (names, options, Mount IDs, what
Remove may do) are tested without a socket, and the socket edge
(server.py) stays a few lines that only move bytes.

Semantics (README "Docker/Podman volume plugin"):
- a volume NAME is the image POOL[/NAMESPACE]/NAME (pool `rbd` unless
  `-o pool=`); Create checks its options like the CLI checks its flags,
  creates the image when `-o size=` is given (else the image must exist),
  and records the options in DATA_DIR/volumes/NAME.json (persistent: Docker
  keeps its volumes across reboots, so the plugin must too);
- Mount is `cephvol attach` at MOUNT_ROOT/NAME; every Mount ID is recorded
  in RUN_DIR/mounts/NAME.json (on /run: the mounts, and so their IDs, end at
  reboot), so two containers share one mapping, a plugin restart keeps the
  count, and the last Unmount runs `cephvol detach`;
- Remove never destroys data silently: refused while mounted, attached or
  mapped here, owned by any host or watched by any client; it deletes the
  image only for a volume created with `-o delete-on-remove=true`, else it
  forgets the plugin's record and the image stays.
Errors say which cephvol exit code they are: "cephvol exit 6: ...".
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cephvol import fs, lifecycle
from cephvol.cluster import Cluster
from cephvol.errors import (
    Busy,
    CephvolError,
    Conflict,
    ExitCode,
    NotFound,
    Owned,
    SystemCommandError,
    UsageError,
)
from cephvol.mapper import BACKEND_NAMES, MapOptions
from cephvol.spec import DEFAULT_POOL, ImageSpec, format_size, parse_size, parse_spec
from cephvol.state import NotRegularFile, StateStore, read_regular, write_json

log = logging.getLogger("cephvol")

# Docker's default discovery path: dockerd finds a plugin by its socket here
DEFAULT_SOCKET = Path("/run/docker/plugins/cephvol.sock")
DEFAULT_DATA_DIR = Path("/var/lib/cephvol/plugin")
CONTENT_TYPE = "application/vnd.docker.plugins.v1.2+json"
RECORD_VERSION = 1

# the image-name rule of cephvol/spec.py: a volume name is an image name
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,95}", re.ASCII)
_MOUNT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,255}", re.ASCII)
_MKFS_TOKEN = re.compile(r"[A-Za-z0-9_=,.:+^-]+", re.ASCII)
_MOUNT_OPTION = re.compile(r"[A-Za-z0-9_=-]+", re.ASCII)
_NOT_FS_OPTIONS = ("source", "bind", "rbind", "move", "remount", "loop")
_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")
_BOOLS = ("read-only", "exclusive", "delete-on-remove")
# every `-o` a volume takes; anything else is refused, never ignored
OPTIONS = ("size", "pool", "namespace", "fstype", "backend", "read-only", "exclusive",
           "mkfs-option", "mount-option", "fsck", "delete-on-remove", "owner")
MAX_VALUE = 1024


@dataclass(frozen=True)
class PluginPaths:
    """Where the plugin keeps what it knows; roots are parameters so tests
    (and a second plugin instance) use their own."""

    data_dir: Path  # volume records: persistent
    mount_root: Path  # MOUNT_ROOT/NAME is each volume's mountpoint
    run_dir: Path  # Mount IDs and per-volume locks: as volatile as the mounts

    @classmethod
    def defaults(cls, state_dir: Path, data_dir: Path | None = None,
                 mount_root: Path | None = None) -> PluginPaths:
        data = data_dir or DEFAULT_DATA_DIR
        return cls(data, mount_root or data / "mnt", state_dir / "plugin")


@dataclass
class VolumeOptions:
    """A volume's `-o` options, checked and parsed."""

    pool: str = DEFAULT_POOL
    namespace: str = ""
    size: int | None = None
    fstype: str | None = None
    backend: str = "auto"
    read_only: bool = False
    exclusive: bool | None = None
    mkfs_options: list[str] = field(default_factory=list)
    mount_options: list[str] = field(default_factory=list)
    fsck: str = "auto"
    delete_on_remove: bool = False
    owner: tuple[int, int] | None = None  # of a new filesystem's root (first mkfs only)


def error_text(exc: CephvolError) -> str:
    """The Err string: the exit code the CLI would have ended with, then its
    one-line message (no traceback, no secret: messages never hold keys)."""
    return f"cephvol exit {int(exc.exit_code)}: {' '.join(str(exc).split())}"


def check_name(value: Any) -> str:
    if value is None or value == "":
        raise UsageError("missing Name")
    if not isinstance(value, str):
        raise UsageError("Name must be a string")
    if not _NAME.fullmatch(value):
        raise UsageError(f"invalid volume name {_show(value)}: 1-96 letters, digits, '_', "
                         "'.', '+', '-', not starting with '.', '+' or '-' (it is the "
                         "image's name)")
    return value


def check_mount_id(value: Any) -> str:
    if value is None or value == "":
        raise UsageError("missing ID")
    if not isinstance(value, str) or not _MOUNT_ID.fullmatch(value):
        raise UsageError(f"invalid mount ID {_show(value)}")
    return value


def _show(value: Any) -> str:
    """A value quoted for an error message, cut short (it came from a client)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _bool(key: str, value: str) -> bool:
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise UsageError(f"option {key}={_show(value)}: expected true or false")


def parse_options(name: str, raw: Any) -> VolumeOptions:
    """Check `-o` options as the CLI checks its flags; unknown ones are
    refused (a typo must not silently become a default)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UsageError("Opts must be an object of strings")
    o = VolumeOptions()
    for key, value in raw.items():
        if key not in OPTIONS:
            raise UsageError(f"unknown option {_show(key)}; known: {', '.join(OPTIONS)}")
        if not isinstance(value, str):
            raise UsageError(f"option {key} must be a string")
        if len(value) > MAX_VALUE or any(ord(c) < 0x20 or c == "\x7f" for c in value):
            raise UsageError(f"option {key}: control characters or longer than {MAX_VALUE}")
        if key in _BOOLS:
            setattr(o, key.replace("-", "_"), _bool(key, value))
        elif key == "size":
            o.size = parse_size(value)
        elif key in ("pool", "namespace"):
            if "/" in value or "@" in value or (key == "pool" and not value):
                raise UsageError(f"option {key}={_show(value)}: one name, no '/' or '@'")
            setattr(o, key, value)
        elif key == "fstype":
            o.fstype = fs.validate_fstype(value)
        elif key == "backend":
            if value not in ("auto", *BACKEND_NAMES):
                raise UsageError(f"option backend={_show(value)}: choose auto, "
                                 f"{', '.join(BACKEND_NAMES)}")
            o.backend = value
        elif key == "fsck":
            if value not in fs.FSCK_MODES:
                raise UsageError(f"option fsck={_show(value)}: choose "
                                 f"{', '.join(fs.FSCK_MODES)}")
            o.fsck = value
        elif key == "mkfs-option":
            o.mkfs_options = _mkfs_options(value)
        elif key == "mount-option":
            o.mount_options = _mount_options(value)
        elif key == "owner":
            o.owner = fs.parse_owner(value, "option owner")
    if o.owner is not None and o.read_only:
        raise UsageError("option owner sets the owner of a new filesystem's root; a "
                         "read-only volume never gets one")
    image_spec(name, o)  # pool and namespace checked as parts of a spec
    MapOptions(read_only=o.read_only, exclusive=o.exclusive).validate()
    return o


def _mkfs_options(value: str) -> list[str]:
    """Whitespace-separated mkfs arguments: flags and their values only. A
    bare word that follows no short flag would be read by mkfs as the device
    to format, and no argument may name a path."""
    out: list[str] = []
    takes_value = False
    for tok in value.split():
        if not _MKFS_TOKEN.fullmatch(tok):
            raise UsageError(f"mkfs-option {_show(tok)}: letters, digits and _=,.:+^- only")
        if tok.startswith("-"):
            takes_value = len(tok) == 2
        elif takes_value:
            takes_value = False
        else:
            raise UsageError(f"mkfs-option {_show(tok)}: a bare argument (mkfs would take "
                             "it for the device); give flags, e.g. '-E stride=16'")
        out.append(tok)
    return out


def _mount_options(value: str) -> list[str]:
    """The CLI's --mount-option rules (cephvol/cli.py attach)."""
    out = [o for o in value.split(",") if o]
    for o in out:
        if not _MOUNT_OPTION.fullmatch(o):
            raise UsageError(f"invalid mount option {_show(o)}")
        if o.partition("=")[0] in _NOT_FS_OPTIONS:
            raise UsageError(f"mount option {_show(o)} is not a filesystem option; cephvol "
                             "chooses what is mounted where")
    return out


def image_spec(name: str, o: VolumeOptions) -> ImageSpec:
    ns = f"{o.namespace}/" if o.namespace else ""
    return parse_spec(f"{o.pool}/{ns}{name}", allow_snap=False)


class Plugin:
    """The plugin's answers. `handle(endpoint, request)` never raises: every
    failure becomes {"Err": "cephvol exit N: ..."}; the library underneath
    is the CLI's, so ownership, the journal, mkfs-only-when-empty and
    flush-before-unmap are the same."""

    def __init__(self, host: lifecycle.Host, paths: PluginPaths) -> None:
        self.host = host
        self.paths = paths
        self._locks = StateStore(paths.run_dir)  # flock per volume: threads and processes
        self.endpoints: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "Plugin.Activate": self.activate,
            "VolumeDriver.Create": self.create,
            "VolumeDriver.Remove": self.remove,
            "VolumeDriver.Mount": self.mount,
            "VolumeDriver.Unmount": self.unmount,
            "VolumeDriver.Path": self.path,
            "VolumeDriver.Get": self.get,
            "VolumeDriver.List": self.list,
            "VolumeDriver.Capabilities": self.capabilities,
        }

    def handle(self, endpoint: str, request: Any) -> dict[str, Any]:
        fn = self.endpoints.get(endpoint)
        try:
            if fn is None:
                raise NotFound(f"unknown endpoint {_show(endpoint)}")
            if request is None:
                request = {}
            if not isinstance(request, dict):
                raise UsageError("the request must be a JSON object")
            res = fn(request)
        except CephvolError as exc:
            res = {"Err": error_text(exc)}
        except Exception as exc:  # a bug must reach Docker as an answer, not a hang
            log.debug("plugin internal error", exc_info=True)
            res = {"Err": f"cephvol exit {int(ExitCode.INTERNAL)}: internal error: "
                          f"{type(exc).__name__}: {' '.join(str(exc).split())}"}
        if res.get("Err"):
            log.warning("plugin %s %s: %s", endpoint, _show(request.get("Name"))
                        if isinstance(request, dict) else "-", res["Err"])
        else:
            log.info("plugin %s %s: ok", endpoint, _show(request.get("Name"))
                     if isinstance(request, dict) else "-")
        return res

    # -- endpoints ---------------------------------------------------------------

    def activate(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"Implements": ["VolumeDriver"]}

    def capabilities(self, req: dict[str, Any]) -> dict[str, Any]:
        # global: the volume is the cluster's, the same on every host (Swarm
        # creates it once); cephvol's ownership keeps it on one writer
        return {"Capabilities": {"Scope": "global"}}

    def create(self, req: dict[str, Any]) -> dict[str, Any]:
        name = check_name(req.get("Name"))
        raw = req.get("Opts") or {}
        o = parse_options(name, raw)
        spec = image_spec(name, o)
        with self._lock(name):
            rec = self._load(name)
            if rec is not None:
                if raw and rec["options"] != raw:
                    raise Conflict(f"volume {name} exists with other options "
                                   f"({_opts_text(rec['options'])}); remove it first")
                return {"Err": ""}
            if o.size is not None:
                res = lifecycle.create(self.host.cfg, spec, o.size)
                if "warning" in res:
                    log.warning("plugin: %s", res["warning"])
            else:
                try:
                    with Cluster(self.host.cfg) as c:
                        c.image_info(spec)
                except NotFound as exc:
                    if not exc.message.startswith(f"image {spec}"):
                        raise
                    raise NotFound(f"{exc.message}; give -o size=SIZE (e.g. 10G) to create "
                                   "it") from exc
            self._save(self._record_path(name), {
                "version": RECORD_VERSION, "name": name, "image": str(spec),
                "options": dict(raw), "created": time.time()})
        return {"Err": ""}

    def remove(self, req: dict[str, Any]) -> dict[str, Any]:
        name = check_name(req.get("Name"))
        with self._lock(name):
            spec, o = self._volume(name)
            ids = self._ids(name)
            if ids:
                raise Busy(f"volume {name} is mounted by {len(ids)} container(s) "
                           f"({', '.join(sorted(ids))[:80]}); stop them first")
            here = [r for r in lifecycle.status(self.host) if r["image"] == str(spec)]
            if here:
                raise Busy(f"{spec} is {here[0]['phase']} on this host (device "
                           f"{here[0]['device'] or '-'}); `cephvol detach {spec}` first")
            if o.delete_on_remove:
                with contextlib.suppress(NotFound):  # already gone: what was asked
                    lifecycle.remove(self.host, spec)
            else:
                self._refuse_if_used(spec)
            self._record_path(name).unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # only an empty, unmounted directory
                (self.paths.mount_root / name).rmdir()
        return {"Err": ""}

    def mount(self, req: dict[str, Any]) -> dict[str, Any]:
        name = check_name(req.get("Name"))
        mid = check_mount_id(req.get("ID"))
        with self._lock(name):
            spec, o = self._volume(name)
            mp = self.paths.mount_root / name
            lifecycle.attach(self.host, lifecycle.AttachRequest(
                spec=spec, mountpoint=mp, backend=o.backend,
                options=MapOptions(read_only=o.read_only, exclusive=o.exclusive),
                fstype=o.fstype, mkfs_options=o.mkfs_options, fsck=o.fsck,
                mount_options=o.mount_options, owner=o.owner))
            ids = self._ids(name)
            if mid not in ids:  # the same ID twice is one mount (Docker may retry)
                ids[mid] = time.time()
                self._save(self._ids_path(name), {"version": RECORD_VERSION, "ids": ids})
        return {"Mountpoint": str(mp), "Err": ""}

    def unmount(self, req: dict[str, Any]) -> dict[str, Any]:
        name = check_name(req.get("Name"))
        mid = check_mount_id(req.get("ID"))
        with self._lock(name):
            spec, _ = self._volume(name)
            ids = self._ids(name)
            if mid not in ids:
                raise NotFound(f"volume {name} has no mount with ID {_show(mid)}")
            del ids[mid]
            self._save(self._ids_path(name), {"version": RECORD_VERSION, "ids": ids})
            if not ids:
                try:
                    lifecycle.detach(self.host, spec)
                except CephvolError as exc:
                    raise type(exc)(f"{exc.message}; volume {name} has no container left "
                                    f"but stays attached: `cephvol detach {spec}` finishes "
                                    "it") from exc
        return {"Err": ""}

    def path(self, req: dict[str, Any]) -> dict[str, Any]:
        name = check_name(req.get("Name"))
        self._volume(name)
        return {"Mountpoint": self._mountpoint(name), "Err": ""}

    def get(self, req: dict[str, Any]) -> dict[str, Any]:
        name = check_name(req.get("Name"))
        rec = self._load(name)
        if rec is None:
            raise NotFound(f"no volume named {name}")
        o = parse_options(name, rec["options"])
        status = {"image": rec["image"], "options": rec["options"],
                  "mounts": len(self._ids(name)),
                  "on_remove": "delete the image" if o.delete_on_remove
                  else "forget the volume, keep the image"}
        if o.size is not None:
            status["size"] = format_size(o.size)
        return {"Volume": {"Name": name, "Mountpoint": self._mountpoint(name),
                           "Status": status}, "Err": ""}

    def list(self, req: dict[str, Any]) -> dict[str, Any]:
        vols = []
        try:
            names = sorted(p.name[:-5] for p in (self.paths.data_dir / "volumes").glob("*.json"))
        except OSError:
            names = []
        for name in names:
            if _NAME.fullmatch(name):
                vols.append({"Name": name, "Mountpoint": self._mountpoint(name)})
        return {"Volumes": vols, "Err": ""}

    # -- records -----------------------------------------------------------------

    @contextlib.contextmanager
    def _lock(self, name: str) -> Iterator[None]:
        """One lock per volume (flock, so also against a second plugin
        process): Mounts of different volumes never wait for each other."""
        with self._locks.lock(f"plugin-{name}"):
            yield

    def _record_path(self, name: str) -> Path:
        return self.paths.data_dir / "volumes" / f"{name}.json"

    def _ids_path(self, name: str) -> Path:
        return self.paths.run_dir / "mounts" / f"{name}.json"

    def _volume(self, name: str) -> tuple[ImageSpec, VolumeOptions]:
        rec = self._load(name)
        if rec is None:
            raise NotFound(f"no volume named {name}; create it with "
                           f"`docker volume create -d cephvol {name}`")
        o = parse_options(name, rec["options"])
        return image_spec(name, o), o

    def _load(self, name: str) -> dict[str, Any] | None:
        rec = _read_json(self._record_path(name))
        if rec is None:
            return None
        if (not isinstance(rec.get("options"), dict) or rec.get("name") != name
                or not isinstance(rec.get("image"), str)):
            raise Conflict(f"the plugin's record {self._record_path(name)} is damaged; "
                           "remove it and create the volume again (the image stays)")
        return rec

    def _ids(self, name: str) -> dict[str, float]:
        rec = _read_json(self._ids_path(name)) or {}
        ids = rec.get("ids", {})
        if not isinstance(ids, dict):
            raise Conflict(f"the plugin's mount record {self._ids_path(name)} is damaged")
        return ids

    def _mountpoint(self, name: str) -> str:
        return str(self.paths.mount_root / name) if self._ids(name) else ""

    def _save(self, path: Path, data: dict[str, Any]) -> None:
        write_json(path, data)  # whole or not at all, as the journal

    def _refuse_if_used(self, spec: ImageSpec) -> None:
        """What Remove checks before it forgets a volume whose image stays:
        the image may be gone already (then there is nothing to protect)."""
        try:
            res = lifecycle.owner(self.host, spec)
            if res["owner"]:
                raise Owned(f"{spec} is owned by host {res['owner'].get('host', '?')} "
                            f"(id {res['owner'].get('host_id', '?')}); detach it there first")
            with Cluster(self.host.cfg) as c:
                watchers = c.watchers(spec)
        except NotFound:
            return
        if watchers:
            raise Busy(f"{spec} is in use by {', '.join(w.get('addr', '?') for w in watchers)}"
                       "; not forgetting it")


def _opts_text(opts: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(opts.items())) or "no options"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        raw = read_regular(path)
    except NotRegularFile as exc:
        raise Conflict(f"the plugin's record {path} is not a regular file; remove it") from exc
    except OSError as exc:
        raise SystemCommandError(f"cannot read {path}: {exc.strerror}") from exc
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise Conflict(f"the plugin's record {path} is damaged; remove it") from exc
    if not isinstance(data, dict):
        raise Conflict(f"the plugin's record {path} is damaged; remove it")
    return data



