"""Shared fixtures: a real one-node cluster for the session, and leak checks.

The cluster is started by the same code operators use (`cephvol dev-cluster`),
in a temp directory, on 127.0.0.1 with free ports. At session end the suite
itself asserts that nothing it made is left: no mounts, loop devices,
rbd-fuse processes, Ceph daemons or temp dirs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cephvol.testing import leaks

REPO = Path(__file__).resolve().parent.parent
CEPHVOL = str(Path(sys.executable).parent / "cephvol")


def _root_ok() -> str | None:
    if os.geteuid() != 0:
        return "integration tests need root (loop devices, mounts, FUSE)"
    for tool in ("ceph-mon", "ceph-osd", "rbd-fuse", "losetup"):
        if not shutil.which(tool):
            return f"{tool} is not installed; run scripts/setup"
    return None


@dataclass
class CephCluster:
    base: Path
    conf: Path
    state_dir: Path

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update({"CEPH_CONF": str(self.conf), "CEPHVOL_STATE_DIR": str(self.state_dir),
                    "CEPHVOL_CONNECT_TIMEOUT": "10"})
        env.update(extra)
        return env

    def cli(self, *args: str, check: bool = False, timeout: float = 120,
            **extra_env: str) -> subprocess.CompletedProcess[str]:
        cp = subprocess.run([CEPHVOL, *args], capture_output=True, text=True,
                            env=self.env(**extra_env), timeout=timeout, check=False)
        if check and cp.returncode != 0:
            raise AssertionError(f"cephvol {' '.join(args)} -> {cp.returncode}: {cp.stderr}")
        return cp


# shared with the pytest plugin other projects use (cephvol.testing)
_bound_loops = leaks.bound_loops

# loop devices bound before the session: a loop whose rbd-fuse mount was lazily
# detached shows its backing file as "/IMAGE", outside the session directory,
# so new loops are found by difference, not by path
_LOOPS_AT_START: set[str] = set()


def _leftovers(base: Path) -> list[str]:
    return leaks.leftovers(base, _LOOPS_AT_START)


@pytest.fixture(scope="session")
def session_base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    _LOOPS_AT_START.update(_bound_loops())
    base = Path(tmp_path_factory.mktemp("cephvol"))
    yield base


@pytest.fixture(scope="session")
def cluster(session_base: Path) -> Iterator[CephCluster]:
    why = _root_ok()
    if why:
        pytest.skip(why)
    from cephvol.devcluster import DevCluster

    dc = DevCluster(session_base / "cluster")
    state = session_base / "state"
    try:
        dc.up()
        yield CephCluster(session_base, dc.conf, state)
    finally:
        _force_detach_all(session_base, dc.conf, state)
        # what cephvol's own detach could not remove is a finding, reported
        # below; it is still torn down by brute force first, so a failed
        # session can never hang on a FUSE mount whose cluster has gone
        # (the cluster's own daemons are still meant to run at this point)
        left = [x for x in _leftovers(session_base) if not x.startswith("process ")
                or x.split(": ", 1)[1].startswith("rbd-fuse")]
        _brute_force_cleanup(session_base)
        dc.down()
        left += [f"after cluster down: {x}" for x in _leftovers(session_base)]
        _brute_force_cleanup(session_base, kill_all=True)
        shutil.rmtree(session_base, ignore_errors=True)
        assert not left, f"the test session left things behind: {left}"
        assert not session_base.exists(), f"{session_base} could not be removed"


_brute_force_cleanup = leaks.brute_force_cleanup


def _force_detach_all(base: Path, conf: Path, state: Path) -> None:
    """Last-resort teardown so a failed test cannot leak into the next run."""
    env = dict(os.environ, CEPH_CONF=str(conf), CEPHVOL_STATE_DIR=str(state),
               CEPHVOL_CONNECT_TIMEOUT="5")
    vols = state / "volumes"
    specs = set()
    if vols.exists():
        from cephvol.spec import spec_from_key

        for p in vols.glob("*.json*"):
            try:
                specs.add(str(json.loads(p.read_text())["spec"]))
            except (OSError, ValueError, KeyError, TypeError):
                with contextlib.suppress(Exception):
                    specs.add(str(spec_from_key(p.name.split(".json")[0])))
    fuse = state / "fuse"
    if fuse.exists():
        from cephvol.spec import spec_from_key

        for d in fuse.iterdir():
            specs.add(str(spec_from_key(d.name)))
    for s in specs:
        subprocess.run([CEPHVOL, "detach", "--force", "--lazy", s], env=env,
                       capture_output=True, timeout=120, check=False)


@pytest.fixture
def image(cluster: CephCluster) -> Iterator[str]:
    """A unique image name; whatever a test leaves attached is detached, then removed."""
    name = f"rbd/t-{uuid.uuid4().hex[:10]}"
    yield name
    cluster.cli("detach", "--force", "--lazy", name, timeout=180)
    cluster.cli("rm", name, timeout=60)


@pytest.fixture
def mnt(cluster: CephCluster) -> Iterator[Path]:
    p = cluster.base / "mnt" / uuid.uuid4().hex[:8]
    yield p
    if p.exists() and not os.path.ismount(p):
        shutil.rmtree(p, ignore_errors=True)


# -- bounds for the whole run -------------------------------------------------
#
# A CI run is cut at 90 minutes and a cut run prints no summary. Two bounds keep
# a run that goes wrong readable: each test body has a time limit (a hung test
# fails, it does not eat the run), and once CEPHVOL_TEST_BUDGET seconds have
# gone, the remaining tests fail at once, naming why, so the summary still
# prints. One test that breaks the shared cluster is named, and the cluster
# restored, so it does not take every later test with it.

_T0 = time.monotonic()
# seconds a test body may run; a test that needs longer says so with
# @pytest.mark.limit(seconds)
_LIMITS = {"vm": 1500.0, "integration": 600.0}
_UNIT_LIMIT = 300.0


class LimitExceeded(Exception):
    """A test body outlived its limit (raised from SIGALRM in the main thread)."""


def _limit(item: pytest.Item) -> float:
    mark = item.get_closest_marker("limit")
    if mark:
        return float(mark.args[0])
    for name, seconds in _LIMITS.items():
        if item.get_closest_marker(name):
            return seconds
    return _UNIT_LIMIT


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    budget = os.environ.get("CEPHVOL_TEST_BUDGET")
    if budget and time.monotonic() - _T0 > float(budget):
        pytest.fail(f"not run: the run's time budget (CEPHVOL_TEST_BUDGET={budget} s) is "
                    "spent; see --durations below for where it went", pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    seconds = _limit(item)

    def expired(signum: int, frame: object) -> None:
        raise LimitExceeded(f"{item.nodeid} ran longer than its {seconds:.0f} s limit")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call":
        item.stash[_FAILED] = rep.failed


_FAILED = pytest.StashKey[bool]()


def _write_probe(conf: Path) -> str | None:
    """None when the cluster takes a small write within 30 s, else why not.
    In a child process: a wedged cluster must not hang the test session."""
    try:
        cp = subprocess.run(["rados", "-c", str(conf), "-p", "rbd", "put",
                             "cephvol-suite-probe", "/dev/null"],
                            capture_output=True, text=True, timeout=30, check=False)
    except subprocess.TimeoutExpired:
        return "a 0-byte write to pool rbd did not finish in 30 s"
    if cp.returncode:
        return f"a 0-byte write to pool rbd failed: {cp.stderr.strip()[-200:]}"
    return None


@pytest.fixture(autouse=True)
def _session_cluster_survives(request: pytest.FixtureRequest) -> Iterator[None]:
    """After a test that used the session cluster: its daemons still run (always
    checked: cheap), and, after a failed test, it still takes writes. If not,
    the test errors naming that, and the cluster is restarted for the rest."""
    if "cluster" not in request.fixturenames:
        yield
        return
    c: CephCluster = request.getfixturevalue("cluster")
    yield
    from cephvol.devcluster import DevCluster

    dc = DevCluster(c.conf.parent)
    dead = [n for n, pid in dc.daemon_state().items() if pid is None]
    if dead:
        why: str | None = f"{', '.join(dead)} not running"
    elif request.node.stash.get(_FAILED, False):
        why = _write_probe(c.conf)
    else:
        why = None
    if why is None:
        return
    hint = _log_hint(c.conf.parent / "log")
    if not dead:
        dc.down(timeout=20)  # alive but wedged: restart all of it
    dc.up()
    pytest.fail(f"the session cluster was broken after this test ({why}); restarted it. "
                f"Last daemon complaint: {hint}", pytrace=False)


def _log_hint(logs: Path) -> str:
    """The last line of the daemons' logs that looks like why one stopped."""
    marks = ("abort", "assert", "Caught signal", "suicide", "ERROR", "error")
    found = "none logged"
    for name in ("mon.a.log", "osd.0.log", "mgr.x.log"):
        with contextlib.suppress(OSError):
            for line in (logs / name).read_text(errors="replace").splitlines()[-2000:]:
                if any(m in line for m in marks):
                    found = f"{name}: {line.strip()[:300]}"
    return found


