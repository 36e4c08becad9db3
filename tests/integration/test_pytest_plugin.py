"""cephvol's pytest plugin (cephvol.testing.plugin), run the way a user runs it:
an inner pytest session in a directory of its own, with the plugin loaded
and nothing else (autoload off, so the result does not depend on whether
this venv's cephvol was installed before the entry point existed).

The inner sessions use this session's cluster through `--ceph-conf` (no
second cluster), except the keep-cluster test, which makes its own cold dev
cluster and then reuses it warm.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cephvol.testing import leaks
from tests.conftest import CephCluster, _root_ok


def _inner(d: Path, test_code: str, *args: str,
           timeout: float = 600) -> subprocess.CompletedProcess[str]:
    (d / "pytest.ini").write_text("[pytest]\n")  # rootdir here, not cephvol's pyproject
    (d / "test_inner.py").write_text(textwrap.dedent(test_code))
    env = dict(os.environ, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1", RECORD=str(d / "record"))
    env.pop("CEPH_CONF", None)
    env.pop("CEPHVOL_STATE_DIR", None)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "cephvol.testing.plugin", "-p",
         "no:cacheprovider", "--basetemp", str(d / "bt"), "-q", "-rA", *args, "test_inner.py"],
        cwd=d, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def _under(root: Path) -> list[str]:
    """Mounts, loop devices and processes naming `root` (none may be left)."""
    return leaks.leftovers(root)


def _records(d: Path) -> list[str]:
    p = d / "record"
    return p.read_text().split() if p.exists() else []


def test_plugin_is_inert_unless_its_fixtures_are_used(tmp_path: Path) -> None:
    cp = _inner(tmp_path, """
        def test_plain():
            assert 1 + 1 == 2
    """)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert "1 passed" in cp.stdout
    assert "cephvol:" not in cp.stdout  # no cluster was brought up
    assert not list((tmp_path / "bt").glob("cephvol*"))
    help_cp = subprocess.run([sys.executable, "-m", "pytest", "-p", "cephvol.testing.plugin",
                              "--help"], cwd=tmp_path, capture_output=True, text=True,
                             timeout=120, check=True,
                             env=dict(os.environ, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1"))
    assert "--cephvol-keep-cluster" in help_cp.stdout and "--ceph-conf" in help_cp.stdout


FIXTURES_AT_WORK = """
    import os
    import pytest
    from cephvol import api
    from cephvol.cluster import Cluster, ClusterConfig
    from cephvol.spec import parse_spec

    def record(*words):
        with open(os.environ["RECORD"], "a") as f:
            f.write(" ".join(str(w) for w in words) + "\\n")

    def test_existing_cluster_is_used(ceph_cluster):
        assert ceph_cluster.kind == "existing"
        assert ceph_cluster.conf == ceph_cluster.conf.absolute()

    @pytest.mark.cephvol_image(size="64M", features=["layering", "exclusive-lock"])
    def test_image_size_and_features_from_a_marker(ceph_cluster, rbd_image):
        with Cluster(ClusterConfig.from_env(ceph_cluster.conf)) as c:
            info = c.image_info(parse_spec(rbd_image.spec))
        assert info.size == 64 << 20
        assert sorted(info.features) == ["exclusive-lock", "layering"]
        record(rbd_image)

    @pytest.mark.parametrize("rbd_image", [{"size": "32M"}], indirect=True)
    def test_image_size_by_indirect_parametrization(rbd_image):
        assert rbd_image.size == 32 << 20
        record(rbd_image)

    def test_volume_is_mounted_and_writable(cephvol_volume):
        assert os.path.ismount(cephvol_volume.mountpoint)
        assert cephvol_volume.fstype == "ext4" and cephvol_volume.created_filesystem
        (cephvol_volume.mountpoint / "f").write_text("data")
        record(cephvol_volume.image, cephvol_volume.mountpoint)

    @pytest.mark.cephvol_volume(fstype="xfs", size="512M")
    def test_volume_fstype_from_a_marker(cephvol_volume):
        assert cephvol_volume.fstype == "xfs"
        record(cephvol_volume.image, cephvol_volume.mountpoint)

    def test_api_attach_detaches_as_a_context_manager(ceph_cluster, rbd_image, tmp_path):
        kw = ceph_cluster.api_kwargs()
        with api.attach(rbd_image.spec, tmp_path / "m", **kw) as vol:
            assert os.path.ismount(tmp_path / "m")
            assert [s.image for s in api.status(**kw) if s.mounted] == [rbd_image.spec]
            (vol.mountpoint / "x").write_text("x")
        assert not os.path.ismount(tmp_path / "m")
        assert api.status(**kw) == []
        record(rbd_image)
