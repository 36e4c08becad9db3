"""The example project (examples/notes-service) passes its own tests through
the installed plugin, set up the way a user sets it up.

A fresh venv (Debian's python with system site packages: rados and rbd come
from python3-rados/python3-rbd), cephvol installed from a copy of this
working tree, not editable (pip builds and installs a wheel; click, pyroute2
and pytest come from PyPI), then the example. Its tests run with the plugin
found through the `pytest11` entry point and make their own cold dev
cluster. The venv and every copy live in tmp_path and are removed.

Takes about a minute here (pip ~25 s, the cold cluster ~12 s, the tests a
few seconds).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from cephvol.testing import leaks
from tests.conftest import REPO, _root_ok

# what a source checkout has that a user's copy would not; the rest is copied
_NOT_SHIPPED = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", "build",
                                      "dist", ".pytest_cache", ".ruff_cache", "*.deb", "vagrant",
                                      ".hypothesis")


def _run(argv: list[str], *, cwd: Path, env: dict[str, str],
         timeout: float) -> subprocess.CompletedProcess[str]:
    cp = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=timeout, check=False)
    assert cp.returncode == 0, f"{argv[:3]} -> {cp.returncode}\n{cp.stdout[-3000:]}\n" \
                               f"{cp.stderr[-3000:]}"
    return cp


def test_example_project_passes_through_the_installed_plugin(tmp_path: Path) -> None:
    why = _root_ok()
    if why:
        pytest.skip(why)
    src, example, venv = tmp_path / "cephvol-src", tmp_path / "notes-service", tmp_path / "venv"
    shutil.copytree(REPO, src, ignore=_NOT_SHIPPED)
    shutil.copytree(REPO / "examples" / "notes-service", example, ignore=_NOT_SHIPPED)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "CEPH_CONF", "CEPHVOL_STATE_DIR")
           and not k.startswith("PYTEST_")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    try:
        _run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(venv)],
             cwd=tmp_path, env=env, timeout=120)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
        _run([*pip, str(src)], cwd=tmp_path, env=env, timeout=600)
        _run([*pip, f"{example}[test]"], cwd=tmp_path, env=env, timeout=600)
        where = _run([str(venv / "bin" / "python"), "-c",
                      "import cephvol.testing.plugin as p; print(p.__file__)"],
                     cwd=tmp_path, env=env, timeout=60).stdout.strip()
        assert where.startswith(f"{venv}/lib/"), where  # the installed copy, not this tree
        cp = subprocess.run([str(venv / "bin" / "python"), "-m", "pytest", "-q", "-rA",
                             "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "bt")],
                            cwd=example, env=env, capture_output=True, text=True, timeout=900,
                            check=False)
        assert cp.returncode == 0, cp.stdout[-4000:] + cp.stderr[-2000:]
        assert "3 passed" in cp.stdout
        assert "cephvol: dev cluster created (cold)" in cp.stdout  # the plugin's, not ours
        assert leaks.leftovers(tmp_path) == []
    finally:
        leaks.brute_force_cleanup(tmp_path, kill_all=True)
        shutil.rmtree(tmp_path, ignore_errors=True)
    assert not tmp_path.exists()