# -- the vm tests' hosts, built while the rest runs ---------------------------

_PREBUILD: list[subprocess.Popen[bytes]] = []


def pytest_collection_finish(session: pytest.Session) -> None:
    """On a machine without the cached guest image or deb root (every fresh CI
    machine) start building them now, in the background at low priority, so
    the vm tests at the end find them ready (tests/vm/prebuild.py)."""
    if os.environ.get("CEPHVOL_NO_PREBUILD") or not any(
            i.get_closest_marker("vm") for i in session.items):
        return
    from tests.vm import harness, prebuild

    if harness.unavailable() or not prebuild.missing():
        return
    log = open(harness.cache_root().parent / "cephvol-prebuild.log", "wb")
    _PREBUILD.append(subprocess.Popen(
        ["nice", "-n", "19", "ionice", "-c", "3", sys.executable, "-m", "tests.vm.prebuild"],
        cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True))
    log.close()


def pytest_sessionfinish(session: pytest.Session) -> None:
    for p in _PREBUILD:  # bounded by its builds' own timeouts; never left running
        try:
            p.wait(timeout=2400)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _PREBUILD:
        from tests.vm import harness

        log = harness.cache_root().parent / "cephvol-prebuild.log"
        with contextlib.suppress(OSError):
            for line in log.read_text(errors="replace").splitlines()[-4:]:
                terminalreporter.write_line(line)
