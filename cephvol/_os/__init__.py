"""Thin wrappers over kernel interfaces Python's stdlib lacks (keyrings)."""
