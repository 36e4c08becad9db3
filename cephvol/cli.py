"""The `cephvol` command: parse, call the library, print. Nothing else lives here."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from cephvol import __version__
from cephvol.errors import CephvolError, ExitCode, UsageError

log = logging.getLogger("cephvol")
_log_target = "stderr"  # or "journal" once the group callback ran under systemd


class Ctx:
    def __init__(self, conf: str | None, client_id: str | None, timeout: float | None,
                 state_dir: str | None) -> None:
        self._conf, self._id, self._timeout, self._state_dir = conf, client_id, timeout, state_dir

    def cfg(self) -> Any:
        from cephvol.cluster import ClusterConfig

        return ClusterConfig.from_env(self._conf, self._id, self._timeout)

    def host(self) -> Any:
        from cephvol.lifecycle import Host
        from cephvol.mapper import HostPaths
        from cephvol.state import state_dir_from_env

        return Host(self.cfg(), HostPaths(state_dir_from_env(self._state_dir)))


def _emit(data: Any, as_json: bool, text: str) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
    else:
        click.echo(text)


def _spec(text: str, allow_snap: bool = True) -> Any:
    from cephvol.spec import parse_spec

    return parse_spec(text, allow_snap=allow_snap)


json_opt = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cephvol")
@click.option("-c", "--conf", envvar="CEPH_CONF", help="ceph.conf [$CEPH_CONF]")
@click.option("--id", "client_id", envvar="CEPHVOL_ID", help="cephx user without 'client.' [admin]")
@click.option("--connect-timeout", type=float, envvar="CEPHVOL_CONNECT_TIMEOUT",
              help="Seconds to wait for the cluster [15].")
@click.option("--state-dir", envvar="CEPHVOL_STATE_DIR", help="State directory [/run/cephvol].")
@click.option("--debug", is_flag=True, help="Log every step to stderr.")
@click.pass_context
def cli(ctx: click.Context, conf: str | None, client_id: str | None,
        connect_timeout: float | None, state_dir: str | None, debug: bool) -> None:
    """Ceph RBD volumes for containers: map, mount, hand over, unmount, unmap."""
    from cephvol import supervisor

    global _log_target
    _log_target = supervisor.configure(debug)
    ctx.obj = Ctx(conf, client_id, connect_timeout, state_dir)


# -- images ----------------------------------------------------------------------


@cli.command()
@click.argument("spec")
@click.option("--size", help="Size with a unit: 512M, 10G, 1T.")
@click.option("--from", "parent", metavar="POOL/IMAGE@SNAP",
              help="Clone this snapshot (clone v2) instead of creating an empty image.")
@click.option("--flatten", is_flag=True, help="With --from: copy the parent's blocks into "
              "the clone, so it no longer depends on the snapshot.")
@json_opt
@click.pass_obj
def create(obj: Ctx, spec: str, size: str | None, parent: str | None, flatten: bool,
           as_json: bool) -> None:
    """Create an image (no-op if it exists with this size), or clone a snapshot."""
    from cephvol import lifecycle
    from cephvol.spec import format_size, parse_size

    s = _spec(spec, allow_snap=False)
    if parent is not None or flatten:
        _clone(obj, s, parent, flatten, size, as_json)
        return
    if size is None:
        raise UsageError("Missing option '--size' (or --from POOL/IMAGE@SNAP to clone)")
    res = lifecycle.create(obj.cfg(), s, parse_size(size))
    if "warning" in res:
        click.echo(f"cephvol: warning: {res['warning']}", err=True)
    _emit(res, as_json, f"{'created' if res['created'] else 'exists'} {s} "
                        f"{format_size(res['size'])}")


@cli.command()
@click.argument("spec")
@json_opt
@click.pass_obj
def info(obj: Ctx, spec: str, as_json: bool) -> None:
    """Show an image: size, features, snapshots, watchers, locks."""
    from cephvol.cluster import Cluster

    with Cluster(obj.cfg()) as c:
        i = c.image_info(_spec(spec))
        parent = c.image_parent(_spec(spec))
    text = (f"{i.spec}: size {i.size_human} ({i.size} bytes)\n"
            f"parent: {parent or '-'}\n"
            f"features: {', '.join(i.features)}\n"
            f"snapshots: {', '.join(i.snapshots) or '-'}\n"
            f"watchers: {', '.join(w.get('addr', '?') for w in i.watchers) or '-'}\n"
            f"lockers: {', '.join(lk['client'] for lk in i.lockers) or '-'}")
    _emit({**i.to_dict(), "parent": parent}, as_json, text)


@cli.command(name="ls")
@click.argument("pool", default="rbd")
@json_opt
@click.pass_obj
def ls_cmd(obj: Ctx, pool: str, as_json: bool) -> None:
    """List the images of a pool (POOL or POOL/NAMESPACE)."""
    from cephvol.cluster import Cluster

    s = _spec(pool.rstrip("/") + "/x", allow_snap=False)
    with Cluster(obj.cfg()) as c:
        names = c.list_images(s)
    _emit(names, as_json, "\n".join(names))


@cli.command()
@click.argument("spec")
@json_opt
@click.pass_obj
def rm(obj: Ctx, spec: str, as_json: bool) -> None:
    """Remove an image; refused while it is mapped, open, locked or owned anywhere."""
    from cephvol import lifecycle

    s = _spec(spec, allow_snap=False)
    lifecycle.remove(obj.host(), s)
    _emit({"image": str(s), "removed": True}, as_json, f"removed {s}")


# -- volumes ---------------------------------------------------------------------


def _env_file(text: str | None) -> Path | None:
    """Lexical checks only; what is at the path is checked by attach before
    it maps anything (cephvol/envfile.py)."""
    from cephvol.mountpoint import check_name

    if text is None:
        return None
    p = Path(check_name(text, "--env-file"))
    if p.name in ("", ".") or text.endswith("/"):
        raise UsageError(f"--env-file {text!r} must name a file, not a directory")
    return p


def map_options(f: Any) -> Any:
    """The mapping options shared by `attach` and `map`."""
    opts = [
        click.option("--backend", default="auto", show_default=True,
                     type=click.Choice(["auto", "krbd", "nbd", "qsd", "fuse"]),
                     help="auto: krbd if the kernel can, else nbd, else qsd "
                          "(qemu-storage-daemon), else fuse (rbd-fuse)."),
        click.option("--read-only", is_flag=True, help="Map (and mount) read-only."),
        click.option("--exclusive/--no-exclusive", default=None,
                     help="krbd/nbd: hold the image's exclusive lock (refuse a second writer, "
                          "but also online resize). Default: on for writable krbd attaches."),
        click.option("--lock-timeout", type=int, help="With --exclusive: seconds to wait."),
        click.option("--queue-depth", type=int, help="krbd: request queue depth."),
        click.option("--notrim", is_flag=True, help="krbd: turn off discard/trim."),
        click.option("--io-timeout", type=int, help="nbd: I/O timeout in seconds."),
        click.option("--reattach-timeout", type=int, help="nbd: reattach timeout in seconds."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def owner_options(f: Any) -> Any:
    """Ownership of a writable volume across hosts (see `cephvol owner`)."""
    for opt in reversed([
        click.option("--takeover", is_flag=True,
                      help="Take the volume from a dead host: wait for its client to go, "
                           "fence it (osd blocklist), then own it here."),
        click.option("--force", is_flag=True,
                     help="With --takeover: fence the owner even if it looks alive. "
                          "Without: map writable even while other clients (not this "
                          "volume's owner) watch or lock the image."),
        click.option("--size", "create_size",
                     help="Create the image with this size if it is missing (10G); an "
                          "image of another size is a conflict."),
        click.option("--takeover-wait", type=float, default=45.0, show_default=True,
                     help="With --takeover: seconds to wait for the owner's client to go."),
    ]):
        f = opt(f)
    return f


def _owner_kw(kw: dict[str, Any]) -> dict[str, Any]:
    from cephvol.spec import parse_size

    takeover, force, wait = kw.pop("takeover"), kw.pop("force"), kw.pop("takeover_wait")
    size = kw.pop("create_size")
    if wait <= 0:
        raise UsageError("--takeover-wait must be greater than zero")
    return {"takeover": takeover, "force": force, "takeover_wait": wait,
            "size": parse_size(size) if size is not None else None}


def _map_opts(kw: dict[str, Any]) -> Any:
    from cephvol.mapper import MapOptions

    # the map_options above are named after MapOptions' fields
    mo = MapOptions(**{name: kw.pop(name) for name in MapOptions.__dataclass_fields__})
    mo.validate()
    return mo


@cli.command()
@click.argument("spec")
@click.option("-m", "--mountpoint", help="Mount here; without it the device is only mapped.")
@click.option("--env-file", help="Also write CEPHVOL_DEVICE, CEPHVOL_MOUNTPOINT, ... here "
              "(for EnvironmentFile=); detach removes it.")
@map_options
@owner_options
@click.option("--fstype", help="Filesystem for a new volume (ext4, xfs); checked on old ones.")
@click.option("--mkfs/--no-mkfs", default=True, show_default=True,
              help="Make a filesystem if the device holds nothing at all.")
@click.option("--force-mkfs", is_flag=True,
              help="Format even an image that holds data no signature names "
                   "(DESTROYS that data).")
@click.option("--mkfs-option", "mkfs_options", multiple=True, help="Extra mkfs argument.")
@click.option("--fsck", default="auto", show_default=True,
              type=click.Choice(["auto", "skip", "force"]))
@click.option("-o", "--mount-option", "mount_options", multiple=True,
              help="Mount option (repeatable or comma-separated).")
@json_opt
@click.pass_obj
def attach(obj: Ctx, spec: str, mountpoint: str | None, env_file: str | None, backend: str,
           fstype: str | None, mkfs: bool, force_mkfs: bool, mkfs_options: tuple[str, ...],
           fsck: str,
           mount_options: tuple[str, ...], as_json: bool, **kw: Any) -> None:
    """Map an image, make a filesystem if it has none, mount it; print the device."""
    from cephvol import lifecycle
    from cephvol.spec import parse_mountpoint

    s = _spec(spec)
    owner_kw = _owner_kw(kw)
    mo = _map_opts(kw)
    mp = Path(str(parse_mountpoint(mountpoint))) if mountpoint is not None else None
    mopts = [o for opt in mount_options for o in opt.split(",") if o]
    for o in mopts:
        if not o.replace("_", "").replace("=", "").replace("-", "").isalnum():
            raise UsageError(f"invalid mount option {o!r}")
        if o.partition("=")[0] in ("source", "bind", "rbind", "move", "remount", "loop"):
            raise UsageError(f"mount option {o!r} is not a filesystem option; cephvol "
                             "chooses what is mounted where")
    req = lifecycle.AttachRequest(
        spec=s, mountpoint=mp, backend=backend, options=mo,
        fstype=fstype, mkfs=mkfs, force_mkfs=force_mkfs, mkfs_options=list(mkfs_options),
        fsck=fsck,
        mount_options=mopts,
        env_file=_env_file(env_file), **owner_kw)
    host = obj.host()
    _thaw_leftovers(host, s)
    res = lifecycle.attach(host, req)
    _emit(res, as_json, res["device"])


@cli.command()
@click.argument("spec")
@click.option("--force", is_flag=True, help="Unmap even if open or mounted elsewhere.")
@click.option("--lazy", is_flag=True, help="Lazy unmount (umount -l) when busy.")
@json_opt
@click.pass_obj
def detach(obj: Ctx, spec: str, force: bool, lazy: bool, as_json: bool) -> None:
    """Flush, unmount and unmap; a no-op (exit 0) when not attached."""
    from cephvol import lifecycle

    host = obj.host()
    _thaw_leftovers(host, _spec(spec))
    res = lifecycle.detach(host, _spec(spec), force=force, lazy=lazy)
    _emit(res, as_json, f"detached {res['image']}" if res["detached"]
          else f"{res['image']}: not attached")


@cli.command()
@click.argument("spec")
@click.option("--size", required=True, help="New, larger size: 20G, 1T.")
@json_opt
@click.pass_obj
def resize(obj: Ctx, spec: str, size: str, as_json: bool) -> None:
    """Grow an image, and its mounted filesystem online; shrinking is refused."""
    from cephvol import lifecycle
    from cephvol.spec import format_size, parse_size

    res = lifecycle.resize(obj.host(), _spec(spec, allow_snap=False), parse_size(size))
    text = (f"{res['image']}: {format_size(res['old_size'])} -> {format_size(res['size'])}"
            + (", filesystem grown" if res["filesystem_grown"] else ""))
    _emit(res, as_json, text)


@cli.command(name="map")
@click.argument("spec")
@map_options
@owner_options
@json_opt
@click.pass_obj
def map_cmd(obj: Ctx, spec: str, backend: str, as_json: bool, **kw: Any) -> None:
    """Map an image to a block device and print it (no filesystem, no mount)."""
    from cephvol import lifecycle

    owner_kw = _owner_kw(kw)
    req = lifecycle.AttachRequest(spec=_spec(spec), mountpoint=None, backend=backend,
                                  options=_map_opts(kw), mkfs=False, **owner_kw)
    res = lifecycle.attach(obj.host(), req)
    _emit(res, as_json, res["device"])


@cli.command()
@click.argument("spec")
@click.option("--force", is_flag=True, help="Unmap even if mounted or open (data at risk).")
@json_opt
@click.pass_obj
def unmap(obj: Ctx, spec: str, force: bool, as_json: bool) -> None:
    """Unmap; refused while the device is mounted (use detach) or open, unless --force."""
    from cephvol import lifecycle

    res = lifecycle.detach(obj.host(), _spec(spec), force=force, unmount=False)
    _emit(res, as_json, f"unmapped {res['image']}" if res["detached"]
          else f"{res['image']}: not mapped")


@cli.command()
@click.option("--stale", "mode", flag_value="stale", default=True,
              help="Release volumes whose owner is gone (the default).")
@click.option("--all", "mode", flag_value="all", help="Detach every volume (shutdown).")
@click.option("--force", is_flag=True, help="Also unmap devices still open or mounted elsewhere.")
@json_opt
@click.pass_obj
def cleanup(obj: Ctx, mode: str, force: bool, as_json: bool) -> None:
    """Finish or undo what crashed cephvols, reboots and dead daemons left behind."""
    from cephvol import lifecycle

    host = obj.host()
    rows = _thaw_leftovers(host, None) + lifecycle.cleanup(host, everything=mode == "all",
                                                            force=force)
    lines = [f"{r['image']}: " + ("released" if r["ok"] else f"FAILED ({r['error']})")
             + f" - {r['reason']}" for r in rows] or ["nothing to clean up"]
    _emit(rows, as_json, "\n".join(lines))
    failed = [r["exit_code"] for r in rows if not r["ok"]]
    if failed:
        raise click.exceptions.Exit(failed[0])


@cli.command()
@json_opt
@click.pass_obj
def showmapped(obj: Ctx, as_json: bool) -> None:
    """Every mapping of every backend, as the kernel and the backends show them."""
    from cephvol.mapper import list_all

    host = obj.host()
    rows = [m.to_dict() for m in list_all(host.paths, host.cfg)]
    lines = [f"{'BACKEND':7} {'ID':6} {'DEVICE':12} {'RO':3} IMAGE"]
    for r in rows:
        lines.append(f"{r['backend']:7} {r['backend_id'] or '-':6} {r['device'] or '-':12} "
                     f"{'ro' if r['read_only'] else 'rw':3} {r['spec']}")
    _emit(rows, as_json, "\n".join(lines))


@cli.command()
@click.option("--offline", is_flag=True, help="Do not try to reach the cluster.")
@json_opt
@click.pass_obj
def doctor(obj: Ctx, offline: bool, as_json: bool) -> None:
    """What this host can map with, and what stands in the way; exit 9 if nothing."""
    from cephvol.doctor import run_checks

    host = obj.host()
    res = run_checks(host.paths, host.cfg, connect=not offline)
    lines = [f"kernel {res['kernel']}; auto backend: {res['auto_backend'] or 'NONE'}"]
    for c in res["checks"]:
        mark = "WARN" if c["warning"] else ("ok" if c["ok"] else "FAIL")
        lines.append(f"{mark:4} {c['name']}: {c['detail']}")
    _emit(res, as_json, "\n".join(lines))
    if res["auto_backend"] is None:
        raise click.exceptions.Exit(int(ExitCode.UNSUPPORTED))


@cli.command()
@json_opt
@click.pass_obj
def status(obj: Ctx, as_json: bool) -> None:
    """List attached volumes and every mapping any backend shows."""
    from cephvol import lifecycle

    host = obj.host()
    rows = lifecycle.status(host)
    try:
        me = host.identity
        who = f"host {me.name} (id {me.id})"
    except CephvolError as exc:
        who = f"host identity unknown: {exc}"
    lines = [who, f"{'IMAGE':32} {'BACKEND':7} {'DEVICE':12} {'PHASE':9} MOUNTPOINT"]
    for r in rows:
        lines.append(f"{r['image'] or r.get('journal') or '-':32} {r['backend'] or '-':7} "
                     f"{r['device'] or '-':12} {r['phase']:9} {r['mountpoint'] or '-'}"
                     + (f"  ({r['problem']})" if r.get("problem") else ""))
    _emit(rows, as_json, "\n".join(lines))


@cli.command()
@click.argument("spec")
@click.option("--release", is_flag=True,
              help="Give back this host's ownership when nothing is mapped here "
                   "(after /run was lost); never another host's. A no-op if unowned.")
@click.option("--repair", is_flag=True,
              help="Remove a corrupt ownership record, only while no client uses the image.")
@json_opt
@click.pass_obj
def owner(obj: Ctx, spec: str, release: bool, repair: bool, as_json: bool) -> None:
    """Show which host owns a volume (may write it), since when, and from whom
    it was taken over."""
    from cephvol import lifecycle

    if release and repair:
        raise UsageError("--release and --repair do not go together")
    res = lifecycle.owner(obj.host(), _spec(spec, allow_snap=False), release=release,
                          repair=repair)
    if repair:
        _emit(res, as_json, f"{res['image']}: {res['message']}")
        return
    rec = res["owner"]
    if rec is None:
        text = f"{res['image']}: not owned by any host"
    else:
        text = (f"{res['image']}: owned by host {rec['host']} (id {rec['host_id']}) since "
                f"{rec['since']}" + (" -- this host" if res["this_host"] else ""))
        if rec.get("taken_over_from"):
            prev = rec["taken_over_from"]
            text += (f"; taken over at {prev['at']} from host {prev['host']} "
                     f"(id {prev['host_id']}), fenced: {', '.join(prev['fenced']) or '-'}")
    if res.get("released"):
        text = f"{res['image']}: released (was owned by this host)"
    _emit(res, as_json, text)


# -- snapshots and clones (cephvol/data/snapshots.py) ----------------------------


def _thaw_leftovers(host: Any, spec: Any) -> list[dict[str, Any]]:
    """Thaw a filesystem a killed `snap create` left frozen (before anything
    else touches the volume: a flush of a frozen filesystem would hang);
    rows in `cleanup`'s format."""
    if not (host.paths.state_dir / "freeze").exists():
        return []  # the common case, without importing the snapshot code
    from cephvol.data.snapshots import thaw_leftovers

    return [{"image": r["image"], "ok": r["ok"], "error": r.get("error"),
             "exit_code": int(ExitCode.SYSTEM), "steps": ["thaw"] if r["thawed"] else [],
             "reason": f"{r['mountpoint']} "
                       + ("thawed" if r["thawed"] else "was not frozen any more")
                       + " (left frozen by a killed `snap create`)"}
            for r in thaw_leftovers(host.paths.state_dir, spec)]


