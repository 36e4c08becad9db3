"""The subprocess edge, with real commands."""

from __future__ import annotations

import pytest

from cephvol import proc
from cephvol.errors import ExitCode, NotFound, StepTimeout, SystemCommandError


def test_failure_carries_the_commands_own_reason() -> None:
    with pytest.raises(SystemCommandError) as ei:
        proc.run(["sh", "-c", "echo noise >&2; echo 'the real reason' >&2; exit 3"])
    assert str(ei.value) == "sh failed (exit 3): the real reason"
    assert ei.value.exit_code == ExitCode.SYSTEM


def test_option_values_are_not_taken_for_the_subcommand() -> None:
    with pytest.raises(SystemCommandError, match=r"^ls failed \(exit 2\)"):
        proc.run(["ls", "-d", "/no/such/dir"])
    assert proc._describe(["rbd-nbd", "--id", "x", "map", "p/i"]) == "rbd-nbd map"
    assert proc._describe(["/usr/bin/rbd-fuse", "-c", "/x.conf"]) == "rbd-fuse"


def test_check_false_returns_exit_code_as_data() -> None:
    r = proc.run(["sh", "-c", "echo out; exit 2"], check=False)
    assert (r.returncode, r.stdout) == (2, "out\n")


def test_timeout_and_missing_command() -> None:
    with pytest.raises(StepTimeout, match=r"within 0\.2s"):
        proc.run(["sleep", "5"], timeout=0.2)
    with pytest.raises(NotFound, match="command not found: no-such-tool-x"):
        proc.run(["no-such-tool-x"])


def test_stdin_is_not_inherited() -> None:
    assert proc.run(["cat"], timeout=5).stdout == ""
    assert proc.run(["cat"], input_text="secret-free", timeout=5).stdout == "secret-free"