"""


def test_fixtures_give_real_images_and_volumes_and_clean_up(cluster: CephCluster,
                                                            tmp_path: Path) -> None:
    cp = _inner(tmp_path, FIXTURES_AT_WORK, "--ceph-conf", str(cluster.conf))
    assert cp.returncode == 0, cp.stdout[-3000:] + cp.stderr[-2000:]
    assert "6 passed" in cp.stdout
    assert "cephvol: used the cluster of" in cp.stdout
    specs = [w for w in _records(tmp_path) if w.startswith("rbd/")]
    assert len(specs) == 5
    for spec in specs:  # every image the fixtures made is gone again
        assert cluster.cli("info", spec).returncode == 3, spec
    assert _under(tmp_path / "bt") == []
    assert not list((tmp_path / "bt").glob("cephvol*"))  # the session directory went too


LEAKY = """
    import subprocess
    import uuid
    from cephvol import api

    def test_leaves_its_image_attached(ceph_cluster, rbd_image, tmp_path):
        api.attach(rbd_image.spec, tmp_path / "left-attached", **ceph_cluster.api_kwargs())

    def test_leaves_a_mount(ceph_cluster, tmp_path):
        (tmp_path / "left-mounted").mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "leak", str(tmp_path / "left-mounted")],
                       check=True)

    def test_leaves_a_volume_of_its_own(ceph_cluster, tmp_path):
        spec = f"rbd/own-{uuid.uuid4().hex[:8]}"
        with open(__import__("os").environ["RECORD"], "a") as f:
            f.write(spec + "\\n")
        api.create(spec, "64M", conf=ceph_cluster.conf)
        api.attach(spec, tmp_path / "own-volume", **ceph_cluster.api_kwargs())

    def test_leaves_a_process_running(ceph_cluster, tmp_path):
        import sys
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)",
                          str(tmp_path / "left-running")])

    def test_leaves_its_volume_busy(cephvol_volume):
        import sys, time
        held = cephvol_volume.mountpoint / "held-open"
        subprocess.Popen([sys.executable, "-c", "import sys, time; f = open(sys.argv[1], 'w'); "
                          "time.sleep(600)", str(held)])
        while not held.exists():
            time.sleep(0.05)

    def test_clean(ceph_cluster):
        pass