def _clone(obj: Ctx, s: Any, parent: str | None, flatten: bool, size: str | None,
           as_json: bool) -> None:
    import time

    from cephvol.data import snapshots
    from cephvol.spec import format_size

    if parent is None:
        raise UsageError("--flatten goes with --from POOL/IMAGE@SNAP")
    if size is not None:
        raise UsageError("a clone has its parent's size; leave out --size (grow it later "
                         "with `cephvol resize`)")
    p = snapshots.require_snap(_spec(parent), "--from")
    start, shown = time.monotonic(), [0.0, -1]

    def progress(done: int, total: int) -> None:
        now, pct = time.monotonic(), int(100 * done / max(total, 1))
        # only long flattens: after 1 s, then every 10 % or 2 s
        if now - start >= 1 and (pct >= shown[1] + 10 or now - shown[0] >= 2):
            click.echo(f"flattening {s}: {pct}% ({done}/{total} objects)", err=True)
            shown[:] = [now, pct]

    res = snapshots.clone(obj.cfg(), p, s, flatten=flatten, progress=progress)
    _emit(res, as_json, f"{'created' if res['created'] else 'exists'} {s} "
                        f"{format_size(res['size'])} from {res['origin']}"
                        + (", flattened" if res["flattened"] else ""))


@cli.group()
def snap() -> None:
    """Snapshots: consistent (frozen) ones of mounted volumes, list, remove, roll back."""


