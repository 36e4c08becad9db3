"""blkid's verdicts, read from outputs recorded on this kind of machine.

tests/data/blkid/NAME.out and NAME.rc are `blkid -p -o export /dev/loopN`
and its exit code, recorded right after mkfs.ext4, mkfs.xfs, sfdisk (gpt,
dos), mkswap and cryptsetup luksFormat on a loop device, and on a zeroed one.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cephvol.errors import SystemCommandError
from cephvol.fs import Probe, parse_blkid

DATA = Path(__file__).resolve().parent.parent / "data" / "blkid"


def _recorded(name: str) -> Probe:
    rc = int((DATA / f"{name}.rc").read_text())
    return parse_blkid(rc, (DATA / f"{name}.out").read_text())


@pytest.mark.parametrize(("name", "kind", "fstype"), [
    ("empty", "empty", None),
    ("ext4", "filesystem", "ext4"),
    ("xfs", "filesystem", "xfs"),
    ("gpt", "partition-table", None),
    ("dos", "partition-table", None),
    ("swap", "other", "swap"),
    ("luks", "other", "crypto_LUKS"),
])
def test_recorded_probe(name: str, kind: str, fstype: str | None) -> None:
    p = _recorded(name)
    assert (p.kind, p.fstype) == (kind, fstype)


def test_only_an_empty_device_may_be_formatted() -> None:
    """The never-lose-data rule: every recorded signature blocks mkfs."""
    formattable = {n.stem for n in DATA.glob("*.rc") if _recorded(n.stem).kind == "empty"}
    assert formattable == {"empty"}


def test_ambiguous_exit_code_is_not_empty() -> None:
    # blkid(8): exit 8 = ambiguous probe (several signatures); never "empty"
    assert parse_blkid(8, "").kind == "ambiguous"


def test_blkid_failure_is_an_error_not_empty() -> None:
    # blkid(8): exit 4 = usage or other error, e.g. the device cannot be opened
    with pytest.raises(SystemCommandError, match="exit 4"):
        parse_blkid(4, "")
