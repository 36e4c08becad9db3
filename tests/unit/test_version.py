"""One version number, in one place: cephvol/__init__.py. The command, the
Python package metadata setuptools builds from pyproject.toml, the Debian
package (debian/changelog names the .deb's version) and CHANGELOG.md must all
say the same, so a release that bumps one and forgets another fails here."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import cephvol

REPO = Path(__file__).resolve().parents[2]
CEPHVOL = str(Path(sys.executable).parent / "cephvol")


def test_version_is_a_plain_release_number() -> None:
    # a Debian native version and a PEP 440 version at once: digits and dots
    assert re.fullmatch(r"\d+\.\d+\.\d+", cephvol.__version__), cephvol.__version__


def test_cephvol_version_prints_it() -> None:
    cp = subprocess.run([CEPHVOL, "--version"], capture_output=True, text=True, timeout=30,
                        check=True)
    assert cp.stdout.strip() == f"cephvol, version {cephvol.__version__}"


def test_pyproject_takes_it_from_the_package() -> None:
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in meta["project"], "a second version number in pyproject.toml"
    assert "version" in meta["project"]["dynamic"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "cephvol.__version__"}
    # what setuptools itself computes when it builds the wheel (and the .deb)
    from setuptools.config.pyprojecttoml import read_configuration

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "[tool.setuptools] is still beta"
        conf = read_configuration(REPO / "pyproject.toml", expand=True)
    assert conf["project"]["version"] == cephvol.__version__


def test_debian_changelog_names_it() -> None:
    first = (REPO / "debian" / "changelog").read_text().splitlines()[0]
    m = re.fullmatch(r"cephvol \(([^)]+)\) [a-z-]+; urgency=\w+", first)
    assert m, f"debian/changelog's first line is not an entry header: {first!r}"
    assert m.group(1) == cephvol.__version__, (
        f"debian/changelog is at {m.group(1)}, cephvol at {cephvol.__version__}: "
        f"add an entry (dch -v {cephvol.__version__})")
    assert (REPO / "debian" / "source" / "format").read_text().strip() == "3.0 (native)"


def test_changelog_md_has_a_section_for_it() -> None:
    heads = re.findall(r"^## (\S+)", (REPO / "CHANGELOG.md").read_text(), re.M)
    assert heads and heads[0] == cephvol.__version__, heads
