"""Env files: written atomically, only ever over cephvol's own, never through
a link, never another volume's; removed only when ours. Real files, real
journals (StateStore in a temp directory)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cephvol import envfile
from cephvol.errors import CephvolError, ExitCode, UsageError
from cephvol.spec import parse_spec
from cephvol.state import StateStore, VolumeState

RES = {"image": "rbd/db", "device": "/dev/loop3", "mountpoint": "/srv/db",
       "backend": "fuse", "fstype": "ext4", "read_only": False}
SPEC = parse_spec("rbd/db")


def _store(tmp_path: Path) -> StateStore:
    return StateStore(tmp_path / "state")


def _leftover_tmp(d: Path) -> list[str]:
    return [p.name for p in d.iterdir() if p.name.endswith(".tmp")]


def test_written_with_marker_mode_and_no_temp_file(tmp_path: Path) -> None:
    p = tmp_path / "run" / "sub" / "db.env"
    envfile.write(p, SPEC, RES, _store(tmp_path))
    text = p.read_text()
    assert text == f"# Written by cephvol for rbd/db\n{envfile.env_lines(RES)}"
    vals = dict(line.split("=", 1) for line in text.splitlines()[1:])
    assert vals["CEPHVOL_DEVICE"] == '"/dev/loop3"' and vals["CEPHVOL_READ_ONLY"] == '"0"'
    assert p.stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "run").stat().st_mode & 0o777 == 0o755
    assert [f.name for f in p.parent.iterdir()] == ["db.env"]
    # ours: replaced in place, then removed by remove()
    envfile.write(p, SPEC, {**RES, "device": "/dev/loop4"}, _store(tmp_path))
    assert '"/dev/loop4"' in p.read_text() and _leftover_tmp(p.parent) == []
    assert envfile.remove(str(p), SPEC) == "removed" and not p.exists()
    assert envfile.remove(str(p), SPEC) == "absent"


@pytest.mark.parametrize("value", ["a\nb", 'a"b', "a\\b", "$x", "`x`", "a\rb"])
def test_values_that_would_change_the_file_are_refused(tmp_path: Path, value: str) -> None:
    p = tmp_path / "x.env"
    with pytest.raises(UsageError, match="cannot put"):
        envfile.write(p, SPEC, {**RES, "mountpoint": value}, _store(tmp_path))
    assert not p.exists() and _leftover_tmp(tmp_path) == []


def test_a_foreign_file_is_never_overwritten_or_deleted(tmp_path: Path) -> None:
    p = tmp_path / "precious"
    p.write_text("precious\n")
    for call in (lambda: envfile.check(p, SPEC, _store(tmp_path)),
                 lambda: envfile.write(p, SPEC, RES, _store(tmp_path))):
        with pytest.raises(CephvolError) as err:
            call()
        assert err.value.exit_code == ExitCode.CONFLICT
        assert "not written by cephvol" in err.value.message
    assert envfile.remove(str(p), SPEC).startswith("kept")
    assert p.read_text() == "precious\n" and _leftover_tmp(tmp_path) == []


def test_another_volumes_file_is_refused_and_not_removed(tmp_path: Path) -> None:
    store = _store(tmp_path)
    p = tmp_path / "shared.env"
    other = parse_spec("rbd/other")
    st = VolumeState("rbd/other", "/c", "admin", phase="attached",
                     extra={"env_file": str(p)})
    store.save(other.key, st)
    envfile.write(p, other, {**RES, "image": "rbd/other"}, store)
    with pytest.raises(CephvolError) as err:
        envfile.check(p, SPEC, store)
    assert err.value.exit_code == ExitCode.CONFLICT and "rbd/other" in err.value.message
    with pytest.raises(CephvolError) as err:
        envfile.write(p, SPEC, RES, store)
    assert err.value.exit_code == ExitCode.CONFLICT
    assert envfile.remove(str(p), SPEC).startswith("kept")  # detach of rbd/db
    assert p.read_text().startswith("# Written by cephvol for rbd/other\n")
    # the volume itself may rewrite its own file
    envfile.check(p, other, store)


def _bad_paths(tmp_path: Path) -> dict[str, Path]:
    d = tmp_path / "d"
    d.mkdir()
    (tmp_path / "file").write_text("x")
    os.mkfifo(tmp_path / "fifo")
    os.symlink(tmp_path / "elsewhere.env", tmp_path / "link.env")
    os.symlink(d, tmp_path / "linkdir")
    os.symlink("/etc", tmp_path / "etc")
    return {"directory": d, "below a file": tmp_path / "file" / "x.env",
            "fifo": tmp_path / "fifo", "final symlink": tmp_path / "link.env",
            "symlinked parent": tmp_path / "linkdir" / "x.env",
            "link to /etc": tmp_path / "etc" / "x.env", "/etc": Path("/etc/cephvol-x.env"),
            "/usr": Path("/usr/lib/x.env"), "/proc": Path("/proc/x.env"),
            "a system dir": Path("/tmp"), "state dir": tmp_path / "state" / "volumes" / "a.env"}


def test_unwritable_paths_are_usage_errors_before_anything(tmp_path: Path) -> None:
    """Issue 20 item 5: checked before attach maps anything, exit 2, nothing made."""
    before = sorted(os.listdir(tmp_path))
    for what, p in _bad_paths(tmp_path).items():
        for call in (lambda p=p: envfile.check(p, SPEC, _store(tmp_path), tmp_path / "state"),
                     lambda p=p: envfile.write(p, SPEC, RES, _store(tmp_path),
                                               tmp_path / "state")):
            with pytest.raises(CephvolError) as err:
                call()
            assert err.value.exit_code == ExitCode.USAGE, (what, err.value.message)
            assert "\n" not in str(err.value)
    assert not (tmp_path / "elsewhere.env").exists()
    assert not Path("/etc/cephvol-x.env").exists()
    assert sorted(os.listdir(tmp_path)) == sorted({*before, "d", "file", "fifo", "link.env",
                                                   "linkdir", "etc"})
    assert os.listdir(tmp_path / "d") == []


def test_remove_never_follows_or_deletes_what_is_not_ours(tmp_path: Path) -> None:
    target = tmp_path / "real.env"
    envfile.write(target, SPEC, RES)
    os.symlink(target, tmp_path / "link.env")
    assert envfile.remove(str(tmp_path / "link.env"), SPEC).startswith("kept")
    d = tmp_path / "d"
    d.mkdir()
    os.symlink(tmp_path, tmp_path / "up")
    assert envfile.remove(str(tmp_path / "up" / "real.env"), SPEC).startswith("kept")
    assert envfile.remove(str(target), parse_spec("rbd/other")).startswith("kept")
    assert target.exists() and d.exists()
    assert envfile.remove(str(d), SPEC).startswith("kept")
    assert envfile.remove(None, SPEC) == "absent"


def test_a_file_appearing_meanwhile_is_not_replaced(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Between the check and the link, someone creates the file: link()
    refuses to replace it and the temp file goes."""
    p = tmp_path / "race.env"
    real_link = os.link

    def create_then_link(*a: object, **kw: object) -> None:
        p.write_text("theirs\n")
        real_link(*a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "link", create_then_link)
    with pytest.raises(CephvolError) as err:
        envfile.write(p, SPEC, RES)
    assert err.value.exit_code == ExitCode.CONFLICT
    assert p.read_text() == "theirs\n" and _leftover_tmp(tmp_path) == []


