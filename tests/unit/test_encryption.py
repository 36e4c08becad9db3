"""Encryption at rest without a cluster: the LUKS header parser, key names,
passphrases, the qsd daemon's argv without the image, backend choice."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from cephvol import mapper
from cephvol.backends.base import Backend, HostPaths, Support
from cephvol.backends.qsd import QsdBackend, _without_image
from cephvol.cluster import ClusterConfig
from cephvol.data import encryption
from cephvol.errors import ExitCode, Unsupported
from cephvol.spec import parse_spec


def _luks2(segments: dict, hdr_size: int = 16384) -> bytes:
    binary = encryption.LUKS_MAGIC + (2).to_bytes(2, "big") + hdr_size.to_bytes(8, "big")
    binary = binary.ljust(4096, b"\0")
    area = json.dumps({"segments": segments, "keyslots": {}}).encode()
    return (binary + area).ljust(hdr_size, b"\0")


def test_luks2_header_names_the_smallest_segment_offset() -> None:
    raw = _luks2({"0": {"type": "crypt", "offset": "16777216", "size": "dynamic"},
                  "1": {"type": "crypt", "offset": "33554432", "size": "dynamic"}})
    assert encryption.parse_header(raw) == encryption.Header("luks2", 16777216)


def test_luks2_header_with_unreadable_json_counts_all_of_it_as_header() -> None:
    raw = bytearray(_luks2({"0": {"offset": "4096"}}, hdr_size=32768))
    raw[4096:4100] = b"\xff\xfe{["
    assert encryption.parse_header(bytes(raw)) == encryption.Header("luks2", 32768)


def test_luks1_header_offset_is_in_sectors() -> None:
    raw = (encryption.LUKS_MAGIC + (1).to_bytes(2, "big")).ljust(104, b"\0") \
        + (4096).to_bytes(4, "big")
    assert encryption.parse_header(raw.ljust(592, b"\0")) == encryption.Header("luks1", 2 << 20)


@pytest.mark.parametrize("raw", [b"", b"\0" * 4096, b"LUKS\xba", b"XFSB" + b"\0" * 600,
                                 encryption.LUKS_MAGIC + b"\0\x07" + b"\0" * 600])
def test_not_luks(raw: bytes) -> None:
    assert encryption.parse_header(raw) is None


def test_key_names_follow_pool_namespace_image() -> None:
    assert encryption.key_name(parse_spec("rbd/pg")) == "cephvol/luks/rbd//pg"
    assert encryption.key_name(parse_spec("rbd/ns1/pg@snap")) == "cephvol/luks/rbd/ns1/pg"


def test_passphrases_are_32_random_bytes_in_base64() -> None:
    a, b = encryption.new_passphrase(), encryption.new_passphrase()
    assert len(base64.b64decode(a, validate=True)) == 32
    assert a != b and b"\n" not in a


def test_unlock_never_shows_its_passphrase() -> None:
    u = encryption.Unlock("luks2", b"s3cr3t-passphrase")
    assert "s3cr3t" not in repr(u) and "s3cr3t" not in str(u)


def test_daemon_argv_without_the_image_keeps_everything_else(tmp_path: Path) -> None:
    b = QsdBackend(HostPaths(tmp_path), ClusterConfig(Path("/etc/ceph/ceph.conf")))
    d = b.dir_of(parse_spec("rbd/ns/img"))
    full = b.daemon_argv(d, parse_spec("rbd/ns/img"), False)
    argv, blockdev, export = _without_image(full)
    assert "--blockdev" not in argv and "--export" not in argv
    assert len(argv) == len(full) - 4 and "--pidfile" in argv and "--daemonize" in argv
    assert (blockdev["driver"], blockdev["pool"], blockdev["namespace"], blockdev["image"]) \
        == ("rbd", "rbd", "ns", "img")
    assert export["type"] == "fuse" and export["mountpoint"] == str(d / "image")


class _Fake(Backend):
    ok = True
    can_decrypt = False

    def support(self) -> Support:
        return Support(self.ok, "fine" if self.ok else "not here")

    def decrypts(self) -> str | None:
        return None if self.can_decrypt or self.name == "qsd" else super().decrypts()

    def map(self, spec, opts):  # type: ignore[no-untyped-def]
        raise AssertionError("not mapped in these tests")

    def unmap(self, mapping, *, force=False):  # type: ignore[no-untyped-def]
        raise AssertionError

    def list_mappings(self):  # type: ignore[no-untyped-def]
        return []


def _fakes(monkeypatch: pytest.MonkeyPatch, usable: set[str],
           decrypting: frozenset[str] = frozenset()) -> None:
    """Backends whose support() and decrypts() are decided by the test (the
    selection logic, not this host's kernel, is what is tested); qsd always
    decrypts, as the real one."""
    def make(name: str, paths: HostPaths, cfg: ClusterConfig) -> Backend:
        cls = type(f"Fake{name}", (_Fake,), {"name": name, "ok": name in usable,
                                             "can_decrypt": name in decrypting})
        return cls(paths, cfg)

    monkeypatch.setattr(mapper, "make_backend", make)
    monkeypatch.delenv("CEPHVOL_BACKEND", raising=False)


def _never() -> bool:
    raise AssertionError("asked whether the image is encrypted although it did not matter")


def test_auto_asks_only_when_the_first_choice_cannot_decrypt(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    paths, cfg = HostPaths(tmp_path), ClusterConfig()
    _fakes(monkeypatch, {"qsd", "fuse"})
    assert mapper.select_backend("auto", paths, cfg, encrypted=_never).name == "qsd"
    _fakes(monkeypatch, {"krbd", "qsd", "fuse"})
    assert mapper.select_backend("auto", paths, cfg, encrypted=lambda: False).name == "krbd"
    assert mapper.select_backend("auto", paths, cfg, encrypted=lambda: True).name == "qsd"


def test_auto_without_qsd_refuses_an_encrypted_image(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _fakes(monkeypatch, {"fuse"})
    with pytest.raises(Unsupported) as e:
        mapper.select_backend("auto", HostPaths(tmp_path), ClusterConfig(),
                              encrypted=lambda: True, what="rbd/x")
    assert e.value.exit_code == ExitCode.UNSUPPORTED
    assert "rbd/x is encrypted" in e.value.message and "qsd" in e.value.message


@pytest.mark.parametrize("name", ["fuse", "krbd", "nbd"])
def test_a_named_backend_that_cannot_decrypt_is_refused(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str) -> None:
    _fakes(monkeypatch, {"krbd", "nbd", "qsd", "fuse"})
    with pytest.raises(Unsupported) as e:
        mapper.select_backend(name, HostPaths(tmp_path), ClusterConfig(),
                              encrypted=lambda: True, what="rbd/x")
    assert "--backend qsd" in e.value.message and "\n" not in e.value.message
    assert mapper.select_backend(name, HostPaths(tmp_path), ClusterConfig(),
                                 encrypted=lambda: False).name == name
    assert mapper.select_backend("qsd", HostPaths(tmp_path), ClusterConfig(),
                                 encrypted=_never).name == "qsd"


def test_krbd_with_dm_crypt_keeps_an_encrypted_image(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Where cryptsetup and device-mapper are there, krbd decrypts: auto keeps
    it without asking, and naming it is allowed."""
    paths, cfg = HostPaths(tmp_path), ClusterConfig()
    _fakes(monkeypatch, {"krbd", "qsd", "fuse"}, decrypting=frozenset({"krbd"}))
    assert mapper.select_backend("auto", paths, cfg, encrypted=_never).name == "krbd"
    assert mapper.select_backend("krbd", paths, cfg, encrypted=_never).name == "krbd"
    _fakes(monkeypatch, {"krbd", "fuse"})  # no cryptsetup, no qsd: refused, saying why
    with pytest.raises(Unsupported) as e:
        mapper.select_backend("auto", paths, cfg, encrypted=lambda: True, what="rbd/x")
    assert "krbd: the krbd backend cannot decrypt it" in e.value.message
