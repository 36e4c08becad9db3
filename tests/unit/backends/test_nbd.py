"""rbd-nbd output and error parsing, on output recorded in the qemu guest."""

from __future__ import annotations

from pathlib import Path

import pytest

from cephvol.backends.nbd import classify_error, entry_spec, parse_list_mapped
from cephvol.errors import (
    Busy,
    ClusterError,
    NotFound,
    StepTimeout,
    SystemCommandError,
    Unsupported,
)
from cephvol.spec import ImageSpec

DATA = Path(__file__).resolve().parent.parent.parent / "data" / "nbd"


def test_recorded_list_mapped() -> None:
    (e,) = parse_list_mapped((DATA / "list-mapped.json").read_text())
    assert e["device"] == "/dev/nbd0" and isinstance(e["id"], int)
    assert entry_spec(e) == ImageSpec("rbd", "tenant", "ns-img", None)


def test_empty_and_snapshot_entries() -> None:
    assert parse_list_mapped("") == [] and parse_list_mapped("[]") == []
    e = {"id": 1, "pool": "rbd", "namespace": "", "image": "i", "snap": "s1",
         "device": "/dev/nbd3"}
    assert entry_spec(e) == ImageSpec("rbd", "", "i", "s1")
    with pytest.raises(SystemCommandError, match="not JSON"):
        parse_list_mapped("rbd-nbd: garbage")


@pytest.mark.parametrize(("stderr", "kind"), [
    # the first line is what rbd-nbd printed on this machine (no nbd driver)
    ("rbd-nbd: failed to find unused device\n", Unsupported),
    ("rbd-nbd: failed to open image: (2) No such file or directory\n", NotFound),
    ("rbd-nbd: failed to connect: (13) Permission denied\n", ClusterError),
    ("rbd-nbd: failed to acquire exclusive lock: (110) Connection timed out\n", StepTimeout),
    ("rbd-nbd: failed to unmap: (16) Device or resource busy\n", Busy),
    ("rbd-nbd: something new\n", SystemCommandError),
])
def test_errors_are_classified(stderr: str, kind: type[Exception]) -> None:
    assert type(classify_error(stderr)) is kind
