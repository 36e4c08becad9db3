"""The service's integration tests: a real Ceph cluster and real volumes from
cephvol's pytest plugin (fixtures ceph_cluster, rbd_image, cephvol_volume)."""

from __future__ import annotations

import os

import pytest
from notes_service import NotesStore, open_volume


def test_notes_are_written_to_the_volume(cephvol_volume):
    assert os.path.ismount(cephvol_volume.mountpoint)
    store = NotesStore(cephvol_volume.mountpoint / "notes")
    a = store.add("buy milk")
    b = store.add("call Ana")
    assert store.get(a) == "buy milk"
    assert store.ids() == sorted([a, b])


@pytest.mark.parametrize("cephvol_volume", [{"fstype": "xfs", "size": "512M"}], indirect=True)
def test_works_on_xfs(cephvol_volume):
    assert cephvol_volume.fstype == "xfs"
    store = NotesStore(cephvol_volume.mountpoint / "notes")
    assert store.get(store.add("on xfs")) == "on xfs"


@pytest.mark.cephvol_image(size="256M")
def test_notes_survive_detach_and_attach(ceph_cluster, rbd_image, tmp_path):
    kw = ceph_cluster.api_kwargs()
    with open_volume(rbd_image.spec, tmp_path / "first", **kw) as store:
        note = store.add("still here after a detach")
    assert not os.path.ismount(tmp_path / "first")
    with open_volume(rbd_image.spec, tmp_path / "second", **kw) as store:
        assert store.get(note) == "still here after a detach"
