"""Mapping backends. Each module owns one way of making a block device."""
