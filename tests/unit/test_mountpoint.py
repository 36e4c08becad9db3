"""Mountpoints that cannot escape, on a real filesystem with real mounts.

A small ext4 on a loop file is mounted through cephvol.fs (the same calls
attach makes) at paths built from a tree of traps: symlinks to / and /etc,
relative links, a dangling link, a file, a FIFO, an existing mount, read-only
bind mounts of /etc and of a directory below it, `..`, very long names. The
properties: a refusal is one line with a documented exit code and changes
nothing; a success mounts exactly at the named (link-free) path; a component
swapped for a symlink between the check and the mount never redirects it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cephvol import envfile, fs, hostfs, mountpoint
from cephvol._os import mountapi
from cephvol.errors import CephvolError, ExitCode
from cephvol.spec import parse_mountpoint

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("mkfs.ext4") or not shutil.which("losetup"),
    reason="needs root, mkfs.ext4 and losetup (loop devices, mounts)")

REFUSALS = {ExitCode.USAGE, ExitCode.BUSY, ExitCode.CONFLICT}


def _sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


def _umount_all_under(base: Path) -> None:
    for m in sorted(hostfs.read_mounts(), key=lambda m: -len(m.mountpoint)):
        if m.mountpoint == str(base) or m.mountpoint.startswith(str(base) + "/"):
            subprocess.run(["umount", "-l", m.mountpoint], check=False, capture_output=True)


@pytest.fixture(scope="module")
def loopdev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A 32 MiB ext4 on a loop device: the volume being mounted."""
    d = tmp_path_factory.mktemp("mpimg")
    img = d / "fs.img"
    with img.open("wb") as f:
        f.truncate(32 << 20)
    _sh("mkfs.ext4", "-q", str(img))
    dev = _sh("losetup", "--find", "--show", str(img))
    try:
        yield dev
    finally:
        devnum = hostfs.device_number(dev)
        for m in hostfs.read_mounts():
            if m.devnum == devnum:
                subprocess.run(["umount", "-l", m.mountpoint], check=False)
        subprocess.run(["losetup", "-d", dev], check=False)
        shutil.rmtree(d, ignore_errors=True)


ETC_SUB = next(p for p in ("/etc/ssl", "/etc/default", "/etc/systemd") if os.path.isdir(p))


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The traps. `state` plays cephvol's state directory."""
    b = tmp_path_factory.mktemp("mptree")
    (b / "d" / "e").mkdir(parents=True)
    (b / "state" / "fuse").mkdir(parents=True)
    (b / "f").write_text("a file\n")
    os.mkfifo(b / "p")
    os.symlink("/", b / "ls")
    os.symlink("/etc", b / "le")
    os.symlink("d", b / "lr")  # relative, to a harmless place: still refused
    os.symlink("../..", b / "lu")
    os.symlink("nowhere", b / "dang")
    for name in ("m", "be", "bs", "bsd"):
        (b / name).mkdir()
    try:
        _sh("mount", "-t", "tmpfs", "-o", "size=1m", "cvtest", str(b / "m"))
        for src, name in (("/etc", "be"), (ETC_SUB, "bs")):
            _sh("mount", "--bind", src, str(b / name))
            _sh("mount", "-o", "remount,bind,ro", str(b / name))
        _sh("mount", "--bind", str(b / "state"), str(b / "bsd"))  # writable
        yield b
    finally:
        _umount_all_under(b)
        shutil.rmtree(b, ignore_errors=True)


def _snapshot(base: Path) -> dict[str, tuple[int, int, str]]:
    """Everything under `base` (not inside the /etc binds), /etc's top level,
    and the host's mounts outside `base`."""
    out: dict[str, tuple[int, int, str]] = {}
    for root, dirs, files in os.walk(base):
        if root == str(base):
            dirs[:] = [d for d in dirs if d not in ("be", "bs", "bsd")]
        for name in dirs + files:
            p = os.path.join(root, name)
            s = os.lstat(p)
            link = os.readlink(p) if stat.S_ISLNK(s.st_mode) else ""
            out[p] = (stat.S_IFMT(s.st_mode), s.st_size if stat.S_ISREG(s.st_mode) else 0, link)
    for name in os.listdir("/etc"):
        out["/etc/" + name] = (stat.S_IFMT(os.lstat("/etc/" + name).st_mode), 0, "")
    for m in hostfs.read_mounts():  # mounts on system places (other work on this
        # host mounts and unmounts elsewhere meanwhile)
        if m.mountpoint in mountpoint.SYSTEM_DIRS or any(
                m.mountpoint == t or m.mountpoint.startswith(t + "/")
                for t in mountpoint.SYSTEM_TREES):
            out[f"mount {m.mount_id}"] = (m.major, m.minor, m.mountpoint)
    return out


