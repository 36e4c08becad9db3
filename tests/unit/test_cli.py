"""The command line's contract for bad input, with no cluster at all.

Every case runs the installed `cephvol` as an operator would and checks the
documented exit code and that stderr is one line, never a traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cephvol.errors import ExitCode

CEPHVOL = str(Path(sys.executable).parent / "cephvol")


def _run(*args: str, tmp: Path, conf: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, CEPHVOL_STATE_DIR=str(tmp / "state"), CEPHVOL_CONNECT_TIMEOUT="2")
    env.pop("CEPH_CONF", None)
    if conf:
        env["CEPH_CONF"] = str(conf)
    return subprocess.run([CEPHVOL, *args], capture_output=True, text=True, env=env,
                          timeout=60, check=False)


def _one_line_error(cp: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in cp.stderr, cp.stderr
    lines = cp.stderr.strip().splitlines()
    assert len(lines) == 1, cp.stderr
    return lines[0]


@pytest.mark.parametrize(("args", "code", "text"), [
    (("create", "rbd/x/y/z", "--size", "1G"), ExitCode.USAGE, "expected POOL"),
    (("create", "rbd/x@s", "--size", "1G"), ExitCode.USAGE, "snapshot is not allowed"),
    (("create", "rbd/x", "--size", "-1"), ExitCode.USAGE, "invalid size"),
    (("create", "rbd/x", "--size", "10Q"), ExitCode.USAGE, "invalid size"),
    (("create", "rbd/x"), ExitCode.USAGE, "Missing option '--size'"),
    (("attach", "rbd/x", "--mountpoint"), ExitCode.USAGE, "requires an argument"),
    (("attach", "rbd/x", "--mountpoint", "rel"), ExitCode.USAGE, "absolute path"),
    (("attach", "rbd/x", "--fstype", "btrfs"), ExitCode.USAGE, "btrfs"),
    (("nonsense",), ExitCode.USAGE, "No such command"),
])
def test_bad_input(args: tuple[str, ...], code: int, text: str, tmp_path: Path) -> None:
    cp = _run(*args, tmp=tmp_path)
    assert cp.returncode == code, cp.stderr
    line = _one_line_error(cp)
    assert line.startswith("cephvol: error: ") and text in line, line
    assert not (tmp_path / "state" / "volumes").exists() or \
        not any((tmp_path / "state" / "volumes").iterdir())


def test_json_errors_are_json(tmp_path: Path) -> None:
    cp = _run("create", "rbd/x", "--size", "10Q", "--json", tmp=tmp_path)
    assert cp.returncode == ExitCode.USAGE
    err = json.loads(cp.stdout or cp.stderr)
    assert err["exit_code"] == ExitCode.USAGE and "invalid size" in err["error"]


def test_cluster_down_is_exit_7_within_the_timeout(tmp_path: Path) -> None:
    conf = tmp_path / "ceph.conf"
    # port 9 (discard) on loopback: nothing listens, the connection is refused
    kr = tmp_path / "keyring"
    kr.write_text("[client.admin]\nkey = AQBM5yZnAAAAABAAyFwU6dEsXy0ePEkm8h2wDw==\n")
    conf.write_text(f"[global]\nmon host = 127.0.0.1:9\nkeyring = {kr}\n"
                    f"log file = {tmp_path}/client.log\n")
    cp = _run("ls", tmp=tmp_path, conf=conf)
    assert cp.returncode == ExitCode.CLUSTER, cp.stderr
    assert "cluster" in _one_line_error(cp).lower()


def test_missing_config_is_a_clear_error(tmp_path: Path) -> None:
    cp = _run("-c", str(tmp_path / "nope.conf"), "ls", tmp=tmp_path)
    assert cp.returncode in (ExitCode.CLUSTER, ExitCode.NOT_FOUND), cp.stderr
    assert "nope.conf" in _one_line_error(cp)


def test_detach_of_something_never_attached_is_a_no_op(tmp_path: Path) -> None:
    cp = _run("detach", "rbd/never-attached", tmp=tmp_path)
    assert cp.returncode == 0, cp.stderr
    assert "Traceback" not in cp.stderr


def test_status_with_nothing_attached(tmp_path: Path) -> None:
    cp = _run("status", "--json", tmp=tmp_path)
    assert cp.returncode == 0, cp.stderr
    assert json.loads(cp.stdout) == []


@pytest.mark.parametrize(("keyring", "text"), [
    (None, "no key for client.admin"),
    ("garbage without a section", "unreadable or malformed"),
    ("[client.admin]\nkey = not-base64!!\n", "not valid base64"),
    ("[client.other]\nkey = AQBM5yZnAAAAABAAyFwU6dEsXy0ePEkm8h2wDw==\n",
     "no key for client.admin"),
])
def test_keyring_problems_are_named(keyring: str | None, text: str, tmp_path: Path) -> None:
    kr = tmp_path / "keyring"
    if keyring is not None:
        kr.write_text(keyring)
    conf = tmp_path / "ceph.conf"
    conf.write_text(f"[global]\nmon host = 127.0.0.1:9\nkeyring = {kr}\n"
                    f"log file = {tmp_path}/client.log\n")
    cp = _run("ls", tmp=tmp_path, conf=conf)
    assert cp.returncode == ExitCode.CLUSTER, cp.stderr
    line = _one_line_error(cp)
    assert text in line and (keyring is None or str(kr) in line), line
    assert "AQBM5yZ" not in line


def test_malformed_config_is_named(tmp_path: Path) -> None:
    conf = tmp_path / "ceph.conf"
    conf.write_bytes(b"this is [not a ceph conf\n\x01\x02")
    cp = _run("ls", tmp=tmp_path, conf=conf)
    assert cp.returncode == ExitCode.CLUSTER
    assert str(conf) in _one_line_error(cp)
