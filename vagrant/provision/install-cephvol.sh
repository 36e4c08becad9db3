#!/bin/sh
# Install cephvol on a container host from its Debian package.
#
#   install-cephvol.sh [--offline | --no-install-recommends] PACKAGE.deb
#       apt-get install the package; apt pulls in its Debian dependencies
#       (python3-rados, python3-rbd, ceph-common, ...) and, unless
#       --no-install-recommends, the backends' tools (rbd-fuse, rbd-nbd,
#       qemu-storage-daemon). --offline: dpkg -i instead, for a host whose
#       dependencies are already installed and that cannot reach a Debian
#       mirror: the test hosts (the qemu guest and the nspawn hosts boot an
#       image built with guest-packages.txt; tests/vm/harness.py hands them the
#       session's package and runs `install-cephvol.sh --offline cephvol.deb`).
#       Either way /usr/bin/cephvol must be the cephvol that PATH finds (units
#       rendered by `cephvol units` name the one found): checked at the end.
#   install-cephvol.sh SOURCE_TREE
#       build the package in the tree (`make deb`: Debian's tools, installed by
#       scripts/setup-deb) and install dist/cephvol_<version>_all.deb as above.
#       Vagrant hosts run this on the rsynced repository.
#
# A source tree that cannot build a package (no debian/, or read-only) is
# still installed, copied into dist-packages with a wrapper in /usr/local/bin:
# no units, no dependencies checked. No test host uses that any more; a later
# install of the package removes such a copy (it would shadow the package).
set -eu
offline= norec=
case ${1:-} in
    --offline) offline=1; shift ;;
    --no-install-recommends) norec=$1; shift ;;
esac
arg=${1:?usage: install-cephvol.sh [--offline | --no-install-recommends] PACKAGE.deb | SOURCE_TREE}

# A copy installed the old way would shadow the package (/usr/local comes
# first on PATH and in sys.path): remove it, but only what this script wrote.
remove_copy() {
    if [ -f /usr/local/bin/cephvol ] && grep -q '^from cephvol.cli import entry$' /usr/local/bin/cephvol
    then
        rm -f /usr/local/bin/cephvol
        rm -rf "$(python3 -c 'import site; print(site.getsitepackages()[0])')/cephvol"
    fi
}

install_deb() {
    deb=$(readlink -f "$1")
    remove_copy
    if [ -n "$offline" ]; then
        dpkg -i "$deb"
    else
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q $norec "$deb"
    fi
    /usr/bin/cephvol --version
    found=$(command -v cephvol || true)
    if [ "$(readlink -f "${found:-/nonexistent}")" != /usr/bin/cephvol ]; then
        echo "install-cephvol.sh: installed /usr/bin/cephvol, but PATH finds ${found:-no cephvol}" \
             "first (units would run that one): remove it" >&2
        exit 1
    fi
}

install_copy() {
    src=$1
    dest=$(python3 -c 'import site; print(site.getsitepackages()[0])')
    mkdir -p "$dest"
    rm -rf "$dest/cephvol.new"
    cp -r "$src/cephvol" "$dest/cephvol.new"
    find "$dest/cephvol.new" -name __pycache__ -prune -exec rm -rf {} +
    rm -rf "$dest/cephvol"
    mv "$dest/cephvol.new" "$dest/cephvol"
    cat > /usr/local/bin/cephvol.new <<'PY'
#!/usr/bin/python3
import sys
from cephvol.cli import entry
sys.exit(entry())
PY
    chmod 755 /usr/local/bin/cephvol.new
    mv /usr/local/bin/cephvol.new /usr/local/bin/cephvol
    /usr/local/bin/cephvol --version
}

case $arg in
    *.deb)
        install_deb "$arg" ;;
    *)
        if [ -d "$arg/debian" ] && [ -w "$arg" ]; then
            make -C "$arg" deb
            version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$arg/cephvol/__init__.py")
            install_deb "$arg/dist/cephvol_${version}_all.deb"
        else
            install_copy "$arg"
        fi ;;
esac
