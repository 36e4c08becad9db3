"""The detach planner, over every state a crash can leave."""

from __future__ import annotations

from pathlib import Path

from cephvol.cleanup import Observed, Step, places_of, plan_detach, split_copies, split_propagated
from cephvol.hostfs import Mount, parse_mountinfo


def _m(mp: str) -> Mount:
    return Mount(100, 1, 7, 3, "/", mp, "rw,relatime", "ext4", "/dev/loop3")


def _kinds(steps: list[Step]) -> list[str]:
    return [s.kind for s in steps]


def test_nothing_anywhere_is_a_no_op() -> None:
    assert plan_detach(Observed("rbd,-,a", False, "", False)) == []


def test_full_attach_is_undone_in_order() -> None:
    obs = Observed("rbd,-,a", True, "/dev/loop3", True, own_mounts=[_m("/srv/a")])
    assert plan_detach(obs) == [
        Step("sync", "/srv/a"), Step("umount", "/srv/a"),
        Step("check-unused", "/dev/loop3"), Step("unmap", "/dev/loop3"),
        Step("forget", "rbd,-,a")]


def test_nested_mounts_come_off_deepest_first() -> None:
    obs = Observed("k", True, "/dev/loop3", True,
                   own_mounts=[_m("/srv/a"), _m("/srv/a/b/c"), _m("/srv/a/b")])
    umounts = [s.target for s in plan_detach(obs) if s.kind == "umount"]
    assert umounts == ["/srv/a/b/c", "/srv/a/b", "/srv/a"]


def test_crash_after_map_before_journal_is_still_unmapped() -> None:
    # the kernel shows a mapping the journal never recorded
    assert _kinds(plan_detach(Observed("k", False, "/dev/loop3", True))) == [
        "check-unused", "unmap", "forget"]


def test_half_made_mapping_without_device_is_torn_down() -> None:
    # rbd-fuse mounted, losetup never ran
    assert plan_detach(Observed("k", True, "", True)) == [Step("unmap", ""), Step("forget", "k")]


def test_journal_only_is_forgotten() -> None:
    assert plan_detach(Observed("k", True, "", False)) == [Step("forget", "k")]


def test_mount_in_a_container_namespace_refuses_without_force() -> None:
    obs = Observed("k", True, "/dev/loop3", True,
                   foreign_mounts={"mnt:[4026532]": [_m("/data")]},
                   foreign_pids={"mnt:[4026532]": 4242})
    (step,) = plan_detach(obs)
    assert step.kind == "refuse"
    assert "/data in the mount namespace of pid 4242" in step.detail
    forced = plan_detach(obs, force=True)
    assert _kinds(forced) == ["check-unused", "unmap", "forget"]
    assert forced[0].detail == "skip" and forced[1].detail == "force"


def test_lazy_marks_every_umount() -> None:
    obs = Observed("k", True, "/dev/loop3", True, own_mounts=[_m("/a"), _m("/b")])
    assert {s.detail for s in plan_detach(obs, lazy=True) if s.kind == "umount"} == {"lazy"}


def test_propagated_copies_in_service_namespaces_are_not_users() -> None:
    """Recorded in the qemu guest (systemd as PID 1, / shared): /dev/loop0
    mounted at /mnt/p by us, and the copy systemd-udevd's namespace holds."""
    data = Path(__file__).resolve().parent.parent / "data" / "mountinfo"
    own = [m for m in parse_mountinfo((data / "guest-systemd-own.txt").read_text())
           if m.devnum == (7, 0)]
    udevd = [m for m in parse_mountinfo((data / "guest-systemd-udevd.txt").read_text())
             if m.devnum == (7, 0)]
    assert [m.mountpoint for m in own] == ["/mnt/p"] and own[0].shared_group
    real, copies = split_propagated(own, udevd)
    assert (real, [m.mountpoint for m in copies]) == ([], ["/mnt/p"])


def test_a_private_bind_mount_in_a_container_is_a_user() -> None:
    ours = Mount(152, 24, 7, 0, "/", "/mnt/p", "rw", "ext4", "/dev/loop0", ("shared:78",))
    container = Mount(300, 290, 7, 0, "/", "/data", "rw", "ext4", "/dev/loop0", ())
    other_group = Mount(301, 290, 7, 0, "/", "/x", "rw", "ext4", "/dev/loop0", ("master:5",))
    real, copies = split_propagated([ours], [container, other_group])
    assert (real, copies) == ([container, other_group], [])


