"""Data services on volumes: consistent snapshots and clones (snapshots.py)."""