def _mounted(devnum: tuple[int, int]) -> list[str]:
    return [m.mountpoint for m in hostfs.read_mounts() if m.devnum == devnum]


def _attach_like(dev: str, text: str, state: Path, options: list[str] | None = None) -> Path:
    """What `cephvol attach -m TEXT` does with a mountpoint, in its order."""
    mp = Path(str(parse_mountpoint(text)))
    fs.check_mountpoint(mp, hostfs.read_mounts(), state)
    fs.ensure_mountpoint(mp, hostfs.read_mounts(), state)
    fs.mount(dev, mp, "ext4", options or [], False, state_dir=state)
    return mp


def _has_link(path: str) -> bool:
    parts = Path(path).parts
    return any(os.path.islink(os.path.join(*parts[: i + 1])) for i in range(1, len(parts)))


def _refusal_ok(exc: CephvolError) -> None:
    assert exc.exit_code in REFUSALS, (exc.exit_code, exc.message)
    assert "\n" not in str(exc) and str(exc).strip()


NAMES = ["d", "e", "f", "p", "ls", "le", "lr", "lu", "dang", "m", "be", "bs", "state", "fuse",
         "n1", "n2", ".", ".."]


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(NAMES), min_size=1, max_size=4))
def test_mount_lands_exactly_where_named_or_nothing_changes(
        tree: Path, loopdev: str, comps: list[str]) -> None:
    text = str(tree) + "/" + "/".join(comps)
    devnum = hostfs.device_number(loopdev)
    before = _snapshot(tree)
    through_link = ".." not in comps and _has_link(text)
    try:
        mp = _attach_like(loopdev, text, tree / "state")
    except CephvolError as exc:
        _refusal_ok(exc)
        assert _snapshot(tree) == before, f"{text}: refused, but something changed"
        assert _mounted(devnum) == []
        return
    try:
        assert ".." not in comps
        assert not through_link, f"{text} goes through a symlink but was mounted"
        assert _mounted(devnum) == [str(mp)]
        assert os.path.realpath(mp) == str(mp)
        norm = [c for c in comps if c != "."]
        assert norm[0] not in ("be", "bs", "state") and norm != ["m"]
        assert (os.major(os.stat(mp).st_dev), os.minor(os.stat(mp).st_dev)) == devnum
    finally:
        fs.umount(str(mp), device=loopdev)
        # what ensure_mountpoint made for this example goes again
        p = mp
        while str(p) not in before and p != tree:
            p.rmdir()
            p = p.parent
    assert _mounted(devnum) == []
    assert _snapshot(tree) == before


@pytest.mark.parametrize(("rel", "code", "words"), [
    ("ls", ExitCode.USAGE, "is a symlink"),
    ("le", ExitCode.USAGE, "is a symlink"),
    ("le/sub", ExitCode.USAGE, "le is a symlink"),  # /tmp/l2/sub with l2 -> /etc
    ("lr/x", ExitCode.USAGE, "is a symlink"),
    ("lu/x", ExitCode.USAGE, "is a symlink"),
    ("dang", ExitCode.USAGE, "is a symlink"),
    ("f", ExitCode.CONFLICT, "not a directory"),
    ("f/x", ExitCode.CONFLICT, "not a directory"),
    ("p", ExitCode.CONFLICT, "not a directory"),
    ("p/x", ExitCode.CONFLICT, "not a directory"),
    ("m", ExitCode.BUSY, "already a mountpoint"),
    ("be", ExitCode.USAGE, "/etc (through a bind mount)"),
    ("be/sub", ExitCode.USAGE, "inside /etc (through a bind mount)"),
    ("bs", ExitCode.USAGE, "inside /etc (through a bind mount)"),
    ("state", ExitCode.USAGE, "state directory"),
    ("state/fuse/x", ExitCode.USAGE, "state directory"),
    ("d/../ls", ExitCode.USAGE, "'..'"),
    ("x" * 256, ExitCode.USAGE, "longer than 255"),
    ("/".join(["y" * 200] * 21), ExitCode.USAGE, "longer than"),
])
def test_each_trap_is_refused_with_its_code(tree: Path, loopdev: str, rel: str,
                                           code: ExitCode, words: str) -> None:
    before = _snapshot(tree)
    with pytest.raises(CephvolError) as err:
        _attach_like(loopdev, f"{tree}/{rel}", tree / "state")
    assert err.value.exit_code == code and words in err.value.message, err.value.message
    _refusal_ok(err.value)
    assert _snapshot(tree) == before
    assert _mounted(hostfs.device_number(loopdev)) == []