@snap.command(name="create")
@click.argument("spec", metavar="POOL/IMAGE@SNAP")
@click.option("--freeze-timeout", type=float,
              help="Longest a mounted filesystem stays frozen, seconds "
                   "[$CEPHVOL_FREEZE_TIMEOUT, 30].")
@json_opt
@click.pass_obj
def snap_create(obj: Ctx, spec: str, freeze_timeout: float | None, as_json: bool) -> None:
    """Snapshot an image; a volume mounted here is frozen for it (consistent)."""
    from cephvol.data import snapshots

    s = snapshots.require_snap(_spec(spec), "snap create")
    res = snapshots.create(obj.host(), s, bound=snapshots.parse_bound(freeze_timeout))
    if "warning" in res:
        click.echo(f"cephvol: warning: {res['warning']}", err=True)
    _emit(res, as_json, f"created {s}" + (f" ({res['mountpoint']} frozen "
                                          f"{res['frozen_ms']:.0f} ms)" if res["frozen"]
                                          else " (not mounted here: crash-consistent)"))


@snap.command(name="ls")
@click.argument("spec", metavar="POOL/IMAGE")
@json_opt
@click.pass_obj
def snap_ls(obj: Ctx, spec: str, as_json: bool) -> None:
    """List an image's snapshots, their clones and where they are mapped here."""
    from cephvol.data import snapshots

    rows = snapshots.list_snapshots(obj.host(), _spec(spec, allow_snap=False))
    lines = [f"{'NAME':24} {'CREATED':20} {'CLONES':6} MAPPED"]
    lines += [f"{r['name']:24} {r['created'] or '-':20} {len(r['clones']):<6} "
              f"{r['mapped_here'] or '-'}" for r in rows]
    _emit(rows, as_json, "\n".join(lines))


