"""Pure logic of cephvol/data/snapshots.py and the freeze helper's protocol
(no cluster, and no real freeze: freezing a path of this machine would
freeze its root filesystem; the real freezes are in the integration tests)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from cephvol import hostfs
from cephvol._os import freeze
from cephvol.data import snapshots
from cephvol.errors import Busy, Unsupported, UsageError
from cephvol.spec import parse_spec
from cephvol.state import VolumeState


def test_require_snap_and_bad_names() -> None:
    assert snapshots.require_snap(parse_spec("rbd/a@s"), "x").snap == "s"
    with pytest.raises(UsageError, match="needs POOL/IMAGE@SNAPSHOT"):
        snapshots.require_snap(parse_spec("rbd/a"), "snap create")
    for bad in ("rbd/a@", "rbd/a@-x", "rbd/a@.x", "rbd/a@x y", "rbd/a@s@t", "rbd/a@" + "s" * 97):
        with pytest.raises(UsageError):
            parse_spec(bad)


@pytest.mark.parametrize("given,env,want", [(None, None, 30.0), (5.0, None, 5.0),
                                            (None, "7.5", 7.5), (2.0, "9", 2.0)])
def test_freeze_bound(monkeypatch: pytest.MonkeyPatch, given: float | None, env: str | None,
                      want: float) -> None:
    if env is None:
        monkeypatch.delenv("CEPHVOL_FREEZE_TIMEOUT", raising=False)
    else:
        monkeypatch.setenv("CEPHVOL_FREEZE_TIMEOUT", env)
    assert snapshots.parse_bound(given) == want


@pytest.mark.parametrize("bad", [0.0, -1.0, 601.0])
def test_freeze_bound_refused(bad: float) -> None:
    with pytest.raises(UsageError, match="freeze timeout"):
        snapshots.parse_bound(bad)


def test_freeze_bound_not_a_number(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CEPHVOL_FREEZE_TIMEOUT", "soon")
    with pytest.raises(UsageError, match="not a number"):
        snapshots.parse_bound(None)


def _record(state: Path, **kw: object) -> Path:
    d = snapshots.freeze_dir(state)
    d.mkdir(parents=True, exist_ok=True)
    rec = {"spec": "rbd/v", "mountpoint": str(state), "devnum": "0:0", "pid": 999999,
           "pid_start": 1, "holder": 0, "holder_start": 0, "started": 0.0, "bound": 30.0}
    rec.update(kw)
    path = d / f"{rec['spec'].replace('/', ',')}.json"
    path.write_text(json.dumps(rec))
    return path


def _fake_proc(root: Path, pid: int, start: int, state: str = "S") -> None:
    fields = [state] + ["0"] * 18 + [str(start)]
    (root / str(pid)).mkdir(parents=True)
    (root / str(pid) / "stat").write_text(f"{pid} (cephvol) {' '.join(fields)}\n")


def test_start_time_reads_field_22(tmp_path: Path) -> None:
    _fake_proc(tmp_path, 42, 123456)
    assert snapshots.start_time(42, tmp_path) == 123456
    assert snapshots.start_time(43, tmp_path) == 0
    assert snapshots.start_time(os.getpid()) > 0


def test_leftover_of_a_running_snapshot_is_left_alone(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    _fake_proc(proc, 4242, 77)
    path = _record(tmp_path, pid=4242, pid_start=77)
    assert snapshots.thaw_leftovers(tmp_path, None, proc) == []
    assert path.exists()


def test_reused_pid_is_not_the_snapshot(tmp_path: Path) -> None:
    """Same pid, another start time: that cephvol is gone; the record is
    acted on (here: another filesystem is mounted there now, so no thaw)."""
    proc = tmp_path / "proc"
    _fake_proc(proc, 4242, 78)
    path = _record(tmp_path, pid=4242, pid_start=77, devnum="1234:5678")
    rows = snapshots.thaw_leftovers(tmp_path, None, proc)
    assert rows == [{"image": "rbd/v", "mountpoint": str(tmp_path), "thawed": False,
                     "ok": True}]
    assert not path.exists()


def test_record_kept_while_its_freeze_child_lives(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    _fake_proc(proc, 5151, 9)
    path = _record(tmp_path, holder=5151, holder_start=9, devnum="1234:5678")
    rows = snapshots.thaw_leftovers(tmp_path, None, proc)
    assert [r["ok"] for r in rows] == [True]
    assert path.exists()  # a child stuck in FIFREEZE thaws when it returns


def test_leftovers_filtered_by_volume_and_damage_dropped(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    proc.mkdir()
    other = _record(tmp_path, spec="rbd/other", devnum="1234:5678")
    damaged = snapshots.freeze_dir(tmp_path) / "rbd,-,bad.json"
    damaged.write_text("{not json")
    assert snapshots.thaw_leftovers(tmp_path, parse_spec("rbd/mine@s"), proc) == []
    assert other.exists() and not damaged.exists()
    assert len(snapshots.thaw_leftovers(tmp_path, None, proc)) == 1
    assert not other.exists()


def test_no_freeze_dir_no_rows(tmp_path: Path) -> None:
    assert snapshots.thaw_leftovers(tmp_path / "nothing") == []


def test_record_types_checked() -> None:
    with pytest.raises(ValueError):
        snapshots.FreezeRecord.from_dict([])
    with pytest.raises(ValueError):
        snapshots.FreezeRecord.from_dict({"spec": 1, "mountpoint": "/m", "devnum": "1:2",
                                          "pid": 1, "pid_start": 1})
    rec = snapshots.FreezeRecord.from_dict({"spec": "rbd/v", "mountpoint": "/m",
                                            "devnum": "1:2", "pid": 1, "pid_start": 1,
                                            "future_field": True})
    assert rec.mountpoint == "/m"


def _state(**kw: object) -> VolumeState:
    st = VolumeState(spec="rbd/v", conf="/c", client_id="admin", backend="fuse",
                     phase="attached", mountpoint="/srv/v", device="/dev/loop9",
                     fstype="ext4", steps=["map", "mount"])
    for k, v in kw.items():
        setattr(st, k, v)
    return st


def _host(mounts: list[hostfs.Mount]) -> SimpleNamespace:
    return SimpleNamespace(mounts=lambda: mounts)


def _mount(mp: str, dev: tuple[int, int]) -> hostfs.Mount:
    return hostfs.Mount(1, 0, dev[0], dev[1], "/", mp, "rw", "ext4", "/dev/loop9")


def test_freeze_target(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hostfs, "device_number", lambda dev: (7, 9))
    here = _host([_mount("/srv/v", (7, 9))])
    assert snapshots._freeze_target(here, None) is None
    assert snapshots._freeze_target(here, _state()) == ("/srv/v", "7:9")
    # read-only, map-only, or mounted from something else: nothing to freeze
    assert snapshots._freeze_target(here, _state(read_only=True)) is None
    assert snapshots._freeze_target(here, _state(mountpoint=None, steps=["map"])) is None
    assert snapshots._freeze_target(_host([_mount("/srv/v", (7, 1))]), _state()) is None
    with pytest.raises(Busy, match="did not finish"):
        snapshots._freeze_target(here, _state(phase="attaching", pid=1))
    with pytest.raises(UsageError, match="freezes only"):
        snapshots._freeze_target(here, _state(fstype="btrfs"))


def test_freeze_helper_refuses_an_unfreezable_filesystem() -> None:
    """The child's protocol end to end on /proc, which cannot be frozen."""
    h = freeze.FreezeHolder(Path("/proc"), 5)
    with pytest.raises(Unsupported, match="cannot be frozen"):
        h.freeze(10)
    assert h.child is None


def test_freeze_helper_exits_without_freezing_when_let_go() -> None:
    h = freeze.FreezeHolder(Path("/proc"), 5)
    h.start()
    child = h.child
    assert child is not None
    h.close()  # EOF before "freeze": the child ends and freezes nothing
    assert child.returncode == 0


def test_thaw_of_something_not_frozen_is_harmless() -> None:
    # FITHAW on a filesystem that is not frozen: EINVAL, reported as False
    assert freeze.thaw("/proc") is False
