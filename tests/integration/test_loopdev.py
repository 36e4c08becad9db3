"""cephvol._os.loopdev on real loop devices, real mounts and a real mount
namespace made after the check: a refused release leaves the loop bound
exactly as it was (no autoclear), a granted one frees it at once."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cephvol._os import loopdev
from cephvol.errors import Busy
from cephvol.hostfs import read_loop_devices

SYS = Path("/sys")


def _bound(dev: str, backing: str) -> bool:
    name = os.path.basename(dev)
    return any(lo.name == name and lo.backing_file == backing
               for lo in read_loop_devices(SYS, backing))


def _autoclear(dev: str) -> str:
    return (SYS / "block" / os.path.basename(dev) / "loop" / "autoclear").read_text().strip()


@pytest.fixture
def loop(tmp_path: Path) -> Iterator[tuple[str, str]]:
    backing = tmp_path / "disk.img"
    with open(backing, "wb") as f:
        f.truncate(32 << 20)
    subprocess.run(["mkfs.ext4", "-q", str(backing)], check=True)
    dev = subprocess.run(["losetup", "--find", "--show", str(backing)], check=True,
                         capture_output=True, text=True).stdout.strip()
    try:
        yield dev, str(backing)
    finally:
        subprocess.run(["umount", str(tmp_path / "mnt")], capture_output=True)
        if _bound(dev, str(backing)):
            subprocess.run(["losetup", "-d", dev], check=False)


def test_an_unused_loop_is_freed_at_once(loop: tuple[str, str]) -> None:
    dev, backing = loop
    assert loopdev.detach(dev, lambda: _bound(dev, backing), force=False, timeout=5.0)
    assert not _bound(dev, backing)


def test_a_mounted_loop_is_refused_and_left_as_it_was(loop: tuple[str, str],
                                                       tmp_path: Path) -> None:
    dev, backing = loop
    (tmp_path / "mnt").mkdir()
    subprocess.run(["mount", dev, str(tmp_path / "mnt")], check=True)
    with pytest.raises(Busy, match="still mounted, perhaps in a mount namespace"):
        loopdev.detach(dev, lambda: _bound(dev, backing), force=False, timeout=5.0)
    assert _bound(dev, backing) and _autoclear(dev) == "0"
    (tmp_path / "mnt" / "f").write_text("still here")
    subprocess.run(["umount", str(tmp_path / "mnt")], check=True)
    assert loopdev.detach(dev, lambda: _bound(dev, backing), force=False, timeout=5.0)


def test_a_mount_copied_into_a_later_namespace_is_refused(loop: tuple[str, str],
                                                           tmp_path: Path) -> None:
    """The race the issue-13 run met: the host's mount is gone (the caller's
    checks passed), but a namespace made before the unmount keeps a copy."""
    dev, backing = loop
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", dev, str(mnt)], check=True)
    holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private",
                               "sh", "-c", f"findmnt {mnt} >/dev/null && echo ok && exec sleep 60"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ok"
        subprocess.run(["umount", str(mnt)], check=True)
        with pytest.raises(Busy, match="still mounted"):
            loopdev.detach(dev, lambda: _bound(dev, backing), force=False, timeout=5.0)
        assert _bound(dev, backing) and _autoclear(dev) == "0"
    finally:
        holder.kill()
        holder.wait()
    # the kernel drops the namespace's mounts shortly after its last process
    deadline = time.monotonic() + 30
    while True:
        try:
            assert loopdev.detach(dev, lambda: _bound(dev, backing), force=False, timeout=5.0)
            break
        except Busy:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    assert not _bound(dev, backing)


def test_a_plain_opener_is_refused_and_the_loop_outlives_it(loop: tuple[str, str]) -> None:
    dev, backing = loop
    fd = os.open(dev, os.O_RDONLY)
    try:
        with pytest.raises(Busy, match="still open by another process"):
            loopdev.detach(dev, lambda: _bound(dev, backing), force=False, timeout=0.5)
        assert _autoclear(dev) == "0"
    finally:
        os.close(fd)
    time.sleep(0.2)
    assert _bound(dev, backing), "a refused release must not free the loop later"


def test_forced_the_loop_goes_with_its_last_opener(loop: tuple[str, str]) -> None:
    dev, backing = loop
    fd = os.open(dev, os.O_RDONLY)
    try:
        assert loopdev.detach(dev, lambda: _bound(dev, backing), force=True,
                              timeout=0.3) is False
        assert _bound(dev, backing) and _autoclear(dev) == "1"
    finally:
        os.close(fd)
    deadline = time.monotonic() + 10
    while _bound(dev, backing) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _bound(dev, backing)
