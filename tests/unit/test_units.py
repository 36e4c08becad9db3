"""Unit-name escaping, checked against the real systemd-escape, and env files."""

from __future__ import annotations

import json
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


# -- rendered and installed unit files --------------------------------------------------

REPO = Path(__file__).resolve().parents[2]
CEPHVOL = str(REPO / ".venv" / "bin" / "cephvol")
needs_analyze = pytest.mark.skipif(not shutil.which("systemd-analyze"),
                                   reason="systemd-analyze not installed")


def _cv(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CEPHVOL, *args], capture_output=True, text=True, timeout=60)


def _verify(path: Path, runtime: str | None = None) -> None:
    """systemd-analyze verify: clean, except for the container runtime itself
    when this machine has none (docker.service, /usr/bin/docker): those
    complaints are about the host, and are the only ones allowed."""
    res = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                         text=True, timeout=60)
    problems = [ln for ln in res.stderr.splitlines() if ln.strip()]
    if runtime and not Path(f"/usr/bin/{runtime}").exists():
        problems = [ln for ln in problems
                    if f"{runtime}.service not found" not in ln
                    and f"/usr/bin/{runtime} is not executable" not in ln]
        assert res.returncode == 0 or not problems, res.stderr
    else:
        assert res.returncode == 0, res.stderr
    assert problems == [], res.stderr


RENDERINGS = [
    ("docker", "bind", ["--image", "postgres:16"]),
    ("docker", "device", ["--image", "postgres:16"]),
    ("podman", "bind", ["--image", "docker.io/library/postgres:16", "--fleet"]),
    ("podman", "device", ["--image", "postgres:16", "--command", "--datadir /dev/cephvol"]),
    ("plain", "bind", ["--command", "/bin/sh -c 'date >> ${CEPHVOL_MOUNTPOINT}/log'",
                       "--setenv", "CEPHVOL_STEP_TIMEOUT=30"]),
    ("plain", "device", ["--command", "/sbin/blockdev --getsize64 ${CEPHVOL_DEVICE}"]),
]


@needs_analyze
@pytest.mark.parametrize(("kind", "style", "extra"), RENDERINGS)
def test_rendered_units_pass_systemd_analyze_verify(tmp_path: Path, kind: str, style: str,
                                                   extra: list[str]) -> None:
    res = _cv("units", "render", "rbd/ns1/db-1", "--for", kind, "--style", style,
              "--runtime-path", f"/usr/bin/{kind}", "-o", str(tmp_path), "--json", *extra)
    assert res.returncode == 0, res.stderr
    path = Path(json.loads(res.stdout)["path"])
    assert path == tmp_path / "db-1.service"
    text = path.read_text()
    assert f"ExecStartPre={CEPHVOL} attach rbd/ns1/db-1" in text
    assert f"ExecStopPost={CEPHVOL} detach rbd/ns1/db-1" in text
    assert "EnvironmentFile=-/run/cephvol/db-1.env" in text
    if style == "bind":
        assert "--mountpoint /srv/cephvol/db-1 " in text and "SYS_ADMIN" not in text
    else:
        assert "--mountpoint" not in text
        if kind != "plain":
            assert "--device ${CEPHVOL_DEVICE}:/dev/cephvol --cap-add SYS_ADMIN" in text
    assert ("[X-Fleet]" in text) == ("--fleet" in extra)
    _verify(path, None if kind == "plain" else kind)


@needs_analyze
def test_installed_system_units_verify_and_install_is_idempotent(tmp_path: Path) -> None:
    first = _cv("units", "install", "--unit-dir", str(tmp_path), "--no-reload", "--json")
    assert first.returncode == 0, first.stderr
    rows = json.loads(first.stdout)["units"]
    assert {r["unit"]: r["action"] for r in rows} == {
        "cephvol@.service": "created", "cephvol-cleanup.service": "created"}
    for r in rows:
        assert f"ExecStart={CEPHVOL} " in Path(r["path"]).read_text()
        _verify(Path(r["path"]))
    again = _cv("units", "install", "--unit-dir", str(tmp_path), "--no-reload", "--json")
    assert {r["action"] for r in json.loads(again.stdout)["units"]} == {"unchanged"}


def test_install_never_overwrites_an_operators_unit(tmp_path: Path) -> None:
    mine = tmp_path / "pg.service"
    mine.write_text("[Service]\nExecStart=/bin/true\n")
    res = _cv("units", "install", "rbd/pg", "--for", "plain", "--command", "/bin/true",
              "--unit-dir", str(tmp_path), "--no-reload")
    assert res.returncode == 5 and "not generated by cephvol" in res.stderr
    assert mine.read_text() == "[Service]\nExecStart=/bin/true\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pg.service"]  # nothing half-done
    forced = _cv("units", "install", "rbd/pg", "--for", "plain", "--command", "/bin/true",
                 "--unit-dir", str(tmp_path), "--no-reload", "--force")
    assert forced.returncode == 0, forced.stderr
    assert "cephvol attach rbd/pg" in mine.read_text()
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize(("args", "needle"), [
    (["--for", "docker"], "needs --image"),
    (["--for", "plain"], "needs --command"),
    (["--for", "plain", "--command", "x", "--image", "a"], "--image is for"),
    (["--for", "docker", "--image", "a b"], "needs --image"),
    (["--for", "docker", "--image", "a", "--mountpoint", "/srv/a b"], "--mountpoint"),
    (["--for", "docker", "--image", "a", "--mountpoint", "/srv/%n"], "--mountpoint"),
    (["--for", "docker", "--image", "a", "--name", "a@b"], "unit name"),
    (["--for", "docker", "--image", "a", "--setenv", "NOEQUALS"], "NAME=VALUE"),
    (["--for", "docker", "--image", "a", "--setenv", "A=%h"], "--setenv"),
    (["--image", "a"], "--for"),
])
def test_render_refuses_what_cannot_go_into_a_unit(tmp_path: Path, args: list[str],
                                                  needle: str) -> None:
    res = _cv("units", "render", "rbd/pg", "-o", str(tmp_path), *args)
    assert res.returncode == 2, res.stderr
    assert needle in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_units_dir_is_what_render_gives(tmp_path: Path) -> None:
    """units/ is generated by scripts/render-units; it must not drift from
    the templates cephvol ships."""
    out = tmp_path / "units"
    shutil.copytree(REPO / "scripts", tmp_path / "scripts")
    (tmp_path / ".venv").symlink_to(REPO / ".venv")
    out.mkdir()
    subprocess.run(["bash", str(tmp_path / "scripts" / "render-units")], check=True,
                   capture_output=True, timeout=120)
    made = {p.relative_to(out): p.read_text() for p in out.rglob("*.service")}
    shipped = {p.relative_to(REPO / "units"): p.read_text()
               for p in (REPO / "units").rglob("*.service")}
    assert made == shipped and len(made) == 8
