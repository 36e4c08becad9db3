"""cephvol benchmarks: `make bench` (or `.venv/bin/python -m bench`)."""
