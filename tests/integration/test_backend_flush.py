"""cephvol.backends.base.flush_before_unmap on real loop devices: a flush
that works returns nothing; one that fails (a loop whose backing file sits on
a full tmpfs, so its writeback gets ENOSPC) refuses to unmap with the tool's
reason (exit 12, as every lost write), and forced hands that reason back instead of hiding it."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cephvol.backends.base import Mapping, flush_before_unmap
from cephvol.errors import DataLost


@pytest.fixture
def full_loop(tmp_path: Path) -> Iterator[str]:
    """A 64 MiB loop device backed by a sparse file on a 4 MiB tmpfs."""
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "cvflush", str(small)], check=True)
    dev = ""
    try:
        backing = small / "disk.img"
        with open(backing, "wb") as f:
            f.truncate(64 << 20)
        dev = subprocess.run(["losetup", "--find", "--show", str(backing)], check=True,
                             capture_output=True, text=True).stdout.strip()
        yield dev
    finally:
        if dev:
            subprocess.run(["losetup", "-d", dev], check=False)
        subprocess.run(["umount", str(small)], check=False)


@pytest.fixture
def holder(full_loop: str) -> Iterator[int]:
    """An opener kept for the test, as a mounted filesystem keeps the device
    open: the last close of a block device writes its page cache out itself
    (and would take the error with it before the flush could see it)."""
    fd = os.open(full_loop, os.O_RDONLY)
    try:
        yield fd
    finally:
        os.close(fd)


def _m(dev: str) -> Mapping:
    return Mapping(backend="fuse", spec="rbd/flush-test", device=dev, backend_id="")


def _write_buffered(dev: str, size: int) -> None:
    """Dirty the device's page cache without waiting for writeback."""
    fd = os.open(dev, os.O_WRONLY)
    try:
        chunk = b"\xa5" * (1 << 20)
        for _ in range(size >> 20):
            os.write(fd, chunk)
    finally:
        os.close(fd)


def test_a_flush_that_works_returns_nothing(full_loop: str, holder: int) -> None:
    _write_buffered(full_loop, 1 << 20)  # fits the tmpfs
    assert flush_before_unmap(_m(full_loop), force=False) is None


def test_a_failed_flush_refuses_the_unmap_with_its_reason(full_loop: str, holder: int) -> None:
    _write_buffered(full_loop, 16 << 20)  # four times what the tmpfs holds
    with pytest.raises(DataLost) as err:
        flush_before_unmap(_m(full_loop), force=False)
    msg = err.value.message
    assert err.value.exit_code == 12 and "\n" not in msg
    # the tool's own reason, not just "failed"
    assert f"flushing {full_loop} failed (sync: error syncing" in msg, msg
    assert "not written" in msg and "not unmapping" in msg


def test_a_forced_flush_failure_is_returned_not_hidden(full_loop: str, holder: int) -> None:
    _write_buffered(full_loop, 16 << 20)
    why = flush_before_unmap(_m(full_loop), force=True)
    assert why and "error syncing" in why, "a failed flush must not read as a good one"

