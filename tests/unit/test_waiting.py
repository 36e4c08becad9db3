"""The one bounded wait: real time, a real lock held by a real process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from cephvol.waiting import flock_exclusive, wait_for


def test_wait_for_returns_the_first_true_result() -> None:
    calls = iter([None, 0, "", "done", "never"])
    assert wait_for(lambda: next(calls), timeout=5, interval=0.001) == "done"


def test_wait_for_is_bounded_and_returns_the_last_false_result() -> None:
    t0 = time.monotonic()
    assert wait_for(lambda: [], timeout=0.3, interval=0.01) == []
    assert 0.3 <= time.monotonic() - t0 < 2.0


def test_flock_waits_for_a_holder_and_gives_up_at_the_bound(tmp_path: Path) -> None:
    path = tmp_path / "l"
    path.touch()
    holder = subprocess.Popen([sys.executable, "-c",
                               "import fcntl,sys,time; f=open(sys.argv[1]); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); "
                               "time.sleep(float(sys.argv[2]))", str(path), "0.6"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        fd = os.open(path, os.O_RDWR)
        try:
            assert flock_exclusive(fd, timeout=0.1) is False
            assert flock_exclusive(fd, timeout=10) is True  # once the holder exits
        finally:
            os.close(fd)
    finally:
        holder.wait(timeout=10)
