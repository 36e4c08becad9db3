"""Volume commands: attach, detach, map, unmap, resize, cleanup, showmapped,
doctor, status, owner."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from cephvol.cli.base import Ctx, _emit, _spec, cli, json_opt
from cephvol.cli.snapshots import _thaw_leftovers
from cephvol.errors import CephvolError, ExitCode, UsageError

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
@click.option("--owner", "root_owner", metavar="UID[:GID]",
              help="Numeric owner of the root directory of a filesystem this attach makes "
                   "(GID 0 if not given), for a container that runs as that user. Only "
                   "at the first mkfs: a volume that already holds a filesystem is never "
                   "chowned again. Not with --read-only or --no-mkfs.")
@click.option("--fsck", default="auto", show_default=True,
              type=click.Choice(["auto", "skip", "force"]))
@click.option("-o", "--mount-option", "mount_options", multiple=True,
              help="Mount option (repeatable or comma-separated).")
@json_opt
@click.pass_obj
def attach(obj: Ctx, spec: str, mountpoint: str | None, env_file: str | None, backend: str,
           fstype: str | None, mkfs: bool, force_mkfs: bool, mkfs_options: tuple[str, ...],
           fsck: str, root_owner: str | None,
           mount_options: tuple[str, ...], as_json: bool, **kw: Any) -> None:
    """Map an image, make a filesystem if it has none, mount it; print the device."""
    from cephvol import fs, lifecycle
    from cephvol.spec import parse_mountpoint

    s = _spec(spec)
    owner = fs.parse_owner(root_owner) if root_owner is not None else None
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
        fsck=fsck, owner=owner,
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
                     + (f"  [{r['encryption']}]" if r.get("encryption") else "")
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