@pytest.mark.parametrize("text", ["/", "/etc", "/etc/cephvol-test", "/usr/local/x", "/proc/x",
                                  "/dev/x", "/sys/x", "/boot/x", "/lib/x", "/bin/x", "/var",
                                  "/var/lib", "/run", "/tmp", "/home", "/root", "/srv", "/mnt",
                                  "//etc", "/./etc/x"])
def test_system_places_are_refused_by_name(text: str) -> None:
    with pytest.raises(CephvolError) as err:
        mp = parse_mountpoint(text)
        fs.check_mountpoint(Path(str(mp)), hostfs.read_mounts(), None)
    assert err.value.exit_code == ExitCode.USAGE
    _refusal_ok(err.value)


@pytest.mark.parametrize(("rel", "words"), [
    ("bsd/x.env", "inside {state} (through a bind mount)"),
    ("bsd/fuse/x.env", "inside {state} (through a bind mount)"),
    ("be/cephvol-x.env", "inside /etc (through a bind mount)"),
    ("bs/x.env", "inside /etc (through a bind mount)"),
])
def test_an_env_file_below_a_bind_of_etc_or_the_state_dir_is_refused(
        tree: Path, rel: str, words: str) -> None:
    """By identity, as mountpoints: a writable bind of the state directory
    (or of /etc) elsewhere must not carry the env file into it."""
    state = tree / "state"
    before = _snapshot(tree)
    vals = {"image": "rbd/x", "device": "/dev/loop9"}
    for call in (lambda: envfile.check(tree / rel, "rbd/x", None, state),
                 lambda: envfile.write(tree / rel, "rbd/x", vals, None, state)):
        with pytest.raises(CephvolError) as err:
            call()
        assert err.value.exit_code == ExitCode.USAGE, err.value.message
        assert words.format(state=state) in err.value.message, err.value.message
        _refusal_ok(err.value)
    assert _snapshot(tree) == before
    assert sorted(os.listdir(state)) == ["fuse"]
    # the same name in a plain directory is written
    envfile.write(tree / "d" / "x.env", "rbd/x", vals, None, state)
    assert (tree / "d" / "x.env").read_text().startswith(envfile.MARKER)
    (tree / "d" / "x.env").unlink()


def test_state_dir_ancestor_is_refused(tree: Path) -> None:
    with pytest.raises(CephvolError, match="would hide cephvol's state directory"):
        fs.check_mountpoint(tree, hostfs.read_mounts(), tree / "state" / "fuse")


def test_long_but_legal_path_is_made_and_mounted(tree: Path, loopdev: str) -> None:
    """PATH_MAX and NAME_MAX are the limits, not less: directories are made
    with *at() calls relative to their parent, so no call sees the whole path."""
    rel = "/".join(["z" * 255] * 15)  # ~3.9 KB below the tree
    text = f"{tree}/{rel}"
    assert len(text) < mountpoint.PATH_MAX
    mp = _attach_like(loopdev, text, tree / "state")
    try:
        assert _mounted(hostfs.device_number(loopdev)) == [text]
    finally:
        fs.umount(str(mp), device=loopdev)
        shutil.rmtree(tree / ("z" * 255))
    assert _mounted(hostfs.device_number(loopdev)) == []


