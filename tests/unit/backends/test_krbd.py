"""krbd parsing and string building on sysfs trees recorded from the qemu
guest's real kernel (tests/vm/record.py): a rw exclusive mapping (0), a
snapshot (1) and an image in pool namespace `tenant`, read-only (2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cephvol.backends.krbd import (
    build_add_string,
    kernel_options,
    mon_v1_addrs,
    read_devices,
)
from cephvol.errors import ClusterError, UsageError
from cephvol.mapper import MapOptions
from cephvol.spec import ImageSpec, parse_spec

DATA = Path(__file__).resolve().parent.parent.parent / "data"
SYS = DATA / "sys-rbd"


def _config_info(n: int) -> str:
    return (SYS / "bus" / "rbd" / "devices" / str(n) / "config_info").read_text().strip()


def test_recorded_devices_parse_to_their_specs() -> None:
    devs = read_devices(SYS)
    assert [d.dev_id for d in devs] == [0, 1, 2]
    assert [str(d.spec()) for d in devs] == ["rbd/rec-img", "rbd/rec-img@s1",
                                             "rbd/tenant/ns-img"]
    assert [d.read_only for d in devs] == [False, True, True]
    assert {d.major for d in devs} == {252}
    assert [d.minor for d in devs] == [0, 16, 32]  # single_major: 16 minors per device


def test_the_add_string_is_what_the_kernel_reports_back() -> None:
    """config_info echoes the string written to add_single_major; ours must match."""
    mons = [_config_info(0).split()[0]]
    cases = [
        (0, parse_spec("rbd/rec-img"), MapOptions(exclusive=True), False),
        (1, parse_spec("rbd/rec-img@s1"), MapOptions(), True),
        (2, parse_spec("rbd/tenant/ns-img"), MapOptions(read_only=True), True),
    ]
    for n, spec, opts, ro in cases:
        built = build_add_string(mons, "admin", kernel_options(opts, ro), spec)
        assert built == _config_info(n)


def test_the_secret_is_never_in_the_string() -> None:
    s = build_add_string(["10.0.0.1:6789"], "vol", [], ImageSpec("p", "", "i"))
    assert "secret=" not in s and "key=client.vol" in s


def test_kernel_options() -> None:
    o = kernel_options(MapOptions(exclusive=True, lock_timeout=7, queue_depth=64, notrim=True),
                       True, ["osd_request_timeout=30"])
    assert o == ["read_only", "exclusive", "lock_timeout=7", "queue_depth=64", "notrim",
                 "osd_request_timeout=30"]


@pytest.mark.parametrize("bad", ["secret=abc", "nonsense", "queue_depth=1 rbd x",
                                 "ms_mode=crc,secret=x", ""])
def test_unknown_or_malformed_options_never_reach_the_kernel(bad: str) -> None:
    with pytest.raises(UsageError, match="krbd option"):
        kernel_options(MapOptions(), False, [bad])


def test_monitor_addresses_from_a_recorded_monmap() -> None:
    monmap = json.loads((DATA / "ceph" / "mon-dump.json").read_text())
    addrs = mon_v1_addrs(monmap)
    assert addrs == [_config_info(0).split()[0]]  # the address the kernel was given
    with pytest.raises(ClusterError):
        build_add_string([], "admin", [], ImageSpec("rbd", "", "x"))


def test_no_rbd_bus_reads_as_no_devices(tmp_path: Path) -> None:
    assert read_devices(tmp_path) == []
