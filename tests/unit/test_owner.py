"""--owner UID[:GID]: the owner of a new filesystem's root (issue 14 item 5).

Checked the same way on every path (CLI, API, plugin `-o owner=`, units);
mkfs itself sets the owner (ext4 root_owner, an xfs protofile), here on
sparse regular files (no loop device, no mount) read back with debugfs and
xfs_db.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from cephvol import fs
from cephvol.errors import UsageError

REPO = Path(__file__).resolve().parents[2]
CEPHVOL = str(REPO / ".venv" / "bin" / "cephvol")


@pytest.mark.parametrize(("text", "want"), [
    ("1000:1000", (1000, 1000)),
    ("1000", (1000, 0)),
    ("0:0", (0, 0)),
    ("0", (0, 0)),
    ("4294967294:4294967294", (4294967294, 4294967294)),
    ("007:08", (7, 8)),
])
def test_owner_is_numbers(text: str, want: tuple[int, int]) -> None:
    assert fs.parse_owner(text) == want


@pytest.mark.parametrize("text", [
    "", ":", "1000:", ":1000", "-1", "1000:-1", "4294967295", "1:4294967295",
    "99999999999", "9" * 5000, "postgres", "1000:staff", " 1000", "1000 ", "+5", "1_000",
    "1:2:3", "\u0661\u0662", "1000\n", "0x10",
])
def test_anything_else_is_a_usage_error(text: str) -> None:
    with pytest.raises(UsageError, match=r"expected UID or UID:GID, numbers 0 to 4294967294"):
        fs.parse_owner(text)


def test_user_extended_options_do_not_drop_root_owner() -> None:
    """mke2fs keeps only the last -E; ours and the caller's are one."""
    ext, rest = fs._ext4_extended(["-E", "stride=16", "-L", "data", "-Estripe_width=32"],
                                  (1000, 50))
    assert ext.split(",") == ["nodiscard", "lazy_itable_init=1", "lazy_journal_init=1",
                              "stride=16", "stripe_width=32", "root_owner=1000:50"]
    assert rest == ["-L", "data"]
    ext, rest = fs._ext4_extended([], None)
    assert "root_owner" not in ext and rest == []


def _sparse(tmp_path: Path, name: str) -> str:
    img = tmp_path / name
    with open(img, "wb") as f:
        f.truncate(512 << 20)  # mkfs.xfs wants at least 300 MiB
    return str(img)


def _ext4_root(img: str) -> tuple[int, int, str]:
    out = subprocess.run(["debugfs", "-R", "stat /", img], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    m = re.search(r"Mode:\s+(\d+).*?User:\s+(\d+)\s+Group:\s+(\d+)", out, re.S)
    assert m, out
    return int(m.group(2)), int(m.group(3)), m.group(1)


def _xfs_root(img: str) -> tuple[int, int, str]:
    out = subprocess.run(["xfs_db", "-r", "-c", "sb 0", "-c", "p rootino", img],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    ino = out.split("=")[1].strip()
    out = subprocess.run(["xfs_db", "-r", "-c", f"inode {ino}",
                          "-c", "p core.mode core.uid core.gid", img],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    v = dict(ln.split(" = ") for ln in out.splitlines() if " = " in ln)
    return int(v["core.uid"]), int(v["core.gid"]), v["core.mode"][-4:]


@pytest.mark.skipif(not shutil.which("debugfs"), reason="e2fsprogs not installed")
def test_mkfs_ext4_owns_the_root(tmp_path: Path) -> None:
    img = _sparse(tmp_path, "e.img")
    fs.mkfs(img, "ext4", ["-E", "stride=16"], owner=(1000, 1001))
    assert _ext4_root(img) == (1000, 1001, "0755")
    plain = _sparse(tmp_path, "p.img")
    fs.mkfs(plain, "ext4")
    assert _ext4_root(plain) == (0, 0, "0755")


@pytest.mark.skipif(not shutil.which("xfs_db"), reason="xfsprogs not installed")
def test_mkfs_xfs_owns_the_root(tmp_path: Path) -> None:
    img = _sparse(tmp_path, "x.img")
    fs.mkfs(img, "xfs", owner=(4294967294, 7))
    assert _xfs_root(img) == (4294967294, 7, "0755")
    plain = _sparse(tmp_path, "p.img")
    fs.mkfs(plain, "xfs")
    assert _xfs_root(plain) == (0, 0, "0755")
    with pytest.raises(UsageError, match="protofile"):
        fs.mkfs(_sparse(tmp_path, "q.img"), "xfs", ["-p", "/dev/null"], owner=(1, 1))


def test_mkfs_never_formats_what_holds_something_even_with_an_owner(tmp_path: Path) -> None:
    from cephvol.errors import Unsafe

    img = _sparse(tmp_path, "e.img")
    fs.mkfs(img, "ext4", owner=(5, 5))
    with pytest.raises(Unsafe, match="refusing to format"):
        fs.mkfs(img, "xfs", owner=(6, 6))
    assert _ext4_root(img) == (5, 5, "0755")


# -- every way in: CLI, API, plugin ------------------------------------------------


def _cv(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CEPHVOL, *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("args", "needle"), [
    (["--owner", "abc"], "--owner 'abc': expected UID or UID:GID"),
    (["--owner", "4294967295"], "numbers 0 to 4294967294"),
    (["--owner", "1", "--read-only"], "not with --read-only"),
    (["--owner", "1", "--no-mkfs"], "--no-mkfs"),
])
def test_cli_refuses_a_bad_owner_in_one_line(tmp_path: Path, args: list[str],
                                             needle: str) -> None:
    """Exit 2, one line, before anything is looked up (no cluster here)."""
    res = _cv("--state-dir", str(tmp_path / "state"), "--conf", str(tmp_path / "none.conf"),
              "attach", "rbd/img", "-m", str(tmp_path / "mnt"), *args)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("cephvol: error: ") and needle in res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert not (tmp_path / "mnt").exists()
    js = _cv("--state-dir", str(tmp_path / "state"), "attach", "rbd/img@snap", "--owner",
             "1", "--json")
    assert js.returncode == 2 and '"exit_code": 2' in js.stdout and "snapshot" in js.stdout


def test_cli_help_says_an_existing_filesystem_is_never_chowned() -> None:
    res = _cv("attach", "--help")
    assert res.returncode == 0
    text = " ".join(res.stdout.split())
    assert "--owner UID[:GID]" in text and "never chowned again" in text


@pytest.mark.parametrize("owner", ["x", (1, -1), (1, 2, 3), 1000, ("1", "2"), (True, 1)])
def test_api_refuses_a_bad_owner_before_anything(tmp_path: Path, owner: object) -> None:
    from cephvol import api

    with pytest.raises(UsageError, match="owner"):
        api.attach("rbd/img", tmp_path / "mnt", owner=owner,  # type: ignore[arg-type]
                   state_dir=tmp_path / "state", conf=tmp_path / "none.conf")
    assert not (tmp_path / "mnt").exists()


def test_plugin_option_owner() -> None:
    from cephvol.plugin.protocol import OPTIONS, parse_options

    assert "owner" in OPTIONS
    assert parse_options("v", {"owner": "1000:1000"}).owner == (1000, 1000)
    assert parse_options("v", {"owner": "33"}).owner == (33, 0)
    assert parse_options("v", {}).owner is None
    with pytest.raises(UsageError, match="option owner 'www-data'"):
        parse_options("v", {"owner": "www-data"})
    with pytest.raises(UsageError, match="read-only"):
        parse_options("v", {"owner": "1", "read-only": "true"})

