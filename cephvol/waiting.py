"""Waiting for a condition, bounded: the one poll loop cephvol uses.

Loop devices appear and go a moment after losetup returns, a daemon's
file shows its size a moment after it starts, a lock is held by another
cephvol for a while: each of those is "ask again until it is so, or until
the bound". Written once here (os-brick's @retry is the model) so every
wait has a bound, backs off the same way, and reads as one line.
"""

from __future__ import annotations

import errno
import fcntl
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(check: Callable[[], T], *, timeout: float, interval: float = 0.05,
             max_interval: float = 1.0, backoff: float = 1.5,
             sleep: Callable[[float], None] = time.sleep) -> T:
    """Call `check` until it returns something true or `timeout` seconds
    passed; returns the last result (false when the bound was reached, so
    the caller says what did not happen). `check` runs at least once."""
    end = time.monotonic() + timeout
    delay = interval
    while True:
        result = check()
        if result or time.monotonic() >= end:
            return result
        sleep(min(delay, max(0.0, end - time.monotonic())))
        delay = min(delay * backoff, max_interval)


def flock_exclusive(fd: int, *, timeout: float, interval: float = 0.05) -> bool:
    """Take an exclusive flock on `fd`, waiting at most `timeout` seconds;
    False if another holder kept it that long. flock is dropped by the kernel
    when its holder dies, so a killed cephvol never leaves a stale lock."""

    def attempt() -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            return False

    return wait_for(attempt, timeout=timeout, interval=interval, max_interval=0.2)