@snap.command(name="rm")
@click.argument("spec", metavar="POOL/IMAGE@SNAP")
@json_opt
@click.pass_obj
def snap_rm(obj: Ctx, spec: str, as_json: bool) -> None:
    """Remove a snapshot; refused while it is mapped here or has clones."""
    from cephvol.data import snapshots

    res = snapshots.remove(obj.host(), snapshots.require_snap(_spec(spec), "snap rm"))
    _emit(res, as_json, f"removed {res['snapshot']}")


@snap.command(name="rollback")
@click.argument("spec", metavar="POOL/IMAGE@SNAP")
@json_opt
@click.pass_obj
def snap_rollback(obj: Ctx, spec: str, as_json: bool) -> None:
    """Roll an image back to a snapshot; refused while it is attached anywhere."""
    from cephvol.data import snapshots

    res = snapshots.rollback(obj.host(), snapshots.require_snap(_spec(spec), "snap rollback"))
    _emit(res, as_json, f"rolled {res['image']} back to {res['snapshot']}")


# -- local cluster ----------------------------------------------------------------


@cli.group(name="dev-cluster")
def dev_cluster() -> None:
    """A throw-away one-node cluster for trying cephvol and for its tests."""


dir_opt = click.option("--dir", "directory", required=True, type=click.Path(file_okay=False),
                       help="Directory holding the cluster.")


