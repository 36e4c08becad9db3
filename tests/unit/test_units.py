"""Unit-name escaping, checked against the real systemd-escape, and env files."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cephvol.units import env_lines, escape, unescape, write_env_file

needs_systemd_escape = pytest.mark.skipif(not shutil.which("systemd-escape"),
                                          reason="systemd-escape not installed")


@needs_systemd_escape
@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
               min_size=1, max_size=30))
def test_escape_matches_systemd_escape(text: str) -> None:
    real = subprocess.run(["systemd-escape", "--", text], capture_output=True, text=True,
                          check=True).stdout.rstrip("\n")
    assert escape(text) == real
    assert unescape(real) == text


@pytest.mark.parametrize(("spec", "name"), [
    ("rbd/pg-data", "rbd-pg\\x2ddata"), ("rbd/tenant/db.1", "rbd-tenant-db.1"),
    ("rbd/x@s1", "rbd-x\\x40s1"), (".hidden/x", "\\x2ehidden-x"),
])
def test_volume_specs_round_trip(spec: str, name: str) -> None:
    assert escape(spec) == name and unescape(name) == spec


def test_env_file_is_complete_atomic_and_secret_free(tmp_path: Path) -> None:
    res = {"image": "rbd/db", "device": "/dev/rbd3", "mountpoint": "/srv/db",
           "backend": "krbd", "fstype": "ext4", "read_only": False}
    p = tmp_path / "run" / "db.env"
    write_env_file(p, res)
    assert p.read_text() == env_lines(res)
    vals = dict(line.split("=", 1) for line in p.read_text().splitlines())
    assert vals["CEPHVOL_DEVICE"] == '"/dev/rbd3"' and vals["CEPHVOL_READ_ONLY"] == '"0"'
    assert p.stat().st_mode & 0o777 == 0o644
    assert [f.name for f in p.parent.iterdir()] == ["db.env"]  # no temp file left
