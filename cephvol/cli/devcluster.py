"""dev-cluster up|down|status|env: a throw-away local cluster."""

from __future__ import annotations

from pathlib import Path

import click

from cephvol.cli.base import _emit, cli, json_opt
from cephvol.errors import UsageError

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
