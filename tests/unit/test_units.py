"""Unit-name escaping, checked against the real systemd-escape, and env files."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cephvol.units import escape, unescape

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
        "cephvol@.service": "created", "cephvol-cleanup.service": "created",
        "cephvol-plugin.service": "created", "cephvol-plugin.socket": "created"}
    for r in rows:
        if r["unit"].endswith(".service"):
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
    made = {p.relative_to(out): p.read_text() for p in out.rglob("*.s[eo]*")}
    shipped = {p.relative_to(REPO / "units"): p.read_text()
               for p in (REPO / "units").rglob("*.s[eo]*")}
    assert made == shipped and len(made) == 10


# -- issue 21: values that would change the unit, and unit files at odd places ----------

def _render(tmp: Path, *args: str, spec: str = "rbd/pg") -> subprocess.CompletedProcess[str]:
    return _cv("units", "render", spec, "-o", str(tmp), *args)


def _refused(res: subprocess.CompletedProcess[str], out: Path, needle: str,
             code: int = 2) -> None:
    assert res.returncode == code, res.stderr
    assert needle in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert res.stderr.startswith("cephvol: error: ")
    assert sorted(p.name for p in out.iterdir()) == [], "nothing may be written"


PLAIN = ["--for", "plain", "--command", "/bin/sleep infinity"]


@pytest.mark.parametrize("char", ["\r", "\n", "\v", "\f", "\x85", "\u2028", "\u2029", "\t"])
def test_setenv_control_characters_are_refused(tmp_path: Path, char: str) -> None:
    """Item 1: systemd ends a line at a lone \\r: `A=x\\rUser=nobody` was a directive."""
    value = f"A=x{char}ExecStartPre=/bin/touch /tmp/pwned{char}User=nobody{char}"
    _refused(_render(tmp_path, *PLAIN, "--setenv", value), tmp_path, "--setenv")


def test_a_nul_in_any_value_is_refused() -> None:
    """argv cannot carry NUL; the library is asked directly (systemd ends a line there)."""
    from cephvol.errors import UsageError
    from cephvol.spec import parse_spec
    from cephvol.units import AppUnit, render_app

    base = dict(spec=parse_spec("rbd/pg"), kind="plain", name="pg", command="/bin/true")
    for over in ({"command": "/bin/true\x00ExecStartPre=/x"},
                 {"environment": (("A", "x\x00User=nobody"),)}):
        with pytest.raises(UsageError):
            render_app(AppUnit(**{**base, **over}))  # type: ignore[arg-type]


@pytest.mark.parametrize("args", [
    ["--for", "plain", "--command", "/bin/sleep infinity \\"],
    ["--for", "docker", "--image", "postgres", "--command", "postgres \\"],
    ["--for", "podman", "--image", "postgres", "--command", "\\"],
    ["--for", "plain", "--command", "/bin/echo a\\nb"],
])
def test_backslashes_in_command_are_refused(tmp_path: Path, args: list[str]) -> None:
    """Item 2: a trailing backslash joined ExecStopPost=...detach into ExecStart=."""
    _refused(_render(tmp_path, *args), tmp_path, "backslash")


@pytest.mark.parametrize(("args", "needle"), [
    (["--name", "pg6\n", *PLAIN], "unit name"),
    (["--mountpoint", "/srv/pg\n", *PLAIN], "--mountpoint"),
    (["--container-path", "/data\n", "--for", "docker", "--image", "pg"], "--container-path"),
    (["--cephvol-path", "/usr/bin/cephvol\n", *PLAIN], "--cephvol-path"),
    (["--runtime-path", "/usr/bin/docker\n", "--for", "docker", "--image", "pg"],
     "--runtime-path"),
    (["--for", "docker", "--image", "pg\n"], "--image"),
    (["--setenv", "KEY\n=v", *PLAIN], "--setenv"),
    (["--command", "/bin/true\n", "--for", "plain"], "--command"),
])
def test_a_trailing_newline_is_refused_everywhere(tmp_path: Path, args: list[str],
                                                  needle: str) -> None:
    """Item 3: `^...$` matched before a final newline (pg6\\n.service was written)."""
    _refused(_render(tmp_path, *args), tmp_path, needle)


def test_a_newline_inside_the_spec_is_refused(tmp_path: Path) -> None:
    _refused(_render(tmp_path, *PLAIN, spec="rbd/ns\n/pg"), tmp_path, "namespace name")


@pytest.mark.parametrize(("command", "needle"), [
    ("/bin/echo a ; /bin/echo b", "lone ';'"),
    ("   ", "blank"),
    ("", "blank"),
    ("/bin/echo 'a", "unbalanced"),
    ('/bin/echo "a', "unbalanced"),
    ("/bin/echo %n", "%%"),
    ("/bin/echo 100%", "%%"),
    ("bin/echo", "absolute path"),
    ("echo hi", "absolute path"),
    ("/bin/../bin/echo", "absolute path"),
    ("/bin/", "absolute path"),
    ("@/bin/echo argv0", "prefix"),
    ("+!/bin/echo", "prefix"),
    ("--/bin/echo", "prefix"),
    ("'/bin/e cho' x", "absolute path"),
    ("/bin/echo\x85", "control"),
    ("/bin/echo \u2028 x", "control"),
])
def test_commands_that_systemd_would_read_otherwise_are_refused(tmp_path: Path, command: str,
                                                                needle: str) -> None:
    """Item 4: such units were written with exit 0 and failed verify."""
    _refused(_render(tmp_path, "--for", "plain", "--command", command), tmp_path, needle)


def test_docker_command_with_a_lone_semicolon_is_refused(tmp_path: Path) -> None:
    _refused(_render(tmp_path, "--for", "docker", "--image", "pg", "--command", "a ; b"),
             tmp_path, "lone ';'")


@needs_analyze
@pytest.mark.parametrize("command", [
    "-/bin/echo ';' '%%' \"a b\" ${CEPHVOL_DEVICE} $$HOME a;b 'it''s' \"\"",
    ":/bin/echo $X", "+/bin/echo é", "!/bin/echo #not-a-comment", "-:!/bin/echo [Service]",
])
def test_commands_that_are_accepted_come_out_as_written_and_verify(tmp_path: Path,
                                                                   command: str) -> None:
    res = _render(tmp_path, "--for", "plain", "--command", command, "--json",
                  "--setenv", "K=a 'b' $c # d ; [e]")
    assert res.returncode == 0, res.stderr
    path = Path(json.loads(res.stdout)["path"])
    from cephvol.units import directives

    got = directives(path.read_text())
    assert [v for _, k, v in got if k == "ExecStart"] == [command]
    assert [v for _, k, v in got if k == "Environment"] == ['"K=a \'b\' $c # d ; [e]"']
    _verify(path)


def test_the_rendered_text_is_checked_against_the_template() -> None:
    """Item 4, belt and braces: whatever validation misses, a value that
    changes the unit's lines is refused when the text is parsed back."""
    from cephvol.errors import UsageError
    from cephvol.units import _render as render_checked
    from cephvol.units import directives

    template = "[Service]\nExecStart=@COMMAND@\nExecStopPost=/x detach @SPEC@\n"
    ok = render_checked(template, {"COMMAND": "/bin/true", "SPEC": "rbd/a"})
    assert directives(ok) == [("Service", "ExecStart", "/bin/true"),
                              ("Service", "ExecStopPost", "/x detach rbd/a")]
    for command in ("/bin/true \\", "/bin/true\rUser=x", "/bin/true\x00", "/bin/true\n#"):
        with pytest.raises(UsageError, match="structure"):
            render_checked(template, {"COMMAND": command, "SPEC": "rbd/a"})
    with pytest.raises(UsageError, match="structure"):
        render_checked(template, {"COMMAND": "/bin/true", "SPEC": "a\r[Unit]"})


