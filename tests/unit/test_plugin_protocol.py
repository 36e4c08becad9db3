"""The volume plugin's protocol functions without a cluster: every endpoint's
shape, and every bad input refused with the CLI's exit code in "Err", before
anything reaches the cluster (the config points nowhere: a call that tried
to connect would answer "cephvol exit 7", not the code asserted here).

Records a Create would write are seeded in their on-disk format (a Create
needs the cluster); the real Create/Mount/Unmount/Remove against a cluster
and a socket: tests/integration/test_plugin.py."""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path
from typing import Any

import pytest

from cephvol.cluster import ClusterConfig
from cephvol.lifecycle import Host
from cephvol.mapper import HostPaths
from cephvol.plugin import protocol
from cephvol.plugin.protocol import Plugin, PluginPaths


@pytest.fixture
def plugin(tmp_path: Path) -> Plugin:
    host = Host(ClusterConfig(conf=tmp_path / "no-such-ceph.conf"), HostPaths(tmp_path / "state"))
    return Plugin(host, PluginPaths(tmp_path / "data", tmp_path / "mnt", tmp_path / "run"))


def _seed(plugin: Plugin, name: str, options: dict[str, str] | None = None,
          ids: list[str] | None = None) -> None:
    """A volume as Create records it (and Mount IDs as Mount records them)."""
    d = plugin.paths.data_dir / "volumes"
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.json").write_text(json.dumps({
        "version": 1, "name": name, "image": f"rbd/{name}", "options": options or {},
        "created": 0}))
    if ids:
        m = plugin.paths.run_dir / "mounts"
        m.mkdir(parents=True, exist_ok=True)
        (m / f"{name}.json").write_text(json.dumps({"version": 1,
                                                    "ids": {i: 0 for i in ids}}))


def _err(res: dict[str, Any], code: int, needle: str) -> None:
    assert set(res) == {"Err"}, res
    assert re.fullmatch(rf"cephvol exit {code}: .+", res["Err"]), res
    assert needle in res["Err"], res
    assert "\n" not in res["Err"] and "Traceback" not in res["Err"]


def test_activate_and_capabilities(plugin: Plugin) -> None:
    assert plugin.handle("Plugin.Activate", {}) == {"Implements": ["VolumeDriver"]}
    assert plugin.handle("Plugin.Activate", None) == {"Implements": ["VolumeDriver"]}
    assert plugin.handle("VolumeDriver.Capabilities", {}) == {
        "Capabilities": {"Scope": "global"}}


def test_list_get_path_of_recorded_volumes(plugin: Plugin) -> None:
    assert plugin.handle("VolumeDriver.List", None) == {"Volumes": [], "Err": ""}
    _seed(plugin, "v1", {"size": "1G", "delete-on-remove": "true"})
    _seed(plugin, "v2", ids=["c1"])
    assert plugin.handle("VolumeDriver.List", {}) == {"Volumes": [
        {"Name": "v1", "Mountpoint": ""},
        {"Name": "v2", "Mountpoint": str(plugin.paths.mount_root / "v2")}], "Err": ""}
    got = plugin.handle("VolumeDriver.Get", {"Name": "v1"})
    assert got == {"Volume": {"Name": "v1", "Mountpoint": "", "Status": {
        "image": "rbd/v1", "options": {"size": "1G", "delete-on-remove": "true"},
        "mounts": 0, "on_remove": "delete the image", "size": "1G"}}, "Err": ""}
    assert (plugin.handle("VolumeDriver.Get", {"Name": "v2"})["Volume"]["Status"]["on_remove"]
            == "forget the volume, keep the image")
    assert plugin.handle("VolumeDriver.Path", {"Name": "v1"}) == {"Mountpoint": "", "Err": ""}
    assert plugin.handle("VolumeDriver.Path", {"Name": "v2"}) == {
        "Mountpoint": str(plugin.paths.mount_root / "v2"), "Err": ""}


@pytest.mark.parametrize("endpoint", ["Create", "Remove", "Mount", "Unmount", "Path", "Get"])
@pytest.mark.parametrize(("body", "needle"), [
    ({}, "missing Name"),
    ({"Name": ""}, "missing Name"),
    ({"Name": 7}, "Name must be a string"),
    ({"Name": ["v"]}, "Name must be a string"),
    ({"Name": "a/b"}, "invalid volume name"),
    ({"Name": "../etc"}, "invalid volume name"),
    ({"Name": ".hidden"}, "invalid volume name"),
    ({"Name": "-rf"}, "invalid volume name"),
    ({"Name": "v1\n"}, "invalid volume name"),
    ({"Name": "v 1"}, "invalid volume name"),
    ({"Name": "v@snap"}, "invalid volume name"),
    ({"Name": "é"}, "invalid volume name"),
    ({"Name": "x" * 97}, "invalid volume name"),
])
def test_bad_names_are_refused_everywhere(plugin: Plugin, endpoint: str,
                                          body: dict[str, Any], needle: str) -> None:
    _err(plugin.handle(f"VolumeDriver.{endpoint}", {**body, "ID": "c1"}), 2, needle)


