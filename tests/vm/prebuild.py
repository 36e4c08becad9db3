"""Build the vm tests' cached hosts ahead of them: the qemu/nspawn guest image
(harness.ensure_image) and the clean root of the package test
(debroot.ensure_root). Started in the background by the suite's conftest when
vm tests are selected and a cache is missing, so a fresh machine builds them
while the unit and integration tests run instead of after. Both builds hold
their cache's lock; a test that needs one waits for it, never builds twice.

Run by hand: `.venv/bin/python -m tests.vm.prebuild`.
"""

from __future__ import annotations

import sys
import time

from tests.vm import debroot, harness


def missing() -> list[str]:
    """Which caches the current inputs have not built yet (cheap: no lock)."""
    out = []
    if not harness.GuestImage(harness.cache_root() / harness.image_key()).rootfs.exists():
        out.append("guest image")
    if not (debroot.cache_root() / debroot.root_key() / "root" / "sbin" / "init").exists():
        out.append("deb root")
    return out


def main() -> int:
    rc = 0
    for name, build in (("guest image", harness.ensure_image), ("deb root", debroot.ensure_root)):
        t0 = time.monotonic()
        try:
            build()
            print(f"prebuild: {name} ready in {time.monotonic() - t0:.0f} s", flush=True)
        except Exception as exc:  # reported; the test that needs it builds again
            print(f"prebuild: {name} failed: {exc}", flush=True)
            rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
