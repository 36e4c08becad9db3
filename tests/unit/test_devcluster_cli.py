"""dev-cluster's shell output, its refusal of directories ceph.conf cannot
name, its lock, and the exit code of a missing config (issue 21, items 12-15).
None of these start a cluster; tests/integration/test_devcluster.py does."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cephvol.devcluster import DevCluster
from cephvol.errors import Busy

CEPHVOL = str(Path(sys.executable).parent / "cephvol")

HOSTILE_DIRS = ["sp ace", "x;touch PWNED;y", "$(touch PWNED)", "`touch PWNED`", "a'b", 'a"b',
                "tab\there", "new\nline", "#hash", "-dash", "star*", "é"]


def _cv(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CEPHVOL, *args], capture_output=True, text=True, timeout=timeout)


def _eval(line: str, cwd: Path) -> str:
    """What the README does with the output: eval it in a shell."""
    res = subprocess.run(["bash", "-c", 'eval "$1" && printf %s "$CEPH_CONF"', "_", line],
                         capture_output=True, text=True, timeout=30, cwd=cwd)
    assert res.returncode == 0, res.stderr
    return res.stdout


@pytest.mark.parametrize("name", HOSTILE_DIRS)
def test_env_is_quoted_for_eval(tmp_path: Path, name: str) -> None:
    """Item 13: `export CEPH_CONF=<path>` unquoted: a blank cut the path, a ';'
    ran a command."""
    d = tmp_path / name
    d.mkdir()
    (d / "ceph.conf").write_text("[global]\n")
    res = _cv("dev-cluster", "env", "--dir", str(d))
    assert res.returncode == 0, res.stderr
    assert _eval(res.stdout, tmp_path) == str(d / "ceph.conf")
    # `up` prints the same line (describe() is what both print)
    assert _eval(DevCluster(d).describe()["env"], tmp_path) == str(d / "ceph.conf")
    assert not list(tmp_path.rglob("PWNED")), "the output ran a command"


@pytest.mark.parametrize("name", ["a#b", "a;b", "a$b", "a\\b", 'a"b', "a'b", "a\nb", "a\rb",
                                  "a\x85b"])
def test_up_refuses_a_directory_ceph_conf_cannot_hold(tmp_path: Path, name: str) -> None:
    """Item 14: a '#' cut the paths in ceph.conf (a comment): the mon wrote
    outside the directory and `up` failed leaving a half-made directory."""
    d = tmp_path / "parent" / name
    try:
        res = _cv("dev-cluster", "up", "--dir", str(d), timeout=120)
        assert res.returncode == 2, res.stderr
        assert "ceph.conf cannot hold" in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "parent").exists(), "nothing may be made"
    finally:  # should the check ever fail, stop what it started
        if (d / "run").exists():
            _cv("dev-cluster", "down", "--dir", str(d), timeout=120)


def test_a_second_up_waits_for_the_first(tmp_path: Path) -> None:
    """Item 15: two `up`s on one fresh directory raced through the creation
    (one died with FileNotFoundError on ceph.conf.tmp, exit 70). The lock is
    in the directory; while another holds it, `up` waits (here: its whole,
    short timeout) and then says so, having made nothing."""
    d = tmp_path / "c"
    d.mkdir()
    fd = os.open(d / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        t0 = time.monotonic()
        with pytest.raises(Busy, match="another 'up' is still running"):
            DevCluster(d).up(timeout=1.0)
        assert time.monotonic() - t0 >= 1.0
    finally:
        os.close(fd)
    assert sorted(p.name for p in d.iterdir()) == [".lock"]  # nothing else made


def test_a_missing_config_is_not_found(tmp_path: Path) -> None:
    """Item 12: `--conf /nonexistent.conf ls` exited 7; README's table says 3
    for a config file that is not found. One that cannot be used stays 7."""
    res = _cv("--conf", str(tmp_path / "nonexistent.conf"), "ls")
    assert res.returncode == 3 and "does not exist" in res.stderr, res.stderr
    res = _cv("--conf", str(tmp_path / "nonexistent.conf"), "ls", "--json")
    assert res.returncode == 3 and json.loads(res.stdout)["exit_code"] == 3
    res = _cv("--conf", str(tmp_path), "--connect-timeout", "2", "ls")  # a directory
    assert res.returncode == 7, res.stderr


@pytest.mark.parametrize("addr", ["127.0.0.1\n", " 127.0.0.1", "127.0.0.01", "\u0661.0.0.1"])
def test_up_refuses_an_address_that_is_not_plainly_ipv4(tmp_path: Path, addr: str) -> None:
    """Item 3 for dev-cluster's own input: no trailing newline, no other digits."""
    res = _cv("dev-cluster", "up", "--dir", str(tmp_path / "c"), "--addr", addr)
    assert res.returncode == 2 and "is not an IPv4 address" in res.stderr, res.stderr
    assert not (tmp_path / "c").exists()
