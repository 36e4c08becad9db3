"""The seed use case under a real systemd (PID 1 in the guest, krbd): an
application unit attaches in ExecStartPre=, gets the device through the env
file, and detaches in ExecStopPost= on every way it can stop."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest

from cephvol.units import escape
from tests.vm.conftest import NsCluster
from tests.vm.harness import REPO, Guest
from tests.vm.test_krbd_backend import cv, ok

_APP = """[Unit]
Description=cephvol test application on {spec}
After=network-online.target
Wants=network-online.target
[Service]
Type=exec
Environment=CEPHVOL_STEP_TIMEOUT=30
ExecStartPre=/usr/local/bin/cephvol attach {spec} --mountpoint /srv/app/{name} \
    --env-file /run/cephvol/{unit}.env
EnvironmentFile=-/run/cephvol/{unit}.env
ExecStart={start}
ExecStopPost=/usr/local/bin/cephvol detach {spec}
TimeoutStopSec=120
"""
_WRITER = ("/bin/sh -c 'echo \"$CEPHVOL_DEVICE\" > \"$CEPHVOL_MOUNTPOINT/device\"; "
           "i=0; while true; do echo $i >> \"$CEPHVOL_MOUNTPOINT/log\"; i=$((i+1)); "
           "sync \"$CEPHVOL_MOUNTPOINT/log\"; sleep 0.2; done'")


@pytest.fixture
def app(guest_ceph: Guest, vm_cluster: NsCluster) -> Iterator[tuple[str, str]]:
    name = f"u-{uuid.uuid4().hex[:8]}"
    spec = f"rbd/{name}"
    vm_cluster.cli("create", spec, "--size", "64M")
    yield spec, name
    guest_ceph.run(["systemctl", "stop", f"cvapp-{name}"])
    cv(guest_ceph, "detach", "--force", spec)
    vm_cluster.run(["cephvol", "rm", spec])


def _install(g: Guest, spec: str, name: str, start: str) -> str:
    unit = f"cvapp-{name}"
    g.put(f"/etc/systemd/system/{unit}.service",
          _APP.format(spec=spec, name=name, unit=unit, start=start).encode(), 0o644)
    ok(g.run(["systemctl", "daemon-reload"]))
    return unit


def _state(g: Guest, unit: str) -> str:
    return g.run(["systemctl", "show", "-p", "ActiveState", "--value", unit]).stdout.strip()


def _wait(g: Guest, unit: str, states: set[str], timeout: float = 120) -> str:
    end = time.monotonic() + timeout
    while True:
        s = _state(g, unit)
        if s in states or time.monotonic() > end:
            return s
        time.sleep(0.5)


def _assert_detached(g: Guest, unit: str, name: str) -> None:
    assert ok(g.run(["ls", "/sys/bus/rbd/devices"])).strip() == ""
    assert g.run(["mountpoint", "-q", f"/srv/app/{name}"]).rc != 0
    assert g.run(["test", "-e", f"/run/cephvol/{unit}.env"]).rc != 0
    assert ok(cv(g, "status", "--json")).strip() == "[]"


def _verify(g: Guest, unit_path: str) -> None:
    """systemd-analyze verify passes and has nothing to say about our unit."""
    v = g.run(["systemd-analyze", "verify", unit_path], timeout=120)
    base = unit_path.rsplit("/", 1)[1]
    name = base.split("@", 1)[0] + "@" if "@" in base else base.removesuffix(".service")
    assert v.rc == 0 and name not in v.stderr, v.stderr


def _lines_written(g: Guest, spec: str, name: str) -> tuple[str, int]:
    ok(cv(g, "attach", spec, "--mountpoint", f"/srv/check/{name}"))
    dev = ok(g.run(["cat", f"/srv/check/{name}/device"])).strip()
    lines = ok(g.run(["cat", f"/srv/check/{name}/log"])).split()
    ok(cv(g, "detach", spec))
    assert lines == [str(i) for i in range(len(lines))]  # no gap, no torn line
    return dev, len(lines)


def test_stop_detaches_and_keeps_the_data(guest_ceph: Guest, app: tuple[str, str]) -> None:
    spec, name = app
    unit = _install(guest_ceph, spec, name, _WRITER)
    ok(guest_ceph.run(["systemctl", "start", unit], timeout=180))
    env = ok(guest_ceph.run(["cat", f"/run/cephvol/{unit}.env"]))
    assert 'CEPHVOL_DEVICE="/dev/rbd' in env and f'CEPHVOL_IMAGE="{spec}"' in env
    time.sleep(3)
    ok(guest_ceph.run(["systemctl", "stop", unit], timeout=180))
    _assert_detached(guest_ceph, unit, name)
    dev, n = _lines_written(guest_ceph, spec, name)
    assert dev.startswith("/dev/rbd") and n >= 5


def test_crashed_container_is_detached(guest_ceph: Guest, app: tuple[str, str]) -> None:
    spec, name = app
    unit = _install(guest_ceph, spec, name, _WRITER)
    ok(guest_ceph.run(["systemctl", "start", unit], timeout=180))
    time.sleep(2)
    ok(guest_ceph.run(["systemctl", "kill", "-s", "KILL", unit]))
    assert _wait(guest_ceph, unit, {"failed", "inactive"}) in ("failed", "inactive")
    _assert_detached(guest_ceph, unit, name)
    assert _lines_written(guest_ceph, spec, name)[1] >= 3


def test_failed_start_is_detached(guest_ceph: Guest, app: tuple[str, str]) -> None:
    spec, name = app
    # the container runtime cannot even be started: `systemctl start` fails
    unit = _install(guest_ceph, spec, name, "/nonexistent/container-runtime run db")
    assert guest_ceph.run(["systemctl", "start", unit], timeout=180).rc != 0
    assert _wait(guest_ceph, unit, {"failed", "inactive"}) in ("failed", "inactive")
    _assert_detached(guest_ceph, unit, name)


def test_template_unit_attaches_and_detaches(guest_ceph: Guest,
                                             app: tuple[str, str]) -> None:
    spec, _ = app
    guest_ceph.put("/etc/systemd/system/cephvol@.service",
                   (REPO / "units" / "cephvol@.service").read_bytes(), 0o644)
    ok(guest_ceph.run(["systemctl", "daemon-reload"]))
    inst = f"cephvol@{escape(spec)}.service"
    _verify(guest_ceph, f"/etc/systemd/system/{inst}")
    ok(guest_ceph.run(["systemctl", "start", inst], timeout=180))
    env = ok(guest_ceph.run(["cat", f"/run/cephvol/{escape(spec)}.env"]))
    assert f'CEPHVOL_MOUNTPOINT="/srv/cephvol/{spec}"' in env
    assert guest_ceph.run(["mountpoint", "-q", f"/srv/cephvol/{spec}"]).rc == 0
    ok(guest_ceph.run(["systemctl", "stop", inst], timeout=180))
    assert ok(guest_ceph.run(["ls", "/sys/bus/rbd/devices"])).strip() == ""
    assert guest_ceph.run(["test", "-e", f"/run/cephvol/{escape(spec)}.env"]).rc != 0


def test_cleanup_unit_detaches_everything_when_stopped(guest_ceph: Guest,
                                                       app: tuple[str, str]) -> None:
    spec, name = app
    guest_ceph.put("/etc/systemd/system/cephvol-cleanup.service",
                   (REPO / "units" / "cephvol-cleanup.service").read_bytes(), 0o644)
    ok(guest_ceph.run(["systemctl", "daemon-reload"]))
    _verify(guest_ceph, "/etc/systemd/system/cephvol-cleanup.service")
    ok(guest_ceph.run(["systemctl", "start", "cephvol-cleanup"], timeout=180))
    ok(cv(guest_ceph, "attach", spec, "--mountpoint", f"/srv/manual/{name}"))
    ok(guest_ceph.run(["sh", "-c", f"echo kept > /srv/manual/{name}/f"]))
    ok(guest_ceph.run(["systemctl", "stop", "cephvol-cleanup"], timeout=300))  # = shutdown
    assert ok(guest_ceph.run(["ls", "/sys/bus/rbd/devices"])).strip() == ""
    assert ok(cv(guest_ceph, "status", "--json")).strip() == "[]"
    ok(cv(guest_ceph, "attach", spec, "--mountpoint", f"/srv/manual/{name}"))
    assert ok(guest_ceph.run(["cat", f"/srv/manual/{name}/f"])).strip() == "kept"
    ok(cv(guest_ceph, "detach", spec))
