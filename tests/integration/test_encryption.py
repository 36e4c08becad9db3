"""Encryption at rest end to end: librbd LUKS2 images on the session's real
cluster, opened by a real qemu-storage-daemon (qsd backend), a real loop
device and real mounts; the raw image read back with librbd."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from cephvol.cluster import Cluster, ClusterConfig
from cephvol.data import encryption
from cephvol.spec import parse_spec
from tests.conftest import CephCluster
from tests.integration.test_qsd import _backend, _daemon_pid, _daemons_of, _gone, pytestmark

__all__ = ["pytestmark"]  # skipped where qemu-storage-daemon or its rbd driver is missing

SIZE = "64M"


def _cfg(cluster: CephCluster) -> ClusterConfig:
    return ClusterConfig(cluster.conf, "admin", 10.0)


def _passphrase(cluster: CephCluster, image: str) -> bytes:
    with Cluster(_cfg(cluster)) as c:
        key = c.config_key_get(encryption.key_name(parse_spec(image)))
    assert key, "no key stored"
    return key


def _raw(cluster: CephCluster, image: str) -> bytes:
    """The whole image as the OSDs store it (librbd, no encryption loaded)."""
    with Cluster(_cfg(cluster)) as c:
        return c.read_raw(parse_spec(image), 0, 1 << 30)


def _create(cluster: CephCluster, image: str) -> dict:
    cp = cluster.cli("create", image, "--size", SIZE, "--encrypt", "--json")
    assert cp.returncode == 0, cp.stderr
    return json.loads(cp.stdout)


def _attach(cluster: CephCluster, image: str, mnt: Path, *extra: str,
            **env: str) -> subprocess.CompletedProcess[str]:
    return cluster.cli("attach", image, "--mountpoint", str(mnt), "--json", *extra, **env)


def _state_files(cluster: CephCluster) -> list[Path]:
    return [p for p in cluster.state_dir.rglob("*") if p.is_file() and not p.is_socket()]


def _nothing_attached(cluster: CephCluster, image: str, mnt: Path) -> None:
    st = json.loads(cluster.cli("status", "--json", check=True).stdout)
    assert [r for r in st if r.get("image") == image] == [], st
    assert not os.path.ismount(mnt)
    _gone(cluster, image)


def test_encrypted_round_trip_and_ciphertext_at_rest(cluster: CephCluster, image: str,
                                                     mnt: Path) -> None:
    res = _create(cluster, image)
    assert res["created"] and res["encrypted"] and res["encryption"] == "luks2"
    info = json.loads(cluster.cli("info", image, "--json", check=True).stdout)
    assert info["encrypted"] is True and info["encryption"] == "luks2"
    again = _create(cluster, image)  # idempotent, the header stays
    assert again["created"] is False and again["encrypted"]
    secret = _passphrase(cluster, image)
    outputs = [json.dumps(res), json.dumps(again), json.dumps(info)]

    cp = cluster.cli("--debug", "attach", image, "--mountpoint", str(mnt), "--json",
                     CEPHVOL_LOG="stderr")  # auto picks qsd: the only backend that decrypts
    assert cp.returncode == 0, cp.stderr
    att = json.loads(cp.stdout)
    assert att["backend"] == "qsd" and att["created_filesystem"] is True
    assert att["encryption"] == "luks2"
    outputs += [cp.stdout, cp.stderr]
    marker = b"cephvol-plaintext-marker-" + os.urandom(8).hex().encode()
    (mnt / "marker").write_bytes(marker * 4096)
    os.sync()

    pid = _daemon_pid(cluster, image)
    for p in os.listdir("/proc"):  # no process has it on its command line
        if p.isdigit():
            try:
                assert secret not in Path(f"/proc/{p}/cmdline").read_bytes(), p
            except OSError:
                continue
    assert secret not in Path(f"/proc/{pid}/environ").read_bytes()
    for f in _state_files(cluster):  # nor any file of the state dir (journal, spec, pid)
        assert secret not in f.read_bytes(), f
    st = cluster.cli("status", "--json", check=True)
    outputs.append(st.stdout)
    row = next(r for r in json.loads(st.stdout) if r["image"] == image)
    assert row["encryption"] == "luks2" and row["phase"] == "attached"
    text = cluster.cli("status", check=True).stdout
    assert f"{image}" in text and "[luks2]" in text

    det = cluster.cli("--debug", "detach", image, "--json", CEPHVOL_LOG="stderr")
    assert det.returncode == 0, det.stderr
    outputs += [det.stdout, det.stderr]
    _nothing_attached(cluster, image, mnt)

    raw = _raw(cluster, image)
    assert raw.startswith(encryption.LUKS_MAGIC)
    assert marker not in raw  # the OSDs hold ciphertext only
    assert len(raw) == 64 << 20

    cp = _attach(cluster, image, mnt, "--backend", "qsd")
    assert cp.returncode == 0, cp.stderr
    assert json.loads(cp.stdout)["created_filesystem"] is False
    assert (mnt / "marker").read_bytes() == marker * 4096
    cluster.cli("detach", image, check=True)
    _nothing_attached(cluster, image, mnt)
    for out in outputs:
        assert secret.decode() not in out


def test_fuse_refuses_an_encrypted_image(cluster: CephCluster, image: str, mnt: Path) -> None:
    _create(cluster, image)
    cp = _attach(cluster, image, mnt, "--backend", "fuse")
    assert cp.returncode == 9, cp.stderr
    assert "--backend qsd" in cp.stderr and len(cp.stderr.strip().splitlines()) == 1
    err = json.loads(cp.stdout)
    assert err["exit_code"] == 9
    _nothing_attached(cluster, image, mnt)
    # the same through CEPHVOL_BACKEND, the way units choose a backend
    cp = _attach(cluster, image, mnt, CEPHVOL_BACKEND="fuse")
    assert cp.returncode == 9, cp.stderr
    _nothing_attached(cluster, image, mnt)


def test_missing_or_wrong_key_is_a_clear_error_that_maps_nothing(
        cluster: CephCluster, image: str, mnt: Path) -> None:
    _create(cluster, image)
    cp = _attach(cluster, image, mnt, "--backend", "qsd")
    assert cp.returncode == 0, cp.stderr
    (mnt / "f").write_text("kept")
    cluster.cli("detach", image, check=True)
    key = encryption.key_name(parse_spec(image))
    secret = _passphrase(cluster, image)
    with Cluster(_cfg(cluster)) as c:
        c.config_key_rm(key)
    try:
        cp = _attach(cluster, image, mnt, "--backend", "qsd")
        assert cp.returncode == 3, cp.stderr
        assert "key is missing" in cp.stderr and key in cp.stderr
        assert len(cp.stderr.strip().splitlines()) == 1
        _nothing_attached(cluster, image, mnt)
        owner = json.loads(cluster.cli("owner", image, "--json", check=True).stdout)
        assert not owner.get("owner"), owner  # ownership given back too

        with Cluster(_cfg(cluster)) as c:
            c.config_key_set(key, encryption.new_passphrase())
        cp = _attach(cluster, image, mnt, "--backend", "qsd")
        assert cp.returncode == 5, cp.stderr
        assert "does not open its LUKS header" in cp.stderr
        _nothing_attached(cluster, image, mnt)
    finally:
        with Cluster(_cfg(cluster)) as c:
            c.config_key_set(key, secret)
    cp = _attach(cluster, image, mnt, "--backend", "qsd")
    assert cp.returncode == 0, cp.stderr
    assert (mnt / "f").read_text() == "kept"
    cluster.cli("detach", image, check=True)


def test_encrypting_an_image_with_data_is_refused(cluster: CephCluster, image: str,
                                                  mnt: Path) -> None:
    cluster.cli("create", image, "--size", SIZE, check=True)
    cp = _attach(cluster, image, mnt, "--backend", "qsd")
    assert cp.returncode == 0, cp.stderr
    (mnt / "f").write_text("plain")
    cluster.cli("detach", image, check=True)
    before = _raw(cluster, image)[:1 << 20]
    cp = cluster.cli("create", image, "--size", SIZE, "--encrypt")
    assert cp.returncode == 10, cp.stderr
    assert "holds" in cp.stderr and len(cp.stderr.strip().splitlines()) == 1
    assert _raw(cluster, image)[:1 << 20] == before  # nothing written
    with Cluster(_cfg(cluster)) as c:
        assert c.config_key_get(encryption.key_name(parse_spec(image))) is None
    info = json.loads(cluster.cli("info", image, "--json", check=True).stdout)
    assert info["encrypted"] is False
    bad = cluster.cli("create", image + "-c", "--from", image + "@s", "--encrypt")
    assert bad.returncode == 2, bad.stderr


@pytest.mark.parametrize("step", ["encrypt-key", "encrypt-format"])
def test_create_killed_midway_is_finished_by_running_it_again(
        cluster: CephCluster, image: str, step: str) -> None:
    cp = cluster.cli("create", image, "--size", SIZE, "--encrypt", CEPHVOL_TEST_CRASH_AT=step)
    assert cp.returncode == -signal.SIGKILL, cp.stderr
    secret = _passphrase(cluster, image)  # the key is stored before the header is written
    assert _raw(cluster, image).startswith(encryption.LUKS_MAGIC) == (step == "encrypt-format")
    res = _create(cluster, image)
    assert res["encrypted"] and _passphrase(cluster, image) == secret  # the key was reused
    assert _raw(cluster, image).startswith(encryption.LUKS_MAGIC)


@pytest.mark.parametrize("finisher", ["detach", "cleanup"])
def test_crash_after_unlock_is_finished(cluster: CephCluster, image: str, mnt: Path,
                                        finisher: str) -> None:
    """Killed after the daemon opened the encrypted image, before its export:
    the daemon holds the opened image; detach or cleanup stops it."""
    _create(cluster, image)
    cp = _attach(cluster, image, mnt, "--backend", "qsd", CEPHVOL_TEST_CRASH_AT="qsd-unlock")
    assert cp.returncode == -signal.SIGKILL, cp.stderr
    m = _backend(cluster).find(parse_spec(image))
    assert m is not None and not m.device and m.extra["qsd_pid"]
    assert len(_daemons_of(cluster, image)) == 1
    fin = cluster.cli(finisher, *([image] if finisher == "detach" else []))
    assert fin.returncode == 0, fin.stderr
    _nothing_attached(cluster, image, mnt)
    cp = _attach(cluster, image, mnt, "--backend", "qsd")
    assert cp.returncode == 0, cp.stderr
    cluster.cli("detach", image, check=True)


def test_rm_removes_the_key(cluster: CephCluster, image: str) -> None:
    _create(cluster, image)
    cp = cluster.cli("rm", image)
    assert cp.returncode == 0, cp.stderr
    with Cluster(_cfg(cluster)) as c:
        assert c.config_key_get(encryption.key_name(parse_spec(image))) is None
