"""The test hook that kills cephvol at a named step.

With CEPHVOL_TEST_CRASH_AT=STEP in its environment, cephvol SIGKILLs itself
when it reaches STEP: the fault-matrix tests use it to leave the host as a
crash at exactly that point would, and then check that `detach` or
`cleanup` finishes the job. Without the variable it costs one dict lookup.
"""

from __future__ import annotations

import os
import signal

CRASH_ENV = "CEPHVOL_TEST_CRASH_AT"


def crash_point(step: str) -> None:
    if os.environ.get(CRASH_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)
