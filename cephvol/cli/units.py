"""units render|install: systemd units for volumes and cephvol itself."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from cephvol.cli.base import _emit, _spec, cli, json_opt
from cephvol.errors import UsageError

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
        click.option("--read-only", is_flag=True,
                     help="attach --read-only; the container gets the directory read-only "
                          "(-v ...:ro) or the device readable only (--device ...:r)."),
        click.option("--owner", metavar="UID[:GID]",
                     help="attach --owner: the root of the filesystem made at the first "
                          "attach is owned by UID:GID (for a container running as that "
                          "user); an existing filesystem is never chowned."),
        click.option("--takeover", is_flag=True,
                     help="attach --takeover: a start takes the volume from a dead host "
                          "(waits for its client to go, fences it); a live owner still "
                          "makes the start fail."),
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
                   runtime=runtime, fleet=kw["fleet"], size=kw["size"],
                   read_only=kw["read_only"], owner=kw["owner"], takeover=kw["takeover"])


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
