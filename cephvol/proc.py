"""The one place cephvol starts host commands.

Every call is an argv list (no shell), has a timeout, and on failure raises
with the command's own stderr in the message, because "mount failed" without
the kernel's reason sends operators to dmesg for nothing. Secrets never go in
argv: callers pass them through files or the kernel keyring instead.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cephvol.errors import NotFound, StepTimeout, SystemCommandError, UsageError

DEFAULT_TIMEOUT = 60.0
# children killed after a timeout but possibly stuck in the kernel; kept
# referenced so Python does not warn about (or block on) them at exit
_abandoned: list[subprocess.Popen[str]] = []


def step_timeout(default: float = 60.0) -> float:
    """Bound for one host step that may wait on the cluster (umount, flush,
    unmap): $CEPHVOL_STEP_TIMEOUT seconds, default 60."""
    raw = os.environ.get("CEPHVOL_STEP_TIMEOUT")
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise UsageError(f"CEPHVOL_STEP_TIMEOUT={raw!r} is not a number") from exc
    if value <= 0:
        raise UsageError("CEPHVOL_STEP_TIMEOUT must be greater than zero")
    return value


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def run(
    argv: Sequence[str],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    input_text: str | None = None,
) -> Result:
    """Run argv, capture output, and turn failure into a CephvolError.

    With check=False a non-zero exit is returned as data, for commands whose
    exit code carries meaning (blkid's 2 = "nothing found").
    """
    full_env = None
    if env is not None:
        full_env = dict(os.environ)
        full_env.update(env)
    try:
        child = subprocess.Popen(
            list(argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.PIPE if input_text is not None else subprocess.DEVNULL,
            text=True,
            env=full_env,
        )
    except FileNotFoundError as exc:
        raise NotFound(
            f"command not found: {argv[0]}", hint="run scripts/setup or install it"
        ) from exc
    try:
        out, err = child.communicate(input_text, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        # Kill, but do not wait: a umount or flush blocked on an unreachable
        # cluster sits in uninterruptible sleep and cannot die until its I/O
        # completes. Waiting would make cephvol hang exactly as long; the
        # abandoned child finishes by itself when the cluster comes back.
        child.kill()
        _abandoned.append(child)
        raise StepTimeout(f"{_describe(argv)} did not finish within {timeout:g}s") from exc
    res = Result(tuple(argv), child.returncode, out, err)
    if check and res.returncode != 0:
        raise failure(res)
    return res


def failure(res: Result) -> SystemCommandError:
    """The error for a failed command: its name and its own last words."""
    why = _last_line(res.stderr) or _last_line(res.stdout) or "no output"
    return SystemCommandError(f"{_describe(res.argv)} failed (exit {res.returncode}): {why}")


# subcommands worth naming in an error ("rbd-nbd map failed"); option values
# cannot be told from subcommands without knowing each tool's options
_SUBCOMMANDS = frozenset({"map", "unmap", "list-mapped", "attach", "detach"})


def _describe(argv: Sequence[str]) -> str:
    """Program plus its subcommand, if it has a known one: 'losetup', 'rbd-nbd map'."""
    words = [argv[0].rsplit("/", 1)[-1]]
    words += [a for a in argv[1:] if a in _SUBCOMMANDS][:1]
    return " ".join(words)
