"""Snapshot commands: snap create|ls|rm|rollback (cephvol/data/snapshots.py)."""

from __future__ import annotations

from typing import Any

import click

from cephvol.cli.base import Ctx, _emit, _spec, cli, json_opt
from cephvol.errors import ExitCode, UsageError

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
