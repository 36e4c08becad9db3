#!/bin/sh
# Vagrant container host: the package list and cephvol install the qemu
# test host uses (install-host.sh), Docker, and the lab cluster's config.
set -eu
ceph=${1:?usage: container-host.sh CEPH_NODE_ADDRESS}
here=$(cd "$(dirname "$0")" && pwd)
sh "$here/install-host.sh" /cephvol
apt-get install -y -q --no-install-recommends docker.io curl
mkdir -p /etc/ceph
for f in ceph.conf keyring; do
    curl -fsS --retry 30 --retry-delay 2 --retry-all-errors -o "/etc/ceph/$f" "http://$ceph:8765/$f"
done
chmod 600 /etc/ceph/keyring
echo "container host ready: cephvol $(cephvol --version)"
