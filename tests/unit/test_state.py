"""The journal and the per-volume lock, on real files and real processes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cephvol.errors import Busy, CephvolError, StepTimeout
from cephvol.state import StateStore, VolumeState


def test_save_load_remove(tmp_path: Path) -> None:
    s = StateStore(tmp_path)
    assert s.load("rbd,-,a") is None
    st = VolumeState("rbd/a", "/c.conf", "admin", backend="fuse", device="/dev/loop1",
                     steps=["map"])
    s.save("rbd,-,a", st)
    got = s.load("rbd,-,a")
    assert got is not None and got.device == "/dev/loop1" and got.steps == ["map"]
    assert s.keys() == ["rbd,-,a"]
    assert (tmp_path / "volumes" / "rbd,-,a.json").stat().st_mode & 0o777 == 0o600
    assert not list((tmp_path / "volumes").glob(".*tmp"))
    s.remove("rbd,-,a")
    s.remove("rbd,-,a")  # idempotent
    assert s.keys() == [] and s.load("rbd,-,a") is None


def test_unknown_fields_from_a_newer_version_are_ignored(tmp_path: Path) -> None:
    s = StateStore(tmp_path)
    s.save("k", VolumeState("rbd/k", "/c", "admin"))
    p = tmp_path / "volumes" / "k.json"
    d = json.loads(p.read_text())
    d["field_from_the_future"] = 1
    p.write_text(json.dumps(d))
    st = s.load("k")
    assert st is not None and st.spec == "rbd/k"


def test_corrupt_journal_is_quarantined_not_fatal(tmp_path: Path) -> None:
    s = StateStore(tmp_path)
    s.save("ok", VolumeState("rbd/ok", "/c", "admin"))
    (tmp_path / "volumes" / "k.json").write_text("{not json")
    assert s.load("k") is None
    assert not (tmp_path / "volumes" / "k.json").exists()
    assert (tmp_path / "volumes" / "k.json.corrupt").read_text() == "{not json"
    assert s.keys() == ["ok"] and s.corrupt_files() == [tmp_path / "volumes" / "k.json.corrupt"]
    assert s.load("ok") is not None  # the others are untouched


@pytest.mark.parametrize("body", ['[]', '{}', '{"spec": 5, "conf": "/c", "client_id": "a"}',
                                  '{"spec": "rbd/x", "conf": "/c", "client_id": "a", '
                                  '"steps": "map"}',
                                  '{"spec": "no/good/spec/here", "conf": "/c", '
                                  '"client_id": "a"}',
                                  '{"spec": "rbd/x", "conf": "/c", "client_id": "a", '
                                  '"extra": []}', 'null', '"text"'])
def test_wrongly_typed_journal_is_damage(tmp_path: Path, body: str) -> None:
    s = StateStore(tmp_path)
    (tmp_path / "volumes").mkdir()
    (tmp_path / "volumes" / "k.json").write_text(body)
    assert s.load("k") is None
    assert list(s.quarantined) == [str(tmp_path / "volumes" / "k.json.corrupt")]


def test_long_keys_get_bounded_file_names(tmp_path: Path) -> None:
    from cephvol.spec import parse_spec

    spec = parse_spec(f"{'p' * 63}/{'n' * 63}/{'i' * 96}@{'s' * 96}")
    s = StateStore(tmp_path)
    with s.lock(spec.key, timeout=1):
        s.save(spec.key, VolumeState(str(spec), "/c", "admin"))
    got = s.load(spec.key)
    assert got is not None and got.spec == str(spec)
    (stem,) = s.keys()
    assert len(stem) + len(".json") < 255 and s.load(stem) is not None
    other = parse_spec(f"{'p' * 63}/{'n' * 63}/{'i' * 96}@{'s' * 95}t")
    assert StateStore(tmp_path)._path(other.key) != s._path(spec.key)


def test_unwritable_state_dir_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "volumes").write_text("a file where a directory belongs")
    with pytest.raises(CephvolError, match="cannot write state file"):
        StateStore(tmp_path).save("k", VolumeState("rbd/k", "/c", "admin"))


_HOLD = """
import sys, time
from pathlib import Path
from cephvol.state import StateStore
with StateStore(Path(sys.argv[1])).lock("k"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _holder(root: Path, seconds: float) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-c", _HOLD, str(root), str(seconds)],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "held"
    return p


def test_lock_excludes_another_process(tmp_path: Path) -> None:
    p = _holder(tmp_path, 30)
    try:
        with pytest.raises(Busy, match="being changed by another cephvol"), \
                StateStore(tmp_path).lock("k", timeout=0):
            pass
        with pytest.raises(StepTimeout), StateStore(tmp_path).lock("k", timeout=0.3):
            pass
        with StateStore(tmp_path).lock("other", timeout=0):  # other volumes are free
            pass
    finally:
        p.kill()
        p.wait()
    # the kernel dropped the dead holder's lock: no stale lock file problem
    with StateStore(tmp_path).lock("k", timeout=0):
        pass


def test_lock_waits_for_a_short_holder(tmp_path: Path) -> None:
    p = _holder(tmp_path, 0.5)
    t0 = time.monotonic()
    with StateStore(tmp_path).lock("k", timeout=30):
        waited = time.monotonic() - t0
    p.wait()
    assert waited > 0.2
