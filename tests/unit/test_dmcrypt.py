"""Which dm-crypt device opens an rbd device, read from a sysfs-shaped tree
laid out as the kernel documents it (Documentation/ABI/testing/sysfs-block-dm:
/sys/block/dm-N/dm/{name,uuid}; holders/ of the disk under it). The real
tree is exercised in the qemu guest (tests/vm/test_krbd_data.py)."""

from __future__ import annotations

from pathlib import Path

from cephvol._os import dmcrypt


def _dm(sys_root: Path, block: str, n: int, name: str, uuid: str) -> None:
    dm = sys_root / "block" / f"dm-{n}" / "dm"
    dm.mkdir(parents=True)
    (dm / "name").write_text(name + "\n")
    (dm / "uuid").write_text(uuid + "\n")
    holders = sys_root / "block" / block / "holders"
    holders.mkdir(parents=True, exist_ok=True)
    (holders / f"dm-{n}").symlink_to(f"../../dm-{n}")


def test_the_cephvol_crypt_device_on_an_rbd_device_is_found(tmp_path: Path) -> None:
    _dm(tmp_path, "rbd0", 0, "cephvol-rbd,-,pg",
        "CRYPT-LUKS2-0d5b4c7e9a8f4b2c9f1e2d3c4b5a6978-cephvol-rbd,-,pg")
    assert dmcrypt.holder_of("rbd0", tmp_path) == dmcrypt.Opened(
        "cephvol-rbd,-,pg", "dm-0", "luks2")
    assert dmcrypt.holder_of("rbd1", tmp_path) is None  # no holders/ at all


def test_holders_that_are_not_cephvol_crypt_devices_are_not_ours(tmp_path: Path) -> None:
    _dm(tmp_path, "rbd0", 0, "vg-lv", "LVM-abc")  # an LVM volume on the rbd device
    _dm(tmp_path, "rbd0", 1, "someones-crypt", "CRYPT-LUKS2-abc-someones-crypt")
    assert dmcrypt.holder_of("rbd0", tmp_path) is None
    _dm(tmp_path, "rbd2", 2, "cephvol-rbd,-,old", "CRYPT-LUKS1-abc-cephvol-rbd,-,old")
    assert dmcrypt.holder_of("rbd2", tmp_path).format == "luks1"  # type: ignore[union-attr]


def test_dm_names_are_readable_unmangled_short_and_distinct() -> None:
    """libdevmapper keeps [A-Za-z0-9#+-.:=@_] as they are; cephvol uses fewer."""
    import re

    a = dmcrypt.name_for("rbd,-,pg-data")
    assert re.fullmatch(r"cephvol-rbd\.-\.pg-data-[0-9a-f]{12}", a)
    assert dmcrypt.name_for("rbd,tenant,db,snap1").startswith("cephvol-rbd.tenant.db.snap1-")
    names = [dmcrypt.name_for(k) for k in ("rbd,-," + "x" * 200, "rbd,-,a b", "rbd,-,a_b",
                                            "rbd.-,-,x", "rbd,-.-,x", "rbd,-,pg-data")]
    assert len(set(names)) == len(names)  # alike readable parts, told apart by the digest
    for n in names:
        assert re.fullmatch(r"cephvol-[A-Za-z0-9._+-]+", n) and len(n) <= 127
