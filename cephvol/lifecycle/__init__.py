"""The volume lifecycle on one host, split by verb:

- host.py: where it runs (paths, identity, mounts) and shared helpers
- attach.py: own -> map -> mkfs only if provably empty -> mount, undone on failure
- detach.py: observe what the host shows, plan, run the plan
- manage.py: status, cleanup, resize, owner, create, remove

Callers (the CLI, the plugin, cephvol.api) use the names re-exported here.
The library never prints; it returns results and raises CephvolErrors.
"""

from cephvol.lifecycle.attach import AttachRequest, attach
from cephvol.lifecycle.detach import detach, observe
from cephvol.lifecycle.host import CRASH_ENV, Host
from cephvol.lifecycle.manage import (
    backend_for,
    cleanup,
    create,
    owner,
    remove,
    resize,
    spec_arg,
    status,
)

__all__ = ["CRASH_ENV", "AttachRequest", "Host", "attach", "backend_for", "cleanup", "create",
           "detach", "observe", "owner", "remove", "resize", "spec_arg", "status"]