@pytest.mark.parametrize("name", ["cephvol-cleanup", "cephvol", "cephvol-plugin",
                                  "cephvol-plugin.socket", "Cephvol-x", "systemd-journald",
                                  "cephvol@"])
def test_reserved_unit_names_are_refused(tmp_path: Path, name: str) -> None:
    """Item 5: --name cephvol-cleanup replaced cephvol's own cleanup unit."""
    _refused(_render(tmp_path, *PLAIN, "--name", name), tmp_path, "unit name")
    first = _cv("units", "install", "--unit-dir", str(tmp_path), "--no-reload")
    assert first.returncode == 0, first.stderr
    before = {p.name: p.read_text() for p in tmp_path.iterdir()}
    res = _cv("units", "install", "rbd/pg", *PLAIN, "--name", name, "--unit-dir",
              str(tmp_path), "--no-reload", "--force")
    assert res.returncode == 2 and "unit name" in res.stderr, res.stderr
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == before


def test_an_image_named_like_cephvol_needs_another_name(tmp_path: Path) -> None:
    _refused(_render(tmp_path, *PLAIN, spec="rbd/cephvol-cleanup"), tmp_path, "reserved")
    assert _render(tmp_path, *PLAIN, "--name", "cleanup", spec="rbd/cephvol-cleanup"
                   ).returncode == 0