@dev_cluster.command(name="up")
@dir_opt
@click.option("--addr", default="127.0.0.1", show_default=True,
              help="Address to bind: loopback, or any address inside --netns.")
@click.option("--netns", help="Run the daemons inside this network namespace (ip netns).")
@click.option("--expose", is_flag=True,
              help="Allow a non-loopback --addr outside a namespace (a lab VM's own network).")
@json_opt
def dc_up(directory: str, addr: str, netns: str | None, expose: bool, as_json: bool) -> None:
    """Create or restart the cluster; return when pool rbd is writable."""
    from cephvol.devcluster import DevCluster

    _check_addr(addr, netns or expose)
    if netns:
        from cephvol._os import netns as netns_os

        netns_os.enter(netns)
    res = DevCluster(Path(directory).absolute(), addr).up()
    _emit(res, as_json, res["env"])
    if not as_json:
        click.echo(f"# cluster up in {res['seconds']}s", err=True)


@dev_cluster.command(name="down")
@dir_opt
@json_opt
def dc_down(directory: str, as_json: bool) -> None:
    """Stop the daemons this directory's pid files name."""
    from cephvol.devcluster import DevCluster

    stopped = DevCluster(Path(directory).absolute()).down()
    _emit({"stopped": stopped}, as_json, f"stopped {', '.join(stopped) or 'nothing'}")


