"""Image commands: create (or clone), info, ls, rm."""

from __future__ import annotations

import click

from cephvol.cli.base import Ctx, _emit, _spec, cli, json_opt
from cephvol.cli.snapshots import _clone
from cephvol.errors import UsageError

# -- images ----------------------------------------------------------------------


@cli.command()
@click.argument("spec")
@click.option("--size", help="Size with a unit: 512M, 10G, 1T.")
@click.option("--from", "parent", metavar="POOL/IMAGE@SNAP",
              help="Clone this snapshot (clone v2) instead of creating an empty image.")
@click.option("--flatten", is_flag=True, help="With --from: copy the parent's blocks into "
              "the clone, so it no longer depends on the snapshot.")
@click.option("--encrypt", is_flag=True, help="Encrypt at rest (librbd LUKS2); the key is "
              "stored in the cluster's config-key store. Only an empty image is formatted.")
@json_opt
@click.pass_obj
def create(obj: Ctx, spec: str, size: str | None, parent: str | None, flatten: bool,
           encrypt: bool, as_json: bool) -> None:
    """Create an image (no-op if it exists with this size), or clone a snapshot."""
    from cephvol import lifecycle
    from cephvol.spec import format_size, parse_size

    s = _spec(spec, allow_snap=False)
    if encrypt and (parent is not None or flatten):
        raise UsageError("--encrypt makes a new encrypted image; a clone (--from) cannot be "
                         "encrypted (librbd encrypts only flat images before Ceph 17)")
    if encrypt:
        from cephvol.data import encryption

        if size is None:
            raise UsageError("Missing option '--size'")
        res = encryption.create_encrypted(obj.cfg(), s, parse_size(size))
        _emit(res, as_json, f"{'created' if res['created'] else 'exists'} {s} "
                            f"{format_size(res['size'])}, encrypted ({res['encryption']})")
        return
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
    from cephvol.data import encryption

    with Cluster(obj.cfg()) as c:
        i = c.image_info(_spec(spec))
        parent = c.image_parent(_spec(spec))
        luks = encryption.read_header(c, _spec(spec))
    text = (f"{i.spec}: size {i.size_human} ({i.size} bytes)\n"
            f"parent: {parent or '-'}\n"
            f"encrypted: {luks.format if luks else 'no'}\n"
            f"features: {', '.join(i.features)}\n"
            f"snapshots: {', '.join(i.snapshots) or '-'}\n"
            f"watchers: {', '.join(w.get('addr', '?') for w in i.watchers) or '-'}\n"
            f"lockers: {', '.join(lk['client'] for lk in i.lockers) or '-'}")
    _emit({**i.to_dict(), "parent": parent, "encrypted": luks is not None,
           "encryption": luks.format if luks else None}, as_json, text)


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
    from cephvol.data import encryption
    from cephvol.errors import CephvolError

    s = _spec(spec, allow_snap=False)
    lifecycle.remove(obj.host(), s)
    try:
        encryption.forget_key(obj.cfg(), s)  # an encrypted image's key protects nothing now
    except CephvolError as exc:  # the image is gone all the same: say so, exit 0
        click.echo(f"cephvol: warning: {s} removed, but not its encryption key: {exc}",
                   err=True)
    _emit({"image": str(s), "removed": True}, as_json, f"removed {s}")