def _install_pg(unit_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CEPHVOL, "units", "install", "rbd/pg", *PLAIN, "--unit-dir",
                           str(unit_dir), "--no-reload", *extra],
                          capture_output=True, text=True, timeout=20)


def test_a_directory_at_the_target_is_refused(tmp_path: Path) -> None:
    """Item 6: was exit 70 (IsADirectoryError)."""
    (tmp_path / "pg.service").mkdir()
    for extra in ([], ["--force"]):
        res = _install_pg(tmp_path, *extra)
        assert res.returncode == 5 and "not a regular file" in res.stderr, res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pg.service"]
    assert (tmp_path / "pg.service").is_dir()


def test_a_fifo_at_the_target_is_refused_without_hanging(tmp_path: Path) -> None:
    """Item 6: reading it to look for the marker hung forever."""
    os.mkfifo(tmp_path / "pg.service")
    for extra in ([], ["--force"]):
        res = _install_pg(tmp_path, *extra)  # the 20 s timeout would raise
        assert res.returncode == 5 and "not a regular file" in res.stderr, res.stderr
    assert stat.S_ISFIFO((tmp_path / "pg.service").lstat().st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pg.service"]


def test_a_symlink_at_the_target_is_never_followed(tmp_path: Path) -> None:
    """Item 6: a dangling foreign symlink was replaced silently ("created")."""
    units_dir, target = tmp_path / "units", tmp_path / "elsewhere" / "x.service"
    units_dir.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (units_dir / "pg.service").symlink_to(target)
    res = _install_pg(units_dir)
    assert res.returncode == 5 and "symlink" in res.stderr and "--force" in res.stderr
    assert os.readlink(units_dir / "pg.service") == str(target)
    assert sorted(p.name for p in units_dir.iterdir()) == ["pg.service"]
    target.write_text("# someone's file\n")  # a live link is not followed either
    assert _install_pg(units_dir).returncode == 5
    forced = _install_pg(units_dir, "--force", "--json")
    assert forced.returncode == 0, forced.stderr
    assert {r["unit"]: r["action"] for r in json.loads(forced.stdout)["units"]}[
        "pg.service"] == "replaced"
    assert not (units_dir / "pg.service").is_symlink()  # the link itself was replaced
    assert target.read_text() == "# someone's file\n"  # ... not what it pointed to


def test_unit_dir_that_is_a_file_or_missing(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    res = _install_pg(tmp_path / "f")
    assert res.returncode == 2 and "not a directory" in res.stderr, res.stderr
    res = _install_pg(tmp_path / "missing")
    assert res.returncode == 3 and "does not exist" in res.stderr, res.stderr
    assert not (tmp_path / "missing").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a read-only tmpfs")
def test_a_read_only_unit_dir_is_a_clear_error(tmp_path: Path) -> None:
    """Item 6: was exit 70. As root only a read-only mount refuses writes."""
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], check=True,
                   timeout=30)
    try:
        res = _install_pg(ro)
        assert res.returncode == 11, res.stderr
        assert "Read-only file system" in res.stderr and str(ro) in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
    finally:
        subprocess.run(["umount", str(ro)], check=True, timeout=30)