@pytest.mark.parametrize(("opts", "needle"), [
    ({"sise": "1G"}, "unknown option 'sise'"),
    ({"key": "AQB..."}, "unknown option 'key'"),
    ({"size": "ten"}, "invalid size"),
    ({"size": "0"}, "invalid size"),
    ({"size": "1000"}, "multiple of 512"),
    ({"size": "2E"}, "larger than 1E"),
    ({"size": "1G\n"}, "control characters"),
    ({"size": 1}, "must be a string"),
    ({"pool": "a/b"}, "no '/' or '@'"),
    ({"pool": "a@b"}, "no '/' or '@'"),
    ({"pool": ""}, "no '/' or '@'"),
    ({"pool": "p" * 64}, "longer than 63"),
    ({"namespace": "-x"}, "invalid image spec"),
    ({"fstype": "btrfs"}, "unsupported filesystem"),
    ({"backend": "iscsi"}, "option backend="),
    ({"read-only": "maybe"}, "expected true or false"),
    ({"delete-on-remove": ""}, "expected true or false"),
    ({"fsck": "sometimes"}, "option fsck="),
    ({"mkfs-option": "/dev/sda"}, "mkfs-option"),
    ({"mkfs-option": "-E foo bar"}, "a bare argument"),
    ({"mkfs-option": "-L $(id)"}, "letters, digits"),
    ({"mount-option": "bind"}, "not a filesystem option"),
    ({"mount-option": "source=/dev/sda"}, "invalid mount option"),
    ({"mount-option": "noatime,a b"}, "invalid mount option"),
    ({"size": "x" * 2000}, "longer than"),
])
def test_bad_options_are_refused_before_the_cluster(plugin: Plugin, opts: dict[str, Any],
                                                    needle: str) -> None:
    _err(plugin.handle("VolumeDriver.Create", {"Name": "v1", "Opts": opts}), 2, needle)
    assert not (plugin.paths.data_dir / "volumes" / "v1.json").exists()


def test_an_unknown_option_is_named_but_its_value_never_echoed(plugin: Plugin) -> None:
    res = plugin.handle("VolumeDriver.Create", {"Name": "v1", "Opts": {"secret": "AQBsecret=="}})
    _err(res, 2, "unknown option 'secret'")
    assert "AQBsecret" not in res["Err"]


def test_good_options_parse(plugin: Plugin) -> None:
    o = protocol.parse_options("v1", {
        "size": "10G", "pool": "p", "namespace": "ns", "fstype": "xfs", "backend": "fuse",
        "read-only": "yes", "exclusive": "false", "mkfs-option": "-E stride=16 -O ^has_journal",
        "mount-option": "noatime,discard", "fsck": "skip", "delete-on-remove": "TRUE"})
    assert (o.size, o.fstype, o.backend, o.read_only, o.exclusive, o.fsck) == (
        10 << 30, "xfs", "fuse", True, False, "skip")
    assert o.mkfs_options == ["-E", "stride=16", "-O", "^has_journal"]
    assert o.mount_options == ["noatime", "discard"] and o.delete_on_remove
    assert str(protocol.image_spec("v1", o)) == "p/ns/v1"


@pytest.mark.parametrize("body", [[], "v1", 3, True])
def test_a_body_that_is_not_an_object(plugin: Plugin, body: Any) -> None:
    _err(plugin.handle("VolumeDriver.Create", body), 2, "JSON object")


def test_opts_that_are_not_an_object(plugin: Plugin) -> None:
    _err(plugin.handle("VolumeDriver.Create", {"Name": "v1", "Opts": ["size=1G"]}), 2,
         "Opts must be an object")


def test_unknown_endpoint(plugin: Plugin) -> None:
    _err(plugin.handle("VolumeDriver.Snapshot", {"Name": "v1"}), 3, "unknown endpoint")
    _err(plugin.handle("NetworkDriver.Create", {}), 3, "unknown endpoint")


@pytest.mark.parametrize("endpoint", ["Remove", "Mount", "Unmount", "Path", "Get"])
def test_unknown_volume(plugin: Plugin, endpoint: str) -> None:
    _err(plugin.handle(f"VolumeDriver.{endpoint}", {"Name": "nope", "ID": "c1"}), 3,
         "no volume named nope")


@pytest.mark.parametrize("endpoint", ["Mount", "Unmount"])
@pytest.mark.parametrize(("mid", "needle"), [
    (None, "missing ID"), ("", "missing ID"), (5, "invalid mount ID"),
    ("a/b", "invalid mount ID"), ("x\n", "invalid mount ID"), ("x" * 300, "invalid mount ID")])
def test_bad_mount_ids(plugin: Plugin, endpoint: str, mid: Any, needle: str) -> None:
    _seed(plugin, "v1")
    _err(plugin.handle(f"VolumeDriver.{endpoint}", {"Name": "v1", "ID": mid}), 2, needle)


