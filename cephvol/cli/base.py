"""The `cephvol` group, its global options and what every command group shares
(printing, spec parsing, the --json option)."""

from __future__ import annotations

import json
import logging
from typing import Any

import click

from cephvol import __version__

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