@pytest.mark.parametrize(("first_line", "ours"), [
    ("# Generated by cephvolXYZ", False),
    ("# Generated by cephvol", False),
    ("# Generated by cephvol-fork 1.0 (x)", False),
    ("## Generated by cephvol 0.1.0 (x)", False),
    ("# Generated by cephvol 0.0.9 (cephvol units install); re-render instead", True),
])
def test_only_an_exact_marker_line_makes_a_file_ours(tmp_path: Path, first_line: str,
                                                      ours: bool) -> None:
    """Item 6: the check was a prefix match ("# Generated by cephvolXYZ" counted)."""
    (tmp_path / "pg.service").write_text(f"{first_line}\n[Service]\nExecStart=/bin/true\n")
    res = _install_pg(tmp_path)
    if ours:
        assert res.returncode == 0, res.stderr
        assert "cephvol attach rbd/pg" in (tmp_path / "pg.service").read_text()
    else:
        assert res.returncode == 5 and "not generated by cephvol" in res.stderr, res.stderr
        assert (tmp_path / "pg.service").read_text().startswith(first_line + "\n")


def test_render_over_a_foreign_file_has_the_force_it_suggests(tmp_path: Path) -> None:
    """Item 6: render's error suggested --force, which render did not have."""
    (tmp_path / "pg.service").write_text("[Service]\nExecStart=/bin/true\n")
    res = _render(tmp_path, *PLAIN)
    assert res.returncode == 5 and "--force" in res.stderr, res.stderr
    forced = _render(tmp_path, *PLAIN, "--force")
    assert forced.returncode == 0, forced.stderr
    assert "cephvol attach rbd/pg" in (tmp_path / "pg.service").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pg.service"]  # no temp file


def test_render_output_dir_is_never_reached_through_a_symlink(tmp_path: Path) -> None:
    """Item 6: `-o DIR` must not be led into a system place by a link, neither
    DIR itself nor a directory above it."""
    real = tmp_path / "real"
    (real / "sub").mkdir(parents=True)
    (tmp_path / "link").symlink_to(real)
    for out in (tmp_path / "link", tmp_path / "link" / "sub"):
        res = _cv("units", "render", "rbd/pg", *PLAIN, "-o", str(out))
        assert res.returncode == 2 and "is a symlink" in res.stderr, res.stderr
    assert list(real.rglob("*.service")) == []
    assert _cv("units", "render", "rbd/pg", *PLAIN, "-o", str(real / "sub")).returncode == 0


def test_size_goes_into_the_attach_line_normalised() -> None:
    from cephvol.errors import UsageError
    from cephvol.spec import parse_spec
    from cephvol.units import AppUnit, render_app

    unit = AppUnit(spec=parse_spec("rbd/pg"), kind="plain", name="pg",
                   command="/bin/sleep infinity", size="10240M")
    _, text = render_app(unit)
    assert " attach rbd/pg --mountpoint /srv/cephvol/pg --size 10G --env-file" in text
    bad = AppUnit(spec=parse_spec("rbd/pg"), kind="plain", name="pg",
                  command="/bin/sleep infinity", size="10 G\n")
    with pytest.raises(UsageError):
        render_app(bad)


# -- what the container sees (issue 14 item 5) -------------------------------------------


def _service(text: str) -> dict[str, list[str]]:
    """[Service] directives of a rendered unit, read the way systemd reads them."""
    from cephvol.units import directives

    out: dict[str, list[str]] = {}
    for section, key, value in directives(text):
        if section == "Service":
            out.setdefault(key, []).append(value)
    return out


@needs_analyze
@pytest.mark.parametrize("kind", ["docker", "podman"])
@pytest.mark.parametrize("style", ["bind", "device"])
def test_a_read_only_unit_gives_the_container_a_read_only_volume(tmp_path: Path, kind: str,
                                                                 style: str) -> None:
    res = _render(tmp_path, "--for", kind, "--style", style, "--image", "img:1",
                  "--runtime-path", f"/usr/bin/{kind}", "--read-only", "--container-path",
                  "/var/lib/app", "--json")
    assert res.returncode == 0, res.stderr
    svc = _service((tmp_path / "pg.service").read_text())
    attach = [v for v in svc["ExecStartPre"] if " attach " in v]
    assert len(attach) == 1 and " --read-only " in attach[0] and "--owner" not in attach[0]
    words = svc["ExecStart"][0].split()
    if style == "bind":
        assert words[words.index("-v") + 1] == "/srv/cephvol/pg:/var/lib/app:ro"
    else:
        assert words[words.index("--device") + 1] == "${CEPHVOL_DEVICE}:/var/lib/app:r"
    _verify(tmp_path / "pg.service", kind)
    rw = _cv("units", "render", "rbd/pg", "--for", kind, "--style", style, "--image", "img:1",
             "-o", "-")
    run = _service(rw.stdout)["ExecStart"][0].split()
    assert not any(w.endswith((":ro", ":r")) for w in run) and "--read-only" not in rw.stdout