def test_ownership_is_given_back_only_after_the_unmap() -> None:
    obs = Observed("k", True, "/dev/loop3", True, own_mounts=[_m("/srv/a")], owned=True)
    assert _kinds(plan_detach(obs)) == [
        "sync", "umount", "check-unused", "unmap", "release", "forget"]
    # crashed after taking ownership, before mapping: release, nothing to unmap
    assert _kinds(plan_detach(Observed("k", True, "", False, owned=True))) == [
        "release", "forget"]
    # a refused detach releases nothing
    busy = Observed("k", True, "/dev/loop3", True, owned=True,
                    foreign_mounts={"mnt:[1]": [_m("/data")]}, foreign_pids={"mnt:[1]": 42})
    assert _kinds(plan_detach(busy)) == ["refuse"]


# -- copies of our mount in other namespaces (a container binding a parent directory) --------

# the host: / on vda (8:0), our volume (7:0) at /srv/app; a container's namespace: its
# overlay root (0:50), a bind of the host's /srv at /host-srv (root /srv on 8:0) that carried
# our mount along, and the container's own bind of the volume at /data
HOST = [Mount(20, 1, 8, 0, "/", "/", "rw", "ext4", "/dev/vda", ("shared:1",)),
        Mount(152, 20, 7, 0, "/", "/srv/app", "rw", "ext4", "/dev/loop0", ("shared:78",))]
CONTAINER = [Mount(400, 399, 0, 50, "/", "/", "rw", "overlay", "overlay"),
             Mount(401, 400, 8, 0, "/srv", "/host-srv", "rw", "ext4", "/dev/vda"),
             Mount(402, 401, 7, 0, "/", "/host-srv/app", "rw", "ext4", "/dev/loop0"),
             Mount(403, 400, 7, 0, "/", "/data", "rw", "ext4", "/dev/loop0")]


def test_a_bind_of_a_parent_carries_a_copy_and_a_bind_of_the_volume_is_the_containers() -> None:
    places = places_of([HOST[1]], HOST)
    placed, copies = split_copies(places, CONTAINER, CONTAINER[2:])
    assert [m.mountpoint for m in copies] == ["/host-srv/app"]
    assert [m.mountpoint for m in placed] == ["/data"]


def test_a_bind_of_the_root_read_only_carries_a_copy_too() -> None:
    """`-v /:/rootfs:ro`, as monitoring agents do."""
    ns = [Mount(500, 499, 0, 51, "/", "/", "rw", "overlay", "overlay"),
          Mount(501, 500, 8, 0, "/", "/rootfs", "ro", "ext4", "/dev/vda"),
          Mount(502, 501, 7, 0, "/", "/rootfs/srv/app", "ro", "ext4", "/dev/loop0")]
    assert split_copies(places_of([HOST[1]], HOST), ns, ns[2:]) == ([], [ns[2]])


def test_a_subdirectory_bind_or_another_place_is_not_a_copy() -> None:
    ns = [Mount(600, 599, 8, 0, "/srv", "/host-srv", "rw", "ext4", "/dev/vda"),
          Mount(601, 600, 7, 0, "/", "/host-srv/other", "rw", "ext4", "/dev/loop0"),
          Mount(602, 600, 7, 0, "/sub", "/host-srv/app", "rw", "ext4", "/dev/loop0")]
    assert split_copies(places_of([HOST[1]], HOST), ns, ns[1:]) == (ns[1:], [])


def test_without_our_mount_the_journalled_mountpoint_places_the_copies() -> None:
    """A rerun of detach after our umount went through but a copy stayed."""
    assert places_of([], HOST[:1], "/srv/app") == places_of([HOST[1]], HOST)
    assert places_of([], HOST[:1], None) == set()


def test_unused_copies_are_unmounted_first_then_ours() -> None:
    obs = Observed("k", True, "/dev/loop0", True, own_mounts=[HOST[1]],
                   foreign_copies={"mnt:[9]": [CONTAINER[2]]}, foreign_pids={"mnt:[9]": 77})
    steps = plan_detach(obs)
    assert steps[0] == Step("umount-copy", "/host-srv/app", "77 mnt:[9] 7:0")
    assert _kinds(steps) == ["umount-copy", "sync", "umount", "check-unused", "unmap", "forget"]


def test_a_refusal_names_the_container() -> None:
    obs = Observed("k", True, "/dev/loop0", True, own_mounts=[HOST[1]],
                   foreign_mounts={"mnt:[9]": [CONTAINER[2]]}, foreign_pids={"mnt:[9]": 77},
                   foreign_names={"mnt:[9]": "docker container agent; pid 80 (sh) has its "
                                             "cwd there"})
    (step,) = plan_detach(obs)
    assert step.kind == "refuse"
    assert ("/host-srv/app in the mount namespace of pid 77 (docker container agent; pid 80 "
            "(sh) has its cwd there)") in step.detail
