"""The `cephvol` command: parse, call the library, print. Nothing else lives here.

One module per command group (images, volumes, snapshots, units, devcluster,
plugin); importing them registers their commands on the group in base.py.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # typing itself costs ~3 ms of a --version
if TYPE_CHECKING:
    from typing import Any

# click, the command modules and json are imported by main(), not here:
# `cephvol --version` (what health checks and package scripts run) answers
# without them (issue 15: start-up <= 2x `python3 -c pass`; click alone costs
# about as much as starting Python).

# -- entry point -----------------------------------------------------------------


def _commands() -> Any:
    """cephvol.cli.base, with every command module imported: importing them
    registers their commands on the group."""
    from cephvol.cli import (  # noqa: F401
        base,
        devcluster,
        images,
        plugin,
        snapshots,
        units,
        volumes,
    )

    return base


def __getattr__(name: str) -> Any:
    """`from cephvol.cli import cli` (the click group) still works."""
    if name in ("cli", "log"):
        return getattr(_commands(), name)
    raise AttributeError(name)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; every failure becomes one line on stderr and a documented code."""
    import click

    from cephvol.errors import CephvolError, ExitCode

    base = _commands()
    cli, log = base.cli, base.log
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
    import json
    import os

    import click

    base = _commands()
    log = base.log
    message = " ".join(message.split())  # one line, always
    if as_json:
        click.echo(json.dumps({"error": message, "exit_code": int(code)}))
    if base._log_target == "journal":
        from cephvol import supervisor

        log.error("error: %s", message, extra={"STEP": "error", "EXIT_CODE": str(int(code))})
        if supervisor.stderr_is_journal(os.environ):
            return int(code)  # the journal has it already, with fields
    click.echo(f"cephvol: error: {message}", err=True)
    return int(code)


def entry() -> None:
    if sys.argv[1:] == ["--version"]:
        # the same line click's version option prints, without loading click
        from cephvol import __version__

        sys.stdout.write(f"cephvol, version {__version__}\n")
        sys.exit(0)
    sys.exit(main())
