#!/bin/sh
# Install cephvol on a container host from its Debian package.
#
#   install-cephvol.sh [--offline | --no-install-recommends] PACKAGE.deb
#       apt-get install the package; apt pulls in its Debian dependencies
#       (python3-rados, python3-rbd, ceph-common, ...) and, unless
#       --no-install-recommends, the backends' tools (rbd-fuse, rbd-nbd,
#       qemu-storage-daemon). --offline: dpkg -i instead, for a host whose
#       dependencies are already installed and that cannot reach a Debian
#       mirror (the qemu test guest).
#   install-cephvol.sh SOURCE_TREE
#       build the package in the tree (`make deb`: Debian's tools, installed by
#       scripts/setup-deb) and install dist/cephvol_<version>_all.deb as above.
#       Vagrant hosts run this on the rsynced repository.
#
# A source tree that cannot build a package (no debian/, or read-only: the
# qemu test guest's source disk, the nspawn test's bind mount) is installed
# the old way, copied into dist-packages with a wrapper in /usr/local/bin,
# until the test harness hands its hosts the .deb (see the harness snippet in
# vagrant/README.md).
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