@dev_cluster.command(name="status")
@dir_opt
@json_opt
def dc_status(directory: str, as_json: bool) -> None:
    from cephvol.devcluster import DevCluster

    d = DevCluster(Path(directory).absolute()).describe()
    _emit(d, as_json, "\n".join(f"{k}: {v or 'stopped'}" for k, v in d["daemons"].items()))


@dev_cluster.command(name="env")
@dir_opt
def dc_env(directory: str) -> None:
    """Print the shell line that points cephvol and ceph tools at the cluster."""
    from cephvol.devcluster import DevCluster

    c = DevCluster(Path(directory).absolute())
    if not c.conf.exists():
        from cephvol.errors import NotFound

        raise NotFound(f"no dev-cluster in {directory}; run 'cephvol dev-cluster up' first")
    click.echo(c.describe()["env"])


def _check_addr(addr: str, allowed_elsewhere: str | bool | None) -> None:
    """Loopback only, unless inside a namespace: never expose a dev cluster."""
    import ipaddress

    try:
        ip = ipaddress.IPv4Address(addr)
    except ValueError as exc:
        raise UsageError(f"--addr {addr!r} is not an IPv4 address") from exc
    if not ip.is_loopback and not allowed_elsewhere:
        raise UsageError(f"--addr {addr} is not a loopback address; a dev cluster binds "
                         "other addresses only inside a network namespace (--netns) "
                         "or when told to (--expose)")


