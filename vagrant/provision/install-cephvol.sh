#!/bin/sh
# Install cephvol from a source tree (the repository root) on a container host
# whose Debian packages (guest-packages.txt) are already installed: the package
# goes into the first site directory (/usr/local/lib/python3.X/dist-packages
# on Debian), the command into
# /usr/local/bin. Used by the qemu test-host harness at every guest boot (the
# working tree arrives on a read-only disk) and by the Vagrant machines.
set -eu
src=${1:?usage: install-cephvol.sh SOURCE_TREE}
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
