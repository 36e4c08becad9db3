"""`cephvol doctor` on this machine's real kernel and a made-up keyring."""

from __future__ import annotations

from pathlib import Path

from cephvol.cluster import ClusterConfig
from cephvol.doctor import run_checks
from cephvol.mapper import HostPaths


def test_wide_keyring_is_warned_about_and_backends_explained(tmp_path: Path) -> None:
    kr = tmp_path / "keyring"
    kr.write_text("[client.admin]\n\tkey = AQBM5yZnAAAAABAAyFwU6dEsXy0ePEkm8h2wDw==\n")
    kr.chmod(0o644)
    conf = tmp_path / "ceph.conf"
    conf.write_text(f"[global]\nmon host = 127.0.0.1:9\n[mgr]\nkeyring = /nope\n"
                    f"[client]\nkeyring = {kr}\n")
    res = run_checks(HostPaths(tmp_path / "state"), ClusterConfig(conf, "admin", 1.0),
                     connect=False)
    checks = {c["name"]: c for c in res["checks"]}
    assert checks[f"keyring {kr}"]["warning"] and "0644" in checks[f"keyring {kr}"]["detail"]
    assert "keyring /nope" not in checks  # the [mgr] section's keyring is not ours
    assert "AQBM5yZ" not in str(res)
    assert set(res["backends"]) == {"krbd", "nbd", "qsd", "fuse"}
    for name, b in res["backends"].items():
        assert b["reason"], name  # always says why
    if not Path("/sys/bus/rbd").exists():  # this machine: no krbd
        assert not res["backends"]["krbd"]["usable"]
    kr.chmod(0o600)
    res = run_checks(HostPaths(tmp_path / "state"), ClusterConfig(conf, "admin", 1.0),
                     connect=False)
    assert not {c["name"]: c for c in res["checks"]}[f"keyring {kr}"]["warning"]