def test_component_swapped_for_a_link_after_the_check_is_refused(tree: Path,
                                                                loopdev: str) -> None:
    """Between ensure_mountpoint and mount (fsck and grow run there): the
    mount opens the path again without following links."""
    victim = tree / "d"  # stands in for /etc: must never be mounted over
    (victim / "sub").mkdir()
    real = tree / "sw"
    mp = real / "sub"
    try:
        fs.check_mountpoint(mp, hostfs.read_mounts(), tree / "state")
        fs.ensure_mountpoint(mp, hostfs.read_mounts(), tree / "state")
        real.rename(tree / "sw.moved")
        os.symlink(victim, real)
        with pytest.raises(CephvolError) as err:
            fs.mount(loopdev, mp, "ext4", [], False, state_dir=tree / "state")
        assert err.value.exit_code == ExitCode.USAGE and "is a symlink" in err.value.message
        assert _mounted(hostfs.device_number(loopdev)) == []
    finally:
        with contextlib.suppress(OSError):
            real.unlink()
        shutil.rmtree(tree / "sw.moved", ignore_errors=True)
        (victim / "sub").rmdir()


def test_swap_after_the_directory_is_open_cannot_redirect(tree: Path, loopdev: str,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """The last moment: the path is swapped for a link after the descriptor
    is open. The mount lands on the directory that was checked (now renamed),
    never at the link's target."""
    victim = tree / "d"
    (victim / "sub").mkdir()
    real = tree / "sw2"
    mp = real / "sub"
    fs.ensure_mountpoint(mp, hostfs.read_mounts(), tree / "state")
    real_mount_at = mountapi.mount_at

    def swap_then_mount(*args: object, **kw: object) -> None:
        real.rename(tree / "sw2.moved")
        os.symlink(victim, real)
        real_mount_at(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(mountapi, "mount_at", swap_then_mount)
    devnum = hostfs.device_number(loopdev)
    try:
        fs.mount(loopdev, mp, "ext4", [], False, state_dir=tree / "state")
        assert _mounted(devnum) == [str(tree / "sw2.moved" / "sub")]
        assert os.stat(victim / "sub").st_dev != os.stat(tree / "sw2.moved" / "sub").st_dev
    finally:
        for where in _mounted(devnum):
            subprocess.run(["umount", where], check=False)
        with contextlib.suppress(OSError):
            real.unlink()
        shutil.rmtree(tree / "sw2.moved", ignore_errors=True)
        (victim / "sub").rmdir()


def test_racing_swapper_never_redirects_a_mount(tree: Path, loopdev: str) -> None:
    """A thread flips a component between the real directory and a link to a
    victim while mounts are attempted: each one is refused or lands in the
    real directory."""
    victim = tree / "d"
    (victim / "sub").mkdir()
    real, moved = tree / "race", tree / "race.real"
    (real / "sub").mkdir(parents=True)
    devnum = hostfs.device_number(loopdev)
    stop = threading.Event()

    def flip() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                real.rename(moved)
                os.symlink(victim, real)
                time.sleep(0.0005)
                real.unlink()
                moved.rename(real)
            time.sleep(0.001)

    t = threading.Thread(target=flip)
    t.start()
    landed, refused = 0, 0
    try:
        for _ in range(60):
            try:
                fs.mount(loopdev, real / "sub", "ext4", [], False, state_dir=tree / "state")
            except CephvolError as exc:
                _refusal_ok(exc)
                refused += 1
                continue
            where = _mounted(devnum)
            assert where in ([str(real / "sub")], [str(moved / "sub")]), where
            landed += 1
            stop.set()
            t.join()
            fs.umount(_mounted(devnum)[0], device=loopdev)
            assert _mounted(devnum) == []
            stop.clear()
            t = threading.Thread(target=flip)
            t.start()
    finally:
        stop.set()
        t.join()
        for where in _mounted(devnum):
            subprocess.run(["umount", where], check=False)
        if moved.exists():
            with contextlib.suppress(OSError):
                real.unlink()
            moved.rename(real)
        shutil.rmtree(real, ignore_errors=True)
        (victim / "sub").rmdir()
    assert not os.path.ismount(victim / "sub")
    assert landed + refused == 60 and landed > 0


def test_bad_mount_option_carries_the_kernels_reason(tree: Path, loopdev: str) -> None:
    mp = tree / "opt"
    fs.ensure_mountpoint(mp, hostfs.read_mounts(), tree / "state")
    try:
        for use_api in (None, False):  # the fd API, then the mount(8) fallback
            with pytest.raises(CephvolError) as err:
                fs.mount(loopdev, mp, "ext4", ["nosuchopt"], False, state_dir=tree / "state",
                         use_mount_api=use_api)
            assert err.value.exit_code == ExitCode.SYSTEM
            assert "ext4: Unknown parameter 'nosuchopt'" in err.value.message, err.value.message
            assert "\n" not in err.value.message
        with pytest.raises(CephvolError, match=r"XFS \(loop\d+\): Invalid superblock"):
            fs.mount(loopdev, mp, "xfs", [], False, state_dir=tree / "state")
        assert _mounted(hostfs.device_number(loopdev)) == []
    finally:
        mp.rmdir()


@pytest.mark.parametrize("use_api", [None, False])
def test_options_reach_the_mount(tree: Path, loopdev: str, use_api: bool | None) -> None:
    mp = tree / "opts"
    fs.ensure_mountpoint(mp, hostfs.read_mounts(), tree / "state")
    devnum = hostfs.device_number(loopdev)
    try:
        fs.mount(loopdev, mp, "ext4", ["noatime", "nodev", "errors=remount-ro", "nodelalloc"],
                 True, state_dir=tree / "state", use_mount_api=use_api)
        m = next(m for m in hostfs.read_mounts() if m.devnum == devnum)
        assert {"ro", "noatime", "nodev"} <= set(m.options.split(","))
        line = next(ln for ln in Path("/proc/self/mountinfo").read_text().splitlines()
                    if f" {m.mountpoint} " in ln)
        assert "nodelalloc" in line.split(" - ")[1]  # a filesystem option reached ext4
        with pytest.raises(OSError):
            (mp / "w").write_text("x")
    finally:
        fs.umount(str(mp), device=loopdev)
        mp.rmdir()


def test_umount_takes_only_the_volumes_own_mount(tree: Path, loopdev: str) -> None:
    """detach unmounts exactly what attach mounted: not a foreign mount at
    the same path, not one stacked on top, not through a swapped link."""
    devnum = hostfs.device_number(loopdev)
    mp = tree / "um"
    mp.mkdir()
    try:
        _sh("mount", "-t", "tmpfs", "cvother", str(mp))
        fs.umount(str(mp), device=loopdev)  # ours is not there: nothing to do
        assert os.path.ismount(mp)
        _sh("umount", str(mp))
        fs.mount(loopdev, mp, "ext4", [], False, state_dir=tree / "state")
        _sh("mount", "-t", "tmpfs", "cvtop", str(mp))
        with pytest.raises(CephvolError) as err:
            fs.umount(str(mp), device=loopdev)
        assert err.value.exit_code == ExitCode.BUSY and "something else" in err.value.message
        _sh("umount", str(mp))
        assert _mounted(devnum) == [str(mp)]
        # a component of the path swapped for a link: refused, nothing unmounted
        (tree / "um2").mkdir()
        (tree / "um2" / "m").mkdir()
        fs.mount(loopdev, tree / "um2" / "m", "ext4", [], False, state_dir=tree / "state")
        (tree / "um2").rename(tree / "um2.moved")
        os.symlink(tree / "um2.moved", tree / "um2")
        with pytest.raises(CephvolError) as err:
            fs.umount(str(tree / "um2" / "m"), device=loopdev)
        assert err.value.exit_code == ExitCode.UNSAFE
        assert str(tree / "um2.moved" / "m") in _mounted(devnum)
        fs.umount(str(tree / "um2.moved" / "m"), device=loopdev)
        fs.umount(str(mp), device=loopdev)
        fs.umount(str(mp), device=loopdev)  # again: a no-op
        assert _mounted(devnum) == []
    finally:
        for where in _mounted(devnum):
            subprocess.run(["umount", where], check=False)
        _umount_all_under(mp)
        with contextlib.suppress(OSError):
            (tree / "um2").unlink()
        shutil.rmtree(tree / "um2.moved", ignore_errors=True)
        with contextlib.suppress(OSError):
            mp.rmdir()


def test_fsck_failure_carries_e2fscks_own_reason(tmp_path: Path) -> None:
    img = tmp_path / "bad.img"
    with img.open("wb") as f:
        f.truncate(16 << 20)
    _sh("mkfs.ext4", "-q", str(img))
    with img.open("r+b") as f:  # the primary superblock is at 1 KiB
        f.seek(1024)
        f.write(os.urandom(2048))
    dev = _sh("losetup", "--find", "--show", str(img))
    try:
        with pytest.raises(CephvolError) as err:
            fs.fsck(dev, "ext4", "auto")
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)
    assert err.value.exit_code == ExitCode.UNSAFE
    assert "Bad magic number in super-block" in err.value.message, err.value.message
    assert "\n" not in err.value.message
