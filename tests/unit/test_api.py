"""cephvol.api without a cluster: bad input is refused before anything is
touched (so the error is a UsageError, exit 2, never a ClusterError for a
cluster that does not exist), and the calls that need no cluster work.

The same calls against a real cluster: tests/integration/test_pytest_plugin.py
and the example project (tests/integration/test_example_project.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cephvol import api
from cephvol.errors import CephvolError, ExitCode, UsageError


@pytest.fixture
def where(tmp_path: Path) -> dict[str, object]:
    # a config that does not exist: any call that tried to connect would
    # raise ClusterError (exit 7), not the UsageError these tests expect
    return {"conf": tmp_path / "no-such-ceph.conf", "state_dir": tmp_path / "state"}


def test_stable_names_are_exported() -> None:
    for name in api.__all__:
        assert hasattr(api, name), name
    assert api.CephvolError is CephvolError


@pytest.mark.parametrize("size", [0, -512, 1000, "ten gigs", "0G", True, 1.5])
def test_create_refuses_a_bad_size_before_connecting(size: object, where: dict) -> None:
    with pytest.raises(UsageError) as e:
        api.create("rbd/img", size, conf=where["conf"])  # type: ignore[arg-type]
    assert e.value.exit_code == ExitCode.USAGE


@pytest.mark.parametrize("image", ["", "rbd/", "rbd/a/b/c", "a b", "rbd/img@snap", 42])
def test_create_refuses_a_bad_spec(image: object, where: dict) -> None:
    with pytest.raises(UsageError):
        api.create(image, "1G", conf=where["conf"])  # type: ignore[arg-type]


@pytest.mark.parametrize(("mountpoint", "kw"), [
    ("relative/dir", {}),
    ("/", {}),
    ("/mnt/a/../b", {}),
    ("/mnt/ok", {"mount_options": ("noatime;rm -rf /",)}),
    ("/mnt/ok", {"force": True}),  # force only with takeover
])
def test_attach_refuses_bad_input_before_connecting(mountpoint: str, kw: dict,
                                                    where: dict) -> None:
    with pytest.raises(UsageError):
        api.attach("rbd/img", mountpoint, **kw, **where)
    assert not (where["state_dir"] / "volumes").exists() or not any(  # type: ignore[operator]
        (where["state_dir"] / "volumes").iterdir())  # type: ignore[operator]


def test_status_and_detach_need_no_cluster_when_nothing_is_attached(where: dict) -> None:
    assert api.status(**where) == []
    res = api.detach("rbd/img", **where)
    assert res == api.Detached("rbd/img", False, (), None)


def test_attachment_context_manager_detaches_on_leaving(where: dict,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, dict]] = []

    def fake_detach(image: str, **kw: object) -> api.Detached:
        calls.append((image, kw))
        return api.Detached(image, True)

    monkeypatch.setattr(api, "detach", fake_detach)
    att = api.Attachment("rbd/img", "/dev/loop9", Path("/mnt/x"), "fuse", "ext4", False,
                         True, False, api._Where(**where))  # type: ignore[arg-type]
    with pytest.raises(KeyError), att as vol:
        assert vol is att
        raise KeyError("the body failed")  # still detached
    assert calls == [("rbd/img", {"force": False, "lazy": False, "conf": where["conf"],
                                  "client_id": None, "connect_timeout": None,
                                  "state_dir": where["state_dir"]})]


def test_dev_cluster_binds_loopback_only() -> None:
    with pytest.raises(UsageError):
        api.DevCluster(addr="192.0.2.10")
    with pytest.raises(UsageError):
        api.DevCluster(addr="not-an-ip")
    with pytest.raises(UsageError):
        api.DevCluster(timeout=0)


def test_dev_cluster_before_up_has_no_directory() -> None:
    dc = api.DevCluster()
    with pytest.raises(UsageError):
        _ = dc.conf
    assert dc.down() == []  # nothing started, nothing to stop


def test_dev_cluster_in_a_given_directory(tmp_path: Path) -> None:
    dc = api.DevCluster(tmp_path / "c")
    assert dc.conf == tmp_path / "c" / "ceph.conf"
    assert dc.env() == {"CEPH_CONF": str(tmp_path / "c" / "ceph.conf")}
    assert dc.down() == []  # no pid files: nothing stopped, the directory stays ours


def test_importing_the_api_and_the_plugin_is_cheap() -> None:
    """The pytest plugin is loaded into every pytest run of a venv that has
    cephvol: it must not pull in librados, librbd or cephvol's lifecycle."""
    code = ("import sys, cephvol.api, cephvol.testing.plugin; "
            "print(sorted(m for m in ('rados', 'rbd', 'pyroute2', 'cephvol.lifecycle', "
            "'cephvol.cluster') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert out.strip() == "[]"
