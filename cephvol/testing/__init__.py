"""Test support for projects that keep data on cephvol volumes.

`plugin` is the pytest plugin (entry point `pytest11: cephvol`) with the
fixtures ceph_cluster, rbd_image and cephvol_volume; `session` holds the
cluster-per-session logic and the leak check behind them; `leaks` finds and
tears down what a session left (shared with cephvol's own tests). Nothing
here is imported by cephvol itself.
"""
