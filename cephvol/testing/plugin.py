"""pytest plugin: a real Ceph cluster, RBD images and mounted volumes as fixtures.

Registered through the `pytest11` entry point as "cephvol" (disable with
`-p no:cephvol`). Inert unless a test asks for one of its fixtures: loading
it adds three command-line options and three markers, nothing else; no
cluster starts and neither rados nor rbd is imported.

Fixtures
    ceph_cluster    session: a one-node dev cluster in a temporary directory,
                    torn down at the end; or the cluster of `--ceph-conf` /
                    $CEPH_CONF; or one kept in `--cephvol-keep-cluster DIR`
                    between runs (started if needed, never stopped).
    rbd_image       a fresh image per test, removed afterwards. Size, features
                    and pool via `@pytest.mark.cephvol_image(size="2G",
                    features=["layering"])` or indirect parametrization
                    (`@pytest.mark.parametrize("rbd_image", [{"size": "2G"}],
                    indirect=True)`).
    cephvol_volume  a fresh image attached and mounted (a cephvol.api.Attachment:
                    .mountpoint, .device, .image), detached and removed
                    afterwards; backend, fstype, size, mount_options via
                    `@pytest.mark.cephvol_volume(...)` or indirect parametrization.

Leak check: a test that leaves an image of `rbd_image`/`cephvol_volume`
attached, or a volume's mount busy, errors at its teardown, naming it. At
the session's end every volume still attached in the session's state
directory, every mount, loop device or process (a mapping daemon, a server a
test started) under the session's directories or pytest's tmp_path root, and
every loop device bound since the session began whose backing file shows as
one of the session's images lazily detached, is reported and the session
fails; all of it is torn down first (forced detach, lazy unmount, kill), so
the next run starts clean. The cluster's own daemons are not leaks.

pytest-xdist: one cluster per worker. Each worker's session directory is
under its own temporary directory (`popen-gwN`), and a kept cluster lives in
`DIR/gwN`; loop devices are then only checked by path, since other workers
bind their own. A dev cluster costs about 400 MiB of memory (the mgr is most
of it) and ~15 s of start-up: a few workers, not one per core.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from cephvol.api import Attachment
    from cephvol.testing.session import CephTestCluster, RbdImage

_SESSION = pytest.StashKey[Any]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("cephvol", "cephvol fixtures (ceph_cluster, rbd_image, "
                            "cephvol_volume)")
    group.addoption("--ceph-conf", metavar="PATH", default=None,
                    help="use the existing cluster of this ceph.conf instead of a dev "
                    "cluster [$CEPH_CONF]")
    group.addoption("--cephvol-keep-cluster", metavar="DIR", default=None,
                    help="keep the dev cluster in DIR between runs: started if needed, "
                    "left running (stop it: cephvol dev-cluster down --dir DIR)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cephvol_image(size='1G', features=None, pool='rbd'): "
                            "the image rbd_image makes")
    config.addinivalue_line("markers", "cephvol_volume(backend='auto', fstype='ext4', "
                            "size='1G', mount_options=()): the volume cephvol_volume attaches")


def _params(request: pytest.FixtureRequest, marker: str, allowed: set[str]) -> dict[str, Any]:
    """The marker's keywords, overridden by indirect parametrization."""
    out: dict[str, Any] = {}
    m = request.node.get_closest_marker(marker)
    if m is not None:
        out.update(m.kwargs)
    param = getattr(request, "param", None)
    if param is not None:
        if not isinstance(param, dict):
            raise pytest.UsageError(f"{request.fixturename}: parametrize it with dicts, "
                                    f"e.g. {{'size': '2G'}}, not {param!r}")
        out.update(param)
    unknown = set(out) - allowed
    if unknown:
        raise pytest.UsageError(f"{request.fixturename}: unknown parameter(s) "
                                f"{', '.join(sorted(unknown))}; known: "
                                f"{', '.join(sorted(allowed))}")
    return out


def _worker() -> str | None:
    return os.environ.get("PYTEST_XDIST_WORKER")


@pytest.fixture(scope="session")
def ceph_cluster(request: pytest.FixtureRequest,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephTestCluster]:
    """A Ceph cluster for the whole session (see the module docstring)."""
    from cephvol.testing.session import ClusterSession, missing_requirements

    opt = request.config.getoption
    conf = opt("--ceph-conf") or os.environ.get("CEPH_CONF")
    keep = opt("--cephvol-keep-cluster")
    why = missing_requirements(dev_cluster=conf is None)
    if why:
        pytest.skip(why)
    keep_dir = None
    if keep:
        keep_dir = Path(keep).absolute()
        if _worker():
            keep_dir = keep_dir / _worker()
    session = ClusterSession(tmp_path_factory.mktemp("cephvol"),
                             tmp_path_factory.getbasetemp(),
                             conf=Path(conf) if conf else None, keep_dir=keep_dir,
                             xdist=_worker() is not None)
    request.config.stash[_SESSION] = session
    try:
        yield session.start()
    finally:
        left = session.finish()
        if left:
            pytest.fail("cephvol: the test session left things behind (now torn down): "
                        + "; ".join(left), pytrace=False)


@pytest.fixture
def rbd_image(request: pytest.FixtureRequest,
              ceph_cluster: CephTestCluster) -> Iterator[RbdImage]:
    """A fresh image, removed afterwards; errors at teardown if left attached."""
    from cephvol.testing.session import fresh_image

    p = _params(request, "cephvol_image", {"size", "features", "pool"})
    found: list[str] = []
    with fresh_image(ceph_cluster, leaks_found=found, **p) as img:
        yield img
    if found:
        pytest.fail(f"{request.node.nodeid}: " + "; ".join(found), pytrace=False)


@pytest.fixture
def cephvol_volume(request: pytest.FixtureRequest,
                   ceph_cluster: CephTestCluster) -> Iterator[Attachment]:
    """A fresh image, attached and mounted; detached (not forced) and removed
    afterwards. A detach that fails (the mount still in use, a flush that
    failed) errors at teardown, after a forced detach cleaned up."""
    from cephvol import api
    from cephvol.errors import CephvolError
    from cephvol.testing.session import fresh_image

    p = _params(request, "cephvol_volume", {"backend", "fstype", "size", "features",
                                            "mount_options"})
    found: list[str] = []
    img_kw = {k: p.pop(k) for k in ("size", "features") if k in p}
    with fresh_image(ceph_cluster, leaks_found=found, **img_kw) as img:
        vol = api.attach(img.spec, ceph_cluster.new_mountpoint(),
                         backend=p.get("backend", "auto"), fstype=p.get("fstype", "ext4"),
                         mount_options=tuple(p.get("mount_options", ())),
                         **ceph_cluster.api_kwargs())
        try:
            yield vol
        finally:
            try:
                api.detach(img.spec, **ceph_cluster.api_kwargs())
            except CephvolError as exc:
                found.append(f"detaching {img.spec} failed ({exc})")
    if found:
        pytest.fail(f"{request.node.nodeid}: " + "; ".join(found), pytrace=False)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    session = config.stash.get(_SESSION, None)
    if session is None or session.cluster is None:
        return
    c = session.cluster
    if c.kind == "existing":
        terminalreporter.write_line(f"cephvol: used the cluster of {c.conf}")
    else:
        how = "created (cold)" if c.created else "already there (warm)"
        terminalreporter.write_line(f"cephvol: dev cluster {how}, up in {c.seconds:.1f}s"
                                    + (f", kept in {c.conf.parent}" if c.kind == "kept"
                                       else ""))