"""


def test_leak_check_fails_the_session_naming_each_leak(cluster: CephCluster,
                                                       tmp_path: Path) -> None:
    cp = _inner(tmp_path, LEAKY, "--ceph-conf", str(cluster.conf))
    out = cp.stdout
    assert cp.returncode == 1, out[-3000:] + cp.stderr[-2000:]
    # per test: the image rbd_image made was still attached at the test's end
    assert re.search(r"test_leaves_its_image_attached: rbd/t-\w+ was left attached "
                     r"\(/dev/loop\d+, mounted at \S+/left-attached\); detached by force", out)
    # at the session's end: the volume a test made itself, and a plain mount
    own = _records(tmp_path)[0]
    assert "the test session left things behind" in out
    assert re.search(rf"volume {re.escape(own)} \(attached, /dev/loop\d+, mounted at "
                     r"\S+/own-volume\)", out), out[-3000:]
    assert re.search(r"mount \S+/test_leaves_a_mount0/left-mounted", out)
    assert re.search(r"process \d+: \S+ -c import time; time.sleep\(600\) \S+/left-running",
                     out)
    # the volume a process still held: detach refused it (Busy), a forced one took it
    assert re.search(r"test_leaves_its_volume_busy: detaching rbd/t-\w+ failed \([^)]*busy",
                     out), out[-3000:]
    assert "6 passed, 3 errors" in out  # teardown errors, the tests themselves passed
    # and all of it was torn down: nothing under the inner session, and the
    # volume the leak check detached was released (else rm says "owned", 6)
    assert _under(tmp_path / "bt") == []
    cluster.cli("rm", own, check=True)


def test_keep_cluster_is_reused_warm_and_left_running(tmp_path: Path) -> None:
    why = _root_ok()
    if why:
        pytest.skip(why)
    from cephvol.devcluster import DevCluster

    kept = tmp_path / "kept"
    code = """
        def test_kept(ceph_cluster, cephvol_volume):
            assert ceph_cluster.kind == "kept"
            (cephvol_volume.mountpoint / "f").write_text("x")
    """
    try:
        first = _inner(tmp_path, code, "--cephvol-keep-cluster", str(kept))
        assert first.returncode == 0, first.stdout[-3000:]
        assert re.search(r"cephvol: dev cluster created \(cold\), up in [\d.]+s, kept in "
                         + re.escape(str(kept)), first.stdout)
        running = DevCluster(kept).daemon_state()
        assert all(running.values()), running  # left running for the next run
        second = _inner(tmp_path, code, "--cephvol-keep-cluster", str(kept))
        assert second.returncode == 0, second.stdout[-3000:]
        assert "cephvol: dev cluster already there (warm)" in second.stdout
        assert DevCluster(kept).daemon_state() == running  # the same daemons
        assert _under(tmp_path / "bt") == []
    finally:
        DevCluster(kept).down()
        leaks.brute_force_cleanup(kept, kill_all=True)
        shutil.rmtree(kept, ignore_errors=True)
    assert _under(kept) == []


def test_a_missing_ceph_conf_is_an_error_not_a_skip(tmp_path: Path) -> None:
    cp = _inner(tmp_path, """
        def test_needs_cluster(ceph_cluster):
            pass
    """, "--ceph-conf", str(tmp_path / "nope.conf"))
    assert cp.returncode == 1, cp.stdout[-2000:]
    assert f"ceph config {tmp_path / 'nope.conf'} does not exist" in cp.stdout
    assert "1 error" in cp.stdout
    assert not list((tmp_path / "bt").glob("cephvol*"))  # its session directory went too


def test_api_on_a_real_cluster_raises_with_exit_codes(cluster: CephCluster, image: str,
                                                       mnt: Path) -> None:
    """cephvol.api, which the fixtures are built on, against this session's
    cluster: results, idempotence, and errors carrying the CLI's exit codes."""
    from cephvol import api
    from cephvol.errors import ExitCode

    kw = {"conf": cluster.conf, "state_dir": cluster.state_dir}
    assert api.create(image, "64M", conf=cluster.conf).created
    assert not api.create(image, 64 << 20, conf=cluster.conf).created  # idempotent
    with pytest.raises(api.CephvolError) as e:
        api.create(image, "128M", conf=cluster.conf)
    assert e.value.exit_code == ExitCode.CONFLICT
    with pytest.raises(api.CephvolError) as e:
        api.attach(f"{image}-missing", mnt, **kw)
    assert e.value.exit_code == ExitCode.NOT_FOUND
    with api.attach(image, mnt, **kw) as vol:
        assert vol.created_filesystem and vol.fstype == "ext4" and os.path.ismount(mnt)
        again = api.attach(image, mnt, **kw)
        assert again.already_attached and again.device == vol.device
        [row] = api.status(**kw)
        assert (row.image, row.phase, row.mounted, row.mountpoint) == (image, "attached", True,
                                                                        mnt)
        with pytest.raises(api.CephvolError) as e:
            api.remove(image, **kw)
        assert e.value.exit_code == ExitCode.BUSY
    assert not os.path.ismount(mnt)
    assert api.status(**kw) == []
    assert api.detach(image, **kw).detached is False  # already detached: a no-op
    api.remove(image, **kw)
    with pytest.raises(api.CephvolError) as e:
        api.remove(image, **kw)
    assert e.value.exit_code == ExitCode.NOT_FOUND
