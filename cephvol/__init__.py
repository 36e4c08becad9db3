"""cephvol: Ceph RBD volumes for containers.

Kept import-light on purpose: `cephvol --version` must not pay for librados,
librbd or pyroute2, so nothing heavy is imported at package level.
"""

# The one version number: pyproject.toml reads it (dynamic version), and
# debian/changelog must name it too (tests/unit/test_version.py).
__version__ = "0.2.1"
