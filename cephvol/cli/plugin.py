"""plugin serve: the Docker/Podman volume plugin (cephvol/plugin/)."""

from __future__ import annotations

from pathlib import Path

import click

from cephvol.cli.base import Ctx, cli

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
