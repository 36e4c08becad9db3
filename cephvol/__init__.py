"""cephvol: Ceph RBD volumes for containers.

Kept import-light on purpose: `cephvol --version` must not pay for librados,
librbd or pyroute2, so nothing heavy is imported at package level.
"""

__version__ = "0.1.0"