# -- systemd units ---------------------------------------------------------------


@cli.group()
def units() -> None:
    """systemd units: render application units, install cephvol's own."""


def app_unit_options(f: Any) -> Any:
    for opt in reversed([
        click.option("--for", "kind", type=click.Choice(["docker", "podman", "plain"]),
                     help="What ExecStart= runs."),
        click.option("--style", default="bind", show_default=True,
                     type=click.Choice(["bind", "device"]),
                     help="bind: host mounts, container gets the directory; device: "
                          "container gets the block device and SYS_ADMIN."),
        click.option("--image", help="Container image (docker, podman)."),
        click.option("--command", help="plain: the ExecStart= line (an absolute path "
                                       "first); docker/podman: arguments after the image. "
                                       "Inserted as written: quotes and ${VARS} work, no "
                                       "backslashes, control characters or lone ';', "
                                       "a literal % as %%."),
        click.option("--name", help="Unit (and container) name [the image's name]; not "
                                    "cephvol* or systemd-*."),
        click.option("--mountpoint", help="bind: host mountpoint [/srv/cephvol/NAME]."),
        click.option("--container-path",
                     help="Path inside the container [/data, or /dev/cephvol for device]."),
        click.option("--setenv", multiple=True, help="NAME=VALUE for the unit (no secrets)."),
        click.option("--cephvol-path", help="cephvol in the units [this cephvol's path]."),
        click.option("--runtime-path", help="docker/podman binary [found on PATH]."),
        click.option("--fleet", is_flag=True, help="Add an [X-Fleet] section."),
        click.option("--size", help="attach creates the image with this size when it is "
                                    "missing (one unit deploys a volume on an empty cluster)."),
    ]):
        f = opt(f)
    return f


def _program(*names: str) -> str | None:
    """The first of `names` found on PATH, as the absolute path a unit needs."""
    import shutil

    for name in names:
        found = shutil.which(name)
        if found:
            return str(Path(found).absolute())
    return None


def _cephvol_path(given: str | None) -> str:
    return given or _program("cephvol", sys.argv[0]) or "/usr/local/bin/cephvol"


def _app_unit(volume: str, kind: str | None, kw: dict[str, Any]) -> Any:
    from cephvol.units import AppUnit, default_unit_name

    if kind is None:
        raise UsageError("--for docker|podman|plain is required")
    spec = _spec(volume, allow_snap=False)
    env = []
    for item in kw["setenv"]:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--setenv {item!r}: expected NAME=VALUE")
        env.append((key, value))
    runtime = kw["runtime_path"] or (_program(kind) if kind != "plain" else None)
    return AppUnit(spec=spec, kind=kind, name=kw["name"] or default_unit_name(spec),
                   style=kw["style"], image=kw["image"], command=kw["command"],
                   mountpoint=kw["mountpoint"], container_path=kw["container_path"],
                   environment=tuple(env), cephvol=_cephvol_path(kw["cephvol_path"]),
                   runtime=runtime, fleet=kw["fleet"], size=kw["size"])


@units.command(name="render")
@click.argument("volume")
@app_unit_options
@click.option("-o", "--output-dir", default=".", show_default=True,
              help="Write NAME.service here (not through a symlink); '-' prints it.")
@click.option("--force", is_flag=True,
              help="Replace a file (or the symlink itself) cephvol did not write.")
@json_opt
def units_render(volume: str, kind: str | None, output_dir: str, force: bool, as_json: bool,
                 **kw: Any) -> None:
    """Write an application unit that attaches VOLUME before it starts and
    detaches it after it stops."""
    from cephvol.units import check_no_symlinks, render_app, write_units

    name, text = render_app(_app_unit(volume, kind, kw))
    if output_dir == "-":
        click.echo(text, nl=False)
        return
    out = Path(output_dir).absolute()
    check_no_symlinks(out, "--output-dir")
    rows = write_units({name: text}, out, force=force, label="--output-dir")
    _emit(rows[0], as_json, rows[0]["path"])


