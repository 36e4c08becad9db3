"""vagrant/: the Vagrantfile validates, and its machines are provisioned by the
same scripts and package list the qemu test host is built and booted with."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.vm import harness

VAGRANT = harness.REPO / "vagrant"


def _validate(home: Path, *args: str,
              provider: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, VAGRANT_HOME=str(home))
    if provider:
        env["VAGRANT_DEFAULT_PROVIDER"] = provider
    return subprocess.run(["vagrant", "validate", *args], cwd=VAGRANT, capture_output=True,
                          text=True, env=env, timeout=120, check=False)


@pytest.mark.skipif(not shutil.which("vagrant"), reason="vagrant not installed (scripts/setup)")
def test_vagrantfile_validates_for_libvirt_and_without_provider(tmp_path: Path) -> None:
    cp = _validate(tmp_path, provider="libvirt")
    assert cp.returncode == 0 and "validated successfully" in cp.stdout, cp.stdout + cp.stderr
    # VirtualBox cannot be installed here: check everything but its provider block
    cp = _validate(tmp_path, "--ignore-provider")
    assert cp.returncode == 0 and "validated successfully" in cp.stdout, cp.stdout + cp.stderr


def test_one_package_list_for_the_guest_image_and_the_vagrant_hosts() -> None:
    pkgs = harness.PROVISION / "guest-packages.txt"
    assert pkgs in harness.BUILD_INPUTS  # its content keys the cached guest image
    assert "guest-packages.txt" in harness.BUILD_SCRIPT.read_text()
    assert "guest-packages.txt" in (harness.PROVISION / "install-host.sh").read_text()
    host = (harness.PROVISION / "container-host.sh").read_text()
    assert "install-host.sh" in host


def test_the_guest_installs_cephvol_with_the_vagrant_script() -> None:
    assert "provision/install-cephvol.sh" in harness.BUILD_SCRIPT.read_text()
    assert "install-cephvol.sh" in (harness.PROVISION / "install-host.sh").read_text()
    vf = (VAGRANT / "Vagrantfile").read_text()
    assert 'path: "provision/container-host.sh"' in vf and 'path: "provision/ceph-node.sh"' in vf
    assert "scripts/setup" in (harness.PROVISION / "ceph-node.sh").read_text()
