"""Everything an operator types is validated before the host is touched."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cephvol.errors import ExitCode, UsageError
from cephvol.spec import (
    ImageSpec,
    format_size,
    parse_mountpoint,
    parse_size,
    parse_spec,
    spec_from_key,
)


@pytest.mark.parametrize(("text", "want"), [
    ("db1", ImageSpec("rbd", "", "db1")),
    ("volumes/db1", ImageSpec("volumes", "", "db1")),
    ("volumes/tenant-a/db1", ImageSpec("volumes", "tenant-a", "db1")),
    ("volumes/db1@snap.1", ImageSpec("volumes", "", "db1", "snap.1")),
    ("  rbd/x  ", ImageSpec("rbd", "", "x")),
])
def test_parse_spec_accepts_rbd_tool_forms(text: str, want: ImageSpec) -> None:
    assert parse_spec(text) == want


@pytest.mark.parametrize(("text", "why"), [
    ("", "empty image spec"),
    ("rbd/", "empty image name"),
    ("/img", "empty pool name"),
    ("a/b/c/d", "expected POOL"),
    ("rbd/img@", "empty snapshot name"),
    ("rbd/img@a@b", "more than one '@'"),
    ("rbd/../etc", "namespace name '..'"),
    ("rbd/..", "image name '..'"),
    ("rbd/-rf", "must not start"),
    ("rbd/has space", "may only contain"),
    ("rbd/x" + "y" * 96, "longer than 96"),
    ("rbd/a,b", "may only contain"),  # ',' would break the state key
])
def test_parse_spec_refuses_with_a_reason(text: str, why: str) -> None:
    with pytest.raises(UsageError, match=why) as ei:
        parse_spec(text)
    assert ei.value.exit_code == ExitCode.USAGE
    assert "\n" not in ei.value.message


def test_snapshot_refused_where_not_allowed() -> None:
    with pytest.raises(UsageError, match="snapshot is not allowed"):
        parse_spec("rbd/img@s", allow_snap=False)


_name = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,20}", fullmatch=True)


@given(pool=_name, ns=st.one_of(st.just(""), _name), image=_name,
       snap=st.one_of(st.none(), _name))
def test_key_round_trips_and_is_a_file_name(pool: str, ns: str, image: str,
                                            snap: str | None) -> None:
    spec = ImageSpec(pool, ns, image, snap)
    assert "/" not in spec.key and spec.key not in (".", "..")
    assert spec_from_key(spec.key) == spec
    assert parse_spec(str(spec)) == spec


@pytest.mark.parametrize(("text", "want"), [
    ("10G", 10 << 30), ("10GiB", 10 << 30), ("512", 512), ("4k", 4096),
    ("1M", 1 << 20), ("3T", 3 << 40), ("1E", 1 << 60), ("2048B", 2048),
])
def test_parse_size(text: str, want: int) -> None:
    assert parse_size(text) == want


@pytest.mark.parametrize(("text", "why"), [
    ("-1", "expected a whole number"), ("10Q", "expected a whole number"),
    ("0", "greater than zero"), ("0G", "greater than zero"), ("1.5G", "expected"),
    ("2E", "larger than 1E"), ("1000", "multiple of 512"), ("", "expected"),
    ("10iB", "expected"),
])
def test_parse_size_refuses(text: str, why: str) -> None:
    with pytest.raises(UsageError, match=why):
        parse_size(text)


@given(st.integers(min_value=1, max_value=1 << 51).map(lambda n: n * 512))
def test_format_size_round_trips(n: int) -> None:
    assert parse_size(format_size(n)) == n


@pytest.mark.parametrize(("text", "why"), [
    ("", "empty"), ("relative/dir", "absolute"), ("/a/../b", "'..'"), ("/", "root"),
    ("/a\nb", "control"),
])
def test_parse_mountpoint_refuses(text: str, why: str) -> None:
    with pytest.raises(UsageError, match=why):
        parse_mountpoint(text)


def test_parse_mountpoint_normalises() -> None:
    assert str(parse_mountpoint("/srv//db/")) == "/srv/db"


# -- issue 21 item 3: `^...$` accepted one trailing "\n"; every check is a fullmatch now

@pytest.mark.parametrize("text", [
    "rbd/ns\n/pg",  # the issue's: attach rbd/ns (another volume) and lose the rest
    "rbd\n/pg", "rbd/ns/pg\n@s", "rbd/pg@s\nx", "rbd/ns\r/pg", "rbd/pg\u0663/x",
    "rbd/p\u00e9g",  # non-ASCII letters too: the names go into paths, units, kernel strings
])
def test_spec_components_refuse_a_trailing_newline_and_non_ascii(text: str) -> None:
    with pytest.raises(UsageError, match="may only contain"):
        parse_spec(text)


@pytest.mark.parametrize("text", ["10G\n", "10\nG", "512\r", "\n512", "1\u0660G", "\u0661G"])
def test_parse_size_refuses_newlines_and_non_ascii_digits(text: str) -> None:
    with pytest.raises(UsageError, match="expected a whole number"):
        parse_size(text)


def test_parse_size_still_forgives_blanks() -> None:
    assert parse_size(" 10 G ") == parse_size("\t10G\t") == 10 << 30


def test_device_paths_refuse_a_trailing_newline() -> None:
    from cephvol.mapper import check_device_path

    assert check_device_path("/dev/loop0") == "/dev/loop0"
    with pytest.raises(UsageError, match="not a device path"):
        check_device_path("/dev/loop0\n")


def test_host_identity_refuses_a_newline_inside() -> None:
    from cephvol.ownership import HostIdentity

    with pytest.raises(UsageError, match="host identity"):
        HostIdentity.local(env={"CEPHVOL_HOST_ID": "a\nb"})
    assert HostIdentity.local(env={"CEPHVOL_HOST_ID": "host-a\n"}).id == "host-a"  # stripped


def test_a_newline_around_the_whole_spec_is_stripped_like_blanks() -> None:
    """parse_spec strips the text first (documented, tested above); what is
    left must be a clean spec, so nothing with a newline reaches a unit."""
    assert str(parse_spec("rbd/pg@s\n")) == "rbd/pg@s"
