"""The parts of ownership that need no cluster: who this host is, and the
record's format. Taking, releasing, racing and taking over run against a
real cluster with two simulated hosts (tests/integration/test_ownership.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cephvol.errors import Conflict, UsageError
from cephvol.ownership import HostIdentity, OwnerRecord


def test_identity_is_the_machine_id(tmp_path: Path) -> None:
    mid = tmp_path / "machine-id"
    mid.write_text("4f1c0c1e5b0b4f6e9f2d7a1b3c5d7e9f\n")
    me = HostIdentity.local({"CEPHVOL_HOST_NAME": "node1"}, machine_id=mid)
    assert me == HostIdentity("4f1c0c1e5b0b4f6e9f2d7a1b3c5d7e9f", "node1")
    # stable: the same file gives the same id (a reboot keeps /etc/machine-id)
    assert HostIdentity.local({"CEPHVOL_HOST_NAME": "node1"}, machine_id=mid) == me
    assert HostIdentity.local({"CEPHVOL_HOST_ID": "lab-a"}, machine_id=mid).id == "lab-a"


@pytest.mark.parametrize(("content", "env", "needle"), [
    (None, {}, "is missing or empty"),
    ("\n", {}, "is missing or empty"),
    ("x", {"CEPHVOL_HOST_ID": "a b"}, "use letters"),
    ("x", {"CEPHVOL_HOST_ID": "a" * 65}, "use letters"),
])
def test_identity_problems_are_named(tmp_path: Path, content: str | None,
                                     env: dict[str, str], needle: str) -> None:
    mid = tmp_path / "machine-id"
    if content is not None:
        mid.write_text(content)
    with pytest.raises(UsageError, match=needle):
        HostIdentity.local(env, machine_id=mid)


def test_record_round_trips_and_starts_with_its_cookie() -> None:
    rec = OwnerRecord("c0ffee", "host-a", "a", "2026-11-26T14:58:01Z",
                      ("10.97.0.2:0/1234",),
                      {"host": "b", "host_id": "host-b", "fenced": ["10.97.0.3:0/9"]})
    data = rec.encode()
    assert data.startswith(b"c0ffee\n") and rec.head == b"c0ffee\n"
    back = OwnerRecord.decode(data, "rbd/cephvol_owner.x")
    assert back == rec and back.taken_over_from == rec.taken_over_from
    assert back.describe() == "host a (id host-a) since 2026-11-26T14:58:01Z"


@pytest.mark.parametrize("data", [b"", b"no newline", b"c\n{not json", b'c\n{"cookie": "c"}'])
def test_unreadable_record_is_a_clear_conflict(data: bytes) -> None:
    with pytest.raises(Conflict, match=r"is corrupt .*--repair"):
        OwnerRecord.decode(data, "rbd/cephvol_owner.x")