def test_unmount_of_an_id_never_mounted(plugin: Plugin) -> None:
    _seed(plugin, "v1", ids=["c1"])
    _err(plugin.handle("VolumeDriver.Unmount", {"Name": "v1", "ID": "c2"}), 3,
         "no mount with ID 'c2'")
    assert json.loads((plugin.paths.run_dir / "mounts" / "v1.json").read_text())["ids"] == {
        "c1": 0}


def test_remove_while_mounted_is_refused_and_keeps_the_record(plugin: Plugin) -> None:
    _seed(plugin, "v1", {"delete-on-remove": "true"}, ids=["c1", "c2"])
    _err(plugin.handle("VolumeDriver.Remove", {"Name": "v1"}), 4,
         "mounted by 2 container(s) (c1, c2)")
    assert (plugin.paths.data_dir / "volumes" / "v1.json").exists()


def test_create_again_with_other_options_is_a_conflict(plugin: Plugin) -> None:
    _seed(plugin, "v1", {"size": "1G"})
    _err(plugin.handle("VolumeDriver.Create", {"Name": "v1", "Opts": {"size": "2G"}}), 5,
         "exists with other options (size=1G)")
    # the same options, or none (`docker run -v v1:/d`), are the volume that is there
    assert plugin.handle("VolumeDriver.Create", {"Name": "v1", "Opts": {"size": "1G"}}) == {
        "Err": ""}
    assert plugin.handle("VolumeDriver.Create", {"Name": "v1", "Opts": None}) == {"Err": ""}


def test_create_without_a_cluster_says_so(plugin: Plugin) -> None:
    res = plugin.handle("VolumeDriver.Create", {"Name": "v1", "Opts": {"size": "1G"}})
    _err(res, 3, "no-such-ceph.conf does not exist")
    assert "-o size" not in res["Err"]  # the hint is for a missing image only
    res = plugin.handle("VolumeDriver.Create", {"Name": "v1"})
    _err(res, 3, "no-such-ceph.conf does not exist")
    assert "-o size" not in res["Err"]
    assert not (plugin.paths.data_dir / "volumes" / "v1.json").exists()


@pytest.mark.parametrize("damage", ["{", "[]", '{"name": "other", "image": "rbd/v1", '
                                               '"options": {}}'])
def test_a_damaged_record_is_reported_not_a_traceback(plugin: Plugin, damage: str) -> None:
    d = plugin.paths.data_dir / "volumes"
    d.mkdir(parents=True)
    (d / "v1.json").write_text(damage)
    _err(plugin.handle("VolumeDriver.Mount", {"Name": "v1", "ID": "c1"}), 5, "damaged")
    _err(plugin.handle("VolumeDriver.Get", {"Name": "v1"}), 5, "damaged")


def test_a_record_behind_a_symlink_is_not_followed(plugin: Plugin, tmp_path: Path) -> None:
    d = plugin.paths.data_dir / "volumes"
    d.mkdir(parents=True)
    (tmp_path / "elsewhere.json").write_text("{}")
    (d / "v1.json").symlink_to(tmp_path / "elsewhere.json")
    _err(plugin.handle("VolumeDriver.Get", {"Name": "v1"}), 5, "not a regular file")


def _answer_within(plugin: Plugin, endpoint: str, req: dict[str, Any],
                   seconds: float = 10) -> dict[str, Any]:
    out: dict[str, Any] = {}
    t = threading.Thread(target=lambda: out.update(plugin.handle(endpoint, req)), daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{endpoint} still blocked after {seconds} s"
    return out


def test_a_fifo_in_place_of_a_record_never_blocks_a_request(plugin: Plugin) -> None:
    """open(2) of a FIFO for reading waits for a writer: a request thread
    would hang for good, and with it the plugin's stop."""
    d = plugin.paths.data_dir / "volumes"
    d.mkdir(parents=True)
    os.mkfifo(d / "v1.json")
    _err(_answer_within(plugin, "VolumeDriver.Get", {"Name": "v1"}), 5, "not a regular file")
    _err(_answer_within(plugin, "VolumeDriver.Mount", {"Name": "v1", "ID": "c1"}), 5,
         "not a regular file")


def test_a_record_nested_deeper_than_python_recurses_is_damaged(plugin: Plugin) -> None:
    d = plugin.paths.data_dir / "volumes"
    d.mkdir(parents=True)
    (d / "v1.json").write_text("[" * 200_000)
    _err(plugin.handle("VolumeDriver.Get", {"Name": "v1"}), 5, "damaged")


def test_an_internal_error_is_an_answer_with_exit_70(plugin: Plugin) -> None:
    def boom(req: dict[str, Any]) -> dict[str, Any]:
        raise KeyError("x")

    plugin.endpoints["VolumeDriver.List"] = boom
    _err(plugin.handle("VolumeDriver.List", {}), 70, "internal error: KeyError")
