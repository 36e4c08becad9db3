"""The test hooks that kill, or stop, cephvol at a named step.

With CEPHVOL_TEST_CRASH_AT=STEP in its environment, cephvol SIGKILLs itself
when it reaches STEP: the fault-matrix tests use it to leave the host as a
crash at exactly that point would, and then check that `detach` or
`cleanup` finishes the job. With CEPHVOL_TEST_STOP_AT=STEP it SIGSTOPs
itself there instead, so a test can change the host at exactly that point
(make a mount namespace between detach's look and its umount) and let it
go on with SIGCONT. Without the variables it costs two dict lookups.
"""

from __future__ import annotations

import os
import signal

CRASH_ENV = "CEPHVOL_TEST_CRASH_AT"
STOP_ENV = "CEPHVOL_TEST_STOP_AT"


def crash_point(step: str) -> None:
    if os.environ.get(CRASH_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get(STOP_ENV) == step:
        os.kill(os.getpid(), signal.SIGSTOP)
