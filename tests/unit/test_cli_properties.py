"""Property: whatever an operator types, cephvol answers with a documented exit
code and at most one line of error, never a traceback, and changes nothing.

Runs the real CLI entry point in-process (fast enough for hypothesis) with an
unreachable cluster and an empty state directory.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cephvol.cli import main
from cephvol.errors import ExitCode

DOCUMENTED = {int(c) for c in ExitCode}

_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
                max_size=40)
_spec = st.one_of(_text, st.from_regex(r"[a-z@/._+-]{0,3}(/[A-Za-z0-9@._,+-]{0,12}){0,4}",
                                       fullmatch=True))
_size = st.one_of(_text, st.from_regex(r"-?[0-9]{0,22}(\.[0-9])?[kKmMgGtTpPeEqQ]?(i?B)?",
                                       fullmatch=True))
_mnt = st.one_of(_text, st.from_regex(r"(/|\.\./)?[a-z./]{0,12}", fullmatch=True),
                 st.from_regex(r"@TMP@/m(/[a-z.]{1,5}){0,3}/?", fullmatch=True))


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cmd=st.sampled_from(["create", "attach", "map", "resize", "info", "rm", "detach",
                            "unmap"]),
       spec=_spec, size=_size, mnt=_mnt, extra=st.sampled_from(
           [[], ["--json"], ["--exclusive"], ["--lock-timeout", "-5"], ["--queue-depth", "x"],
            ["--backend", "bogus"], ["--fstype", "btrfs"], ["--fsck", "maybe"]]))
def test_any_input_gets_a_documented_code_and_changes_nothing(
        cmd: str, spec: str, size: str, mnt: str, extra: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "ceph.conf"
        conf.write_text(f"[global]\nmon host = 127.0.0.1:9\nlog file = {tmp}/c.log\n")
        state = Path(tmp) / "state"
        mnt = mnt.replace("@TMP@", tmp)  # a mountpoint we can check was not created
        saved = dict(os.environ)
        os.environ.update(CEPHVOL_STATE_DIR=str(state), CEPH_CONF=str(conf),
                          CEPHVOL_CONNECT_TIMEOUT="0.5")
        argv = [cmd, spec]
        if cmd in ("create", "resize"):
            argv += ["--size", size]
        if cmd == "attach":
            argv += ["--mountpoint", mnt]
        if cmd in ("attach", "map") or "--json" in extra:
            argv += extra
        try:
            code, out, err = _run(argv)
        finally:
            os.environ.clear()
            os.environ.update(saved)
        assert code in DOCUMENTED, (argv, code, err)
        assert "Traceback" not in out + err
        if code:
            assert len(err.strip().splitlines()) == 1, (argv, err)
            assert err.startswith("cephvol: error: ")
        # nothing on the host changed: no journal, no mountpoint made
        assert not list(state.glob("volumes/*.json")), argv
        if code:
            assert not (Path(tmp) / "m").exists(), argv  # no mountpoint made on error