@units.command(name="install")
@click.argument("volume", required=False)
@app_unit_options
@click.option("--unit-dir", default="/etc/systemd/system", show_default=True)
@click.option("--force", is_flag=True, help="Replace unit files cephvol did not write.")
@click.option("--no-reload", is_flag=True, help="Do not run systemctl daemon-reload.")
@json_opt
def units_install(volume: str | None, kind: str | None, unit_dir: str, force: bool,
                  no_reload: bool, as_json: bool, **kw: Any) -> None:
    """Install cephvol@.service, cephvol-cleanup.service and the volume plugin's
    cephvol-plugin.service/.socket, and with VOLUME
    --for ... an application unit for it."""
    from cephvol.units import render_app, render_system_units, systemd_running, write_units

    files = render_system_units(_cephvol_path(kw["cephvol_path"]))
    if volume:
        name, text = render_app(_app_unit(volume, kind, kw))
        files[name] = text
    elif kind:
        raise UsageError("--for needs a VOLUME")
    rows = write_units(files, Path(unit_dir), force=force, label="--unit-dir")
    reloaded = False
    if not no_reload and systemd_running() and any(r["action"] != "unchanged" for r in rows):
        from cephvol import proc

        proc.run(["systemctl", "daemon-reload"], timeout=60)
        reloaded = True
    _emit({"units": rows, "daemon_reload": reloaded}, as_json,
          "\n".join(f"{r['action']:9} {r['path']}" for r in rows)
          + ("\nsystemctl daemon-reload: done" if reloaded else ""))


# -- volume plugin (Docker, Podman) ---------------------------------------------


@cli.group()
def plugin() -> None:
    """The Docker/Podman volume plugin: `docker volume create -d cephvol`."""


@plugin.command(name="serve")
@click.option("--socket", "socket_path", default="/run/docker/plugins/cephvol.sock",
              show_default=True, help="Listen here (unless systemd passes the socket).")
@click.option("--data-dir", envvar="CEPHVOL_PLUGIN_DIR",
              help="Volume records, kept across reboots [/var/lib/cephvol/plugin].")
@click.option("--mount-root", help="Volumes are mounted at MOUNT_ROOT/NAME [DATA_DIR/mnt].")
@click.pass_obj
def plugin_serve(obj: Ctx, socket_path: str, data_dir: str | None,
                 mount_root: str | None) -> None:
    """Answer the volume plugin protocol on a unix socket until stopped."""
    from cephvol.plugin.protocol import Plugin, PluginPaths
    from cephvol.plugin.server import serve
    from cephvol.spec import parse_mountpoint

    host = obj.host()
    paths = PluginPaths.defaults(
        host.paths.state_dir,
        Path(str(parse_mountpoint(data_dir))) if data_dir else None,
        Path(str(parse_mountpoint(mount_root))) if mount_root else None)
    serve(Plugin(host, paths), Path(str(parse_mountpoint(socket_path))))


# -- entry point -----------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; every failure becomes one line on stderr and a documented code."""
    args = sys.argv[1:] if argv is None else argv
    as_json = "--json" in args
    debug = "--debug" in args
    try:
        # standalone_mode=False: click *returns* the code of a raised
        # click.exceptions.Exit instead of exiting (cleanup and doctor use it)
        rv = cli.main(args=args, prog_name="cephvol", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.exceptions.Abort:
        return _fail("aborted", ExitCode.USAGE, as_json)
    except click.UsageError as exc:
        return _fail(exc.format_message().splitlines()[0], ExitCode.USAGE, as_json)
    except CephvolError as exc:
        if debug:
            log.debug("error detail", exc_info=True)
        return _fail(str(exc), exc.exit_code, as_json)
    except KeyboardInterrupt:
        return _fail("interrupted", ExitCode.INTERNAL, as_json)
    except Exception as exc:
        if debug:
            log.exception("internal error")
        return _fail(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug; "
                     "please report)", ExitCode.INTERNAL, as_json)


def _fail(message: str, code: int, as_json: bool) -> int:
    message = " ".join(message.split())  # one line, always
    if as_json:
        click.echo(json.dumps({"error": message, "exit_code": int(code)}))
    if _log_target == "journal":
        from cephvol import supervisor

        log.error("error: %s", message, extra={"STEP": "error", "EXIT_CODE": str(int(code))})
        if supervisor.stderr_is_journal(os.environ):
            return int(code)  # the journal has it already, with fields
    click.echo(f"cephvol: error: {message}", err=True)
    return int(code)


def entry() -> None:
    sys.exit(main())