NAMES = ["d", "file", "fifo", "link.env", "linkdir", "etc", "new", "x.env", "state", "."]


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(NAMES), min_size=1, max_size=3))
def test_any_path_is_written_where_named_or_refused_changing_nothing(
        tmp_path_factory: pytest.TempPathFactory, comps: list[str]) -> None:
    base = tmp_path_factory.mktemp("envprop")
    _bad_paths(base)
    (base / "d" / "ours.env").write_text("# Written by cephvol for rbd/db\nA=1\n")
    snap = {str(p): (p.is_symlink(), p.is_file() and p.read_bytes())
            for p in base.rglob("*") if not p.is_fifo()}
    etc = sorted(os.listdir("/etc"))
    p = Path(str(base) + "/" + "/".join(comps))
    try:
        envfile.write(p, SPEC, RES, StateStore(base / "state"), base / "state")
    except CephvolError as exc:
        assert exc.exit_code in (ExitCode.USAGE, ExitCode.CONFLICT), exc.message
        assert "\n" not in str(exc)
        now = {str(q): (q.is_symlink(), q.is_file() and q.read_bytes())
               for q in base.rglob("*") if not q.is_fifo()}
        assert now == snap
    else:
        real = os.path.realpath(p)
        assert real == str(Path(str(p))), f"{p} went through a link"
        assert Path(real).read_text().startswith("# Written by cephvol for rbd/db\n")
        parts = Path(real).relative_to(base).parts
        # into the state dir only as its documented top-level NAME.env
        # (test_a_top_level_env_file_in_the_state_dir_is_allowed), nothing deeper
        assert parts[:1] != ("state",) or (len(parts) == 2 and parts[1].endswith(".env")
                                           and not parts[1].startswith(".")), parts
        assert envfile.remove(str(p), SPEC) == "removed"
    assert sorted(os.listdir("/etc")) == etc
    assert _leftover_tmp(base) == [] and _leftover_tmp(base / "d") == []


def test_a_top_level_env_file_in_the_state_dir_is_allowed(tmp_path: Path) -> None:
    """The shipped units use /run/cephvol/NAME.env, the state dir's top level;
    nothing deeper (journals, locks, mapping mounts) and no other name."""
    from cephvol import envfile
    from cephvol.errors import UsageError

    state = tmp_path / "state"
    envfile._check_path(state / "pg.env", state)
    for bad in (state / "volumes" / "pg.env", state / "fuse" / "x.env", state / "pg",
                state / ".hidden.env"):
        with pytest.raises(UsageError):
            envfile._check_path(bad, state)


def test_a_refusal_through_a_linked_parent_names_the_file_and_the_link(
        tmp_path: Path) -> None:
    """The message names the env file asked for and the component that is a
    link (it named the parent alone, as if that were the --env-file)."""
    (tmp_path / "to-etc").symlink_to("/etc")
    want = tmp_path / "to-etc" / "cv.env"
    with pytest.raises(UsageError) as err:
        envfile.write(want, SPEC, RES, _store(tmp_path), tmp_path / "state")
    assert err.value.message == (f"refusing --env-file {want}: {tmp_path}/to-etc is a symlink "
                                 "(cephvol follows no links in this path; give the real path)")
    assert not Path("/etc/cv.env").exists()
