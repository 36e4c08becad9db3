"""The seed use case under a real systemd (PID 1 in the guest, krbd): an
application unit attaches in ExecStartPre=, gets the device through the env
file, and detaches in ExecStopPost= on every way it can stop."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from cephvol.units import escape
from tests.vm.conftest import NsCluster
from tests.vm.harness import Guest
from tests.vm.test_krbd_backend import cv, ok

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


def _install(g: Guest, spec: str, name: str, start: str, *, verify: bool = True) -> str:
    """The application unit as an operator gets it: `cephvol units render`."""
    unit = f"cvapp-{name}"
    ok(cv(g, "units", "render", spec, "--for", "plain", "--name", unit, "--command", start,
          "--mountpoint", f"/srv/app/{name}", "--setenv", "CEPHVOL_STEP_TIMEOUT=30",
          "-o", "/etc/systemd/system"))
    if verify:  # (a unit whose command does not exist cannot pass, by design)
        _verify(g, f"/etc/systemd/system/{unit}.service")
    ok(g.run(["systemctl", "daemon-reload"]))
    return unit


def _journal(g: Guest, spec: str, want: set[str], timeout: float = 30) -> list[dict[str, Any]]:
    """cephvol's structured journal entries for one volume, once the steps in
    `want` are all there (journald receives them asynchronously)."""
    end = time.monotonic() + timeout
    while True:
        out = ok(g.run(["journalctl", "-o", "json", "--no-pager", "SYSLOG_IDENTIFIER=cephvol",
                        f"VOLUME={spec}"]))
        entries = [json.loads(ln) for ln in out.splitlines() if ln.strip()]
        if want <= {e.get("STEP") for e in entries} or time.monotonic() > end:
            return entries


def _assert_journal(g: Guest, spec: str, unit: str, *, first_attach: bool) -> None:
    steps = {"map", "mount", "attached", "sync", "umount", "unmap", "detached"}
    if first_attach:
        steps.add("mkfs")
    entries = [e for e in _journal(g, spec, steps) if e.get("_SYSTEMD_UNIT") == f"{unit}.service"]
    assert steps <= {e["STEP"] for e in entries}, entries
    for e in entries:
        assert e["VOLUME"] == spec and e["BACKEND"] == "krbd", e
        assert e["DEVICE"].startswith("/dev/rbd"), e
        assert e["PRIORITY"] == "6"  # info
    mounts = [e for e in entries if e["STEP"] == "mount"]
    assert mounts and all(e["MOUNTPOINT"].startswith("/srv/app/") for e in mounts)


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
    _assert_journal(guest_ceph, spec, unit, first_attach=True)
    dev, n = _lines_written(guest_ceph, spec, name)
    assert dev.startswith("/dev/rbd") and n >= 5
    # the key is in neither the journal (all of it) nor the unit or env files;
    # grep reads the key from a file, so it is on no command line either
    scan = ("sed -n 's/^[[:space:]]*key *= *//p' /etc/ceph/keyring > /run/k; "
            "test $(wc -c < /run/k) -gt 30 || exit 9; "
            "{ journalctl -o export --no-pager; cat /etc/systemd/system/" + unit + ".service "
            "/run/cephvol/*.env 2>/dev/null; } | grep -c -F -f /run/k; rc=$?; rm -f /run/k; "
            "exit $rc")
    found = guest_ceph.run(["sh", "-c", scan], timeout=120)
    assert (found.rc, found.stdout.strip()) == (1, "0"), found


def test_crashed_container_is_detached(guest_ceph: Guest, app: tuple[str, str]) -> None:
    spec, name = app
    unit = _install(guest_ceph, spec, name, _WRITER)
    ok(guest_ceph.run(["systemctl", "start", unit], timeout=180))
    time.sleep(2)
    ok(guest_ceph.run(["systemctl", "kill", "-s", "KILL", unit]))
    assert _wait(guest_ceph, unit, {"failed", "inactive"}) in ("failed", "inactive")
    _assert_detached(guest_ceph, unit, name)
    _assert_journal(guest_ceph, spec, unit, first_attach=True)
    assert _lines_written(guest_ceph, spec, name)[1] >= 3


def test_failed_start_is_detached(guest_ceph: Guest, app: tuple[str, str]) -> None:
    spec, name = app
    # the container runtime cannot even be started: `systemctl start` fails
    unit = _install(guest_ceph, spec, name, "/nonexistent/container-runtime run db",
                    verify=False)
    assert guest_ceph.run(["systemctl", "start", unit], timeout=180).rc != 0
    assert _wait(guest_ceph, unit, {"failed", "inactive"}) in ("failed", "inactive")
    _assert_detached(guest_ceph, unit, name)
    _assert_journal(guest_ceph, spec, unit, first_attach=True)


def test_template_unit_attaches_and_detaches(guest_ceph: Guest,
                                             app: tuple[str, str]) -> None:
    spec, _ = app
    installed = json.loads(ok(cv(guest_ceph, "units", "install", "--json")))
    assert installed["daemon_reload"] is True  # systemd is PID 1 here
    inst = f"cephvol@{escape(spec)}.service"
    _verify(guest_ceph, f"/etc/systemd/system/{inst}")
    ok(guest_ceph.run(["systemctl", "start", inst], timeout=180))
    # Type=notify: READY=1 and the status line came from attach itself
    status = ok(guest_ceph.run(["systemctl", "show", "-p", "StatusText", "--value", inst]))
    assert status.strip().startswith(f"{spec} is attached: /dev/rbd"), status
    assert _state(guest_ceph, inst) == "active"
    env = ok(guest_ceph.run(["cat", f"/run/cephvol/{escape(spec)}.env"]))
    assert f'CEPHVOL_MOUNTPOINT="/srv/cephvol/{spec}"' in env
    assert guest_ceph.run(["mountpoint", "-q", f"/srv/cephvol/{spec}"]).rc == 0
    ok(guest_ceph.run(["systemctl", "stop", inst], timeout=180))
    assert ok(guest_ceph.run(["ls", "/sys/bus/rbd/devices"])).strip() == ""
    assert guest_ceph.run(["test", "-e", f"/run/cephvol/{escape(spec)}.env"]).rc != 0


def test_cleanup_unit_detaches_everything_when_stopped(guest_ceph: Guest,
                                                       app: tuple[str, str]) -> None:
    spec, name = app
    ok(cv(guest_ceph, "units", "install"))
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