@pytest.mark.parametrize(("kind", "extra"), [
    ("docker", ["--image", "img"]), ("podman", ["--image", "img", "--style", "device"]),
    ("plain", ["--command", "/bin/true"]),
])
def test_owner_goes_into_the_attach_line_normalised(tmp_path: Path, kind: str,
                                                   extra: list[str]) -> None:
    res = _render(tmp_path, "--for", kind, *extra, "--owner", "999")
    assert res.returncode == 0, res.stderr
    attach = [v for v in _service((tmp_path / "pg.service").read_text())["ExecStartPre"]
              if " attach " in v]
    assert attach[0].split()[-4:] == ["--owner", "999:0", "--env-file", "/run/cephvol/pg.env"]


@pytest.mark.parametrize(("args", "needle"), [
    (["--owner", "nobody"], "--owner 'nobody': expected UID or UID:GID"),
    (["--owner", "1:4294967295"], "numbers 0 to 4294967294"),
    (["--owner", "1", "--read-only"], "--read-only unit never makes one"),
])
def test_render_refuses_a_bad_owner(tmp_path: Path, args: list[str], needle: str) -> None:
    _refused(_render(tmp_path, *PLAIN, *args), tmp_path, needle)


@pytest.mark.parametrize(("style", "path", "where"), [
    ("bind", None, "CEPHVOL_MOUNTPOINT=/data"),
    ("bind", "/var/lib/pg", "CEPHVOL_MOUNTPOINT=/var/lib/pg"),
    ("device", None, "CEPHVOL_DEVICE=/dev/cephvol"),
])
@pytest.mark.parametrize("kind", ["docker", "podman"])
def test_the_container_is_told_the_env_files_values(tmp_path: Path, kind: str, style: str,
                                                   path: str | None, where: str) -> None:
    """-e NAME (value from the unit's EnvironmentFile=, i.e. what attach wrote)
    for every value that means the same inside the container, and the volume's
    path as the container sees it; nothing of the host's paths."""
    from cephvol.envfile import env_lines

    args = ["--for", kind, "--style", style, "--image", "img"]
    res = _cv("units", "render", "rbd/pg", *args, *(["--container-path", path] if path else []),
              "-o", "-")
    assert res.returncode == 0, res.stderr
    svc = _service(res.stdout)
    words = svc["ExecStart"][0].split()
    env = [words[i + 1] for i, w in enumerate(words) if w == "-e"]
    assert env == ["CEPHVOL_IMAGE", "CEPHVOL_FSTYPE", "CEPHVOL_READ_ONLY", where]
    assert words.index("-e") > words.index("--name") and words[-1] == "img"
    written = {ln.split("=")[0] for ln in env_lines({"image": "rbd/pg"}).splitlines()}
    assert {e.split("=")[0] for e in env} <= written  # only names the env file has
    assert svc["EnvironmentFile"] == ["-/run/cephvol/pg.env"]


@needs_analyze
def test_takeover_goes_into_the_attach_line(tmp_path: Path) -> None:
    """Issue 14 item 3: the unit of the host a volume moves to after its host died."""
    res = _render(tmp_path, "--for", "docker", "--image", "img", "--takeover",
                  "--runtime-path", "/usr/bin/docker")
    assert res.returncode == 0, res.stderr
    attach = [v for v in _service((tmp_path / "pg.service").read_text())["ExecStartPre"]
              if " attach " in v]
    assert attach[0].split()[-3:] == ["--takeover", "--env-file", "/run/cephvol/pg.env"]
    _verify(tmp_path / "pg.service", "docker")
    (tmp_path / "pg.service").unlink()
    _refused(_render(tmp_path, *PLAIN, "--takeover", "--read-only"), tmp_path,
             "--takeover is for writable units")
